//! The forward pass's other kernels: norms, RoPE with the KV-cache write, attention,
//! activations, the residual add, argmax, top-k and sampling.
//!
//! Every op builds its pipeline, uniform parameters and bind groups once in `new` (its buffers
//! are fixed for the model's lifetime); `encode` only records dispatches whose sizes follow from
//! `n_tokens`. The kernels read `n_tokens`, `pos0` and `n_kv` from the shared [`super::Step`]
//! uniform buffer, which the caller writes once per forward call. Activations are f32 arrays
//! laid out `[token][dim]`. An op's input and output buffers must be distinct (wgpu refuses one
//! buffer bound both read-only and read-write in a dispatch).

use crate::cpu::attention::AttnOpts;
use super::{GpuContext, GpuError, ShaderSpec};
use super::shaders::compose;
use std::sync::Arc;
use wgpu::{BindGroup, Buffer, ComputePass, ComputePipeline};

pub(super) const RMS_NORM: &str = compose!("workgroup_sum.wgsl", "rms_norm.wgsl");
const HEAD_NORM: &str = compose!("workgroup_sum.wgsl", "head_norm.wgsl");
pub(super) const ROPE_KV: &str = compose!("rope_angle.wgsl", "rope_kv.wgsl");
const ATTENTION_DECODE: &str = compose!("attention_decode.wgsl");
const ATTENTION_PREFILL: &str = compose!("attention_prefill.wgsl");
const GATED_ACT: &str = compose!("gated_act.wgsl", "act.wgsl");
const ACT: &str = compose!("act.wgsl");
const RESIDUAL_ADD: &str = compose!("residual_add.wgsl");
const ARGMAX: &str = compose!("argmax.wgsl");
const TOPK: &str = compose!("topk.wgsl");
const SAMPLE: &str = compose!("sample.wgsl");

/// (file name, source) of this module's kernels.
pub const SHADERS: &[(&str, &str)] = &[
    ("rms_norm.wgsl", RMS_NORM),
    ("head_norm.wgsl", HEAD_NORM),
    ("rope_kv.wgsl", ROPE_KV),
    ("attention_decode.wgsl", ATTENTION_DECODE),
    ("attention_prefill.wgsl", ATTENTION_PREFILL),
    ("gated_act.wgsl", GATED_ACT),
    ("act.wgsl", ACT),
    ("residual_add.wgsl", RESIDUAL_ADD),
    ("argmax.wgsl", ARGMAX),
    ("topk.wgsl", TOPK),
    ("sample.wgsl", SAMPLE),
];

/// The most workgroups one grid dimension may hold (WebGPU's default limit).
pub(super) const MAX_GROUPS: u32 = 65535;

/// A storage buffer, or a byte range of one: q, k and v are ranges of one buffer that a single
/// product fills (see `engine::gpu_forward`). A kernel that binds several ranges of one buffer
/// must declare them all `read_write` (wgpu refuses one buffer bound read-only and read-write in
/// one dispatch).
#[derive(Clone, Copy, Debug)]
pub struct BufRange<'a> {
    pub buffer: &'a Buffer,
    pub offset: u64,
    pub size: u64,
}

impl<'a> From<&'a Buffer> for BufRange<'a> {
    fn from(buffer: &'a Buffer) -> Self {
        BufRange { buffer, offset: 0, size: buffer.size() }
    }
}

impl<'a> From<wgpu::BufferSlice<'a>> for BufRange<'a> {
    fn from(s: wgpu::BufferSlice<'a>) -> Self {
        BufRange { buffer: s.buffer(), offset: s.offset(), size: s.size() }
    }
}

impl<'a> BufRange<'a> {
    pub(super) fn binding(self) -> wgpu::BindingResource<'a> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer: self.buffer, offset: self.offset, size: std::num::NonZeroU64::new(self.size) })
    }
}

/// One pipeline with its bind group, ready to dispatch.
pub(super) struct Kernel {
    pipeline: Arc<ComputePipeline>,
    bind: BindGroup,
}

impl Kernel {
    /// `entries` are (binding, buffer) for the bindings the entry point uses (the pipeline's
    /// layout is derived from the shader and holds only those).
    pub(super) fn new(ctx: &GpuContext, spec: &ShaderSpec, entries: &[(u32, &Buffer)]) -> Kernel {
        let ranges: Vec<(u32, BufRange)> = entries.iter().map(|&(binding, buf)| (binding, buf.into())).collect();
        Self::with_ranges(ctx, spec, &ranges)
    }

    /// [`new`](Self::new) with buffer ranges.
    pub(super) fn with_ranges(ctx: &GpuContext, spec: &ShaderSpec, entries: &[(u32, BufRange)]) -> Kernel {
        let pipeline = ctx.pipeline(spec);
        let entries: Vec<wgpu::BindGroupEntry> = entries.iter().map(|&(binding, r)| wgpu::BindGroupEntry { binding, resource: r.binding() }).collect();
        let bind = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor { label: Some(spec.name()), layout: &pipeline.get_bind_group_layout(0), entries: &entries });
        Kernel { pipeline, bind }
    }

    fn dispatch(&self, pass: &mut ComputePass<'_>, x: u32, y: u32) {
        self.dispatch3(pass, x, y, 1)
    }

    fn dispatch3(&self, pass: &mut ComputePass<'_>, x: u32, y: u32, z: u32) {
        if x == 0 || y == 0 || z == 0 {
            return;
        }
        self.bind(pass);
        pass.dispatch_workgroups(x, y, z);
    }

    /// Sets the pipeline and bind group, for a dispatch the caller makes (e.g. indirect).
    pub(super) fn bind(&self, pass: &mut ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind, &[]);
    }
}

/// A grid of `n` workgroups (or more, up to one row's worth): x up to 65535, the rest in y.
fn grid(n: u32) -> (u32, u32) {
    if n <= MAX_GROUPS {
        (n, 1)
    } else {
        let y = n.div_ceil(MAX_GROUPS);
        (n.div_ceil(y), y)
    }
}

fn params(ctx: &GpuContext, label: &str, words: &[u32]) -> Buffer {
    ctx.uniform(label, bytemuck::cast_slice(words))
}

/// `out = x / rms(x) * weight` per token row of `dim` values. One workgroup of 256 threads per
/// row.
pub struct RmsNormOp {
    kernel: Kernel,
    _params: Buffer,
}

impl RmsNormOp {
    pub fn new(ctx: &GpuContext, x: &Buffer, weight: &Buffer, out: &Buffer, dim: u32, eps: f32, step: &Buffer) -> Self {
        let p = params(ctx, "rms_norm.params", &[dim, eps.to_bits(), 0, 0]);
        let kernel = Kernel::new(ctx, &ShaderSpec::new("ops/rms_norm", RMS_NORM, "main"), &[(0, x), (1, weight), (2, out), (3, &p), (4, step)]);
        RmsNormOp { kernel, _params: p }
    }

    pub fn encode(&self, pass: &mut ComputePass<'_>, n_tokens: u32) {
        let (x, y) = grid(n_tokens);
        self.kernel.dispatch(pass, x, y);
    }
}

/// The KV cache on the GPU: per layer a K and a V buffer of `n_ctx` positions of `kv_dim` f16
/// values, two to a u32 (`[pos][kv_dim]` halves). One buffer per layer and kind, so that none
/// exceeds the adapter's largest storage binding.
///
/// A cache of several sequences ([`with_seqs`](Self::with_seqs)) holds them one after another
/// in each layer's buffers (each at an offset the adapter can bind), so that one dispatch can
/// reach every sequence's keys (a batched decode's RoPE and attention, rows by sequence); a
/// [`view`](Self::view) of it is one sequence's cache, which a session binds as ranges
/// ([`k_range`](Self::k_range)).
#[derive(Clone)]
pub struct GpuKvCache {
    pub n_ctx: usize,
    pub kv_dim: usize,
    k: Vec<Buffer>,
    v: Vec<Buffer>,
    /// Bytes from one sequence's cache to the next's in each buffer.
    seq_bytes: u64,
    n_seqs: usize,
    /// The sequence this value stands for (0 unless a view).
    seq: usize,
}

impl GpuKvCache {
    pub fn new(ctx: &GpuContext, n_layer: usize, n_ctx: usize, kv_dim: usize) -> Result<Self, GpuError> {
        Self::with_seqs(ctx, n_layer, n_ctx, kv_dim, 1)
    }

    /// The caches of `n_seqs` sequences in one buffer per layer and kind;
    /// [`GpuError::Unsupported`] where those buffers exceed what the adapter binds at once
    /// (then give each sequence its own cache).
    pub fn with_seqs(ctx: &GpuContext, n_layer: usize, n_ctx: usize, kv_dim: usize, n_seqs: usize) -> Result<Self, GpuError> {
        if !kv_dim.is_multiple_of(2) {
            return Err(GpuError::Unsupported(format!("KV cache: kv_dim {kv_dim} is odd (f16 values are stored in pairs)")));
        }
        let n_seqs = n_seqs.max(1);
        let bytes = (n_ctx * kv_dim * 2) as u64;
        // Each sequence's cache starts where a binding may start (and on a 16-byte word, as the
        // attention reads it).
        let align = (ctx.limits.min_storage_buffer_offset_alignment as u64).max(16);
        let seq_bytes = if n_seqs == 1 { bytes } else { bytes.next_multiple_of(align) };
        let total = seq_bytes * n_seqs as u64;
        let limit = ctx.max_binding().min(ctx.limits.max_buffer_size);
        if total > limit {
            return Err(GpuError::Unsupported(format!(
                "KV cache: one layer's keys for {n_seqs} x {n_ctx} positions take {} MiB, more than the {} MiB this GPU binds at once; use a smaller context",
                total >> 20,
                limit >> 20
            )));
        }
        let k = (0..n_layer).map(|l| ctx.zeros(&format!("kv.k{l}"), total)).collect();
        let v = (0..n_layer).map(|l| ctx.zeros(&format!("kv.v{l}"), total)).collect();
        Ok(GpuKvCache { n_ctx, kv_dim, k, v, seq_bytes, n_seqs, seq: 0 })
    }

    /// Sequence `seq`'s cache (the same buffers).
    pub fn view(&self, seq: usize) -> GpuKvCache {
        assert!(seq < self.n_seqs, "KV cache: sequence {seq} of {}", self.n_seqs);
        GpuKvCache { seq, ..self.clone() }
    }

    pub fn n_seqs(&self) -> usize {
        self.n_seqs
    }

    /// Where sequence `seq`'s cache starts in each buffer, in u32 words.
    pub fn seq_words(&self, seq: usize) -> u32 {
        (seq as u64 * self.seq_bytes / 4) as u32
    }

    /// Bytes of GPU memory the cache holds; a view, its sequence's share.
    pub fn gpu_bytes(&self) -> u64 {
        let all: u64 = self.k.iter().chain(&self.v).map(|b| b.size()).sum();
        all / self.n_seqs as u64
    }

    /// Layer `layer`'s keys of this value's sequence.
    pub fn k_range(&self, layer: usize) -> BufRange<'_> {
        self.range(&self.k[layer])
    }

    /// Layer `layer`'s values of this value's sequence.
    pub fn v_range(&self, layer: usize) -> BufRange<'_> {
        self.range(&self.v[layer])
    }

    fn range<'a>(&self, b: &'a Buffer) -> BufRange<'a> {
        BufRange { buffer: b, offset: self.seq as u64 * self.seq_bytes, size: (self.n_ctx * self.kv_dim * 2) as u64 }
    }

    pub fn n_layer(&self) -> usize {
        self.k.len()
    }

    /// Layer `layer`'s key buffer, every sequence's.
    pub fn k(&self, layer: usize) -> &Buffer {
        &self.k[layer]
    }

    /// Layer `layer`'s value buffer, every sequence's.
    pub fn v(&self, layer: usize) -> &Buffer {
        &self.v[layer]
    }
}

/// Shape of RoPE for one model.
#[derive(Clone, Copy, Debug)]
pub struct RopeShape {
    pub n_head: u32,
    pub n_head_kv: u32,
    pub head_dim: u32,
    /// Rotated values at the start of each head (even, at most head_dim); the rest pass through.
    pub rope_dim: u32,
    pub base: f32,
    pub freq_scale: f32,
    /// Halves (i, i + rope_dim/2), GPT-NeoX style (qwen2); otherwise adjacent pairs (llama).
    pub neox: bool,
}

/// RoPE on q and k of `n_tokens` tokens at positions `pos0..`: q rotated in place; k rotated
/// and, with v, written as f16 into the cache at those positions (k and v are not changed).
/// Positions at or past the cache's capacity are not written. 64 threads per workgroup over
/// (work item, token): q rotation pairs, then k words, then v words.
pub struct RopeKvOp {
    kernel: Kernel,
    items: u32,
    _params: Buffer,
}

/// [`RopeKvOp`] for a batched decode: row r of q, k and v is a sequence's token, at the
/// position and cache offset `rows[r]` holds (`[cache word, position, 0, 0]` per row, the
/// caches a [`GpuKvCache::with_seqs`]'s buffers); one dispatch for every row.
pub struct RopeKvRowsOp {
    kernel: Kernel,
    items: u32,
    _params: Buffer,
}

impl RopeKvRowsOp {
    /// `n_ctx`: positions of each sequence's cache.
    #[allow(clippy::too_many_arguments)]
    pub fn new<'a>(ctx: &GpuContext, q: impl Into<BufRange<'a>>, k: impl Into<BufRange<'a>>, v: impl Into<BufRange<'a>>, cache_k: &Buffer, cache_v: &Buffer, n_ctx: u32, shape: RopeShape, rows: &Buffer, step: &Buffer) -> Self {
        let (p, items) = rope_params(ctx, shape, n_ctx);
        let kernel = Kernel::with_ranges(ctx, &ShaderSpec::new("ops/rope_kv", ROPE_KV, "batch"), &[(0, q.into()), (1, k.into()), (2, v.into()), (3, cache_k.into()), (4, cache_v.into()), (5, (&p).into()), (6, step.into()), (7, rows.into())]);
        RopeKvRowsOp { kernel, items, _params: p }
    }

    /// Records the step's `n_rows` rows (the Step uniform's n_tokens).
    pub fn encode(&self, pass: &mut ComputePass<'_>, n_rows: u32) {
        assert!(n_rows <= MAX_GROUPS, "RoPE: at most {MAX_GROUPS} rows per batch");
        self.kernel.dispatch(pass, self.items.div_ceil(64), n_rows);
    }
}

/// RoPE's parameters for a cache of `n_ctx` positions, and the work items of one token.
fn rope_params(ctx: &GpuContext, shape: RopeShape, n_ctx: u32) -> (Buffer, u32) {
    let RopeShape { n_head, n_head_kv, head_dim, rope_dim, base, freq_scale, neox } = shape;
    assert!(head_dim.is_multiple_of(2) && rope_dim.is_multiple_of(2) && rope_dim <= head_dim && rope_dim > 0, "RoPE: head_dim {head_dim} and rope_dim {rope_dim} must be even, rope_dim <= head_dim");
    // As ember::cpu::ops::Rope::new: computed on the host so both backends share the bits.
    let theta_scale = base.powf(-2.0 / rope_dim as f32);
    let p = params(ctx, "rope_kv.params", &[n_head, n_head_kv, head_dim, rope_dim, theta_scale.to_bits(), freq_scale.to_bits(), neox as u32, n_ctx]);
    (p, n_head * head_dim / 2 + n_head_kv * head_dim)
}

impl RopeKvOp {
    #[allow(clippy::too_many_arguments)]
    pub fn new<'a>(ctx: &GpuContext, q: impl Into<BufRange<'a>>, k: impl Into<BufRange<'a>>, v: impl Into<BufRange<'a>>, cache_k: impl Into<BufRange<'a>>, cache_v: impl Into<BufRange<'a>>, shape: RopeShape, step: &Buffer) -> Self {
        let (cache_k, cache_v) = (cache_k.into(), cache_v.into());
        let kv_dim = shape.n_head_kv * shape.head_dim;
        let n_ctx = (cache_k.size / (kv_dim as u64 * 2)).min(u32::MAX as u64) as u32;
        let (p, items) = rope_params(ctx, shape, n_ctx);
        let kernel = Kernel::with_ranges(ctx, &ShaderSpec::new("ops/rope_kv", ROPE_KV, "main"), &[(0, q.into()), (1, k.into()), (2, v.into()), (3, cache_k), (4, cache_v), (5, (&p).into()), (6, step.into())]);
        RopeKvOp { kernel, items, _params: p }
    }

    pub fn encode(&self, pass: &mut ComputePass<'_>, n_tokens: u32) {
        assert!(n_tokens <= MAX_GROUPS, "RoPE: at most {MAX_GROUPS} tokens per batch");
        self.kernel.dispatch(pass, self.items.div_ceil(64), n_tokens);
    }
}

/// Shape of attention for one model.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_head: u32,
    pub n_head_kv: u32,
    pub head_dim: u32,
}

/// Most chunks a decode step's keys are split into (each at least 64 keys).
pub const DECODE_MAX_CHUNKS: u32 = 64;

/// Up to this many keys a decode step's attention is one dispatch, a workgroup per head group
/// walking every key, rather than split over chunks and combined by a second dispatch.
pub const SINGLE_PASS_MAX_KEYS: u32 = 256;

/// Causal attention over the KV cache: `out[t][h * head_dim..]` for the query at position
/// `pos0 + t` over cached keys `0..=pos0 + t`; GQA (head h reads KV head h / (n_head /
/// n_head_kv)); scale 1/sqrt(head_dim); q rounded to f16 as the CPU backend does; f32 softmax
/// and accumulation. [`with_opts`](Self::with_opts): another scale, soft-capped scores and a
/// sliding window (masked keys weigh nothing; key tiles wholly before a window are skipped,
/// so a local layer's decode reads about `window` keys, though every chunk is dispatched).
///
/// Decode (`n_tokens == 1`): flash-decoding. The keys are split into at most
/// [`DECODE_MAX_CHUNKS`] chunks (a multiple of 64 keys, at least 64; fewer for short contexts);
/// one workgroup of 64 threads per (chunk, up to 8 query heads of one KV head) walks its chunk
/// in tiles of 64 keys with an online softmax, reading each key and value once for those heads,
/// and writes partial max, sum and output per head; a combine pass (one workgroup of 256
/// threads per head) merges them.
/// Prefill: one workgroup of 64 threads per (tile of up to 8 queries, head), tiles of 64 keys,
/// online softmax per query; every key row is read once per query tile.
///
/// Needs head_dim % 8 == 0 (the cache is read 8 halves at a time), head_dim <= 512.
pub struct AttentionOp {
    partial: Kernel,
    combine: Kernel,
    /// One workgroup per head group over every key, no combine (short contexts).
    single: Kernel,
    /// Keys in the cache when the next decode step runs, if the caller said
    /// ([`set_n_kv`](Self::set_n_kv)); u32::MAX when not. Atomic so that a session's commands
    /// can be recorded on another thread (the hybrid's recorder).
    n_kv: std::sync::atomic::AtomicU32,
    /// Up to this many keys a decode step is one dispatch (the tuning's attn_single_max_keys).
    single_max_keys: u32,
    prefill: Kernel,
    n_head: u32,
    gq: u32,
    n_chunks: u32,
    tq: u32,
    max_tokens: u32,
    /// A batched decode's kernels (single, partial, combine over rows), where built by
    /// [`rows`](Self::rows).
    by_rows: Option<[Kernel; 3]>,
    _buffers: [Buffer; 4],
}

impl AttentionOp {
    #[allow(clippy::too_many_arguments)]
    pub fn new<'a>(ctx: &GpuContext, q: impl Into<BufRange<'a>>, cache_k: impl Into<BufRange<'a>>, cache_v: impl Into<BufRange<'a>>, out: &Buffer, shape: AttnShape, n_ctx: u32, max_tokens: u32, step: &Buffer) -> Result<Self, GpuError> {
        Self::build(ctx, q.into(), cache_k.into(), cache_v.into(), out, shape, AttnOpts::causal(shape.head_dim as usize), n_ctx, max_tokens, step, None, None)
    }

    /// [`new`](Self::new) with a score scale of its own, soft-capping and a sliding window
    /// (Gemma; the same options as the CPU's attention).
    #[allow(clippy::too_many_arguments)]
    pub fn with_opts<'a>(ctx: &GpuContext, q: impl Into<BufRange<'a>>, cache_k: impl Into<BufRange<'a>>, cache_v: impl Into<BufRange<'a>>, out: &Buffer, shape: AttnShape, opts: AttnOpts, n_ctx: u32, max_tokens: u32, step: &Buffer) -> Result<Self, GpuError> {
        Self::build(ctx, q.into(), cache_k.into(), cache_v.into(), out, shape, opts, n_ctx, max_tokens, step, None, None)
    }

    /// A batched decode's attention ([`encode_rows`](Self::encode_rows)): row r of q (and of
    /// out) is a sequence's query, at the position and cache offset `rows[r]` holds (`[cache
    /// word, position, 0, 0]`, the caches a [`GpuKvCache::with_seqs`]'s buffers of `n_ctx`
    /// positions per sequence), up to `max_rows` rows, each with its own partials.
    #[allow(clippy::too_many_arguments)]
    pub fn rows<'a>(ctx: &GpuContext, q: impl Into<BufRange<'a>>, cache_k: &Buffer, cache_v: &Buffer, out: &Buffer, shape: AttnShape, n_ctx: u32, max_rows: u32, rows: &Buffer, step: &Buffer) -> Result<Self, GpuError> {
        Self::build(ctx, q.into(), cache_k.into(), cache_v.into(), out, shape, AttnOpts::causal(shape.head_dim as usize), n_ctx, max_rows, step, None, Some(rows))
    }

    /// [`new`](Self::new) writing its decode partials into `share`'s buffers rather than its
    /// own (1 MiB per op at 64 chunks of 32 heads of 128): for ops that never run at the same
    /// time, such as a batched decode's per-sequence attentions, recorded one after another
    /// (the dispatches' writes to one buffer are ordered). `share` must be of the same shape
    /// and context.
    #[allow(clippy::too_many_arguments)]
    pub fn sharing<'a>(ctx: &GpuContext, q: impl Into<BufRange<'a>>, cache_k: impl Into<BufRange<'a>>, cache_v: impl Into<BufRange<'a>>, out: &Buffer, shape: AttnShape, n_ctx: u32, max_tokens: u32, step: &Buffer, share: &AttentionOp) -> Result<Self, GpuError> {
        Self::build(ctx, q.into(), cache_k.into(), cache_v.into(), out, shape, AttnOpts::causal(shape.head_dim as usize), n_ctx, max_tokens, step, Some(share), None)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(ctx: &GpuContext, q: BufRange<'_>, cache_k: BufRange<'_>, cache_v: BufRange<'_>, out: &Buffer, shape: AttnShape, opts: AttnOpts, n_ctx: u32, max_tokens: u32, step: &Buffer, share: Option<&AttentionOp>, rows: Option<&Buffer>) -> Result<Self, GpuError> {
        let AttnShape { n_head, n_head_kv, head_dim } = shape;
        let unsupported = |why: String| Err(GpuError::Unsupported(format!("attention: {why}")));
        if !head_dim.is_multiple_of(8) || head_dim == 0 || head_dim > 512 {
            return unsupported(format!("head_dim {head_dim} is not a multiple of 8 up to 512"));
        }
        if n_head_kv == 0 || !n_head.is_multiple_of(n_head_kv) {
            return unsupported(format!("{n_head} query heads do not divide into {n_head_kv} KV heads"));
        }
        let kv_dim = n_head_kv * head_dim;
        let cache_bytes = n_ctx as u64 * kv_dim as u64 * 2;
        if cache_k.size < cache_bytes || cache_v.size < cache_bytes {
            return unsupported(format!("the cache buffers hold fewer than {n_ctx} positions"));
        }
        let q_bytes = max_tokens as u64 * (n_head * head_dim) as u64 * 4;
        if q.size < q_bytes || out.size() < q_bytes {
            return unsupported(format!("q or out holds fewer than {max_tokens} tokens"));
        }
        let shared = ctx.limits.max_compute_workgroup_storage_size;
        let group = n_head / n_head_kv;
        // Query heads per decode workgroup: the largest divisor of the group up to 8 that fits.
        // Threads per decode workgroup, one key each per tile (the tuning's attn_wg: 64, 128
        // or 256).
        let wg = match ctx.tuning.attn_wg {
            128 => 128,
            256 => 256,
            _ => 64u32,
        };
        let lanes = (wg / (head_dim / 8)).max(1);
        // q, scores, weights, the lanes' outputs and sums (shaders/attention_decode.wgsl).
        let decode_shared = |gq: u32| gq * head_dim * 4 + 2 * gq * wg * 4 + 2 * wg * 16 + gq * lanes * 4;
        let gq = (1..=group.min(8)).rev().find(|&d| group.is_multiple_of(d) && decode_shared(d) <= shared).unwrap_or(1);
        let prefill_shared = |tq: u32| tq * head_dim * 4 + tq * 64 * 4 + 2 * tq * 4;
        let mut tq = 8;
        while tq > 1 && prefill_shared(tq) > shared {
            tq /= 2;
        }
        if prefill_shared(tq) > shared || decode_shared(gq) > shared {
            return unsupported(format!("head_dim {head_dim} needs more workgroup memory than the GPU's {shared} bytes"));
        }
        let kv4 = kv_dim / 8;
        // As llama.cpp's flash attention: with a cap, the scale is divided by it, then the
        // shader takes cap * tanh(score).
        let cap = opts.softcap;
        let scale = if cap > 0.0 { opts.scale / cap } else { opts.scale }.to_bits();
        let window = u32::try_from(opts.window).unwrap_or(u32::MAX);
        let n_chunks = n_ctx.div_ceil(64).clamp(1, DECODE_MAX_CHUNKS);

        let decode_params = params(ctx, "attention.decode.params", &[n_head, group, kv4, n_chunks, scale, cap.to_bits(), window, 0]);
        let (part_o, part_ml) = match share {
            Some(op) if op._buffers[1].size() == (n_head * n_chunks * head_dim) as u64 * 4 && op._buffers[2].size() == (n_head * n_chunks) as u64 * 8 => (op._buffers[1].clone(), op._buffers[2].clone()),
            Some(_) => return unsupported("the shared partials are of another shape".into()),
            // Rows: each row's own partials.
            None => {
                let n = if rows.is_some() { max_tokens } else { 1 };
                (ctx.zeros("attention.part_o", (n * n_head * n_chunks * head_dim) as u64 * 4), ctx.zeros("attention.part_ml", (n * n_head * n_chunks) as u64 * 8))
            }
        };
        let decode = |entry: &str| ShaderSpec::new("ops/attention_decode", ATTENTION_DECODE, entry).with_all(&[("HD", head_dim), ("GQ", gq), ("WG", wg)]);
        // `partial` and `single` share one function that writes either the partials or the
        // output, so both bind all of them.
        let attend = [(0, q), (1, cache_k), (2, cache_v), (3, (&part_o).into()), (4, (&part_ml).into()), (5, out.into()), (6, (&decode_params).into()), (7, step.into())];
        let partial = Kernel::with_ranges(ctx, &decode("partial"), &attend);
        let combine = Kernel::new(ctx, &decode("combine"), &[(3, &part_o), (4, &part_ml), (5, out), (6, &decode_params), (7, step)]);
        let single = Kernel::with_ranges(ctx, &decode("single"), &attend);
        let by_rows = rows.map(|rows| {
            let attend = [(0, q), (1, cache_k), (2, cache_v), (3, (&part_o).into()), (4, (&part_ml).into()), (5, out.into()), (6, (&decode_params).into()), (8, rows.into())];
            let combine = [(3, (&part_o).into()), (4, (&part_ml).into()), (5, out.into()), (6, (&decode_params).into()), (8, rows.into())];
            [
                Kernel::with_ranges(ctx, &decode("single_rows"), &attend),
                Kernel::with_ranges(ctx, &decode("partial_rows"), &attend),
                Kernel::with_ranges(ctx, &decode("combine_rows"), &combine),
            ]
        });

        let prefill_params = params(ctx, "attention.prefill.params", &[n_head, group, kv4, 0, scale, cap.to_bits(), window, 0]);
        let spec = ShaderSpec::new("ops/attention_prefill", ATTENTION_PREFILL, "main").with("HD", head_dim).with("TQ", tq);
        let prefill = Kernel::with_ranges(ctx, &spec, &[(0, q), (1, cache_k), (2, cache_v), (3, out.into()), (4, (&prefill_params).into()), (5, step.into())]);
        Ok(AttentionOp { partial, combine, single, n_kv: std::sync::atomic::AtomicU32::new(u32::MAX), single_max_keys: ctx.tuning.attn_single_max_keys, prefill, n_head, gq, n_chunks, tq, max_tokens, by_rows, _buffers: [decode_params, part_o, part_ml, prefill_params] })
    }

    /// The most chunks a decode step is split into.
    pub fn n_chunks(&self) -> u32 {
        self.n_chunks
    }

    /// Tells the op how many keys the cache holds when the next recorded decode step runs
    /// (the Step uniform's n_kv): up to [`SINGLE_PASS_MAX_KEYS`] it then records one dispatch
    /// instead of two. Without it, or with None, the split kernel is recorded, right for any
    /// count.
    pub fn set_n_kv(&self, n_kv: Option<u32>) {
        self.n_kv.store(n_kv.unwrap_or(u32::MAX), std::sync::atomic::Ordering::Relaxed);
    }

    pub fn encode(&self, pass: &mut ComputePass<'_>, n_tokens: u32) {
        debug_assert!(n_tokens <= self.max_tokens, "attention: {n_tokens} tokens, room for {}", self.max_tokens);
        if n_tokens == 1 && Some(self.n_kv.load(std::sync::atomic::Ordering::Relaxed)).filter(|&n| n != u32::MAX).is_some_and(|n| n <= self.single_max_keys) {
            self.single.dispatch(pass, 1, self.n_head / self.gq);
        } else if n_tokens == 1 {
            self.partial.dispatch(pass, self.n_chunks, self.n_head / self.gq);
            self.combine.dispatch(pass, self.n_head, 1);
        } else {
            let tiles = n_tokens.div_ceil(self.tq);
            assert!(tiles <= MAX_GROUPS, "attention: too many tokens in one batch");
            self.prefill.dispatch(pass, tiles, self.n_head);
        }
    }

    /// Records a batched decode's attention over `n_rows` rows (see [`rows`](Self::rows)), the
    /// longest with `max_n_kv` keys: every row in one dispatch (one pass over all keys up to
    /// the one-pass limit, else chunks and a combine).
    pub fn encode_rows(&self, pass: &mut ComputePass<'_>, n_rows: u32, max_n_kv: u32) {
        let [single, partial, combine] = self.by_rows.as_ref().expect("attention: built for rows (AttentionOp::rows)");
        assert!(n_rows <= self.max_tokens, "attention: {n_rows} rows, room for {}", self.max_tokens);
        if max_n_kv <= self.single_max_keys {
            single.dispatch3(pass, 1, self.n_head / self.gq, n_rows);
        } else {
            partial.dispatch3(pass, self.n_chunks, self.n_head / self.gq, n_rows);
            combine.dispatch(pass, self.n_head, n_rows);
        }
    }
}

/// `gate[i] = act(gate[i]) * up[i]` (SiLU or ReLU) over `n_tokens * dim` values, in place.
/// 256 threads per workgroup, one value each.
pub struct GatedActOp {
    kernel: Kernel,
    dim: u32,
    _params: Buffer,
}

impl GatedActOp {
    pub fn new(ctx: &GpuContext, gate: &Buffer, up: &Buffer, dim: u32, act: crate::model::Activation, step: &Buffer) -> Self {
        let p = params(ctx, "gated_act.params", &[dim, 0, 0, 0]);
        // The shader's entry points are named after the activations.
        let entry = act.name();
        let kernel = Kernel::new(ctx, &ShaderSpec::new("ops/gated_act", GATED_ACT, entry), &[(0, gate), (1, up), (2, &p), (3, step)]);
        GatedActOp { kernel, dim, _params: p }
    }

    pub fn encode(&self, pass: &mut ComputePass<'_>, n_tokens: u32) {
        let (x, y) = grid((n_tokens * self.dim).div_ceil(256));
        self.kernel.dispatch(pass, x, y);
    }
}

/// `x += y` over `n_tokens * dim` values. 256 threads per workgroup, one value each.
pub struct AddOp {
    kernel: Kernel,
    dim: u32,
    _params: Buffer,
}

impl AddOp {
    pub fn new(ctx: &GpuContext, x: &Buffer, y: &Buffer, dim: u32, step: &Buffer) -> Self {
        let p = params(ctx, "residual_add.params", &[dim, 0, 0, 0]);
        let kernel = Kernel::new(ctx, &ShaderSpec::new("ops/residual_add", RESIDUAL_ADD, "main"), &[(0, x), (1, y), (2, &p), (3, step)]);
        AddOp { kernel, dim, _params: p }
    }

    pub fn encode(&self, pass: &mut ComputePass<'_>, n_tokens: u32) {
        let (x, y) = grid((n_tokens * self.dim).div_ceil(256));
        self.kernel.dispatch(pass, x, y);
    }
}

/// In place over `n_tokens * dim` values: `x *= s` ([`ScaleOp::scale`]: Gemma's embedding
/// scale) or `x = c tanh(x / c)` ([`ScaleOp::softcap`]: its final logit soft-capping). The
/// residual-add shader's `scale` and `softcap` entry points.
pub struct ScaleOp {
    kernel: Kernel,
    dim: u32,
    _params: Buffer,
}

impl ScaleOp {
    pub fn scale(ctx: &GpuContext, x: &Buffer, dim: u32, s: f32, step: &Buffer) -> Self {
        Self::build(ctx, "scale", x, dim, s, step)
    }

    pub fn softcap(ctx: &GpuContext, x: &Buffer, dim: u32, cap: f32, step: &Buffer) -> Self {
        Self::build(ctx, "softcap", x, dim, cap, step)
    }

    fn build(ctx: &GpuContext, entry: &str, x: &Buffer, dim: u32, v: f32, step: &Buffer) -> Self {
        let p = params(ctx, "residual_add.params", &[dim, v.to_bits(), 0, 0]);
        let kernel = Kernel::new(ctx, &ShaderSpec::new("ops/residual_add", RESIDUAL_ADD, entry), &[(0, x), (2, &p), (3, step)]);
        ScaleOp { kernel, dim, _params: p }
    }

    pub fn encode(&self, pass: &mut ComputePass<'_>, n_tokens: u32) {
        let (x, y) = grid((n_tokens * self.dim).div_ceil(256));
        self.kernel.dispatch(pass, x, y);
    }
}

/// `x[t][i] += bias[i]` for every token t (qwen2's q/k/v biases): the residual-add shader's
/// broadcasting entry point.
pub struct BiasOp {
    kernel: Kernel,
    dim: u32,
    _params: Buffer,
}

impl BiasOp {
    pub fn new<'a>(ctx: &GpuContext, x: impl Into<BufRange<'a>>, bias: &Buffer, dim: u32, step: &Buffer) -> Self {
        let p = params(ctx, "add_bias.params", &[dim, 0, 0, 0]);
        let kernel = Kernel::with_ranges(ctx, &ShaderSpec::new("ops/residual_add", RESIDUAL_ADD, "bias"), &[(0, x.into()), (1, bias.into()), (2, (&p).into()), (3, step.into())]);
        BiasOp { kernel, dim, _params: p }
    }

    pub fn encode(&self, pass: &mut ComputePass<'_>, n_tokens: u32) {
        let (x, y) = grid((n_tokens * self.dim).div_ceil(256));
        self.kernel.dispatch(pass, x, y);
    }
}

/// Every head of a q or k range normalised in place: per token row, `n_heads` heads of
/// `head_dim` values, each divided by its RMS and multiplied by `weight` (qwen3's per-head
/// norms). One workgroup of 64 threads per head.
pub struct HeadNormOp {
    kernel: Kernel,
    n_heads: u32,
    _params: Buffer,
}

impl HeadNormOp {
    pub fn new<'a>(ctx: &GpuContext, x: impl Into<BufRange<'a>>, weight: &Buffer, head_dim: u32, n_heads: u32, eps: f32, step: &Buffer) -> Self {
        let p = params(ctx, "head_norm.params", &[head_dim, n_heads, eps.to_bits(), 0]);
        let kernel = Kernel::with_ranges(ctx, &ShaderSpec::new("ops/head_norm", HEAD_NORM, "main"), &[(0, x.into()), (1, weight.into()), (2, (&p).into()), (3, step.into())]);
        HeadNormOp { kernel, n_heads, _params: p }
    }

    pub fn encode(&self, pass: &mut ComputePass<'_>, n_tokens: u32) {
        let (x, y) = grid(n_tokens * self.n_heads);
        self.kernel.dispatch(pass, x, y);
    }
}

/// Greedy argmax of the last token's logits row (row `step.n_tokens - 1` of `logits`, which
/// must hold that many rows): writes (index u32, value f32 bits) into `out` (8 bytes); the
/// lowest index on ties; -inf and NaN never win (as `ember::cpu::ops::argmax`). Two passes:
/// up to 256 blocks of 256 threads, then one workgroup over the blocks' winners.
pub struct ArgmaxOp {
    blocks: Kernel,
    finish: Kernel,
    n_blocks: u32,
    _buffers: [Buffer; 2],
}

impl ArgmaxOp {
    pub fn new(ctx: &GpuContext, logits: &Buffer, n_vocab: u32, out: &Buffer, step: &Buffer) -> Self {
        // Indices carry a flag in their top bit between the passes (argmax.wgsl).
        assert!(n_vocab > 0 && n_vocab < 1 << 31 && out.size() >= 12);
        let n_blocks = n_vocab.div_ceil(2048).min(256);
        let block_len = n_vocab.div_ceil(n_blocks);
        let p = params(ctx, "argmax.params", &[n_vocab, n_blocks, block_len, 0]);
        let part = ctx.zeros("argmax.part", n_blocks as u64 * 8);
        let blocks = Kernel::new(ctx, &ShaderSpec::new("ops/argmax", ARGMAX, "blocks"), &[(0, logits), (1, &part), (3, &p), (4, step)]);
        let finish = Kernel::new(ctx, &ShaderSpec::new("ops/argmax", ARGMAX, "finish"), &[(1, &part), (2, out), (3, &p)]);
        ArgmaxOp { blocks, finish, n_blocks, _buffers: [p, part] }
    }

    pub fn encode(&self, pass: &mut ComputePass<'_>, _n_tokens: u32) {
        self.blocks.dispatch(pass, self.n_blocks, 1);
        self.finish.dispatch(pass, 1, 1);
    }
}

/// Top-k (1 <= k <= 64) of the last token's logits row (row `step.n_tokens - 1`): writes k
/// (index u32, value f32 bits) pairs into `out`, values descending, the lower index first on
/// ties; -inf and NaN are never chosen (with fewer than k other values the rest read
/// (u32::MAX, -inf)). Two passes: blocks of 256 threads x E values (E = 16, more for
/// vocabularies over 256k) select their top k, then one workgroup selects the top k of the
/// blocks' candidates. Selection by bisection over order-preserving u32 keys (32 workgroup-wide
/// counts find the k-th largest key; ties at it go to the lowest indices), then a rank sort of
/// the k winners.
pub struct TopKOp {
    blocks: Kernel,
    finish: Kernel,
    n_blocks: u32,
    k: u32,
    _buffers: [Buffer; 2],
}

impl TopKOp {
    pub fn new(ctx: &GpuContext, logits: &Buffer, n_vocab: u32, k: u32, out: &Buffer, step: &Buffer) -> Self {
        assert!((1..=64).contains(&k), "top-k: k = {k} is not in 1..=64");
        assert!(n_vocab > 0 && out.size() >= k as u64 * 8);
        // Entries per thread: 16, or more when the blocks' candidates would not fit in one
        // workgroup's 256 * E.
        let mut e = 16u32;
        while n_vocab.div_ceil(256 * e) * k > 256 * e {
            e *= 2;
        }
        let n_blocks = n_vocab.div_ceil(256 * e);
        let p = params(ctx, "topk.params", &[n_vocab, n_blocks, k, 0]);
        let cand = ctx.zeros("topk.cand", (n_blocks * k) as u64 * 8);
        let topk = |entry: &str| ShaderSpec::new("ops/topk", TOPK, entry).with("E", e);
        let blocks = Kernel::new(ctx, &topk("blocks"), &[(0, logits), (1, &cand), (3, &p), (4, step)]);
        let finish = Kernel::new(ctx, &topk("finish"), &[(1, &cand), (2, out), (3, &p)]);
        TopKOp { blocks, finish, n_blocks, k, _buffers: [p, cand] }
    }

    pub fn k(&self) -> u32 {
        self.k
    }

    pub fn encode(&self, pass: &mut ComputePass<'_>, _n_tokens: u32) {
        self.blocks.dispatch(pass, self.n_blocks, 1);
        self.finish.dispatch(pass, 1, 1);
    }
}

/// The sampling rule as the GPU takes it (the engine's `SampleRule` plus the draw's counter):
/// keep the `top_k` (1 to 64) best, then top-p, a floor at `ln_min_p` below the best logit,
/// weights at 1 / `inv_temp`, and draw number `draw` of `seed` (shaders/sample.wgsl).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleParams {
    pub top_k: u32,
    pub top_p: f32,
    pub ln_min_p: f32,
    pub inv_temp: f32,
    pub seed: u64,
    pub draw: u32,
}

impl SampleParams {
    fn words(&self) -> [u32; 8] {
        [self.top_k, self.top_p.to_bits(), self.ln_min_p.to_bits(), self.inv_temp.to_bits(), self.seed as u32, (self.seed >> 32) as u32, self.draw, 0]
    }
}

/// Sampling of the last token's logits row on the GPU: the top 64 ([`TopKOp`]), then one
/// thread drawing from the first `top_k` of them (shaders/sample.wgsl), writing the token id into
/// word 0 of `out`, an [`ArgmaxOp`]'s output (run the argmax first: its non-finite flag stays
/// and reports broken logits as in greedy decoding). The rule's parameters, the draw counter
/// with them, live in a uniform buffer that [`set`](Self::set) writes before each submission.
pub struct SampleOp {
    topk: TopKOp,
    sample: Kernel,
    params: Buffer,
    _cand: Buffer,
}

impl SampleOp {
    pub fn new(ctx: &GpuContext, logits: &Buffer, n_vocab: u32, out: &Buffer, step: &Buffer) -> Self {
        let k = 64;
        let cand = ctx.zeros("sample.cand", k as u64 * 8);
        let topk = TopKOp::new(ctx, logits, n_vocab, k, &cand, step);
        let params = ctx.uniform("sample.params", bytemuck::cast_slice(&[0u32; 8]));
        let sample = Kernel::new(ctx, &ShaderSpec::new("ops/sample", SAMPLE, "sample"), &[(0, &cand), (1, out), (2, &params)]);
        SampleOp { topk, sample, params, _cand: cand }
    }

    /// The rule for the dispatches submitted next (queue order: a later `set` does not reach
    /// a submission made before it).
    pub fn set(&self, ctx: &GpuContext, p: &SampleParams) {
        assert!((1..=64).contains(&p.top_k), "sample: top_k = {} is not in 1..=64", p.top_k);
        ctx.queue.write_buffer(&self.params, 0, bytemuck::cast_slice(&p.words()));
    }

    pub fn encode(&self, pass: &mut ComputePass<'_>, n_tokens: u32) {
        self.topk.encode(pass, n_tokens);
        self.sample.dispatch(pass, 1, 1);
    }
}
