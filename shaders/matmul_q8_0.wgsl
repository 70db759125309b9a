// Q8_0 weights, repacked (src/gpu/matrix.rs): the 32 signed quant bytes of block
// b = row * (cols / 32) + k are wq[4b..4b+3] (8 bytes each, elements in order); its f16 scale
// is half b of wd (two per word). x = d * q.
//
// A unit (one thread's step) is 8 bytes: unit g = 4b + i holds elements 8i..8i+7 of block b.

@group(0) @binding(4) var<storage, read> wq: array<vec2<u32>>;
@group(0) @binding(5) var<storage, read> wd: array<u32>;

// Elements per unit; every type has 8, as two vec4 of activations.
const UNIT: u32 = 8u;
alias XUnit = array<vec4<f32>, 2>;

fn half_at(i: u32) -> f32 {
    let v = unpack2x16float(wd[i >> 1u]);
    return select(v.x, v.y, (i & 1u) == 1u);
}

// Offsets (in vec4, from the row's start) of unit u's two activation vec4.
fn x_chunks(u: u32) -> vec2<u32> {
    return vec2<u32>(2u * u, 2u * u + 1u);
}

fn x_sum(xv: XUnit) -> f32 {
    let s = xv[0] + xv[1];
    return (s.x + s.y) + (s.z + s.w);
}

// The fast dot product avoids int-to-float conversions: with the sign bits flipped
// (u = q + 128), a byte at bit p <= 8 of a word, or'ed into 1.0f, gives f = 1 + u 2^(p-23)
// exactly, so (f - 1) times x 2^(23-p) is u x; bytes 2 and 3 are shifted down by 16 first.
// x_prep scales the activations by 2^(23-p) once per unit, for all rows.
const ONE_BITS: u32 = 0x3F800000u;

fn x_prep(xv: XUnit) -> XUnit {
    let s = vec4<f32>(8388608.0, 32768.0, 8388608.0, 32768.0);
    return XUnit(xv[0] * s, xv[1] * s);
}

// sum (q + 128) x over one word of quants (xp scaled by x_prep).
fn word_dot(w: u32, xp: vec4<f32>) -> f32 {
    let a = w ^ 0x80808080u;
    let b = a >> 16u;
    let f = bitcast<vec4<f32>>(vec4<u32>(a & 0xFFu, a & 0xFF00u, b & 0xFFu, b & 0xFF00u) | vec4<u32>(ONE_BITS)) - 1.0;
    return dot(f, xp);
}

// One unit's weights as loaded: quants (in q.xy) and scale.
struct WUnit {
    q: vec4<u32>,
    d: vec2<f32>,
}

fn unit_fetch(g: u32) -> WUnit {
    let q = wq[g];
    return WUnit(vec4<u32>(q, 0u, 0u), vec2<f32>(half_at(g >> 2u), 0.0));
}

// A unit times activations (xp = x_prep(x), xs = sum x): sum q d x.
fn unit_dot(w: WUnit, xp: XUnit, xs: f32) -> f32 {
    return w.d.x * ((word_dot(w.q.x, xp[0]) + word_dot(w.q.y, xp[1])) - 128.0 * xs);
}

fn bytes_i(w: u32) -> vec4<f32> {
    return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(w << 24u, w << 16u, w << 8u, w)) >> vec4<u32>(24u));
}

// A unit dequantised exactly (q * d).
fn unit_deq(w: WUnit) -> XUnit {
    return XUnit(bytes_i(w.q.x) * w.d.x, bytes_i(w.q.y) * w.d.x);
}

// Elements 8p..8p+7 of block kb of `row`, dequantised (for the tiled kernel).
fn tile8(row: u32, kb: u32, p: u32, cols: u32) -> array<f32, 8> {
    let b = row * (cols / 32u) + kb;
    let q = wq[4u * b + p];
    let d = half_at(b);
    let a = bytes_i(q.x) * d;
    let c = bytes_i(q.y) * d;
    return array<f32, 8>(a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w);
}
