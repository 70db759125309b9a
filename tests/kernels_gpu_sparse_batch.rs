//! The batched FFN over hot rows (ember::gpu::sparse::BatchFfnOp, the hybrid's prefill) against
//! a plain f64 reference over dequantised rows, on random inputs at awkward sizes (lavapipe in
//! CI): every weight type for gate/up and for down_t, hot subsets of random size (none and all
//! included), token counts across the 64-token tile, both activations, added into y, and
//! bit-for-bit determinism.

mod common;

use common::{gpu, matrix, Rng};
use ember::gguf::GgmlType;
use ember::gpu::sparse::{BatchFfnOp, HotFfn};
use ember::gpu::{GpuContext, Step};
use ember::model::Activation;

const TYPES: [GgmlType; 5] = [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1];

/// A random strictly ascending subset of 0..n_ff with `n` elements.
fn subset(n_ff: usize, n: usize, rng: &mut Rng) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..n_ff as u32).collect();
    for i in 0..n {
        let j = i + (rng.next_u64() % (n_ff - i) as u64) as usize;
        ids.swap(i, j);
    }
    let mut out = ids[..n].to_vec();
    out.sort_unstable();
    out
}

/// The gate's factor (dReLU's is ReLU's).
fn act64(act: Activation, g: f64) -> f64 {
    match act {
        Activation::Relu | Activation::Drelu => g.max(0.0),
        Activation::Silu => g / (1.0 + (-g).exp()),
        Activation::GeluTanh => unreachable!("no GPU kernel computes GeLU"),
    }
}

/// A neuron's hidden value: act(g) * u, or for dReLU relu(g) * relu(u).
fn gated64(act: Activation, g: f64, u: f64) -> f64 {
    match act {
        Activation::Drelu => g.max(0.0) * u.max(0.0),
        _ => act64(act, g) * u,
    }
}

/// Runs the op for `n` tokens of `x` added into `y0`, returns y.
fn run(ctx: &GpuContext, op: &BatchFfnOp, bufs: &(wgpu::Buffer, wgpu::Buffer, wgpu::Buffer, wgpu::Buffer), x: &[f32], y0: &[f32], n: usize) -> Vec<f32> {
    let (xb, _h, yb, step) = bufs;
    ctx.queue.write_buffer(xb, 0, bytemuck::cast_slice(x));
    ctx.queue.write_buffer(yb, 0, bytemuck::cast_slice(y0));
    ctx.queue.write_buffer(step, 0, bytemuck::bytes_of(&Step { n_tokens: n as u32, pos0: 0, n_kv: n as u32, _pad: 0 }));
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
        op.encode(&mut pass, n as u32);
    }
    ctx.submit_and_wait(enc).unwrap();
    ctx.read::<f32>(yb, y0.len()).unwrap()
}

#[test]
fn batch_ffn_matches_reference() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(0xba7c);
    // n_embd 96: a column tile (64) that the matrix does not fill; n_ff 77: rows past the last
    // 32-row tile.
    let (n_embd, n_ff) = (96usize, 77usize);
    let max_tokens = 70usize;
    let mut worst = 0.0f64;
    for (i, &ab) in TYPES.iter().enumerate() {
        for (j, &dt) in TYPES.iter().enumerate() {
            // Every gate/up type with every down_t type, but not every hot size for each.
            let gate = matrix(ab, n_ff, n_embd, &mut rng);
            let up = matrix(if (i + j) % 2 == 0 { ab } else { TYPES[(i + 1) % 5] }, n_ff, n_embd, &mut rng);
            let down_t = matrix(dt, n_ff, n_embd, &mut rng);
            let n_hot = match (i + j) % 4 {
                0 => n_ff,
                1 => 0,
                2 => 1 + (rng.next_u64() % (n_ff as u64 - 1)) as usize,
                _ => 33,
            };
            let ids = subset(n_ff, n_hot, &mut rng);
            let hot = HotFfn::upload(&ctx, &gate, &up, &down_t, &ids).unwrap();
            let act = [Activation::Silu, Activation::Relu, Activation::Drelu][(i + j) % 3];
            let bufs = (
                ctx.zeros("x", (max_tokens * n_embd * 4) as u64),
                ctx.zeros("h", (max_tokens * n_ff.max(1) * 4) as u64),
                ctx.zeros("y", (max_tokens * n_embd * 4) as u64),
                ctx.uniform("step", bytemuck::bytes_of(&Step::default())),
            );
            let op = BatchFfnOp::new(&ctx, &hot, &bufs.0, &bufs.1, &bufs.2, act, max_tokens, &bufs.3).unwrap();
            let deq = |m: &ember::model::Matrix| -> Vec<Vec<f32>> { (0..m.rows).map(|r| m.row_f32(r)).collect() };
            let (g, u, d) = (deq(&gate), deq(&up), deq(&down_t));
            for n in [1usize, 5, 65, 70] {
                let x = rng.vec(max_tokens * n_embd);
                let y0 = rng.vec(max_tokens * n_embd);
                let y = run(&ctx, &op, &bufs, &x, &y0, n);
                for t in 0..max_tokens {
                    let xt = &x[t * n_embd..(t + 1) * n_embd];
                    let mut want = vec![0.0f64; n_embd];
                    let mut scale = vec![0.0f64; n_embd];
                    if t < n {
                        for &r in &ids {
                            let (r, xs) = (r as usize, xt.iter().map(|&v| v as f64));
                            let gv: f64 = g[r].iter().zip(xs.clone()).map(|(&a, b)| a as f64 * b).sum();
                            let uv: f64 = u[r].iter().zip(xs).map(|(&a, b)| a as f64 * b).sum();
                            let hv = gated64(act, gv, uv);
                            for c in 0..n_embd {
                                want[c] += hv * d[r][c] as f64;
                                scale[c] += (hv * d[r][c] as f64).abs();
                            }
                        }
                    }
                    for c in 0..n_embd {
                        let got = y[t * n_embd + c];
                        let y0v = y0[t * n_embd + c];
                        if t >= n || ids.is_empty() {
                            // Tokens past the batch and an FFN with no hot rows: untouched.
                            assert_eq!(got.to_bits(), y0v.to_bits(), "{ab:?}/{dt:?} n {n} token {t} col {c}: changed");
                            continue;
                        }
                        let w = want[c] + y0v as f64;
                        let err = (got as f64 - w).abs() / (scale[c] + (y0v as f64).abs()).max(1e-30);
                        assert!(err < 1e-4, "{ab:?}/{dt:?} {act:?} hot {n_hot} n {n} token {t} col {c}: got {got}, want {w} (relative {err:e})");
                        worst = worst.max(err);
                    }
                }
                // The same bits run after run.
                let again = run(&ctx, &op, &bufs, &x, &y0, n);
                assert!(again.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()), "{ab:?}/{dt:?} n {n}: not deterministic");
            }
        }
    }
    eprintln!("batch FFN: worst relative error {worst:e}");
}

/// The streamed rows' plain product (`RowsOp`, the `rows` entry): rows packed by `pack_rows`
/// from the middle of a matrix, every weight type, written at a stride and offset into an
/// output whose other values stay untouched, token counts across the 64-token tile, rows past
/// a 32-row tile, and a second setting of the same op (the next chunk).
#[test]
fn streamed_rows_match_reference() {
    use ember::gpu::sparse::{pack_rows, row_parts, RowsOp};
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(0x5eed);
    let (cols, n_rows, max_tokens, stride) = (96usize, 77usize, 70usize, 101usize);
    let mut worst = 0.0f64;
    for &ty in &TYPES {
        let m = matrix(ty, n_rows, cols, &mut rng);
        let capacity = 40usize;
        let (qb, sb) = row_parts(ty, cols);
        let quants = ctx.zeros("q", (capacity * qb) as u64);
        let scales = ctx.zeros("s", (capacity * sb).max(4) as u64);
        let x = ctx.zeros("x", (max_tokens * cols * 4) as u64);
        let y = ctx.zeros("y", (max_tokens * stride * 4) as u64);
        let step = ctx.uniform("step", bytemuck::bytes_of(&Step::default()));
        let mut op = RowsOp::new(&ctx, ty, cols, capacity, &quants, &scales, &x, &y, max_tokens, &step).unwrap();
        let deq: Vec<Vec<f32>> = (0..n_rows).map(|r| m.row_f32(r)).collect();
        // Two chunks of the matrix: rows 3..40 (37) at offset 0, then 40..77 (37) at 37 + 5.
        for (first, count, offset, n) in [(3usize, 37usize, 0usize, 70usize), (40, 37, 42, 5), (40, 37, 42, 65), (3, 1, 100, 1)] {
            let ids: Vec<u32> = (first as u32..(first + count) as u32).collect();
            let (mut q, mut s) = (vec![0u8; count * qb], vec![0u8; count * sb]);
            pack_rows(&m, &ids, &mut q, &mut s);
            q.resize(q.len().next_multiple_of(4), 0);
            s.resize(s.len().next_multiple_of(4), 0);
            ctx.write(&quants, 0, &q);
            if !s.is_empty() {
                ctx.write(&scales, 0, &s);
            }
            let xv = rng.vec(max_tokens * cols);
            let y0 = rng.vec(max_tokens * stride);
            ctx.queue.write_buffer(&x, 0, bytemuck::cast_slice(&xv));
            ctx.queue.write_buffer(&y, 0, bytemuck::cast_slice(&y0));
            ctx.queue.write_buffer(&step, 0, bytemuck::bytes_of(&Step { n_tokens: n as u32, pos0: 0, n_kv: n as u32, _pad: 0 }));
            op.set(&ctx.queue, count, stride, offset, n).unwrap();
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
                op.encode(&mut pass, n as u32);
            }
            ctx.submit_and_wait(enc).unwrap();
            let got = ctx.read::<f32>(&y, max_tokens * stride).unwrap();
            for t in 0..max_tokens {
                for c in 0..stride {
                    let (g, y0v) = (got[t * stride + c], y0[t * stride + c]);
                    if t >= n || c < offset || c >= offset + count {
                        assert_eq!(g.to_bits(), y0v.to_bits(), "{ty:?} n {n} token {t} value {c}: changed");
                        continue;
                    }
                    let row = &deq[first + c - offset];
                    let xt = &xv[t * cols..(t + 1) * cols];
                    let want: f64 = row.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let scale: f64 = row.iter().zip(xt).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                    let err = (g as f64 - want).abs() / scale.max(1e-30);
                    assert!(err < 1e-5, "{ty:?} n {n} token {t} row {}: got {g}, want {want} ({err:e})", first + c - offset);
                    worst = worst.max(err);
                }
            }
        }
        // A setting whose writes would leave the output is refused.
        assert!(op.set(&ctx.queue, 30, stride, 90, max_tokens).is_err());
        assert!(op.set(&ctx.queue, capacity + 1, stride, 0, 1).is_err());
    }
    eprintln!("streamed rows: worst relative error {worst:e}");
}

/// The grouped types (5-bit and K-quants, src/gpu/kquant.rs's layout) as gate and up, with a
/// Q8_0 down_t (ember's transposes) or one of their own (gathered as F16), against the f64
/// reference over the dequantised rows.
#[test]
fn batch_ffn_grouped_types_match_reference() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(0x6b);
    let (n_embd, n_ff, max_tokens) = (512usize, 77usize, 40usize);
    let grouped = [GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K];
    for (i, &ty) in grouped.iter().enumerate() {
        let gate = matrix(ty, n_ff, n_embd, &mut rng);
        let up = matrix(grouped[(i + 1) % 5], n_ff, n_embd, &mut rng);
        let down_t = matrix(if i % 2 == 0 { GgmlType::Q8_0 } else { ty }, n_ff, n_embd, &mut rng);
        let ids = subset(n_ff, if i % 2 == 0 { n_ff } else { 33 }, &mut rng);
        let hot = HotFfn::upload(&ctx, &gate, &up, &down_t, &ids).unwrap();
        let act = [Activation::Silu, Activation::Relu, Activation::Drelu][i % 3];
        let bufs = (
            ctx.zeros("x", (max_tokens * n_embd * 4) as u64),
            ctx.zeros("h", (max_tokens * n_ff * 4) as u64),
            ctx.zeros("y", (max_tokens * n_embd * 4) as u64),
            ctx.uniform("step", bytemuck::bytes_of(&Step::default())),
        );
        let op = BatchFfnOp::new(&ctx, &hot, &bufs.0, &bufs.1, &bufs.2, act, max_tokens, &bufs.3).unwrap();
        let deq = |m: &ember::model::Matrix| -> Vec<Vec<f32>> { (0..m.rows).map(|r| m.row_f32(r)).collect() };
        let (g, u, d) = (deq(&gate), deq(&up), deq(&down_t));
        for n in [1usize, 37] {
            let x = rng.vec(max_tokens * n_embd);
            let y0 = rng.vec(max_tokens * n_embd);
            let y = run(&ctx, &op, &bufs, &x, &y0, n);
            for t in 0..n {
                let xt = &x[t * n_embd..(t + 1) * n_embd];
                let mut want = vec![0.0f64; n_embd];
                let mut scale = vec![0.0f64; n_embd];
                for &r in &ids {
                    let r = r as usize;
                    let gv: f64 = g[r].iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let uv: f64 = u[r].iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let hv = gated64(act, gv, uv);
                    for c in 0..n_embd {
                        want[c] += hv * d[r][c] as f64;
                        scale[c] += (hv * d[r][c] as f64).abs();
                    }
                }
                for c in 0..n_embd {
                    let (got, y0v) = (y[t * n_embd + c], y0[t * n_embd + c] as f64);
                    let err = (got as f64 - (want[c] + y0v)).abs() / (scale[c] + y0v.abs()).max(1e-30);
                    // A grouped down_t is held as F16 (its values rounded to 11 bits).
                    let tol = if down_t.ty == GgmlType::Q8_0 { 1e-4 } else { 2e-3 };
                    assert!(err < tol, "{ty:?} gate, {:?} down_t, {act:?}, n {n} token {t} col {c}: got {got}, want {} (relative {err:e})", down_t.ty, want[c] + y0v);
                }
            }
        }
    }
}
