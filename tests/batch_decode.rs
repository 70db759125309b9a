//! Several sequences decoded together (`Forward::decode_batch`, `engine::batch::Batcher`) give
//! exactly what each gives alone: the same logits bit for bit, the same greedy tokens, the
//! same sampled text for the same seed, whatever else is in the batch, with sequences of
//! different lengths joining and leaving. On the CPU (SmolLM2, 2 threads) and, where a GPU
//! adapter exists (lavapipe in CI), on the dense GPU session.

mod common;

use ember::engine::batch::{Batcher, Request};
use ember::engine::builder::{self, BackendChoice, SessionOptions};
use ember::engine::{generate, Forward, ForwardError, GpuBatch, Logits, Sampler, SamplerConfig, Session};
use ember::model::Model;
use ember::tokenizer::Tokenizer;
use std::sync::Arc;

fn load(path: &std::path::Path) -> (Arc<Model>, Tokenizer) {
    let model = Model::load(path).expect("model loads");
    let tok = Tokenizer::from_gguf(&model.file).expect("tokenizer loads");
    (Arc::new(model), tok)
}

/// Two threads; the tests take turns (their teams spin, and the machine has few cores).
fn pool() -> (std::sync::MutexGuard<'static, ()>, rayon::ThreadPool) {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    (turn, rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap())
}

const PROMPTS: [&str; 5] = ["The capital of France is", "Once upon a time, in a land far away,", "1, 2, 3,", "def fib(n):", "Water boils at"];

fn greedy_config() -> SamplerConfig {
    SamplerConfig { temperature: 0.0, ..Default::default() }
}

/// Each prompt alone, through `generate` on a fresh one-sequence session.
fn alone(session: &mut dyn Forward, tok: &Tokenizer, prompt: &[u32], n: usize, config: SamplerConfig) -> Vec<u32> {
    session.reset();
    generate(session, tok, &mut Sampler::new(config), prompt, n, &[], |_| {}).unwrap().tokens
}

/// Runs the requests through a batcher: request i joins at step `join[i]` and asks for
/// `n[i]` tokens; returns each one's tokens.
fn batched(engine: Box<dyn Forward>, n_slots: usize, tok: &Tokenizer, reqs: Vec<(Vec<u32>, usize, usize, SamplerConfig)>) -> Vec<Vec<u32>> {
    let mut b = Batcher::new(vec![engine], n_slots);
    let mut out: Vec<Option<Vec<u32>>> = vec![None; reqs.len()];
    let mut slot_of: Vec<Option<usize>> = vec![None; n_slots];
    let mut waiting: Vec<usize> = (0..reqs.len()).collect();
    let mut step = 0;
    let mut max_active = 0;
    while out.iter().any(Option::is_none) {
        // Requests whose step has come join while slots are free.
        while let Some(pos) = waiting.iter().position(|&i| reqs[i].2 <= step) {
            let i = waiting[pos];
            let Some(slot) = b.free_slot(&reqs[i].0) else { break };
            waiting.remove(pos);
            let (prompt, n, _, config) = reqs[i].clone();
            match b.start(slot, Request { prompt, sampler: Sampler::new(config), n_predict: n, stops: vec![] }, tok, &mut |_| {}) {
                Some(end) => out[i] = Some(end.unwrap().tokens),
                None => slot_of[slot] = Some(i),
            }
        }
        max_active = max_active.max(b.n_active());
        for (slot, end) in b.step(tok, &|_| false, &|| !waiting.is_empty(), &mut |_, _| {}) {
            let i = slot_of[slot].take().unwrap();
            out[i] = Some(end.unwrap().tokens);
        }
        step += 1;
        assert!(step < 10_000);
    }
    assert!(max_active >= n_slots.min(reqs.len()).min(3), "the batch never held several sequences ({max_active})");
    out.into_iter().map(Option::unwrap).collect()
}

/// decode_batch's rows equal each sequence's own forward, bit for bit, at odd batch sizes and
/// positions, and the session refuses a sequence twice or out of range.
#[test]
fn cpu_decode_batch_rows_equal_each_sequence_alone() {
    let Some(path) = common::default_model() else { return };
    let (model, tok) = load(&path);
    let (_turn, pool) = pool();
    pool.install(|| {
        let nv = model.hp.n_vocab;
        let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| tok.encode(p, true, false).unwrap()).collect();
        let mut batch = Session::new(model.clone(), 64).with_seqs(5);
        let mut single = Session::new(model.clone(), 64);
        // Prefill each sequence (different lengths), then one batched step over 3 of them (odd,
        // out of order) and one over all 5.
        for (s, p) in prompts.iter().enumerate() {
            batch.select_seq(s).unwrap();
            batch.forward(p, Logits::Last).unwrap();
        }
        for rows in [vec![(3usize, 42u32), (0, 7), (4, 1000)], vec![(0, 5), (1, 6), (2, 7), (3, 8), (4, 9)]] {
            let got = batch.decode_batch(&rows).unwrap();
            assert_eq!(got.len(), rows.len() * nv);
            for (r, &(s, t)) in rows.iter().enumerate() {
                // The same sequence alone: its prompt, the tokens fed to it so far, then t.
                let mut fed = prompts[s].clone();
                if rows.len() == 5 && [3, 0, 4].contains(&s) {
                    fed.push([(3, 42), (0, 7), (4, 1000)].iter().find(|x| x.0 == s).unwrap().1);
                }
                single.reset();
                single.forward(&fed, Logits::Last).unwrap();
                let want = single.forward(&[t], Logits::Last).unwrap();
                assert!(got[r * nv..(r + 1) * nv] == want[..], "sequence {s} in a batch of {} differs from alone", rows.len());
            }
        }
        assert!(batch.decode_batch(&[(1, 3), (1, 4)]).is_err());
        assert!(batch.decode_batch(&[(5, 3)]).is_err());
        assert!(batch.decode_batch(&[]).is_err());
    });
}

/// Seven greedy requests of different prompt and answer lengths through 3 slots (so they join
/// and leave while others run): each request's tokens are its sequential greedy tokens. Then
/// sampled requests: the same seed gives the same tokens in a batch as alone.
#[test]
fn cpu_batched_requests_equal_sequential_ones() {
    let Some(path) = common::default_model() else { return };
    let (model, tok) = load(&path);
    let (_turn, pool) = pool();
    pool.install(|| {
        let mut single = Session::new(model.clone(), 128);
        let mut reqs = Vec::new();
        for i in 0..7 {
            let p = tok.encode(PROMPTS[i % PROMPTS.len()], true, false).unwrap();
            reqs.push((p, [9, 4, 13, 6, 1, 11, 5][i], [0, 0, 0, 2, 3, 5, 9][i], greedy_config()));
        }
        let want: Vec<Vec<u32>> = reqs.iter().map(|r| alone(&mut single, &tok, &r.0, r.1, r.3.clone())).collect();
        let got = batched(Box::new(Session::new(model.clone(), 128).with_seqs(3)), 3, &tok, reqs.clone());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "request {i}");
        }
        // A sequence ending with an end-of-generation token stops short of its limit.
        assert!(got.iter().zip(&reqs).all(|(g, r)| g.len() <= r.1));

        let sampled: Vec<_> = (0..5).map(|i| {
            let p = tok.encode(PROMPTS[i], true, false).unwrap();
            (p, 8, i / 2, SamplerConfig { temperature: 0.9, seed: 100 + i as u64, presence_penalty: 0.3, ..Default::default() })
        }).collect();
        let want: Vec<Vec<u32>> = sampled.iter().map(|r| alone(&mut single, &tok, &r.0, r.1, r.3.clone())).collect();
        let got = batched(Box::new(Session::new(model.clone(), 128).with_seqs(5)), 5, &tok, sampled);
        assert_eq!(got, want);
    });
}

/// The dense GPU session with several sequences (lavapipe in CI): five greedy requests of
/// different lengths through 3 slots, each equal to its sequential greedy tokens on a
/// one-sequence GPU session.
#[test]
fn gpu_batched_requests_equal_sequential_ones() {
    let Some(path) = common::default_model() else { return };
    if common::gpu().is_none() {
        return;
    }
    let (model, tok) = load(&path);
    let (_turn, pool) = pool();
    pool.install(|| {
        let mut opts = SessionOptions::new(&path, BackendChoice::Gpu);
        let mut single = builder::open(&opts, model.clone(), 96, &|_| {}).unwrap().session;
        opts.n_seqs = 3;
        let batch = builder::open(&opts, model.clone(), 96, &|_| {}).unwrap().session;
        assert_eq!(batch.n_seqs(), 3);
        let reqs: Vec<_> = (0..5).map(|i| (tok.encode(PROMPTS[i], true, false).unwrap(), [6, 3, 8, 1, 5][i], [0, 0, 1, 2, 4][i], greedy_config())).collect();
        let want: Vec<Vec<u32>> = reqs.iter().map(|r| alone(single.as_mut(), &tok, &r.0, r.1, r.3.clone())).collect();
        let got = batched(batch, 3, &tok, reqs);
        assert_eq!(got, want);
    });
}

/// A request running alone decodes in the backend's own loop (`Forward::decode_greedy` /
/// `decode_sampled`, on the GPU with the next token queued): one `step` takes it to its end when
/// nobody waits, and one token per step while someone does; either way its tokens are
/// `generate`'s, greedy and sampled on the device's rule (no penalties).
fn check_alone_in_the_batcher(mut single: Box<dyn Forward>, batch: Box<dyn Forward>, tok: &Tokenizer) {
    let mut b = Batcher::new(vec![batch], 2);
    let sampled = SamplerConfig { temperature: 0.8, top_k: 40, seed: 7, ..Default::default() };
    for (i, config) in [greedy_config(), sampled].into_iter().enumerate() {
        let prompt = tok.encode(PROMPTS[i], true, false).unwrap();
        let want = alone(single.as_mut(), tok, &prompt, 12, config.clone());
        for waiting in [false, true] {
            let slot = b.free_slot(&prompt).unwrap();
            let start = b.start(slot, Request { prompt: prompt.clone(), sampler: Sampler::new(config.clone()), n_predict: 12, stops: vec![] }, tok, &mut |_| {});
            assert!(start.is_none(), "the request ended at its first token");
            let mut steps = 0;
            let got = loop {
                steps += 1;
                let mut ended = b.step(tok, &|_| false, &|| waiting, &mut |_, _| {});
                if let Some((_, end)) = ended.pop() {
                    break end.unwrap().tokens;
                }
            };
            assert_eq!(got, want, "request {i}, someone waiting: {waiting}");
            let expect_steps = if waiting { want.len().saturating_sub(1).max(1) } else { 1 };
            assert_eq!(steps, expect_steps, "request {i}, someone waiting: {waiting}");
        }
    }
}

#[test]
fn cpu_request_alone_runs_in_the_backends_loop() {
    let Some(path) = common::default_model() else { return };
    let (model, tok) = load(&path);
    let (_turn, pool) = pool();
    pool.install(|| check_alone_in_the_batcher(Box::new(Session::new(model.clone(), 96)), Box::new(Session::new(model.clone(), 96).with_seqs(2)), &tok));
}

#[test]
fn gpu_request_alone_runs_in_the_backends_loop() {
    let Some(path) = common::default_model() else { return };
    if common::gpu().is_none() {
        return;
    }
    let (model, tok) = load(&path);
    let (_turn, pool) = pool();
    pool.install(|| {
        let mut opts = SessionOptions::new(&path, BackendChoice::Gpu);
        let single = builder::open(&opts, model.clone(), 96, &|_| {}).unwrap().session;
        opts.n_seqs = 2;
        let batch = builder::open(&opts, model.clone(), 96, &|_| {}).unwrap().session;
        check_alone_in_the_batcher(single, batch, &tok);
    });
}

/// Greedy tokens of the sequences `seqs` of a session, decoded together: each prefilled
/// (prompt `prompts[s]`, from position 0), then `n` steps of one `decode_batch` over all of
/// them. Returns each one's tokens and the logits rows of its first batched step.
fn decode_together(session: &mut dyn Forward, seqs: &[usize], prompts: &[Vec<u32>], n: usize) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
    let argmax = |l: &[f32]| ember::cpu::ops::argmax(l).0 as u32;
    let mut next: Vec<u32> = seqs.iter().map(|&s| {
        session.select_seq(s).unwrap();
        session.reset();
        argmax(&session.forward(&prompts[s], Logits::Last).unwrap())
    }).collect();
    let mut out: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
    let mut first = Vec::new();
    let nv = session.model().hp.n_vocab;
    for step in 1..n {
        let rows: Vec<(usize, u32)> = seqs.iter().copied().zip(next.iter().copied()).collect();
        let logits = session.decode_batch(&rows).unwrap();
        assert_eq!(logits.len(), rows.len() * nv);
        for (r, row) in logits.chunks_exact(nv).enumerate() {
            if step == 1 {
                first.push(row.to_vec());
            }
            next[r] = argmax(row);
            out[r].push(next[r]);
        }
    }
    (out, first)
}

/// Eight prompts, prompt i the first `len(i)` tokens of PROMPTS[i % PROMPTS.len()].
fn cut_prompts(tok: &Tokenizer, len: impl Fn(usize) -> usize) -> Vec<Vec<u32>> {
    (0..8)
        .map(|i| {
            let mut p = tok.encode(PROMPTS[i % PROMPTS.len()], true, false).unwrap();
            p.truncate(len(i));
            p
        })
        .collect()
}

/// A session's logits after `prompt` and then `token`, from an empty cache.
fn logits_after(session: &mut dyn Forward, prompt: &[u32], token: u32) -> Vec<f32> {
    let mut fed = prompt.to_vec();
    fed.push(token);
    session.reset();
    session.forward(&fed, Logits::Last).unwrap()
}

/// The dense GPU session decodes several sequences in one batched step (`GpuBatch`: the
/// products over all rows, RoPE and attention per row against its own cache): at B = 1, 3 and
/// 8, out of order, with prompts of different lengths (so positions differ per row), every
/// sequence's greedy tokens equal the single-sequence GPU session's and the CPU's
/// `decode_batch`'s, and its logits the single-sequence GPU session's to rounding (the
/// few-token kernels against the one-token ones). Then the session refuses a bad batch.
#[test]
fn gpu_decode_batch_equals_each_sequence_alone() {
    let Some(path) = common::default_model() else { return };
    if common::gpu().is_none() {
        return;
    }
    let (model, tok) = load(&path);
    let (_turn, pool) = pool();
    pool.install(|| {
        const N: usize = 6;
        let opts = SessionOptions::new(&path, BackendChoice::Gpu);
        let mut single = builder::open(&opts, model.clone(), 64, &|_| {}).unwrap().session;
        // Both ways a batch reaches its caches: in one buffer per layer (one RoPE and one
        // attention dispatch for all rows), and apart (per-row dispatches).
        let g = single.as_gpu().unwrap();
        let (ctx, weights) = (g.ctx.clone(), g.weights.clone());
        let together = GpuBatch::open(model.clone(), ctx.clone(), weights.clone(), 64, 8).unwrap();
        assert!(together.caches_together());
        let apart = GpuBatch::open_apart(model.clone(), ctx, weights, 64, 8).unwrap();
        assert!(!apart.caches_together());
        // f32 activations, as the GPU computes (the default's 8-bit ones flip near-ties).
        let mut cpu = Session::new(model.clone(), 64).with_seqs(8);
        cpu.precision = ember::cpu::Precision::F32;
        // Eight prompts of 2 to 13 tokens.
        let prompts = cut_prompts(&tok, |i| 2 + (i * 5) % 12);
        let lens: std::collections::BTreeSet<usize> = prompts.iter().map(Vec::len).collect();
        assert!(lens.len() >= 4, "prompt lengths {lens:?}");
        let nv = model.hp.n_vocab;
        let alone: Vec<Vec<u32>> = prompts.iter().map(|p| common::greedy(single.as_mut(), p, N + 1)).collect();
        let batches = [vec![5usize], vec![6, 1, 3], vec![7, 0, 2, 4, 6, 1, 3, 5]];
        let on_cpu: Vec<Vec<Vec<u32>>> = batches.iter().map(|seqs| decode_together(&mut cpu, seqs, &prompts, N).0).collect();
        for (mode, mut batch) in [("together", together), ("apart", apart)] {
            assert_eq!(batch.n_seqs(), 8);
            for (seqs, on_cpu) in batches.iter().zip(&on_cpu) {
                let (got, first) = decode_together(&mut batch, seqs, &prompts, N);
                for (r, &s) in seqs.iter().enumerate() {
                    assert_eq!(got[r], alone[s][..N], "sequence {s} in a GPU batch of {} (caches {mode}) against alone on the GPU", seqs.len());
                    assert_eq!(got[r], on_cpu[r], "sequence {s} in a GPU batch of {} (caches {mode}) against the CPU's batch", seqs.len());
                    // Its first batched row against the single session's logits after the same
                    // tokens.
                    let want = logits_after(single.as_mut(), &prompts[s], alone[s][0]);
                    assert_eq!(first[r].len(), nv);
                    let err = common::rel_err(&first[r], &want);
                    assert!(err < 2e-3, "sequence {s} in a batch of {} (caches {mode}): logits differ from alone by {err}", seqs.len());
                }
            }
            // Each cache holds its own sequence's history: after the batch of 8, sequences 4
            // and 2 go on together from where they were (their last tokens not yet fed).
            let rows = [(4usize, alone[4][N - 1]), (2, alone[2][N - 1])];
            let logits = batch.decode_batch(&rows).unwrap();
            for (r, &(s, _)) in rows.iter().enumerate() {
                assert_eq!(ember::cpu::ops::argmax(&logits[r * nv..(r + 1) * nv]).0 as u32, alone[s][N], "sequence {s} after the batches (caches {mode})");
            }
            assert!(matches!(batch.decode_batch(&[(1, 3), (1, 4)]), Err(ForwardError::BadSequence(_))));
            assert!(matches!(batch.decode_batch(&[(8, 3)]), Err(ForwardError::BadSequence(_))));
            assert!(batch.decode_batch(&[]).is_err());
            assert!(matches!(batch.decode_batch(&[(0, 3), (1, nv as u32)]), Err(ForwardError::BadToken(..))));
        }
    });
}

/// `--gpu-precision q8`'s batched decode: the products of a step of 8 sequences on the
/// few-token integer kernel (8-bit activations, `matmul_kq_tok.wgsl`) give every sequence the
/// greedy tokens of the one-sequence q8 session (whose one-token products use the same 8-bit
/// activations through the one-token integer kernel, norms folded in), out of order, with
/// prompts of different lengths: the prompt's token and the first batched step's of every
/// sequence, and that step's logits within 6e-2. Not bit for bit: the one-token kernel quantises the
/// activations before the norm's 1 / rms (folded in), the batch after it, so an activation near
/// a rounding tie can land on the other 8-bit value. Measured on lavapipe: 2e-7 for most
/// sequences (no such flip: the same integer sums), 3.3e-2 at worst; a broken kernel is ~1.
/// (Partial groups and odd sizes are the kernel test's, kernels_gpu_matmul; this one is kept
/// to one batch of one step: on lavapipe the q8 kernels are slow, mostly in the short prompts'
/// prefills that run on them, 300 s with two batches of 5 steps, 122 s now.)
#[test]
fn gpu_q8_decode_batch_equals_each_sequence_alone() {
    let Some(path) = common::default_model() else { return };
    if common::gpu().is_none() {
        return;
    }
    let (model, tok) = load(&path);
    let (_turn, pool) = pool();
    pool.install(|| {
        const N: usize = 2;
        let mut opts = SessionOptions::new(&path, BackendChoice::Gpu);
        opts.gpu_tuning = ember::cli::gpu_tuning(ember::cli::GpuPrecisionArg::Q8, &[]).unwrap();
        assert!(opts.gpu_tuning.batch_kq.is_some());
        let mut single = builder::open(&opts, model.clone(), 64, &|_| {}).unwrap().session;
        let g = single.as_gpu().unwrap();
        let mut batch = GpuBatch::open(model.clone(), g.ctx.clone(), g.weights.clone(), 64, 8).unwrap();
        let prompts = cut_prompts(&tok, |i| 2 + (i * 3) % 7);
        let alone: Vec<Vec<u32>> = prompts.iter().map(|p| common::greedy(single.as_mut(), p, N + 1)).collect();
        let mut worst = 0.0f32;
        let seqs = [7usize, 0, 2, 4, 6, 1, 3, 5];
        let (got, first) = decode_together(&mut batch, &seqs, &prompts, N);
        for (r, &s) in seqs.iter().enumerate() {
            // (A rounding flip can tip a near tie later on: measured, one sequence of 8 left at
            // its fifth token.)
            assert_eq!(got[r][..N], alone[s][..N], "sequence {s} in a q8 GPU batch against alone on the q8 GPU session");
            let want = logits_after(single.as_mut(), &prompts[s], alone[s][0]);
            let err = common::rel_err(&first[r], &want);
            worst = worst.max(err);
            assert!(err < 6e-2, "sequence {s} in a q8 batch: logits differ from alone by {err}");
        }
        eprintln!("q8 batched decode: worst relative logit error against alone {worst:.2e}");
    });
}
