//! The forward pass's GPU ops (ember::gpu::ops) against the CPU backend on random inputs at
//! awkward sizes (lavapipe in CI). Each op is built once per buffer set and encoded for several
//! `n_tokens` / positions through the shared Step uniform, as the forward pass uses them.

mod common;

use common::{gpu, Rng};
use ember::cpu::ops::{argmax, gated_activation, rms_norm, Rope};
use ember::engine::sampler::{uniform, SampleRule};
use ember::engine::SamplerConfig;
use ember::gpu::ops::{AddOp, ArgmaxOp, AttentionOp, AttnShape, GatedActOp, GpuKvCache, HeadNormOp, RmsNormOp, RopeKvOp, RopeKvRowsOp, RopeShape, SampleOp, SampleParams, TopKOp};
use ember::gpu::{GpuContext, Step};
use ember::model::{Activation, RopeStyle};
use half::f16;
use wgpu::{Buffer, ComputePass};

fn step_buffer(ctx: &GpuContext) -> Buffer {
    ctx.uniform("step", bytemuck::bytes_of(&Step::default()))
}

/// Writes the step uniform and runs what `f` encodes in one compute pass.
fn run(ctx: &GpuContext, step: &Buffer, n_tokens: u32, pos0: u32, f: impl FnOnce(&mut ComputePass<'_>)) {
    let s = Step { n_tokens, pos0, n_kv: pos0 + n_tokens, _pad: 0 };
    ctx.queue.write_buffer(step, 0, bytemuck::bytes_of(&s));
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
        f(&mut pass);
    }
    ctx.submit_and_wait(enc).unwrap();
}

/// Largest |got - want| / (|want| + floor) and its index; panics past `tol`.
fn assert_close(got: &[f32], want: &[f32], tol: f32, floor: f32, what: &str) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = (0.0f32, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = (g - w).abs() / (w.abs() + floor);
        let e = if e.is_nan() { f32::INFINITY } else { e };
        if e > worst.0 {
            worst = (e, i);
        }
    }
    let i = worst.1;
    assert!(worst.0 <= tol, "{what}: element {i}: got {} want {} (error {:e} > {tol:e})", got[i], want[i], worst.0);
    worst.0
}

fn upload_f32(ctx: &GpuContext, label: &str, x: &[f32]) -> Buffer {
    ctx.upload(label, bytemuck::cast_slice(x))
}

/// qwen3's per-head norm, in place on a range that starts inside its buffer (as k's range of
/// the qkv buffer does), at odd head sizes and counts; heads of tokens past n_tokens and the
/// values around the range stay as they were.
#[test]
fn head_norm_matches_cpu() {
    let Some(ctx) = gpu() else { return };
    let step = step_buffer(&ctx);
    let mut rng = Rng(23);
    let max_tokens = 9;
    for (head_dim, n_heads) in [(32usize, 3usize), (134, 5), (256, 2), (7 * 2, 1)] {
        let w: Vec<f32> = rng.vec(head_dim).iter().map(|v| 1.0 + 0.5 * v).collect();
        let wb = upload_f32(&ctx, "w", &w);
        let len = max_tokens * n_heads * head_dim;
        // 64 floats (256 bytes, the storage offset alignment) before the range, 64 after.
        let x: Vec<f32> = rng.vec(64 + len + 64).iter().map(|v| 3.0 * v).collect();
        for n in [1usize, 4, 9] {
            let xb = upload_f32(&ctx, "x", &x);
            let op = HeadNormOp::new(&ctx, xb.slice(256..256 + 4 * len as u64), &wb, head_dim as u32, n_heads as u32, 1e-6, &step);
            run(&ctx, &step, n as u32, 0, |p| op.encode(p, n as u32));
            let got: Vec<f32> = ctx.read(&xb, x.len()).unwrap();
            let mut want = x.clone();
            ember::cpu::ops::rms_norm_in_place(&mut want[64..64 + n * n_heads * head_dim], &w, 1e-6);
            assert_close(&got, &want, 1e-5, 1e-6, &format!("head norm {head_dim} x {n_heads}, n {n}"));
            assert_eq!(&got[64 + n * n_heads * head_dim..], &x[64 + n * n_heads * head_dim..], "past n_tokens or the range");
            assert_eq!(&got[..64], &x[..64], "before the range");
        }
    }
}

#[test]
fn rms_norm_matches_cpu() {
    let Some(ctx) = gpu() else { return };
    let step = step_buffer(&ctx);
    let mut rng = Rng(21);
    let max_tokens = 33;
    for dim in [67usize * 3, 576, 1000, 4099] {
        let x = rng.vec(max_tokens * dim).iter().map(|v| v * 3.0).collect::<Vec<_>>();
        let w = rng.vec(dim);
        let (xb, wb) = (upload_f32(&ctx, "x", &x), upload_f32(&ctx, "w", &w));
        let ob = ctx.zeros("out", (max_tokens * dim * 4) as u64);
        let eps = 1e-5;
        let op = RmsNormOp::new(&ctx, &xb, &wb, &ob, dim as u32, eps, &step);
        for n in [1usize, 5, 33] {
            run(&ctx, &step, n as u32, 0, |p| op.encode(p, n as u32));
            let got: Vec<f32> = ctx.read(&ob, max_tokens * dim).unwrap();
            let mut want = vec![0.0; n * dim];
            rms_norm(&x[..n * dim], &w, eps, &mut want);
            assert_close(&got[..n * dim], &want, 1e-5, 1e-6, &format!("rms_norm dim {dim} n {n}"));
        }
        // A fresh output buffer: rows past n_tokens stay untouched.
        let ob2 = ctx.zeros("out2", (max_tokens * dim * 4) as u64);
        let op2 = RmsNormOp::new(&ctx, &xb, &wb, &ob2, dim as u32, eps, &step);
        run(&ctx, &step, 5, 0, |p| op2.encode(p, 5));
        let got: Vec<f32> = ctx.read(&ob2, max_tokens * dim).unwrap();
        assert!(got[5 * dim..].iter().all(|&v| v == 0.0), "rms_norm wrote past n_tokens");
    }
}

#[test]
fn gated_activation_and_add_match_cpu() {
    let Some(ctx) = gpu() else { return };
    let step = step_buffer(&ctx);
    let mut rng = Rng(22);
    let max_tokens = 33;
    for dim in [67usize * 5, 1536] {
        let gate: Vec<f32> = rng.vec(max_tokens * dim).iter().map(|v| v * 12.0).collect();
        let up = rng.vec(max_tokens * dim);
        for act in [Activation::Silu, Activation::Relu, Activation::Drelu] {
            for n in [1usize, 5, 33] {
                let gb = upload_f32(&ctx, "gate", &gate);
                let ub = upload_f32(&ctx, "up", &up);
                let op = GatedActOp::new(&ctx, &gb, &ub, dim as u32, act, &step);
                run(&ctx, &step, n as u32, 3, |p| op.encode(p, n as u32));
                let got: Vec<f32> = ctx.read(&gb, max_tokens * dim).unwrap();
                let mut want = gate.clone();
                for t in 0..n {
                    gated_activation(act, &mut want[t * dim..(t + 1) * dim], &up[t * dim..(t + 1) * dim]);
                }
                assert_close(&got, &want, 1e-5, 1e-6, &format!("gated act {act:?} dim {dim} n {n}"));
            }
        }
        // x += y; the sums are exact in f32, so equal to the bit; rows past n_tokens untouched.
        let x = rng.vec(max_tokens * dim);
        let y = rng.vec(max_tokens * dim);
        for n in [1usize, 5, 33] {
            let xb = upload_f32(&ctx, "x", &x);
            let yb = upload_f32(&ctx, "y", &y);
            let op = AddOp::new(&ctx, &xb, &yb, dim as u32, &step);
            run(&ctx, &step, n as u32, 0, |p| op.encode(p, n as u32));
            let got: Vec<f32> = ctx.read(&xb, max_tokens * dim).unwrap();
            let want: Vec<f32> = x.iter().zip(&y).enumerate().map(|(i, (a, b))| if i < n * dim { a + b } else { *a }).collect();
            assert_eq!(got, want, "add dim {dim} n {n}");
        }
    }
}

struct RopeCase {
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    rope_dim: usize,
    neox: bool,
}

fn f16_bits(x: &[u32]) -> Vec<f32> {
    x.iter().flat_map(|&w| [f16::from_bits(w as u16).to_f32(), f16::from_bits((w >> 16) as u16).to_f32()]).collect()
}

#[test]
fn rope_and_kv_write_match_cpu() {
    let Some(ctx) = gpu() else { return };
    let step = step_buffer(&ctx);
    let mut rng = Rng(23);
    let cases = [
        RopeCase { n_head: 6, n_head_kv: 2, head_dim: 64, rope_dim: 64, neox: false },
        RopeCase { n_head: 6, n_head_kv: 2, head_dim: 64, rope_dim: 64, neox: true },
        RopeCase { n_head: 9, n_head_kv: 3, head_dim: 40, rope_dim: 40, neox: false },
        RopeCase { n_head: 9, n_head_kv: 3, head_dim: 40, rope_dim: 40, neox: true },
        RopeCase { n_head: 4, n_head_kv: 4, head_dim: 64, rope_dim: 36, neox: false },
        RopeCase { n_head: 4, n_head_kv: 4, head_dim: 64, rope_dim: 36, neox: true },
    ];
    let n_ctx = 32768;
    let max_tokens = 33;
    let mut worst_q = 0.0f32;
    for c in &cases {
        let (q_dim, kv_dim) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
        let (base, freq_scale) = (10000.0, if c.neox { 1.0 } else { 0.5 });
        let style = if c.neox { RopeStyle::Halves } else { RopeStyle::Adjacent };
        let rope = Rope::new(c.rope_dim, base, freq_scale, style);
        let shape = RopeShape { n_head: c.n_head as u32, n_head_kv: c.n_head_kv as u32, head_dim: c.head_dim as u32, rope_dim: c.rope_dim as u32, base, freq_scale, neox: c.neox };
        let cache = GpuKvCache::new(&ctx, 1, n_ctx, kv_dim).unwrap();
        assert_eq!(cache.gpu_bytes(), 2 * (n_ctx * kv_dim * 2) as u64);
        for (n, pos0) in [(5usize, 0usize), (1, 17), (33, 17), (2, 1050), (3, 20000), (1, 32767)] {
            let q = rng.vec(max_tokens * q_dim);
            let k = rng.vec(max_tokens * kv_dim);
            let v = rng.vec(max_tokens * kv_dim);
            let (qb, kb, vb) = (upload_f32(&ctx, "q", &q), upload_f32(&ctx, "k", &k), upload_f32(&ctx, "v", &v));
            let op = RopeKvOp::new(&ctx, &qb, &kb, &vb, cache.k(0), cache.v(0), shape, &step);
            run(&ctx, &step, n as u32, pos0 as u32, |p| op.encode(p, n as u32));
            let got_q: Vec<f32> = ctx.read(&qb, max_tokens * q_dim).unwrap();
            let got_k: Vec<f32> = ctx.read(&kb, max_tokens * kv_dim).unwrap();
            let ck = f16_bits(&ctx.read::<u32>(cache.k(0), n_ctx * kv_dim / 2).unwrap());
            let cv = f16_bits(&ctx.read::<u32>(cache.v(0), n_ctx * kv_dim / 2).unwrap());
            let (mut want_q, mut want_k) = (q.clone(), k.clone());
            for t in 0..n {
                let angles = rope.angles(pos0 + t);
                rope.apply(&mut want_q[t * q_dim..(t + 1) * q_dim], c.head_dim, &angles);
                rope.apply(&mut want_k[t * kv_dim..(t + 1) * kv_dim], c.head_dim, &angles);
            }
            let what = format!("rope neox={} hd {} rope_dim {} n {n} pos0 {pos0}", c.neox, c.head_dim, c.rope_dim);
            worst_q = worst_q.max(assert_close(&got_q, &want_q, 2e-6, 1.0, &format!("{what}: q")));
            assert_eq!(got_k, k, "{what}: k changed");
            let span = pos0 * kv_dim..(pos0 + n) * kv_dim;
            // The rotated keys as f16: half an f16 ulp of rounding plus the rotation's own error
            // (as for q, absolute: it is the sum of two products of O(1) values).
            for (i, (&g, &w)) in ck[span.clone()].iter().zip(&want_k[..n * kv_dim]).enumerate() {
                assert!((g - w).abs() <= w.abs() / 2048.0 + 2e-6, "{what}: cached k {i}: got {g} want {w}");
            }
            let want_v: Vec<f32> = v[..n * kv_dim].iter().map(|&x| f16::from_f32(x).to_f32()).collect();
            assert_eq!(&cv[span], &want_v[..], "{what}: cached v");
        }
    }
    eprintln!("rope: max |gpu - cpu| / (|cpu| + 1) on q: {worst_q:e}");
    // Positions outside the batch stay as they were (zero in a fresh cache).
    let cache = GpuKvCache::new(&ctx, 2, 64, 16).unwrap();
    let (qb, kb, vb) = (upload_f32(&ctx, "q", &rng.vec(3 * 32)), upload_f32(&ctx, "k", &rng.vec(3 * 16)), upload_f32(&ctx, "v", &rng.vec(3 * 16)));
    let shape = RopeShape { n_head: 4, n_head_kv: 2, head_dim: 8, rope_dim: 8, base: 10000.0, freq_scale: 1.0, neox: false };
    let op = RopeKvOp::new(&ctx, &qb, &kb, &vb, cache.k(1), cache.v(1), shape, &step);
    run(&ctx, &step, 3, 10, |p| op.encode(p, 3));
    for buf in [cache.k(1), cache.v(1)] {
        let words: Vec<u32> = ctx.read(buf, 64 * 8).unwrap();
        for (i, &w) in words.iter().enumerate() {
            assert_eq!(w != 0, (10 * 8..13 * 8).contains(&i), "word {i}");
        }
    }
    assert!(ctx.read::<u32>(cache.k(0), 64 * 8).unwrap().iter().all(|&w| w == 0), "layer 0 written");
}

#[test]
fn kv_cache_refuses_a_layer_over_the_binding_limit() {
    let Some(ctx) = gpu() else { return };
    let kv_dim = 1024;
    let n_ctx = (ctx.max_binding() / (kv_dim as u64 * 2)) as usize + 1;
    assert!(matches!(GpuKvCache::new(&ctx, 1, n_ctx, kv_dim), Err(ember::gpu::GpuError::Unsupported(_))));
}

/// f64 attention over the f16 cache with q rounded to f16: the exact answer the GPU
/// approximates (the CPU backend additionally rounds its accumulator to f16).
#[allow(clippy::too_many_arguments)]
fn attention_f64(q: &[f32], k: &[f16], v: &[f16], pos0: usize, n_tokens: usize, n_head: usize, n_head_kv: usize, hd: usize) -> Vec<f32> {
    let (q_dim, kv_dim, group) = (n_head * hd, n_head_kv * hd, n_head / n_head_kv);
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0.0f32; n_tokens * q_dim];
    for t in 0..n_tokens {
        for h in 0..n_head {
            let kvh = h / group;
            let qh: Vec<f64> = q[t * q_dim + h * hd..][..hd].iter().map(|&x| f16::from_f32(x).to_f64()).collect();
            let scores: Vec<f64> = (0..=pos0 + t).map(|p| k[p * kv_dim + kvh * hd..][..hd].iter().zip(&qh).map(|(a, b)| a.to_f64() * b).sum::<f64>() * scale).collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let sum: f64 = w.iter().sum();
            for d in 0..hd {
                let o: f64 = w.iter().enumerate().map(|(p, wp)| wp * v[p * kv_dim + kvh * hd + d].to_f64()).sum();
                out[t * q_dim + h * hd + d] = (o / sum) as f32;
            }
        }
    }
    out
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn attention_matches_cpu() {
    let Some(ctx) = gpu() else { return };
    let step = step_buffer(&ctx);
    let mut rng = Rng(24);
    let max_tokens = 33usize;
    // (n_head, n_head_kv, head_dim, n_ctx, [(n_tokens, pos0)])
    type Case = (usize, usize, usize, usize, &'static [(usize, usize)]);
    let cases: &[Case] = &[
        (6, 2, 64, 1024, &[(1, 0), (1, 64), (1, 999), (5, 0), (33, 17), (2, 990), (1, 255), (1, 190)]),
        (9, 3, 40, 4096, &[(1, 2999), (1, 130), (33, 0), (5, 17)]),
        (4, 4, 128, 300, &[(1, 299), (17, 40)]),
        // GQA groups of 8 (one decode workgroup for all 8 heads) and of 10 (two of 5).
        (16, 2, 64, 1024, &[(1, 700), (9, 100), (1, 77)]),
        (20, 2, 32, 512, &[(1, 511), (3, 200)]),
    ];
    let mut worst_cpu = 0.0f32;
    let mut worst_exact = 0.0f32;
    for &(n_head, n_head_kv, hd, n_ctx, runs) in cases {
        let (q_dim, kv_dim) = (n_head * hd, n_head_kv * hd);
        // The whole cache random (also past n_kv: stale entries must be masked out).
        let k: Vec<f16> = rng.vec(n_ctx * kv_dim).iter().map(|&x| f16::from_f32(x)).collect();
        let v: Vec<f16> = rng.vec(n_ctx * kv_dim).iter().map(|&x| f16::from_f32(x)).collect();
        let kb = ctx.upload("k", bytemuck::cast_slice(&k));
        let vb = ctx.upload("v", bytemuck::cast_slice(&v));
        // Larger q for peaked softmaxes.
        let q: Vec<f32> = rng.vec(max_tokens * q_dim).iter().map(|x| x * 4.0).collect();
        let qb = upload_f32(&ctx, "q", &q);
        let ob = ctx.zeros("out", (max_tokens * q_dim * 4) as u64);
        let shape = AttnShape { n_head: n_head as u32, n_head_kv: n_head_kv as u32, head_dim: hd as u32 };
        let op = AttentionOp::new(&ctx, &qb, &kb, &vb, &ob, shape, n_ctx as u32, max_tokens as u32, &step).unwrap();
        // Decode steps both ways: split and combined, and (told the key count, up to
        // SINGLE_PASS_MAX_KEYS) in one pass.
        for (&(n, pos0), hint) in runs.iter().flat_map(|r| [(r, None), (r, Some((r.1 + r.0) as u32))]) {
            op.set_n_kv(hint);
            ctx.queue.write_buffer(&ob, 0, bytemuck::cast_slice(&vec![f32::NAN; max_tokens * q_dim]));
            run(&ctx, &step, n as u32, pos0 as u32, |p| op.encode(p, n as u32));
            let got: Vec<f32> = ctx.read(&ob, n * q_dim).unwrap();
            let mut want = vec![0.0; n * q_dim];
            let cpu_shape = ember::cpu::attention::AttnShape { n_head, n_head_kv, head_dim: hd };
            ember::cpu::attention(&q[..n * q_dim], &k, &v, pos0, n, cpu_shape, &mut want);
            let exact = attention_f64(&q, &k, &v, pos0, n, n_head, n_head_kv, hd);
            let what = format!("attention {n_head}/{n_head_kv}x{hd} n {n} pos0 {pos0} (chunks {}, key count told: {hint:?})", op.n_chunks());
            let (e_cpu, e_exact) = (max_abs_diff(&got, &want), max_abs_diff(&got, &exact));
            // The GPU accumulates in f32 and lands within ~5e-7 of the exact answer; the CPU
            // rounds its accumulator to f16 after every key (as llama.cpp) and is itself up to
            // ~2e-3 from it here, hence the looser bound against the CPU.
            assert!(e_exact <= 2e-5, "{what}: differs from the exact f64 answer by {e_exact:e}");
            assert!(e_cpu <= 4e-3, "{what}: differs from the CPU by {e_cpu:e} (the CPU from the exact answer by {:e})", max_abs_diff(&want, &exact));
            worst_cpu = worst_cpu.max(e_cpu);
            worst_exact = worst_exact.max(e_exact);
        }
    }
    eprintln!("attention: max |gpu - cpu| {worst_cpu:e}, max |gpu - f64| {worst_exact:e}");
}

/// A prompt of over 1000 tokens in one batch (the prefill kernel's query tiles and key tiles
/// many times over, an odd count so the last of each is partial), GQA, after a few cached
/// positions: against the exact f64 answer and the CPU.
#[test]
fn attention_long_prompt_matches_cpu() {
    let Some(ctx) = gpu() else { return };
    let step = step_buffer(&ctx);
    let mut rng = Rng(0x10_37);
    let (n_head, n_head_kv, hd, n_ctx) = (6usize, 2usize, 64usize, 1100usize);
    let (n, pos0) = (1037usize, 7usize);
    let (q_dim, kv_dim) = (n_head * hd, n_head_kv * hd);
    let k: Vec<f16> = rng.vec(n_ctx * kv_dim).iter().map(|&x| f16::from_f32(x)).collect();
    let v: Vec<f16> = rng.vec(n_ctx * kv_dim).iter().map(|&x| f16::from_f32(x)).collect();
    let kb = ctx.upload("k", bytemuck::cast_slice(&k));
    let vb = ctx.upload("v", bytemuck::cast_slice(&v));
    let q: Vec<f32> = rng.vec(n * q_dim).iter().map(|x| x * 4.0).collect();
    let qb = upload_f32(&ctx, "q", &q);
    let ob = ctx.zeros("out", (n * q_dim * 4) as u64);
    let shape = AttnShape { n_head: n_head as u32, n_head_kv: n_head_kv as u32, head_dim: hd as u32 };
    let op = AttentionOp::new(&ctx, &qb, &kb, &vb, &ob, shape, n_ctx as u32, n as u32, &step).unwrap();
    ctx.queue.write_buffer(&ob, 0, bytemuck::cast_slice(&vec![f32::NAN; n * q_dim]));
    run(&ctx, &step, n as u32, pos0 as u32, |p| op.encode(p, n as u32));
    let got: Vec<f32> = ctx.read(&ob, n * q_dim).unwrap();
    let mut want = vec![0.0; n * q_dim];
    ember::cpu::attention(&q, &k, &v, pos0, n, ember::cpu::attention::AttnShape { n_head, n_head_kv, head_dim: hd }, &mut want);
    let exact = attention_f64(&q, &k, &v, pos0, n, n_head, n_head_kv, hd);
    let (e_cpu, e_exact) = (max_abs_diff(&got, &want), max_abs_diff(&got, &exact));
    assert!(e_exact <= 2e-5, "attention over a {n}-token prompt: differs from the exact f64 answer by {e_exact:e}");
    assert!(e_cpu <= 4e-3, "attention over a {n}-token prompt: differs from the CPU by {e_cpu:e}");
    // Deterministic: the same bits again.
    run(&ctx, &step, n as u32, pos0 as u32, |p| op.encode(p, n as u32));
    let again: Vec<f32> = ctx.read(&ob, n * q_dim).unwrap();
    assert!(got.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()), "attention over a {n}-token prompt: a second run differs");
    eprintln!("attention, {n}-token prompt: max |gpu - cpu| {e_cpu:e}, max |gpu - f64| {e_exact:e}");
}

#[test]
fn attention_refuses_unsupported_shapes() {
    let Some(ctx) = gpu() else { return };
    let step = step_buffer(&ctx);
    let b = ctx.zeros("b", 1 << 20);
    let c = ctx.zeros("c", 1 << 20);
    let o = ctx.zeros("o", 1 << 20);
    let q = ctx.zeros("q", 1 << 20);
    for (n_head, n_head_kv, hd) in [(4, 4, 36), (6, 4, 64)] {
        let shape = AttnShape { n_head, n_head_kv, head_dim: hd };
        assert!(AttentionOp::new(&ctx, &q, &b, &c, &o, shape, 16, 4, &step).is_err(), "{n_head}/{n_head_kv}x{hd}");
    }
}

/// Prefill then decode through RoPE + cache write + attention, as the forward pass chains them,
/// against the CPU's Rope, KvCache and attention.
#[test]
fn rope_cache_attention_chain_matches_cpu() {
    let Some(ctx) = gpu() else { return };
    let step = step_buffer(&ctx);
    let mut rng = Rng(25);
    let (n_head, n_head_kv, hd, n_ctx, max_tokens) = (9usize, 3usize, 64usize, 600usize, 40usize);
    let (q_dim, kv_dim) = (n_head * hd, n_head_kv * hd);
    for neox in [false, true] {
        let style = if neox { RopeStyle::Halves } else { RopeStyle::Adjacent };
        let rope = Rope::new(hd, 10000.0, 1.0, style);
        let mut cpu_cache = ember::cpu::KvCache::new(1, n_ctx, kv_dim);
        let cache = GpuKvCache::new(&ctx, 1, n_ctx, kv_dim).unwrap();
        let qb = ctx.zeros("q", (max_tokens * q_dim * 4) as u64);
        let kb = ctx.zeros("k", (max_tokens * kv_dim * 4) as u64);
        let vb = ctx.zeros("v", (max_tokens * kv_dim * 4) as u64);
        let ob = ctx.zeros("out", (max_tokens * q_dim * 4) as u64);
        let rshape = RopeShape { n_head: n_head as u32, n_head_kv: n_head_kv as u32, head_dim: hd as u32, rope_dim: hd as u32, base: 10000.0, freq_scale: 1.0, neox };
        let rope_op = RopeKvOp::new(&ctx, &qb, &kb, &vb, cache.k(0), cache.v(0), rshape, &step);
        let ashape = AttnShape { n_head: n_head as u32, n_head_kv: n_head_kv as u32, head_dim: hd as u32 };
        let attn = AttentionOp::new(&ctx, &qb, cache.k(0), cache.v(0), &ob, ashape, n_ctx as u32, max_tokens as u32, &step).unwrap();
        let mut pos = 0;
        for n in [37usize, 1, 1, 40, 1] {
            let q: Vec<f32> = rng.vec(n * q_dim).iter().map(|x| x * 3.0).collect();
            let k = rng.vec(n * kv_dim);
            let v = rng.vec(n * kv_dim);
            ctx.queue.write_buffer(&qb, 0, bytemuck::cast_slice(&q));
            ctx.queue.write_buffer(&kb, 0, bytemuck::cast_slice(&k));
            ctx.queue.write_buffer(&vb, 0, bytemuck::cast_slice(&v));
            run(&ctx, &step, n as u32, pos as u32, |p| {
                rope_op.encode(p, n as u32);
                attn.encode(p, n as u32);
            });
            let got: Vec<f32> = ctx.read(&ob, n * q_dim).unwrap();
            let (mut q, mut k) = (q, k);
            for t in 0..n {
                let angles = rope.angles(pos + t);
                rope.apply(&mut q[t * q_dim..(t + 1) * q_dim], hd, &angles);
                rope.apply(&mut k[t * kv_dim..(t + 1) * kv_dim], hd, &angles);
                cpu_cache.store(0, pos + t, &k[t * kv_dim..(t + 1) * kv_dim], &v[t * kv_dim..(t + 1) * kv_dim]);
            }
            let (ck, cv) = cpu_cache.layer(0);
            let mut want = vec![0.0; n * q_dim];
            ember::cpu::attention(&q, ck, cv, pos, n, ember::cpu::attention::AttnShape { n_head, n_head_kv, head_dim: hd }, &mut want);
            let e = max_abs_diff(&got, &want);
            assert!(e <= 4e-3, "chain neox={neox} n {n} pos {pos}: differs from the CPU by {e:e}");
            pos += n;
        }
    }
}

/// A batched decode's per-row dispatches (`engine::gpu_batch`): each sequence's RoPE + KV
/// write and attention read and write its token's row of shared q, k, v and out buffers (the
/// Step's row) against its own cache at its own position; the attentions share one set of
/// partials. Against the CPU's RoPE and attention per sequence, positions on both sides of
/// the one-pass limit, odd head shapes; rows past the batch stay untouched.
#[test]
fn decode_rows_at_their_own_rows_match_cpu() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(26);
    let (n_head, n_head_kv, hd, n_ctx, max_tokens) = (9usize, 3usize, 40usize, 700usize, 6usize);
    let (q_dim, kv_dim) = (n_head * hd, n_head_kv * hd);
    let rope = Rope::new(hd, 10000.0, 1.0, RopeStyle::Adjacent);
    let rshape = RopeShape { n_head: n_head as u32, n_head_kv: n_head_kv as u32, head_dim: hd as u32, rope_dim: hd as u32, base: 10000.0, freq_scale: 1.0, neox: false };
    let ashape = AttnShape { n_head: n_head as u32, n_head_kv: n_head_kv as u32, head_dim: hd as u32 };
    // Rows 0..4 of the batch: (sequence, its position).
    let rows = [(2usize, 600usize), (0, 7), (3, 0), (1, 255)];
    let n_seqs = 4;
    let qb = ctx.zeros("q", (max_tokens * q_dim * 4) as u64);
    let kb = ctx.zeros("k", (max_tokens * kv_dim * 4) as u64);
    let vb = ctx.zeros("v", (max_tokens * kv_dim * 4) as u64);
    let ob = ctx.zeros("out", (max_tokens * q_dim * 4) as u64);
    let steps: Vec<Buffer> = (0..n_seqs).map(|_| step_buffer(&ctx)).collect();
    let caches: Vec<GpuKvCache> = (0..n_seqs).map(|_| GpuKvCache::new(&ctx, 1, n_ctx, kv_dim).unwrap()).collect();
    // Every cache random below its sequence's position (what its earlier tokens wrote).
    let mut cpu_caches = Vec::new();
    for (s, cache) in caches.iter().enumerate() {
        let pos = rows.iter().find(|r| r.0 == s).unwrap().1;
        let mut cc = ember::cpu::KvCache::new(1, n_ctx, kv_dim);
        for p in 0..pos {
            cc.store(0, p, &rng.vec(kv_dim), &rng.vec(kv_dim));
        }
        let (k, v) = cc.layer(0);
        ctx.queue.write_buffer(cache.k(0), 0, bytemuck::cast_slice(k));
        ctx.queue.write_buffer(cache.v(0), 0, bytemuck::cast_slice(v));
        cpu_caches.push(cc);
    }
    let first = AttentionOp::new(&ctx, &qb, caches[0].k(0), caches[0].v(0), &ob, ashape, n_ctx as u32, max_tokens as u32, &steps[0]).unwrap();
    let ops: Vec<(RopeKvOp, AttentionOp)> = (0..n_seqs)
        .map(|s| {
            let rope_op = RopeKvOp::new(&ctx, &qb, &kb, &vb, caches[s].k(0), caches[s].v(0), rshape, &steps[s]);
            let attn = AttentionOp::sharing(&ctx, &qb, caches[s].k(0), caches[s].v(0), &ob, ashape, n_ctx as u32, max_tokens as u32, &steps[s], &first).unwrap();
            (rope_op, attn)
        })
        .collect();
    let q: Vec<f32> = rng.vec(max_tokens * q_dim).iter().map(|x| x * 3.0).collect();
    let k = rng.vec(max_tokens * kv_dim);
    let v = rng.vec(max_tokens * kv_dim);
    ctx.queue.write_buffer(&qb, 0, bytemuck::cast_slice(&q));
    ctx.queue.write_buffer(&kb, 0, bytemuck::cast_slice(&k));
    ctx.queue.write_buffer(&vb, 0, bytemuck::cast_slice(&v));
    ctx.queue.write_buffer(&ob, 0, bytemuck::cast_slice(&vec![f32::NAN; max_tokens * q_dim]));
    for (r, &(s, pos)) in rows.iter().enumerate() {
        let step = Step { n_tokens: 1, pos0: pos as u32, n_kv: pos as u32 + 1, _pad: r as u32 };
        ctx.queue.write_buffer(&steps[s], 0, bytemuck::bytes_of(&step));
        ops[s].1.set_n_kv(Some(pos as u32 + 1));
    }
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
        for &(s, _) in &rows {
            ops[s].0.encode(&mut pass, 1);
            ops[s].1.encode(&mut pass, 1);
        }
    }
    ctx.submit_and_wait(enc).unwrap();
    let got: Vec<f32> = ctx.read(&ob, max_tokens * q_dim).unwrap();
    for (r, &(s, pos)) in rows.iter().enumerate() {
        let (mut qr, mut kr) = (q[r * q_dim..(r + 1) * q_dim].to_vec(), k[r * kv_dim..(r + 1) * kv_dim].to_vec());
        let angles = rope.angles(pos);
        rope.apply(&mut qr, hd, &angles);
        rope.apply(&mut kr, hd, &angles);
        cpu_caches[s].store(0, pos, &kr, &v[r * kv_dim..(r + 1) * kv_dim]);
        let (ck, cv) = cpu_caches[s].layer(0);
        let mut want = vec![0.0; q_dim];
        ember::cpu::attention(&qr, ck, cv, pos, 1, ember::cpu::attention::AttnShape { n_head, n_head_kv, head_dim: hd }, &mut want);
        let e = max_abs_diff(&got[r * q_dim..(r + 1) * q_dim], &want);
        assert!(e <= 4e-3, "row {r} (sequence {s} at {pos}): differs from the CPU by {e:e}");
        // Its key went to its own cache at its position.
        let words: Vec<u32> = ctx.read(caches[s].k(0), (pos + 1) * kv_dim / 2).unwrap();
        let cached = f16_bits(&words[pos * kv_dim / 2..]);
        for (i, (&g, &w)) in cached.iter().zip(&kr).enumerate() {
            assert!((g - w).abs() <= w.abs() / 2048.0 + 2e-6, "row {r}: cached k {i}: got {g} want {w}");
        }
    }
    assert!(got[rows.len() * q_dim..].iter().all(|x| x.is_nan()), "rows past the batch written");
}

/// A batched decode's RoPE + KV write and attention over every row in one dispatch each
/// (`RopeKvRowsOp`, `AttentionOp::rows`): the sequences' caches in one buffer per layer
/// (`GpuKvCache::with_seqs`), each row reading its sequence's offset and position from the
/// table. Against the CPU per sequence, with every row short (one pass over the keys) and
/// with one row past the one-pass limit (chunks and a combine for all rows); the other
/// sequences' caches and the rows past the batch stay untouched.
#[test]
fn decode_rows_in_one_dispatch_match_cpu() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(27);
    let (n_head, n_head_kv, hd, n_ctx, max_rows) = (9usize, 3usize, 40usize, 700usize, 6usize);
    let (q_dim, kv_dim) = (n_head * hd, n_head_kv * hd);
    let rope = Rope::new(hd, 10000.0, 1.0, RopeStyle::Adjacent);
    let rshape = RopeShape { n_head: n_head as u32, n_head_kv: n_head_kv as u32, head_dim: hd as u32, rope_dim: hd as u32, base: 10000.0, freq_scale: 1.0, neox: false };
    let ashape = AttnShape { n_head: n_head as u32, n_head_kv: n_head_kv as u32, head_dim: hd as u32 };
    let n_seqs = 5;
    let cache = GpuKvCache::with_seqs(&ctx, 1, n_ctx, kv_dim, n_seqs).unwrap();
    assert_eq!(cache.n_seqs(), n_seqs);
    let qb = ctx.zeros("q", (max_rows * q_dim * 4) as u64);
    let kb = ctx.zeros("k", (max_rows * kv_dim * 4) as u64);
    let vb = ctx.zeros("v", (max_rows * kv_dim * 4) as u64);
    let ob = ctx.zeros("out", (max_rows * q_dim * 4) as u64);
    let table = ctx.zeros("rows", 16 * max_rows as u64);
    let step = step_buffer(&ctx);
    let rope_op = RopeKvRowsOp::new(&ctx, &qb, &kb, &vb, cache.k(0), cache.v(0), n_ctx as u32, rshape, &table, &step);
    let attn = AttentionOp::rows(&ctx, &qb, cache.k(0), cache.v(0), &ob, ashape, n_ctx as u32, max_rows as u32, &table, &step).unwrap();
    // (sequence, position) per row: short ones only, then one past the one-pass limit.
    for rows in [vec![(3usize, 40usize), (0, 0), (4, 17)], vec![(2, 650), (0, 7), (4, 0), (1, 255)]] {
        // Every sequence's cache random below its position (sequence 3, absent from the second
        // batch, keeps what it holds).
        let mut cpu: Vec<ember::cpu::KvCache> = Vec::new();
        for s in 0..n_seqs {
            let mut cc = ember::cpu::KvCache::new(1, n_ctx, kv_dim);
            for p in 0..n_ctx {
                cc.store(0, p, &rng.vec(kv_dim), &rng.vec(kv_dim));
            }
            let (k, v) = cc.layer(0);
            let off = cache.seq_words(s) as u64 * 4;
            ctx.queue.write_buffer(cache.k(0), off, bytemuck::cast_slice(k));
            ctx.queue.write_buffer(cache.v(0), off, bytemuck::cast_slice(v));
            cpu.push(cc);
        }
        let before: Vec<u32> = ctx.read(cache.k(0), (cache.k(0).size() / 4) as usize).unwrap();
        let q: Vec<f32> = rng.vec(max_rows * q_dim).iter().map(|x| x * 3.0).collect();
        let k = rng.vec(max_rows * kv_dim);
        let v = rng.vec(max_rows * kv_dim);
        ctx.queue.write_buffer(&qb, 0, bytemuck::cast_slice(&q));
        ctx.queue.write_buffer(&kb, 0, bytemuck::cast_slice(&k));
        ctx.queue.write_buffer(&vb, 0, bytemuck::cast_slice(&v));
        ctx.queue.write_buffer(&ob, 0, bytemuck::cast_slice(&vec![f32::NAN; max_rows * q_dim]));
        let t: Vec<[u32; 4]> = rows.iter().map(|&(s, pos)| [cache.seq_words(s), pos as u32, 0, 0]).collect();
        ctx.queue.write_buffer(&table, 0, bytemuck::cast_slice(&t));
        let b = rows.len() as u32;
        let max_n_kv = rows.iter().map(|r| r.1 as u32 + 1).max().unwrap();
        run(&ctx, &step, b, 0, |p| {
            rope_op.encode(p, b);
            attn.encode_rows(p, b, max_n_kv);
        });
        let got: Vec<f32> = ctx.read(&ob, max_rows * q_dim).unwrap();
        let after: Vec<u32> = ctx.read(cache.k(0), before.len()).unwrap();
        let mut written = vec![false; after.len()];
        for (r, &(s, pos)) in rows.iter().enumerate() {
            let (mut qr, mut kr) = (q[r * q_dim..(r + 1) * q_dim].to_vec(), k[r * kv_dim..(r + 1) * kv_dim].to_vec());
            let angles = rope.angles(pos);
            rope.apply(&mut qr, hd, &angles);
            rope.apply(&mut kr, hd, &angles);
            cpu[s].store(0, pos, &kr, &v[r * kv_dim..(r + 1) * kv_dim]);
            let (ck, cv) = cpu[s].layer(0);
            let mut want = vec![0.0; q_dim];
            ember::cpu::attention(&qr, ck, cv, pos, 1, ember::cpu::attention::AttnShape { n_head, n_head_kv, head_dim: hd }, &mut want);
            let e = max_abs_diff(&got[r * q_dim..(r + 1) * q_dim], &want);
            assert!(e <= 4e-3, "row {r} (sequence {s} at {pos}, {max_n_kv} keys at most): differs from the CPU by {e:e}");
            let w0 = cache.seq_words(s) as usize + pos * kv_dim / 2;
            let cached = f16_bits(&after[w0..w0 + kv_dim / 2]);
            for (i, (&g, &w)) in cached.iter().zip(&kr).enumerate() {
                assert!((g - w).abs() <= w.abs() / 2048.0 + 2e-6, "row {r}: cached k {i}: got {g} want {w}");
            }
            written[w0..w0 + kv_dim / 2].iter_mut().for_each(|x| *x = true);
        }
        for (i, (a, bf)) in after.iter().zip(&before).enumerate() {
            assert!(written[i] || a == bf, "cache word {i} changed");
        }
        assert!(got[rows.len() * q_dim..].iter().all(|x| x.is_nan()), "rows past the batch written");
    }
}

/// `n` distinct values in a random order (a shuffled ramp), none zero.
fn distinct_values(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n).map(|i| (i as f32 + 1.0) * 1e-3 - (n as f32) * 5e-4).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v.iter().map(|&x| if x == 0.0 { 1e-4 } else { x }).collect()
}

fn read_pairs(ctx: &GpuContext, buf: &Buffer, k: usize) -> Vec<(u32, f32)> {
    let words: Vec<u32> = ctx.read(buf, 2 * k).unwrap();
    words.chunks_exact(2).map(|p| (p[0], f32::from_bits(p[1]))).collect()
}

/// The argmax kernel's (index, value, non-finite flag).
fn read_argmax(ctx: &ember::gpu::GpuContext, buf: &wgpu::Buffer) -> (u32, f32, u32) {
    let w: Vec<u32> = ctx.read(buf, 3).unwrap();
    (w[0], f32::from_bits(w[1]), w[2])
}

#[test]
fn argmax_matches_cpu() {
    let Some(ctx) = gpu() else { return };
    let step = step_buffer(&ctx);
    let mut rng = Rng(26);
    for n_vocab in [1usize, 7, 2049, 32000, 151_936, 256_000] {
        let rows = 3;
        let logits = distinct_values(&mut rng, rows * n_vocab);
        let lb = upload_f32(&ctx, "logits", &logits);
        let ob = ctx.zeros("out", 12);
        let op = ArgmaxOp::new(&ctx, &lb, n_vocab as u32, &ob, &step);
        for n_tokens in [1usize, 3] {
            run(&ctx, &step, n_tokens as u32, 0, |p| op.encode(p, n_tokens as u32));
            let got = read_argmax(&ctx, &ob);
            let (i, v) = argmax(&logits[(n_tokens - 1) * n_vocab..n_tokens * n_vocab]);
            assert_eq!(got, (i as u32, v, 0), "argmax n_vocab {n_vocab} row {}", n_tokens - 1);
        }
    }
    // Ties go to the lowest index; NaN and infinities never win, and they set the flag the host
    // turns into the CPU path's non-finite error, wherever they are in the row.
    let n_vocab = 40_000;
    let base = distinct_values(&mut rng, n_vocab);
    for (bad_at, bad) in [(5, f32::NAN), (6, f32::NEG_INFINITY), (39_999, f32::INFINITY), (20_001, -f32::NAN)] {
        let mut logits = base.clone();
        for (i, x) in [(39_000, 100.0), (12_345, 100.0), (30_000, 100.0), (bad_at, bad)] {
            logits[i] = x;
        }
        let lb = upload_f32(&ctx, "logits", &logits);
        let ob = ctx.zeros("out", 12);
        let op = ArgmaxOp::new(&ctx, &lb, n_vocab as u32, &ob, &step);
        run(&ctx, &step, 1, 0, |p| op.encode(p, 1));
        assert_eq!(read_argmax(&ctx, &ob), (12_345, 100.0, 1), "{bad} at {bad_at}");
    }
    let mut logits = base.clone();
    logits[12_345] = 100.0;
    assert_eq!(argmax(&logits), (12_345, 100.0));
    let ob = ctx.zeros("out", 12);
    let all_nan = vec![f32::NAN; 3000];
    let lb = upload_f32(&ctx, "logits", &all_nan);
    let op = ArgmaxOp::new(&ctx, &lb, 3000, &ob, &step);
    run(&ctx, &step, 1, 0, |p| op.encode(p, 1));
    assert_eq!(read_argmax(&ctx, &ob), (0, f32::NEG_INFINITY, 1));
}

/// The CPU's top k: values descending, lower index first on ties, -inf and NaN left out.
fn top_k_cpu(x: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut v: Vec<(u32, f32)> = x.iter().enumerate().filter(|(_, &x)| x > f32::NEG_INFINITY).map(|(i, &x)| (i as u32, x)).collect();
    v.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
    v.truncate(k);
    v.resize(k, (u32::MAX, f32::NEG_INFINITY));
    v
}

#[test]
fn top_k_matches_cpu() {
    let Some(ctx) = gpu() else { return };
    let step = step_buffer(&ctx);
    let mut rng = Rng(27);
    for (n_vocab, ks) in [(7usize, &[1usize, 5, 10][..]), (1000, &[1, 40]), (49_152, &[64]), (151_936, &[5, 64]), (262_149, &[64])] {
        let rows = 2;
        let logits = distinct_values(&mut rng, rows * n_vocab);
        let lb = upload_f32(&ctx, "logits", &logits);
        for &k in ks {
            let ob = ctx.zeros("out", 8 * k as u64);
            let op = TopKOp::new(&ctx, &lb, n_vocab as u32, k as u32, &ob, &step);
            run(&ctx, &step, rows as u32, 0, |p| op.encode(p, rows as u32));
            let got = read_pairs(&ctx, &ob, k);
            assert_eq!(got, top_k_cpu(&logits[n_vocab..], k), "top-{k} of {n_vocab}");
        }
    }
    // Ties: lower index first; -inf and NaN skipped.
    let mut logits = distinct_values(&mut rng, 10_000);
    for (i, x) in [(9_000, 50.0), (100, 50.0), (4_000, 50.0), (7, 49.0), (8, f32::NAN), (9, f32::NEG_INFINITY)] {
        logits[i] = x;
    }
    let lb = upload_f32(&ctx, "logits", &logits);
    let ob = ctx.zeros("out", 8 * 6);
    let op = TopKOp::new(&ctx, &lb, 10_000, 6, &ob, &step);
    run(&ctx, &step, 1, 0, |p| op.encode(p, 1));
    let got = read_pairs(&ctx, &ob, 6);
    assert_eq!(got, top_k_cpu(&logits, 6));
    assert_eq!(&got[..4], &[(100, 50.0), (4_000, 50.0), (9_000, 50.0), (7, 49.0)]);
    // Ties across the k-th place, spread over blocks: the lowest indices of them.
    let mut logits = distinct_values(&mut rng, 100_000);
    for i in [99_000, 5, 70_000, 123, 4_096, 4_095, 50_000, 8_191, 8_192, 33] {
        logits[i] = 1040.0;
    }
    logits[77_777] = 1041.0;
    logits[7] = 1042.0;
    let lb = upload_f32(&ctx, "logits", &logits);
    let ob = ctx.zeros("out", 8 * 6);
    let op = TopKOp::new(&ctx, &lb, 100_000, 6, &ob, &step);
    run(&ctx, &step, 1, 0, |p| op.encode(p, 1));
    assert_eq!(read_pairs(&ctx, &ob, 6), [(7, 1042.0), (77_777, 1041.0), (5, 1040.0), (33, 1040.0), (123, 1040.0), (4_095, 1040.0)]);
}

fn sample_params(rule: &SampleRule, draw: u32) -> SampleParams {
    SampleParams { top_k: rule.top_k, top_p: rule.top_p, ln_min_p: rule.ln_min_p, inv_temp: rule.inv_temp, seed: rule.seed, draw }
}

/// Whether draw `draw` of `rule` over `logits` lands within `eps` of a boundary of the chain,
/// computed in f64: where the top-p prefix ends (mass at temperature 1 against top_p) or
/// between two candidates (the draw against the cumulative mass). There `exp`'s rounding,
/// which Vulkan leaves to the driver within a few ulp, may move the CPU's and GPU's choice.
fn near_boundary(rule: &SampleRule, logits: &[f32], draw: u32, eps: f64) -> bool {
    let mut c: Vec<(u32, f32)> = logits.iter().enumerate().filter(|(_, &l)| l >= f32::MIN).map(|(i, &l)| (i as u32, l)).collect();
    c.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
    c.truncate(rule.top_k as usize);
    let l0 = c[0].1 as f64;
    let mut n = c.len();
    let mut near = false;
    if rule.top_p < 1.0 {
        let total: f64 = c.iter().map(|x| (x.1 as f64 - l0).exp()).sum();
        let mut cum = 0.0;
        for (i, x) in c.iter().enumerate() {
            cum += (x.1 as f64 - l0).exp();
            near |= (cum / total - rule.top_p as f64).abs() < eps;
            if cum / total >= rule.top_p as f64 {
                n = i + 1;
                break;
            }
        }
    }
    n = c[..n].iter().take_while(|x| x.1 as f64 >= l0 + rule.ln_min_p as f64).count().max(1);
    let w: Vec<f64> = c[..n].iter().map(|x| ((x.1 as f64 - l0) * rule.inv_temp as f64).max(-200.0).exp()).collect();
    let total: f64 = w.iter().sum();
    let u = uniform(rule.seed, draw) as f64;
    let mut cum = 0.0;
    for wi in &w {
        cum += wi;
        near |= (cum / total - u).abs() < eps;
    }
    near
}

#[test]
fn sampling_matches_the_cpu_rule() {
    let Some(ctx) = gpu() else { return };
    let step = step_buffer(&ctx);
    let mut rng = Rng(31);
    let cfg = |temperature: f32, top_k: usize, top_p: f32, min_p: f32, seed: u64| SamplerConfig { temperature, top_k, top_p, min_p, seed, ..Default::default() };
    let rules = [
        cfg(0.8, 40, 0.95, 0.05, 1), // ember run's defaults (llama.cpp's)
        cfg(1.5, 64, 1.0, 0.0, 2),
        cfg(1.0, 7, 0.6, 0.0, u64::MAX),
        cfg(2.0, 64, 0.5, 0.2, 3),
        cfg(0.3, 1, 0.95, 0.05, 4),   // top-k 1: the argmax
        cfg(1.0, 10, 1e-6, 0.0, 5),   // top-p below the best token's mass: the argmax
        cfg(1e-30, 64, 1.0, 0.0, 6),  // a tiny temperature: the argmax, no inf times zero
    ]
    .map(|c| SampleRule::new(&c));
    let (mut cases, mut skipped) = (0usize, 0usize);
    for n_vocab in [5usize, 1000, 49_153, 151_937] {
        // Logits on a scale where the chain keeps several candidates: N(0, 2)-ish spread, a
        // few large ones, ties among them, and tokens that can never be drawn.
        let mut logits: Vec<f32> = rng.vec(n_vocab).iter().map(|v| v * 6.0).collect();
        if n_vocab > 100 {
            for (i, x) in [(n_vocab - 1, 9.0), (3, 9.0), (n_vocab / 2, 8.5), (17, 8.75), (n_vocab / 3, 8.75), (40, f32::NEG_INFINITY), (41, f32::NAN)] {
                logits[i] = x;
            }
        }
        let lb = upload_f32(&ctx, "logits", &logits);
        let ob = ctx.zeros("out", 12);
        let am = ArgmaxOp::new(&ctx, &lb, n_vocab as u32, &ob, &step);
        let op = SampleOp::new(&ctx, &lb, n_vocab as u32, &ob, &step);
        for rule in &rules {
            let draws = if n_vocab > 100_000 { 6 } else { 24 };
            for draw in (0..draws).map(|d| d * 7919 + 3) {
                op.set(&ctx, &sample_params(rule, draw));
                run(&ctx, &step, 1, 0, |p| {
                    am.encode(p, 1);
                    op.encode(p, 1);
                });
                let got: Vec<u32> = ctx.read(&ob, 3).unwrap();
                let want = rule.pick(&logits, draw);
                cases += 1;
                if got[0] != want && near_boundary(rule, &logits, draw, 1e-5) {
                    skipped += 1;
                    continue;
                }
                assert_eq!(got[0], want, "vocab {n_vocab}, {rule:?}, draw {draw}");
                // The argmax's flag stays: NaN and -inf in the larger vocabularies.
                assert_eq!(got[2], u32::from(n_vocab > 100), "non-finite flag, vocab {n_vocab}");
            }
        }
    }
    eprintln!("sampling: {skipped} of {cases} draws differ between CPU and GPU, each at a rounding boundary");
    assert!(skipped * 50 <= cases, "{skipped} of {cases} draws differ at a rounding boundary");
    // Exact ties (exp(0) = 1 on both sides): four tokens tied for the best, top-p 0.5 keeps the
    // two lowest ids, and both draws over many counters stay among them, equal to the CPU's.
    let mut logits = vec![-30.0f32; 777];
    for i in [700, 13, 250, 12] {
        logits[i] = 3.0;
    }
    let lb = upload_f32(&ctx, "logits", &logits);
    let ob = ctx.zeros("out", 12);
    let am = ArgmaxOp::new(&ctx, &lb, 777, &ob, &step);
    let op = SampleOp::new(&ctx, &lb, 777, &ob, &step);
    let rule = SampleRule::new(&cfg(1.0, 40, 0.5, 0.0, 9));
    let mut seen = std::collections::BTreeSet::new();
    for draw in 0..40 {
        op.set(&ctx, &sample_params(&rule, draw));
        run(&ctx, &step, 1, 0, |p| {
            am.encode(p, 1);
            op.encode(p, 1);
        });
        let got: Vec<u32> = ctx.read(&ob, 3).unwrap();
        assert_eq!(got[0], rule.pick(&logits, draw), "tie draw {draw}");
        seen.insert(got[0]);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![12, 13]);
}

/// Wall time per call of what `f` encodes, over `reps` calls in one pass (after a warm-up).
fn time_op(ctx: &GpuContext, step: &Buffer, n_tokens: u32, pos0: u32, reps: usize, f: impl Fn(&mut ComputePass<'_>)) -> f64 {
    run(ctx, step, n_tokens, pos0, |p| f(p));
    let t = std::time::Instant::now();
    run(ctx, step, n_tokens, pos0, |p| {
        for _ in 0..reps {
            f(p)
        }
    });
    t.elapsed().as_secs_f64() / reps as f64 * 1e6
}

/// Per-op timings at two model shapes (`cargo test --release --test kernels_gpu_ops -- --ignored
/// --nocapture bench`); on hardware GPUs, not lavapipe.
#[test]
#[ignore]
fn bench_ops() {
    let Some(ctx) = gpu() else { return };
    eprintln!("adapter: {} ({:?})", ctx.adapter.name, ctx.adapter.backend);
    let step = step_buffer(&ctx);
    let mut rng = Rng(99);
    // (name, dim, n_head, n_head_kv, head_dim, ffn, vocab)
    for (name, dim, n_head, n_head_kv, hd, ffn, vocab) in [("smollm2-135m", 576usize, 9usize, 3usize, 64usize, 1536usize, 49152usize), ("llama3-8b", 4096, 32, 8, 128, 14336, 128256)] {
        let (q_dim, kv_dim) = (n_head * hd, n_head_kv * hd);
        let (n_ctx, max_tokens) = (8192usize, 512usize);
        let mut buf = |n: usize| upload_f32(&ctx, "b", &rng.vec(n));
        let x = buf(max_tokens * dim);
        let w = buf(dim);
        let o = ctx.zeros("o", (max_tokens * dim * 4) as u64);
        let q = buf(max_tokens * q_dim);
        let k = buf(max_tokens * kv_dim);
        let v = buf(max_tokens * kv_dim);
        let ao = ctx.zeros("ao", (max_tokens * q_dim * 4) as u64);
        let gate = buf(max_tokens * ffn);
        let up = buf(max_tokens * ffn);
        let logits = buf(vocab);
        let out = ctx.zeros("out", 64 * 8);
        let cache = GpuKvCache::new(&ctx, 1, n_ctx, kv_dim).unwrap();
        // A cache full of random f16 values.
        let kc: Vec<f16> = rng.vec(n_ctx * kv_dim).iter().map(|&x| f16::from_f32(x)).collect();
        ctx.queue.write_buffer(cache.k(0), 0, bytemuck::cast_slice(&kc));
        ctx.queue.write_buffer(cache.v(0), 0, bytemuck::cast_slice(&kc));
        let norm = RmsNormOp::new(&ctx, &x, &w, &o, dim as u32, 1e-5, &step);
        let rshape = RopeShape { n_head: n_head as u32, n_head_kv: n_head_kv as u32, head_dim: hd as u32, rope_dim: hd as u32, base: 10000.0, freq_scale: 1.0, neox: false };
        let rope = RopeKvOp::new(&ctx, &q, &k, &v, cache.k(0), cache.v(0), rshape, &step);
        let ashape = AttnShape { n_head: n_head as u32, n_head_kv: n_head_kv as u32, head_dim: hd as u32 };
        let attn = AttentionOp::new(&ctx, &q, cache.k(0), cache.v(0), &ao, ashape, n_ctx as u32, max_tokens as u32, &step).unwrap();
        let act = GatedActOp::new(&ctx, &gate, &up, ffn as u32, Activation::Silu, &step);
        let add = AddOp::new(&ctx, &x, &o, dim as u32, &step);
        let am = ArgmaxOp::new(&ctx, &logits, vocab as u32, &out, &step);
        let tk = TopKOp::new(&ctx, &logits, vocab as u32, 40, &out, &step);
        let reps = 200;
        for n in [1u32, 512] {
            let r = if n == 1 { reps } else { 20 };
            eprintln!(
                "{name} n_tokens {n}: rms_norm {:.1} us, rope_kv {:.1} us, gated silu {:.1} us, add {:.1} us",
                time_op(&ctx, &step, n, 0, r, |p| norm.encode(p, n)),
                time_op(&ctx, &step, n, 0, r, |p| rope.encode(p, n)),
                time_op(&ctx, &step, n, 0, r, |p| act.encode(p, n)),
                time_op(&ctx, &step, n, 0, r, |p| add.encode(p, n)),
            );
        }
        for n_kv in [128u32, 1024, 4096, 8192] {
            let us = time_op(&ctx, &step, 1, n_kv - 1, reps, |p| attn.encode(p, 1));
            let gbs = (n_kv as usize * kv_dim * 4) as f64 / us / 1e3;
            eprintln!("{name} attention decode n_kv {n_kv}: {us:.1} us ({gbs:.0} GB/s of KV)");
        }
        for (n, pos0) in [(512u32, 0u32), (64, 4000)] {
            let us = time_op(&ctx, &step, n, pos0, 10, |p| attn.encode(p, n));
            let flops = (0..n as u64).map(|t| 4 * (pos0 as u64 + t + 1) * (n_head * hd) as u64).sum::<u64>() as f64;
            eprintln!("{name} attention prefill n {n} pos0 {pos0}: {us:.1} us ({:.2} TFLOP/s)", flops / us / 1e6);
        }
        eprintln!(
            "{name} vocab {vocab}: argmax {:.1} us, top-40 {:.1} us",
            time_op(&ctx, &step, 1, 0, reps, |p| am.encode(p, 1)),
            time_op(&ctx, &step, 1, 0, reps, |p| tk.encode(p, 1)),
        );
    }
}

/// Gemma's element-wise ops: GeGLU (the f16-table GELU of llama.cpp's CPU backend, as the
/// CPU's: within one f16 step where a driver's tanh lands on the other side of a rounding
/// boundary, 1e-6 in absolute terms in GELU's negative tail), the embedding scale (exact) and final soft-capping, at odd sizes, rows past
/// n_tokens untouched.
#[test]
fn gelu_scale_and_softcap_match_cpu() {
    use ember::gpu::ops::ScaleOp;
    let Some(ctx) = gpu() else { return };
    let step = step_buffer(&ctx);
    let mut rng = Rng(31);
    let (max_tokens, dim) = (7usize, 67usize * 5);
    let mut gate: Vec<f32> = rng.vec(max_tokens * dim).iter().map(|v| v * 12.0).collect();
    gate[..4].copy_from_slice(&[-10.0, -10.5, 10.0, 11.0]);
    let up = rng.vec(max_tokens * dim);
    for n in [1usize, 7] {
        let gb = upload_f32(&ctx, "gate", &gate);
        let ub = upload_f32(&ctx, "up", &up);
        let op = GatedActOp::new(&ctx, &gb, &ub, dim as u32, Activation::GeluTanh, &step);
        run(&ctx, &step, n as u32, 0, |p| op.encode(p, n as u32));
        let got: Vec<f32> = ctx.read(&gb, max_tokens * dim).unwrap();
        let mut want = gate.clone();
        gated_activation(Activation::GeluTanh, &mut want[..n * dim], &up[..n * dim]);
        // Relative to the value, or for GELU's tiny negative tail (1 + tanh cancels, and a
        // driver's tanh is a few 1e-8 from the C library's near -1) to 1e-3.
        assert_close(&got, &want, 1e-3, 1e-3, &format!("gelu n {n}"));
        assert_eq!(got[n * dim..], want[n * dim..], "gelu n {n}: rows past n_tokens");
        let x: Vec<f32> = rng.vec(max_tokens * dim).iter().map(|v| v * 40.0).collect();
        let xb = upload_f32(&ctx, "x", &x);
        let op = ScaleOp::scale(&ctx, &xb, dim as u32, 8.0f32.sqrt(), &step);
        run(&ctx, &step, n as u32, 0, |p| op.encode(p, n as u32));
        let got: Vec<f32> = ctx.read(&xb, max_tokens * dim).unwrap();
        let want: Vec<f32> = x.iter().enumerate().map(|(i, &v)| if i < n * dim { v * 8.0f32.sqrt() } else { v }).collect();
        assert_eq!(got, want, "scale n {n}");
        let xb = upload_f32(&ctx, "x", &x);
        let op = ScaleOp::softcap(&ctx, &xb, dim as u32, 3.0, &step);
        run(&ctx, &step, n as u32, 0, |p| op.encode(p, n as u32));
        let got: Vec<f32> = ctx.read(&xb, max_tokens * dim).unwrap();
        let want: Vec<f32> = x.iter().enumerate().map(|(i, &v)| if i < n * dim { ((v as f64 / 3.0).tanh() * 3.0) as f32 } else { v }).collect();
        // A driver's tanh is good to about 1e-7 in absolute terms near 0.
        assert_close(&got, &want, 1e-5, 0.1, &format!("softcap n {n}"));
    }
}

/// Attention with Gemma's options (another scale, soft-capped scores, a sliding window)
/// against the exact f64 answer: decode split into chunks of which the window leaves some
/// without a key (the combine must weigh them zero) and in one pass, and prefill tiles whose
/// first keys fall out of every query's window.
#[test]
fn attention_with_softcap_and_window_matches_f64() {
    use ember::cpu::attention::AttnOpts;
    let Some(ctx) = gpu() else { return };
    let step = step_buffer(&ctx);
    let mut rng = Rng(32);
    let (n_head, n_head_kv, hd, n_ctx, max_tokens) = (6usize, 2usize, 32usize, 300usize, 40usize);
    let (q_dim, kv_dim, group) = (n_head * hd, n_head_kv * hd, n_head / n_head_kv);
    let k: Vec<f16> = rng.vec(n_ctx * kv_dim).iter().map(|&x| f16::from_f32(x)).collect();
    let v: Vec<f16> = rng.vec(n_ctx * kv_dim).iter().map(|&x| f16::from_f32(x)).collect();
    let kb = ctx.upload("k", bytemuck::cast_slice(&k));
    let vb = ctx.upload("v", bytemuck::cast_slice(&v));
    let q: Vec<f32> = rng.vec(max_tokens * q_dim).iter().map(|x| x * 4.0).collect();
    let qb = upload_f32(&ctx, "q", &q);
    let ob = ctx.zeros("out", (max_tokens * q_dim * 4) as u64);
    let shape = AttnShape { n_head: n_head as u32, n_head_kv: n_head_kv as u32, head_dim: hd as u32 };
    for opts in [AttnOpts { scale: 0.2, softcap: 1.5, window: 70 }, AttnOpts { scale: 0.3, softcap: 0.0, window: 5 }, AttnOpts { scale: 0.25, softcap: 2.0, window: 0 }] {
        let op = AttentionOp::with_opts(&ctx, &qb, &kb, &vb, &ob, shape, opts, n_ctx as u32, max_tokens as u32, &step).unwrap();
        for (n, pos0, hint) in [(1usize, 250usize, None), (1, 250, Some(251u32)), (1, 3, None), (9, 100, None), (40, 0, None)] {
            op.set_n_kv(hint);
            ctx.queue.write_buffer(&ob, 0, bytemuck::cast_slice(&vec![f32::NAN; max_tokens * q_dim]));
            run(&ctx, &step, n as u32, pos0 as u32, |p| op.encode(p, n as u32));
            let got: Vec<f32> = ctx.read(&ob, n * q_dim).unwrap();
            let mut worst = 0.0f64;
            for t in 0..n {
                let pos = pos0 + t;
                let first = if opts.window == 0 { 0 } else { (pos + 1).saturating_sub(opts.window) };
                for h in 0..n_head {
                    let kvh = h / group;
                    let qh: Vec<f64> = q[t * q_dim + h * hd..][..hd].iter().map(|&x| f16::from_f32(x).to_f64()).collect();
                    let scores: Vec<f64> = (first..=pos)
                        .map(|p| {
                            let s = k[p * kv_dim + kvh * hd..][..hd].iter().zip(&qh).map(|(a, b)| a.to_f64() * b).sum::<f64>() * opts.scale as f64;
                            if opts.softcap > 0.0 { opts.softcap as f64 * (s / opts.softcap as f64).tanh() } else { s }
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let sum: f64 = w.iter().sum();
                    for d in 0..hd {
                        let o: f64 = (first..=pos).zip(&w).map(|(p, wp)| wp * v[p * kv_dim + kvh * hd + d].to_f64()).sum::<f64>() / sum;
                        worst = worst.max((got[t * q_dim + h * hd + d] as f64 - o).abs());
                    }
                }
            }
            assert!(worst <= 2e-5, "{opts:?} n {n} pos0 {pos0} (told {hint:?}, chunks {}): differs from the exact answer by {worst:e}", op.n_chunks());
        }
    }
}
