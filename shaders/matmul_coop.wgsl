// Prefill y = W x on cooperative matrices (tensor cores on NVIDIA): the tiled product of
// matmul_common.wgsl's mm_tiled with the inner loop on 16x16x16 f16 fragments accumulating in
// f32. Composed after `enable f16; enable wgpu_cooperative_matrix;`, one of the
// matmul_<type>.wgsl files (whose tile8 dequantises 8 weights) and matmul_common.wgsl (the
// bindings), and before matmul_store.wgsl and act.wgsl (the epilogues); src/gpu/matrix.rs
// chooses it only where the adapter offers 16x16x16 f16 -> f32 fragments and subgroups of 32.
//
// A workgroup computes CM_TM rows x CM_TN tokens with 8 subgroups of 32 threads, each owning
// 32 rows x 16 CM_FT tokens (2 x CM_FT fragments); the subgroups tile the workgroup's tokens in
// CM_SGN columns and its rows in CM_SGM = 8 / CM_SGN. Each step dequantises CM_KB blocks of
// weights (32 k each) once into shared memory as f16 (row-major, A) and converts the same k of
// the CM_TN tokens' activations to f16 (token-major, so B = x^T is column-major), then every
// subgroup multiplies its fragments. Weights and activations are rounded to f16 (11 significant
// bits), the sums stay f32: not the portable kernel's bits, which is why that one is the
// reference.
//
// The shape is a tuning choice (`--tune coop=tokens:kb:ft`, src/gpu/matrix.rs's CoopShape,
// which rewrites CM_TM, CM_TN, CM_KB and CM_FT before compilation; lines exactly of the form
// `const NAME: u32 = <n>u;`). Larger token tiles dequantise each weight for more tokens, four
// token fragments per subgroup load 6 fragments per 8 multiplies instead of 4 per 4, a larger
// CM_KB crosses fewer barriers per multiply; shared memory (CM_TM + CM_TN) (32 CM_KB + 8) 2 + 8192
// bytes bounds them.
const CM_TM: u32 = 128u;
const CM_TN: u32 = 64u;
// Blocks of 32 k per step (two barriers per step).
const CM_KB: u32 = 2u;
// Token fragments (of 16) per subgroup: 2 or 4.
const CM_FT: u32 = 2u;
const CM_SGN: u32 = CM_TN / (16u * CM_FT);
const CM_SGM: u32 = 8u / CM_SGN;
const CM_K: u32 = 32u * CM_KB;
// Row stride of the shared tiles in halves: 8 more than a step's k, so that rows start 16
// bytes apart modulo 128 and the 16 rows a fragment load reads fall in different banks.
const CM_S: u32 = CM_K + 8u;

var<workgroup> cm_w: array<f16, CM_TM * CM_S>;
var<workgroup> cm_x: array<f16, CM_TN * CM_S>;
// One 16x16 f32 fragment per subgroup on its way to the epilogue (column-major: token-major).
var<workgroup> cm_out: array<f32, 8u * 256u>;

@compute @workgroup_size(256)
fn mm_coop(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(subgroup_id) sg: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let rows = chunk.rows;
    let cols = chunk.cols;
    let n = step.n_tokens;
    let rbase = wid.x * CM_TM;
    let tbase = wid.y * CM_TN;
    let nkb = cols / 32u;
    // Subgroup sg (of 8: the host only picks this kernel where subgroups have 32 invocations)
    // owns rows wr..wr+31 and tokens wt..wt+16 CM_FT-1 of the tile: every operand of its
    // fragment operations is uniform across it, whichever invocations it holds.
    let wr = (sg % CM_SGM) * 32u;
    let wt = (sg / CM_SGM) * 16u * CM_FT;
    // Loaders: 4 consecutive threads take the 4 eighths (p) of one row's (or token's) block, so
    // a row's 16 or 32 bytes of quants and a token's 128 bytes of activations are read by
    // neighbouring threads; 64 rows (tokens) per pass of the 256 threads.
    let p = lid % 4u;
    let lr = lid / 4u;
    var c00 = coop_mat16x16<f32, C>();
    var c01 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>();
    var c11 = coop_mat16x16<f32, C>();
    // The third and fourth token fragments (CM_FT = 4).
    var c02 = coop_mat16x16<f32, C>();
    var c03 = coop_mat16x16<f32, C>();
    var c12 = coop_mat16x16<f32, C>();
    var c13 = coop_mat16x16<f32, C>();
    for (var kb0 = 0u; kb0 < nkb; kb0 += CM_KB) {
        for (var b = 0u; b < CM_KB; b++) {
            let kb = kb0 + b;
            // Past the row's last block (a block count CM_KB does not divide): zeros.
            let live = kb < nkb;
            let kbc = min(kb, nkb - 1u);
            let col = 32u * b + 8u * p;
            for (var h = 0u; h < CM_TM / 64u; h++) {
                let r = lr + 64u * h;
                let wv = tile8(min(rbase + r, rows - 1u), kbc, p, cols);
                for (var e = 0u; e < 8u; e++) {
                    cm_w[r * CM_S + col + e] = f16(select(0.0, wv[e], live));
                }
            }
            for (var h = 0u; h < (CM_TN + 63u) / 64u; h++) {
                let tl = lr + 64u * h;
                if (tl < CM_TN) {
                    let xi = min(tbase + tl, n - 1u) * (cols / 4u) + kbc * 8u + 2u * p;
                    let x0 = select(vec4<f32>(0.0), x[xi], live);
                    let x1 = select(vec4<f32>(0.0), x[xi + 1u], live);
                    let xv = array<f32, 8>(x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w);
                    for (var e = 0u; e < 8u; e++) {
                        cm_x[tl * CM_S + col + e] = f16(xv[e]);
                    }
                }
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < CM_K; kk += 16u) {
            // A (16 rows x 16 k) row-major from the weight tile; B (16 k x 16 tokens)
            // column-major from the token-major activation tile.
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&cm_w[wr * CM_S + kk], CM_S);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&cm_w[(wr + 16u) * CM_S + kk], CM_S);
            let b0 = coopLoad<coop_mat16x16<f16, B>>(&cm_x[wt * CM_S + kk], CM_S);
            let b1 = coopLoad<coop_mat16x16<f16, B>>(&cm_x[(wt + 16u) * CM_S + kk], CM_S);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
            if (CM_FT == 4u) {
                let b2 = coopLoad<coop_mat16x16<f16, B>>(&cm_x[(wt + 32u) * CM_S + kk], CM_S);
                let b3 = coopLoad<coop_mat16x16<f16, B>>(&cm_x[(wt + 48u) * CM_S + kk], CM_S);
                c02 = coopMultiplyAdd(a0, b2, c02);
                c03 = coopMultiplyAdd(a0, b3, c03);
                c12 = coopMultiplyAdd(a1, b2, c12);
                c13 = coopMultiplyAdd(a1, b3, c13);
            }
        }
        workgroupBarrier();
    }
    cm_put(c00, sg, lane, rbase + wr, tbase + wt);
    cm_put(c01, sg, lane, rbase + wr, tbase + wt + 16u);
    cm_put(c10, sg, lane, rbase + wr + 16u, tbase + wt);
    cm_put(c11, sg, lane, rbase + wr + 16u, tbase + wt + 16u);
    if (CM_FT == 4u) {
        cm_put(c02, sg, lane, rbase + wr, tbase + wt + 32u);
        cm_put(c03, sg, lane, rbase + wr, tbase + wt + 48u);
        cm_put(c12, sg, lane, rbase + wr + 16u, tbase + wt + 32u);
        cm_put(c13, sg, lane, rbase + wr + 16u, tbase + wt + 48u);
    }
}

// Stores fragment c (rows r0.., tokens t0.. of the chunk) through the epilogue: the subgroup
// writes it to its slice of cm_out, then each lane stores 8 of its 256 values (a pairs
// epilogue: 4 pairs; r0 is even, so gate and up rows stay together).
fn cm_put(c: coop_mat16x16<f32, C>, sg: u32, lane: u32, r0: u32, t0: u32) {
    let o = sg * 256u;
    coopStore(c, &cm_out[o], 16u);
    workgroupBarrier();
    let n = step.n_tokens;
    let rows = chunk.rows;
    for (var e = lane; e < 256u; e += 32u) {
        let r = r0 + e % 16u;
        let t = t0 + e / 16u;
        if (t < n && r < rows) {
            if (EPI_PAIRS) {
                if (e % 2u == 0u) {
                    y_put_pair(t, r, cm_out[o + e], cm_out[o + e + 1u]);
                }
            } else {
                y_put(t, r, cm_out[o + e]);
            }
        }
    }
    workgroupBarrier();
}
