// The q/k/v decode product's epilogue with RoPE and the KV-cache write (what
// shaders/rope_kv.wgsl does as a separate dispatch): the matrix stacks q, k and v
// (matmul_store.wgsl's sections: q rows [0, ends.x), k [ends.x, ends.y), v [ends.y, ends.z)),
// and a storing thread holds the totals of two adjacent rows, which for llama's RoPE are one
// rotation pair (head_dim and the sections' starts are even). So the thread rotates its q pair
// and stores it, rotates its k pair and writes it to the cache as one f16 pair, or writes its v
// pair to the cache; k and v never go through the qkv buffer. NeoX's pairs (i, i + rope_dim /
// 2) and biases (added before RoPE) keep the separate dispatch. The angles are rope_kv.wgsl's
// bit for bit (both take rope_angle.wgsl's). Composed after matmul_dec.wgsl instead of
// matmul_dec_norope.wgsl, and after rope_angle.wgsl.

struct DvRope {
    head_dim: u32,
    rope_dim: u32,
    theta_scale: f32,
    freq_scale: f32,
    // Positions the cache holds.
    n_ctx: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(8) var<storage, read_write> dv_cache_k: array<u32>;
@group(0) @binding(9) var<storage, read_write> dv_cache_v: array<u32>;
@group(0) @binding(10) var<uniform> dv_rope: DvRope;

const DV_ROPE: bool = true;

// Rows r (even) and r + 1 of the chunk for token t, totals a and b.
fn dv_rope_store(t: u32, r: u32, a: f32, b: f32) {
    let row = chunk.row0 + r;
    let e = mat_out.ends;
    let pos = step.pos0 + t;
    let kv_words = (e.y - e.x) / 2u;
    if (row >= e.y) {
        if (pos < dv_rope.n_ctx) {
            dv_cache_v[pos * kv_words + (row - e.y) / 2u] = pack2x16float(vec2<f32>(a, b));
        }
        return;
    }
    let in_q = row < e.x;
    let s = select(row - e.x, row, in_q);
    let i = (s % dv_rope.head_dim) / 2u;
    var v = vec2<f32>(a, b);
    if (2u * i < dv_rope.rope_dim) {
        let cs = rope_angle(pos, i, dv_rope.theta_scale, dv_rope.freq_scale);
        v = vec2<f32>(fma(a, cs.x, -(b * cs.y)), fma(a, cs.y, b * cs.x));
    }
    if (in_q) {
        let o = y_index(t, r);
        y[o] = v.x;
        y[o + 1u] = v.y;
    } else if (pos < dv_rope.n_ctx) {
        dv_cache_k[pos * kv_words + s / 2u] = pack2x16float(v);
    }
}
