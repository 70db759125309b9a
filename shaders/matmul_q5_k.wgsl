// Q5_K weights in the layout of src/gpu/kquant.rs for the unit kernels (matmul_common.wgsl,
// get_rows_common.wgsl): Q4_K's (matmul_q4_k.wgsl) plus each sub-block's fifth bits, one word
// per sub-block from word 4 G of wq (bit e: element e's). x = d * sc * q - dmin * m.

@group(0) @binding(4) var<storage, read> wq: array<u32>;
@group(0) @binding(5) var<storage, read> wd: array<u32>;

// Elements per unit; every type has 8, as two vec4 of activations.
const UNIT: u32 = 8u;
alias XUnit = array<vec4<f32>, 2>;
const PERM: u32 = 0u;

// Offsets (in vec4, from the row's start) of unit u's two activation vec4: word u % 4 of group
// u / 4 holds elements 4 (u % 4).. in its low nibbles and 16 + 4 (u % 4).. in its high ones.
fn x_chunks(u: u32) -> vec2<u32> {
    let c = (u >> 2u) * 8u + (u & 3u);
    return vec2<u32>(c, c + 4u);
}

fn x_sum(xv: XUnit) -> f32 {
    let s = xv[0] + xv[1];
    return (s.x + s.y) + (s.z + s.w);
}

fn x_prep(xv: XUnit) -> XUnit {
    return xv;
}

// One unit decoded: its quants as exact floats (after the type's offset) for the low-nibble
// and the high-nibble elements, and (scale, min) of each: x = scale * q + min.
struct WUnit {
    lo: vec4<f32>,
    hi: vec4<f32>,
    s: vec4<f32>,
}

// Groups (32 elements) in this buffer: the start, in words / 4, of wq's high-bit segment.
fn n_groups() -> u32 {
    return chunk.rows * (chunk.cols / 32u);
}

// Word k's elements' fifth bits (of the group's bits h), times 16: low nibbles, high nibbles.
fn fifth_lo(h: u32, k: u32) -> vec4<u32> {
    return ((vec4<u32>(h >> (4u * k)) >> vec4<u32>(0u, 1u, 2u, 3u)) & vec4<u32>(1u)) << vec4<u32>(4u);
}

fn fifth_hi(h: u32, k: u32) -> vec4<u32> {
    return fifth_lo(h >> 16u, k);
}

fn unit_fetch(u: u32) -> WUnit {
    let g = u >> 2u;
    let k = u & 3u;
    let sb = 4u * (g >> 3u);
    let h = vec4<u32>(wd[sb], wd[sb + 1u], wd[sb + 2u], wd[sb + 3u]);
    let dm = unpack2x16float(h.x);
    let sm = k4_scale_min(h, g & 7u);
    let d1 = dm.x * sm.x;
    let m1 = -(dm.y * sm.y);
    let q = wq[u];
    let bits = wq[4u * n_groups() + g];
    return WUnit(vec4<f32>(nibbles_lo(q) | fifth_lo(bits, k)), vec4<f32>(nibbles_hi(q) | fifth_hi(bits, k)), vec4<f32>(d1, m1, d1, m1));
}

fn sum4(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

// A unit times activations (xs, the sum of x, is not used: each half has its own minimum).
fn unit_dot(w: WUnit, xp: XUnit, xs: f32) -> f32 {
    return w.s.x * dot(w.lo, xp[0]) + w.s.y * sum4(xp[0]) + w.s.z * dot(w.hi, xp[1]) + w.s.w * sum4(xp[1]);
}

// A unit dequantised exactly as ggml does: scale * q is exact (or, for Q6_K, ggml's one
// rounding), so the one add of the minimum, fused or not, rounds the same.
fn unit_deq(w: WUnit) -> XUnit {
    return XUnit(w.lo * w.s.x + w.s.y, w.hi * w.s.z + w.s.w);
}

// Elements 8p..8p+7 of group kb of `row`, dequantised (for the tiled kernel): the low (p < 2)
// or high halves of units 2 (p % 2) and the next.
fn tile8(row: u32, kb: u32, p: u32, cols: u32) -> array<f32, 8> {
    let u = (row * (cols / 32u) + kb) * 4u + 2u * (p & 1u);
    let a = unit_deq(unit_fetch(u));
    let b = unit_deq(unit_fetch(u + 1u));
    let va = select(a[0], a[1], p >= 2u);
    let vb = select(b[0], b[1], p >= 2u);
    return array<f32, 8>(va.x, va.y, va.z, va.w, vb.x, vb.y, vb.z, vb.w);
}
