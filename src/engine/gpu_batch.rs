//! Several sequences decoding together on the GPU: the dense GPU session of `n_seqs`
//! sequences (`ember serve --parallel N`, `ember bench --parallel P`).
//!
//! Each sequence is a [`GpuSession`] over the same uploaded weights, with its own KV cache and
//! position; prompts prefill in their own session as for one sequence. A decode step of B >= 2
//! sequences ([`Forward::decode_batch`]) is one command buffer over the first session's
//! activation buffers (they hold 512 rows): the B tokens are rows 0..B, so the embedding, every
//! norm, product and activation runs once over all rows (the few-token matvec reads each
//! weight block once per group of up to 8 rows and applies it to each of them, see
//! `gpu::matrix`), and only RoPE with the KV write and attention are per row, each against its
//! own sequence's cache at its own position:
//! - where every sequence's cache fits one buffer per layer (`GpuKvCache::with_seqs`, within
//!   the adapter's largest binding), the sessions' caches are views of it, and one dispatch
//!   per layer does every row's RoPE and KV write, one (or a split and a combine) every row's
//!   attention, each row reading its sequence's cache offset and position from a table written
//!   before the step (`rope_kv.wgsl`'s `batch`, `attention_decode.wgsl`'s `*_rows`);
//! - else each sequence has its own cache and the per-row dispatches are bound once per
//!   (sequence, layer) to it and to a uniform of its own ([`Step`] with the row the sequence
//!   takes in this step, its position and key count), B x (2 or 3) small dispatches per layer;
//!   their attentions share one set of flash-decoding partials (they run one after another).
//!
//! No bind group is made while decoding. GPU memory: B KV caches (plus alignment padding
//! between them), the scratch of B sessions, and B rows of attention partials.
//!
//! A row's logits are those of the few-token kernels, which differ in rounding from the
//! one-token decode kernels a lone sequence uses (fused norm and RoPE, the type's decode
//! matvec): equal to a few ulps, the same greedy tokens in the tests (`tests/batch_decode.rs`),
//! but not bit for bit as on the CPU.

use super::forward::{check_batch, check_seqs, Forward, ForwardError, Logits};
use super::sampler::SampleRule;
use super::gpu_forward::{attn_shape, rope_shape, FfnOps, GpuSession, Profile};
use super::gpu_ops::Op;
use crate::gpu::ops::{AttentionOp, GpuKvCache, RopeKvOp, RopeKvRowsOp};
use crate::gpu::{GpuContext};
use crate::gpu::{GpuError, Step};
use super::gpu_forward::GpuWeights;
use crate::model::Model;
use std::sync::Arc;

/// Sequence s's per-row dispatches (caches apart): per layer RoPE + KV write and attention
/// against its cache.
struct RowOps {
    /// Its step: n_tokens 1, its position, its key count, and its row in this step.
    step: wgpu::Buffer,
    layers: Vec<(RopeKvOp, AttentionOp)>,
}

/// How a step's rows reach their caches.
enum Rows {
    /// Every cache in one buffer per layer: per layer one RoPE and one attention over all rows,
    /// which read `[cache word, position, 0, 0]` per row from `table`.
    Together { kv: GpuKvCache, table: wgpu::Buffer, layers: Vec<(RopeKvRowsOp, AttentionOp)> },
    /// Caches apart: per (sequence, layer) ops.
    Apart(Vec<RowOps>),
}

pub struct GpuBatch {
    seqs: Vec<GpuSession>,
    /// The selected sequence (`forward`, `n_past`, `reset`).
    seq: usize,
    rows: Rows,
    /// Host-readable copy of a step's logits, every row's (copied in the step's own command
    /// buffer: one submission and no allocation per step).
    readback: wgpu::Buffer,
}

impl GpuBatch {
    /// A session of `n_seqs` sequences (at least one) over `weights` (every layer's attention
    /// and the output head on the GPU: the dense session; [`GpuError::Unsupported`] otherwise),
    /// each with a context of `n_ctx`. Their caches share one buffer per layer where it fits
    /// the adapter's binding limit, else each sequence has its own.
    pub fn open(model: Arc<Model>, ctx: Arc<GpuContext>, weights: Arc<GpuWeights>, n_ctx: usize, n_seqs: usize) -> Result<Self, GpuError> {
        let n_layer = weights.layers.len();
        match GpuKvCache::with_seqs(&ctx, n_layer, n_ctx, model.hp.kv_dim(), n_seqs) {
            Ok(kv) => {
                let seqs = (0..n_seqs.max(1)).map(|s| GpuSession::with_kv(model.clone(), ctx.clone(), weights.clone(), n_ctx, kv.view(s))).collect::<Result<Vec<_>, _>>()?;
                Self::together(seqs, kv)
            }
            Err(GpuError::Unsupported(_)) => Self::open_apart(model, ctx, weights, n_ctx, n_seqs),
            Err(e) => Err(e),
        }
    }

    /// [`open`](Self::open) with every sequence's cache apart (what a context too large for
    /// one buffer gets), for tests.
    #[doc(hidden)]
    pub fn open_apart(model: Arc<Model>, ctx: Arc<GpuContext>, weights: Arc<GpuWeights>, n_ctx: usize, n_seqs: usize) -> Result<Self, GpuError> {
        let seqs = (0..n_seqs.max(1)).map(|_| GpuSession::new(model.clone(), ctx.clone(), weights.clone(), n_ctx)).collect::<Result<Vec<_>, _>>()?;
        Self::apart(seqs)
    }

    /// Whether the sessions are fit to batch: the dense session, shared weights and context.
    fn check(seqs: &[GpuSession]) -> Result<(), GpuError> {
        let Some(core) = seqs.first() else { return Err(GpuError::Unsupported("a batch of no sequences".into())) };
        // The batched step records the layers' products and attention itself, without
        // Gemma's post-norms, scales and caps.
        if let Some(why) = core.model.hp.gpu_dense_only() {
            return Err(GpuError::Unsupported(why));
        }
        if core.head.is_none() || core.layers.iter().any(|l| l.attn.is_none()) {
            return Err(GpuError::Unsupported("batched decoding needs every layer and the output on the GPU (the dense session)".into()));
        }
        if seqs.len() > core.max_tokens {
            return Err(GpuError::Unsupported(format!("{} sequences, more than the {} rows one batch holds", seqs.len(), core.max_tokens)));
        }
        if seqs.iter().any(|s| !Arc::ptr_eq(&s.weights, &core.weights) || s.n_ctx != core.n_ctx) {
            return Err(GpuError::Unsupported("the sequences of a batch must share weights and context".into()));
        }
        Ok(())
    }

    /// Sessions over views of `kv`, sequence s over `kv.view(s)`.
    fn together(seqs: Vec<GpuSession>, kv: GpuKvCache) -> Result<Self, GpuError> {
        Self::check(&seqs)?;
        let core = &seqs[0];
        let hp = &core.model.hp;
        let ctx = &core.ctx;
        let [q, k, v] = core.s.qkv_ranges.map(|(off, len)| core.s.qkv.slice(off..off + len));
        let table = ctx.zeros("batch.rows", 16 * seqs.len() as u64);
        let n_ctx = core.n_ctx as u32;
        let layers = (0..core.layers.len())
            .map(|il| {
                let rope_kv = RopeKvRowsOp::new(ctx, q, k, v, kv.k(il), kv.v(il), n_ctx, rope_shape(hp), &table, &core.s.step);
                let attention = AttentionOp::rows(ctx, q, kv.k(il), kv.v(il), &core.s.attn, attn_shape(hp), n_ctx, seqs.len() as u32, &table, &core.s.step)?;
                Ok((rope_kv, attention))
            })
            .collect::<Result<Vec<_>, GpuError>>()?;
        let readback = Self::readback(&seqs);
        Ok(GpuBatch { seqs, seq: 0, rows: Rows::Together { kv, table, layers }, readback })
    }

    /// Sessions with caches of their own.
    fn apart(seqs: Vec<GpuSession>) -> Result<Self, GpuError> {
        Self::check(&seqs)?;
        let core = &seqs[0];
        let hp = &core.model.hp;
        let ctx = &core.ctx;
        let (rope, shape) = (rope_shape(hp), attn_shape(hp));
        let [q, k, v] = core.s.qkv_ranges.map(|(off, len)| core.s.qkv.slice(off..off + len));
        let mut rows = Vec::with_capacity(seqs.len());
        for s in &seqs {
            let step = ctx.uniform("batch.step", bytemuck::bytes_of(&Step::default()));
            let mut layers = Vec::with_capacity(core.layers.len());
            for (il, l) in core.layers.iter().enumerate() {
                // Every layer holds its attention (checked): its cache is slot il.
                let share = &l.attn.as_ref().expect("attention on the GPU").attention;
                let rope_kv = RopeKvOp::new(ctx, q, k, v, s.kv.k_range(il), s.kv.v_range(il), rope, &step);
                let attention = AttentionOp::sharing(ctx, q, s.kv.k_range(il), s.kv.v_range(il), &core.s.attn, shape, core.n_ctx as u32, core.max_tokens as u32, &step, share)?;
                layers.push((rope_kv, attention));
            }
            rows.push(RowOps { step, layers });
        }
        let readback = Self::readback(&seqs);
        Ok(GpuBatch { seqs, seq: 0, rows: Rows::Apart(rows), readback })
    }

    fn readback(seqs: &[GpuSession]) -> wgpu::Buffer {
        seqs[0].ctx.readback_buffer("batch logits readback", (4 * seqs.len() * seqs[0].model.hp.n_vocab) as u64)
    }

    /// Whether every sequence's cache is in one buffer per layer (one RoPE and one attention
    /// dispatch per layer for all rows).
    pub fn caches_together(&self) -> bool {
        matches!(self.rows, Rows::Together { .. })
    }

    /// The weights every sequence shares.
    pub fn weights(&self) -> &Arc<GpuWeights> {
        &self.seqs[0].weights
    }

    /// GPU bytes of the KV caches, all sequences'.
    pub fn state_bytes(&self) -> u64 {
        self.seqs.iter().map(|s| s.state_bytes()).sum()
    }

    /// Checks a step's rows: sequences of this session, each with room for one more token.
    fn check_rows(&self, rows: &[(usize, u32)]) -> Result<(), ForwardError> {
        check_seqs(rows, self.seqs.len())?;
        for &(seq, t) in rows {
            let s = &self.seqs[seq];
            check_batch(&s.model.hp, s.n_past, s.n_ctx, &[t])?;
        }
        Ok(())
    }

    /// Writes a step's uniforms (its rows' tokens, positions and cache offsets); returns the
    /// most keys any row attends to.
    fn prepare(&self, rows: &[(usize, u32)]) -> u32 {
        let b = rows.len() as u32;
        let core = &self.seqs[0];
        let q = &core.ctx.queue;
        let ids: Vec<u32> = rows.iter().map(|&(_, t)| t).collect();
        q.write_buffer(&core.s.ids, 0, bytemuck::cast_slice(&ids));
        // The shared dispatches read only n_tokens (no product folds RoPE at B >= 2).
        q.write_buffer(&core.s.step, 0, bytemuck::bytes_of(&Step { n_tokens: b, pos0: 0, n_kv: b, _pad: 0 }));
        match &self.rows {
            Rows::Together { kv, table, .. } => {
                let t: Vec<[u32; 4]> = rows.iter().map(|&(seq, _)| [kv.seq_words(seq), self.seqs[seq].n_past as u32, 0, 0]).collect();
                q.write_buffer(table, 0, bytemuck::cast_slice(&t));
            }
            Rows::Apart(ops) => {
                for (r, &(seq, _)) in rows.iter().enumerate() {
                    let pos = self.seqs[seq].n_past as u32;
                    q.write_buffer(&ops[seq].step, 0, bytemuck::bytes_of(&Step { n_tokens: 1, pos0: pos, n_kv: pos + 1, _pad: r as u32 }));
                    for (_, attention) in &ops[seq].layers {
                        attention.set_n_kv(Some(pos + 1));
                    }
                }
            }
        }
        rows.iter().map(|&(seq, _)| self.seqs[seq].n_past as u32 + 1).max().unwrap_or(1)
    }

    /// Records a prepared step's dispatches into one pass, calling `after(pass, name)` after
    /// each (the profile's timestamps; nothing in a real step).
    fn record(&self, p: &mut wgpu::ComputePass<'_>, rows: &[(usize, u32)], max_n_kv: u32, after: &mut dyn FnMut(&mut wgpu::ComputePass<'_>, &'static str)) {
        let b = rows.len() as u32;
        let core = &self.seqs[0];
        core.embed.record(p, b);
        after(p, "embed");
        for (il, layer) in core.layers.iter().enumerate() {
            let a = layer.attn.as_ref().expect("attention on the GPU");
            if let Some(norm) = &a.attn_norm {
                norm.record(p, b);
                after(p, "attn_norm");
            }
            for (name, op) in a.qkv.qkv_named() {
                op.record(p, b);
                after(p, name);
            }
            for bias in a.biases.iter().flatten() {
                bias.record(p, b);
                after(p, "bias");
            }
            // qwen3's per-head q/k norms, before RoPE.
            for norm in a.qk_norm.iter().flatten() {
                norm.record(p, b);
                after(p, "qk_norm");
            }
            match &self.rows {
                Rows::Together { layers, .. } => {
                    layers[il].0.encode(p, b);
                    after(p, "rope_kv rows");
                    layers[il].1.encode_rows(p, b, max_n_kv);
                    after(p, "attention rows");
                }
                Rows::Apart(ops) => {
                    for &(seq, _) in rows {
                        let (rope_kv, attention) = &ops[seq].layers[il];
                        rope_kv.record(p, 1);
                        after(p, "rope_kv");
                        attention.record(p, 1);
                        after(p, "attention");
                    }
                }
            }
            a.o.record(p, b);
            after(p, "matmul o");
            if let Some(norm) = &a.ffn_norm {
                norm.record(p, b);
                after(p, "ffn_norm");
            }
            debug_assert!(matches!(layer.ffn, FfnOps::Dense { .. }), "the dense session's FFN");
            for (name, op) in layer.ffn_sequence() {
                op.record(p, b);
                after(p, name);
            }
        }
        core.head.as_ref().expect("the output on the GPU").output_all.record(p, b);
        after(p, "matmul output");
    }

    /// One step of B >= 2 rows (checked): records and submits it, then reads every row's
    /// logits.
    fn step(&mut self, rows: &[(usize, u32)]) -> Result<Vec<f32>, ForwardError> {
        let max_n_kv = self.prepare(rows);
        let core = &self.seqs[0];
        let mut enc = core.ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("decode batch") });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("decode batch"), timestamp_writes: None });
            self.record(&mut pass, rows, max_n_kv, &mut |_, _| {});
        }
        let nv = core.model.hp.n_vocab;
        let bytes = (4 * rows.len() * nv) as u64;
        enc.copy_buffer_to_buffer(&core.s.logits_all, 0, &self.readback, 0, bytes);
        let index = core.ctx.queue.submit([enc.finish()]);
        let logits = bytemuck::pod_collect_to_vec(&core.ctx.read_mapped(&self.readback, bytes, Some(index)).map_err(ForwardError::Gpu)?);
        for &(seq, _) in rows {
            self.seqs[seq].n_past += 1;
        }
        Ok(logits)
    }

    /// Times one step of `rows` (at least two) dispatch by dispatch, as it runs (one pass, a
    /// timestamp after each dispatch: a dispatch's time includes the barrier before it), then
    /// the same step on the host clock (submission and logits read back). No position is
    /// consumed. None where the adapter has no timestamps inside passes.
    pub fn profile_step(&mut self, rows: &[(usize, u32)]) -> Result<Option<Profile>, ForwardError> {
        self.check_rows(rows)?;
        if rows.len() < 2 {
            return Err(ForwardError::BadSequence("a batched step's profile needs two rows or more".into()));
        }
        let ctx = self.seqs[0].ctx.clone();
        if !ctx.has_timestamps_in_passes() {
            return Ok(None);
        }
        // Marks: one before the first dispatch and one after each (at most 16 a layer and two
        // a row a layer, plus the embedding and the output).
        let most = self.seqs[0].layers.len() * (16 + 2 * rows.len()) + 4;
        let Some(mut timer) = crate::gpu::timer::PassTimer::new(&ctx, most.div_ceil(2) as u32) else { return Ok(None) };
        let max_n_kv = self.prepare(rows);
        let mut names = Vec::new();
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("decode batch (timed)"), timestamp_writes: None });
            timer.mark(&mut pass, 0);
            self.record(&mut pass, rows, max_n_kv, &mut |p, name| {
                names.push(name);
                timer.mark(p, names.len() as u32);
            });
        }
        let ends = timer.finish_marks(&ctx, enc).map_err(ForwardError::Gpu)?;
        let in_pass = names.into_iter().zip(crate::gpu::timer::intervals(&ends)).collect();
        // The same step as it really runs, on the host clock; then the positions go back.
        let start = std::time::Instant::now();
        self.step(rows)?;
        let wall_ns = start.elapsed().as_secs_f64() * 1e9;
        for &(seq, _) in rows {
            self.seqs[seq].n_past -= 1;
        }
        Ok(Some(Profile { alone: Vec::new(), in_pass: Some(in_pass), wall_ns }))
    }
}

impl Forward for GpuBatch {
    fn forward(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>, ForwardError> {
        self.seqs[self.seq].forward(tokens, want)
    }

    fn forward_argmax(&mut self, tokens: &[u32]) -> Result<u32, ForwardError> {
        self.seqs[self.seq].forward_argmax(tokens)
    }

    fn decode_greedy(&mut self, token: u32, n: usize, each: &mut dyn FnMut(u32) -> bool) -> Result<usize, ForwardError> {
        self.seqs[self.seq].decode_greedy(token, n, each)
    }

    fn decode_sampled(&mut self, token: u32, n: usize, rule: &SampleRule, draw0: u32, each: &mut dyn FnMut(u32) -> bool) -> Result<usize, ForwardError> {
        self.seqs[self.seq].decode_sampled(token, n, rule, draw0, each)
    }

    fn n_seqs(&self) -> usize {
        self.seqs.len()
    }

    fn select_seq(&mut self, seq: usize) -> Result<(), ForwardError> {
        if seq >= self.seqs.len() {
            return Err(ForwardError::BadSequence(format!("sequence {seq} of a session holding {}", self.seqs.len())));
        }
        self.seq = seq;
        Ok(())
    }

    /// One row: that sequence's own one-token forward (the decode kernels). Several: one
    /// batched step (see the module's comment).
    fn decode_batch(&mut self, rows: &[(usize, u32)]) -> Result<Vec<f32>, ForwardError> {
        self.check_rows(rows)?;
        if let [(seq, t)] = rows {
            return self.seqs[*seq].forward(&[*t], Logits::Last);
        }
        self.step(rows)
    }

    fn n_past(&self) -> usize {
        self.seqs[self.seq].n_past
    }

    fn n_ctx(&self) -> usize {
        self.seqs[self.seq].n_ctx
    }

    fn reset(&mut self) {
        self.seqs[self.seq].reset()
    }

    fn model(&self) -> &Arc<Model> {
        &self.seqs[0].model
    }

    fn backend_name(&self) -> String {
        self.seqs[0].backend_name()
    }

    fn as_gpu(&mut self) -> Option<&mut GpuSession> {
        Some(&mut self.seqs[self.seq])
    }

    fn as_gpu_batch(&mut self) -> Option<&mut GpuBatch> {
        Some(self)
    }
}
