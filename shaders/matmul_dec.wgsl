// y = W x[t]: the decode matvec over one row-chunk of a repacked weight matrix, one token per
// grid z; results stored through matmul_store.wgsl (sections, residual add, gated pairs).
//
// Composed after one of the matmul_dec_<type>.wgsl files, which bind the weights (4, 5) as
// vec4 words and decode a *slot* (16 bytes of weights, SLOT elements: one thread's step):
// slot_fetch (its weights), slot_x (its activations, loaded once for all rows) and slot_dot,
// plus slot_dot_x and slot_dot_rows (matmul_dec_rows.wgsl's, or the type file's own).
//
// A workgroup of DV_WG threads owns DV_NR rows. Thread i takes slots i, i + DV_WG, ... of
// every row (adjacent threads on adjacent slots, so weight loads coalesce; the quantised types'
// slot order makes the activation loads coalesce too, see matmul_q4_0.wgsl), DV_UB slots per
// row per iteration, all loads issued before any arithmetic (and with DV_PF = 1 the next
// step's before this step's arithmetic). The activations of a slot are 2 to 8 times the
// weights' bytes; they are loaded once for the DV_NR rows (or per row and word with DV_XW = 1,
// fewer live registers, or per word for all rows with DV_XW = 2). Uncoalesced activation loads limited the first version of this kernel
// on an H200 (Q4_0 at 35% of the copy bandwidth). Partial sums meet in a shared-memory tree
// (dv_main) or through subgroupAdd and one shared slot per subgroup (dv_main_sg in
// matmul_dec_sg.wgsl, for any subgroup size).
//
// With a pairs epilogue (EPI 2, 3, or the RoPE epilogue of matmul_dec_rope.wgsl) DV_NR is
// even, so a gate row and its up row (or a rotation pair) meet in one workgroup.
//
// The type files read activations through xa, never x itself, so that an RMSNorm can be folded
// in (matmul_dec_norm.wgsl; matmul_dec_x.wgsl otherwise, one of the two follows this file);
// likewise matmul_dec_rope.wgsl or matmul_dec_norope.wgsl.
//
// The few-token entry points (dvt_main, dvt_main_sg: 2 to 16 tokens, a batched decode's
// products) walk the same slots and, per slot, apply each row's weights to DV_NT tokens: the
// type's slot_dot_tokens (matmul_dec_rows.wgsl's, or the type file's own that dequantises a
// word once for all tokens). So each weight is read from memory once per group of DV_NT
// tokens, in the decode kernel's coalesced 16-byte loads, and the accumulators (DV_NR x DV_NT)
// are indexed only by constant-trip loops the driver unrolls.
//
// DV_WG, DV_NR, DV_UB, DV_PF, DV_XW and DV_NT are rewritten by src/gpu/matrix.rs before compilation
// (the lines must stay exactly of the form `const NAME: u32 = <n>u;`).

// One row-chunk of the matrix (large matrices are split across buffers by rows).
struct Chunk {
    rows: u32,
    row0: u32,
    ld_y: u32,
    cols: u32,
}

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<uniform> step: Step;
@group(0) @binding(3) var<uniform> chunk: Chunk;

const DV_WG: u32 = 128u;
const DV_NR: u32 = 2u;
const DV_UB: u32 = 1u;
// 1: the next step's weights are loaded before this step's arithmetic.
const DV_PF: u32 = 0u;
// 1: activations loaded per word and row (slot_dot_x) rather than once per slot for all rows;
// 2: per word once for all rows (slot_dot_rows).
const DV_XW: u32 = 0u;

// Tokens per workgroup of the few-token entry points (dvt_main, dvt_main_sg); 1 for decode.
const DV_NT: u32 = 1u;
// Partial sums per thread of the few-token kernel: row r of token t at t * DV_NR + r.
const DV_NRT: u32 = DV_NR * DV_NT;

// Partial sums of each row (of each token), then (with a folded norm, one token) of the sum of
// squares.
var<workgroup> dv_sh: array<f32, DV_WG * (DV_NRT + 1u)>;

// With a folded norm: this thread's sum of squares of the activations it loaded, whether the
// loads being made now count towards it (with DV_XW = 1 a slot's activations are loaded once
// per row; only the first row's count), and the first activation vec4 of the token's row.
var<private> dv_ss: f32;
var<private> dv_ss_on: bool;
var<private> dv_row4: u32;

// Activation vec4 i (of x, or of the normalised x without its scale).
fn xa(i: u32) -> vec4<f32> {
    let v = x[i];
    if (DV_NORM) {
        if (dv_ss_on) {
            dv_ss += dot(v, v);
        }
        return v * dv_norm_w(i - dv_row4);
    }
    return v;
}

fn dv_group(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// The weights of DV_UB slots from slot b0 on, DV_WG apart, of each row (slots past the row's
// end read its last slot again; they are not summed).
fn dv_fetch(base: array<u32, DV_NR>, b0: u32, nb: u32) -> array<WSlot, DV_NR * DV_UB> {
    var w: array<WSlot, DV_NR * DV_UB>;
    for (var j = 0u; j < DV_UB; j++) {
        let b = min(b0 + j * DV_WG, nb - 1u);
        for (var r = 0u; r < DV_NR; r++) {
            w[j * DV_NR + r] = slot_fetch(base[r] + b);
        }
    }
    return w;
}

// acc[r] += the slots' dot products with the activations of token row4.
fn dv_accumulate(acc: ptr<function, array<f32, DV_NR>>, w: array<WSlot, DV_NR * DV_UB>, row4: u32, b0: u32, nb: u32) {
    for (var j = 0u; j < DV_UB; j++) {
        let b = b0 + j * DV_WG;
        if (b < nb) {
            if (DV_XW == 2u) {
                dv_ss_on = true;
                let d = slot_dot_rows(w, j * DV_NR, row4, b);
                for (var r = 0u; r < DV_NR; r++) {
                    (*acc)[r] += d[r];
                }
            } else if (DV_XW == 1u) {
                for (var r = 0u; r < DV_NR; r++) {
                    dv_ss_on = r == 0u;
                    (*acc)[r] += slot_dot_x(w[j * DV_NR + r], row4, b);
                }
            } else {
                dv_ss_on = true;
                let xs = slot_x(row4, b);
                for (var r = 0u; r < DV_NR; r++) {
                    (*acc)[r] += slot_dot(w[j * DV_NR + r], xs);
                }
            }
        }
    }
}

// This thread's partial sums of the workgroup's rows for token t.
fn dv_partial(lid: u32, group: u32, t: u32) -> array<f32, DV_NR> {
    let nb = chunk.cols / SLOT;
    let row4 = t * (chunk.cols / 4u);
    dv_row4 = row4;
    dv_ss = 0.0;
    var base: array<u32, DV_NR>;
    for (var r = 0u; r < DV_NR; r++) {
        // Rows past the end read the last row; their sums are never written.
        base[r] = min(group * DV_NR + r, chunk.rows - 1u) * nb;
    }
    var acc: array<f32, DV_NR>;
    if (DV_PF == 1u) {
        // Software pipelining: the next step's weights are requested before this step's
        // arithmetic, so a thread's loads stay in flight while it computes (a warp otherwise
        // alternates between waiting for DRAM and computing, and the bytes in flight per SM
        // fall short of what the memory needs).
        var wn = dv_fetch(base, lid, nb);
        for (var b0 = lid; b0 < nb; b0 += DV_WG * DV_UB) {
            let wc = wn;
            wn = dv_fetch(base, b0 + DV_WG * DV_UB, nb);
            dv_accumulate(&acc, wc, row4, b0, nb);
        }
    } else {
        for (var b0 = lid; b0 < nb; b0 += DV_WG * DV_UB) {
            dv_accumulate(&acc, dv_fetch(base, b0, nb), row4, b0, nb);
        }
    }
    return acc;
}

// Stores the row of storing thread `lid` (row lid of the workgroup; with a pairs epilogue rows
// 2 lid and 2 lid + 1) from its total (totals).
fn dv_store(group: u32, t: u32, lid: u32, total0: f32, total1: f32) {
    if (DV_ROPE) {
        let row = group * DV_NR + 2u * lid;
        if (row < chunk.rows) {
            dv_rope_store(t, row, total0, total1);
        }
    } else if (EPI_PAIRS) {
        let row = group * DV_NR + 2u * lid;
        if (row < chunk.rows) {
            y_put_pair(t, row, total0, total1);
        }
    } else {
        let row = group * DV_NR + lid;
        if (row < chunk.rows) {
            y_put(t, row, total0);
        }
    }
}

// Whether a storing thread takes two adjacent rows (a gate/up pair, or a RoPE pair with
// matmul_dec_rope.wgsl; DV_NR is even then).
const DV_PAIRS: bool = EPI_PAIRS || DV_ROPE;
// Threads that store: one per row, or per pair of rows.
const DV_STORERS: u32 = select(DV_NR, DV_NR / 2u, DV_PAIRS);
// The first row a storing thread's total0 belongs to (total1: the next row).
fn dv_store_row(lid: u32) -> u32 {
    return select(lid, 2u * lid, DV_PAIRS);
}

// Shared-memory tree reduction (any adapter).
@compute @workgroup_size(DV_WG)
fn dv_main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let group = dv_group(wid, nwg);
    let t = wid.z;
    if (t >= step.n_tokens) {
        return;
    }
    let acc = dv_partial(lid, group, t);
    for (var r = 0u; r < DV_NR; r++) {
        dv_sh[r * DV_WG + lid] = acc[r];
    }
    // The sum of squares is one more row of the reduction.
    const NS: u32 = select(DV_NR, DV_NR + 1u, DV_NORM);
    if (DV_NORM) {
        dv_sh[DV_NR * DV_WG + lid] = dv_ss;
    }
    for (var s = DV_WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) {
            for (var r = 0u; r < NS; r++) {
                dv_sh[r * DV_WG + lid] += dv_sh[r * DV_WG + lid + s];
            }
        }
    }
    workgroupBarrier();
    if (lid < DV_STORERS) {
        let r = dv_store_row(lid);
        let scale = dv_norm_scale(dv_sh[DV_NR * DV_WG]);
        dv_store(group, t, lid, scale * dv_sh[r * DV_WG], scale * dv_sh[min(r + 1u, DV_NR - 1u) * DV_WG]);
    }
}

// The few-token kernel (DV_NT tokens per workgroup, from token wid.z * DV_NT).

// The workgroup's first token.
var<private> dvt_t0: u32;

// The first activation vec4 of token t of the workgroup. Tokens past the step's count read the
// last token's activations (no branch in the unrolled loops); their sums are never stored.
fn dvt_row4(t: u32) -> u32 {
    return min(dvt_t0 + t, step.n_tokens - 1u) * (chunk.cols / 4u);
}

// acc[t * DV_NR + r] += the slots' dot products with token t's activations.
fn dvt_accumulate(acc: ptr<function, array<f32, DV_NRT>>, w: array<WSlot, DV_NR * DV_UB>, b0: u32, nb: u32) {
    for (var j = 0u; j < DV_UB; j++) {
        let b = b0 + j * DV_WG;
        if (b < nb) {
            slot_dot_tokens(acc, w, j * DV_NR, b);
        }
    }
}

// This thread's partial sums of the workgroup's rows and tokens.
fn dvt_partial(lid: u32, group: u32) -> array<f32, DV_NRT> {
    let nb = chunk.cols / SLOT;
    var base: array<u32, DV_NR>;
    for (var r = 0u; r < DV_NR; r++) {
        // Rows past the end read the last row; their sums are never written.
        base[r] = min(group * DV_NR + r, chunk.rows - 1u) * nb;
    }
    var acc: array<f32, DV_NRT>;
    if (DV_PF == 1u) {
        // The next step's weights in flight during this step's arithmetic (as dv_partial).
        var wn = dv_fetch(base, lid, nb);
        for (var b0 = lid; b0 < nb; b0 += DV_WG * DV_UB) {
            let wc = wn;
            wn = dv_fetch(base, b0 + DV_WG * DV_UB, nb);
            dvt_accumulate(&acc, wc, b0, nb);
        }
    } else {
        for (var b0 = lid; b0 < nb; b0 += DV_WG * DV_UB) {
            dvt_accumulate(&acc, dv_fetch(base, b0, nb), b0, nb);
        }
    }
    return acc;
}

// Threads that store: one per (row, token), or with a pairs epilogue per (pair of rows, token).
const DVT_STORERS: u32 = select(DV_NRT, DV_NRT / 2u, EPI_PAIRS);

// The partial-sum element of store i (with pairs, the gate row's; the up row's is the next):
// pair p of token t is store t * DV_NR / 2 + p and element t * DV_NR + 2p.
fn dvt_elem(i: u32) -> u32 {
    return select(i, 2u * i, EPI_PAIRS);
}

// Stores element e's total (and with pairs, the next element's).
fn dvt_store(group: u32, e: u32, total0: f32, total1: f32) {
    let row = group * DV_NR + e % DV_NR;
    let t = dvt_t0 + e / DV_NR;
    if (row < chunk.rows && t < step.n_tokens) {
        if (EPI_PAIRS) {
            y_put_pair(t, row, total0, total1);
        } else {
            y_put(t, row, total0);
        }
    }
}

// Few tokens, shared-memory tree reduction (any adapter).
@compute @workgroup_size(DV_WG)
fn dvt_main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let group = dv_group(wid, nwg);
    dvt_t0 = wid.z * DV_NT;
    let acc = dvt_partial(lid, group);
    for (var i = 0u; i < DV_NRT; i++) {
        dv_sh[i * DV_WG + lid] = acc[i];
    }
    for (var s = DV_WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) {
            for (var i = 0u; i < DV_NRT; i++) {
                dv_sh[i * DV_WG + lid] += dv_sh[i * DV_WG + lid + s];
            }
        }
    }
    workgroupBarrier();
    for (var i = lid; i < DVT_STORERS; i += DV_WG) {
        let e = dvt_elem(i);
        dvt_store(group, e, dv_sh[e * DV_WG], dv_sh[min(e + 1u, DV_NRT - 1u) * DV_WG]);
    }
}
