//! Streaming a prefill batch's cold neurons to the GPU: for a batch of at least
//! [`StreamConfig::min_rows`] tokens, a split layer's cold neurons are not computed by the CPU
//! row after row; their gate, up and `down_t` rows are packed into the hot neurons' GPU layout
//! (`gpu::sparse`'s module docs) in a mapped staging buffer, copied to the GPU, and run by the
//! same dense batch kernel as the hot part ([`BatchFfnOp`]), added into x after it.
//!
//! # The streaming area
//! Two slots, each a staging buffer the host maps for writing and a device copy the kernel
//! reads, of one chunk each (at most [`StreamConfig::chunk_bytes`]: a whole number of neurons,
//! a multiple of 32). A layer's cold neurons go through them in chunks, in ascending neuron
//! order, alternating slots:
//!
//! ```text
//! CPU: wait for slot k%2 to be free (the submission of chunk k-2 done), pack chunk k into its
//!      staging (the team of the cold neurons, in parallel), unmap
//! GPU: copy staging -> device copy, then x += chunk k's FFN for every row (submitted at once)
//! ```
//!
//! so the host packs chunk k+1 while the GPU copies and computes chunk k. The chunks' partial
//! sums are added into x one after another in chunk order, after the hot part: x + hot +
//! cold, decode's order, deterministic for a given chunk size (other chunk sizes round
//! differently). The last chunk of a layer is padded with zero rows, which add exactly zero
//! (act(0) = 0 for ReLU and SiLU).
//!
//! The area is allocated with the session, before the neurons are placed, so the budget
//! covers it; [`StreamConfig::area_bytes`] is the estimate `ember plan` and the hybrid's choice
//! of host-attention layers keep free for it. Packing on the fly costs no host memory (a copy
//! of the cold rows kept in the GPU layout would take as much RAM as the cold rows themselves,
//! 1.6 GB for a 7B at 2.2 GiB); it is a strided copy (Q4_0: each 18-byte block split into its
//! 2-byte scale and 16 bytes of quants), a few GB/s per core.

use super::{lost, spin_until_mapped};
use crate::cpu::team::Team;
use crate::engine::forward::ForwardError;
use crate::gguf::GgmlType;
use crate::gpu::ops::RmsNormOp;
use crate::gpu::sparse::{pack_rows, row_parts, BatchFfnOp, HotFfn, RowsOp};
use crate::gpu::{GpuContext, GpuError};
use crate::model::{Activation, Matrix, Model};
use std::sync::mpsc::Receiver;
use wgpu::WriteOnly;
use std::sync::Mutex;
use std::time::Instant;

/// When and how a prefill batch streams its cold neurons to the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamConfig {
    /// Batches of at least this many tokens stream; smaller ones (a chat turn's few new
    /// tokens) compute the cold neurons on the CPU. See [`StreamConfig::DEFAULT_MIN_ROWS`].
    pub min_rows: usize,
    /// The most bytes of one chunk (a slot holds one; the area is four of them: two staging
    /// buffers, two device copies).
    pub chunk_bytes: u64,
}

impl StreamConfig {
    /// The CPU computes a cold neuron's rows once per token (decode's kernels, row after row),
    /// the stream moves them once per batch. On the 16-core H100 host a 7B's cold part at
    /// --vram-budget 2.2 (about 1.6 GB) costs the CPU about 8 ms per token (decode's CPU
    /// share at tg ~85 t/s), and PCIe (about 25 GB/s) about 65 ms per batch plus the GPU's
    /// product (all in VRAM, pp512 ~1570 t/s: well under 1 ms per token for the FFN): the
    /// stream wins from about 8 tokens. llama.cpp's op offload starts at 32 rows; so does
    /// this, leaving the small batches of a conversation's turns to the CPU, whose numbers
    /// are decode's.
    pub const DEFAULT_MIN_ROWS: usize = 32;
    /// Chunks of 16 MiB: about 2400 neurons of a 7B's Q4_0 FFN, 30 GFLOP for 512 tokens,
    /// long enough that a submission per chunk costs nothing and short enough that the area
    /// (64 MiB) is 3% of a 2.2 GiB budget.
    pub const MAX_CHUNK: u64 = 16 << 20;

    /// The default under `budget` (None: everything is hot, nothing to stream): chunks of a
    /// 64th of the budget, at most [`StreamConfig::MAX_CHUNK`], so the area is at most a
    /// 16th of a small budget.
    pub fn for_budget(budget: Option<u64>) -> Option<StreamConfig> {
        budget.map(|b| StreamConfig { min_rows: Self::DEFAULT_MIN_ROWS, chunk_bytes: (b / 64).min(Self::MAX_CHUNK) })
    }

    /// Neurons per chunk for neurons of `neuron_bytes` (their three rows in the GPU layout)
    /// and at most `n_ff` of them: a multiple of 32, at least 32.
    pub fn chunk_rows(&self, neuron_bytes: u64, n_ff: usize) -> usize {
        let rows = (self.chunk_bytes / neuron_bytes.max(1)) as usize / 32 * 32;
        rows.clamp(32, n_ff.next_multiple_of(32).max(32))
    }

    /// An upper bound of the GPU bytes of the area (what a placement keeps free for it):
    /// four chunks, 1% and a page each for alignment and the allocator's rounding.
    pub fn area_bytes(&self) -> u64 {
        4 * (self.chunk_bytes * 101 / 100 + 4096)
    }
}

/// How a hybrid session runs prompts: batches of up to `batch` tokens (1: token by token),
/// streaming the cold neurons of large batches where `stream` is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillConfig {
    pub batch: usize,
    pub stream: Option<StreamConfig>,
}

impl PrefillConfig {
    /// The streaming a session of `n_ctx` positions under `budget` sets up: none without a
    /// budget (everything is hot) or where no batch reaches `min_rows`.
    pub fn stream_for(&self, n_ctx: usize, budget: Option<u64>) -> Option<StreamConfig> {
        self.stream.filter(|c| budget.is_some() && self.batch.min(n_ctx) >= c.min_rows.max(2))
    }

    /// What a placement keeps free for the streaming area, 0 without one: the same in
    /// `ember plan` and the session. The chunks ([`StreamConfig::area_bytes`]) and, for
    /// host-attention layers' products, the q | k | v read-back of a batch and every layer's
    /// two norms (upper bounds: which layers are on the host is not known yet).
    pub fn area_bytes(&self, model: &Model, n_ctx: usize, budget: Option<u64>) -> u64 {
        let hp = &model.hp;
        let tokens = self.batch.min(n_ctx) as u64;
        let attention = tokens * (hp.q_dim() + 2 * hp.kv_dim()) as u64 * 4 + hp.n_layer as u64 * (8 * hp.n_embd as u64 + 8192) + 64 * 1024;
        self.stream_for(n_ctx, budget).map_or(0, |c| c.area_bytes() + attention)
    }
}

impl From<usize> for PrefillConfig {
    /// Batches of `batch` tokens, cold neurons on the CPU.
    fn from(batch: usize) -> PrefillConfig {
        PrefillConfig { batch, stream: None }
    }
}

/// One slot: staging the host writes and the device copy the kernel reads.
struct Slot {
    staging: wgpu::Buffer,
    /// Mapped for writing now.
    mapped: bool,
    /// The map request made after its last submission.
    pending: Option<Receiver<Result<(), wgpu::BufferAsyncError>>>,
    /// Per matrix (gate, up, down_t): (quants, scales) on the device.
    device: [(wgpu::Buffer, wgpu::Buffer); 3],
}

/// Host time and volume of streamed prefill, summed since the last reset.
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamTiming {
    /// Chunks of cold neurons.
    pub chunks: u64,
    /// Chunks of host-attention layers' q/k/v and o rows, and those layers' count.
    pub attn_chunks: u64,
    pub attn_layers: u64,
    /// Bytes packed and copied (padding included).
    pub bytes: u64,
    /// Packing rows into staging (the CPU team).
    pub pack: f64,
    /// Waiting for a slot: the GPU still copying or computing the chunk before last.
    pub wait_slot: f64,
}

/// The streaming area and the batch kernels bound to each slot.
pub(super) struct StreamArea {
    pub(super) min_rows: usize,
    /// Neurons per chunk.
    rows: usize,
    slots: Vec<Slot>,
    /// Per matrix: (byte offset, bytes) of its quants and of its scales in a staging buffer.
    regions: [((u64, u64), (u64, u64)); 3],
    /// Per (gate, up, down_t) types met in the model: the batch op of each slot.
    ops: Vec<([GgmlType; 3], Vec<BatchFfnOp>)>,
    /// The slot the next chunk goes to.
    next: usize,
    pub(super) timing: StreamTiming,
    /// Host-attention layers' q/k/v and o products (None: they stay on the CPU).
    attn: Option<AttnStream>,
}

/// Host-attention layers' products on the GPU for streamed batches: their weights stream
/// through the same slots (each of a slot's three regions holds a run of one matrix's rows),
/// the outputs land side by side (q | k | v per token), the CPU keeps RoPE, the KV cache and
/// attention itself (its KV cache is on the host: uploading a layer's earlier KV would cost
/// more than the attention does there, and the cache would need VRAM).
struct AttnStream {
    /// Per slot, per region: the rows op reading xn into the qkv buffer and the one reading
    /// the attention's output into y (added into x afterwards).
    ops: Vec<Vec<Option<(RowsOp, RowsOp)>>>,
    /// Rows of the weights' type each region holds.
    caps: [usize; 3],
    /// Per layer (the host ones): the attention norm and the FFN norm, x -> xn.
    norms: Vec<Option<(RmsNormOp, RmsNormOp)>>,
    /// The q | k | v rows read back (max_tokens x width f32).
    readback: wgpu::Buffer,
    /// q_dim + 2 kv_dim.
    width: usize,
}

/// What the host-attention products need of the session: the model, which layers are on the
/// host, and the GPU session's buffers (x, xn, the qkv and attention scratch, the step
/// uniform) and the CPU part's exchange buffer y (the o product's output, added into x).
pub(super) struct AttnParts<'a> {
    pub model: &'a Model,
    pub on_host: &'a [bool],
    pub x: &'a wgpu::Buffer,
    pub qkv: &'a wgpu::Buffer,
    pub attn: &'a wgpu::Buffer,
    pub y: &'a wgpu::Buffer,
}

impl StreamArea {
    /// The area for layers whose (gate, up, down_t) types are `types` (one entry per layer),
    /// batches of up to `max_tokens` rows of `xn` (the FFN input), added into `x`; `h` is
    /// scratch of at least `max_tokens` x n_ff f32 (the session's, shared with the hot part:
    /// the kernels run one after another).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(ctx: &GpuContext, cfg: StreamConfig, types: &[[GgmlType; 3]], n_embd: usize, n_ff: usize, act: Activation, xn: &wgpu::Buffer, h: &wgpu::Buffer, x: &wgpu::Buffer, max_tokens: usize, step: &wgpu::Buffer, attn: Option<AttnParts<'_>>) -> Result<StreamArea, GpuError> {
        // Per matrix, the largest row over the layers' types.
        let mut row_max = [(0usize, 0usize); 3];
        for t in types {
            for (j, &ty) in t.iter().enumerate() {
                let (q, s) = row_parts(ty, n_embd);
                row_max[j] = (row_max[j].0.max(q), row_max[j].1.max(s));
            }
        }
        let neuron: u64 = row_max.iter().map(|&(q, s)| (q + s) as u64).sum();
        let rows = cfg.chunk_rows(neuron, n_ff);
        // Regions 256-byte aligned (copies need 4).
        let mut at = 0u64;
        let mut take = |bytes: u64| {
            let r = (at, bytes);
            at = (at + bytes).next_multiple_of(256);
            r
        };
        let regions = row_max.map(|(q, s)| (take((rows * q).max(16) as u64), take((rows * s).max(4) as u64)));
        let staging_bytes = at;
        let mut slots = Vec::with_capacity(2);
        for k in 0..2 {
            let device = [0, 1, 2].map(|j| {
                let ((_, qb), (_, sb)) = regions[j];
                let name = ["gate", "up", "down_t"][j];
                (ctx.zeros(&format!("stream slot {k} {name}"), qb), ctx.zeros(&format!("stream slot {k} {name} scales"), sb))
            });
            slots.push(Slot { staging: ctx.upload_buffer(&format!("stream slot {k} staging"), staging_bytes), mapped: true, pending: None, device });
        }
        let mut distinct: Vec<[GgmlType; 3]> = Vec::new();
        for t in types {
            if !distinct.contains(t) {
                distinct.push(*t);
            }
        }
        let mut ops = Vec::with_capacity(distinct.len());
        for t in distinct {
            let per_slot = slots
                .iter()
                .map(|s| {
                    let d = &s.device;
                    let hot = HotFfn::over_buffers(ctx, n_embd, rows, [(t[0], &d[0].0, &d[0].1), (t[1], &d[1].0, &d[1].1), (t[2], &d[2].0, &d[2].1)])?;
                    BatchFfnOp::new(ctx, &hot, xn, h, x, act, max_tokens, step)
                })
                .collect::<Result<Vec<_>, GpuError>>()?;
            ops.push((t, per_slot));
        }
        let mut area = StreamArea { min_rows: cfg.min_rows, rows, slots, regions, ops, next: 0, timing: StreamTiming::default(), attn: None };
        if let Some(parts) = attn {
            area.attn = area.attn_stream(ctx, parts, xn, max_tokens, step)?;
        }
        Ok(area)
    }

    /// The host-attention products' ops, or None where they cannot stream (no host layer,
    /// weights of different or unsupported types, shapes the buffers do not hold): those
    /// layers' products then stay on the CPU.
    fn attn_stream(&self, ctx: &GpuContext, p: AttnParts<'_>, xn: &wgpu::Buffer, max_tokens: usize, step: &wgpu::Buffer) -> Result<Option<AttnStream>, GpuError> {
        let hp = &p.model.hp;
        let (e, qd, kvd) = (hp.n_embd, hp.q_dim(), hp.kv_dim());
        let host: Vec<usize> = (0..hp.n_layer).filter(|&l| p.on_host.get(l) == Some(&true)).collect();
        let Some(&first) = host.first() else { return Ok(None) };
        let ty = p.model.layers[first].wq.ty;
        if !crate::gpu::sparse::packable(ty) {
            return Ok(None);
        }
        let same = host.iter().all(|&l| {
            let l = &p.model.layers[l];
            [&l.wq, &l.wk, &l.wv, &l.wo].iter().all(|m| m.ty == ty)
        });
        let width = qd + 2 * kvd;
        let fits = p.qkv.size() >= (max_tokens * width * 4) as u64 && p.attn.size() >= (max_tokens * qd * 4) as u64 && p.y.size() >= (max_tokens * e * 4) as u64;
        if !same || !fits || !e.is_multiple_of(32) || !qd.is_multiple_of(32) {
            return Ok(None);
        }
        // The rows of this type each region holds (its quants and scales both).
        let (qb, sb) = row_parts(ty, e.max(qd));
        let caps = self.regions.map(|((_, q), (_, s))| {
            let by_q = q as usize / qb.max(1);
            if sb == 0 { by_q } else { by_q.min(s as usize / sb) }
        });
        // A region too small for one row of this type (a down_t region of F32 rows has no room
        // for scales) is left out; none at all: no streaming.
        if caps.iter().all(|&c| c == 0) {
            return Ok(None);
        }
        let mut ops = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let mut per_region = Vec::with_capacity(3);
            for (j, (q, s)) in slot.device.iter().enumerate() {
                if caps[j] == 0 {
                    per_region.push(None);
                    continue;
                }
                let qkv = RowsOp::new(ctx, ty, e, caps[j], q, s, xn, p.qkv, max_tokens, step)?;
                let o = RowsOp::new(ctx, ty, qd, caps[j], q, s, p.attn, p.y, max_tokens, step)?;
                per_region.push(Some((qkv, o)));
            }
            ops.push(per_region);
        }
        let norms = (0..hp.n_layer)
            .map(|l| {
                p.on_host.get(l).copied().unwrap_or(false).then(|| {
                    let layer = &p.model.layers[l];
                    let wa = ctx.upload(&format!("blk.{l}.attn_norm (streamed)"), bytemuck::cast_slice(&layer.attn_norm));
                    let wf = ctx.upload(&format!("blk.{l}.ffn_norm (streamed)"), bytemuck::cast_slice(&layer.ffn_norm));
                    (RmsNormOp::new(ctx, p.x, &wa, xn, e as u32, hp.rms_eps, step), RmsNormOp::new(ctx, p.x, &wf, xn, e as u32, hp.rms_eps, step))
                })
            })
            .collect();
        let readback = ctx.readback_buffer("streamed q|k|v readback", (max_tokens * width * 4) as u64);
        Ok(Some(AttnStream { ops, caps, norms, readback, width }))
    }

    /// Whether layer `il`'s attention products stream (it is a host-attention layer and the
    /// area has their ops).
    pub(super) fn streams_attention(&self, il: usize) -> bool {
        self.attn.as_ref().is_some_and(|a| a.norms.get(il).is_some_and(Option::is_some))
    }

    /// Records layer `il`'s attention norm (x -> xn), before its q/k/v products.
    pub(super) fn record_attn_norm(&mut self, pass: &mut wgpu::ComputePass<'_>, il: usize, n: u32) {
        if let Some((norm, _)) = self.attn.as_ref().and_then(|a| a.norms[il].as_ref()) {
            norm.encode(pass, n);
            self.timing.attn_layers += 1;
        }
    }

    /// Records layer `il`'s FFN norm (x -> xn), after the o product was added into x.
    pub(super) fn record_ffn_norm(&self, pass: &mut wgpu::ComputePass<'_>, il: usize, n: u32) {
        if let Some((_, norm)) = self.attn.as_ref().and_then(|a| a.norms[il].as_ref()) {
            norm.encode(pass, n);
        }
    }

    /// The read-back buffer of q | k | v and their width per token.
    pub(super) fn qkv_readback(&self) -> Option<(&wgpu::Buffer, usize)> {
        self.attn.as_ref().map(|a| (&a.readback, a.width))
    }

    /// Streams the rows of `mats` for `n` tokens through the slots, their outputs side by side
    /// (each token's row holds every matrix's outputs in order): `o` false, the q/k/v products
    /// of xn into the qkv buffer; true, the o product of the attention's output into y.
    /// Submits `enc` first; returns a fresh encoder.
    pub(super) fn run_rows(&mut self, ctx: &GpuContext, team: &mut Team, mats: &[&Matrix], o: bool, n: u32, enc: wgpu::CommandEncoder) -> Result<wgpu::CommandEncoder, ForwardError> {
        let new_encoder = || ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("streamed attention") });
        ctx.queue.submit([enc.finish()]);
        let caps = self.attn.as_ref().ok_or_else(|| ForwardError::Gpu(GpuError::Unsupported("no streamed attention ops".into())))?.caps;
        let stride: usize = mats.iter().map(|m| m.rows).sum();
        let ids: Vec<u32> = (0..mats.iter().map(|m| m.rows).max().unwrap_or(0) as u32).collect();
        let (mut mi, mut row, mut offset) = (0usize, 0usize, 0usize);
        while mi < mats.len() {
            let k = self.next;
            self.next = (k + 1) % self.slots.len();
            self.acquire(ctx, k)?;
            // Up to one run per region, each from one matrix.
            let mut runs: Vec<(usize, &Matrix, &[u32], usize)> = Vec::with_capacity(3);
            let mut offsets = Vec::with_capacity(3);
            for (j, &cap) in caps.iter().enumerate() {
                if mi == mats.len() {
                    break;
                }
                if cap == 0 {
                    continue;
                }
                let m = mats[mi];
                let count = (m.rows - row).min(cap);
                runs.push((j, m, &ids[row..row + count], count));
                offsets.push(offset);
                (row, offset) = (row + count, offset + count);
                if row == m.rows {
                    (mi, row) = (mi + 1, 0);
                }
            }
            let t_pack = Instant::now();
            self.pack(team, k, &runs)?;
            self.timing.pack += t_pack.elapsed().as_secs_f64();
            let slot = &mut self.slots[k];
            slot.staging.unmap();
            slot.mapped = false;
            let a = self.attn.as_mut().expect("checked above");
            let mut enc = new_encoder();
            for (&(j, m, _, count), &off) in runs.iter().zip(&offsets) {
                let (q, s) = row_parts(m.ty, m.cols);
                let ((qo, _), (so, _)) = self.regions[j];
                let (qb, sb) = ((count * q) as u64, ((count * s) as u64).next_multiple_of(4));
                enc.copy_buffer_to_buffer(&slot.staging, qo, &slot.device[j].0, 0, qb);
                if s > 0 {
                    enc.copy_buffer_to_buffer(&slot.staging, so, &slot.device[j].1, 0, sb);
                }
                self.timing.bytes += qb + sb;
                let pair = a.ops[k][j].as_mut().expect("regions with room have ops");
                let op = if o { &mut pair.1 } else { &mut pair.0 };
                op.set(&ctx.queue, count, stride, off, n as usize)?;
            }
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                for &(j, ..) in &runs {
                    let pair = a.ops[k][j].as_ref().expect("regions with room have ops");
                    let op = if o { &pair.1 } else { &pair.0 };
                    op.encode(&mut pass, n);
                }
            }
            ctx.queue.submit([enc.finish()]);
            let (tx, rx) = std::sync::mpsc::channel();
            slot.staging.slice(..).map_async(wgpu::MapMode::Write, move |r| {
                let _ = tx.send(r);
            });
            slot.pending = Some(rx);
            self.timing.attn_chunks += 1;
        }
        Ok(new_encoder())
    }

    /// Neurons per chunk.
    pub(super) fn chunk_rows(&self) -> usize {
        self.rows
    }

    /// Waits (spinning on non-blocking polls) until `slot`'s staging is mapped again.
    fn acquire(&mut self, ctx: &GpuContext, slot: usize) -> Result<(), ForwardError> {
        let s = &mut self.slots[slot];
        if s.mapped {
            return Ok(());
        }
        let rx = s.pending.take().expect("an unmapped slot has a map request");
        let t = Instant::now();
        spin_until_mapped(&ctx.device, &rx)?;
        s.mapped = true;
        self.timing.wait_slot += t.elapsed().as_secs_f64();
        Ok(())
    }

    /// Runs `cold` (ascending neuron ids) of the FFN `[gate, up, down_t]` for `n` tokens on
    /// the GPU, chunk after chunk, each added into x. `enc` holds the work before (the
    /// layer's attention and hot part): submitted first, so the GPU runs it while the first
    /// chunk is packed. Returns a fresh encoder for what follows.
    pub(super) fn run_layer(&mut self, ctx: &GpuContext, team: &mut Team, mats: [&Matrix; 3], cold: &[u32], n: u32, enc: wgpu::CommandEncoder) -> Result<wgpu::CommandEncoder, ForwardError> {
        let new_encoder = || ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("streamed prefill") });
        ctx.queue.submit([enc.finish()]);
        let types = mats.map(|m| m.ty);
        let which = self.ops.iter().position(|(t, _)| *t == types).ok_or_else(|| ForwardError::Gpu(GpuError::Unsupported(format!("the streaming area has no kernels for FFN types {types:?}"))))?;
        let e = mats[0].cols;
        let parts = types.map(|ty| row_parts(ty, e));
        for ids in cold.chunks(self.rows) {
            let k = self.next;
            self.next = (k + 1) % self.slots.len();
            self.acquire(ctx, k)?;
            let t_pack = Instant::now();
            let runs: Vec<(usize, &Matrix, &[u32], usize)> = mats.iter().enumerate().map(|(j, &m)| (j, m, ids, self.rows)).collect();
            self.pack(team, k, &runs)?;
            self.timing.pack += t_pack.elapsed().as_secs_f64();
            let slot = &mut self.slots[k];
            slot.staging.unmap();
            slot.mapped = false;
            let mut enc = new_encoder();
            for (j, &(q, s)) in parts.iter().enumerate() {
                let ((qo, _), (so, _)) = self.regions[j];
                let (qb, sb) = ((self.rows * q) as u64, (self.rows * s) as u64);
                enc.copy_buffer_to_buffer(&slot.staging, qo, &slot.device[j].0, 0, qb);
                if sb > 0 {
                    enc.copy_buffer_to_buffer(&slot.staging, so, &slot.device[j].1, 0, sb);
                }
                self.timing.bytes += qb + sb;
            }
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                self.ops[which].1[k].encode(&mut pass, n);
            }
            ctx.queue.submit([enc.finish()]);
            let (tx, rx) = std::sync::mpsc::channel();
            slot.staging.slice(..).map_async(wgpu::MapMode::Write, move |r| {
                let _ = tx.send(r);
            });
            slot.pending = Some(rx);
            self.timing.chunks += 1;
        }
        Ok(new_encoder())
    }

    /// Packs `runs` into slot `k`'s mapped staging: each (region, matrix, row ids, rows)
    /// writes the rows `ids` of the matrix into the region (regions ascending), zero rows after
    /// them up to `rows`; the team's members take equal ranges of each run's rows. Mapped
    /// memory may be write-combining (device memory behind a BAR), never read: each member
    /// packs [`PACK_ROWS`] rows at a time in its own cache-sized buffer and copies them out in
    /// sequential runs.
    fn pack(&self, team: &mut Team, k: usize, runs: &[(usize, &Matrix, &[u32], usize)]) -> Result<(), ForwardError> {
        let mut view = self.slots[k].staging.slice(..).get_mapped_range_mut().map_err(lost)?;
        let members = team.size();
        let per: Vec<usize> = runs.iter().map(|r| r.3.div_ceil(members).next_multiple_of(2)).collect();
        let parts: Vec<(usize, usize)> = runs.iter().map(|r| row_parts(r.1.ty, r.1.cols)).collect();
        // Per member, its rows' bytes in each run's quants and scales (disjoint pieces).
        let mut cut: Vec<Vec<WriteOnly<'_, [u8]>>> = (0..members).map(|_| Vec::with_capacity(2 * runs.len())).collect();
        let mut rest = view.slice(..);
        let mut consumed = 0u64;
        for (i, run) in runs.iter().enumerate() {
            let ((qo, _), (so, _)) = self.regions[run.0];
            let (q, s) = parts[i];
            for (off, row) in [(qo, q), (so, s)] {
                let (_, tail) = std::mem::take(&mut rest).split_at((off - consumed) as usize);
                let (mut region, tail) = tail.split_at(run.3 * row);
                rest = tail;
                consumed = off + (run.3 * row) as u64;
                for c in cut.iter_mut() {
                    let take = (per[i] * row).min(region.len());
                    let (mine, after) = std::mem::take(&mut region).split_at(take);
                    c.push(mine);
                    region = after;
                }
            }
        }
        let cut: Vec<Mutex<Regions<'_>>> = cut.into_iter().map(|c| Mutex::new(Regions(c))).collect();
        team.run(&|member, _| {
            let mine = &mut cut[member].lock().unwrap().0;
            let (mut q_buf, mut s_buf) = (Vec::new(), Vec::new());
            for (i, &(_, m, ids, rows)) in runs.iter().enumerate() {
                let (q, s) = parts[i];
                let start = (member * per[i]).min(rows);
                let end = (start + per[i]).min(rows);
                q_buf.resize(PACK_ROWS * q, 0);
                s_buf.resize(PACK_ROWS * s, 0);
                for a in (start..end).step_by(PACK_ROWS) {
                    let b = (a + PACK_ROWS).min(end);
                    let real = &ids[a.min(ids.len())..b.min(ids.len())];
                    let (qs, ss) = (&mut q_buf[..(b - a) * q], &mut s_buf[..(b - a) * s]);
                    pack_rows(m, real, qs, ss);
                    // Padding rows: zero weights, zero scales, exactly zero output.
                    qs[real.len() * q..].fill(0);
                    ss[real.len() * s..].fill(0);
                    let r = (a - start, b - start);
                    mine[2 * i].slice(r.0 * q..r.1 * q).copy_from_slice(qs);
                    mine[2 * i + 1].slice(r.0 * s..r.1 * s).copy_from_slice(ss);
                }
            }
        });
        Ok(())
    }
}

/// One member's disjoint pieces of a mapped staging buffer.
struct Regions<'a>(Vec<WriteOnly<'a, [u8]>>);

// SAFETY: a `WriteOnly` is a pointer into mapped memory that only writes; these pieces come
// from `split_at` of one view, so no two overlap, and the view outlives the team's job (it is
// dropped after `Team::run` returns). wgpu marks only sized `WriteOnly`s Send; a slice of
// bytes is as safe to write from another thread as a `&mut [u8]` is.
unsafe impl Send for Regions<'_> {}

/// Rows a member packs at a time (a 7B's Q4_0 rows: 74 KiB of each matrix).
const PACK_ROWS: usize = 32;
