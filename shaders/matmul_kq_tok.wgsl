// The integer-dot-product matvec for a few tokens (2 to 16: a batched decode's products):
// matmul_kq.wgsl's structure with KQ_NT tokens per workgroup (from token wid.z * KQ_NT; the grid's
// z dimension counts groups of tokens). Composed after matmul_kq.wgsl, matmul_dec_x.wgsl and
// matmul_dec_norope.wgsl (no folded norm or RoPE: those are one token's), before
// matmul_store.wgsl; uses its kq_quant, kq_fetch and kq_dot, so every KQ_TYPE and (registers
// only) KQ_LIMBS works.
//
// Why: the few-token blocks kernel (matmul_dec.wgsl's dvt_main) owns DV_NR = 2 rows per
// workgroup and reads every token's f32 activations for them: 8 tokens x 4096 x 4 bytes = 128 KB
// from cache per 2 rows of Q4_0 weights (~4.6 KB), and more rows per workgroup spill its
// DV_NR x DV_NT accumulators. Here a workgroup owns KQ_RG steps of KQ_NR rows: each token's
// activations are quantised once per workgroup (llama.cpp's Q8_0 with KQ_LIMBS = 1: a quarter
// of the f32 bytes, and dot4I8Packed on them) and reused for all KQ_NR x KQ_RG rows, and each
// weight block is loaded once per workgroup, i.e. once per group of KQ_NT tokens.
//
// Where the quantised activations live (KQ_XS, chosen by src/gpu/matrix.rs):
// - 0, registers: thread i owns blocks i, i + KQ_WG, ... (KQ_BPT of them; KQ_WG about the row's
//   block count) of all KQ_NT tokens, as kq_main does for one. Per thread that is
//   KQ_NT x KQ_BPT x (8 packed words + scale + sum) ~ 10 KQ_NT KQ_BPT registers (80 at 8 tokens,
//   one block per thread), plus KQ_NR x KQ_NT accumulators and KQ_NR x 5 words of weights (twice
//   with KQ_PF = 1): about 120 at KQ_NR = 2, 8 tokens.
// - 1, workgroup memory: the KQ_NT x KQ_XNB blocks (KQ_XNB = the row's block count) staged
//   once, 40 bytes per block and token (32 of packed 8-bit values, the f16 scale and Q8_1 sum,
//   the two half sums as i16): 40 KB for 8 tokens of 4096 columns. KQ_LIMBS = 1 only. A thread
//   then walks blocks i, i + KQ_WG, ... of each row (any KQ_WG, KQ_BPT = 1), reading a block's
//   activations from workgroup memory per token: registers are only the accumulators and one
//   block's weights per row, and the reduction below is amortised over more blocks per thread.
//
// Reduction (no subgroup operations, so one entry point serves every adapter): a step's
// KQ_NR x KQ_NT sums per thread go to workgroup memory (one padded plane per value, so
// that the first level reads distinct banks), KQT_P threads per value each add KQT_S threads'
// parts, then one storing thread per value (or pair of rows) adds the KQT_P parts: about
// 2 KQ_NR KQ_NT operations and two barriers per thread and step, against ~10 per value for a
// subgroupAdd of each.
//
// KQ_NT, KQ_XS and KQ_XNB (and matmul_kq.wgsl's constants) are rewritten by src/gpu/matrix.rs
// before compilation (lines exactly of the form `const NAME: u32 = <n>u;`).

// Tokens per workgroup.
const KQ_NT: u32 = 2u;
// 0: the quantised activations in registers; 1: staged in workgroup memory.
const KQ_XS: u32 = 0u;
// Blocks per token row the staged activations hold (KQ_XS = 1: the row's block count; else 1).
const KQ_XNB: u32 = 1u;

// Sums per thread and step: row r of token t at t * KQ_NR + r.
const KQT_V: u32 = KQ_NR * KQ_NT;
// Parts per value in the reduction's first level, and threads' sums per part.
const KQT_P: u32 = max(KQ_WG / KQT_V, 1u);
const KQT_S: u32 = (KQ_WG + KQT_P - 1u) / KQT_P;
// Threads that store: one per value, or with a pairs epilogue per pair of rows.
const KQT_STORERS: u32 = select(KQT_V, KQT_V / 2u, KQ_PAIRS);
// Row pairs per step (KQ_NR is even with pairs; 1 keeps the unused branch's division valid).
const KQT_PAIRS_NR: u32 = max(KQ_NR / 2u, 1u);

var<workgroup> kqt_part: array<f32, KQT_V * (KQ_WG + 1u)>;
var<workgroup> kqt_sum: array<f32, KQT_V * KQT_P>;
// Staged activations (KQ_XS = 1): words 0..3 of token t's block b at t * KQ_XNB + b, words 4..7
// KQ_NT * KQ_XNB further; its scales and half sums at t * KQ_XNB + b of kqt_xm.
var<workgroup> kqt_xq: array<vec4<u32>, 2u * KQ_NT * KQ_XNB>;
var<workgroup> kqt_xm: array<vec2<u32>, KQ_NT * KQ_XNB>;

// The workgroup's first token.
var<private> kqt_t0: u32;

// The first activation vec4 of token t of the workgroup. Tokens past the step's count quantise
// the last token's activations (no branch in the unrolled loops); their sums are never stored.
fn kqt_row4(t: u32) -> u32 {
    return min(kqt_t0 + t, step.n_tokens - 1u) * (chunk.cols / 4u);
}

// KQ_XS = 0: this thread's blocks of every token, block s of token t at t * KQ_BPT + s.
fn kqt_x(lid: u32, nb: u32) -> array<XQ, KQ_BPT * KQ_NT> {
    var xs: array<XQ, KQ_BPT * KQ_NT>;
    for (var t = 0u; t < KQ_NT; t++) {
        for (var s = 0u; s < KQ_BPT; s++) {
            xs[t * KQ_BPT + s] = kq_quant(kqt_row4(t), min(lid + s * KQ_WG, nb - 1u), false);
        }
    }
    return xs;
}

// KQ_XS = 1: quantises every block of the workgroup's tokens into workgroup memory.
fn kqt_stage(lid: u32, nb: u32) {
    for (var t = 0u; t < KQ_NT; t++) {
        for (var b = lid; b < nb; b += KQ_WG) {
            let q = kq_quant(kqt_row4(t), b, false);
            let i = t * KQ_XNB + b;
            kqt_xq[i] = vec4<u32>(q.l0[0], q.l0[1], q.l0[2], q.l0[3]);
            kqt_xq[KQ_NT * KQ_XNB + i] = vec4<u32>(q.l0[4], q.l0[5], q.l0[6], q.l0[7]);
            // s and Q8_1's sum are f16 values already; |hs| <= 16 * 127 fits 16 bits.
            let hs = bitcast<vec2<u32>>(q.hs);
            kqt_xm[i] = vec2<u32>(pack2x16float(vec2<f32>(q.s, q.sum)), (hs.x & 0xFFFFu) | (hs.y << 16u));
        }
    }
    workgroupBarrier();
}

// KQ_XS = 1: token t's block b as kq_quant made it.
fn kqt_load(t: u32, b: u32) -> XQ {
    let i = t * KQ_XNB + b;
    let a = kqt_xq[i];
    let c = kqt_xq[KQ_NT * KQ_XNB + i];
    let m = kqt_xm[i];
    var r: XQ;
    r.l0 = array<u32, 8>(a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w);
    let sd = unpack2x16float(m.x);
    r.s = sd.x;
    r.sum = sd.y;
    r.hs = vec2<i32>(extractBits(bitcast<i32>(m.y), 0u, 16u), extractBits(bitcast<i32>(m.y), 16u, 16u));
    r.qsum = r.hs.x + r.hs.y;
    r.sub = b & 7u;
    return r;
}

// Row r's total for token t from the first level's parts.
fn kqt_total(t: u32, r: u32) -> f32 {
    let v = t * KQ_NR + r;
    var total = 0.0;
    for (var p = 0u; p < KQT_P; p++) {
        total += kqt_sum[v * KQT_P + p];
    }
    return total;
}

// Sums step rs's partial sums (acc) over the workgroup and stores its rows of every token.
fn kqt_reduce_store(group: u32, rs: u32, lid: u32, acc: array<f32, KQT_V>) {
    for (var v = 0u; v < KQT_V; v++) {
        kqt_part[v * (KQ_WG + 1u) + lid] = acc[v];
    }
    workgroupBarrier();
    for (var i = lid; i < KQT_V * KQT_P; i += KQ_WG) {
        let v = i % KQT_V;
        let p = i / KQT_V;
        var s = 0.0;
        for (var k = p * KQT_S; k < min(p * KQT_S + KQT_S, KQ_WG); k++) {
            s += kqt_part[v * (KQ_WG + 1u) + k];
        }
        kqt_sum[v * KQT_P + p] = s;
    }
    workgroupBarrier();
    for (var i = lid; i < KQT_STORERS; i += KQ_WG) {
        if (KQ_PAIRS) {
            let t = i / KQT_PAIRS_NR;
            let r = 2u * (i % KQT_PAIRS_NR);
            let row = kq_row(group, rs, r);
            if (row < chunk.rows && kqt_t0 + t < step.n_tokens) {
                y_put_pair(kqt_t0 + t, row, kqt_total(t, r), kqt_total(t, r + 1u));
            }
        } else {
            let t = i / KQ_NR;
            let r = i % KQ_NR;
            let row = kq_row(group, rs, r);
            if (row < chunk.rows && kqt_t0 + t < step.n_tokens) {
                y_put(kqt_t0 + t, row, kqt_total(t, r));
            }
        }
    }
}

// This thread's sums of step rs (weights w, KQ_XS = 0) over its blocks of every token.
fn kqt_sums(w: array<WB, KQ_NR * KQ_BPT>, xs: array<XQ, KQ_BPT * KQ_NT>, lid: u32, nb: u32) -> array<f32, KQT_V> {
    var acc: array<f32, KQT_V>;
    for (var s = 0u; s < KQ_BPT; s++) {
        if (lid + s * KQ_WG < nb) {
            for (var t = 0u; t < KQ_NT; t++) {
                for (var r = 0u; r < KQ_NR; r++) {
                    acc[t * KQ_NR + r] += kq_dot(w[r * KQ_BPT + s], xs[t * KQ_BPT + s]);
                }
            }
        }
    }
    return acc;
}

// The same with the staged activations (KQ_XS = 1, KQ_BPT = 1): every block of the row from
// block lid on, KQ_WG apart.
fn kqt_sums_staged(group: u32, rs: u32, lid: u32, nb: u32) -> array<f32, KQT_V> {
    var acc: array<f32, KQT_V>;
    for (var b = lid; b < nb; b += KQ_WG) {
        let w = kq_fetch(group, rs, b, nb);
        for (var t = 0u; t < KQ_NT; t++) {
            let xq = kqt_load(t, b);
            for (var r = 0u; r < KQ_NR; r++) {
                acc[t * KQ_NR + r] += kq_dot(w[r], xq);
            }
        }
    }
    return acc;
}

@compute @workgroup_size(KQ_WG)
fn kqt_main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let group = kq_group(wid, nwg);
    kqt_t0 = wid.z * KQ_NT;
    let nb = chunk.cols / 32u;
    if (KQ_XS == 1u) {
        kqt_stage(lid, nb);
        for (var rs = 0u; rs < KQ_RG; rs++) {
            if (kq_row(group, rs, 0u) >= chunk.rows) {
                break;
            }
            kqt_reduce_store(group, rs, lid, kqt_sums_staged(group, rs, lid, nb));
        }
        return;
    }
    var wn: array<WB, KQ_NR * KQ_BPT>;
    if (KQ_PF == 1u) {
        // The first step's weights are requested before the activations are quantised.
        wn = kq_fetch(group, 0u, lid, nb);
    }
    let xs = kqt_x(lid, nb);
    for (var rs = 0u; rs < KQ_RG; rs++) {
        if (kq_row(group, rs, 0u) >= chunk.rows) {
            break;
        }
        var w: array<WB, KQ_NR * KQ_BPT>;
        if (KQ_PF == 1u) {
            w = wn;
            wn = kq_fetch(group, min(rs + 1u, KQ_RG - 1u), lid, nb);
        } else {
            w = kq_fetch(group, rs, lid, nb);
        }
        kqt_reduce_store(group, rs, lid, kqt_sums(w, xs, lid, nb));
    }
}
