// Q4_1 slots of the decode matvec (matmul_dec.wgsl): the layout of matmul_q4_1.wgsl (word
// orders as Q4_0, see matmul_dec_q4_0.wgsl), bound as vec4 words; a slot is 16 bytes of quants
// (32 elements). A super-group's 8 (d, m) words are two 16-byte loads.

@group(0) @binding(4) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> wd: array<vec4<u32>>;

const PERM: u32 = 0u;
// Elements per slot.
const SLOT: u32 = 32u;

// A slot's activations (a[k] for the low nibbles of word k, a[4 + k] for its high nibbles) and
// the sum of each vec4, for the minimums.
struct XSlot {
    a: array<vec4<f32>, 8>,
    sum: array<f32, 8>,
}

// Quants and the packed (d, m) of word k's low and high nibbles.
struct WSlot {
    q: vec4<u32>,
    dm: array<vec2<u32>, 4>,
}

fn slot_fetch(b: u32) -> WSlot {
    if (PERM == 1u) {
        let s0 = wd[(b >> 3u) * 2u];
        let s1 = wd[(b >> 3u) * 2u + 1u];
        return WSlot(wq[b], array<vec2<u32>, 4>(s0.xy, s0.zw, s1.xy, s1.zw));
    }
    let dm = wd[b >> 2u][b & 3u];
    let v = vec2<u32>(dm, dm);
    return WSlot(wq[b], array<vec2<u32>, 4>(v, v, v, v));
}

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
    var sum: array<f32, 8>;
    for (var k = 0u; k < 8u; k++) {
        sum[k] = (a[k].x + a[k].y) + (a[k].z + a[k].w);
    }
    return XSlot(a, sum);
}

// Nibbles become floats as in matmul_dec_q4_0.wgsl (dequant_q4.wgsl), with only 2^(23-p)
// subtracted (q, not q - 8).
// sum (d q + m) x over the slot.
fn slot_dot(w: WSlot, xs: XSlot) -> f32 {
    var acc = 0.0;
    for (var k = 0u; k < 4u; k++) {
        let q = w.q[k];
        let s = q >> 12u;
        let lo = q4_lo_pow(q, s) - Q4_LO_POW;
        let hi = q4_hi_pow(q, s) - Q4_HI_POW;
        let a = unpack2x16float(w.dm[k].x);
        let b = unpack2x16float(w.dm[k].y);
        acc += a.x * dot(lo, xs.a[k]) + a.y * xs.sum[k] + b.x * dot(hi, xs.a[4u + k]) + b.y * xs.sum[4u + k];
    }
    return acc;
}

// The few-token kernel's groups of 4 (matmul_dec_tok.wgsl): group i < 4 is word i's low
// nibbles, group 4 + k word k's high nibbles, d q + m.
fn slot_w4(w: WSlot, i: u32) -> vec4<f32> {
    let k = i & 3u;
    let q = w.q[k];
    let s = q >> 12u;
    if (i < 4u) {
        let a = unpack2x16float(w.dm[k].x);
        return (q4_lo_pow(q, s) - Q4_LO_POW) * a.x + a.y;
    }
    let b = unpack2x16float(w.dm[k].y);
    return (q4_hi_pow(q, s) - Q4_HI_POW) * b.x + b.y;
}

// slot_x's a[i].
fn slot_x4(row4: u32, j: u32, i: u32) -> u32 {
    if (PERM == 1u) {
        return row4 + (j >> 3u) * 64u + (j & 7u) + 16u * (i & 3u) + select(0u, 8u, i >= 4u);
    }
    return row4 + 8u * j + i;
}
