//! GPU measurements for `ember bench`: copy bandwidth (the ceiling), matrix-vector kernel
//! bandwidth over matrices larger than the L2 cache, and a per-kernel profile of one token.

use super::Result;
use crate::engine::GpuSession;
use crate::gguf::GgmlType;
use crate::gpu::matrix::GpuMatrix;
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
        let pipeline = ctx.pipeline("copy", crate::gpu::shaders::COPY, "main");
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
    pub rows: usize,
    pub cols: usize,
    pub bytes: u64,
    pub median_us: f64,
    pub gbps: f64,
}

/// Times the decode matvec for the shapes of the acceptance criteria, rotating over enough
/// matrices that together exceed the L2 cache several times, each dispatch in its own
/// timestamped pass; bandwidth = weight bytes / median time.
pub fn kernel_bandwidth(ctx: &GpuContext) -> Result<Vec<KernelRow>> {
    let mut rows_out = Vec::new();
    for ty in [GgmlType::Q4_0, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_1] {
        for (rows, cols) in [(11008usize, 4096usize), (4096, 11008)] {
            let bytes = ty.bytes_for((rows * cols) as u64).unwrap();
            let count = (400_000_000 / bytes).clamp(2, 16) as usize;
            let mut mats = Vec::new();
            for i in 0..count {
                let mut raw = vec![0u8; bytes as usize];
                super::synth::fill(&mut raw, ty, cols as u64, 1 + i as u64);
                mats.push(GpuMatrix::upload(ctx, &Matrix::from_raw("bench", rows, cols, ty, &raw))?);
            }
            let x = ctx.upload("x", bytemuck::cast_slice(&vec![0.01f32; cols]));
            let step = ctx.uniform("step", bytemuck::bytes_of(&Step { n_tokens: 1, pos0: 0, n_kv: 1, _pad: 0 }));
            let ys: Vec<_> = (0..count).map(|_| ctx.zeros("y", 4 * rows as u64)).collect();
            let ops: Vec<_> = mats.iter().zip(&ys).map(|(m, y)| m.bind_matmul(ctx, &x, y, &step)).collect();
            let reps = 64;
            let Some(mut timer) = PassTimer::new(ctx, reps as u32) else {
                return Err("the adapter has no timestamp queries".into());
            };
            // Warm-up, then the timed submission.
            for round in 0..2 {
                let mut enc = ctx.device.create_command_encoder(&Default::default());
                for r in 0..reps {
                    ops[r % count].encode(&mut timer.pass(&mut enc, "matvec"), 1);
                }
                let mut t = timer.finish(ctx, enc)?;
                if round == 1 {
                    t.sort_by(f64::total_cmp);
                    let median_ns = t[t.len() / 2];
                    let gpu_bytes = mats[0].gpu_bytes();
                    rows_out.push(KernelRow { ty, rows, cols, bytes: gpu_bytes, median_us: median_ns / 1e3, gbps: gpu_bytes as f64 / median_ns });
                }
            }
        }
    }
    Ok(rows_out)
}

/// Prints a per-kernel profile of one decode token at the session's current position.
pub fn print_profile(session: &mut GpuSession, token: u32) -> Result<()> {
    let Some((times, wall_ns)) = session.profile_decode(token)? else {
        println!("(no timestamp queries on this adapter: no per-kernel profile)");
        return Ok(());
    };
    let mut by: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
    for (name, ns) in &times {
        let e = by.entry(name).or_default();
        e.0 += 1;
        e.1 += ns;
    }
    let total: f64 = times.iter().map(|t| t.1).sum();
    let mut rows: Vec<_> = by.into_iter().collect();
    rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    println!("\nper-kernel time of one decode token at position {} (each dispatch in its own timed pass):\n", session_pos(session));
    println!("| kernel | dispatches | µs | share | GB/s |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (name, (n, ns)) in &rows {
        let bytes = session.weights.matmul_bytes(name);
        let gbps = if bytes > 0 { format!("{:.0}", bytes as f64 / ns) } else { "".into() };
        println!("| {name} | {n} | {:.1} | {:.1}% | {gbps} |", ns / 1e3, 100.0 * ns / total);
    }
    println!(
        "\nkernel time {:.1} µs per token; one-pass token on the host clock {:.1} µs: {:.1} µs ({:.0}%) go to dispatch, barriers, submission and readback",
        total / 1e3,
        wall_ns / 1e3,
        (wall_ns - total) / 1e3,
        100.0 * (wall_ns - total).max(0.0) / wall_ns
    );
    Ok(())
}

fn session_pos(s: &GpuSession) -> usize {
    crate::engine::Forward::n_past(s)
}
