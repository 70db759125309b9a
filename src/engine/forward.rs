//! The dense CPU forward pass of a llama-family model: the reference every other path is
//! checked against.

use crate::cpu::attention::AttnShape;
use crate::cpu::ops::{self, Rope};
use crate::cpu::attention::{attention_rows_team_opts, attention_team_opts, AttnOpts, RowKv};
use crate::cpu::matmul::{matmuls_tuned, CpuTuning};
use crate::cpu::team::Team;
use crate::cpu::{Activations, KvCache, Precision};
use crate::model::Model;
use crate::sparse::FfnObserver;
use super::ffn::{FfnScratch, SparseFfn};
use super::sampler::SampleRule;
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ForwardError {
    #[error("context is full: {needed} tokens do not fit in the context of {n_ctx} (use a larger --ctx-size, up to the model's {n_ctx_train})")]
    ContextFull { needed: usize, n_ctx: usize, n_ctx_train: usize },
    #[error("token id {0} is outside the vocabulary of {1}")]
    BadToken(u32, usize),
    #[error("nothing to evaluate: empty token list")]
    Empty,
    #[error("the model produced NaN or infinite logits: its weights or hyper-parameters are broken (check them with `ember info`)")]
    NonFiniteLogits,
    #[error("bad batch of sequences: {0}")]
    BadSequence(String),
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
}

/// What the generation loop, perplexity and bench need from a backend: run tokens at the next
/// positions and hand back logits. The CPU [`Session`] and the GPU session implement it.
pub trait Forward {
    /// Runs `tokens` at the next positions: logits `[n_vocab]` for [`Logits::Last`],
    /// `[tokens.len()][n_vocab]` for [`Logits::All`].
    fn forward(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>, ForwardError>;

    /// Runs `tokens` and returns the most likely next token (the first of equal maxima). A GPU
    /// backend computes it there and reads back only the id.
    fn forward_argmax(&mut self, tokens: &[u32]) -> Result<u32, ForwardError> {
        let logits = self.forward(tokens, Logits::Last)?;
        check_finite(&logits)?;
        Ok(crate::cpu::ops::argmax(&logits).0 as u32)
    }

    /// Greedy decoding: feeds `token`, then each token predicted, calling `each` with every
    /// prediction until it returns false or `n` are made; returns how many were made. The
    /// position then follows the last token fed (each prediction but the last is fed). A GPU
    /// backend keeps the next token queued while the host reads this one (the token id moves
    /// from the argmax into the next embedding lookup on the GPU), so the GPU never waits for
    /// the host between tokens.
    fn decode_greedy(&mut self, token: u32, n: usize, each: &mut dyn FnMut(u32) -> bool) -> Result<usize, ForwardError> {
        decode_greedy_one_by_one(self, token, n, each)
    }

    /// [`decode_greedy`](Self::decode_greedy) with each prediction drawn by `rule`, the i-th
    /// (from 0) with draw counter `draw0 + i`. A GPU backend samples on the GPU and queues the
    /// next token as in greedy decoding; elsewhere each token's logits come back to the host.
    /// Both pick what [`SampleRule::pick`] picks from the logits (up to the rounding of `exp`).
    fn decode_sampled(&mut self, token: u32, n: usize, rule: &SampleRule, draw0: u32, each: &mut dyn FnMut(u32) -> bool) -> Result<usize, ForwardError> {
        decode_sampled_one_by_one(self, token, n, rule, draw0, each)
    }

    /// Independent sequences this session holds, each with its own KV cache and position (1
    /// unless it was opened for several: `SessionOptions::n_seqs`).
    fn n_seqs(&self) -> usize {
        1
    }

    /// Makes sequence `seq` (below [`Self::n_seqs`]) the one that `forward`, `n_past` and
    /// `reset` act on.
    fn select_seq(&mut self, seq: usize) -> Result<(), ForwardError> {
        match seq {
            0 => Ok(()),
            _ => Err(ForwardError::BadSequence(format!("sequence {seq} of a session holding one"))),
        }
    }

    /// One token for each of several distinct sequences, decoded together: row i feeds
    /// `rows[i].1` to sequence `rows[i].0` at that sequence's next position. Returns every
    /// row's logits (`[rows.len()][n_vocab]`), each exactly what that sequence alone would
    /// give (whatever else is in the batch). A session that batches runs the products once
    /// over all rows (the weights are read once for the batch) and attention per row against
    /// its own cache; this default runs the rows one after another. The selected sequence
    /// afterwards is unspecified.
    fn decode_batch(&mut self, rows: &[(usize, u32)]) -> Result<Vec<f32>, ForwardError> {
        check_seqs(rows, self.n_seqs())?;
        let mut out = Vec::new();
        for &(seq, token) in rows {
            self.select_seq(seq)?;
            out.extend(self.forward(&[token], Logits::Last)?);
        }
        Ok(out)
    }

    fn n_past(&self) -> usize;
    fn n_ctx(&self) -> usize;
    /// Forgets the selected sequence (its cache is overwritten from position 0).
    fn reset(&mut self);
    fn model(&self) -> &Arc<Model>;
    /// Where it runs, for tables and messages ("CPU", "GPU").
    fn backend_name(&self) -> String;

    /// The GPU session behind this backend, if it is one (profiling).
    fn as_gpu(&mut self) -> Option<&mut super::GpuSession> {
        None
    }

    /// The GPU session of several sequences behind this backend, if it is one (the batched
    /// step's profile).
    fn as_gpu_batch(&mut self) -> Option<&mut super::gpu_batch::GpuBatch> {
        None
    }

    /// The hybrid session behind this backend, if it is one (its timing, placement, profile).
    fn as_hybrid(&mut self) -> Option<&mut super::HybridSession> {
        None
    }

    /// The CPU session behind this backend, if it is one (its step timers).
    fn as_cpu(&mut self) -> Option<&mut Session> {
        None
    }
}

/// Which positions of a batch need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's (perplexity).
    All,
}

/// Fails on NaN or infinite logits: an argmax or a sampler over them picks an arbitrary token,
/// and generation would go on in silence.
pub fn check_finite(logits: &[f32]) -> Result<(), ForwardError> {
    if logits.iter().all(|v| v.is_finite()) { Ok(()) } else { Err(ForwardError::NonFiniteLogits) }
}

/// [`Forward::decode_greedy`] one token at a time, each read back before the next is fed.
pub(super) fn decode_greedy_one_by_one<F: Forward + ?Sized>(session: &mut F, token: u32, n: usize, each: &mut dyn FnMut(u32) -> bool) -> Result<usize, ForwardError> {
    let mut t = token;
    for i in 0..n {
        t = session.forward_argmax(&[t])?;
        if !each(t) {
            return Ok(i + 1);
        }
    }
    Ok(n)
}

/// [`Forward::decode_sampled`] one token at a time, each token's logits read back and drawn
/// from on the host.
pub(super) fn decode_sampled_one_by_one<F: Forward + ?Sized>(session: &mut F, token: u32, n: usize, rule: &SampleRule, draw0: u32, each: &mut dyn FnMut(u32) -> bool) -> Result<usize, ForwardError> {
    let mut t = token;
    for i in 0..n {
        let logits = session.forward(&[t], Logits::Last)?;
        check_finite(&logits)?;
        t = rule.pick(&logits, draw0.wrapping_add(i as u32));
        if !each(t) {
            return Ok(i + 1);
        }
    }
    Ok(n)
}

/// The sequences of a [`Forward::decode_batch`]: at least one row, each below `n_seqs`, none
/// twice (a sequence's second token needs its first one's keys).
pub(super) fn check_seqs(rows: &[(usize, u32)], n_seqs: usize) -> Result<(), ForwardError> {
    if rows.is_empty() {
        return Err(ForwardError::Empty);
    }
    let mut seen = vec![false; n_seqs];
    for &(seq, _) in rows {
        match seen.get_mut(seq) {
            None => return Err(ForwardError::BadSequence(format!("sequence {seq} of a session holding {n_seqs}"))),
            Some(true) => return Err(ForwardError::BadSequence(format!("sequence {seq} appears twice in one batch"))),
            Some(s) => *s = true,
        }
    }
    Ok(())
}

/// What every backend checks before running `tokens` after `n_past` positions of a context of
/// `n_ctx`: a non-empty batch that fits, of ids inside the vocabulary.
pub(super) fn check_batch(hp: &crate::model::HParams, n_past: usize, n_ctx: usize, tokens: &[u32]) -> Result<(), ForwardError> {
    if tokens.is_empty() {
        return Err(ForwardError::Empty);
    }
    if n_past + tokens.len() > n_ctx {
        return Err(ForwardError::ContextFull { needed: n_past + tokens.len(), n_ctx, n_ctx_train: hp.n_ctx_train });
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= hp.n_vocab) {
        return Err(ForwardError::BadToken(bad, hp.n_vocab));
    }
    Ok(())
}

/// A model plus the state of its sequences (one unless made [`Session::with_seqs`]): a KV
/// cache and a position each.
pub struct Session {
    pub model: Arc<Model>,
    kv: Vec<KvCache>,
    rope: Rope,
    /// The RoPE of sliding-window layers, where the model has them (Gemma 3's base differs).
    rope_swa: Option<Rope>,
    n_past: Vec<usize>,
    /// The sequence `forward` runs.
    seq: usize,
    /// How activations meet quantised weights (llama.cpp's 8-bit way by default).
    pub precision: Precision,
    /// Sees each token's FFN input and gate (profiling, dense FFN only); `None` costs nothing.
    pub observer: Option<Box<dyn FfnObserver>>,
    /// The neuron-aware FFN; `None` runs it densely.
    ffn: Option<Arc<SparseFfn>>,
    ffn_scratch: FfnScratch,
    /// Neurons computed per layer so far (sparse modes), for the measured sparsity.
    pub ffn_stats: FfnStats,
    /// The threads of the dense products and attention: they spin between the ~200 short
    /// parallel steps of a token instead of sleeping like rayon's, so each step starts on every
    /// core within a microsecond (sized by the rayon pool the session is made in).
    team: Team,
    /// How the products stream their weights.
    pub tuning: CpuTuning,
    /// Where the time goes, when asked for (`Some`): costs two clock reads per step.
    pub times: Option<CpuTimes>,
}

/// Time spent in a CPU session's steps, summed over the tokens run since it was set.
#[derive(Clone, Debug, Default)]
pub struct CpuTimes {
    /// Seconds in the team's matrix products, and the weight bytes they read.
    pub products: f64,
    pub product_bytes: u64,
    /// Seconds in attention (the team's step).
    pub attention: f64,
    /// Seconds in the whole forward pass.
    pub total: f64,
}

impl CpuTimes {
    /// One line: the products' share and their bandwidth, attention, and the rest.
    pub fn summary(&self) -> String {
        let other = self.total - self.products - self.attention;
        format!(
            "products {:.1} ms ({:.1} GB/s), attention {:.1} ms, other {:.1} ms, of {:.1} ms",
            self.products * 1e3,
            self.product_bytes as f64 / self.products.max(1e-9) / 1e9,
            self.attention * 1e3,
            other * 1e3,
            self.total * 1e3
        )
    }
}

/// Starts a clock when `times` is on.
fn tick(times: &Option<CpuTimes>) -> Option<std::time::Instant> {
    times.as_ref().map(|_| std::time::Instant::now())
}

/// Neurons the sparse FFN computed: per layer, summed over tokens.
#[derive(Clone, Debug, Default)]
pub struct FfnStats {
    pub active: Vec<u64>,
    /// Tokens seen per layer (the last layer skips rows whose logits are not wanted).
    pub tokens: Vec<u64>,
}

impl FfnStats {
    /// Mean fraction of neurons computed per token, per layer.
    pub fn density(&self, n_ff: usize) -> Vec<f64> {
        self.active.iter().zip(&self.tokens).map(|(&a, &t)| a as f64 / (t.max(1) as f64 * n_ff as f64)).collect()
    }
}

impl Session {
    pub fn new(model: Arc<Model>, n_ctx: usize) -> Self {
        let hp = &model.hp;
        let kv = vec![KvCache::new(hp.n_layer, n_ctx, hp.kv_dim())];
        let rope = Rope::new(hp.rope_dim, hp.rope_base, hp.rope_freq_scale, hp.rope_style);
        let rope_swa = hp.swa.as_ref().map(|w| Rope::new(hp.rope_dim, w.rope_base, w.rope_freq_scale, hp.rope_style));
        Session { model, kv, rope, rope_swa, n_past: vec![0], seq: 0, precision: Precision::default(), observer: None, ffn: None, ffn_scratch: FfnScratch::default(), ffn_stats: FfnStats::default(), team: Team::new(rayon::current_num_threads()), tuning: CpuTuning::default(), times: None }
    }

    /// A session of `n` sequences (at least one), each with its own KV cache of the context
    /// it was made with, for [`Forward::decode_batch`].
    pub fn with_seqs(mut self, n: usize) -> Self {
        let hp = &self.model.hp;
        let n_ctx = self.kv[0].n_ctx;
        self.kv.resize_with(n.max(1), || KvCache::new(hp.n_layer, n_ctx, hp.kv_dim()));
        self.n_past.resize(n.max(1), 0);
        self.seq = 0;
        self
    }

    /// Runs the FFN blocks through `ffn` (neuron-aware) instead of densely.
    pub fn with_ffn(mut self, ffn: Arc<SparseFfn>) -> Self {
        self.ffn_stats = FfnStats { active: vec![0; self.model.hp.n_layer], tokens: vec![0; self.model.hp.n_layer] };
        self.ffn = Some(ffn);
        self
    }

    fn run(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>, ForwardError> {
        check_batch(&self.model.hp, self.n_past[self.seq], self.kv[self.seq].n_ctx, tokens)?;
        let x = embed(&self.model, tokens.iter().copied());
        self.run_layers(x, 0, want)
    }

    /// [`Forward::decode_batch`]: the rows' products together, attention per row.
    fn run_rows(&mut self, rows: &[(usize, u32)]) -> Result<Vec<f32>, ForwardError> {
        check_seqs(rows, self.kv.len())?;
        for &(seq, t) in rows {
            check_batch(&self.model.hp, self.n_past[seq], self.kv[seq].n_ctx, &[t])?;
        }
        let x = embed(&self.model, rows.iter().map(|&(_, t)| t));
        let at: Vec<(usize, usize)> = rows.iter().map(|&(seq, _)| (seq, self.n_past[seq])).collect();
        let t = tick(&self.times);
        let out = self.layers(x, 0, &at, Logits::All);
        if let (Some(t), Some(times)) = (t, self.times.as_mut()) {
            times.total += t.elapsed().as_secs_f64();
        }
        out
    }

    /// Runs layers `first..` on the hidden states `x` (`n_tokens` rows of `n_embd`) at the next
    /// positions, then the output: how a dense layer offload hands the CPU the layers the GPU
    /// does not hold. The caller has checked the batch.
    pub fn run_layers(&mut self, x: Vec<f32>, first: usize, want: Logits) -> Result<Vec<f32>, ForwardError> {
        let e = self.model.hp.n_embd;
        let (seq, pos0) = (self.seq, self.n_past[self.seq]);
        let at: Vec<(usize, usize)> = (0..x.len() / e).map(|t| (seq, pos0 + t)).collect();
        let t = tick(&self.times);
        let out = self.layers(x, first, &at, want);
        if let (Some(t), Some(times)) = (t, self.times.as_mut()) {
            times.total += t.elapsed().as_secs_f64();
        }
        out
    }

    /// One product step on the team ([`matmuls_tuned`]), timed when asked for.
    fn products<const N: usize>(&mut self, x: &Activations, products: [(&crate::model::Matrix, &mut [f32]); N]) {
        let t = tick(&self.times);
        let bytes: usize = products.iter().map(|(w, _)| w.n_bytes()).sum();
        matmuls_tuned(&mut self.team, &self.tuning, x, products);
        if let (Some(t), Some(times)) = (t, self.times.as_mut()) {
            times.products += t.elapsed().as_secs_f64();
            times.product_bytes += bytes as u64;
        }
    }

    /// The layers and the output over the rows of `x`, row t at sequence `at[t].0`, position
    /// `at[t].1` (a prompt: one sequence, consecutive positions; a decode batch: one row per
    /// sequence). Every row's products run together; its RoPE, KV write and attention use its
    /// own position and cache, so a row computes what it would alone (the products' per-row
    /// results do not depend on the batch, tested).
    fn layers(&mut self, mut x: Vec<f32>, first: usize, at: &[(usize, usize)], want: Logits) -> Result<Vec<f32>, ForwardError> {
        let m = self.model.clone();
        let hp = &m.hp;
        let (e, qd, kvd, ff) = (hp.n_embd, hp.q_dim(), hp.kv_dim(), hp.n_ff);
        let n = x.len() / e;
        if n == 0 {
            return Err(ForwardError::Empty);
        }
        debug_assert_eq!(at.len(), n);
        if let Some(&(seq, pos)) = at.iter().find(|&&(seq, pos)| pos >= self.kv[seq].n_ctx) {
            return Err(ForwardError::ContextFull { needed: pos + 1, n_ctx: self.kv[seq].n_ctx, n_ctx_train: hp.n_ctx_train });
        }
        let shape = AttnShape { n_head: hp.n_head, n_head_kv: hp.n_head_kv, head_dim: hp.head_dim };
        let angles: Vec<_> = at.iter().map(|&(_, pos)| self.rope.angles(pos)).collect();
        let angles_swa: Option<Vec<_>> = self.rope_swa.as_ref().map(|r| at.iter().map(|&(_, pos)| r.angles(pos)).collect());
        // Gemma scales q itself (before the f16 rounding of the score products).
        let base_opts = AttnOpts { scale: if hp.q_scale.is_some() { 1.0 } else { 1.0 / (hp.head_dim as f32).sqrt() }, softcap: hp.attn_softcap.unwrap_or(0.0), window: 0 };

        let mut xn = vec![0.0; n * e];
        let (mut q, mut k, mut v) = (vec![0.0; n * qd], vec![0.0; n * kvd], vec![0.0; n * kvd]);
        let mut attn = vec![0.0; n * qd];
        let mut proj = vec![0.0; n * e];
        let (mut gate, mut up) = (vec![0.0; n * ff], vec![0.0; n * ff]);

        for (il, layer) in m.layers.iter().enumerate().skip(first) {
            // Attention block.
            ops::rms_norm(&x, &layer.attn_norm, hp.rms_eps, &mut xn);
            let acts = Activations::new(&xn, n).with_precision(self.precision);
            self.products(&acts, [(&layer.wq, &mut q[..]), (&layer.wk, &mut k[..]), (&layer.wv, &mut v[..])]);
            for (buf, bias, d) in [(&mut q, &layer.bq, qd), (&mut k, &layer.bk, kvd), (&mut v, &layer.bv, kvd)] {
                if let Some(b) = bias {
                    buf.chunks_exact_mut(d).for_each(|row| ops::add_assign(row, b));
                }
            }
            // qwen3: every head of q and k normalised on its own, before RoPE.
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                ops::rms_norm_in_place(&mut q[..n * qd], qn, hp.rms_eps);
                ops::rms_norm_in_place(&mut k[..n * kvd], kn, hp.rms_eps);
            }
            // Sliding-window layers see the last `window` positions, with their own RoPE.
            let local = hp.swa.as_ref().filter(|w| w.layers[il]);
            let (rope, angles) = match (local, &self.rope_swa, &angles_swa) {
                (Some(_), Some(r), Some(a)) => (r, a),
                _ => (&self.rope, &angles),
            };
            let opts = AttnOpts { window: local.map_or(0, |w| w.window), ..base_opts };
            for t in 0..n {
                rope.apply(&mut q[t * qd..(t + 1) * qd], hp.head_dim, &angles[t]);
                rope.apply(&mut k[t * kvd..(t + 1) * kvd], hp.head_dim, &angles[t]);
                if let Some(s) = hp.q_scale {
                    q[t * qd..(t + 1) * qd].iter_mut().for_each(|v| *v *= s);
                }
                let (seq, pos) = at[t];
                self.kv[seq].store(il, pos, &k[t * kvd..(t + 1) * kvd], &v[t * kvd..(t + 1) * kvd]);
            }
            let t = tick(&self.times);
            if at.iter().all(|&(seq, _)| seq == at[0].0) {
                // One sequence (a prompt, or one token): its rows are consecutive positions.
                let (kc, vc) = self.kv[at[0].0].layer(il);
                attention_team_opts(&mut self.team, &q, kc, vc, at[0].1, n, shape, opts, &mut attn);
            } else {
                let kv: Vec<RowKv> = at.iter().map(|&(seq, pos)| {
                    let (k, v) = self.kv[seq].layer(il);
                    RowKv { k, v, pos }
                }).collect();
                attention_rows_team_opts(&mut self.team, &q, &kv, shape, opts, &mut attn);
            }
            if let (Some(t), Some(times)) = (t, self.times.as_mut()) {
                times.attention += t.elapsed().as_secs_f64();
            }
            let precision = self.precision;
            self.products(&Activations::new(&attn, n).with_precision(precision), [(&layer.wo, &mut proj[..])]);
            if let Some(w) = &layer.attn_post_norm {
                ops::rms_norm_in_place(&mut proj, w, hp.rms_eps);
            }
            ops::add_assign(&mut x, &proj);

            // In the last layer only the rows whose logits are wanted go on.
            let rows = if il + 1 == m.layers.len() && want == Logits::Last && n > 1 {
                x.drain(..(n - 1) * e);
                1
            } else {
                n
            };

            // Feed-forward block.
            let xn = &mut xn[..rows * e];
            ops::rms_norm(&x, &layer.ffn_norm, hp.rms_eps, xn);
            if let Some(sparse) = &self.ffn {
                // Neuron-aware: one token at a time (each has its own active set), over rayon,
                // so the team's members make way.
                self.team.rest();
                for t in 0..rows {
                    let (resid, xt) = (&x[t * e..(t + 1) * e], &xn[t * e..(t + 1) * e]);
                    let done = sparse.token(&m, il, resid, xt, None, self.precision, &mut self.ffn_scratch, &mut proj[t * e..(t + 1) * e]);
                    self.ffn_stats.active[il] += done as u64;
                }
                self.ffn_stats.tokens[il] += rows as u64;
                ops::add_assign(&mut x, &proj[..rows * e]);
                continue;
            }
            let acts = Activations::new(xn, rows).with_precision(self.precision);
            self.products(&acts, [(&layer.ffn_gate, &mut gate[..rows * ff]), (&layer.ffn_up, &mut up[..rows * ff])]);
            if let Some(obs) = self.observer.as_mut() {
                for t in 0..rows {
                    obs.observe(il, &x[t * e..(t + 1) * e], &gate[t * ff..(t + 1) * ff], &up[t * ff..(t + 1) * ff]);
                }
            }
            ops::gated_activation(hp.activation, &mut gate[..rows * ff], &up[..rows * ff]);
            let precision = self.precision;
            self.products(&Activations::new(&gate[..rows * ff], rows).with_precision(precision), [(&layer.ffn_down, &mut proj[..rows * e])]);
            if let Some(w) = &layer.ffn_post_norm {
                ops::rms_norm_in_place(&mut proj[..rows * e], w, hp.rms_eps);
            }
            ops::add_assign(&mut x, &proj[..rows * e]);
        }
        // Each sequence now follows its last row (a prompt's rows are consecutive positions).
        for &(seq, pos) in at {
            self.n_past[seq] = pos + 1;
        }

        let rows = x.len() / e;
        let xn = &mut xn[..rows * e];
        ops::rms_norm(&x, &m.output_norm, hp.rms_eps, xn);
        let mut logits = vec![0.0; rows * hp.n_vocab];
        let precision = self.precision;
        self.products(&Activations::new(xn, rows).with_precision(precision), [(&m.output, &mut logits[..])]);
        if let Some(cap) = hp.final_softcap {
            // As llama.cpp: scale by 1/cap, tanh, scale by cap.
            let inv = 1.0 / cap;
            logits.iter_mut().for_each(|l| *l = (*l * inv).tanh() * cap);
        }
        Ok(logits)
    }
}

/// The token embeddings of `tokens`, one row each, scaled where the model scales them
/// (Gemma: by sqrt(n_embd), in f32 as llama.cpp does).
fn embed(model: &Model, tokens: impl Iterator<Item = u32>) -> Vec<f32> {
    let mut x: Vec<f32> = tokens.flat_map(|t| model.token_embd.row_f32(t as usize)).collect();
    if let Some(s) = model.hp.embd_scale {
        x.iter_mut().for_each(|v| *v *= s);
    }
    x
}

impl Forward for Session {
    fn forward(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>, ForwardError> {
        self.run(tokens, want)
    }

    fn n_seqs(&self) -> usize {
        self.kv.len()
    }

    fn select_seq(&mut self, seq: usize) -> Result<(), ForwardError> {
        if seq >= self.kv.len() {
            return Err(ForwardError::BadSequence(format!("sequence {seq} of a session holding {}", self.kv.len())));
        }
        self.seq = seq;
        Ok(())
    }

    fn decode_batch(&mut self, rows: &[(usize, u32)]) -> Result<Vec<f32>, ForwardError> {
        self.run_rows(rows)
    }

    fn n_past(&self) -> usize {
        self.n_past[self.seq]
    }

    fn n_ctx(&self) -> usize {
        self.kv[self.seq].n_ctx
    }

    fn reset(&mut self) {
        self.n_past[self.seq] = 0;
    }

    fn model(&self) -> &Arc<Model> {
        &self.model
    }

    fn backend_name(&self) -> String {
        "CPU".into()
    }

    fn as_cpu(&mut self) -> Option<&mut Session> {
        Some(self)
    }
}
