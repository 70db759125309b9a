// RoPE on q (in place) and k for the step's n_tokens tokens at positions pos0.., and the KV
// cache write: rotated k and plain v stored as f16 pairs (one u32 per two values) at those
// positions of this layer's cache ([pos][kv_dim] halves).
//
// Token t's q, k and v are row step.row + t of their buffers (row is 0 but in a batched
// decode's per-sequence steps, where each sequence's token sits at its own row of the batch).
//
// Grid: x covers one token's work items in workgroups of 64 threads, y is the token. Items are
// n_head * head_dim / 2 q rotation pairs (a thread owns both values of its pair, so the in-place
// update needs no barrier), then kv_dim / 2 k words, then kv_dim / 2 v words.
//
// Pairs: adjacent (2i, 2i + 1) for llama, halves (i, i + rope_dim / 2) for NeoX; values past
// rope_dim pass through. The angles: rope_angle.wgsl.

struct Params {
    n_head: u32,
    n_head_kv: u32,
    head_dim: u32,
    rope_dim: u32,
    theta_scale: f32,
    freq_scale: f32,
    neox: u32,
    n_ctx: u32,
}

// k and v are only read, but declared read_write: the forward pass binds q, k and v as ranges
// of one buffer, and wgpu refuses a buffer bound both read-only and read-write in a dispatch.
@group(0) @binding(0) var<storage, read_write> q: array<f32>;
@group(0) @binding(1) var<storage, read_write> k: array<f32>;
@group(0) @binding(2) var<storage, read_write> v: array<f32>;
@group(0) @binding(3) var<storage, read_write> cache_k: array<u32>;
@group(0) @binding(4) var<storage, read_write> cache_v: array<u32>;
@group(0) @binding(5) var<uniform> params: Params;
@group(0) @binding(6) var<uniform> step: Step;

// Element e (within the head starting at k[base]) of the key rotated for position pos.
fn rotated_k(base: u32, e: u32, pos: u32) -> f32 {
    let rd = params.rope_dim;
    if (e >= rd) {
        return k[base + e];
    }
    var i: u32;
    var a: u32;
    var b: u32;
    if (params.neox != 0u) {
        let half = rd / 2u;
        i = select(e - half, e, e < half);
        a = i;
        b = i + half;
    } else {
        i = e / 2u;
        a = 2u * i;
        b = a + 1u;
    }
    let x0 = k[base + a];
    let x1 = k[base + b];
    let cs = rope_angle(pos, i, params.theta_scale, params.freq_scale);
    if (e == a) {
        return fma(x0, cs.x, -(x1 * cs.y));
    }
    return fma(x0, cs.y, x1 * cs.x);
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.y;
    if (t >= step.n_tokens) {
        return;
    }
    rope_kv(step.row + t, step.pos0 + t, gid.x, 0u);
}

// A batched decode's rows, each a sequence's token (`batch`, grid y = row < n_tokens): row r's
// position is rows[r].y and its sequence's cache starts at u32 word rows[r].x of cache_k and
// cache_v (every sequence's cache in one buffer per layer).
@group(0) @binding(7) var<storage, read> rows: array<vec4<u32>>;

@compute @workgroup_size(64)
fn batch(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.y;
    if (r >= step.n_tokens) {
        return;
    }
    let info = rows[r];
    rope_kv(r, info.y, gid.x, info.x);
}

// Work item `item` of the token in row `row` of q, k and v, at position pos, its cache from
// word cache0.
fn rope_kv(row: u32, pos: u32, item: u32, cache0: u32) {
    let hd = params.head_dim;
    let hw = hd / 2u;
    let nq = params.n_head * hw;
    let kv_dim = params.n_head_kv * hd;
    let nkv = kv_dim / 2u;
    if (item < nq) {
        // q pair p: rotate in place.
        let head = item / hw;
        let i = item % hw;
        if (2u * i >= params.rope_dim) {
            return;
        }
        var a = 2u * i;
        var b = a + 1u;
        if (params.neox != 0u) {
            a = i;
            b = i + params.rope_dim / 2u;
        }
        let base = row * params.n_head * hd + head * hd;
        let x0 = q[base + a];
        let x1 = q[base + b];
        let cs = rope_angle(pos, i, params.theta_scale, params.freq_scale);
        q[base + a] = fma(x0, cs.x, -(x1 * cs.y));
        q[base + b] = fma(x0, cs.y, x1 * cs.x);
        return;
    }
    if (pos >= params.n_ctx) {
        return;
    }
    let dst = cache0 + pos * nkv;
    if (item < nq + nkv) {
        // k word w: two rotated values as f16.
        let w = item - nq;
        let head = w / hw;
        let e = 2u * (w % hw);
        let base = row * kv_dim + head * hd;
        var r: vec2<f32>;
        if (params.neox == 0u && e < params.rope_dim) {
            // Adjacent pair: both values share one angle.
            let x0 = k[base + e];
            let x1 = k[base + e + 1u];
            let cs = rope_angle(pos, e / 2u, params.theta_scale, params.freq_scale);
            r = vec2<f32>(fma(x0, cs.x, -(x1 * cs.y)), fma(x0, cs.y, x1 * cs.x));
        } else {
            r = vec2<f32>(rotated_k(base, e, pos), rotated_k(base, e + 1u, pos));
        }
        cache_k[dst + w] = pack2x16float(r);
    } else if (item < nq + 2u * nkv) {
        let w = item - nq - nkv;
        let src = row * kv_dim + 2u * w;
        cache_v[dst + w] = pack2x16float(vec2<f32>(v[src], v[src + 1u]));
    }
}
