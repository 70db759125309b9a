//! The GPU context, the copy kernel and the bias op (the rest: kernels_gpu_matmul.rs,
//! kernels_gpu_ops.rs), on random inputs at awkward sizes.

mod common;

use common::Rng;
use ember::gpu::ops::BiasOp;
use ember::gpu::{shaders, Step};

#[test]
fn context_reports_the_adapter() {
    let Some(ctx) = common::gpu() else { return };
    eprintln!("adapter: {:?}", ctx.adapter);
    assert!(ctx.max_binding() >= 128 << 20 || ctx.adapter.is_gl());
}

#[test]
fn copy_kernel_copies_every_word() {
    let Some(ctx) = common::gpu() else { return };
    for n_vec4 in [1u32, 255, 2049, 70_001] {
        let src: Vec<u32> = (0..4 * n_vec4).map(|i| i.wrapping_mul(2654435761)).collect();
        let a = ctx.upload("src", bytemuck::cast_slice(&src));
        let b = ctx.zeros("dst", 16 * n_vec4 as u64);
        let p = ctx.uniform("p", bytemuck::bytes_of(&n_vec4));
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        // Fewer workgroups than elements: the grid-stride loop must cover the rest.
        let groups = n_vec4.div_ceil(256 * 8);
        ctx.dispatch(&mut enc, &ctx.pipeline(&ember::gpu::ShaderSpec::new("copy", shaders::COPY, "main")), &[a.as_entire_binding(), b.as_entire_binding(), p.as_entire_binding()], (groups, 1, 1));
        ctx.submit_and_wait(enc).unwrap();
        assert_eq!(ctx.read::<u32>(&b, src.len()).unwrap(), src, "n_vec4 = {n_vec4}");
    }
}

#[test]
fn add_bias_adds_the_row_to_every_token() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(12);
    for (dim, tokens) in [(1u32, 1u32), (67, 5), (576, 3), (1000, 37)] {
        let (x, bias) = (rng.vec((dim * tokens) as usize), rng.vec(dim as usize));
        let xb = ctx.upload("x", bytemuck::cast_slice(&x));
        let bb = ctx.upload("bias", bytemuck::cast_slice(&bias));
        let step = ctx.uniform("step", bytemuck::bytes_of(&Step { n_tokens: tokens, pos0: 0, n_kv: tokens, _pad: 0 }));
        let op = BiasOp::new(&ctx, &xb, &bb, dim, &step);
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        op.encode(&mut enc.begin_compute_pass(&Default::default()), tokens);
        ctx.submit_and_wait(enc).unwrap();
        let got: Vec<f32> = ctx.read(&xb, x.len()).unwrap();
        let want: Vec<f32> = x.iter().enumerate().map(|(i, v)| v + bias[i % dim as usize]).collect();
        assert_eq!(got, want, "dim {dim} tokens {tokens}");
    }
}
