// Q8_0 weights, repacked (src/gpu/matrix.rs): 32 signed quant bytes per block in wq, the f16
// scale of block b = row * (cols / 32) + k at half b of wd (two per word). x = d * q.
//
// A unit (one thread's step in the unit kernels) is 8 bytes, two words, each 4 consecutive
// elements of the row (x_chunks gives their two activation vec4). Two orders (PERM, specialised
// per matrix by src/gpu/matrix.rs):
// - PERM = 0, GGUF order: unit 4b + i holds elements 8i..8i+7 of block b.
// - PERM = 1 (rows whose block count is a multiple of 4): each run of 4 blocks (a super-group,
//   128 bytes) holds 8 slots of 16 bytes; word k of slot i has elements 4i..4i+3 of block k, so
//   the 8 threads of a super-group that each load a slot read 128 contiguous bytes of
//   activations per load (matmul_dec_q8_0.wgsl). Unit 2i + j of the super-group is words 2j and
//   2j + 1 of slot i.

@group(0) @binding(4) var<storage, read> wq: array<vec2<u32>>;
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
        let c = (u >> 4u) * 32u + (u & 1u) * 16u + ((u >> 1u) & 7u);
        return vec2<u32>(c, c + 8u);
    }
    return vec2<u32>(2u * u, 2u * u + 1u);
}

fn x_sum(xv: XUnit) -> f32 {
    let s = xv[0] + xv[1];
    return (s.x + s.y) + (s.z + s.w);
}

// The activations as unit_dot wants them (as they are: the decoding below needs no scaling).
fn x_prep(xv: XUnit) -> XUnit {
    return xv;
}

// Bytes become floats without int-to-float conversions: dequant_q8.wgsl's i8x4_to_f32.

// sum q x over one word of quants (xp: the word's 4 activations).
fn word_dot(w: u32, xp: vec4<f32>) -> f32 {
    return dot(i8x4_to_f32(w), xp);
}

// One unit's weights as loaded: quants (in q.xy) and the scales of its two words' blocks
// (equal in GGUF order).
struct WUnit {
    q: vec4<u32>,
    d: vec2<f32>,
}

fn unit_fetch(g: u32) -> WUnit {
    let q = wq[g];
    if (PERM == 1u) {
        // Blocks 2j and 2j + 1 of super-group g / 16: one word of scales.
        return WUnit(vec4<u32>(q, 0u, 0u), unpack2x16float(wd[(g >> 4u) * 2u + (g & 1u)]));
    }
    let d = half_at(g >> 2u);
    return WUnit(vec4<u32>(q, 0u, 0u), vec2<f32>(d, d));
}

// A unit times activations (xp = x_prep(x); xs, the sum of x, is not needed): sum q d x.
fn unit_dot(w: WUnit, xp: XUnit, xs: f32) -> f32 {
    return w.d.x * dot(i8x4_to_f32(w.q.x), xp[0]) + w.d.y * dot(i8x4_to_f32(w.q.y), xp[1]);
}

// A unit dequantised exactly (q * d).
fn unit_deq(w: WUnit) -> XUnit {
    return XUnit(i8x4_to_f32(w.q.x) * w.d.x, i8x4_to_f32(w.q.y) * w.d.y);
}

fn word_at(i: u32) -> u32 {
    let v = wq[i >> 1u];
    return select(v.x, v.y, (i & 1u) == 1u);
}

// Elements 8p..8p+7 of block kb of `row`, dequantised (for the tiled kernel).
fn tile8(row: u32, kb: u32, p: u32, cols: u32) -> array<f32, 8> {
    let b = row * (cols / 32u) + kb;
    let d = half_at(b);
    var q: vec2<u32>;
    if (PERM == 1u) {
        // Groups 2p and 2p + 1 of block kb: word kb % 4 of slots 2p and 2p + 1.
        let w = (b & ~3u) * 8u + (kb & 3u) + 8u * p;
        q = vec2<u32>(word_at(w), word_at(w + 4u));
    } else {
        q = wq[4u * b + p];
    }
    let a = i8x4_to_f32(q.x) * d;
    let c = i8x4_to_f32(q.y) * d;
    return array<f32, 8>(a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w);
}
