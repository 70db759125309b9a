// Q4_0 slots of the decode matvec (matmul_dec.wgsl): the layout of matmul_q4_0.wgsl (both word
// orders, PERM), bound as vec4 words so that a thread loads a slot (16 bytes of quants, 32
// elements) at once, and the scales as vec4 words.
//
// PERM = 1: slot i of a super-group (8 blocks) needs activation vec4 i + 16k (low nibbles of
// word k) and i + 16k + 8 (high nibbles), so the 8 threads of a super-group read 128
// contiguous bytes per load; the super-group's 8 scales are one 16-byte load shared by them.
// PERM = 0: a slot is one block in GGUF order.

@group(0) @binding(4) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> wd: array<vec4<u32>>;

const PERM: u32 = 0u;
// Elements per slot.
const SLOT: u32 = 32u;

// A slot's activations: a[k] for the low nibbles of word k, a[4 + k] for its high nibbles.
struct XSlot {
    a: array<vec4<f32>, 8>,
}

// Quants and, in word k of d, the f16 scales of word k's low and high nibbles (unpacked only
// when used: registers bound how many loads a thread keeps in flight).
struct WSlot {
    q: vec4<u32>,
    d: vec4<u32>,
}

// Slot b of the chunk (row * slots per row + slot).
fn slot_fetch(b: u32) -> WSlot {
    if (PERM == 1u) {
        return WSlot(wq[b], wd[b >> 3u]);
    }
    let h = (wd[b >> 3u][(b >> 1u) & 3u] >> ((b & 1u) * 16u)) & 0xFFFFu;
    return WSlot(wq[b], vec4<u32>(h | (h << 16u)));
}

// Activations of slot j of a row starting at vec4 row4.
fn slot_x(row4: u32, j: u32) -> XSlot {
    var a: array<vec4<f32>, 8>;
    if (PERM == 1u) {
        let c = row4 + (j >> 3u) * 64u + (j & 7u);
        for (var k = 0u; k < 4u; k++) {
            a[k] = xa(c + 16u * k);
            a[4u + k] = xa(c + 16u * k + 8u);
        }
    } else {
        let c = row4 + 8u * j;
        for (var k = 0u; k < 8u; k++) {
            a[k] = xa(c + k);
        }
    }
    return XSlot(a);
}

// Nibbles become floats without int-to-float conversions (dequant_q4.wgsl): 2^(23-p) + q, from
// which subtracting 2^(23-p) + 8 leaves q - 8 exactly.
const DQ_LO_SUB = Q4_LO_POW + 8.0;
const DQ_HI_SUB = Q4_HI_POW + 8.0;

// sum (q - 8) d x over the slot.
fn slot_dot(w: WSlot, xs: XSlot) -> f32 {
    var acc = 0.0;
    for (var k = 0u; k < 4u; k++) {
        let q = w.q[k];
        let s = q >> 12u;
        let lo = q4_lo_pow(q, s) - DQ_LO_SUB;
        let hi = q4_hi_pow(q, s) - DQ_HI_SUB;
        let d = unpack2x16float(w.d[k]);
        acc += d.x * dot(lo, xs.a[k]) + d.y * dot(hi, xs.a[4u + k]);
    }
    return acc;
}

// The activation vec4 that word k of slot j's low nibbles multiply, in a row starting at vec4
// row4 (slot_x's order); the high nibbles' vec4 is 8 further on (permuted) or 4 (GGUF order).
fn slot_x_lo(row4: u32, j: u32, k: u32) -> u32 {
    if (PERM == 1u) {
        return row4 + (j >> 3u) * 64u + (j & 7u) + 16u * k;
    }
    return row4 + 8u * j + k;
}

// slot_dot with the activations loaded word by word (2 vec4 live instead of 8): fewer registers,
// so more threads per SM and more loads in flight, at the price of reloading the activations
// (from L1) for every row.
fn slot_dot_x(w: WSlot, row4: u32, j: u32) -> f32 {
    var acc = 0.0;
    for (var k = 0u; k < 4u; k++) {
        let ca = slot_x_lo(row4, j, k);
        let cb = ca + select(4u, 8u, PERM == 1u);
        let q = w.q[k];
        let s = q >> 12u;
        let lo = q4_lo_pow(q, s) - DQ_LO_SUB;
        let hi = q4_hi_pow(q, s) - DQ_HI_SUB;
        let d = unpack2x16float(w.d[k]);
        acc += d.x * dot(lo, xa(ca)) + d.y * dot(hi, xa(cb));
    }
    return acc;
}

// All DV_NR rows' dot products with slot j (matmul_dec.wgsl's DV_XW = 2; w[j0 + r] is row r's),
// the activations loaded word by word once for all rows: as few live registers as slot_dot_x
// and half its activation loads at two rows. Those loads (8 times the weights' bytes, from L1)
// bound this kernel as much as the weights do: a second such load per element (a folded
// norm's weights, per row) made the 7B products 35% slower on an H200.
fn slot_dot_rows(w: array<WSlot, DV_NR * DV_UB>, j0: u32, row4: u32, j: u32) -> array<f32, DV_NR> {
    var acc: array<f32, DV_NR>;
    for (var k = 0u; k < 4u; k++) {
        let ca = slot_x_lo(row4, j, k);
        let cb = ca + select(4u, 8u, PERM == 1u);
        let xl = xa(ca);
        let xh = xa(cb);
        for (var r = 0u; r < DV_NR; r++) {
            let ws = w[j0 + r];
            let q = ws.q[k];
            let s = q >> 12u;
            let lo = q4_lo_pow(q, s) - DQ_LO_SUB;
            let hi = q4_hi_pow(q, s) - DQ_HI_SUB;
            let d = unpack2x16float(ws.d[k]);
            acc[r] += d.x * dot(lo, xl) + d.y * dot(hi, xh);
        }
    }
    return acc;
}


// The few-token kernel's groups of 4 (matmul_dec_tok.wgsl): group i < 4 is word i's low
// nibbles, group 4 + k word k's high nibbles, (q - 8) d.
fn slot_w4(w: WSlot, i: u32) -> vec4<f32> {
    let k = i & 3u;
    let q = w.q[k];
    let s = q >> 12u;
    let d = unpack2x16float(w.d[k]);
    if (i < 4u) {
        return (q4_lo_pow(q, s) - DQ_LO_SUB) * d.x;
    }
    return (q4_hi_pow(q, s) - DQ_HI_SUB) * d.y;
}

fn slot_x4(row4: u32, j: u32, i: u32) -> u32 {
    return slot_x_lo(row4, j, i & 3u) + select(0u, select(4u, 8u, PERM == 1u), i >= 4u);
}
