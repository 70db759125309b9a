// x[t][i] += bias[i] for every token t: q/k/v projection biases (qwen2).

struct Step {
    n_tokens: u32,
    pos0: u32,
    n_kv: u32,
    _pad: u32,
}

struct Params {
    dim: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read> bias: array<f32>;
@group(0) @binding(2) var<uniform> params: Params;
@group(0) @binding(3) var<uniform> step: Step;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i < params.dim * step.n_tokens) {
        x[i] += bias[i % params.dim];
    }
}
