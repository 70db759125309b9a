// The gated FFN's hidden vector, in place: gate[i] = act(gate[i]) * up[i] over the step's
// n_tokens rows of `dim` values; entry points `silu`, `relu`, `drelu` and `gelu`. 256 threads per workgroup,
// one element each, over a 2D grid of workgroups. Composed before act.wgsl (the activations).

struct Params {
    dim: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<storage, read_write> gate: array<f32>;
@group(0) @binding(1) var<storage, read> up: array<f32>;
@group(0) @binding(2) var<uniform> params: Params;
@group(0) @binding(3) var<uniform> step: Step;

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

@compute @workgroup_size(256)
fn silu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < step.n_tokens * params.dim) {
        gate[i] = silu_mul(gate[i], up[i]);
    }
}

@compute @workgroup_size(256)
fn relu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < step.n_tokens * params.dim) {
        gate[i] = relu_mul(gate[i], up[i]);
    }
}

@compute @workgroup_size(256)
fn drelu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < step.n_tokens * params.dim) {
        gate[i] = drelu_mul(gate[i], up[i]);
    }
}

@compute @workgroup_size(256)
fn gelu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < step.n_tokens * params.dim) {
        gate[i] = gelu_mul(gate[i], up[i]);
    }
}
