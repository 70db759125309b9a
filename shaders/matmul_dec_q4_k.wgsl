// Q4_K slots of the decode matvec (matmul_dec.wgsl), in the layout of src/gpu/kquant.rs: a slot
// is one 32-element sub-block, 16 bytes of quants in Q4_1's order (byte i: element i in the low
// nibble, element i + 16 in the high one); its super-block's 16-byte header (f16 d and dmin,
// the 12 bytes of packed 6-bit scales and mins, as in the file, unpacked by kquant_scales.wgsl's
// k4_scale_min) is one vec4 that the 8 threads of a super-block load together.
// x = d * sc * q - dmin * m.

@group(0) @binding(4) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> wd: array<vec4<u32>>;

const PERM: u32 = 0u;
// Elements per slot.
const SLOT: u32 = 32u;

// a[k]: the activations of word k's low nibbles (elements 4k..4k+3), a[4 + k] of its high
// nibbles (16 + 4k..); sum: of all 32 (for the minimum).
struct XSlot {
    a: array<vec4<f32>, 8>,
    sum: f32,
}

// Quants, the super-block's header and the sub-block's index in it (decoded in slot_dot, so
// that a prefetched slot's loads are not waited for early).
struct WSlot {
    q: vec4<u32>,
    hdr: vec4<u32>,
    sub: u32,
}

fn slot_fetch(b: u32) -> WSlot {
    return WSlot(wq[b], wd[b >> 3u], b & 7u);
}

fn slot_x(row4: u32, j: u32) -> XSlot {
    var a: array<vec4<f32>, 8>;
    let c = row4 + 8u * j;
    var s = vec4<f32>(0.0);
    for (var k = 0u; k < 8u; k++) {
        a[k] = xa(c + k);
        s += a[k];
    }
    return XSlot(a, (s.x + s.y) + (s.z + s.w));
}

// Nibbles become floats as in matmul_dec_q4_1.wgsl (dequant_q4.wgsl): or'ed into the mantissa
// of 2^(23-p) and the power subtracted (s = w >> 12).
// sum (d sc q - dmin m) x over the slot.
fn slot_dot(w: WSlot, xs: XSlot) -> f32 {
    var acc = 0.0;
    for (var k = 0u; k < 4u; k++) {
        let q = w.q[k];
        let s = q >> 12u;
        let lo = q4_lo_pow(q, s) - Q4_LO_POW;
        let hi = q4_hi_pow(q, s) - Q4_HI_POW;
        acc += dot(lo, xs.a[k]) + dot(hi, xs.a[4u + k]);
    }
    let dm = unpack2x16float(w.hdr.x);
    let sm = k4_scale_min(w.hdr, w.sub);
    return (dm.x * sm.x) * acc - (dm.y * sm.y) * xs.sum;
}

// The few-token kernel's groups of 4 (matmul_dec_tok.wgsl): group i < 4 is word i's low
// nibbles, group 4 + k word k's high nibbles, d sc q - dmin m (the scales decoded per group:
// per row, not per token, and the same values for a slot's 8 groups).
fn slot_w4(w: WSlot, i: u32) -> vec4<f32> {
    let k = i & 3u;
    let q = w.q[k];
    let s = q >> 12u;
    let dm = unpack2x16float(w.hdr.x);
    let sm = k4_scale_min(w.hdr, w.sub);
    var v: vec4<f32>;
    if (i < 4u) {
        v = q4_lo_pow(q, s) - Q4_LO_POW;
    } else {
        v = q4_hi_pow(q, s) - Q4_HI_POW;
    }
    return v * (dm.x * sm.x) - dm.y * sm.y;
}

// slot_x's a[i].
fn slot_x4(row4: u32, j: u32, i: u32) -> u32 {
    return row4 + 8u * j + i;
}
