// Causal attention for one query token (decode), split over the sequence (flash-decoding).
//
// `partial`: grid (n_chunks, n_head / GQ), 64 threads. The keys 0..n_kv are cut into at most
// n_chunks chunks of a multiple of 64 positions (at least 64); each workgroup takes one chunk
// for GQ query heads that share one KV head (GQA), so that every key and value is read and
// converted once for all of them, and walks the chunk in tiles of 64 keys with an online
// softmax per head: one thread per key scores its key row against the GQ queries (rounded to
// f16, as the CPU backend does), GQ threads update the running maxima, then (word, lane)
// threads accumulate p * v over 8 halves of the head each, for the GQ heads at once. It writes
// each head's chunk max, sum and unnormalised output.
// `combine`: one workgroup of 256 threads per head rescales the chunks' partials to the global
// max and divides by the total sum.
// `single`: grid (1, n_head / GQ): `partial` over all keys as one chunk, writing the normalised
// output itself; for short contexts, where the combine's dispatch costs more than walking a
// few tiles one after another.
//
// The query and the output are row step.row of q and out (0 but in a batched decode's
// per-sequence steps, each sequence's query at its own row of the batch).
//
// KV cache: f16 pairs in u32, read 4 words (8 halves) at a time, so head_dim % 8 == 0.
// HD (head_dim) and GQ (a divisor of n_head / n_head_kv) are specialised at pipeline creation.

struct Params {
    n_head: u32,
    // query heads per KV head
    group: u32,
    // vec4<u32> words per cache position: kv_dim / 8
    kv4: u32,
    n_chunks: u32,
    // scores are the dot products times this (divided by the cap when capped)
    scale: f32,
    // 0, or scores become softcap * tanh(score) (Gemma 2)
    softcap: f32,
    // 0, or a query at position p sees keys p - window + 1 ..= p only (Gemma's local layers)
    window: u32,
    pad2: u32,
}

@group(0) @binding(0) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> cache_k: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> cache_v: array<vec4<u32>>;
// [head][chunk][head_dim]: unnormalised output per chunk
@group(0) @binding(3) var<storage, read_write> part_o: array<vec4<f32>>;
// [head][chunk]: (max, sum) per chunk
@group(0) @binding(4) var<storage, read_write> part_ml: array<vec2<f32>>;
@group(0) @binding(5) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(6) var<uniform> params: Params;
@group(0) @binding(7) var<uniform> step: Step;

const HD: u32 = 64u;
const GQ: u32 = 1u;
const WG: u32 = 64u;
// keys per tile: one score per thread
const T: u32 = WG;
// vec4<u32> words (8 halves) per head row
const G: u32 = HD / 8u;
const H4: u32 = HD / 4u;
// threads sharing one word in the p * v product, each over every LANES-th key of a tile
const LANES: u32 = WG / G;
// keys per lane and tile
const KPL: u32 = (T + LANES - 1u) / LANES;
const NEG: f32 = -3.0e38;

var<workgroup> qs: array<vec4<f32>, GQ * H4>;
// [head][key] scores
var<workgroup> pw: array<vec4<f32>, GQ * T / 4u>;
// [head][key] weights
var<workgroup> pp: array<vec4<f32>, GQ * T / 4u>;
var<workgroup> red: array<vec4<f32>, 2u * WG>;
var<workgroup> red_l: array<f32, GQ * LANES>;

fn lo4(w: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}

fn hi4(w: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w));
}

// x rounded to the nearest f16 (ties to even), by bit arithmetic: some drivers fold a
// pack2x16float/unpack2x16float round trip away. Magnitudes below 2^-14 round to multiples of
// 2^-24 (f16 subnormals); the f16 range is assumed.
fn round_f16(x: vec4<f32>) -> vec4<f32> {
    let b = bitcast<vec4<u32>>(x);
    let normal = bitcast<vec4<f32>>((b + 0xfffu + ((b >> vec4<u32>(13u)) & vec4<u32>(1u))) & vec4<u32>(0xffffe000u));
    let tiny = round(x * 16777216.0) * 5.9604644775390625e-08;
    return select(normal, tiny, abs(x) < vec4<f32>(6.103515625e-05));
}

// A score as softmax takes it: scaled, soft-capped where the model caps.
fn score(s: f32) -> f32 {
    let x = s * params.scale;
    if (params.softcap > 0.0) {
        // tanh is 1 in f32 long before 15; the clamp keeps drivers' exp-based tanh finite.
        return params.softcap * tanh(clamp(x, -15.0, 15.0));
    }
    return x;
}

// Keys per chunk for n_kv keys: a multiple of the tile, at least one tile.
fn chunk_len(n_kv: u32) -> u32 {
    let per = (n_kv + params.n_chunks - 1u) / params.n_chunks;
    return max(T, (per + T - 1u) / T * T);
}

@compute @workgroup_size(WG)
fn partial(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let len = chunk_len(step.n_kv);
    if (wg.x * len >= step.n_kv) {
        return;
    }
    attend(wg.x, wg.y, tid, len, false, step.row, 0u, step.n_kv, 0u);
}

@compute @workgroup_size(WG)
fn single(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    attend(0u, wg.y, tid, step.n_kv, true, step.row, 0u, step.n_kv, 0u);
}

// A batched decode's rows, each a sequence's query (grid z = row): row r's keys are its
// position rows[r].y and those before, in its sequence's cache from u32 word rows[r].x (every
// sequence's cache in one buffer per layer); its partials are row r's of part_o and part_ml.
@group(0) @binding(8) var<storage, read> rows: array<vec4<u32>>;

@compute @workgroup_size(WG)
fn partial_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let info = rows[wg.z];
    let n_kv = info.y + 1u;
    let len = chunk_len(n_kv);
    if (wg.x * len >= n_kv) {
        return;
    }
    attend(wg.x, wg.y, tid, len, false, wg.z, wg.z, n_kv, info.x / 4u);
}

@compute @workgroup_size(WG)
fn single_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let info = rows[wg.z];
    attend(0u, wg.y, tid, info.y + 1u, true, wg.z, wg.z, info.y + 1u, info.x / 4u);
}

// Chunk c (keys c * len .. (c + 1) * len) for the query heads of workgroup row `hg`: partial
// results, or with `whole` (one chunk of every key) the normalised output. The query is row
// `row` of q (its output row `row` of out), its partials row `prow`'s, over n_kv keys of the
// cache from vec4 word `k0`.
fn attend(c: u32, hg: u32, tid: u32, len: u32, whole: bool, row: u32, prow: u32, n_kv: u32, k0: u32) {
    // query heads h0 .. h0 + GQ - 1, all on KV head h0 / group
    let h0 = hg * GQ;
    let c0 = c * len;
    let c1 = min(c0 + len, n_kv);
    // The first key the query (at position n_kv - 1) sees: a sliding window masks the others
    // (their chunks' partials then hold no weight, and the combine rescales them to zero).
    let kmin = select(0u, n_kv - min(params.window, n_kv), params.window > 0u);
    let krow = k0 + (h0 / params.group) * G;
    for (var i = tid; i < GQ * H4; i += WG) {
        qs[i] = round_f16(q[(row * params.n_head + h0) * H4 + i]);
    }
    workgroupBarrier();
    // The running maximum and the last tile's rescaling factor per head, the same in every
    // thread (each computes them from the same scores).
    var m_run: array<f32, GQ>;
    var a_run: array<f32, GQ>;
    for (var r = 0u; r < GQ; r++) {
        m_run[r] = NEG;
    }
    let g = tid % G;
    let lane = tid / G;
    var acc: array<vec4<f32>, 2u * GQ>;
    var l: array<f32, GQ>;
    // Tiles wholly before the window are skipped (a chunk before it then holds no weight);
    // chunks start at multiples of T, so the tiles stay aligned.
    for (var tb = max(c0, kmin / T * T); tb < c1; tb += T) {
        let p = tb + tid;
        let valid = p < c1 && p >= kmin;
        var s: array<f32, GQ>;
        if (valid) {
            let base = p * params.kv4 + krow;
            for (var i = 0u; i < G; i++) {
                let w = cache_k[base + i];
                let k0 = lo4(w);
                let k1 = hi4(w);
                for (var r = 0u; r < GQ; r++) {
                    s[r] += dot(k0, qs[r * H4 + 2u * i]) + dot(k1, qs[r * H4 + 2u * i + 1u]);
                }
            }
        }
        for (var r = 0u; r < GQ; r++) {
            let i = r * T + tid;
            pw[i / 4u][i % 4u] = select(NEG, score(s[r]), valid);
        }
        workgroupBarrier();
        // Every thread finds the tile's maxima itself (broadcast reads of shared memory), rather
        // than one thread per head walking the tile while the others wait at a barrier.
        var p_own: array<f32, GQ>;
        for (var r = 0u; r < GQ; r++) {
            var mx4 = vec4<f32>(NEG);
            for (var j = 0u; j < T / 4u; j++) {
                mx4 = max(mx4, pw[r * T / 4u + j]);
            }
            let m_new = max(m_run[r], max(max(mx4.x, mx4.y), max(mx4.z, mx4.w)));
            a_run[r] = exp(m_run[r] - m_new);
            m_run[r] = m_new;
            let i = r * T + tid;
            p_own[r] = select(0.0, exp(pw[i / 4u][i % 4u] - m_new), valid);
        }
        // The weights go to a second array: other threads may still be reading the scores.
        for (var r = 0u; r < GQ; r++) {
            let i = r * T + tid;
            pp[i / 4u][i % 4u] = p_own[r];
        }
        workgroupBarrier();
        if (lane < LANES) {
            for (var r = 0u; r < GQ; r++) {
                let a = a_run[r];
                acc[2u * r] *= a;
                acc[2u * r + 1u] *= a;
                l[r] *= a;
            }
            // Every load of the tile is issued before any is used: keys past the end read the
            // last key again with a weight of 0 (a branch per key would serialise the loads,
            // one memory latency each: most of this kernel's time before).
            let last = c1 - 1u;
            var vw: array<vec4<u32>, KPL>;
            for (var jj = 0u; jj < KPL; jj++) {
                let key = min(tb + lane + jj * LANES, last);
                vw[jj] = cache_v[key * params.kv4 + krow + g];
            }
            for (var jj = 0u; jj < KPL; jj++) {
                let j = lane + jj * LANES;
                let v0 = lo4(vw[jj]);
                let v1 = hi4(vw[jj]);
                for (var r = 0u; r < GQ; r++) {
                    // (j >= T only where LANES does not divide T.)
                    let i = r * T + min(j, T - 1u);
                    let pj = select(0.0, pp[i / 4u][i % 4u], j < T);
                    acc[2u * r] += pj * v0;
                    acc[2u * r + 1u] += pj * v1;
                    l[r] += pj;
                }
            }
        }
    }
    // Sum the lanes' partial outputs and sums, one head at a time.
    if (lane < LANES && g == 0u) {
        for (var r = 0u; r < GQ; r++) {
            red_l[r * LANES + lane] = l[r];
        }
    }
    for (var r = 0u; r < GQ; r++) {
        red[2u * tid] = acc[2u * r];
        red[2u * tid + 1u] = acc[2u * r + 1u];
        workgroupBarrier();
        let slot = (prow * params.n_head + h0 + r) * params.n_chunks + c;
        var lt = 0.0;
        for (var ln = 0u; ln < LANES; ln++) {
            lt += red_l[r * LANES + ln];
        }
        // vec4 i of the head is word i / 2, half i % 2: red[2 * (lane * G + i / 2) + i % 2].
        for (var i = tid; i < H4; i += WG) {
            var o = vec4<f32>(0.0);
            for (var ln = 0u; ln < LANES; ln++) {
                o += red[2u * ln * G + i];
            }
            if (whole) {
                out[(row * params.n_head + h0 + r) * H4 + i] = o * select(0.0, 1.0 / lt, lt > 0.0);
            } else {
                part_o[slot * H4 + i] = o;
            }
        }
        if (tid == 0u && !whole) {
            part_ml[slot] = vec2<f32>(m_run[r], lt);
        }
        workgroupBarrier();
    }
}

// Combine: 256 threads; (vec4 slot, chunk subset) pairs, so that no thread walks all chunks.
const CWG: u32 = 256u;
const MAX_CHUNKS: u32 = 64u;
const PARTS: u32 = CWG / H4;

var<workgroup> cml: array<vec2<f32>, MAX_CHUNKS>;
var<workgroup> cw: array<f32, MAX_CHUNKS>;
var<workgroup> cred: array<vec4<f32>, CWG>;

@compute @workgroup_size(CWG)
fn combine(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    combine_head(wg.x, tid, step.row, 0u, step.n_kv);
}

// A batched decode's rows (grid y = row, see partial_rows).
@compute @workgroup_size(CWG)
fn combine_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    combine_head(wg.x, tid, wg.y, wg.y, rows[wg.y].y + 1u);
}

// Head h of the query in row `row` of out, from row `prow`'s partials over n_kv keys.
fn combine_head(h: u32, tid: u32, row: u32, prow: u32, n_kv: u32) {
    let len = chunk_len(n_kv);
    let nc = min((n_kv + len - 1u) / len, MAX_CHUNKS);
    let first = (prow * params.n_head + h) * params.n_chunks;
    if (tid < nc) {
        cml[tid] = part_ml[first + tid];
    }
    workgroupBarrier();
    var mx = NEG;
    for (var c = 0u; c < nc; c++) {
        mx = max(mx, cml[c].x);
    }
    if (tid < nc) {
        cw[tid] = exp(cml[tid].x - mx);
    }
    workgroupBarrier();
    var lt = 0.0;
    for (var c = 0u; c < nc; c++) {
        lt += cml[c].y * cw[c];
    }
    let inv = select(0.0, 1.0 / lt, lt > 0.0);
    let slot = tid % H4;
    let part = tid / H4;
    var o = vec4<f32>(0.0);
    if (part < PARTS) {
        for (var c = part; c < nc; c += PARTS) {
            o += part_o[(first + c) * H4 + slot] * cw[c];
        }
    }
    cred[tid] = o;
    workgroupBarrier();
    if (tid < H4) {
        var sum = vec4<f32>(0.0);
        for (var p = 0u; p < PARTS; p++) {
            sum += cred[p * H4 + tid];
        }
        out[(row * params.n_head + h) * H4 + tid] = sum * inv;
    }
}
