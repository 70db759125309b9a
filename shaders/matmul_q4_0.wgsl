// Q4_0 weights, repacked (src/gpu/matrix.rs): 16 quant bytes per block in wq, the f16 scale of
// block b = row * (cols / 32) + k at half b of wd (two per word). x = d * (q - 8).
//
// A unit (one thread's step in the unit kernels) is one word of quants: 4 elements in its low
// nibbles (bits 0, 8, 16, 24) and 4 in its high nibbles (4, 12, 20, 28), each group of 4
// consecutive in the row (x_chunks gives their two activation vec4).
//
// Two orders of a row's words (PERM, specialised per matrix by src/gpu/matrix.rs):
// - PERM = 0, GGUF order: word 4b + i of block b has elements 4i..4i+3 (low nibbles) and
//   16+4i..16+4i+3 (high nibbles) of the block.
// - PERM = 1 (rows whose block count is a multiple of 8): each run of 8 blocks (a super-group,
//   128 bytes) holds 8 slots of 16 bytes; word k of slot i has elements 4i..4i+3 of block 2k in
//   its low nibbles and of block 2k + 1 in its high nibbles. A thread that loads slot i then
//   needs activation vec4 i, i + 8, i + 16, ... of the super-group, so the 8 threads of a
//   super-group read 128 contiguous bytes per load (matmul_dec_q4_0.wgsl); in GGUF order each
//   thread's 128 bytes of activations are contiguous and a warp's load touches 32 lines.

@group(0) @binding(4) var<storage, read> wq: array<u32>;
@group(0) @binding(5) var<storage, read> wd: array<u32>;

// Elements per unit; every type has 8, as two vec4 of activations.
const UNIT: u32 = 8u;
alias XUnit = array<vec4<f32>, 2>;
const PERM: u32 = 0u;

fn half_at(i: u32) -> f32 {
    let v = unpack2x16float(wd[i >> 1u]);
    return select(v.x, v.y, (i & 1u) == 1u);
}

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

// Nibbles become floats without int-to-float conversions (dequant_q4.wgsl): 2^(23-p) + q, from
// which subtracting 2^(23-p) + 8 leaves q - 8 exactly.
const DQ_LO_SUB = Q4_LO_POW + 8.0;
const DQ_HI_SUB = Q4_HI_POW + 8.0;

// Word w's low and high nibbles minus 8, as floats (s = w >> 12).
fn dq_lo(w: u32, s: u32) -> vec4<f32> {
    return q4_lo_pow(w, s) - DQ_LO_SUB;
}

fn dq_hi(w: u32, s: u32) -> vec4<f32> {
    return q4_hi_pow(w, s) - DQ_HI_SUB;
}

// sum (q - 8) x over one word of quants (xp from x_prep).
fn word_dot(w: u32, xp: XUnit) -> f32 {
    let s = w >> 12u;
    return dot(dq_lo(w, s), xp[0]) + dot(dq_hi(w, s), xp[1]);
}

// One unit's weights as loaded: quants (in q.x) and the scales of its low and high nibbles'
// blocks (equal in GGUF order).
struct WUnit {
    q: vec4<u32>,
    d: vec2<f32>,
}

fn unit_fetch(g: u32) -> WUnit {
    if (PERM == 1u) {
        // Blocks 2k and 2k + 1 of super-group g / 32: one word of scales.
        return WUnit(vec4<u32>(wq[g], 0u, 0u, 0u), unpack2x16float(wd[(g >> 5u) * 4u + (g & 3u)]));
    }
    let d = half_at(g >> 2u);
    return WUnit(vec4<u32>(wq[g], 0u, 0u, 0u), vec2<f32>(d, d));
}

// A unit times activations (xp = x_prep(x); xs, the sum of x, is not needed): sum (q - 8) d x.
fn unit_dot(w: WUnit, xp: XUnit, xs: f32) -> f32 {
    let q = w.q.x;
    let s = q >> 12u;
    return w.d.x * dot(dq_lo(q, s), xp[0]) + w.d.y * dot(dq_hi(q, s), xp[1]);
}

// A unit dequantised exactly (as ggml: (q - 8) * d).
fn unit_deq(w: WUnit) -> XUnit {
    let q = w.q.x;
    let s = q >> 12u;
    return XUnit(dq_lo(q, s) * w.d.x, dq_hi(q, s) * w.d.y);
}

// Elements 8p..8p+7 of block kb of `row`, dequantised (for the tiled kernel).
fn tile8(row: u32, kb: u32, p: u32, cols: u32) -> array<f32, 8> {
    let g = row * (cols / 32u) + kb;
    let d = half_at(g);
    var w0: u32;
    var w1: u32;
    if (PERM == 1u) {
        // Elements 8p..8p+3 and 8p+4..8p+7 are group 2p and 2p + 1: word (kb % 8) / 2 of slots
        // 2p and 2p + 1, in the low nibbles for even kb.
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
    let a = (vec4<f32>(vec4<u32>(w0, w0 >> 8u, w0 >> 16u, w0 >> 24u) & vec4<u32>(15u)) - 8.0) * d;
    let b = (vec4<f32>(vec4<u32>(w1, w1 >> 8u, w1 >> 16u, w1 >> 24u) & vec4<u32>(15u)) - 8.0) * d;
    return array<f32, 8>(a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w);
}
