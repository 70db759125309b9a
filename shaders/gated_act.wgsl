// The gated FFN's hidden vector, in place: gate[i] = act(gate[i]) * up[i] over the step's
// n_tokens rows of `dim` values; entry points `silu` and `relu`. 256 threads per workgroup,
// one element each, over a 2D grid of workgroups.
//
// SiLU uses the same e^x polynomial as the CPU backend (ember::cpu::ops::exp_poly, after
// llama.cpp's vectorised x86 SiLU) so both backends agree closely.

struct Step {
    n_tokens: u32,
    pos0: u32,
    n_kv: u32,
    pad: u32,
}

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

// e^x: x = n ln2 + b with |b| <= ln2/2, a degree-5 polynomial in b, times 2^n.
fn exp_poly(x: f32) -> f32 {
    let shift = 12582912.0; // 1.5 * 2^23: adding it rounds to an integer
    let log2e = bitcast<f32>(0x3fb8aa3bu);
    let ln2_hi = bitcast<f32>(0x3f317200u);
    let ln2_lo = bitcast<f32>(0x35bfbe8eu);
    let c0 = bitcast<f32>(0x3f7ffff6u);
    let c1 = bitcast<f32>(0x3efffedbu);
    let c2 = bitcast<f32>(0x3e2aaf33u);
    let c3 = bitcast<f32>(0x3d2b9f17u);
    let c4 = bitcast<f32>(0x3c072010u);
    // z's low mantissa bits hold round(x * log2e) (read from the bits, so no compiler can
    // fold the `z - shift` of the CPU version away).
    let z = fma(x, log2e, shift);
    let ni = bitcast<i32>(z) - bitcast<i32>(shift);
    let n = f32(ni);
    let b = fma(-n, ln2_lo, fma(-n, ln2_hi, x));
    let u = b * b;
    let j = fma(fma(fma(c4, b, c3), u, fma(c2, b, c1)), u, fma(c0, b, 1.0));
    if (abs(n) > 126.0) {
        // Far outside SiLU's working range: the result over- or underflows.
        return j * exp2(n);
    }
    return j * bitcast<f32>(u32(ni + 127) << 23u);
}

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

@compute @workgroup_size(256)
fn silu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < step.n_tokens * params.dim) {
        let g = gate[i];
        gate[i] = g / (1.0 + exp_poly(-g)) * up[i];
    }
}

@compute @workgroup_size(256)
fn relu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < step.n_tokens * params.dim) {
        let g = gate[i];
        gate[i] = select(0.0, g * up[i], g > 0.0);
    }
}
