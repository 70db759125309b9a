// Q3_K slots of the decode matvec (matmul_dec.wgsl), in the 2-bit layout of src/gpu/kquant.rs:
// a slot is one 32-element group, 8 bytes of the quants' low 2 bits (byte k: elements 4k..4k+3
// at bits 0, 2, 4, 6) and a word of high bits in wq's second segment (word 2 G + slot, G = slots
// in the buffer; bit e set: element e is not lowered by 4); its super-block's 16 bytes of wd
// hold the 12 bytes of packed 6-bit scales (one per 16 elements) and the f16 d.
// x = d * (sc - 32) * (q - 4 + 4 h).

@group(0) @binding(4) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> wd: array<vec4<u32>>;

const PERM: u32 = 0u;
// Elements per slot.
const SLOT: u32 = 32u;

// a[k]: elements 4k..4k+3.
struct XSlot {
    a: array<vec4<f32>, 8>,
}

struct WSlot {
    q: vec2<u32>,
    h: u32,
    hdr: vec4<u32>,
    sub: u32,
}

fn slot_fetch(b: u32) -> WSlot {
    let g = chunk.rows * (chunk.cols / 32u);
    let qv = wq[b >> 1u];
    return WSlot(select(qv.xy, qv.zw, (b & 1u) == 1u), wq[(g >> 1u) + (b >> 2u)][b & 3u], wd[b >> 3u], b & 7u);
}

fn slot_x(row4: u32, j: u32) -> XSlot {
    var a: array<vec4<f32>, 8>;
    let c = row4 + 8u * j;
    for (var k = 0u; k < 8u; k++) {
        a[k] = xa(c + k);
    }
    return XSlot(a);
}

// Byte i of the packed scales.
fn q3_byte(h: vec4<u32>, i: u32) -> u32 {
    return (h[i >> 2u] >> (8u * (i & 3u))) & 0xFFu;
}

// Scale j (0..16), signed (ggml's: low nibbles in bytes 0..7, low then high halves; top two
// bits in bytes 8..11).
fn q3_scale(h: vec4<u32>, j: u32) -> f32 {
    let low = (q3_byte(h, j & 7u) >> (4u * (j >> 3u))) & 15u;
    let high = (q3_byte(h, 8u + (j & 3u)) >> (2u * (j >> 2u))) & 3u;
    return f32(i32(low | (high << 4u)) - 32);
}

const FIELDS = vec4<u32>(0u, 2u, 4u, 6u);
const BITS = vec4<u32>(0u, 1u, 2u, 3u);

// Elements 4k..4k+3 of bits w (2-bit fields of byte k % 4 of the word) and high bits h.
fn q3_vals(w: u32, h: u32, k: u32) -> vec4<f32> {
    let low = (vec4<u32>(w >> (8u * (k & 3u))) >> FIELDS) & vec4<u32>(3u);
    let hb = (vec4<u32>(h >> (4u * k)) >> BITS) & vec4<u32>(1u);
    return vec4<f32>(low + 4u * hb) - 4.0;
}

// sum d (sc - 32) q x over the slot.
fn slot_dot(w: WSlot, xs: XSlot) -> f32 {
    var lo = 0.0;
    var hi = 0.0;
    for (var k = 0u; k < 4u; k++) {
        lo += dot(q3_vals(w.q.x, w.h, k), xs.a[k]);
        hi += dot(q3_vals(w.q.y, w.h, 4u + k), xs.a[4u + k]);
    }
    let d = unpack2x16float(w.hdr.w).x;
    return d * (q3_scale(w.hdr, 2u * w.sub) * lo + q3_scale(w.hdr, 2u * w.sub + 1u) * hi);
}
