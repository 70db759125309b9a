//! Criterion benchmarks of the decode matrix-vector kernels (src/gpu/matrix.rs) on whatever
//! adapter is present (lavapipe on a machine without a GPU): one token times a weight matrix,
//! for a few shapes and weight types, each kernel the model would pick plus the alternatives.
//! Wall time per product includes a submission and a wait; `ember bench --kernels` gives GPU
//! times from timestamp queries on large matrices.
//!
//! `cargo bench --bench matvec` (a few seconds per case); prints nothing useful without an
//! adapter.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ember::gguf::GgmlType;
use ember::gpu::matrix::{parse_decode, DecodeKernel, GpuMatrix, MatmulOp, MvConfig};
use ember::gpu::{DeviceChoice, GpuContext, Step};
use ember::model::Matrix;
use std::time::Duration;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect()
}

fn matrix(ty: GgmlType, rows: usize, cols: usize) -> Matrix {
    let v = random(rows * cols, 7);
    let name = format!("{} {rows}x{cols}", ty.name());
    match ty {
        GgmlType::Q4_0 => Matrix::from_raw(&name, rows, cols, ty, bytemuck::cast_slice(&ember::quant::quantize_q4_0(&v))),
        GgmlType::Q4_1 => Matrix::from_raw(&name, rows, cols, ty, bytemuck::cast_slice(&ember::quant::quantize_q4_1(&v))),
        GgmlType::Q8_0 => Matrix::from_raw(&name, rows, cols, ty, bytemuck::cast_slice(&ember::quant::quantize_q8_0(&v))),
        _ => Matrix::from_f32(&name, rows, cols, &v, ty),
    }
}

fn run(ctx: &GpuContext, op: &MatmulOp) {
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
        op.encode(&mut pass, 1);
    }
    ctx.submit_and_wait(enc).unwrap();
}

fn matvec(c: &mut Criterion) {
    let Ok(ctx) = GpuContext::new(&DeviceChoice::BestOrSoftware) else {
        eprintln!("matvec bench: no GPU adapter, nothing to time");
        return;
    };
    let step = ctx.uniform("step", bytemuck::bytes_of(&Step { n_tokens: 1, pos0: 0, n_kv: 1, _pad: 0 }));
    let mut group = c.benchmark_group(format!("matvec on {}", ctx.adapter.name));
    group.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::F16] {
        for (rows, cols) in [(1024usize, 1024usize), (2816, 1024), (1024, 2816)] {
            let m = matrix(ty, rows, cols);
            let g = GpuMatrix::upload(&ctx, &m).unwrap();
            let x = ctx.upload("x", bytemuck::cast_slice(&random(cols, 3)));
            let y = ctx.zeros("y", 4 * rows as u64);
            group.throughput(Throughput::Bytes(g.gpu_bytes()));
            let sg = ctx.has_subgroups();
            // The model's choice, then the other decode kernels where they apply to the layout.
            let mut kernels: Vec<(String, Option<(MvConfig, DecodeKernel)>)> = vec![("default".into(), None)];
            for v in ["32:2:1:1", "256:2:1:0", "kq:4:4:1"] {
                let (k, (wg, nr, ub)) = parse_decode(v).unwrap();
                kernels.push((v.into(), Some((MvConfig { nt: 1, wg, nr, unroll: ub, units: false, prefetch: false, subgroups: sg, kq: None }, k))));
            }
            for (name, cfg) in kernels {
                let op = match cfg {
                    None => g.bind_matmul(&ctx, &x, &y, &step),
                    Some((c, k)) => g.bind_matmul_variant(&ctx, &x, &y, &step, &[c], k, &Default::default()),
                };
                group.bench_function(BenchmarkId::new(format!("{} {rows}x{cols}", ty.name()), name), |b| b.iter(|| run(&ctx, &op)));
            }
        }
    }
    group.finish();
}

criterion_group!(benches, matvec);
criterion_main!(benches);
