// Per-head RMS norm in place (qwen3's q and k norms, before RoPE): each of the step's n_tokens
// rows holds params.n_heads heads of params.head_dim values, and every head is divided by its
// own RMS and multiplied by `weight` (head_dim values, shared by the heads), as
// ember::cpu::ops::rms_norm_in_place. One workgroup of 64 threads per head: heads are short
// (64 to 256 values), so a wider workgroup would idle. The sum of squares is reduced as
// rms_norm.wgsl's (workgroup_sum.wgsl).

struct Params {
    head_dim: u32,
    n_heads: u32,
    eps: f32,
    pad: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read> weight: array<f32>;
@group(0) @binding(2) var<uniform> params: Params;
@group(0) @binding(3) var<uniform> step: Step;

const HN_WG: u32 = 64u;
const SUM_WG: u32 = HN_WG;

@compute @workgroup_size(HN_WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    // Heads beyond 65535 continue in the y dimension of the grid.
    let head = wg.x + wg.y * nwg.x;
    let in_range = head < step.n_tokens * params.n_heads;
    let d = params.head_dim;
    let base = head * d;
    var s = 0.0;
    if (in_range) {
        for (var i = tid; i < d; i += HN_WG) {
            let v = x[base + i];
            s += v * v;
        }
    }
    let sum = workgroup_sum(tid, s);
    if (!in_range) {
        return;
    }
    let scale = 1.0 / sqrt(sum / f32(d) + params.eps);
    for (var i = tid; i < d; i += HN_WG) {
        x[base + i] = (x[base + i] * scale) * weight[i];
    }
}
