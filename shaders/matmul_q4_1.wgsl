// Q4_1 weights, repacked (src/gpu/matrix.rs): 16 quant bytes per block in wq, in the word
// orders of matmul_q4_0.wgsl (PERM); the f16 scale d and minimum m of block
// b = row * (cols / 32) + k in wd[b] (d in the low half). x = d * q + m.
//
// A unit (one thread's step in the unit kernels) is one word of quants: 4 elements in its low
// nibbles and 4 in its high nibbles, each group of 4 consecutive in the row (see
// matmul_q4_0.wgsl for both orders).

@group(0) @binding(4) var<storage, read> wq: array<u32>;
@group(0) @binding(5) var<storage, read> wd: array<u32>;

// Elements per unit; every type has 8, as two vec4 of activations.
const UNIT: u32 = 8u;
alias XUnit = array<vec4<f32>, 2>;
const PERM: u32 = 0u;

// Offsets (in vec4, from the row's start) of unit u's two activation vec4.
fn x_chunks(u: u32) -> vec2<u32> {
    if (PERM == 1u) {
        let c = (u >> 5u) * 64u + (u & 3u) * 16u + ((u >> 2u) & 7u);
        return vec2<u32>(c, c + 8u);
    }
    let c = (u >> 2u) * 8u + (u & 3u);
    return vec2<u32>(c, c + 4u);
}

fn x_sum(xv: XUnit) -> f32 {
    let s = xv[0] + xv[1];
    return (s.x + s.y) + (s.z + s.w);
}

// The activations as unit_dot wants them (as they are: the decoding below needs no scaling).
fn x_prep(xv: XUnit) -> XUnit {
    return xv;
}

// As matmul_q4_0.wgsl (dequant_q4.wgsl): a nibble at bit p <= 16, or'ed into the bits of
// 2^(23-p), gives exactly 2^(23-p) + q; here only 2^(23-p) is subtracted.
// Word w's low and high nibbles as floats (s = w >> 12).
fn dq_lo(w: u32, s: u32) -> vec4<f32> {
    return q4_lo_pow(w, s) - Q4_LO_POW;
}

fn dq_hi(w: u32, s: u32) -> vec4<f32> {
    return q4_hi_pow(w, s) - Q4_HI_POW;
}

// sum q x over one word of quants (xp from x_prep).
fn word_dot(w: u32, xp: XUnit) -> f32 {
    let s = w >> 12u;
    return dot(dq_lo(w, s), xp[0]) + dot(dq_hi(w, s), xp[1]);
}

// One unit's weights as loaded: quants in q.x, the low nibbles' block's (d, m) in d and the
// high nibbles' block's packed (d, m) in q.y (the same block in GGUF order).
struct WUnit {
    q: vec4<u32>,
    d: vec2<f32>,
}

fn unit_fetch(g: u32) -> WUnit {
    var b = g >> 2u;
    var b1 = b;
    if (PERM == 1u) {
        b = (g >> 5u) * 8u + (g & 3u) * 2u;
        b1 = b + 1u;
    }
    return WUnit(vec4<u32>(wq[g], wd[b1], 0u, 0u), unpack2x16float(wd[b]));
}

fn sum4(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

// A unit times activations (xp = x_prep(x); xs, the sum of x, covers both blocks and is not
// used): sum (d q + m) x.
fn unit_dot(w: WUnit, xp: XUnit, xs: f32) -> f32 {
    let q = w.q.x;
    let s = q >> 12u;
    let dm1 = unpack2x16float(w.q.y);
    return w.d.x * dot(dq_lo(q, s), xp[0]) + w.d.y * sum4(xp[0]) + dm1.x * dot(dq_hi(q, s), xp[1]) + dm1.y * sum4(xp[1]);
}

// A unit dequantised exactly (as ggml: q * d + m; q * d is exact, so a fused multiply-add
// rounds the same).
fn unit_deq(w: WUnit) -> XUnit {
    let q = w.q.x;
    let s = q >> 12u;
    let dm1 = unpack2x16float(w.q.y);
    return XUnit(dq_lo(q, s) * w.d.x + w.d.y, dq_hi(q, s) * dm1.x + dm1.y);
}

// Elements 8p..8p+7 of block kb of `row`, dequantised (for the tiled kernel).
fn tile8(row: u32, kb: u32, p: u32, cols: u32) -> array<f32, 8> {
    let g = row * (cols / 32u) + kb;
    let dm = unpack2x16float(wd[g]);
    var w0: u32;
    var w1: u32;
    if (PERM == 1u) {
        // As matmul_q4_0.wgsl: word (kb % 8) / 2 of slots 2p and 2p + 1.
        let base = (g & ~7u) * 4u + ((kb & 7u) >> 1u) + 8u * p;
        let sh = (kb & 1u) * 4u;
        w0 = wq[base] >> sh;
        w1 = wq[base + 4u] >> sh;
    } else {
        // p = 0, 1: low nibbles of bytes 0..7, 8..15; p = 2, 3: their high nibbles.
        let sh = (p >> 1u) * 4u;
        w0 = wq[4u * g + 2u * (p & 1u)] >> sh;
        w1 = wq[4u * g + 2u * (p & 1u) + 1u] >> sh;
    }
    let a = vec4<f32>(vec4<u32>(w0, w0 >> 8u, w0 >> 16u, w0 >> 24u) & vec4<u32>(15u)) * dm.x + dm.y;
    let b = vec4<f32>(vec4<u32>(w1, w1 >> 8u, w1 >> 16u, w1 >> 24u) & vec4<u32>(15u)) * dm.x + dm.y;
    return array<f32, 8>(a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w);
}
