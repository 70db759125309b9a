// Top-k (k <= 64) of the last token's logits row (row step.n_tokens - 1): k (index, value bits)
// pairs, values descending, the lower index first on ties; -inf and NaN are never chosen (fewer
// than k real values: the rest are (0xffffffff, -inf)).
//
// `blocks`: n_blocks workgroups of 256 threads, each over 256 * E consecutive logits (E per
// thread, in registers), write their block's top k. `finish`: one workgroup does the same over
// the n_blocks * k candidates (E per thread again; E is specialised so that they fit).
//
// Selection without sorting: values map to order-preserving u32 keys; 32 steps of bisection
// over the key bits (each a workgroup-wide count of keys >= a candidate threshold) find the
// k-th largest key t; every entry above t is taken, and of those equal to t the lowest indices
// (a second bisection over the index bits, only when there are too many); the at most k taken
// entries are then ranked by comparing each with all the others.

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
const K_MAX: u32 = 64u;
const NONE: u32 = 0xffffffffu;
const MIN_FINITE: f32 = -3.40282347e38;

// Counters for workgroup sums: 16 addresses (less contention than one), in three sets used in
// turn, so that a set is cleared one sum ahead while nobody reads it, and every sum costs
// one barrier.
const N_COUNTERS: u32 = 16u;
var<workgroup> counter: array<array<atomic<u32>, N_COUNTERS>, 3>;
var<workgroup> total: u32;
var<private> n_sums: u32;
var<workgroup> n_sel: atomic<u32>;
var<workgroup> sel_key: array<u32, K_MAX>;
var<workgroup> sel_idx: array<u32, K_MAX>;
var<workgroup> sel_bits: array<u32, K_MAX>;

// An order-preserving key for a value: larger values, larger keys; 0 for -inf and NaN (never
// chosen); -0 as +0.
fn key_of(v: f32) -> u32 {
    if (!(v >= MIN_FINITE)) {
        return 0u;
    }
    let b = select(bitcast<u32>(v), 0u, v == 0.0);
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

// The sum of every thread's c, in every thread.
fn workgroup_sum(tid: u32, c: u32) -> u32 {
    let cs = n_sums % 3u;
    n_sums += 1u;
    if (c != 0u) {
        atomicAdd(&counter[cs][tid % N_COUNTERS], c);
    }
    if (tid < N_COUNTERS) {
        atomicStore(&counter[(cs + 1u) % 3u][tid], 0u);
    }
    workgroupBarrier();
    var sum = 0u;
    for (var i = 0u; i < N_COUNTERS; i++) {
        sum += atomicLoad(&counter[cs][i]);
    }
    return sum;
}

// workgroup_sum as a uniform value, for conditions around barriers.
fn workgroup_sum_uniform(tid: u32, c: u32) -> u32 {
    let sum = workgroup_sum(tid, c);
    if (tid == 0u) {
        total = sum;
    }
    return workgroupUniformLoad(&total);
}

// Selects the workgroup's top k entries (key 0 = none) into sel_*, n_sel of them (<= k).
fn select_top(tid: u32, keys: ptr<function, array<u32, E>>, ids: ptr<function, array<u32, E>>, bits: ptr<function, array<u32, E>>) {
    let k = params.k;
    n_sums = 0u;
    if (tid < N_COUNTERS) {
        atomicStore(&counter[0][tid], 0u);
    }
    if (tid == 0u) {
        atomicStore(&n_sel, 0u);
    }
    workgroupBarrier();
    // t: the largest threshold with at least k keys >= t (0 when fewer than k real keys).
    var t = 0u;
    for (var bit = 31i; bit >= 0i; bit--) {
        let c = t | (1u << u32(bit));
        var n = 0u;
        for (var e = 0u; e < E; e++) {
            n += select(0u, 1u, (*keys)[e] >= c);
        }
        if (workgroup_sum(tid, n) >= k) {
            t = c;
        }
    }
    // Entries equal to t: the `need` lowest indices of them, i.e. indices <= u.
    var u = NONE;
    if (t != 0u) {
        var n_gt = 0u;
        var n_eq = 0u;
        for (var e = 0u; e < E; e++) {
            n_gt += select(0u, 1u, (*keys)[e] > t);
            n_eq += select(0u, 1u, (*keys)[e] == t);
        }
        let need = k - workgroup_sum_uniform(tid, n_gt);
        if (workgroup_sum_uniform(tid, n_eq) > need) {
            // u: the largest index bound with fewer than `need` ties below it.
            u = 0u;
            for (var bit = 31i; bit >= 0i; bit--) {
                let c = u | (1u << u32(bit));
                var n = 0u;
                for (var e = 0u; e < E; e++) {
                    n += select(0u, 1u, (*keys)[e] == t && (*ids)[e] < c);
                }
                if (workgroup_sum_uniform(tid, n) < need) {
                    u = c;
                }
            }
        }
    }
    let lo = max(t, 1u);
    for (var e = 0u; e < E; e++) {
        let key = (*keys)[e];
        if (key > t || (key == lo && (*ids)[e] <= u)) {
            let s = atomicAdd(&n_sel, 1u);
            if (s < K_MAX) {
                sel_key[s] = key;
                sel_idx[s] = (*ids)[e];
                sel_bits[s] = (*bits)[e];
            }
        }
    }
    workgroupBarrier();
}

// Thread j < n_sel: the rank of selected entry j (how many selected entries beat it).
fn rank_of(j: u32, n: u32) -> u32 {
    var r = 0u;
    let kj = sel_key[j];
    let ij = sel_idx[j];
    for (var i = 0u; i < n; i++) {
        let ki = sel_key[i];
        r += select(0u, 1u, ki > kj || (ki == kj && sel_idx[i] < ij));
    }
    return r;
}

@compute @workgroup_size(WG)
fn blocks(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let nv = params.n_vocab;
    let row = (max(step.n_tokens, 1u) - 1u) * nv;
    let start = wg.x * WG * E;
    var keys: array<u32, E>;
    var ids: array<u32, E>;
    var bits: array<u32, E>;
    for (var e = 0u; e < E; e++) {
        let i = start + e * WG + tid;
        ids[e] = i;
        keys[e] = 0u;
        if (i < nv) {
            let v = logits[row + i];
            keys[e] = key_of(v);
            bits[e] = bitcast<u32>(v);
        }
    }
    select_top(tid, &keys, &ids, &bits);
    let n = min(atomicLoad(&n_sel), params.k);
    let base = wg.x * params.k;
    if (tid < n) {
        cand[base + rank_of(tid, n)] = vec2<u32>(sel_idx[tid], sel_bits[tid]);
    } else if (tid < params.k) {
        cand[base + tid] = vec2<u32>(NONE, 0xff800000u);
    }
}

@compute @workgroup_size(WG)
fn finish(@builtin(local_invocation_index) tid: u32) {
    let count = params.n_blocks * params.k;
    var keys: array<u32, E>;
    var ids: array<u32, E>;
    var bits: array<u32, E>;
    for (var e = 0u; e < E; e++) {
        let j = e * WG + tid;
        keys[e] = 0u;
        ids[e] = NONE;
        if (j < count) {
            let c = cand[j];
            ids[e] = c.x;
            bits[e] = c.y;
            keys[e] = select(key_of(bitcast<f32>(c.y)), 0u, c.x == NONE);
        }
    }
    select_top(tid, &keys, &ids, &bits);
    let n = min(atomicLoad(&n_sel), params.k);
    if (tid < n) {
        out[rank_of(tid, n)] = vec2<u32>(sel_idx[tid], sel_bits[tid]);
    } else if (tid < params.k) {
        out[tid] = vec2<u32>(NONE, 0xff800000u);
    }
}
