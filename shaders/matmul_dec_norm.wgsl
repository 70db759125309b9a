// The decode matvec with the RMSNorm before it folded in: y = W (x / rms(x) * weight) where x
// is the raw residual. The scale 1 / rms(x) is one number per token, so it factors out of every
// dot product: the threads multiply the norm weight into the activations as they load them,
// sum the squares of the same loads on the side (every element of the row once across the
// workgroup), and the stored total is multiplied by the scale. This saves a dispatch per norm
// (a one-workgroup kernel whose latency a decode step otherwise waits for) at the price of a
// second 16-byte load (the norm weight, from L1) per activation load. Composed after
// matmul_dec.wgsl instead of matmul_dec_x.wgsl.
//
// DV_EPS_BITS (the norm's epsilon as f32 bits) is rewritten by src/gpu/matrix.rs.

@group(0) @binding(7) var<storage, read> dv_g: array<vec4<f32>>;

const DV_NORM: bool = true;
const DV_EPS_BITS: u32 = 0u;

// The norm weights of activation vec4 i of a row.
fn dv_norm_w(i: u32) -> vec4<f32> {
    return dv_g[i];
}

// 1 / rms from the row's sum of squares (as shaders/rms_norm.wgsl).
fn dv_norm_scale(ss: f32) -> f32 {
    return 1.0 / sqrt(ss / f32(chunk.cols) + bitcast<f32>(DV_EPS_BITS));
}
