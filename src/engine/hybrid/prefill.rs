//! Batched prefill of a hybrid session: a prompt goes through the layers in batches of up to
//! the GPU session's `max_tokens`, not one token per step.
//!
//! Per batch and layer:
//!
//! ```text
//! GPU, submission A: (+ the CPU's part of the previous layer) attention for every row of the
//!                    batch, + residual, FFN norm -> copy xn (n x n_embd) to a mapped buffer
//! GPU, submission B: every hot neuron for every row, densely (BatchFfnOp), added into x
//! CPU, meanwhile:    wait for A, read xn, every cold neuron for every row -> y (n x n_embd),
//!                    written to the GPU before the next submission
//! ```
//!
//! So a split layer costs one GPU->CPU synchronisation per batch instead of one per token, and
//! the GPU's weights are read once per batch. The FFN is dense in both parts: the union of a
//! batch's firing neurons is nearly all of them, and a silent ReLU neuron adds exactly zero, so
//! for `--ffn relu` the result is the token-by-token one up to summation order. For `--ffn
//! predict` and simulated activity the batch computes the exact FFN (no predictor is asked, no
//! activity drawn, a simulated predictor's cost is not charged): the prefill of those runs is
//! what a perfect predictor would give, and its speed is that of the dense FFN.
//! A layer whose neurons are all hot needs no synchronisation; x + hot part + cold part are
//! added in that order, as in decode.

use super::stream::StreamArea;
use super::{lost, spin_until_mapped, HybridSession};
use crate::engine::forward::ForwardError;
use crate::engine::gpu_forward::GpuSession;
use crate::engine::gpu_ops::Op;
use crate::gpu::ops::AddOp;
use crate::gpu::{GpuContext, Step};
use std::time::Instant;

/// A batch's exchange between the GPU and the CPU, shared by the layers (they run one after
/// another): allocated with the session, before the neurons are placed, so the budget covers
/// them.
pub(super) struct PrefillBuffers {
    /// xn of the batch's rows, mapped by the CPU.
    staging: wgpu::Buffer,
    /// The CPU's part of the batch's FFN and the op adding it into x.
    y_cpu: wgpu::Buffer,
    add_cpu: AddOp,
    /// Host side of `y_cpu`.
    y: Vec<f32>,
    /// x and xn of a host-attention layer's batch.
    x: Vec<f32>,
    xn: Vec<f32>,
    /// Where large batches stream their cold neurons to the GPU (None: always the CPU).
    pub(super) stream: Option<StreamArea>,
    /// Host-attention layers' attention for a batch that starts the context, on the GPU.
    batch_attention: Option<BatchAttention>,
}

/// A prefill batch's attention for the layers whose KV cache is on the host, run on the GPU
/// when the batch starts at position 0, so that the keys it attends to are its own: RoPE and
/// the K/V write into a batch-sized scratch cache (one for every such layer: they run one after
/// another), attention there into the session's attention buffer, whose o product then
/// streams as before, and the scratch's f16 K/V rows read back into the host's cache. The CPU
/// ran that attention at 1.6 of 2.6 ms per prompt token (BENCHMARKS.md, session 10), and the
/// read-back is a third of the f32 q | k | v it replaces. For models whose attention needs no
/// biases, per-head norms, window or score options (the host path keeps those).
struct BatchAttention {
    cache: crate::gpu::ops::GpuKvCache,
    rope_kv: crate::gpu::ops::RopeKvOp,
    attention: crate::gpu::ops::AttentionOp,
}

impl BatchAttention {
    /// For `gpu`'s layers with q/k/v on the GPU and the rest on the host, None where there are
    /// none or the model's attention is not plain.
    fn new(ctx: &GpuContext, gpu: &GpuSession) -> Result<Option<BatchAttention>, crate::gpu::GpuError> {
        let hp = &gpu.model.hp;
        let plain = hp.swa.is_none() && hp.q_scale.is_none() && hp.attn_softcap.is_none() && gpu.model.layers.iter().all(|l| l.bq.is_none() && l.bk.is_none() && l.bv.is_none() && l.q_norm.is_none() && l.k_norm.is_none());
        if !plain || !gpu.layers.iter().any(|l| l.qkv_only.is_some()) || gpu.max_tokens() < 2 {
            return Ok(None);
        }
        let mt = gpu.max_tokens();
        let cache = crate::gpu::ops::GpuKvCache::new(ctx, 1, mt, hp.kv_dim())?;
        let s = &gpu.s;
        let [q, k, v] = s.qkv_ranges.map(|(off, len)| s.qkv.slice(off..off + len));
        let rope_kv = crate::gpu::ops::RopeKvOp::new(ctx, q, k, v, cache.k_range(0), cache.v_range(0), crate::engine::gpu_forward::rope_shape(hp), &s.step);
        let attention = crate::gpu::ops::AttentionOp::new(ctx, q, cache.k_range(0), cache.v_range(0), &s.attn, crate::engine::gpu_forward::attn_shape(hp), mt as u32, mt as u32, &s.step)?;
        Ok(Some(BatchAttention { cache, rope_kv, attention }))
    }
}

impl PrefillBuffers {
    /// The CPU part's output buffer (n x n_embd f32), added into x by `add_cpu`.
    pub(super) fn y_cpu(&self) -> &wgpu::Buffer {
        &self.y_cpu
    }

    pub(super) fn new(ctx: &GpuContext, gpu: &GpuSession) -> Result<PrefillBuffers, crate::gpu::GpuError> {
        let e = gpu.model.hp.n_embd;
        let bytes = 4 * (gpu.max_tokens() * e) as u64;
        let y_cpu = ctx.zeros("prefill cpu ffn part", bytes);
        let add_cpu = AddOp::new(ctx, &gpu.s.x, &y_cpu, e as u32, &gpu.s.step);
        let batch_attention = BatchAttention::new(ctx, gpu)?;
        Ok(PrefillBuffers { staging: ctx.readback_buffer("prefill staging", bytes), y_cpu, add_cpu, y: Vec::new(), x: Vec::new(), xn: Vec::new(), stream: None, batch_attention })
    }
}

/// Host-side time of batched prefill, in seconds, summed over `batches`.
#[derive(Clone, Copy, Debug, Default)]
pub struct PrefillTiming {
    pub tokens: u64,
    pub batches: u64,
    /// Whole batches, from the first write to the last submission.
    pub total: f64,
    /// Blocked waiting for the GPU's attention half of split layers.
    pub wait_gpu: f64,
    /// Computing cold neurons on the CPU.
    pub cpu_ffn: f64,
    /// Computing host-attention layers' attention half on the CPU.
    pub cpu_attention: f64,
    /// Batches whose cold neurons streamed to the GPU, and the streaming's figures.
    pub streamed_batches: u64,
    /// Host-attention layers whose batch attention ran on the GPU (`BatchAttention`), summed
    /// over batches.
    pub gpu_attention_layers: u64,
    pub stream: super::stream::StreamTiming,
}

impl PrefillTiming {
    /// One line for logs.
    pub fn summary(&self) -> String {
        let per = |v: f64| 1e3 * v / self.tokens.max(1) as f64;
        let st = &self.stream;
        let streamed = match self.streamed_batches {
            0 => String::new(),
            b => format!(
                "; {b} batches streamed to the GPU: {} chunks of cold neurons and {} of {} host-attention layers' q/k/v/o rows (o alone where q/k/v are on the GPU), {:.1} MiB, {:.3} ms per token packing them (CPU), {:.3} waiting for a free slot (GPU copying and computing); {} host-attention layers' batch attention on the GPU (its K/V rows read back into the host's cache: \"CPU attention\")",
                st.chunks,
                st.attn_chunks,
                st.attn_layers,
                st.bytes as f64 / (1u64 << 20) as f64,
                per(st.pack),
                per(st.wait_slot),
                self.gpu_attention_layers
            ),
        };
        format!(
            "{} tokens in {} batches, {:.3} ms per token: {:.3} waiting for the GPU, {:.3} CPU cold neurons, {:.3} CPU attention, {:.3} upload (packing and waiting for a slot), {:.3} other{streamed}",
            self.tokens,
            self.batches,
            per(self.total),
            per(self.wait_gpu),
            per(self.cpu_ffn),
            per(self.cpu_attention),
            per(st.pack + st.wait_slot),
            per(self.total - self.wait_gpu - self.cpu_ffn - self.cpu_attention - st.pack - st.wait_slot)
        )
    }
}

impl HybridSession {
    /// Whether `n` tokens go through batched prefill.
    pub(super) fn batched(&self, n: usize) -> bool {
        n > 1 && self.prefill.is_some()
    }

    /// Runs `tokens` (checked by the caller) in batches of up to `max_tokens`; a batch of one
    /// runs as decode does. Leaves the last row's logits and argmax in the GPU session.
    pub(super) fn prefill(&mut self, tokens: &[u32]) -> Result<(), ForwardError> {
        for chunk in tokens.chunks(self.gpu.max_tokens()) {
            match chunk {
                [t] => self.run_token(*t)?,
                _ => self.prefill_batch(chunk)?,
            }
        }
        Ok(())
    }

    /// Where batched prefill time went; `reset` zeroes the sums.
    pub fn prefill_timing(&mut self, reset: bool) -> PrefillTiming {
        let out = self.state.prefill_timing;
        if reset {
            self.state.prefill_timing = PrefillTiming::default();
        }
        out
    }

    fn prefill_batch(&mut self, tokens: &[u32]) -> Result<(), ForwardError> {
        let t_batch = Instant::now();
        let HybridSession { gpu, layers, state, prefill, .. } = self;
        let pf = prefill.as_mut().expect("batched prefill has its buffers");
        let n = tokens.len() as u32;
        let e = gpu.model.hp.n_embd;
        let pos0 = gpu.n_past as u32;
        let step = Step { n_tokens: n, pos0, n_kv: pos0 + n, _pad: 0 };
        gpu.set_n_kv(step.n_kv);
        let q = &gpu.ctx.queue;
        q.write_buffer(&gpu.s.step, 0, bytemuck::bytes_of(&step));
        q.write_buffer(&gpu.s.step_last, 0, bytemuck::bytes_of(&Step { n_tokens: 1, ..step }));
        q.write_buffer(&gpu.s.ids, 0, bytemuck::cast_slice(tokens));
        pf.y.resize(n as usize * e, 0.0);
        let (mut wait_gpu, mut cpu_ffn, mut cpu_attention) = (0.0, 0.0, 0.0);
        let mut gpu_attention_layers = 0;
        // Large batches stream their cold neurons to the GPU (`stream`'s module docs).
        let streamed = pf.stream.as_ref().is_some_and(|s| n as usize >= s.min_rows);
        let this = &*gpu;
        let new_encoder = || this.ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("hybrid prefill") });
        let mut enc = new_encoder();
        let mut pass = enc.begin_compute_pass(&Default::default()).forget_lifetime();
        this.embed.encode(&mut pass, n);
        for (il, (layer, sp)) in this.layers.iter().zip(layers.iter()).enumerate() {
            for (_, op) in layer.attention_sequence(n) {
                op.record(&mut pass, n);
            }
            if sp.cold.ids.is_empty() && !sp.host_attention {
                sp.batch.record(&mut pass, n);
                continue;
            }
            let l = &this.model.layers[il];
            let mats = [&l.ffn_gate, &l.ffn_up, &state.ffn.down_t[il]];
            if streamed && !sp.host_attention {
                // x + hot, then + each chunk of the cold neurons, all on the GPU: no
                // synchronisation with the CPU but the streaming slots'.
                sp.batch.record(&mut pass, n);
                drop(pass);
                let area = pf.stream.as_mut().expect("streamed batches have the area");
                enc = area.run_layer(&this.ctx, state.cold.team(), mats, &sp.cold.ids, n, enc)?;
                pass = enc.begin_compute_pass(&Default::default()).forget_lifetime();
                continue;
            }
            if streamed && pf.stream.as_ref().is_some_and(|a| a.streams_attention(il)) {
                // A host-attention layer's products on the GPU, its weights streamed: the
                // attention norm and q/k/v there, RoPE, the KV write and attention on the CPU
                // (its KV cache is on the host), o there, added into x, the FFN norm, hot and
                // streamed cold neurons: one synchronisation (q/k/v read back).
                // A layer whose q/k/v weights are on the GPU (`AttnSite::Qkv`) runs that product
                // from them: q, k and v land in their sections of the qkv buffer, copied to the
                // read-back one after another; streamed ones land as rows of q | k | v.
                let area = pf.stream.as_mut().expect("checked");
                let resident = layer.qkv_sequence();
                let (rb, width) = area.qkv_readback().map(|(b, w)| (b.clone(), w)).expect("streamed attention has its read-back");
                let bytes = 4 * n as u64 * width as u64;
                let sections = !resident.is_empty();
                // A batch that is the whole context runs the attention of a layer with resident
                // q/k/v on the GPU (`BatchAttention`) and reads back only its K/V rows.
                let on_gpu = match (sections, pos0, pf.batch_attention.as_ref()) {
                    (true, 0, Some(ba)) => Some(ba),
                    _ => None,
                };
                if sections {
                    // (Its o rows stream: it counts as a streamed host-attention layer.)
                    area.timing.attn_layers += 1;
                    for (_, op) in resident {
                        op.record(&mut pass, n);
                    }
                }
                let kv_bytes = 2 * n as u64 * this.model.hp.kv_dim() as u64;
                let read = match on_gpu {
                    Some(ba) => {
                        gpu_attention_layers += 1;
                        ba.rope_kv.record(&mut pass, n);
                        ba.attention.record(&mut pass, n);
                        drop(pass);
                        let (k, v) = (ba.cache.k_range(0), ba.cache.v_range(0));
                        enc.copy_buffer_to_buffer(k.buffer, k.offset, &rb, 0, kv_bytes);
                        enc.copy_buffer_to_buffer(v.buffer, v.offset, &rb, kv_bytes, kv_bytes);
                        2 * kv_bytes
                    }
                    None if sections => {
                        drop(pass);
                        this.copy_qkv_sections(&mut enc, n, &rb, 0);
                        bytes
                    }
                    None => {
                        area.record_attn_norm(&mut pass, il, n);
                        drop(pass);
                        enc = area.run_rows(&this.ctx, state.cold.team(), &[&l.wq, &l.wk, &l.wv], false, n, enc)?;
                        enc.copy_buffer_to_buffer(&this.s.qkv, 0, &rb, 0, bytes);
                        bytes
                    }
                };
                this.ctx.queue.submit([enc.finish()]);
                let t_wait = Instant::now();
                let slice = rb.slice(..read);
                let (tx_map, rx_map) = std::sync::mpsc::channel();
                slice.map_async(wgpu::MapMode::Read, move |r| {
                    let _ = tx_map.send(r);
                });
                spin_until_mapped(&this.ctx.device, &rx_map)?;
                wait_gpu += t_wait.elapsed().as_secs_f64();
                let t_attn = Instant::now();
                {
                    let view = slice.get_mapped_range().map_err(lost)?;
                    if on_gpu.is_some() {
                        let (k, v) = view.split_at(kv_bytes as usize);
                        state.host.store_kv(&this.model, il, 0, bytemuck::cast_slice(k), bytemuck::cast_slice(v))?;
                    } else {
                        let v: &[f32] = bytemuck::cast_slice::<u8, f32>(&view);
                        pf.x.clear();
                        if sections {
                            // Sections of n rows each to rows of q | k | v.
                            let hp = &this.model.hp;
                            let (qd, kvd, n) = (hp.q_dim(), hp.kv_dim(), n as usize);
                            let (q, rest) = v.split_at(n * qd);
                            let (k, vv) = rest.split_at(n * kvd);
                            for t in 0..n {
                                pf.x.extend_from_slice(&q[t * qd..(t + 1) * qd]);
                                pf.x.extend_from_slice(&k[t * kvd..(t + 1) * kvd]);
                                pf.x.extend_from_slice(&vv[t * kvd..(t + 1) * kvd]);
                            }
                        } else {
                            pf.x.extend_from_slice(v);
                        }
                    }
                }
                rb.unmap();
                if on_gpu.is_none() {
                    let attn = state.host.run_core(state.cold.team(), &this.model, il, pos0 as usize, &pf.x)?;
                    // Through the context's one counted staging buffer, not a queue write's own.
                    this.ctx.write(&this.s.attn, 0, bytemuck::cast_slice(attn));
                }
                cpu_attention += t_attn.elapsed().as_secs_f64();
                enc = area.run_rows(&this.ctx, state.cold.team(), &[&l.wo], true, n, new_encoder())?;
                pass = enc.begin_compute_pass(&Default::default()).forget_lifetime();
                pf.add_cpu.encode(&mut pass, n);
                area.record_ffn_norm(&mut pass, il, n);
                sp.batch.record(&mut pass, n);
                if !sp.cold.ids.is_empty() {
                    drop(pass);
                    enc = area.run_layer(&this.ctx, state.cold.team(), mats, &sp.cold.ids, n, enc)?;
                    pass = enc.begin_compute_pass(&Default::default()).forget_lifetime();
                }
                continue;
            }
            drop(pass);
            let bytes = 4 * n as u64 * e as u64;
            // The CPU needs xn for its cold neurons, or x to run a host layer's attention from.
            let from = if sp.host_attention { &this.s.x } else { &this.s.xn };
            enc.copy_buffer_to_buffer(from, 0, &pf.staging, 0, bytes);
            this.ctx.queue.submit([enc.finish()]);
            let slice = pf.staging.slice(..bytes);
            let (tx_map, rx_map) = std::sync::mpsc::channel();
            slice.map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx_map.send(r);
            });
            // Submission B: the hot neurons of every row, added into x (after a host attention,
            // once the CPU has written x and xn back).
            let mut hot = new_encoder();
            {
                let mut p = hot.begin_compute_pass(&Default::default());
                sp.batch.record(&mut p, n);
            }
            let mut hot = Some(hot.finish());
            if !sp.host_attention {
                this.ctx.queue.submit(hot.take());
            }
            let t_wait = Instant::now();
            spin_until_mapped(&this.ctx.device, &rx_map)?;
            wait_gpu += t_wait.elapsed().as_secs_f64();
            if sp.host_attention {
                // The attention half of every row on the CPU (the host session's batched
                // kernels), then x and xn back to the GPU before the hot neurons read them.
                let t_attn = Instant::now();
                {
                    let view = slice.get_mapped_range().map_err(lost)?;
                    pf.x.clear();
                    pf.x.extend_from_slice(bytemuck::cast_slice::<u8, f32>(&view));
                }
                pf.staging.unmap();
                pf.xn.resize(pf.x.len(), 0.0);
                state.host.run(state.cold.team(), &this.model, il, pos0 as usize, &mut pf.x, &mut pf.xn, state.precision)?;
                this.ctx.queue.write_buffer(&this.s.x, 0, bytemuck::cast_slice(&pf.x));
                this.ctx.queue.write_buffer(&this.s.xn, 0, bytemuck::cast_slice(&pf.xn));
                this.ctx.queue.submit(hot.take());
                cpu_attention += t_attn.elapsed().as_secs_f64();
                if streamed && !sp.cold.ids.is_empty() {
                    let area = pf.stream.as_mut().expect("streamed batches have the area");
                    enc = area.run_layer(&this.ctx, state.cold.team(), mats, &sp.cold.ids, n, new_encoder())?;
                    pass = enc.begin_compute_pass(&Default::default()).forget_lifetime();
                    continue;
                }
                if !sp.cold.ids.is_empty() {
                    let t_cpu = Instant::now();
                    state.cold.batch_dense(&state.ffn, &this.model, il, &pf.xn, &sp.cold.ids, state.precision, &mut pf.y);
                    cpu_ffn += t_cpu.elapsed().as_secs_f64();
                }
            } else {
                let t_cpu = Instant::now();
                {
                    let view = slice.get_mapped_range().map_err(lost)?;
                    let xn: &[f32] = bytemuck::cast_slice(&view);
                    state.cold.batch_dense(&state.ffn, &this.model, il, xn, &sp.cold.ids, state.precision, &mut pf.y);
                }
                pf.staging.unmap();
                cpu_ffn += t_cpu.elapsed().as_secs_f64();
            }
            if sp.cold.ids.is_empty() {
                enc = new_encoder();
                pass = enc.begin_compute_pass(&Default::default()).forget_lifetime();
                continue;
            }
            // Ordered before the next submission, whose first dispatch adds it into x.
            this.ctx.queue.write_buffer(&pf.y_cpu, 0, bytemuck::cast_slice(&pf.y));
            enc = new_encoder();
            pass = enc.begin_compute_pass(&Default::default()).forget_lifetime();
            pf.add_cpu.encode(&mut pass, n);
        }
        drop(pass);
        if this.head.is_some() {
            this.copy_last_row(&mut enc, n);
            let mut p = enc.begin_compute_pass(&Default::default());
            for (_, op) in this.output_sequence() {
                op.record(&mut p, 1);
            }
        }
        this.ctx.queue.submit([enc.finish()]);
        gpu.n_past += n as usize;
        let t = &mut state.prefill_timing;
        t.tokens += n as u64;
        t.batches += 1;
        t.total += t_batch.elapsed().as_secs_f64();
        t.wait_gpu += wait_gpu;
        t.cpu_ffn += cpu_ffn;
        t.cpu_attention += cpu_attention;
        t.gpu_attention_layers += gpu_attention_layers;
        if let Some(area) = pf.stream.as_mut().filter(|_| streamed) {
            let a = std::mem::take(&mut area.timing);
            t.streamed_batches += 1;
            t.stream.chunks += a.chunks;
            t.stream.attn_chunks += a.attn_chunks;
            t.stream.attn_layers += a.attn_layers;
            t.stream.bytes += a.bytes;
            t.stream.pack += a.pack;
            t.stream.wait_slot += a.wait_slot;
        }
        Ok(())
    }
}
