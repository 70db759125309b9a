// The decode matvec's activations as they are (matmul_dec.wgsl without a folded RMSNorm; the
// other choice is matmul_dec_norm.wgsl). Composed after matmul_dec.wgsl.

const DV_NORM: bool = false;

fn dv_norm_w(i: u32) -> vec4<f32> {
    return vec4<f32>(1.0);
}

fn dv_norm_scale(ss: f32) -> f32 {
    return 1.0;
}
