// x[i] += y[i]: the residual connection.

struct Params {
    n: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read> y: array<f32>;
@group(0) @binding(2) var<uniform> params: Params;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    // 2D dispatch: large vectors exceed the 65535-workgroup limit of one dimension.
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i < params.n) {
        x[i] += y[i];
    }
}
