// Q6_K slots of the decode matvec (matmul_dec.wgsl), in the layout of src/gpu/kquant.rs: a slot
// is 32 elements, 16 bytes of low nibbles in Q4_1's order plus two words of high bit pairs in
// wq's second segment (vec4 G + slot / 2, G = slots in the buffer: word 0 for elements 0..15,
// word 1 for 16..31, bits 2 (e % 16)); its two signed 8-bit scales (one per 16 elements) are in
// its super-block's vec4 of wd, and the super-block's f16 d in wd's second segment (word
// 4 SB + super-block / 2). x = d * sc * (q - 32).

@group(0) @binding(4) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> wd: array<vec4<u32>>;

const PERM: u32 = 0u;
// Elements per slot.
const SLOT: u32 = 32u;

// a[k]: the activations of word k's low nibbles (elements 4k..4k+3), a[4 + k] of its high
// nibbles (16 + 4k..).
struct XSlot {
    a: array<vec4<f32>, 8>,
}

// Quants, high bit pairs, the word holding the slot's two scales (at bit sc_shift), and the
// word holding its super-block's d (at bit d_shift).
struct WSlot {
    q: vec4<u32>,
    h: vec2<u32>,
    sc: u32,
    sc_shift: u32,
    d: u32,
    d_shift: u32,
}

fn slot_fetch(b: u32) -> WSlot {
    let g = chunk.rows * (chunk.cols / 32u);
    let hv = wq[g + (b >> 1u)];
    let sb = b >> 3u;
    let sub = b & 7u;
    return WSlot(wq[b], select(hv.xy, hv.zw, (b & 1u) == 1u), wd[sb][sub >> 1u], 16u * (sub & 1u), wd[(g >> 3u) + (sb >> 3u)][(sb >> 1u) & 3u], 16u * (sb & 1u));
}

fn slot_x(row4: u32, j: u32) -> XSlot {
    var a: array<vec4<f32>, 8>;
    let c = row4 + 8u * j;
    for (var k = 0u; k < 8u; k++) {
        a[k] = xa(c + k);
    }
    return XSlot(a);
}

// Nibbles become floats as in matmul_dec_q4_1.wgsl (dequant_q4.wgsl: or'ed into the mantissa
// of 2^(23-p) and the power subtracted), here with the offset 32 subtracted too; the high pairs are added as
// 16 * pair.
const DQ_LO_SUB = Q4_LO_POW + 32.0;
const DQ_HI_SUB = Q4_HI_POW + 32.0;
const PAIR_SHIFT = vec4<u32>(0u, 2u, 4u, 6u);

// sum d sc (q - 32) x over the slot.
fn slot_dot(w: WSlot, xs: XSlot) -> f32 {
    var lo_acc = 0.0;
    var hi_acc = 0.0;
    for (var k = 0u; k < 4u; k++) {
        let q = w.q[k];
        let s = q >> 12u;
        let pl = vec4<f32>((vec4<u32>(w.h.x >> (8u * k)) >> PAIR_SHIFT) & vec4<u32>(3u));
        let ph = vec4<f32>((vec4<u32>(w.h.y >> (8u * k)) >> PAIR_SHIFT) & vec4<u32>(3u));
        let lo = q4_lo_pow(q, s) - DQ_LO_SUB + 16.0 * pl;
        let hi = q4_hi_pow(q, s) - DQ_HI_SUB + 16.0 * ph;
        lo_acc += dot(lo, xs.a[k]);
        hi_acc += dot(hi, xs.a[4u + k]);
    }
    let sc = bitcast<i32>(w.sc);
    let d = unpack2x16float(w.d >> w.d_shift).x;
    return d * (f32(extractBits(sc, w.sc_shift, 8u)) * lo_acc + f32(extractBits(sc, w.sc_shift + 8u, 8u)) * hi_acc);
}

// The few-token kernel's groups of 4 (matmul_dec_tok.wgsl): group i < 4 is word i's low
// nibbles (the first 16 elements' scale), group 4 + k word k's high nibbles (the second's),
// with their high pairs: d sc (q - 32).
fn slot_w4(w: WSlot, i: u32) -> vec4<f32> {
    let k = i & 3u;
    let q = w.q[k];
    let s = q >> 12u;
    let sc = bitcast<i32>(w.sc);
    let d = unpack2x16float(w.d >> w.d_shift).x;
    if (i < 4u) {
        let pl = vec4<f32>((vec4<u32>(w.h.x >> (8u * k)) >> PAIR_SHIFT) & vec4<u32>(3u));
        let v = q4_lo_pow(q, s) - DQ_LO_SUB + 16.0 * pl;
        return v * (d * f32(extractBits(sc, w.sc_shift, 8u)));
    }
    let ph = vec4<f32>((vec4<u32>(w.h.y >> (8u * k)) >> PAIR_SHIFT) & vec4<u32>(3u));
    let v = q4_hi_pow(q, s) - DQ_HI_SUB + 16.0 * ph;
    return v * (d * f32(extractBits(sc, w.sc_shift + 8u, 8u)));
}

// slot_x's a[i].
fn slot_x4(row4: u32, j: u32, i: u32) -> u32 {
    return row4 + 8u * j + i;
}
