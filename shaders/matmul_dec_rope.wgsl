// The q/k/v decode product's epilogue with RoPE and the KV-cache write (what
// shaders/rope_kv.wgsl does as a separate dispatch): the matrix stacks q, k and v
// (matmul_store.wgsl's sections: q rows [0, ends.x), k [ends.x, ends.y), v [ends.y, ends.z)),
// and a storing thread holds the totals of two adjacent rows, which for llama's RoPE are one
// rotation pair (head_dim and the sections' starts are even). So the thread rotates its q pair
// and stores it, rotates its k pair and writes it to the cache as one f16 pair, or writes its v
// pair to the cache; k and v never go through the qkv buffer. NeoX's pairs (i, i + rope_dim /
// 2) and biases (added before RoPE) keep the separate dispatch. The angles are rope_kv.wgsl's
// bit for bit. Composed after matmul_dec.wgsl instead of matmul_dec_norope.wgsl.

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

// As rope_kv.wgsl: 2 pi in parts of 8 significant bits, so the reduction is exact.
const DV_TWO_PI_1: f32 = 6.28125;
const DV_TWO_PI_2: f32 = 0.00193023681640625;
const DV_TWO_PI_3: f32 = 5.066394805908203e-06;
const DV_TWO_PI_4: f32 = 3.968374517882012e-09;
const DV_INV_TWO_PI: f32 = 0.15915493667125702;

// (cos, sin) of pair i's angle at position pos (rope_kv.wgsl's angle).
fn dv_angle(pos: u32, i: u32) -> vec2<f32> {
    var theta = f32(pos);
    for (var j = 0u; j < i; j++) {
        theta *= dv_rope.theta_scale;
    }
    let t = dv_rope.freq_scale * theta;
    let n = round(t * DV_INV_TWO_PI);
    let r = (((t - n * DV_TWO_PI_1) - n * DV_TWO_PI_2) - n * DV_TWO_PI_3) - n * DV_TWO_PI_4;
    return vec2<f32>(cos(r), sin(r));
}

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
        let cs = dv_angle(pos, i);
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
