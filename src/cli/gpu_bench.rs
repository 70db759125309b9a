//! GPU measurements for `ember bench`: copy bandwidth (the ceiling), matrix-vector kernel
//! bandwidth over matrices larger than the L2 cache, and a per-kernel profile of one token.

use super::Result;
use crate::engine::gpu_forward::Profile;
use crate::engine::GpuWeights;
use crate::gguf::GgmlType;
use crate::gpu::matrix::{parse_decode, DecodeKernel, Epilogue, GpuMatrix, Kernel, MatOut, MatmulOp, MvConfig};
use crate::gpu::timer::PassTimer;
use crate::gpu::{GpuContext, Step};
use crate::model::Matrix;
use std::collections::BTreeMap;

/// Device-memory bandwidth in GB/s, counting bytes read plus bytes written, as the better of a
/// copy-engine transfer and a shader copy (16-byte loads and stores) of a 1 GiB buffer.
pub fn copy_bandwidth(ctx: &GpuContext) -> Result<(f64, f64)> {
    let size: u64 = (1u64 << 30).min(ctx.limits.max_buffer_size / 2).min(ctx.max_binding()) / 16 * 16;
    let a = ctx.zeros("copy a", size);
    let b = ctx.zeros("copy b", size);
    let reps = 10u32;
    let time = |shader: bool, reps: u32| -> Result<f64> {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        let n_vec4 = (size / 16) as u32;
        let params = ctx.uniform("copy params", bytemuck::bytes_of(&n_vec4));
        let pipeline = ctx.pipeline(&crate::gpu::ShaderSpec::new("copy", crate::gpu::shaders::COPY, "main"));
        for _ in 0..reps {
            if shader {
                let groups = n_vec4.div_ceil(256 * 8).min(65535);
                ctx.dispatch(&mut enc, &pipeline, &[a.as_entire_binding(), b.as_entire_binding(), params.as_entire_binding()], (groups, 1, 1));
            } else {
                enc.copy_buffer_to_buffer(&a, 0, &b, 0, size);
            }
        }
        let t = std::time::Instant::now();
        ctx.submit_and_wait(enc)?;
        Ok(t.elapsed().as_secs_f64())
    };
    let mut best = [0.0f64; 2];
    for (i, shader) in [false, true].into_iter().enumerate() {
        time(shader, 1)?;
        best[i] = 2.0 * size as f64 * reps as f64 / time(shader, reps)? / 1e9;
    }
    Ok((best[0], best[1]))
}

/// One row of the kernel table.
pub struct KernelRow {
    pub ty: GgmlType,
    /// What the shape is in a llama-7B layer, and the product's epilogue.
    pub what: String,
    pub rows: usize,
    pub cols: usize,
    pub bytes: u64,
    /// Median GPU time per dispatch, dispatches back to back in one pass with a barrier
    /// between each (as in a forward pass).
    pub median_us: f64,
    pub gbps: f64,
    /// Median GPU time per dispatch, streaming: dispatches in one pass writing separate
    /// outputs, so no barrier orders them and one's start overlaps another's end (the kernel's
    /// own rate, without the forward pass's barrier and ramp per dispatch).
    pub stream_us: f64,
    /// Median GPU time of one dispatch alone in its own timestamped pass (launch and pass
    /// overhead included).
    pub alone_us: f64,
}

/// Matrices of one type and shape, enough of them to exceed the L2 cache several times, with
/// one x and one y shared by all (so that back-to-back dispatches are ordered by barriers),
/// plus STREAM_OPS outputs for dispatches that nothing orders.
struct BenchSet {
    mats: Vec<GpuMatrix>,
    epilogue: Epilogue,
    /// Tokens the buffers hold (x, y and each of ys); the Step uniform's n_tokens is set by
    /// [`Self::set_tokens`] (1 at first).
    max_tokens: usize,
    n: std::cell::Cell<u32>,
    x: wgpu::Buffer,
    y: wgpu::Buffer,
    ys: Vec<wgpu::Buffer>,
    step: wgpu::Buffer,
}

/// Dispatches per streaming pass, each with its own output.
const STREAM_OPS: usize = 64;

impl BenchSet {
    /// `perm`: the word order (None: the type's default, as the model uses).
    fn new(ctx: &GpuContext, ty: GgmlType, rows: usize, cols: usize, perm: Option<bool>, epilogue: Epilogue) -> Result<BenchSet> {
        Self::with_tokens(ctx, ty, rows, cols, perm, epilogue, 1)
    }

    /// [`Self::new`] with room for `max_tokens` tokens.
    fn with_tokens(ctx: &GpuContext, ty: GgmlType, rows: usize, cols: usize, perm: Option<bool>, epilogue: Epilogue, max_tokens: usize) -> Result<BenchSet> {
        let bytes = ty.bytes_for((rows * cols) as u64).unwrap();
        let count = (400_000_000 / bytes).clamp(2, 16) as usize;
        let mut mats = Vec::new();
        for i in 0..count {
            let mut raw = vec![0u8; bytes as usize];
            super::synth::fill(&mut raw, ty, cols as u64, 1 + i as u64);
            let m = Matrix::from_raw("bench", rows, cols, ty, &raw);
            mats.push(match perm {
                None => GpuMatrix::upload(ctx, &m)?,
                Some(p) => GpuMatrix::upload_layout(ctx, &m, ctx.max_binding().min(ctx.limits.max_buffer_size), p)?,
            });
        }
        // Activations of varied sign and size (not zeros: a kernel must not time on zeros).
        let xv: Vec<f32> = (0..cols * max_tokens).map(|i| ((i as u32).wrapping_mul(2654435761) >> 8) as f32 / (1u32 << 24) as f32 - 0.5).collect();
        let x = ctx.upload("x", bytemuck::cast_slice(&xv));
        let step = ctx.uniform("step", bytemuck::bytes_of(&Step { n_tokens: 1, pos0: 0, n_kv: 1, _pad: 0 }));
        let y_bytes = 4 * (rows * max_tokens) as u64;
        let y = ctx.zeros("y", y_bytes);
        let ys = (0..STREAM_OPS).map(|_| ctx.zeros("y", y_bytes)).collect();
        let set = BenchSet { mats, epilogue, max_tokens, n: std::cell::Cell::new(1), x, y, ys, step };
        set.warm(ctx, &set.bind(ctx, None).0, 300)?;
        Ok(set)
    }

    /// (ops sharing y, STREAM_OPS ops with outputs of their own), rotating over the matrices.
    fn bind(&self, ctx: &GpuContext, cfg: Option<(MvConfig, DecodeKernel)>) -> (Vec<MatmulOp>, Vec<MatmulOp>) {
        let op = |m: &GpuMatrix, y: &wgpu::Buffer| match cfg {
            None => m.bind_matmul_out(ctx, &self.x, y, &self.step, &MatOut::with(self.epilogue)),
            Some((c, k)) => m.bind_matmul_variant(ctx, &self.x, y, &self.step, &[c], k, &MatOut::with(self.epilogue)),
        };
        let shared = self.mats.iter().map(|m| op(m, &self.y)).collect();
        let own = self.ys.iter().enumerate().map(|(i, y)| op(&self.mats[i % self.mats.len()], y)).collect();
        (shared, own)
    }

    /// The tokens every later dispatch computes (the Step uniform's n_tokens).
    fn set_tokens(&self, ctx: &GpuContext, n: usize) {
        assert!((1..=self.max_tokens).contains(&n));
        self.n.set(n as u32);
        ctx.queue.write_buffer(&self.step, 0, bytemuck::bytes_of(&Step { n_tokens: n as u32, pos0: 0, n_kv: n as u32, _pad: 0 }));
    }

    /// Runs `ops` for at least `ms` milliseconds: a GPU left idle while the host prepares
    /// matrices lowers its clocks, and timing a few milliseconds of work right after that
    /// measured 3-4x too slow (the first H200 run of this table).
    fn warm(&self, ctx: &GpuContext, ops: &[MatmulOp], ms: u64) -> Result<()> {
        let t = std::time::Instant::now();
        while t.elapsed().as_millis() < ms as u128 {
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("warm-up"), timestamp_writes: None });
                for i in 0..256 {
                    ops[i % ops.len()].encode(&mut pass, self.n.get());
                }
            }
            ctx.submit_and_wait(enc)?;
        }
        Ok(())
    }

    /// (back to back, streaming, alone) median µs per dispatch of `ops` (from [`Self::bind`]),
    /// rotating over the matrices.
    /// The check of `op`'s kernel at `n` tokens of a `rows`-row product: it and the tiled one
    /// run from zeros and are read back (`out_len` values a token); their largest difference over the tiled result's
    /// largest magnitude (inf where either gives NaN).
    fn against_tiled(&self, ctx: &GpuContext, op: &MatmulOp, n: usize, rows: usize, out_len: usize) -> Result<f32> {
        let mut outs = Vec::new();
        for kernel in [Kernel::Tiled, Kernel::Auto] {
            ctx.queue.write_buffer(&self.y, 0, bytemuck::cast_slice(&vec![0f32; n * rows]));
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            op.encode_with(&mut enc.begin_compute_pass(&Default::default()), n as u32, kernel);
            ctx.submit_and_wait(enc)?;
            outs.push(ctx.read::<f32>(&self.y, n * out_len)?);
        }
        let max = outs[0].iter().fold(0f32, |a, v| a.max(v.abs()));
        let diff = outs[1].iter().zip(&outs[0]).fold(0f32, |a, (p, q)| if (p - q).is_nan() { f32::INFINITY } else { a.max((p - q).abs()) });
        Ok(diff / max.max(f32::MIN_POSITIVE))
    }

    fn time(&self, ctx: &GpuContext, (ops, stream_ops): &(Vec<MatmulOp>, Vec<MatmulOp>)) -> Result<(f64, f64, f64)> {
        self.warm(ctx, ops, 30)?;
        let n = ops.len();
        let per_pass = (4 * n).max(32);
        let passes = 8;
        let alone_n = 64;
        let Some(mut timer) = PassTimer::new(ctx, alone_n as u32) else {
            return Err("the adapter has no timestamp queries".into());
        };
        let mut row = Vec::new();
        let mut stream = Vec::new();
        let mut alone = Vec::new();
        // Warm-up, then the timed submission.
        for round in 0..2 {
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            for p in 0..passes {
                let mut pass = timer.pass(&mut enc, "matvec row");
                for i in 0..per_pass {
                    ops[(p + i) % n].encode(&mut pass, self.n.get());
                }
            }
            row = timer.finish(ctx, enc)?.into_iter().map(|t| t / per_pass as f64).collect();
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            for _ in 0..passes {
                let mut pass = timer.pass(&mut enc, "matvec stream");
                for op in stream_ops {
                    op.encode(&mut pass, self.n.get());
                }
            }
            stream = timer.finish(ctx, enc)?.into_iter().map(|t| t / stream_ops.len() as f64).collect();
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            for i in 0..alone_n {
                ops[i % n].encode(&mut timer.pass(&mut enc, "matvec"), self.n.get());
            }
            alone = timer.finish(ctx, enc)?;
            let _ = round;
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2] / 1e3
        };
        Ok((median(row), median(stream), median(alone)))
    }
}

/// Times the decode matvec for the shapes of the acceptance criteria, rotating over enough
/// matrices that together exceed the L2 cache several times: back to back in one timestamped
/// pass (a barrier between dispatches, as in a forward pass) and each dispatch alone in its own
/// pass; bandwidth = weight bytes / back-to-back time. With `EMBER_MV_SWEEP` set it first
/// prints every decode variant's time per type and shape (plus 4096x4096) and the best
/// variant per type, weighted as in a llama-7B layer, as an `EMBER_MV_DEC=` line.
pub fn kernel_bandwidth(ctx: &GpuContext) -> Result<Vec<KernelRow>> {
    if std::env::var_os("EMBER_MV_SWEEP").is_some() {
        sweep(ctx)?;
        if std::env::var_os("EMBER_MV_SWEEP_ONLY").is_some() {
            return Ok(Vec::new());
        }
    }
    let mut rows_out = Vec::new();
    for ty in [GgmlType::Q4_0, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_1] {
        let mut shapes = vec![(11008usize, 4096usize, "", Epilogue::Store), (4096, 11008, "", Epilogue::Store)];
        if matches!(ty, GgmlType::Q4_0 | GgmlType::F16) {
            // The forward pass's own products.
            shapes.extend(FUSED_LAYER.iter().map(|&(rows, cols, what, epilogue, _)| (rows, cols, what, epilogue)));
        }
        for (rows, cols, what, epilogue) in shapes {
            let set = BenchSet::new(ctx, ty, rows, cols, None, epilogue)?;
            let (row_us, stream_us, alone_us) = set.time(ctx, &set.bind(ctx, None))?;
            let gpu_bytes = set.mats[0].gpu_bytes();
            rows_out.push(KernelRow { ty, what: what.to_string(), rows, cols, bytes: gpu_bytes, median_us: row_us, gbps: gpu_bytes as f64 / row_us / 1e3, stream_us, alone_us });
        }
        if ty == GgmlType::Q4_0 {
            // The integer kernel with llama.cpp's 8-bit activations (GGUF block order). The
            // forward pass keeps the blocks kernel, which folds norms and gated pairs in.
            let cfg = MvConfig { nt: 1, wg: 64, nr: 2, unroll: 1, units: false, prefetch: false, subgroups: ctx.has_subgroups(), kq: None };
            for (rows, cols) in [(11008, 4096), (4096, 11008)] {
                let set = BenchSet::new(ctx, ty, rows, cols, Some(false), Epilogue::Store)?;
                for variant in INTEGER_Q4_0 {
                    let (kernel, _) = parse_decode(variant).expect("a valid variant");
                    let (row_us, stream_us, alone_us) = set.time(ctx, &set.bind(ctx, Some((cfg, kernel))))?;
                    let gpu_bytes = set.mats[0].gpu_bytes();
                    let what = format!(" integer ({variant})");
                    rows_out.push(KernelRow { ty, what, rows, cols, bytes: gpu_bytes, median_us: row_us, gbps: gpu_bytes as f64 / row_us / 1e3, stream_us, alone_us });
                }
            }
        }
    }
    println!("\nthe same, each dispatch alone in its own timestamped pass:\n");
    println!("| kernel | shape | median µs alone | GB/s |");
    println!("| --- | --- | ---: | ---: |");
    for r in &rows_out {
        println!("| matvec {}{} | {} x {} | {:.1} | {:.0} |", r.ty, r.what, r.rows, r.cols, r.alone_us, r.bytes as f64 / r.alone_us / 1e3);
    }
    Ok(rows_out)
}

/// Times the few-token products (a batched decode's: the matvec at 2..16 tokens, the kernel
/// the context's tuning picks) of one llama-7B layer (FUSED_LAYER) at 1, 2, 4, 8 and 16 tokens
/// for each weight type, back to back over more matrices than the L2 cache holds (as
/// [`kernel_bandwidth`]), with the weight bytes per second and the time per token; each shape
/// and count is first checked against the portable tiled kernel (max difference relative to the
/// max |y|: ~1e-6 for a working kernel, f32 sums in another order; ~1 or inf for a broken one).
/// The last table is what 32 such layers' products allow: an upper bound of a 7B model's batched decode (attention,
/// norms, the output product and the host's part of a step come on top).
pub fn batch_products(ctx: &GpuContext) -> Result<()> {
    const COUNTS: [usize; 5] = [1, 2, 4, 8, 16];
    println!("\nfew-token products of a llama-7B layer (the batched decode's matvec), median µs back to back per dispatch\n");
    println!("| type | product | rows x cols | tokens | µs | µs per token | weight GB/s | max diff / max abs, against tiled |");
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |");
    let mut layers = Vec::new();
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::F16] {
        let mut layer_us = [0.0f64; COUNTS.len()];
        for &(rows, cols, what, epilogue, count) in &FUSED_LAYER {
            let set = BenchSet::with_tokens(ctx, ty, rows, cols, None, epilogue, 16)?;
            let ops = set.bind(ctx, None);
            let bytes = set.mats[0].gpu_bytes() as f64;
            let out_len = if epilogue.pairs() { rows / 2 } else { rows };
            for (ci, &n) in COUNTS.iter().enumerate() {
                set.set_tokens(ctx, n);
                let diff = set.against_tiled(ctx, &ops.0[0], n, rows, out_len)?;
                let (row_us, _, _) = set.time(ctx, &ops)?;
                layer_us[ci] += row_us * count;
                println!(
                    "| {ty} | {} | {rows} x {cols} | {n} | {row_us:.1} | {:.1} | {:.0} | {:.1e} |",
                    what.trim(),
                    row_us / n as f64,
                    bytes / row_us / 1e3,
                    diff
                );
            }
        }
        layers.push((ty, layer_us));
        if matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1) {
            integer_batch_products(ctx, ty)?;
        }
    }
    println!("\n| type | tokens | one layer's products µs | 32 layers: ms per step | upper bound t/s (all sequences) |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (ty, layer_us) in layers {
        for (ci, &n) in COUNTS.iter().enumerate() {
            let step_ms = 32.0 * layer_us[ci] / 1e3;
            println!("| {ty} | {n} | {:.0} | {step_ms:.2} | {:.0} |", layer_us[ci], n as f64 / step_ms * 1e3);
        }
    }
    Ok(())
}

/// The few-token integer kernel's shapes [`batch_products`] times beside the context's own
/// (`mv-batch-kq` values: registers, then staged in workgroup memory).
const INTEGER_BATCH: [&str; 5] = ["2:16", "4:8", "2:16:1", "2:8:0:64", "4:4:0:64"];

/// [`batch_products`]' rows for the few-token integer kernel (matmul_kq_tok.wgsl, 8-bit
/// activations) on `ty` in GGUF block order: each shape of [`INTEGER_BATCH`] at 2, 4, 8 and 16
/// tokens (one group of that many tokens per workgroup), the difference from the tiled f32
/// kernel that of 8-bit activations (~1e-2 of the max |y|; ~1 or inf for a broken kernel). A
/// shape whose workgroup memory does not fit runs the blocks kernel (the row says so).
fn integer_batch_products(ctx: &GpuContext, ty: GgmlType) -> Result<()> {
    for &(rows, cols, what, epilogue, _) in &FUSED_LAYER {
        let set = BenchSet::with_tokens(ctx, ty, rows, cols, Some(false), epilogue, 16)?;
        let bytes = set.mats[0].gpu_bytes() as f64;
        let out_len = if epilogue.pairs() { rows / 2 } else { rows };
        for shape in INTEGER_BATCH {
            let kq = crate::gpu::matrix::KqTokens::parse(shape).expect("a valid shape");
            for n in [2usize, 4, 8, 16] {
                let cfg = MvConfig { nt: n as u32, wg: 64, nr: 2, unroll: 1, units: false, prefetch: true, subgroups: ctx.has_subgroups(), kq: Some(kq) };
                let ops = set.bind(ctx, Some((cfg, DecodeKernel::Blocks { prefetch: true })));
                set.set_tokens(ctx, n);
                let diff = set.against_tiled(ctx, &ops.0[0], n, rows, out_len)?;
                let (row_us, _, _) = set.time(ctx, &ops)?;
                let fits = if ops.0[0].uses_kq_tokens() { "" } else { ", did not fit: blocks kernel" };
                println!(
                    "| {ty} | {} integer kq {shape}{fits} | {rows} x {cols} | {n} | {row_us:.1} | {:.1} | {:.0} | {:.1e} |",
                    what.trim(),
                    row_us / n as f64,
                    bytes / row_us / 1e3,
                    diff
                );
            }
        }
    }
    Ok(())
}

/// Times the prefill (batched) products of one llama-7B layer (FUSED_LAYER) at `n` tokens for
/// each weight type, with the portable f32 tiled kernel and, where the adapter has cooperative
/// matrices, the f16 tensor-core one: each dispatch alone in its own timestamped pass (median of
/// 15 after a warm-up), TFLOPS as 2 rows cols n / time. The last column is what 32 such
/// layers' products alone would allow: an upper bound of a 7B model's prompt rate (attention,
/// norms and RoPE come on top). Where both kernels run, each product is also checked: the
/// cooperative-matrix kernel's results against the portable one's, the largest difference
/// relative to the largest |y|, which f16 inputs keep near 1e-3 (a broken kernel shows as ~1).
pub fn prefill_products(ctx: &GpuContext, n: usize) -> Result<()> {
    let mut kernels = vec![("tiled f32", Kernel::Tiled)];
    if ctx.has_coop_matrix() {
        kernels.push(("coop f16", Kernel::Coop));
    }
    println!("
prefill products at {n} tokens, median µs per dispatch alone (cooperative matrices: {})
", if ctx.has_coop_matrix() { "yes" } else { "no" });
    println!("| type | product | rows x cols | kernel | µs | TFLOPS | max diff / max abs, against tiled f32 |");
    println!("| --- | --- | --- | --- | ---: | ---: | ---: |");
    let reps = 15;
    let Some(mut timer) = PassTimer::new(ctx, reps) else {
        return Err("the adapter has no timestamp queries".into());
    };
    let mut layers = Vec::new();
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::F16] {
        let mut layer_us = vec![0.0; kernels.len()];
        for &(rows, cols, what, epilogue, count) in &FUSED_LAYER {
            let bytes = ty.bytes_for((rows * cols) as u64).unwrap();
            let mut raw = vec![0u8; bytes as usize];
            super::synth::fill(&mut raw, ty, cols as u64, 7);
            let m = GpuMatrix::upload(ctx, &Matrix::from_raw("prefill bench", rows, cols, ty, &raw))?;
            let xv: Vec<f32> = (0..n * cols).map(|i| ((i as u32).wrapping_mul(2654435761) >> 8) as f32 / (1u32 << 24) as f32 - 0.5).collect();
            let x = ctx.upload("x", bytemuck::cast_slice(&xv));
            let y = ctx.zeros("y", 4 * (n * rows) as u64);
            let step = ctx.uniform("step", bytemuck::bytes_of(&Step { n_tokens: n as u32, pos0: 0, n_kv: n as u32, _pad: 0 }));
            let op = m.bind_matmul_out(ctx, &x, &y, &step, &MatOut::with(epilogue));
            // One run of each kernel from zeros, read back for the comparison.
            let out_len = n * if epilogue.pairs() { rows / 2 } else { rows };
            let mut outs: Vec<Vec<f32>> = Vec::new();
            for &(_, kernel) in &kernels {
                ctx.queue.write_buffer(&y, 0, bytemuck::cast_slice(&vec![0f32; n * rows]));
                let mut enc = ctx.device.create_command_encoder(&Default::default());
                op.encode_with(&mut enc.begin_compute_pass(&Default::default()), n as u32, kernel);
                ctx.submit_and_wait(enc)?;
                outs.push(ctx.read(&y, out_len)?);
            }
            let diff = |o: &[f32]| {
                let max = outs[0].iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = o.iter().zip(&outs[0]).fold(0f32, |a, (p, q)| if (p - q).is_nan() { f32::INFINITY } else { a.max((p - q).abs()) });
                d / max.max(f32::MIN_POSITIVE)
            };
            for (ki, &(label, kernel)) in kernels.iter().enumerate() {
                let mut us = Vec::new();
                for _round in 0..2 {
                    let mut enc = ctx.device.create_command_encoder(&Default::default());
                    for _ in 0..reps {
                        op.encode_with(&mut timer.pass(&mut enc, "prefill product"), n as u32, kernel);
                    }
                    us = timer.finish(ctx, enc)?.into_iter().map(|t| t / 1e3).collect();
                }
                us.sort_by(f64::total_cmp);
                let med = us[us.len() / 2];
                layer_us[ki] += med * count;
                let check = if ki == 0 { "-".to_string() } else { format!("{:.1e}", diff(&outs[ki])) };
                println!("| {ty} | {} | {rows} x {cols} | {label} | {med:.1} | {:.1} | {check} |", what.trim(), 2.0 * (rows * cols * n) as f64 / med / 1e6);
            }
        }
        layers.push((ty, layer_us));
    }
    println!("
| type | kernel | one layer's products µs | 32 layers: pp{n} upper bound t/s |");
    println!("| --- | --- | ---: | ---: |");
    for (ty, layer_us) in layers {
        for (ki, &(label, _)) in kernels.iter().enumerate() {
            println!("| {ty} | {label} | {:.0} | {:.0} |", layer_us[ki], n as f64 / (32.0 * layer_us[ki] * 1e-6));
        }
    }
    Ok(())
}

/// The integer Q4_0 variants of the kernel table (`EMBER_MV_DEC` syntax: rows per step, steps
/// per workgroup, no prefetch, 8-bit activations): on an H200 the fastest with barriers
/// between dispatches (8 x 2 rows) and the fastest streaming (8 x 4).
const INTEGER_Q4_0: [&str; 2] = ["kq:8:2:0:1", "kq:8:4:0:1"];

/// The products of one llama-7B layer in the forward pass (rows, cols, label, epilogue, count):
/// q, k and v stacked, o with the residual add, gate and up interleaved with the activation,
/// down with the residual add.
const FUSED_LAYER: [(usize, usize, &str, Epilogue, f64); 4] = [
    (12288, 4096, " qkv", Epilogue::Store, 1.0),
    (4096, 4096, " o+add", Epilogue::Add, 1.0),
    (22016, 4096, " gate_up+silu", Epilogue::GatedPairs { act: crate::model::Activation::Silu }, 1.0),
    (4096, 11008, " down+add", Epilogue::Add, 1.0),
];

/// The decode variants of `EMBER_MV_SWEEP` (a list `kq:nr:rg:pf,wg:nr:ub:pf,...` as in
/// `EMBER_MV_DEC`, or any other value for a default grid), each timed back to back on every
/// type and shape (`EMBER_MV_SWEEP_TYPES`: a comma-separated subset of types).
fn sweep(ctx: &GpuContext) -> Result<()> {
    let spec = std::env::var("EMBER_MV_SWEEP").unwrap_or_default();
    let mut variants: Vec<String> = spec.split(',').filter(|v| parse_decode(v).is_some()).map(|v| v.trim().to_string()).collect();
    if variants.is_empty() {
        for pf in [0, 1] {
            for nr in [1, 2, 4, 8] {
                for rg in [1, 2, 4, 8] {
                    variants.push(format!("kq:{nr}:{rg}:{pf}"));
                }
            }
        }
        variants.extend(["32:2:1:1", "64:2:1:1", "64:2:1:0", "128:2:1:0", "256:2:1:0", "128:2:2:0"].map(String::from));
    }
    let types: Vec<String> = std::env::var("EMBER_MV_SWEEP_TYPES").map(|v| v.split(',').map(|t| t.trim().to_lowercase()).collect()).unwrap_or_default();
    let sg = ctx.has_subgroups();
    let mut best = Vec::new();
    for ty in [GgmlType::Q4_0, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_1, GgmlType::Q4_K, GgmlType::Q6_K] {
        if !types.is_empty() && !types.contains(&ty.name().to_lowercase()) {
            continue;
        }
        let mut score = vec![f64::INFINITY; variants.len()];
        let mut score_stream = vec![f64::INFINITY; variants.len()];
        // The acceptance's plain shapes (not scored), then a layer's products.
        let plain = [(11008, 4096, "", Epilogue::Store, 0.0), (4096, 11008, "", Epilogue::Store, 0.0)];
        for (si, &(rows, cols, what, epilogue, weight)) in plain.iter().chain(FUSED_LAYER.iter()).enumerate() {
            // Both word orders: the integer kernel reads GGUF order, the others the permuted one.
            let mut sets: [Option<BenchSet>; 2] = [None, None];
            let mut results = Vec::new();
            let mut bytes = 0.0;
            for (i, v) in variants.iter().enumerate() {
                let (kernel, (wg, nr, ub)) = parse_decode(v).unwrap();
                if wg > ctx.limits.max_compute_invocations_per_workgroup || (!matches!(kernel, DecodeKernel::Blocks { .. }) && matches!(ty, GgmlType::F16 | GgmlType::F32)) {
                    continue;
                }
                let gguf = matches!(kernel, DecodeKernel::Quantized { .. });
                if gguf && !matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K | GgmlType::Q6_K) {
                    continue;
                }
                if sets[gguf as usize].is_none() {
                    // One set at a time in memory.
                    sets = [None, None];
                    sets[gguf as usize] = Some(BenchSet::new(ctx, ty, rows, cols, Some(!gguf), epilogue)?);
                }
                let set = sets[gguf as usize].as_ref().unwrap();
                bytes = set.mats[0].gpu_bytes() as f64;
                let cfg = MvConfig { nt: 1, wg, nr, unroll: ub, units: false, prefetch: false, subgroups: sg, kq: None };
                let (row, stream, alone) = set.time(ctx, &set.bind(ctx, Some((cfg, kernel))))?;
                score[i] = if si == 0 { weight * row } else { score[i] + weight * row };
                score_stream[i] = if si == 0 { weight * stream } else { score_stream[i] + weight * stream };
                results.push((v.clone(), row, stream, alone));
            }
            results.sort_by(|a, b| a.1.total_cmp(&b.1));
            println!("\nsweep {}{what} {rows} x {cols} ({:.1} MiB), fastest first: µs back to back (GB/s), µs streaming (GB/s), µs alone", ty.name(), bytes / (1u64 << 20) as f64);
            for (name, row, stream, alone) in &results {
                println!("  {name:20} {row:8.2} ({:5.0}) {stream:8.2} ({:5.0}) {alone:8.2}", bytes / row / 1e3, bytes / stream / 1e3);
            }
        }
        let (i, _) = score.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).unwrap();
        println!("best {} over a 7B layer's shapes: {} ({:.1} µs per layer)", ty.name(), variants[i], score[i]);
        let (j, _) = score_stream.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).unwrap();
        println!("best {} streaming: {} ({:.1} µs per layer)", ty.name(), variants[j], score_stream[j]);
        best.push(format!("{}={}", ty.name(), variants[i]));
    }
    println!("EMBER_MV_DEC={}", best.join(","));
    Ok(())
}

/// Prints a per-kernel profile of one decode token at the session's current position.
/// Prints a decode token's profile (None: the adapter has no timestamp queries) taken at
/// position `pos`; `weights` gives each product's bytes for its bandwidth.
pub fn print_profile(profile: Option<Profile>, weights: &GpuWeights, pos: usize) {
    let Some(profile) = profile else {
        println!("(no timestamp queries on this adapter: no per-kernel profile)");
        return;
    };
    let wall = profile.wall_ns;
    if !profile.alone.is_empty() {
        print_profile_table(weights, &profile.alone, &format!("per-kernel time of one decode token at position {pos}, each dispatch in its own timed pass"), wall);
    }
    match &profile.in_pass {
        Some(in_pass) => print_profile_table(weights, in_pass, "the same token in one pass, as it runs (a dispatch's time includes the barrier before it)", wall),
        None => println!("\n(no timestamps inside passes on this adapter: no in-pass profile)"),
    }
}

fn print_profile_table(weights: &GpuWeights, times: &[(&str, f64)], title: &str, wall_ns: f64) {
    let mut by: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
    for (name, ns) in times {
        let e = by.entry(name).or_default();
        e.0 += 1;
        e.1 += ns;
    }
    let total: f64 = times.iter().map(|t| t.1).sum();
    let mut rows: Vec<_> = by.into_iter().collect();
    rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    println!("\n{title}:\n");
    println!("| kernel | dispatches | µs | share | GB/s |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (name, (n, ns)) in &rows {
        let bytes = weights.matmul_bytes(name);
        let gbps = if bytes > 0 { format!("{:.0}", bytes as f64 / ns) } else { "".into() };
        println!("| {name} | {n} | {:.1} | {:.1}% | {gbps} |", ns / 1e3, 100.0 * ns / total);
    }
    // Timestamps cost time themselves (each waits for the work before it), so these sums can
    // exceed the token's real time; the host clock is the unobserved figure.
    println!(
        "\nsum {:.1} µs per token; the same token run alone without timestamps (one submission, argmax read back) took {:.1} µs on the host clock",
        total / 1e3,
        wall_ns / 1e3
    );
}

