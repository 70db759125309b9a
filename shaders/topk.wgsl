// Top-k (k <= 64) of the last token's logits row (row step.n_tokens - 1): k (index, value bits)
// pairs, values descending, the lower index first on ties; -inf and NaN are never chosen (fewer
// than k real values: the rest are (0xffffffff, -inf)).
//
// `blocks`: n_blocks workgroups of 256 threads, each over 256 * E consecutive logits (E per
// thread, in registers), select their block's top k in k rounds: every thread offers its best
// remaining value, a two-level shared-memory reduction (16 x 16) finds the round's winner, its
// owner drops it. Writes k candidates per block.
// `finish`: one workgroup does the same over the n_blocks * k candidates (E per thread again;
// E is specialised so that they fit).

struct Step {
    n_tokens: u32,
    pos0: u32,
    n_kv: u32,
    pad: u32,
}

struct Params {
    n_vocab: u32,
    n_blocks: u32,
    k: u32,
    pad: u32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>;
// [block][k] candidates: (index, value bits)
@group(0) @binding(1) var<storage, read_write> cand: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read_write> out: array<vec2<u32>>;
@group(0) @binding(3) var<uniform> params: Params;
@group(0) @binding(4) var<uniform> step: Step;

const WG: u32 = 256u;
// entries per thread
const E: u32 = 16u;
const NONE: u32 = 0xffffffffu;
const MIN_FINITE: f32 = -3.40282347e38;

var<workgroup> sv: array<f32, WG>;
var<workgroup> si: array<u32, WG>;
var<workgroup> win: vec2<u32>;

fn better(av: f32, ai: u32, bv: f32, bi: u32) -> bool {
    return ai != NONE && (bi == NONE || av > bv || (av == bv && ai < bi));
}

// The best of every thread's (v, i), as (index, value bits), in every thread.
fn workgroup_best(tid: u32, v: f32, i: u32) -> vec2<u32> {
    sv[tid] = v;
    si[tid] = i;
    workgroupBarrier();
    if (tid < 16u) {
        var bv = sv[tid * 16u];
        var bi = si[tid * 16u];
        for (var j = 1u; j < 16u; j++) {
            let cv = sv[tid * 16u + j];
            let ci = si[tid * 16u + j];
            if (better(cv, ci, bv, bi)) {
                bv = cv;
                bi = ci;
            }
        }
        sv[tid * 16u] = bv;
        si[tid * 16u] = bi;
    }
    workgroupBarrier();
    if (tid == 0u) {
        var bv = sv[0];
        var bi = si[0];
        for (var j = 1u; j < 16u; j++) {
            let cv = sv[j * 16u];
            let ci = si[j * 16u];
            if (better(cv, ci, bv, bi)) {
                bv = cv;
                bi = ci;
            }
        }
        win = vec2<u32>(bi, select(bitcast<u32>(bv), 0xff800000u, bi == NONE));
    }
    workgroupBarrier();
    return win;
}

// The slot of the best entry of a thread's list (E when it has none left).
fn local_best(vals: ptr<function, array<f32, E>>, ids: ptr<function, array<u32, E>>) -> u32 {
    var b = E;
    var bv = 0.0;
    var bi = NONE;
    for (var e = 0u; e < E; e++) {
        if (better((*vals)[e], (*ids)[e], bv, bi)) {
            bv = (*vals)[e];
            bi = (*ids)[e];
            b = e;
        }
    }
    return b;
}

// Value and index of entry b (none when b == E).
fn entry_v(vals: ptr<function, array<f32, E>>, b: u32) -> f32 {
    return select((*vals)[min(b, E - 1u)], 0.0, b == E);
}

fn entry_i(ids: ptr<function, array<u32, E>>, b: u32) -> u32 {
    return select((*ids)[min(b, E - 1u)], NONE, b == E);
}

@compute @workgroup_size(WG)
fn blocks(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let n = params.n_vocab;
    let row = (max(step.n_tokens, 1u) - 1u) * n;
    let start = wg.x * WG * E;
    var vals: array<f32, E>;
    var ids: array<u32, E>;
    for (var e = 0u; e < E; e++) {
        let i = start + e * WG + tid;
        ids[e] = NONE;
        if (i < n) {
            let v = logits[row + i];
            vals[e] = v;
            ids[e] = select(NONE, i, v >= MIN_FINITE);
        }
    }
    var b = local_best(&vals, &ids);
    for (var r = 0u; r < params.k; r++) {
        let w = workgroup_best(tid, entry_v(&vals, b), entry_i(&ids, b));
        if (tid == 0u) {
            cand[wg.x * params.k + r] = w;
        }
        if (w.x != NONE && w.x == entry_i(&ids, b)) {
            ids[b] = NONE;
            b = local_best(&vals, &ids);
        }
    }
}

@compute @workgroup_size(WG)
fn finish(@builtin(local_invocation_index) tid: u32) {
    let total = params.n_blocks * params.k;
    var vals: array<f32, E>;
    var ids: array<u32, E>;
    for (var e = 0u; e < E; e++) {
        let j = e * WG + tid;
        ids[e] = NONE;
        if (j < total) {
            let c = cand[j];
            vals[e] = bitcast<f32>(c.y);
            ids[e] = c.x;
        }
    }
    var b = local_best(&vals, &ids);
    for (var r = 0u; r < params.k; r++) {
        let w = workgroup_best(tid, entry_v(&vals, b), entry_i(&ids, b));
        if (tid == 0u) {
            out[r] = w;
        }
        if (w.x != NONE && w.x == entry_i(&ids, b)) {
            ids[b] = NONE;
            b = local_best(&vals, &ids);
        }
    }
}
