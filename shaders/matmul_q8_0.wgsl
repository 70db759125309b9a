// Q8_0 weights, repacked (src/gpu/matrix.rs): the 32 signed bytes of block
// b = row * (cols / 32) + k are wq[2b] (elements 0..15) and wq[2b + 1] (16..31); its f16 scale
// is half b of wd (two per word). x = d * q. A unit is half a block (16 elements).

@group(0) @binding(4) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> wd: array<u32>;

const UNIT: u32 = 16u;
const XV: u32 = 4u;
alias XUnit = array<vec4<f32>, 4>;

fn half_at(i: u32) -> f32 {
    let v = unpack2x16float(wd[i >> 1u]);
    return select(v.x, v.y, (i & 1u) == 1u);
}

fn x_sum(xv: XUnit) -> f32 {
    let s = (xv[0] + xv[1]) + (xv[2] + xv[3]);
    return (s.x + s.y) + (s.z + s.w);
}

// The bytes of w as f = 1 + (q + 128) / 256 (exact): each byte moved to the top eight mantissa
// bits of 1.0 with its sign bit flipped, a shift and one and-xor per element.
const BYTE_MANT: u32 = 0x007F8000u;
const ONE_FLIP: u32 = 0x3FC00000u;

fn bytes_f(w: u32) -> vec4<f32> {
    return bitcast<vec4<f32>>((vec4<u32>(w << 15u, w << 7u, w >> 1u, w >> 9u) & vec4<u32>(BYTE_MANT)) ^ vec4<u32>(ONE_FLIP));
}

// One unit's weights as loaded: quants and scale.
struct WUnit {
    q: vec4<u32>,
    d: vec2<f32>,
}

fn unit_fetch(g: u32) -> WUnit {
    return WUnit(wq[g], vec2<f32>(half_at(g >> 1u), 0.0));
}

// A unit times activations xv (xs = their sum): q = 256 f - 384.
fn unit_dot(w: WUnit, xv: XUnit, xs: f32) -> f32 {
    let q = w.q;
    let s = (dot(bytes_f(q.x), xv[0]) + dot(bytes_f(q.y), xv[1])) + (dot(bytes_f(q.z), xv[2]) + dot(bytes_f(q.w), xv[3]));
    return w.d.x * (256.0 * s - 384.0 * xs);
}

fn bytes_i(w: u32) -> vec4<f32> {
    return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(w << 24u, w << 16u, w << 8u, w)) >> vec4<u32>(24u));
}

// A unit dequantised exactly (q * d).
fn unit_deq(w: WUnit) -> XUnit {
    let q = w.q;
    let d = w.d.x;
    return XUnit(bytes_i(q.x) * d, bytes_i(q.y) * d, bytes_i(q.z) * d, bytes_i(q.w) * d);
}

// Elements 8p..8p+7 of block kb of `row`, dequantised (for the tiled kernel).
fn tile8(row: u32, kb: u32, p: u32, cols: u32) -> array<f32, 8> {
    let b = row * (cols / 32u) + kb;
    let q = wq[2u * b + (p >> 1u)];
    let d = half_at(b);
    let a = bytes_i(q[2u * (p & 1u)]) * d;
    let c = bytes_i(q[2u * (p & 1u) + 1u]) * d;
    return array<f32, 8>(a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w);
}
