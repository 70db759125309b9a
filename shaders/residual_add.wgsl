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

// x[i] *= s, s the f32 whose bits params.pad0 holds (Gemma's embedding scale).
@compute @workgroup_size(256)
fn scale(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i < step.n_tokens * params.dim) {
        x[i] *= bitcast<f32>(params.pad0);
    }
}

// x[i] = c * tanh(x[i] / c), c the f32 whose bits params.pad0 holds (final logit soft-capping,
// as llama.cpp: x times 1 / c, tanh, times c; the argument clamped where tanh is 1 in f32,
// so that no driver's exp-based tanh overflows).
@compute @workgroup_size(256)
fn softcap(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i < step.n_tokens * params.dim) {
        let c = bitcast<f32>(params.pad0);
        x[i] = tanh(clamp(x[i] * (1.0 / c), -15.0, 15.0)) * c;
    }
}
