// Q3_K weights in the 2-bit layout of src/gpu/kquant.rs for the unit kernels
// (matmul_common.wgsl, get_rows_common.wgsl): 8 bytes of the quants' low 2 bits per 32-element
// group (byte k: elements 4k..4k+3 at bits 0, 2, 4, 6), then from word 2 G one word of high bits
// per group (bit e set: element e is not lowered by 4); wd each super-block's 12 bytes of
// packed 6-bit scales and its f16 d, in 16 bytes. x = d * (sc - 32) * (q - 4 + 4 h).

@group(0) @binding(4) var<storage, read> wq: array<u32>;
@group(0) @binding(5) var<storage, read> wd: array<u32>;

// Elements per unit; every type has 8, as two vec4 of activations.
const UNIT: u32 = 8u;
alias XUnit = array<vec4<f32>, 2>;
const PERM: u32 = 0u;

// Offsets (in vec4, from the row's start) of unit u's two activation vec4: unit u is elements
// 8 (u % 4)..+7 of group u / 4, bytes 2 (u % 4) and the next of its 8 bytes of quants.
fn x_chunks(u: u32) -> vec2<u32> {
    let c = (u >> 2u) * 8u + 2u * (u & 3u);
    return vec2<u32>(c, c + 1u);
}

fn x_sum(xv: XUnit) -> f32 {
    let s = xv[0] + xv[1];
    return (s.x + s.y) + (s.z + s.w);
}

fn x_prep(xv: XUnit) -> XUnit {
    return xv;
}

// One unit decoded: its 8 quants as exact floats (after the type's offset) and (scale, min)
// twice: x = scale * q + min.
struct WUnit {
    lo: vec4<f32>,
    hi: vec4<f32>,
    s: vec4<f32>,
}

// The four 2-bit fields of byte i of word w.
fn fields(w: u32, i: u32) -> vec4<u32> {
    return (vec4<u32>(w >> (8u * i)) >> vec4<u32>(0u, 2u, 4u, 6u)) & vec4<u32>(3u);
}

// Groups (32 elements) in this buffer.
fn n_groups() -> u32 {
    return chunk.rows * (chunk.cols / 32u);
}

// Byte i of the packed scales of the super-block whose words start at s.
fn q3_byte(s: u32, i: u32) -> u32 {
    return (wd[s + (i >> 2u)] >> (8u * (i & 3u))) & 0xFFu;
}

// Scale j (0..16), signed (see matmul_dec_q3_k.wgsl).
fn q3_scale(s: u32, j: u32) -> f32 {
    let low = (q3_byte(s, j & 7u) >> (4u * (j >> 3u))) & 15u;
    let high = (q3_byte(s, 8u + (j & 3u)) >> (2u * (j >> 2u))) & 3u;
    return f32(i32(low | (high << 4u)) - 32);
}

fn unit_fetch(u: u32) -> WUnit {
    let g = u >> 2u;
    let p = u & 3u;
    let s = 4u * (g >> 3u);
    let d = unpack2x16float(wd[s + 3u]).x;
    // d * (sc - 32) is exact in f32 (ggml forms it first too).
    let sc = d * q3_scale(s, 2u * (g & 7u) + (p >> 1u));
    let w = wq[2u * g + (p >> 1u)];
    let h = wq[2u * n_groups() + g] >> (8u * p);
    let i = 2u * (p & 1u);
    let hl = (vec4<u32>(h) >> vec4<u32>(0u, 1u, 2u, 3u)) & vec4<u32>(1u);
    let hh = (vec4<u32>(h) >> vec4<u32>(4u, 5u, 6u, 7u)) & vec4<u32>(1u);
    return WUnit(vec4<f32>(fields(w, i) + 4u * hl) - 4.0, vec4<f32>(fields(w, i + 1u) + 4u * hh) - 4.0, vec4<f32>(sc, 0.0, sc, 0.0));
}

fn sum4(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

fn unit_dot(w: WUnit, xp: XUnit, xs: f32) -> f32 {
    return w.s.x * dot(w.lo, xp[0]) + w.s.y * sum4(xp[0]) + w.s.z * dot(w.hi, xp[1]) + w.s.w * sum4(xp[1]);
}

// A unit dequantised exactly as ggml does (scale * q is exact, or ggml's one rounding).
fn unit_deq(w: WUnit) -> XUnit {
    return XUnit(w.lo * w.s.x + w.s.y, w.hi * w.s.z + w.s.w);
}

// Elements 8p..8p+7 of group kb of `row`, dequantised (for the tiled kernel): one unit.
fn tile8(row: u32, kb: u32, p: u32, cols: u32) -> array<f32, 8> {
    let v = unit_deq(unit_fetch((row * (cols / 32u) + kb) * 4u + p));
    return array<f32, 8>(v[0].x, v[0].y, v[0].z, v[0].w, v[1].x, v[1].y, v[1].z, v[1].w);
}
