// F32 slots of the decode matvec (matmul_dec.wgsl): the GGUF bytes as they are, rows
// contiguous; a slot is 4 floats, one 16-byte load.

@group(0) @binding(4) var<storage, read> wq: array<vec4<u32>>;

// One word order only (the quantised types' PERM).
const PERM: u32 = 0u;
// Elements per slot.
const SLOT: u32 = 4u;

struct XSlot {
    a: vec4<f32>,
}

struct WSlot {
    q: vec4<u32>,
}

fn slot_fetch(b: u32) -> WSlot {
    return WSlot(wq[b]);
}

fn slot_x(row4: u32, j: u32) -> XSlot {
    return XSlot(xa(row4 + j));
}

fn slot_dot(w: WSlot, xs: XSlot) -> f32 {
    return dot(bitcast<vec4<f32>>(w.q), xs.a);
}

// The few-token kernel's group of 4 (matmul_dec_tok.wgsl): the slot.
fn slot_w4(w: WSlot, i: u32) -> vec4<f32> {
    return bitcast<vec4<f32>>(w.q);
}

fn slot_x4(row4: u32, j: u32, i: u32) -> u32 {
    return row4 + j;
}
