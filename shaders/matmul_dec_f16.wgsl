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

// slot_dot loading the slot's activations itself (matmul_dec.wgsl's DV_XW = 1).
fn slot_dot_x(w: WSlot, row4: u32, j: u32) -> f32 {
    return slot_dot(w, slot_x(row4, j));
}

// All DV_NR rows' dot products with slot j (matmul_dec.wgsl's DV_XW = 2): w[j0 + r] is row r's.
fn slot_dot_rows(w: array<WSlot, DV_NR * DV_UB>, j0: u32, row4: u32, j: u32) -> array<f32, DV_NR> {
    let xs = slot_x(row4, j);
    var acc: array<f32, DV_NR>;
    for (var r = 0u; r < DV_NR; r++) {
        acc[r] = slot_dot(w[j0 + r], xs);
    }
    return acc;
}
