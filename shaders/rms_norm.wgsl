// RMS norm: out[t] = x[t] * (1 / sqrt(mean(x[t]^2) + eps)) * weight, for the step's n_tokens
// rows of `dim` values. One workgroup of 256 threads per row: strided sum of squares, a
// shared-memory tree reduction (workgroup_sum.wgsl), then a strided scale-and-multiply pass.

struct Params {
    dim: u32,
    eps: f32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> weight: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> params: Params;
@group(0) @binding(4) var<uniform> step: Step;

const WG: u32 = 256u;
const SUM_WG: u32 = WG;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    // Rows beyond 65535 continue in the y dimension of the grid.
    let row = wg.x + wg.y * nwg.x;
    let in_range = row < step.n_tokens;
    let dim = params.dim;
    let base = row * dim;
    // Four independent loads per step, so that their latencies overlap.
    var s4 = vec4<f32>(0.0);
    if (in_range) {
        var i = tid;
        for (; i + 3u * WG < dim; i += 4u * WG) {
            let v = vec4<f32>(x[base + i], x[base + i + WG], x[base + i + 2u * WG], x[base + i + 3u * WG]);
            s4 += v * v;
        }
        for (; i < dim; i += WG) {
            let v = x[base + i];
            s4.x += v * v;
        }
    }
    let sum = workgroup_sum(tid, (s4.x + s4.y) + (s4.z + s4.w));
    if (!in_range) {
        return;
    }
    let mean = sum / f32(dim);
    let scale = 1.0 / sqrt(mean + params.eps);
    var i = tid;
    for (; i + 3u * WG < dim; i += 4u * WG) {
        let v = vec4<f32>(x[base + i], x[base + i + WG], x[base + i + 2u * WG], x[base + i + 3u * WG]);
        let w = vec4<f32>(weight[i], weight[i + WG], weight[i + 2u * WG], weight[i + 3u * WG]);
        let o = (v * scale) * w;
        out[base + i] = o.x;
        out[base + i + WG] = o.y;
        out[base + i + 2u * WG] = o.z;
        out[base + i + 3u * WG] = o.w;
    }
    for (; i < dim; i += WG) {
        out[base + i] = (x[base + i] * scale) * weight[i];
    }
}
