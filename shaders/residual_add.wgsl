// x[i] += y[i] over the step's n_tokens rows of `dim` values (the residual connection); the
// `bias` entry point adds one row of `dim` values to every token instead (q/k/v biases).
// 256 threads per workgroup, one element each, over a 2D grid (x then y) of workgroups.

struct Params {
    dim: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read> y: array<f32>;
@group(0) @binding(2) var<uniform> params: Params;
@group(0) @binding(3) var<uniform> step: Step;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i < step.n_tokens * params.dim) {
        x[i] += y[i];
    }
}

@compute @workgroup_size(256)
fn bias(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i < step.n_tokens * params.dim) {
        x[i] += y[i % params.dim];
    }
}
