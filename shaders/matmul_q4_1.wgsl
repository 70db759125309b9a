// Q4_1 weights, repacked (src/gpu/matrix.rs): block g = row * (cols / 32) + b has its 16 bytes
// of quants at wq[g] (GGUF nibble order, as Q4_0) and its f16 scale d and minimum m packed in
// wd[g] (d in the low half). x = d * q + m. A unit is one block (32 elements).

@group(0) @binding(4) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> wd: array<u32>;

const UNIT: u32 = 32u;
const XV: u32 = 8u;
alias XUnit = array<vec4<f32>, 8>;

fn x_sum(xv: XUnit) -> f32 {
    let s = ((xv[0] + xv[1]) + (xv[2] + xv[3])) + ((xv[4] + xv[5]) + (xv[6] + xv[7]));
    return (s.x + s.y) + (s.z + s.w);
}

// The nibbles as f = 1 + q / 16 (see matmul_q4_0.wgsl).
const NIB_MANT: u32 = 0x00780000u;
const ONE_BITS: u32 = 0x3F800000u;

fn lo_nib(w: u32) -> vec4<f32> {
    return bitcast<vec4<f32>>((vec4<u32>(w << 19u, w << 11u, w << 3u, w >> 5u) & vec4<u32>(NIB_MANT)) | vec4<u32>(ONE_BITS));
}

fn hi_nib(w: u32) -> vec4<f32> {
    return bitcast<vec4<f32>>((vec4<u32>(w << 15u, w << 7u, w >> 1u, w >> 9u) & vec4<u32>(NIB_MANT)) | vec4<u32>(ONE_BITS));
}

// One unit's weights as loaded: quants, scale and minimum.
struct WUnit {
    q: vec4<u32>,
    d: vec2<f32>,
}

fn unit_fetch(g: u32) -> WUnit {
    return WUnit(wq[g], unpack2x16float(wd[g]));
}

// sum (d q + m) x = d (16 S - 16 xs) + m xs, S = sum f x.
fn unit_dot(w: WUnit, xv: XUnit, xs: f32) -> f32 {
    let q = w.q;
    let dm = w.d;
    let lo = (dot(lo_nib(q.x), xv[0]) + dot(lo_nib(q.y), xv[1])) + (dot(lo_nib(q.z), xv[2]) + dot(lo_nib(q.w), xv[3]));
    let hi = (dot(hi_nib(q.x), xv[4]) + dot(hi_nib(q.y), xv[5])) + (dot(hi_nib(q.z), xv[6]) + dot(hi_nib(q.w), xv[7]));
    return dm.x * (16.0 * ((lo + hi) - xs)) + dm.y * xs;
}

// A block dequantised exactly (as ggml: q * d + m; q * d is exact, so a fused multiply-add
// rounds the same).
fn unit_deq(w: WUnit) -> XUnit {
    let q = w.q;
    let dm = w.d;
    var v: XUnit;
    for (var i = 0u; i < 4u; i++) {
        let w = q[i];
        v[i] = vec4<f32>(vec4<u32>(w, w >> 8u, w >> 16u, w >> 24u) & vec4<u32>(15u)) * dm.x + dm.y;
        v[4u + i] = vec4<f32>(vec4<u32>(w >> 4u, w >> 12u, w >> 20u, w >> 28u) & vec4<u32>(15u)) * dm.x + dm.y;
    }
    return v;
}

// Elements 8p..8p+7 of block kb of `row`, dequantised (for the tiled kernel).
fn tile8(row: u32, kb: u32, p: u32, cols: u32) -> array<f32, 8> {
    let g = row * (cols / 32u) + kb;
    let q = wq[g];
    let dm = unpack2x16float(wd[g]);
    let sh = (p >> 1u) * 4u;
    let w0 = q[2u * (p & 1u)] >> sh;
    let w1 = q[2u * (p & 1u) + 1u] >> sh;
    let a = vec4<f32>(vec4<u32>(w0, w0 >> 8u, w0 >> 16u, w0 >> 24u) & vec4<u32>(15u)) * dm.x + dm.y;
    let b = vec4<f32>(vec4<u32>(w1, w1 >> 8u, w1 >> 16u, w1 >> 24u) & vec4<u32>(15u)) * dm.x + dm.y;
    return array<f32, 8>(a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w);
}
