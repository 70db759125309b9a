// F16 slots of the decode matvec (matmul_dec.wgsl): the GGUF bytes as they are, rows
// contiguous; a slot is 8 halves, one 16-byte load.

@group(0) @binding(4) var<storage, read> wq: array<vec4<u32>>;

// One word order only (the quantised types' PERM).
const PERM: u32 = 0u;
// Elements per slot.
const SLOT: u32 = 8u;

struct XSlot {
    a: array<vec4<f32>, 2>,
}

struct WSlot {
    q: vec4<u32>,
}

fn slot_fetch(b: u32) -> WSlot {
    return WSlot(wq[b]);
}

fn slot_x(row4: u32, j: u32) -> XSlot {
    let o = row4 + 2u * j;
    return XSlot(array<vec4<f32>, 2>(xa(o), xa(o + 1u)));
}

fn slot_dot(w: WSlot, xs: XSlot) -> f32 {
    let a = vec4<f32>(unpack2x16float(w.q.x), unpack2x16float(w.q.y));
    let b = vec4<f32>(unpack2x16float(w.q.z), unpack2x16float(w.q.w));
    return dot(a, xs.a[0]) + dot(b, xs.a[1]);
}

// The few-token kernel's groups of 4 (matmul_dec_tok.wgsl): halves 4i..4i+3.
fn slot_w4(w: WSlot, i: u32) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(w.q[2u * i]), unpack2x16float(w.q[2u * i + 1u]));
}

fn slot_x4(row4: u32, j: u32, i: u32) -> u32 {
    return row4 + 2u * j + i;
}
