// The decode matvec's per-word and all-rows slot products (matmul_dec.wgsl's DV_XW = 1 and 2)
// for a type whose slot gains nothing from loading its activations word by word (F32, F16,
// Q8_0, Q4_1): both load the slot's activations once with slot_x. Composed right after such a
// type's matmul_dec_<type>.wgsl; Q4_0 has its own (matmul_dec_q4_0.wgsl).

// slot_dot loading the slot's activations itself (DV_XW = 1).
fn slot_dot_x(w: WSlot, row4: u32, j: u32) -> f32 {
    return slot_dot(w, slot_x(row4, j));
}

// All DV_NR rows' dot products with slot j (DV_XW = 2): w[j0 + r] is row r's.
fn slot_dot_rows(w: array<WSlot, DV_NR * DV_UB>, j0: u32, row4: u32, j: u32) -> array<f32, DV_NR> {
    let xs = slot_x(row4, j);
    var acc: array<f32, DV_NR>;
    for (var r = 0u; r < DV_NR; r++) {
        acc[r] = slot_dot(w[j0 + r], xs);
    }
    return acc;
}

