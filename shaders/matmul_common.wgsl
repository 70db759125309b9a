// y = W x[t]: the few-token matvec (mv_main) and the prefill tiled matmul (mm_tiled) over one
// row-chunk of a repacked weight matrix; results stored through matmul_store.wgsl (sections,
// residual add, gated pairs: with those, MV_NR is even and a thread's rows pair up).
//
// Composed after one of the matmul_<type>.wgsl files, which declare the weight bindings (4, 5)
// and the decoders of a unit (8 elements: one thread's step): x_chunks (where its activations
// are), unit_fetch (its weights), x_sum and x_prep (activations prepared once for all rows),
// unit_dot (the matvec's fast dot product), unit_deq (exact dequantisation) and tile8 (eight
// dequantised elements for the tiled kernel's shared-memory tile).
//
// The constants MV_WG, MV_NR, MV_NT and MV_UNROLL are rewritten by src/gpu/matrix.rs before
// compilation (the lines must stay exactly of the form `const NAME: u32 = <n>u;`).

// One row-chunk of the matrix (large matrices are split across buffers by rows).
struct Chunk {
    // Rows in this chunk.
    rows: u32,
    // Its first row in the whole matrix.
    row0: u32,
    // Rows of the whole matrix: the stride of y between tokens.
    ld_y: u32,
    // Columns (a multiple of 32).
    cols: u32,
}

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<uniform> step: Step;
@group(0) @binding(3) var<uniform> chunk: Chunk;

// Matvec: threads per workgroup, rows per workgroup, tokens per workgroup (the grid's z
// dimension covers groups of MV_NT tokens).
const MV_WG: u32 = 128u;
const MV_NR: u32 = 4u;
const MV_NT: u32 = 1u;
// Decode: units per thread per loop iteration (1 or 2), loaded before any is used.
const MV_UNROLL: u32 = 1u;
const MV_NRT: u32 = MV_NR * MV_NT;

// Each thread's partial sums, element r * MV_NT + t for row r and token t of the workgroup.
alias Partials = array<f32, MV_NRT>;

// The reduction's partial sums.
var<workgroup> mv_sh: array<f32, MV_WG * MV_NRT>;

// The workgroup's row-group index in a 1D or 2D grid (2D when the count exceeds 65535).
fn flat_group(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// Unit u's activations of token t.
fn load_x(t: u32, u: u32, cols: u32) -> XUnit {
    let c = t * (cols / 4u) + x_chunks(u);
    return XUnit(x[c.x], x[c.y]);
}

// This thread's share of MV_NR rows times MV_NT tokens (t0..t0 + MV_NT, those below n_tokens):
// units lid, lid + MV_WG, ... of each row (8 elements each, adjacent threads on adjacent
// weights, so loads coalesce). The activations of a unit are loaded once and serve all rows.
fn mv_partial(lid: u32, group: u32, t0: u32) -> Partials {
    let rows = chunk.rows;
    let cols = chunk.cols;
    let n = step.n_tokens;
    let units = cols / UNIT;
    var base: array<u32, MV_NR>;
    for (var r = 0u; r < MV_NR; r++) {
        // Rows past the end read the last row; their sums are never written.
        base[r] = min(group * MV_NR + r, rows - 1u) * units;
    }
    var acc: Partials;
    if (MV_NT == 1u && MV_UNROLL == 2u) {
        // Decode, two units per iteration: all loads issued before the arithmetic.
        for (var u = lid; u < units; u += 2u * MV_WG) {
            let has2 = u + MV_WG < units;
            let u2 = min(u + MV_WG, units - 1u);
            let xa = load_x(t0, u, cols);
            let xb = load_x(t0, u2, cols);
            var wa: array<WUnit, MV_NR>;
            var wb: array<WUnit, MV_NR>;
            for (var r = 0u; r < MV_NR; r++) {
                wa[r] = unit_fetch(base[r] + u);
                wb[r] = unit_fetch(base[r] + u2);
            }
            let xsa = x_sum(xa);
            let xpa = x_prep(xa);
            let xsb = select(0.0, x_sum(xb), has2);
            let xpb = x_prep(XUnit(select(vec4<f32>(0.0), xb[0], has2), select(vec4<f32>(0.0), xb[1], has2)));
            for (var r = 0u; r < MV_NR; r++) {
                acc[r] += unit_dot(wa[r], xpa, xsa) + unit_dot(wb[r], xpb, xsb);
            }
        }
        return acc;
    }
    for (var u = lid; u < units; u += MV_WG) {
        if (MV_NT == 1u) {
            // Decode: the weights are decoded by the type's fast dot product.
            let xv = load_x(t0, u, cols);
            let xs = x_sum(xv);
            let xp = x_prep(xv);
            for (var r = 0u; r < MV_NR; r++) {
                acc[r] += unit_dot(unit_fetch(base[r] + u), xp, xs);
            }
        } else {
            // A few tokens: each row's unit is dequantised once.
            var wv: array<XUnit, MV_NR>;
            for (var r = 0u; r < MV_NR; r++) {
                wv[r] = unit_deq(unit_fetch(base[r] + u));
            }
            for (var t = 0u; t < MV_NT; t++) {
                if (t0 + t < n) {
                    let xv = load_x(t0 + t, u, cols);
                    for (var r = 0u; r < MV_NR; r++) {
                        acc[r * MV_NT + t] += dot(wv[r][0], xv[0]) + dot(wv[r][1], xv[1]);
                    }
                }
            }
        }
    }
    return acc;
}

// Threads that store: one per (row, token) element, or with a pairs epilogue per (pair of
// rows, token).
const MV_STORES: u32 = select(MV_NRT, MV_NRT / 2u, EPI_PAIRS);

// The partial-sum elements (row r * MV_NT + token) that store i reads: element i, or with a
// pairs epilogue the gate and up rows 2 (i / MV_NT) and the next, for token i % MV_NT.
fn mv_elems(i: u32) -> vec2<u32> {
    if (EPI_PAIRS) {
        let e = 2u * (i / MV_NT) * MV_NT + i % MV_NT;
        return vec2<u32>(e, e + MV_NT);
    }
    return vec2<u32>(i);
}

// Store i of the workgroup from the totals of its elements (mv_elems).
fn mv_store(group: u32, t0: u32, i: u32, total0: f32, total1: f32) {
    let e = mv_elems(i).x;
    let r = group * MV_NR + e / MV_NT;
    let t = t0 + e % MV_NT;
    if (r < chunk.rows && t < step.n_tokens) {
        if (EPI_PAIRS) {
            y_put_pair(t, r, total0, total1);
        } else {
            y_put(t, r, total0);
        }
    }
}

// Matvec with a shared-memory tree reduction (any adapter).
@compute @workgroup_size(MV_WG)
fn mv_main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let group = flat_group(wid, nwg);
    let t0 = wid.z * MV_NT;
    let acc = mv_partial(lid, group, t0);
    for (var i = 0u; i < MV_NRT; i++) {
        mv_sh[i * MV_WG + lid] = acc[i];
    }
    for (var s = MV_WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) {
            for (var i = 0u; i < MV_NRT; i++) {
                mv_sh[i * MV_WG + lid] += mv_sh[i * MV_WG + lid + s];
            }
        }
    }
    workgroupBarrier();
    for (var i = lid; i < MV_STORES; i += MV_WG) {
        let e = mv_elems(i);
        mv_store(group, t0, i, mv_sh[e.x * MV_WG], mv_sh[e.y * MV_WG]);
    }
}

// Prefill: MM_TM rows x 64 tokens per workgroup of 256 threads, K in steps of one 32-element
// block. Each step dequantises the weight tile once into shared memory (tile8 of the type file)
// and reuses it for 64 tokens. A thread accumulates MM_TM / 16 rows x 4 tokens: with 128 rows,
// two groups of 4 rows 64 apart (so the 16 threads of a row group read 16 consecutive vec4 of
// the tile, not every second one), 3 shared vec4 loads per 32 FMAs where 64 rows need 2 per 16.
// MM_TM is 128 (24 KiB of shared memory) unless the adapter's limit is below that, then 64
// (16 KiB, WebGPU's default limit); rewritten by src/gpu/matrix.rs.
const MM_TM: u32 = 128u;
const MM_TN: u32 = 64u;
// Row groups of 4 per thread.
const MM_RG: u32 = MM_TM / 64u;

// [k][row / 4] and [k][token / 4], 32 k per step.
var<workgroup> tile_w: array<vec4<f32>, 8u * MM_TM>;
var<workgroup> tile_x: array<vec4<f32>, 512>;

@compute @workgroup_size(256)
fn mm_tiled(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let rows = chunk.rows;
    let cols = chunk.cols;
    let n = step.n_tokens;
    let rbase = wid.x * MM_TM;
    let tbase = wid.y * MM_TN;
    // Token loader: token lid % 64, elements 8p..8p+7 of the block.
    let lt = lid % 64u;
    let p = lid / 64u;
    let xtok = min(tbase + lt, n - 1u);
    let xrow = xtok * (cols / 4u) + 2u * p;
    // Compute role: rows 4tx + 64g .. + 3 (g < MM_RG) and tokens 4ty..4ty+3 of the tile.
    let tx = lid % 16u;
    let ty = lid / 16u;
    var acc: array<array<vec4<f32>, 4>, MM_RG>;
    let nkb = cols / 32u;
    for (var kb = 0u; kb < nkb; kb++) {
        // Weight loader: row i % MM_TM, elements 8 (i / MM_TM).. of the block, for the
        // MM_RG indices i = lid + 256 j (consecutive threads on consecutive rows, so the
        // shared stores do not conflict).
        for (var j = 0u; j < MM_RG; j++) {
            let i = lid + 256u * j;
            let lr = i % MM_TM;
            let wp = i / MM_TM;
            let wv = tile8(min(rbase + lr, rows - 1u), kb, wp, cols);
            for (var e = 0u; e < 8u; e++) {
                tile_w[(8u * wp + e) * (MM_TM / 4u) + lr / 4u][lr % 4u] = wv[e];
            }
        }
        let x0 = x[xrow + kb * 8u];
        let x1 = x[xrow + kb * 8u + 1u];
        let xv = array<f32, 8>(x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w);
        for (var e = 0u; e < 8u; e++) {
            tile_x[(8u * p + e) * 16u + lt / 4u][lt % 4u] = xv[e];
        }
        workgroupBarrier();
        for (var k = 0u; k < 32u; k++) {
            let b = tile_x[k * 16u + ty];
            for (var g = 0u; g < MM_RG; g++) {
                let a = tile_w[k * (MM_TM / 4u) + 16u * g + tx];
                acc[g][0] += a * b.x;
                acc[g][1] += a * b.y;
                acc[g][2] += a * b.z;
                acc[g][3] += a * b.w;
            }
        }
        workgroupBarrier();
    }
    for (var j = 0u; j < 4u; j++) {
        let t = tbase + 4u * ty + j;
        if (t < n) {
            for (var g = 0u; g < MM_RG; g++) {
                for (var i = 0u; i < 4u; i++) {
                    let r = rbase + 64u * g + 4u * tx + i;
                    if (EPI_PAIRS) {
                        // Rows 4tx + 0, 1 and 4tx + 2, 3 are (gate, up) pairs.
                        if (i % 2u == 0u && r < rows) {
                            y_put_pair(t, r, acc[g][j][i], acc[g][j][i + 1u]);
                        }
                    } else if (r < rows) {
                        y_put(t, r, acc[g][j][i]);
                    }
                }
            }
        }
    }
}
