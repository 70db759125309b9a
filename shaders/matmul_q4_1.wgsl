// Q4_1 weights, repacked (src/gpu/matrix.rs): block b = row * (cols / 32) + k has its 16 quant
// bytes at words 4b..4b+3 of wq (GGUF nibble order, as Q4_0) and its f16 scale d and minimum m
// in wd[b] (d in the low half). x = d * q + m.
//
// A unit (one thread's step) is one word of quants: unit g = 4b + i holds elements 4i..4i+3
// (low nibbles) and 16 + 4i..16 + 4i + 3 (high nibbles), so adjacent threads read adjacent
// words.

@group(0) @binding(4) var<storage, read> wq: array<u32>;
@group(0) @binding(5) var<storage, read> wd: array<u32>;

// Elements per unit; every type has 8, as two vec4 of activations.
const UNIT: u32 = 8u;
alias XUnit = array<vec4<f32>, 2>;

// Offsets (in vec4, from the row's start) of unit u's two activation vec4.
fn x_chunks(u: u32) -> vec2<u32> {
    let c = (u >> 2u) * 8u + (u & 3u);
    return vec2<u32>(c, c + 4u);
}

fn x_sum(xv: XUnit) -> f32 {
    let s = xv[0] + xv[1];
    return (s.x + s.y) + (s.z + s.w);
}

// (As matmul_q4_0.wgsl.) The fast dot product avoids int-to-float conversions (a quarter of the FMA rate on some
// GPUs): a nibble at bit p <= 16 of a word, or'ed into 1.0f, gives f = 1 + q 2^(p-23)
// exactly, so (f - 1) times x 2^(23-p) is q x. Nibbles at bits 20..28 are first shifted down
// by 12. x_prep scales the activations by 2^(23-p) once per unit, for all rows.
const ONE_BITS: u32 = 0x3F800000u;

fn x_prep(xv: XUnit) -> XUnit {
    // Low nibbles of bytes 0..3 sit at bits 0, 8, 16 and (shifted) 12; high nibbles at 4, 12,
    // and (shifted) 8, 16.
    return XUnit(xv[0] * vec4<f32>(8388608.0, 32768.0, 128.0, 2048.0), xv[1] * vec4<f32>(524288.0, 2048.0, 32768.0, 128.0));
}

// sum q x over one word of quants (xp from x_prep).
fn word_dot(w: u32, xp: XUnit) -> f32 {
    let b = w >> 12u;
    let lo = bitcast<vec4<f32>>(vec4<u32>(w & 0xFu, w & 0xF00u, w & 0xF0000u, b & 0xF000u) | vec4<u32>(ONE_BITS)) - 1.0;
    let hi = bitcast<vec4<f32>>(vec4<u32>(w & 0xF0u, w & 0xF000u, b & 0xF00u, b & 0xF0000u) | vec4<u32>(ONE_BITS)) - 1.0;
    return dot(lo, xp[0]) + dot(hi, xp[1]);
}

// One unit's weights as loaded: quants (in q.x), scale and minimum.
struct WUnit {
    q: vec4<u32>,
    d: vec2<f32>,
}

fn unit_fetch(g: u32) -> WUnit {
    return WUnit(vec4<u32>(wq[g], 0u, 0u, 0u), unpack2x16float(wd[g >> 2u]));
}

// A unit times activations (xp = x_prep(x), xs = sum x): sum (d q + m) x.
fn unit_dot(w: WUnit, xp: XUnit, xs: f32) -> f32 {
    return w.d.x * word_dot(w.q.x, xp) + w.d.y * xs;
}

// A unit dequantised exactly (as ggml: q * d + m; q * d is exact, so a fused multiply-add
// rounds the same).
fn unit_deq(w: WUnit) -> XUnit {
    let q = w.q.x;
    let lo = vec4<f32>(vec4<u32>(q, q >> 8u, q >> 16u, q >> 24u) & vec4<u32>(15u));
    let hi = vec4<f32>(vec4<u32>(q >> 4u, q >> 12u, q >> 20u, q >> 28u) & vec4<u32>(15u));
    return XUnit(lo * w.d.x + w.d.y, hi * w.d.x + w.d.y);
}

// Elements 8p..8p+7 of block kb of `row`, dequantised (for the tiled kernel).
fn tile8(row: u32, kb: u32, p: u32, cols: u32) -> array<f32, 8> {
    let g = row * (cols / 32u) + kb;
    let dm = unpack2x16float(wd[g]);
    // p = 0, 1: low nibbles of bytes 0..7, 8..15; p = 2, 3: their high nibbles.
    let sh = (p >> 1u) * 4u;
    let w0 = wq[4u * g + 2u * (p & 1u)] >> sh;
    let w1 = wq[4u * g + 2u * (p & 1u) + 1u] >> sh;
    let a = vec4<f32>(vec4<u32>(w0, w0 >> 8u, w0 >> 16u, w0 >> 24u) & vec4<u32>(15u)) * dm.x + dm.y;
    let b = vec4<f32>(vec4<u32>(w1, w1 >> 8u, w1 >> 16u, w1 >> 24u) & vec4<u32>(15u)) * dm.x + dm.y;
    return array<f32, 8>(a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w);
}
