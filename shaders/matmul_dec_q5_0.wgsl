// Q5_0 slots of the decode matvec (matmul_dec.wgsl), in the layout of src/gpu/kquant.rs: a slot
// is one block, 16 bytes of quants in the file's order (byte i: element i in the low nibble,
// element i + 16 in the high one), its fifth bits one word in wq's second segment (word 4 G +
// slot, G = slots in the buffer; bit e: element e's), its f16 d two per word in wd.
// x = d * (q - 16).

@group(0) @binding(4) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> wd: array<vec4<u32>>;

const PERM: u32 = 0u;
// Elements per slot.
const SLOT: u32 = 32u;

struct XSlot {
    a: array<vec4<f32>, 8>,
}

// Quants, fifth bits, and the word holding d (at bit d_shift).
struct WSlot {
    q: vec4<u32>,
    h: u32,
    d: u32,
    d_shift: u32,
}

fn slot_fetch(b: u32) -> WSlot {
    let g = chunk.rows * (chunk.cols / 32u);
    return WSlot(wq[b], wq[g + (b >> 2u)][b & 3u], wd[b >> 3u][(b >> 1u) & 3u], 16u * (b & 1u));
}

fn slot_x(row4: u32, j: u32) -> XSlot {
    var a: array<vec4<f32>, 8>;
    let c = row4 + 8u * j;
    for (var k = 0u; k < 8u; k++) {
        a[k] = xa(c + k);
    }
    return XSlot(a);
}

// Nibbles become floats as in matmul_dec_q4_1.wgsl (dequant_q4.wgsl), with the offset 16
// subtracted too.
const DQ_LO_SUB = Q4_LO_POW + 16.0;
const DQ_HI_SUB = Q4_HI_POW + 16.0;
const BIT4 = vec4<u32>(1u, 2u, 4u, 8u);

// sum d (q - 16) x over the slot.
fn slot_dot(w: WSlot, xs: XSlot) -> f32 {
    var acc = 0.0;
    for (var k = 0u; k < 4u; k++) {
        let q = w.q[k];
        let s = q >> 12u;
        let hl = select(vec4<f32>(0.0), vec4<f32>(16.0), (vec4<u32>(w.h >> (4u * k)) & BIT4) != vec4<u32>(0u));
        let hh = select(vec4<f32>(0.0), vec4<f32>(16.0), (vec4<u32>(w.h >> (16u + 4u * k)) & BIT4) != vec4<u32>(0u));
        let lo = q4_lo_pow(q, s) - DQ_LO_SUB + hl;
        let hi = q4_hi_pow(q, s) - DQ_HI_SUB + hh;
        acc += dot(lo, xs.a[k]) + dot(hi, xs.a[4u + k]);
    }
    return unpack2x16float(w.d >> w.d_shift).x * acc;
}
