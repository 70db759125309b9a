// Q8_0 slots of the decode matvec (matmul_dec.wgsl): the layout of matmul_q8_0.wgsl (both word
// orders, PERM), bound as vec4 words; a slot is 16 bytes of quants (16 elements).
//
// PERM = 1: slot i of a super-group (4 blocks) holds group i of each block, so it needs
// activation vec4 i + 8k for word k, and the 8 threads of a super-group read 128 contiguous
// bytes per load; the super-group's 4 scales are 8 bytes shared by them.
// PERM = 0: slot b is half b % 2 of block b / 2 in GGUF order.

@group(0) @binding(4) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> wd: array<vec4<u32>>;

const PERM: u32 = 0u;
// Elements per slot.
const SLOT: u32 = 16u;

// a[k]: the activations of word k.
struct XSlot {
    a: array<vec4<f32>, 4>,
}

// Quants and the scale of each word.
struct WSlot {
    q: vec4<u32>,
    d: vec4<f32>,
}

fn slot_fetch(b: u32) -> WSlot {
    if (PERM == 1u) {
        let v = wd[b >> 4u];
        let s = select(v.xy, v.zw, ((b >> 3u) & 1u) == 1u);
        return WSlot(wq[b], vec4<f32>(unpack2x16float(s.x), unpack2x16float(s.y)));
    }
    // Block b / 2: half b / 2 of the scales.
    let v = unpack2x16float(wd[b >> 4u][(b >> 2u) & 3u]);
    return WSlot(wq[b], vec4<f32>(select(v.x, v.y, ((b >> 1u) & 1u) == 1u)));
}

fn slot_x(row4: u32, j: u32) -> XSlot {
    var a: array<vec4<f32>, 4>;
    if (PERM == 1u) {
        let c = row4 + (j >> 3u) * 32u + (j & 7u);
        for (var k = 0u; k < 4u; k++) {
            a[k] = xa(c + 8u * k);
        }
    } else {
        let c = row4 + 4u * j;
        for (var k = 0u; k < 4u; k++) {
            a[k] = xa(c + k);
        }
    }
    return XSlot(a);
}

// Bytes become floats without int-to-float conversions: dequant_q8.wgsl's i8x4_to_f32.

// sum q d x over the slot.
fn slot_dot(w: WSlot, xs: XSlot) -> f32 {
    var acc = 0.0;
    for (var k = 0u; k < 4u; k++) {
        acc += w.d[k] * dot(i8x4_to_f32(w.q[k]), xs.a[k]);
    }
    return acc;
}

// The few-token kernel's groups of 4 (matmul_dec_tok.wgsl): word i, q d.
fn slot_w4(w: WSlot, i: u32) -> vec4<f32> {
    return i8x4_to_f32(w.q[i]) * w.d[i];
}

// slot_x's a[i].
fn slot_x4(row4: u32, j: u32, i: u32) -> u32 {
    if (PERM == 1u) {
        return row4 + (j >> 3u) * 32u + (j & 7u) + 8u * i;
    }
    return row4 + 4u * j + i;
}
