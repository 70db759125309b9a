// Causal attention for a batch of query tokens (prefill) at positions pos0.., over the cached
// keys 0..=each query's position, GQA (query head h reads KV head h / group).
//
// Grid (ceil(n_tokens / TQ), n_head), 64 threads; each workgroup takes TQ consecutive queries of
// one head and walks the keys in tiles of 64 with an online softmax per query: one thread per
// key reads its key row once and scores it against all TQ queries (held in shared memory,
// rounded to f16 as the CPU backend does), TQ threads update the running maxima, and
// (query, word) threads accumulate p * v over 8 halves of the head each.
//
// KV cache: f16 pairs in u32, read 4 words (8 halves) at a time, so head_dim % 8 == 0.
// HD (head_dim) and TQ are specialised at pipeline creation.

struct Params {
    n_head: u32,
    // query heads per KV head
    group: u32,
    // vec4<u32> words per cache position: kv_dim / 8
    kv4: u32,
    pad0: u32,
    // scores are the dot products times this (divided by the cap when capped)
    scale: f32,
    // 0, or scores become softcap * tanh(score) (Gemma 2)
    softcap: f32,
    // 0, or a query at position p sees keys p - window + 1 ..= p only (Gemma's local layers)
    window: u32,
    pad3: u32,
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

// Whether the query at position `qp` sees key `p` (causal, and inside a sliding window).
fn sees(p: u32, qp: u32) -> bool {
    return p <= qp && (params.window == 0u || p + params.window > qp);
}

@group(0) @binding(0) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> cache_k: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> cache_v: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(4) var<uniform> params: Params;
@group(0) @binding(5) var<uniform> step: Step;

const HD: u32 = 64u;
const TQ: u32 = 8u;
const WG: u32 = 64u;
// keys per tile: one key per thread when scoring
const T: u32 = WG;
// vec4<u32> words (8 halves) per head row
const G: u32 = HD / 8u;
const H4: u32 = HD / 4u;
// (query, word) pairs of the p * v product, and how many each thread takes
const SLOTS: u32 = TQ * G;
const SPT: u32 = (SLOTS + WG - 1u) / WG;
const NEG: f32 = -3.0e38;

var<workgroup> qs: array<vec4<f32>, TQ * H4>;
var<workgroup> sc: array<vec4<f32>, TQ * T / 4u>;
var<workgroup> mrow: array<f32, TQ>;
var<workgroup> arow: array<f32, TQ>;

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

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let t0 = wg.x * TQ;
    let h = wg.y;
    let n_tokens = step.n_tokens;
    if (t0 >= n_tokens) {
        return;
    }
    let nt = min(TQ, n_tokens - t0);
    // query qi is at position qpos0 + qi and sees keys 0..=qpos0 + qi
    let qpos0 = step.pos0 + t0;
    let kend = qpos0 + nt;
    let krow = (h / params.group) * G;
    let q4 = params.n_head * H4;
    for (var i = tid; i < TQ * H4; i += WG) {
        let qi = i / H4;
        var x = vec4<f32>(0.0);
        if (qi < nt) {
            x = round_f16(q[(t0 + qi) * q4 + h * H4 + i % H4]);
        }
        qs[i] = x;
    }
    if (tid < TQ) {
        mrow[tid] = NEG;
    }
    workgroupBarrier();
    var acc: array<vec4<f32>, 2u * SPT>;
    var l: array<f32, SPT>;
    // With a window, the tiles before the first query's first key are skipped (no query of
    // this tile sees them); tiles stay aligned to T.
    let kfirst = select(0u, (qpos0 + 1u - min(params.window, qpos0 + 1u)) / T * T, params.window > 0u);
    for (var tb = kfirst; tb < kend; tb += T) {
        let p = tb + tid;
        var s: array<f32, TQ>;
        if (p < kend) {
            let base = p * params.kv4 + krow;
            for (var i = 0u; i < G; i++) {
                let w = cache_k[base + i];
                let k0 = lo4(w);
                let k1 = hi4(w);
                for (var qi = 0u; qi < TQ; qi++) {
                    s[qi] += dot(k0, qs[qi * H4 + 2u * i]) + dot(k1, qs[qi * H4 + 2u * i + 1u]);
                }
            }
        }
        for (var qi = 0u; qi < TQ; qi++) {
            let valid = qi < nt && sees(p, qpos0 + qi);
            let i = qi * T + tid;
            sc[i / 4u][i % 4u] = select(NEG, score(s[qi]), valid);
        }
        workgroupBarrier();
        if (tid < TQ) {
            var mx4 = vec4<f32>(NEG);
            for (var j = 0u; j < T / 4u; j++) {
                mx4 = max(mx4, sc[tid * T / 4u + j]);
            }
            let mx = max(max(mx4.x, mx4.y), max(mx4.z, mx4.w));
            let m_old = mrow[tid];
            let m_new = max(m_old, mx);
            arow[tid] = exp(m_old - m_new);
            mrow[tid] = m_new;
        }
        workgroupBarrier();
        for (var qi = 0u; qi < TQ; qi++) {
            let valid = qi < nt && sees(p, qpos0 + qi);
            let i = qi * T + tid;
            sc[i / 4u][i % 4u] = select(0.0, exp(sc[i / 4u][i % 4u] - mrow[qi]), valid);
        }
        workgroupBarrier();
        for (var r = 0u; r < SPT; r++) {
            let slot = tid + r * WG;
            if (slot < SLOTS) {
                let qi = slot / G;
                let g = slot % G;
                let a = arow[qi];
                acc[2u * r] *= a;
                acc[2u * r + 1u] *= a;
                l[r] *= a;
                // keys of this tile that query qi sees
                let last = qpos0 + qi + 1u;
                let nk = select(0u, min(T, last - tb), qi < nt && last > tb);
                // A fixed trip count, so that the loads of a tile can all be in flight at once.
                for (var j = 0u; j < T; j++) {
                    if (j < nk) {
                        let pj = sc[qi * T / 4u + j / 4u][j % 4u];
                        let w = cache_v[(tb + j) * params.kv4 + krow + g];
                        acc[2u * r] += pj * lo4(w);
                        acc[2u * r + 1u] += pj * hi4(w);
                        l[r] += pj;
                    }
                }
            }
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < SPT; r++) {
        let slot = tid + r * WG;
        let qi = slot / G;
        if (slot < SLOTS && qi < nt) {
            let g = slot % G;
            let inv = select(0.0, 1.0 / l[r], l[r] > 0.0);
            let o = (t0 + qi) * q4 + h * H4 + 2u * g;
            out[o] = acc[2u * r] * inv;
            out[o + 1u] = acc[2u * r + 1u] * inv;
        }
    }
}
