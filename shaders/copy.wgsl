// dst = src, 16 bytes per thread per step: the bandwidth ceiling a memory-bound kernel can hope
// for (a plain copy engine transfer can be slower or faster than shader loads and stores).

struct Params {
    n_vec4: u32,
}

@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<u32>>;
@group(0) @binding(2) var<uniform> params: Params;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * 256u;
    for (var i = gid.x; i < params.n_vec4; i += stride) {
        dst[i] = src[i];
    }
}
