// The few-token kernel's products of slot j (matmul_dec.wgsl's dvt_*; w[j0 + r] is row r's) for
// a type that dequantises its slot in groups of 4 elements: slot_w4(w, i), group i's weights
// with their scale applied, and slot_x4(row4, j, i), the activation vec4 they multiply (i <
// SLOT / 4). Each group of each row is decoded once and applied to every token, whose
// activation vec4 is loaded once for all rows: per weight element and token one FMA and
// 4 / DV_NR bytes of activation loads (from L1), where decoding per token (slot_dot, as
// matmul_dec_tok_slot.wgsl does) would add the decoding's 2-3 operations per element and token.
// Composed after the type's matmul_dec_<type>.wgsl.
fn slot_dot_tokens(acc: ptr<function, array<f32, DV_NRT>>, w: array<WSlot, DV_NR * DV_UB>, j0: u32, j: u32) {
    for (var i = 0u; i < SLOT / 4u; i++) {
        var wv: array<vec4<f32>, DV_NR>;
        for (var r = 0u; r < DV_NR; r++) {
            wv[r] = slot_w4(w[j0 + r], i);
        }
        for (var t = 0u; t < DV_NT; t++) {
            let xv = xa(slot_x4(dvt_row4(t), j, i));
            for (var r = 0u; r < DV_NR; r++) {
                // Four FMAs into the sum: dot() and an add would be five operations, and this
                // loop's arithmetic is what bounds the kernel at 8 or more tokens.
                let e = t * DV_NR + r;
                let wr = wv[r];
                (*acc)[e] = fma(wr.w, xv.w, fma(wr.z, xv.z, fma(wr.y, xv.y, fma(wr.x, xv.x, (*acc)[e]))));
            }
        }
    }
}
