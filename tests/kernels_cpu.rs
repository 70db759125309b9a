//! CPU kernels of the forward pass against plain references on random (never zero) inputs at
//! awkward sizes.

mod common;

use common::{random_matrix, Rng};
use ember::cpu::attention::AttnShape;
use ember::cpu::ops::{self, Rope};
use ember::cpu::attention::{attention_decode_team, attention_team, attention_tiled_team};
use ember::cpu::matmul::{matmuls, matmuls_tuned, CpuTuning};
use ember::cpu::team::Team;
use ember::cpu::{attention, matmul, Activations, KvCache, Precision};
use ember::gguf::GgmlType;
use ember::model::{Activation, Matrix, RopeStyle};
use ember::quant::{self, f16};

#[test]
fn matmul_matches_an_f64_reference_for_every_type_and_precision() {
    let mut rng = Rng(1);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
        for (rows, cols, tokens) in [(1, 32, 1), (37, 96, 1), (131, 224, 5), (300, 64, 3)] {
            let (w, deq) = random_matrix(&mut rng, rows, cols, ty);
            let x = rng.vec(tokens * cols);
            for precision in [Precision::Llama, Precision::F32] {
                let mut out = vec![f32::NAN; rows * tokens];
                pool.install(|| matmul(&w, &Activations::new(&x, tokens).with_precision(precision), &mut out));
                for t in 0..tokens {
                    for r in 0..rows {
                        let (wr, xt) = (&deq[r * cols..(r + 1) * cols], &x[t * cols..(t + 1) * cols]);
                        let want: f64 = wr.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let scale: f64 = wr.iter().zip(xt).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                        // 8-bit activations cost about 1/254 of each term at most; f16 rounding less.
                        let tol = match (precision, ty) {
                            (Precision::F32, _) | (_, GgmlType::F32) => 1e-5,
                            (_, GgmlType::F16) => 2e-3,
                            _ => 1e-2,
                        } * scale + 1e-6;
                        let got = out[t * rows + r] as f64;
                        assert!((got - want).abs() <= tol, "{ty} {precision:?} {rows}x{cols} t{t} r{r}: {got} vs {want}");
                    }
                }
            }
        }
    }
}

#[test]
fn matmul_is_the_same_for_any_thread_count() {
    let mut rng = Rng(2);
    let (w, _) = random_matrix(&mut rng, 263, 160, GgmlType::Q4_1);
    let x = rng.vec(7 * 160);
    let run = |threads| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mut out = vec![0.0; 7 * 263];
        pool.install(|| matmul(&w, &Activations::new(&x, 7), &mut out));
        out
    };
    assert_eq!(run(1), run(4));
}

#[test]
fn rms_norm_matches_its_definition() {
    let mut rng = Rng(3);
    let (n, rows) = (67, 3);
    let x = rng.vec(n * rows);
    let w = rng.vec(n);
    let mut out = vec![0.0; n * rows];
    ops::rms_norm(&x, &w, 1e-5, &mut out);
    for r in 0..rows {
        let row = &x[r * n..(r + 1) * n];
        let rms = (row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64 + 1e-5).sqrt();
        for i in 0..n {
            let want = row[i] as f64 / rms * w[i] as f64;
            assert!((out[r * n + i] as f64 - want).abs() < 1e-5 * want.abs().max(1.0));
        }
    }
}

#[test]
fn rope_rotates_pairs_by_position_dependent_angles() {
    let mut rng = Rng(4);
    let (head_dim, heads, pos, base) = (16, 3, 7, 10000.0f32);
    for style in [RopeStyle::Adjacent, RopeStyle::Halves] {
        let rope = Rope::new(head_dim, base, 1.0, style);
        let x = rng.vec(head_dim * heads);
        let mut y = x.clone();
        rope.apply(&mut y, head_dim, &rope.angles(pos));
        for h in 0..heads {
            for i in 0..head_dim / 2 {
                let (a, b) = match style {
                    RopeStyle::Adjacent => (2 * i, 2 * i + 1),
                    RopeStyle::Halves => (i, i + head_dim / 2),
                };
                let theta = pos as f64 * (base as f64).powf(-2.0 * i as f64 / head_dim as f64);
                let (x0, x1) = (x[h * head_dim + a] as f64, x[h * head_dim + b] as f64);
                assert!((y[h * head_dim + a] as f64 - (x0 * theta.cos() - x1 * theta.sin())).abs() < 1e-4);
                assert!((y[h * head_dim + b] as f64 - (x0 * theta.sin() + x1 * theta.cos())).abs() < 1e-4);
            }
        }
        // Rotation keeps each pair's norm.
        let n0: f32 = x.iter().map(|v| v * v).sum();
        let n1: f32 = y.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4 * n0);
    }
}

#[test]
fn gated_activations_match_their_definitions() {
    let mut rng = Rng(5);
    let n = 16 * 5 + 3; // vectorised groups and a scalar tail
    let gate: Vec<f32> = rng.vec(n).iter().map(|v| v * 12.0).collect();
    let up = rng.vec(n);
    for act in [Activation::Silu, Activation::Relu, Activation::Drelu] {
        let mut g = gate.clone();
        ops::gated_activation(act, &mut g, &up);
        for i in 0..n {
            let (x, u) = (gate[i] as f64, up[i] as f64);
            let want = match act {
                Activation::Silu => x / (1.0 + (-x).exp()) * u,
                Activation::Relu => x.max(0.0) * u,
                Activation::Drelu => x.max(0.0) * u.max(0.0),
                Activation::GeluTanh => unreachable!("tested on its own below (its f16 table)"),
            };
            assert!((g[i] as f64 - want).abs() < 1e-5 * want.abs().max(1e-3), "{act:?} {x} {u}");
            // The one-neuron form the sparse paths use gives the same value for the ReLU kinds
            // (ReLU's may be -0 where the dense one writes 0; SiLU's scalar division may differ
            // from the vectorised one in the last bit).
            if act != Activation::Silu {
                assert_eq!(ops::gated(act, gate[i], up[i]), g[i], "{act:?} {x} {u}");
            }
        }
    }
}

#[test]
fn exp_poly_is_within_two_ulps_of_exp() {
    let mut x = -87.0f32;
    while x < 88.0 {
        let (got, want) = (ops::exp_poly(x), (x as f64).exp());
        assert!(((got as f64 - want) / want).abs() < 2.5e-7, "exp({x}) = {got}, want {want}");
        x += 0.0137;
    }
}

#[test]
fn f16_accumulate_and_scale_simd_equal_scalar() {
    let mut rng = Rng(6);
    for n in [1, 7, 8, 64, 77] {
        let y0: Vec<f16> = rng.vec(n).iter().map(|&v| f16::from_f32(v)).collect();
        let x: Vec<f16> = rng.vec(n).iter().map(|&v| f16::from_f32(v * 3.0)).collect();
        let v = rng.signed() * 2.0;
        let (mut a, mut b) = (y0.clone(), y0.clone());
        quant::vec_mad_f16(&mut a, &x, v);
        quant::reference::vec_mad_f16(&mut b, &x, v);
        assert_eq!(a, b);
        quant::vec_scale_f16(&mut a, v);
        quant::reference::vec_scale_f16(&mut b, v);
        assert_eq!(a, b);
    }
}

#[test]
fn attention_matches_softmax_attention_with_gqa() {
    let mut rng = Rng(7);
    let shape = AttnShape { n_head: 6, n_head_kv: 2, head_dim: 24 };
    let (past, n_tokens) = (5, 4);
    let total = past + n_tokens;
    let kv_dim = shape.n_head_kv * shape.head_dim;
    let mut cache = KvCache::new(1, 16, kv_dim);
    let (ks, vs) = (rng.vec(total * kv_dim), rng.vec(total * kv_dim));
    for p in 0..total {
        cache.store(0, p, &ks[p * kv_dim..(p + 1) * kv_dim], &vs[p * kv_dim..(p + 1) * kv_dim]);
    }
    let q_dim = shape.n_head * shape.head_dim;
    let q = rng.vec(n_tokens * q_dim);
    let mut out = vec![0.0; n_tokens * q_dim];
    let (k, v) = cache.layer(0);
    attention(&q, k, v, past, n_tokens, shape, &mut out);
    let hd = shape.head_dim;
    for t in 0..n_tokens {
        for h in 0..shape.n_head {
            let kvh = h / (shape.n_head / shape.n_head_kv);
            let qh = &q[t * q_dim + h * hd..][..hd];
            let scores: Vec<f64> = (0..=past + t)
                .map(|p| (0..hd).map(|i| qh[i] as f64 * ks[p * kv_dim + kvh * hd + i] as f64).sum::<f64>() / (hd as f64).sqrt())
                .collect();
            let max = scores.iter().cloned().fold(f64::MIN, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let z: f64 = w.iter().sum();
            for i in 0..hd {
                let want: f64 = (0..=past + t).map(|p| w[p] / z * vs[p * kv_dim + kvh * hd + i] as f64).sum();
                let got = out[t * q_dim + h * hd + i] as f64;
                // f16 keys, values and accumulator: about 3 decimal digits.
                assert!((got - want).abs() < 4e-3, "t{t} h{h} i{i}: {got} vs {want}");
            }
        }
    }
}

/// The row dot product the reference path computes for (row r, token t) at the default
/// precision: the activation quantised as llama.cpp does, the scalar twin of the x86 dot.
fn reference_row_dot(w: &Matrix, x: &[f32], r: usize) -> f32 {
    let row = &w.bytes()[r * w.row_bytes()..(r + 1) * w.row_bytes()];
    let nb = x.len() / 32;
    match w.ty {
        GgmlType::Q4_1 => {
            let mut y = vec![quant::BlockQ8_1 { d: f16::ZERO, s: f16::ZERO, qs: [0; 32] }; nb];
            quant::reference::quantize_row_q8_1(x, &mut y);
            quant::reference::vec_dot_q4_1_q8_1(bytemuck::cast_slice(row), &y)
        }
        ty => {
            let mut y = vec![quant::BlockQ8_0 { d: f16::ZERO, qs: [0; 32] }; nb];
            quant::reference::quantize_row_q8_0(x, &mut y);
            match ty {
                GgmlType::Q4_0 => quant::reference::vec_dot_q4_0_q8_0(bytemuck::cast_slice(row), &y),
                GgmlType::Q8_0 => quant::reference::vec_dot_q8_0_q8_0(bytemuck::cast_slice(row), &y),
                GgmlType::Q5_0 => <quant::BlockQ5_0 as quant::WeightBlock>::dot_ref(bytemuck::cast_slice(row), &y),
                _ => unreachable!(),
            }
        }
    }
}

#[test]
fn matmul_equals_the_reference_row_dots_bit_for_bit() {
    // Whatever kernels this CPU picks (packed groups or rows), every output is the reference's
    // dot product to the bit; rows that end in a partial group included.
    let mut rng = Rng(11);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q8_0] {
        for (rows, cols, tokens) in [(1, 32, 1), (17, 96, 2), (53, 160, 3), (192, 576, 1)] {
            let (w, _) = random_matrix(&mut rng, rows, cols, ty);
            let x = rng.vec(tokens * cols);
            let mut out = vec![f32::NAN; rows * tokens];
            matmul(&w, &Activations::new(&x, tokens), &mut out);
            for t in 0..tokens {
                for r in 0..rows {
                    let want = reference_row_dot(&w, &x[t * cols..(t + 1) * cols], r);
                    assert_eq!(out[t * rows + r].to_bits(), want.to_bits(), "{ty} {rows}x{cols} t{t} r{r}");
                }
            }
        }
    }
}

#[test]
fn matmuls_on_a_team_equal_matmul_for_any_team_size() {
    let mut rng = Rng(12);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::F16] {
        let (cols, tokens) = (224, 3);
        let (a, _) = random_matrix(&mut rng, 67, cols, ty);
        let (b, _) = random_matrix(&mut rng, 16, cols, ty);
        let (c, _) = random_matrix(&mut rng, 5, cols, ty);
        let x = rng.vec(tokens * cols);
        for precision in [Precision::Llama, Precision::F32] {
            let acts = Activations::new(&x, tokens).with_precision(precision);
            let want: Vec<Vec<f32>> = [&a, &b, &c]
                .iter()
                .map(|w| {
                    let mut out = vec![f32::NAN; w.rows * tokens];
                    matmul(w, &acts, &mut out);
                    out
                })
                .collect();
            for size in [1, 2, 3, 5] {
                let mut team = Team::new(size);
                // The default, then parts taken from a counter, with and without prefetching.
                let tunings = [None, Some(CpuTuning { parts_per_member: 3, prefetch: 0, ..CpuTuning::default() }), Some(CpuTuning { parts_per_member: 1, prefetch: 4096, ..CpuTuning::default() })];
                for tuning in tunings {
                    let (mut oa, mut ob, mut oc) = (vec![f32::NAN; 67 * tokens], vec![f32::NAN; 16 * tokens], vec![f32::NAN; 5 * tokens]);
                    let acts = Activations::new(&x, tokens).with_precision(precision);
                    match &tuning {
                        None => matmuls(&mut team, &acts, [(&a, &mut oa[..]), (&b, &mut ob[..]), (&c, &mut oc[..])]),
                        Some(t) => matmuls_tuned(&mut team, t, &acts, [(&a, &mut oa[..]), (&b, &mut ob[..]), (&c, &mut oc[..])]),
                    }
                    for (got, want) in [oa, ob, oc].iter().zip(&want) {
                        let (g, w): (Vec<u32>, Vec<u32>) = (got.iter().map(|v| v.to_bits()).collect(), want.iter().map(|v| v.to_bits()).collect());
                        assert_eq!(g, w, "{ty} {precision:?} team of {size}, {tuning:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn vectorised_silu_equals_the_scalar_one() {
    let mut rng = Rng(13);
    for n in [1, 7, 8, 9, 16, 83, 1536] {
        // Magnitudes up to ~200 reach exp's far range (|n| > 126) in some groups.
        let gate: Vec<f32> = rng.vec(n).iter().enumerate().map(|(i, v)| v * if i % 13 == 0 { 9.0 } else { 4.0 }).collect();
        let up = rng.vec(n);
        let (mut fast, mut slow) = (gate.clone(), gate.clone());
        ops::silu_gated_fast(&mut fast, &up);
        ops::silu_gated_reference(&mut slow, &up);
        for i in 0..n {
            assert!(fast[i].to_bits() == slow[i].to_bits() || (fast[i].is_nan() && slow[i].is_nan()), "n {n} [{i}] gate {}: {} vs {}", gate[i], fast[i], slow[i]);
        }
    }
}

#[test]
fn attention_on_a_team_equals_attention() {
    let mut rng = Rng(14);
    let shape = AttnShape { n_head: 6, n_head_kv: 2, head_dim: 40 };
    let (past, n_tokens) = (3, 5);
    let kv_dim = shape.n_head_kv * shape.head_dim;
    let mut cache = KvCache::new(1, 16, kv_dim);
    for p in 0..past + n_tokens {
        cache.store(0, p, &rng.vec(kv_dim), &rng.vec(kv_dim));
    }
    let q = rng.vec(n_tokens * shape.n_head * shape.head_dim);
    let (k, v) = cache.layer(0);
    let mut want = vec![0.0; q.len()];
    attention(&q, k, v, past, n_tokens, shape, &mut want);
    for size in [1, 2, 4] {
        let mut got = vec![f32::NAN; q.len()];
        attention_team(&mut Team::new(size), &q, k, v, past, n_tokens, shape, &mut got);
        assert_eq!(got, want, "team of {size}");
    }
}

/// The tiled f32 attention (a hybrid's streamed prefill) against softmax attention in f64 at
/// odd sizes: several query and key tiles (150 queries: three query tiles, the last of 22;
/// head sizes that are and are not multiples of the 16-wide register blocks), a past, grouped
/// heads; the same bits for every team size.
#[test]
fn tiled_attention_matches_f64_softmax_attention() {
    let mut rng = Rng(21);
    for (shape, past, n_tokens) in [(AttnShape { n_head: 6, n_head_kv: 2, head_dim: 40 }, 37, 53), (AttnShape { n_head: 3, n_head_kv: 3, head_dim: 64 }, 0, 17), (AttnShape { n_head: 4, n_head_kv: 1, head_dim: 24 }, 130, 1), (AttnShape { n_head: 2, n_head_kv: 1, head_dim: 48 }, 5, 150)] {
        let total = past + n_tokens;
        let (hd, kv_dim, q_dim) = (shape.head_dim, shape.n_head_kv * shape.head_dim, shape.n_head * shape.head_dim);
        let mut cache = KvCache::new(1, total, kv_dim);
        for p in 0..total {
            cache.store(0, p, &rng.vec(kv_dim), &rng.vec(kv_dim));
        }
        let (k, v) = cache.layer(0);
        let q: Vec<f32> = rng.vec(n_tokens * q_dim).iter().map(|x| 3.0 * x).collect();
        let mut got = vec![f32::NAN; q.len()];
        attention_tiled_team(&mut Team::new(3), &q, k, v, past, n_tokens, shape, &mut got);
        let mut worst = 0.0f64;
        for t in 0..n_tokens {
            for h in 0..shape.n_head {
                let kvh = h / (shape.n_head / shape.n_head_kv);
                let qh = &q[t * q_dim + h * hd..][..hd];
                let scores: Vec<f64> = (0..=past + t).map(|p| (0..hd).map(|i| qh[i] as f64 * k[p * kv_dim + kvh * hd + i].to_f64()).sum::<f64>() / (hd as f64).sqrt()).collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = w.iter().sum();
                for i in 0..hd {
                    let want: f64 = (0..=past + t).map(|p| w[p] / z * v[p * kv_dim + kvh * hd + i].to_f64()).sum();
                    worst = worst.max((got[t * q_dim + h * hd + i] as f64 - want).abs());
                }
            }
        }
        // f32 sums over at most a few hundred f16-exact keys: about 6 decimal digits.
        assert!(worst < 2e-5, "{shape:?}, past {past}, {n_tokens} tokens: max error {worst}");
        for size in [1, 2, 5] {
            let mut again = vec![f32::NAN; q.len()];
            attention_tiled_team(&mut Team::new(size), &q, k, v, past, n_tokens, shape, &mut again);
            assert!(again.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "team of {size}");
        }
    }
}

/// The decode attention (one query per head, split over runs of 128 keys: a hybrid's host
/// layers) against softmax attention in f64 at odd sizes: a first position, one run, a run and
/// one key, several runs; head sizes that are and are not multiples of 16; grouped heads; the
/// same bits for every team size.
#[test]
fn decode_attention_matches_f64_softmax_attention() {
    let mut rng = Rng(23);
    for (shape, pos) in [(AttnShape { n_head: 6, n_head_kv: 2, head_dim: 40 }, 0), (AttnShape { n_head: 3, n_head_kv: 3, head_dim: 64 }, 127), (AttnShape { n_head: 4, n_head_kv: 1, head_dim: 24 }, 128), (AttnShape { n_head: 8, n_head_kv: 8, head_dim: 128 }, 300)] {
        let (hd, kv_dim, q_dim) = (shape.head_dim, shape.n_head_kv * shape.head_dim, shape.n_head * shape.head_dim);
        let mut cache = KvCache::new(1, pos + 1, kv_dim);
        for p in 0..=pos {
            cache.store(0, p, &rng.vec(kv_dim), &rng.vec(kv_dim));
        }
        let (k, v) = cache.layer(0);
        let q: Vec<f32> = rng.vec(q_dim).iter().map(|x| 3.0 * x).collect();
        let mut got = vec![f32::NAN; q_dim];
        attention_decode_team(&mut Team::new(3), &q, k, v, pos, shape, &mut Vec::new(), &mut got);
        let mut worst = 0.0f64;
        for h in 0..shape.n_head {
            let kvh = h / (shape.n_head / shape.n_head_kv);
            let qh = &q[h * hd..][..hd];
            let scores: Vec<f64> = (0..=pos).map(|p| (0..hd).map(|i| qh[i] as f64 * k[p * kv_dim + kvh * hd + i].to_f64()).sum::<f64>() / (hd as f64).sqrt()).collect();
            let max = scores.iter().cloned().fold(f64::MIN, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let z: f64 = w.iter().sum();
            for i in 0..hd {
                let want: f64 = (0..=pos).map(|p| w[p] / z * v[p * kv_dim + kvh * hd + i].to_f64()).sum();
                worst = worst.max((got[h * hd + i] as f64 - want).abs());
            }
        }
        assert!(worst < 2e-5, "{shape:?}, pos {pos}: max error {worst}");
        for size in [1, 2, 5] {
            let mut again = vec![f32::NAN; q_dim];
            attention_decode_team(&mut Team::new(size), &q, k, v, pos, shape, &mut Vec::new(), &mut again);
            assert!(again.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "team of {size}");
        }
    }
}

/// Attention with Gemma's options (a score scale of its own, soft-capping, a sliding window)
/// against softmax attention in f64 at odd sizes: windows shorter than, equal to and longer
/// than the keys; the same bits on teams of every size and through the per-row path.
#[test]
fn attention_with_softcap_and_window_matches_f64() {
    use ember::cpu::attention::{attention_rows_team_opts, attention_team_opts, AttnOpts, RowKv};
    let mut rng = Rng(23);
    let shape = AttnShape { n_head: 6, n_head_kv: 2, head_dim: 40 };
    let (past, n_tokens) = (11, 7);
    let total = past + n_tokens;
    let (hd, kv_dim, q_dim) = (shape.head_dim, shape.n_head_kv * shape.head_dim, shape.n_head * shape.head_dim);
    let mut cache = KvCache::new(1, total, kv_dim);
    for p in 0..total {
        cache.store(0, p, &rng.vec(kv_dim), &rng.vec(kv_dim));
    }
    let (k, v) = cache.layer(0);
    // Large scores, so that a cap of 1.5 bends them.
    let q: Vec<f32> = rng.vec(n_tokens * q_dim).iter().map(|x| 4.0 * x).collect();
    for opts in [AttnOpts { scale: 0.3, softcap: 1.5, window: 5 }, AttnOpts { scale: 0.15, softcap: 0.0, window: 1 }, AttnOpts { scale: 0.2, softcap: 3.0, window: 0 }, AttnOpts { scale: 0.2, softcap: 0.0, window: 100 }] {
        let mut got = vec![f32::NAN; q.len()];
        attention_team_opts(&mut Team::new(1), &q, k, v, past, n_tokens, shape, opts, &mut got);
        for t in 0..n_tokens {
            let pos = past + t;
            let first = if opts.window == 0 { 0 } else { (pos + 1).saturating_sub(opts.window) };
            for h in 0..shape.n_head {
                let kvh = h / (shape.n_head / shape.n_head_kv);
                // The query rounded to f16 as the kernel's products take it.
                let qh: Vec<f64> = q[t * q_dim + h * hd..][..hd].iter().map(|&x| f16::from_f32(x).to_f64()).collect();
                let scores: Vec<f64> = (first..=pos)
                    .map(|p| {
                        let s = (0..hd).map(|i| qh[i] * k[p * kv_dim + kvh * hd + i].to_f64()).sum::<f64>() * opts.scale as f64;
                        if opts.softcap > 0.0 { opts.softcap as f64 * (s / opts.softcap as f64).tanh() } else { s }
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = w.iter().sum();
                for i in 0..hd {
                    let want: f64 = (first..=pos).zip(&w).map(|(p, wp)| wp / z * v[p * kv_dim + kvh * hd + i].to_f64()).sum();
                    let got = got[t * q_dim + h * hd + i] as f64;
                    // The f16 accumulator: about 3 decimal digits.
                    assert!((got - want).abs() < 4e-3, "{opts:?} t{t} h{h} i{i}: {got} vs {want}");
                }
            }
        }
        for size in [2, 3] {
            let mut again = vec![f32::NAN; q.len()];
            attention_team_opts(&mut Team::new(size), &q, k, v, past, n_tokens, shape, opts, &mut again);
            assert_eq!(again, got, "{opts:?}: team of {size}");
        }
        // Each row alone through the decode-batch path.
        let rows: Vec<RowKv> = (0..n_tokens).map(|t| RowKv { k, v, pos: past + t }).collect();
        let mut by_rows = vec![f32::NAN; q.len()];
        attention_rows_team_opts(&mut Team::new(2), &q, &rows, shape, opts, &mut by_rows);
        assert_eq!(by_rows, got, "{opts:?}: per-row path");
    }
}

/// GeGLU against `gelu_tanh(g) * u` in f64 at an odd size: within the f16 roundings of
/// llama.cpp's table (input and output), exactly 0 below -10 and `g * u` from 10 on.
#[test]
fn geglu_matches_f64_gelu_within_the_f16_table() {
    let mut rng = Rng(24);
    let n = 1001;
    let mut gate: Vec<f32> = rng.vec(n).iter().map(|x| 8.0 * x).collect();
    gate[..4].copy_from_slice(&[-10.0, -12.5, 10.0, 31.0]);
    let up: Vec<f32> = rng.vec(n).iter().map(|x| 2.0 * x + 0.1).collect();
    let mut got = gate.clone();
    ops::gated_activation(Activation::GeluTanh, &mut got, &up);
    let gelu = |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
    for i in 0..n {
        let (g, u) = (gate[i] as f64, up[i] as f64);
        if g <= -10.0 {
            assert_eq!(got[i], 0.0);
        } else if g >= 10.0 {
            assert_eq!(got[i], gate[i] * up[i]);
        } else {
            let want = gelu(g) * u;
            // f16 input (its rounding moves gelu by up to |gelu'| |g| 2^-11) and output (2^-11).
            let tol = (g.abs() * 1.2 * 2f64.powi(-11) + gelu(g).abs() * 2f64.powi(-11) + 1e-6) * u.abs() * 1.01;
            assert!((got[i] as f64 - want).abs() <= tol, "g {g} u {u}: {} vs {want}", got[i]);
        }
    }
    // The scalar path the sparse and profiling code use agrees.
    for i in 0..n {
        assert_eq!(ops::gated(Activation::GeluTanh, gate[i], up[i]), got[i]);
    }
}
