// Q5_K slots of the decode matvec (matmul_dec.wgsl): Q4_K's (matmul_dec_q4_k.wgsl) plus each
// sub-block's fifth bits, one word per slot in wq's second segment (word 4 G + slot, G = slots
// in the buffer; bit e: element e's). x = d * sc * q - dmin * m.

@group(0) @binding(4) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> wd: array<vec4<u32>>;

const PERM: u32 = 0u;
// Elements per slot.
const SLOT: u32 = 32u;

// a[k]: the activations of word k's low nibbles (elements 4k..4k+3), a[4 + k] of its high
// nibbles (16 + 4k..); sum: of all 32.
struct XSlot {
    a: array<vec4<f32>, 8>,
    sum: f32,
}

struct WSlot {
    q: vec4<u32>,
    h: u32,
    hdr: vec4<u32>,
    sub: u32,
}

fn slot_fetch(b: u32) -> WSlot {
    let g = chunk.rows * (chunk.cols / 32u);
    return WSlot(wq[b], wq[g + (b >> 2u)][b & 3u], wd[b >> 3u], b & 7u);
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

const BIT4 = vec4<u32>(1u, 2u, 4u, 8u);

// sum (d sc q - dmin m) x over the slot: the nibbles' products, plus 16 times the activations
// whose fifth bit is set.
fn slot_dot(w: WSlot, xs: XSlot) -> f32 {
    var acc = 0.0;
    var hacc = 0.0;
    for (var k = 0u; k < 4u; k++) {
        let q = w.q[k];
        let s = q >> 12u;
        let lo = q4_lo_pow(q, s) - Q4_LO_POW;
        let hi = q4_hi_pow(q, s) - Q4_HI_POW;
        let hl = select(vec4<f32>(0.0), vec4<f32>(1.0), (vec4<u32>(w.h >> (4u * k)) & BIT4) != vec4<u32>(0u));
        let hh = select(vec4<f32>(0.0), vec4<f32>(1.0), (vec4<u32>(w.h >> (16u + 4u * k)) & BIT4) != vec4<u32>(0u));
        acc += dot(lo, xs.a[k]) + dot(hi, xs.a[4u + k]);
        hacc += dot(hl, xs.a[k]) + dot(hh, xs.a[4u + k]);
    }
    let dm = unpack2x16float(w.hdr.x);
    let sm = k4_scale_min(w.hdr, w.sub);
    return (dm.x * sm.x) * (acc + 16.0 * hacc) - (dm.y * sm.y) * xs.sum;
}

// The few-token kernel's groups of 4 (matmul_dec_tok.wgsl): group i < 4 is word i's low
// nibbles, group 4 + k word k's high nibbles, with their fifth bits: d sc q - dmin m.
fn slot_w4(w: WSlot, i: u32) -> vec4<f32> {
    let k = i & 3u;
    let q = w.q[k];
    let s = q >> 12u;
    let dm = unpack2x16float(w.hdr.x);
    let sm = k4_scale_min(w.hdr, w.sub);
    var v: vec4<f32>;
    var hb: vec4<u32>;
    if (i < 4u) {
        v = q4_lo_pow(q, s) - Q4_LO_POW;
        hb = vec4<u32>(w.h >> (4u * k)) & BIT4;
    } else {
        v = q4_hi_pow(q, s) - Q4_HI_POW;
        hb = vec4<u32>(w.h >> (16u + 4u * k)) & BIT4;
    }
    let h = select(vec4<f32>(0.0), vec4<f32>(16.0), hb != vec4<u32>(0u));
    return (v + h) * (dm.x * sm.x) - dm.y * sm.y;
}

// slot_x's a[i].
fn slot_x4(row4: u32, j: u32, i: u32) -> u32 {
    return row4 + 8u * j + i;
}
