// Neuron-aware matvecs over an FFN's hot rows (src/gpu/sparse.rs), one token (decode).
//
// The hot rows of gate (matrix A) and up (matrix B) are compact: hot row r of a matrix is
// `units` consecutive 16-byte units of quants at wq[r * units ..], its scales beside them in wd.
// One workgroup of MV_WG threads computes the dot products of one row with x; thread i takes
// units i, i + MV_WG, ... (adjacent threads on adjacent units, so a row is read as one
// contiguous run), and the partial sums meet in a shared-memory tree (this file) or through
// subgroupAdd (sparse_matvec_sg.wgsl, appended when the adapter has subgroups).
//
// Entry points:
//   dense:        out[r] = A[r] . x for every hot row r (the gate of all hot rows, whose signs
//                 the relu criterion of sparse_select.wgsl reads).
//   sparse_relu:  out[r] = relu(gate[r]) * (B[r] . x) for r in the active list.
//   sparse_gated: out[r] = act(A[r] . x) * (B[r] . x) for r in the active list (act: ACT).
//   sparse_gate:  out[r] = A[r] . x for r in the active list (a predictor's candidates: their
//                 gate is read, and only those that fire go on to sparse_act_up).
//   sparse_act_up: out[r] = act(gate[r]) * (B[r] . x) for r in the active list (act: ACT).
// Rows not in the list are neither read nor written.
//
// Unit layouts (TYPE_A, TYPE_B; 16 bytes of quants each):
//   F32:  4 floats.                      F16: 8 halves.
//   Q8_0: half a block: 16 signed bytes; the block's f16 scale is half (g >> 1) of wd.
//   Q4_0: one block: 16 bytes, byte j's low nibble element j, high nibble j + 16 (GGUF order);
//         x = d (q - 8), d = half g of wd.
//   Q4_1: as Q4_0 with x = d q + m, wd[g] = d | m << 16 (f16 each).
//   Q5_0, Q5_1, Q4_K, Q5_K, Q6_K (codes 5..9, gate and up only): one 32-element group in
//         src/gpu/kquant.rs's layout (see grouped_fetch).
// (g is the unit's index in wq.) For F32 and F16 wd is a placeholder, never read.
//
// TYPE_A, TYPE_B, MV_WG and ACT are rewritten by src/gpu/sparse.rs before compilation (the
// lines must stay of the form `const NAME: u32 = <n>u;`).

struct Params {
    // Hot rows (the dense entry's row count).
    n_rows: u32,
    // 16-byte units per row of A and of B.
    units_a: u32,
    units_b: u32,
    pad: u32,
}

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
// [count, chunk_rows, n_chunks, 0, index 0, index 1, ...] written by sparse_select.wgsl.
@group(0) @binding(1) var<storage, read> list: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> gate: array<f32>;
@group(0) @binding(4) var<uniform> params: Params;
@group(0) @binding(5) var<storage, read> wq_a: array<vec4<u32>>;
@group(0) @binding(6) var<storage, read> wd_a: array<u32>;
@group(0) @binding(7) var<storage, read> wq_b: array<vec4<u32>>;
@group(0) @binding(8) var<storage, read> wd_b: array<u32>;

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
    if (b == 0u) {
        return wq_a[i];
    }
    return wq_b[i];
}

fn wdw(b: u32, i: u32) -> u32 {
    if (b == 0u) {
        return wd_a[i];
    }
    return wd_b[i];
}


const TYPE_A: u32 = 3u;
const TYPE_B: u32 = 3u;
const MV_WG: u32 = 128u;
// Activation of sparse_gated: 0 ReLU, 1 SiLU.
const ACT: u32 = 0u;

// One unit as loaded: quants and (scale, offset); for the grouped types also the scale of the
// high-nibble elements and the high bits (grouped_fetch).
struct Unit {
    q: vec4<u32>,
    s: vec2<f32>,
    s_hi: f32,
    h: vec2<u32>,
}

fn half_of(word: u32, i: u32) -> f32 {
    let v = unpack2x16float(word);
    return select(v.x, v.y, (i & 1u) == 1u);
}

fn fetch_a(g: u32) -> Unit {
    if (TYPE_A >= T_Q5_0) {
        let w = grouped_fetch(0u, TYPE_A, g, params.n_rows * params.units_a);
        return Unit(w.q, w.s.xy, w.s.z, w.h);
    }
    var s = vec2<f32>(1.0, 0.0);
    if (TYPE_A == T_Q8_0) {
        s.x = half_of(wd_a[g >> 2u], g >> 1u);
    } else if (TYPE_A == T_Q4_0) {
        s.x = half_of(wd_a[g >> 1u], g);
    } else if (TYPE_A == T_Q4_1) {
        s = unpack2x16float(wd_a[g]);
    }
    return Unit(wq_a[g], s, s.x, vec2<u32>(0u));
}

fn fetch_b(g: u32) -> Unit {
    if (TYPE_B >= T_Q5_0) {
        let w = grouped_fetch(1u, TYPE_B, g, params.n_rows * params.units_b);
        return Unit(w.q, w.s.xy, w.s.z, w.h);
    }
    var s = vec2<f32>(1.0, 0.0);
    if (TYPE_B == T_Q8_0) {
        s.x = half_of(wd_b[g >> 2u], g >> 1u);
    } else if (TYPE_B == T_Q4_0) {
        s.x = half_of(wd_b[g >> 1u], g);
    } else if (TYPE_B == T_Q4_1) {
        s = unpack2x16float(wd_b[g]);
    }
    return Unit(wq_b[g], s, s.x, vec2<u32>(0u));
}

// Quants become floats without int-to-float conversions (a quarter of the FMA rate on some
// GPUs): a field at bit p of a word, or'ed into the bits of 2^(23-p), reads as exactly
// 2^(23-p) + q, so subtracting 2^(23-p) (plus the type's offset) leaves the quant: the signed
// bytes by dequant_q8.wgsl's i8x4_to_f32, the nibbles by dequant_q4.wgsl's q4_lo and q4_hi.

// Unit u of a row (of type `ty`) times the matching elements of x.
fn unit_dot(ty: u32, w: Unit, u: u32) -> f32 {
    let q = w.q;
    if (ty == T_F32) {
        return dot(bitcast<vec4<f32>>(q), x[u]);
    }
    if (ty == T_F16) {
        let o = 2u * u;
        return dot(vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y)), x[o]) + dot(vec4<f32>(unpack2x16float(q.z), unpack2x16float(q.w)), x[o + 1u]);
    }
    if (ty == T_Q8_0) {
        let o = 4u * u;
        let s = (dot(i8x4_to_f32(q.x), x[o]) + dot(i8x4_to_f32(q.y), x[o + 1u])) + (dot(i8x4_to_f32(q.z), x[o + 2u]) + dot(i8x4_to_f32(q.w), x[o + 3u]));
        return w.s.x * s;
    }
    if (ty >= T_Q5_0) {
        // Grouped types: as Q4_1, plus the high bits, the offset, and a scale per half.
        let o = 8u * u;
        let bias = grouped_bias(ty);
        var lo = vec4<f32>(0.0);
        var hi = vec4<f32>(0.0);
        for (var k = 0u; k < 4u; k++) {
            lo = fma(q4_lo(q[k], bias) + grouped_high(ty, w.h, k, false), x[o + k], lo);
            hi = fma(q4_hi(q[k], bias) + grouped_high(ty, w.h, k, true), x[o + 4u + k], hi);
        }
        var s = w.s.x * ((lo.x + lo.y) + (lo.z + lo.w)) + w.s_hi * ((hi.x + hi.y) + (hi.z + hi.w));
        if (grouped_min(ty)) {
            var xs = vec4<f32>(0.0);
            for (var k = 0u; k < 8u; k++) {
                xs += x[o + k];
            }
            s += w.s.y * ((xs.x + xs.y) + (xs.z + xs.w));
        }
        return s;
    }
    // Q4_0 and Q4_1: word k holds elements 4k.. (low nibbles) and 16 + 4k.. (high nibbles).
    let o = 8u * u;
    let bias = select(0.0, 8.0, ty == T_Q4_0);
    var acc = q4_lo(q.x, bias) * x[o];
    acc = fma(q4_lo(q.y, bias), x[o + 1u], acc);
    acc = fma(q4_lo(q.z, bias), x[o + 2u], acc);
    acc = fma(q4_lo(q.w, bias), x[o + 3u], acc);
    acc = fma(q4_hi(q.x, bias), x[o + 4u], acc);
    acc = fma(q4_hi(q.y, bias), x[o + 5u], acc);
    acc = fma(q4_hi(q.z, bias), x[o + 6u], acc);
    acc = fma(q4_hi(q.w, bias), x[o + 7u], acc);
    var s = w.s.x * ((acc.x + acc.y) + (acc.z + acc.w));
    if (ty == T_Q4_1) {
        var xs = vec4<f32>(0.0);
        for (var k = 0u; k < 8u; k++) {
            xs += x[o + k];
        }
        s += w.s.y * ((xs.x + xs.y) + (xs.z + xs.w));
    }
    return s;
}

// This thread's share of A[row] . x (in .x, when read_a) and of B[row] . x (in .y, when
// read_b).
fn row_partial(row: u32, lid: u32, read_a: bool, read_b: bool) -> vec2<f32> {
    var acc = vec2<f32>(0.0);
    let ua = params.units_a;
    let ub = params.units_b;
    if (read_a && read_b && ua == ub) {
        // Both rows' loads issued before the arithmetic.
        for (var u = lid; u < ua; u += MV_WG) {
            let wa = fetch_a(row * ua + u);
            let wb = fetch_b(row * ub + u);
            acc += vec2<f32>(unit_dot(TYPE_A, wa, u), unit_dot(TYPE_B, wb, u));
        }
        return acc;
    }
    if (read_a) {
        for (var u = lid; u < ua; u += MV_WG) {
            acc.x += unit_dot(TYPE_A, fetch_a(row * ua + u), u);
        }
    }
    if (read_b) {
        for (var u = lid; u < ub; u += MV_WG) {
            acc.y += unit_dot(TYPE_B, fetch_b(row * ub + u), u);
        }
    }
    return acc;
}

// exp_poly (e^x as ember's CPU SiLU computes it) comes from act.wgsl, composed after this file,
// so that the sparse and the dense GPU paths agree.
fn act(g: f32) -> f32 {
    if (ACT == 1u) {
        return g / (1.0 + exp_poly(-g));
    }
    return max(g, 0.0);
}

// A neuron's hidden value from its gate and up values: act(g) * u, or for dReLU (ACT 2)
// relu(g) * relu(u).
fn act_mul(g: f32, u: f32) -> f32 {
    if (ACT == 2u) {
        return select(0.0, g * u, g > 0.0 && u > 0.0);
    }
    return act(g) * u;
}

// A job: the workgroup's row and whether it has one (grids are 2D past 65535 workgroups).
struct Job {
    row: u32,
    valid: bool,
}

fn flat(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

fn dense_job(wid: vec3<u32>, nwg: vec3<u32>) -> Job {
    let i = flat(wid, nwg);
    return Job(i, i < params.n_rows);
}

fn list_job(wid: vec3<u32>, nwg: vec3<u32>) -> Job {
    let i = flat(wid, nwg);
    let valid = i < list[0];
    return Job(select(0u, list[4u + i], valid), valid);
}

fn dense_partial(job: Job, lid: u32) -> vec2<f32> {
    if (job.valid) {
        return row_partial(job.row, lid, true, false);
    }
    return vec2<f32>(0.0);
}

fn relu_partial(job: Job, lid: u32) -> vec2<f32> {
    if (job.valid) {
        return row_partial(job.row, lid, false, true);
    }
    return vec2<f32>(0.0);
}

fn gated_partial(job: Job, lid: u32) -> vec2<f32> {
    if (job.valid) {
        return row_partial(job.row, lid, true, true);
    }
    return vec2<f32>(0.0);
}

fn dense_store(job: Job, s: vec2<f32>) {
    if (job.valid) {
        out[job.row] = s.x;
    }
}

fn relu_store(job: Job, s: vec2<f32>) {
    if (job.valid) {
        out[job.row] = max(gate[job.row], 0.0) * s.y;
    }
}

fn act_up_store(job: Job, s: vec2<f32>) {
    if (job.valid) {
        out[job.row] = act_mul(gate[job.row], s.y);
    }
}

fn gated_store(job: Job, s: vec2<f32>) {
    if (job.valid) {
        out[job.row] = act_mul(s.x, s.y);
    }
}

var<workgroup> mv_sh: array<vec2<f32>, MV_WG>;

// The workgroup's total of `v` (valid in thread 0), summed in a fixed tree order.
fn wg_sum(v: vec2<f32>, lid: u32) -> vec2<f32> {
    mv_sh[lid] = v;
    for (var s = MV_WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) {
            mv_sh[lid] += mv_sh[lid + s];
        }
    }
    workgroupBarrier();
    return mv_sh[0];
}

@compute @workgroup_size(MV_WG)
fn dense(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let job = dense_job(wid, nwg);
    let s = wg_sum(dense_partial(job, lid), lid);
    if (lid == 0u) {
        dense_store(job, s);
    }
}

@compute @workgroup_size(MV_WG)
fn sparse_relu(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let job = list_job(wid, nwg);
    let s = wg_sum(relu_partial(job, lid), lid);
    if (lid == 0u) {
        relu_store(job, s);
    }
}

@compute @workgroup_size(MV_WG)
fn sparse_gated(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let job = list_job(wid, nwg);
    let s = wg_sum(gated_partial(job, lid), lid);
    if (lid == 0u) {
        gated_store(job, s);
    }
}

@compute @workgroup_size(MV_WG)
fn sparse_gate(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let job = list_job(wid, nwg);
    let s = wg_sum(dense_partial(job, lid), lid);
    if (lid == 0u) {
        dense_store(job, s);
    }
}

@compute @workgroup_size(MV_WG)
fn sparse_act_up(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let job = list_job(wid, nwg);
    let s = wg_sum(relu_partial(job, lid), lid);
    if (lid == 0u) {
        act_up_store(job, s);
    }
}
