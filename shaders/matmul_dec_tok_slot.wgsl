// The few-token kernel's products of slot j (matmul_dec.wgsl's dvt_*; w[j0 + r] is row r's) for
// a type whose slot is decoded as a whole (Q5_0, Q5_1, Q2_K, Q3_K: high bits or scales shared
// across the slot; Q4_K, Q5_K and Q6_K have groups of 4, matmul_dec_tok.wgsl): for each of the DV_NT tokens, its activations loaded once for all
// rows (slot_x), acc[t * DV_NR + r] += row r's slot_dot. Each token decodes the weights again,
// which the types of matmul_dec_tok.wgsl avoid. Composed after the type's matmul_dec_<type>.wgsl.
fn slot_dot_tokens(acc: ptr<function, array<f32, DV_NRT>>, w: array<WSlot, DV_NR * DV_UB>, j0: u32, j: u32) {
    for (var t = 0u; t < DV_NT; t++) {
        let xs = slot_x(dvt_row4(t), j);
        for (var r = 0u; r < DV_NR; r++) {
            (*acc)[t * DV_NR + r] += slot_dot(w[j0 + r], xs);
        }
    }
}
