// The whole FFN of a batch of tokens over rows in the hot layout (src/gpu/sparse.rs, module
// docs): every row, densely. In a prefill batch the union of the firing neurons is nearly all of
// them, and for a ReLU model a silent neuron contributes exactly zero, so dense gives the sparse
// result (up to summation order) without selecting anything.
//
// `gate_up`: h[t][r] = act(gate[r] · x[t]) * (up[r] · x[t]), for rows r < params.rows and tokens
//   t < step.n_tokens; h is laid out [token][row] with params.rows per token. Tiles of 32 rows x
//   64 tokens per workgroup of 256 threads; K in steps of one 32-element block, the gate, up
//   and activation tiles in shared memory (16 KiB, WebGPU's default limit).
// `down`: y[t][c] += sum over r of h[t][r] * D[r][c] (D: the down_t rows, params.cols values
//   each), for every column c; tiles of 64 columns x 64 tokens, K in steps of 32 rows. Each
//   output is one thread's sum over the rows in row order: deterministic, no atomics.
//
// `rows`: y[t * params.pad0 + params.pad1 + r] = W[r] · x[t] (W at bindings 4-5, TYPE_A), for
//   rows r < params.rows and tokens t < step.n_tokens: a plain product over rows in the hot
//   layout, written at a stride and offset (a streamed chunk of q/k/v or o rows into its place
//   among all of them). Tiles of 32 rows x 64 tokens as `gate_up`, the gate tile alone.
// TYPE_A and TYPE_B are the weight types of bindings 4-5 and 6-7 (gate and up; for `down` both
// hold D), ACT the activation (0 relu, 1 silu); the lines are rewritten by src/gpu/sparse.rs and
// must stay of the form `const NAME: u32 = <n>u;`.

struct Params {
    // Rows of the weights (neurons).
    rows: u32,
    // Columns (n_embd, a multiple of 32).
    cols: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> h: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> params: Params;
@group(0) @binding(4) var<storage, read> wq_a: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> wd_a: array<u32>;
@group(0) @binding(6) var<storage, read> wq_b: array<vec4<u32>>;
@group(0) @binding(7) var<storage, read> wd_b: array<u32>;
@group(0) @binding(8) var<uniform> step: Step;

const T_F32: u32 = 0u;
const T_F16: u32 = 1u;
const T_Q8_0: u32 = 2u;
const T_Q4_0: u32 = 3u;
const T_Q4_1: u32 = 4u;

// The grouped types (src/gpu/kquant.rs's layout: per 32-element group 16 bytes of low nibbles
// in Q4_1's order, then from vec4 G the high bits; the scales as the file has them).
const T_Q5_0: u32 = 5u;
const T_Q5_1: u32 = 6u;
const T_Q4_K: u32 = 7u;
const T_Q5_K: u32 = 8u;
const T_Q6_K: u32 = 9u;

fn wqv(b: u32, i: u32) -> vec4<u32> {
    return quants(b, i);
}

fn wdw(b: u32, i: u32) -> u32 {
    return scale_word(b, i);
}


const TYPE_A: u32 = 3u;
const TYPE_B: u32 = 3u;
const ACT: u32 = 0u;

fn quants(b: u32, i: u32) -> vec4<u32> {
    if (b == 0u) {
        return wq_a[i];
    }
    return wq_b[i];
}

fn scale_word(b: u32, i: u32) -> u32 {
    if (b == 0u) {
        return wd_a[i];
    }
    return wd_b[i];
}

fn half_of(word: u32, i: u32) -> f32 {
    let v = unpack2x16float(word);
    return select(v.x, v.y, (i & 1u) == 1u);
}

// Four signed bytes of a word, in byte order.
fn i8x4(w: u32) -> vec4<f32> {
    return vec4<f32>((vec4<i32>(bitcast<i32>(w)) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u));
}

// Four nibbles (low ones of the word's bytes, or the high ones), in byte order.
fn nib4(w: u32, high: bool) -> vec4<f32> {
    let s = select(0u, 4u, high);
    return vec4<f32>(vec4<u32>((w >> s) & 0xFu, (w >> (8u + s)) & 0xFu, (w >> (16u + s)) & 0xFu, (w >> (24u + s)) & 0xFu));
}

// Elements 32 kb + 8 p .. + 7 of row `row` of the matrix at bindings `b` (type `ty`, `cols`
// values per row), dequantised exactly.
fn deq8(b: u32, ty: u32, row: u32, kb: u32, p: u32, cols: u32) -> array<vec4<f32>, 2> {
    if (ty == T_F32) {
        let q = quants(b, row * (cols / 4u) + kb * 8u + 2u * p);
        let q2 = quants(b, row * (cols / 4u) + kb * 8u + 2u * p + 1u);
        return array<vec4<f32>, 2>(bitcast<vec4<f32>>(q), bitcast<vec4<f32>>(q2));
    }
    if (ty == T_F16) {
        let q = quants(b, row * (cols / 8u) + kb * 4u + p);
        return array<vec4<f32>, 2>(vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y)), vec4<f32>(unpack2x16float(q.z), unpack2x16float(q.w)));
    }
    let blk = row * (cols / 32u) + kb;
    if (ty == T_Q8_0) {
        let q = quants(b, 2u * blk + p / 2u);
        let d = half_of(scale_word(b, blk >> 1u), blk);
        let lo = select(q.x, q.z, (p & 1u) == 1u);
        let hi = select(q.y, q.w, (p & 1u) == 1u);
        return array<vec4<f32>, 2>(d * i8x4(lo), d * i8x4(hi));
    }
    if (ty >= T_Q5_0) {
        // Grouped types: words 2 (p % 2) and the next of the group, low (p < 2) or high
        // nibbles, with their high bits; scale (q - offset) + minimum, rounded once as ggml.
        let w = grouped_fetch(b, ty, blk, params.rows * (params.cols / 32u));
        let high = p >= 2u;
        let k0 = 2u * (p & 1u);
        let bias = grouped_bias(ty);
        let sc = select(w.s.x, w.s.z, high);
        let q0 = nib4(w.q[k0], high) + grouped_high(ty, w.h, k0, high) - bias;
        let q1 = nib4(w.q[k0 + 1u], high) + grouped_high(ty, w.h, k0 + 1u, high) - bias;
        return array<vec4<f32>, 2>(fma(vec4<f32>(sc), q0, vec4<f32>(w.s.y)), fma(vec4<f32>(sc), q1, vec4<f32>(w.s.y)));
    }
    // Q4: element j < 16 is the low nibble of byte j, element 16 + j its high nibble.
    let q = quants(b, blk);
    let high = p >= 2u;
    // Elements 8p..8p+7: bytes 8 (p % 2) .. + 7, low nibbles for p < 2, high ones after.
    let w0 = select(q.x, q.z, (p & 1u) == 1u);
    let w1 = select(q.y, q.w, (p & 1u) == 1u);
    var d: f32;
    var m = 0.0;
    if (ty == T_Q4_0) {
        d = half_of(scale_word(b, blk >> 1u), blk);
        m = -8.0 * d;
    } else {
        let s = unpack2x16float(scale_word(b, blk));
        d = s.x;
        m = s.y;
    }
    return array<vec4<f32>, 2>(fma(vec4<f32>(d), nib4(w0, high), vec4<f32>(m)), fma(vec4<f32>(d), nib4(w1, high), vec4<f32>(m)));
}

fn act(g: f32) -> f32 {
    if (ACT == 0u) {
        return max(g, 0.0);
    }
    return g / (1.0 + exp(-g));
}

// gate_up: [k][row / 4] for 32 k and 32 rows, twice; [k][token / 4] for 32 k and 64 tokens.
var<workgroup> tile_g: array<vec4<f32>, 256>;
var<workgroup> tile_u: array<vec4<f32>, 256>;
var<workgroup> tile_x: array<vec4<f32>, 512>;

@compute @workgroup_size(256)
fn gate_up(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let rows = params.rows;
    let cols = params.cols;
    let n = step.n_tokens;
    let rbase = wid.x * 32u;
    let tbase = wid.y * 64u;
    // Loader roles: threads 0..127 load gate, 128..255 up: row lid % 32, elements 8p..8p+7.
    let which = lid / 128u;
    let lr = lid % 32u;
    let lp = (lid / 32u) % 4u;
    let wrow = min(rbase + lr, rows - 1u);
    // Token lid % 64, elements 8xp..8xp+7.
    let lt = lid % 64u;
    let xp = lid / 64u;
    let xrow = min(tbase + lt, n - 1u) * (cols / 4u) + 2u * xp;
    // Compute role: rows 4tx..4tx+3, tokens 2ty and 2ty + 1.
    let tx = lid % 8u;
    let ty = lid / 8u;
    var ag: array<vec4<f32>, 2>;
    var au: array<vec4<f32>, 2>;
    let nkb = cols / 32u;
    for (var kb = 0u; kb < nkb; kb++) {
        let wv = deq8(which, select(TYPE_A, TYPE_B, which == 1u), wrow, kb, lp, cols);
        let x0 = x[xrow + kb * 8u];
        let x1 = x[xrow + kb * 8u + 1u];
        for (var j = 0u; j < 8u; j++) {
            let k = 8u * lp + j;
            let v = wv[j / 4u][j % 4u];
            if (which == 0u) {
                tile_g[k * 8u + lr / 4u][lr % 4u] = v;
            } else {
                tile_u[k * 8u + lr / 4u][lr % 4u] = v;
            }
            let kx = 8u * xp + j;
            tile_x[kx * 16u + lt / 4u][lt % 4u] = select(x0[j % 4u], x1[j % 4u], j >= 4u);
        }
        workgroupBarrier();
        for (var k = 0u; k < 32u; k++) {
            let a = tile_g[k * 8u + tx];
            let b = tile_u[k * 8u + tx];
            let xv = tile_x[k * 16u + ty / 2u];
            let t0 = select(xv.x, xv.z, (ty & 1u) == 1u);
            let t1 = select(xv.y, xv.w, (ty & 1u) == 1u);
            ag[0] = fma(a, vec4<f32>(t0), ag[0]);
            ag[1] = fma(a, vec4<f32>(t1), ag[1]);
            au[0] = fma(b, vec4<f32>(t0), au[0]);
            au[1] = fma(b, vec4<f32>(t1), au[1]);
        }
        workgroupBarrier();
    }
    for (var j = 0u; j < 2u; j++) {
        let t = tbase + 2u * ty + j;
        if (t < n) {
            for (var i = 0u; i < 4u; i++) {
                let r = rbase + 4u * tx + i;
                if (r < rows) {
                    h[t * rows + r] = act(ag[j][i]) * au[j][i];
                }
            }
        }
    }
}

@compute @workgroup_size(256)
fn rows(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let rows = params.rows;
    let cols = params.cols;
    let n = step.n_tokens;
    let rbase = wid.x * 32u;
    let tbase = wid.y * 64u;
    // Loader roles: threads 0..127 load W (row lid % 32, elements 8p..8p+7); every thread
    // loads x as in gate_up.
    let lr = lid % 32u;
    let lp = (lid / 32u) % 4u;
    let wrow = min(rbase + lr, rows - 1u);
    let lt = lid % 64u;
    let xp = lid / 64u;
    let xrow = min(tbase + lt, n - 1u) * (cols / 4u) + 2u * xp;
    let tx = lid % 8u;
    let ty = lid / 8u;
    var acc: array<vec4<f32>, 2>;
    let nkb = cols / 32u;
    for (var kb = 0u; kb < nkb; kb++) {
        if (lid < 128u) {
            let wv = deq8(0u, TYPE_A, wrow, kb, lp, cols);
            for (var j = 0u; j < 8u; j++) {
                let k = 8u * lp + j;
                tile_g[k * 8u + lr / 4u][lr % 4u] = wv[j / 4u][j % 4u];
            }
        }
        let x0 = x[xrow + kb * 8u];
        let x1 = x[xrow + kb * 8u + 1u];
        for (var j = 0u; j < 8u; j++) {
            let kx = 8u * xp + j;
            tile_x[kx * 16u + lt / 4u][lt % 4u] = select(x0[j % 4u], x1[j % 4u], j >= 4u);
        }
        workgroupBarrier();
        for (var k = 0u; k < 32u; k++) {
            let a = tile_g[k * 8u + tx];
            let xv = tile_x[k * 16u + ty / 2u];
            acc[0] = fma(a, vec4<f32>(select(xv.x, xv.z, (ty & 1u) == 1u)), acc[0]);
            acc[1] = fma(a, vec4<f32>(select(xv.y, xv.w, (ty & 1u) == 1u)), acc[1]);
        }
        workgroupBarrier();
    }
    for (var j = 0u; j < 2u; j++) {
        let t = tbase + 2u * ty + j;
        if (t < n) {
            for (var i = 0u; i < 4u; i++) {
                let r = rbase + 4u * tx + i;
                if (r < rows) {
                    h[t * params.pad0 + params.pad1 + r] = acc[j][i];
                }
            }
        }
    }
}

// down: [k][column / 4] for 32 k and 64 columns; [k][token / 4] for 32 k and 64 tokens.
var<workgroup> tile_d: array<vec4<f32>, 512>;
var<workgroup> tile_h: array<vec4<f32>, 512>;

@compute @workgroup_size(256)
fn down(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let rows = params.rows;
    let cols = params.cols;
    let n = step.n_tokens;
    let cbase = wid.x * 64u;
    let tbase = wid.y * 64u;
    // Loader roles: row k = lid / 8 of the step, columns 8 (lid % 8) .. + 7 of the tile (past
    // the last column: the last block again, never stored); h of token lid % 64, rows
    // 8 (lid / 64) .. + 7 of the step.
    let dk = lid / 8u;
    let dc = min(cbase + 8u * (lid % 8u), cols - 8u);
    let lt = lid % 64u;
    let hp = lid / 64u;
    let htok = min(tbase + lt, n - 1u);
    // Compute role: columns 4tx..4tx+3, tokens 4ty..4ty+3.
    let tx = lid % 16u;
    let ty = lid / 16u;
    var acc: array<vec4<f32>, 4>;
    for (var r0 = 0u; r0 < rows; r0 += 32u) {
        let row = r0 + dk;
        var dv = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
        if (row < rows) {
            dv = deq8(0u, TYPE_A, row, dc / 32u, (dc % 32u) / 8u, cols);
        }
        tile_d[dk * 16u + 2u * (lid % 8u)] = dv[0];
        tile_d[dk * 16u + 2u * (lid % 8u) + 1u] = dv[1];
        for (var j = 0u; j < 8u; j++) {
            let k = 8u * hp + j;
            let r = r0 + k;
            var v = 0.0;
            if (r < rows) {
                v = h[htok * rows + r];
            }
            tile_h[k * 16u + lt / 4u][lt % 4u] = v;
        }
        workgroupBarrier();
        for (var k = 0u; k < 32u; k++) {
            let a = tile_d[k * 16u + tx];
            let b = tile_h[k * 16u + ty];
            acc[0] = fma(a, vec4<f32>(b.x), acc[0]);
            acc[1] = fma(a, vec4<f32>(b.y), acc[1]);
            acc[2] = fma(a, vec4<f32>(b.z), acc[2]);
            acc[3] = fma(a, vec4<f32>(b.w), acc[3]);
        }
        workgroupBarrier();
    }
    for (var j = 0u; j < 4u; j++) {
        let t = tbase + 4u * ty + j;
        let c = cbase + 4u * tx;
        if (t < n && c < cols) {
            for (var i = 0u; i < 4u; i++) {
                y[t * cols + c + i] += acc[j][i];
            }
        }
    }
}
