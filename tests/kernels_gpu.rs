//! WGSL kernels against the CPU on random inputs at awkward sizes (lavapipe in CI).

mod common;

use common::Rng;
use ember::gpu::shaders;

#[test]
fn context_reports_the_adapter() {
    let Some(ctx) = common::gpu() else { return };
    eprintln!("adapter: {:?}", ctx.adapter);
    assert!(ctx.max_binding() >= 128 << 20 || ctx.adapter.is_gl());
}

#[test]
fn add_matches_cpu() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(11);
    for n in [1usize, 255, 257, 1000, 70_001] {
        let (x, y) = (rng.vec(n), rng.vec(n));
        let xb = ctx.upload("x", bytemuck::cast_slice(&x));
        let yb = ctx.upload("y", bytemuck::cast_slice(&y));
        let pb = ctx.uniform("p", bytemuck::bytes_of(&(n as u32)));
        let p = ctx.pipeline("add", shaders::ADD, "main");
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        let groups = (n as u32).div_ceil(256);
        ctx.dispatch(&mut enc, &p, &[xb.as_entire_binding(), yb.as_entire_binding(), pb.as_entire_binding()], (groups, 1, 1));
        ctx.submit_and_wait(enc).unwrap();
        let got: Vec<f32> = ctx.read(&xb, n).unwrap();
        let want: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
        assert_eq!(got, want, "n = {n}");
    }
}
