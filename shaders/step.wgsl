// The prelude of every kernel (gpu::shaders::compose! puts it first): the step uniform that
// the host rewrites once per forward step, so that one recorded command buffer serves every
// position. n_tokens: rows in this step; pos0: the first row's position; n_kv: keys visible
// to the last row (pos0 + n_tokens); row: the batch's first row in q, k, v and the attention
// output for RoPE with the KV write and decode attention, 0 but in a batched decode's
// per-sequence steps (engine::gpu_batch, caches apart), other kernels ignore it.
struct Step {
    n_tokens: u32,
    pos0: u32,
    n_kv: u32,
    row: u32,
}
