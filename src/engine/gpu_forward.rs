//! The whole forward pass on the GPU: weights uploaded once, the KV cache on the GPU, one token's
//! forward encoded into one command buffer with bind groups built once per model, and nothing
//! read back but the sampled token (or the logits when the sampler needs them).

use super::forward::{Forward, ForwardError, Logits};
use crate::gpu::matrix::{Epilogue, GpuMatrix, MatOut, MatmulOp, NormIn, RopeIn};
use crate::cpu::attention::AttnOpts;
use crate::gpu::ops::{AddOp, ArgmaxOp, BiasOp, AttentionOp, GatedActOp, GpuKvCache, HeadNormOp, RmsNormOp, RopeKvOp, RopeShape, SampleOp, SampleParams, ScaleOp};
use super::sampler::SampleRule;
use crate::gpu::{GpuContext, GpuError, Step};
use super::gpu_ops::{NamedOp, Op};
use crate::model::{Model, RopeStyle};
use crate::sparse::placement::AttnSite;
use std::sync::Arc;

/// One decode token's GPU time by dispatch (nanoseconds).
pub struct Profile {
    /// Each dispatch in its own timed pass (the pass's start and end overhead included).
    pub alone: Vec<(&'static str, f64)>,
    /// The token in one pass, as it runs: from the end of the dispatch before to the end of
    /// this one (the barrier and ramp-up between them included). None where the adapter has
    /// no timestamps inside passes.
    pub in_pass: Option<Vec<(&'static str, f64)>>,
    /// The token run normally, on the host clock (submission and readback included).
    pub wall_ns: f64,
}

/// A model's weights on the GPU.
pub struct GpuWeights {
    pub token_embd: Arc<GpuMatrix>,
    /// The output norm and projection; None when a dense layer offload leaves them to the CPU.
    pub head: Option<(wgpu::Buffer, Arc<GpuMatrix>)>,
    /// The first `layers.len()` layers of the model (all of them unless offloading).
    pub layers: Vec<GpuLayerWeights>,
    /// Bytes of GPU memory the weights take.
    pub bytes: u64,
}

pub struct GpuLayerWeights {
    /// The attention half; None when it runs outside this session (a hybrid's host-attention
    /// layer: the wrapper computes attention and the FFN norm and writes x and xn).
    attn: Option<GpuAttnWeights>,
    /// A host-attention layer's attention norm and q/k/v weights, where its q/k/v product
    /// runs here ([`AttnSite::Qkv`]).
    qkv_only: Option<(wgpu::Buffer, Stacked<3>)>,
    /// (gate and up, down); None when the FFN runs neuron-aware (the hybrid uploads its hot
    /// rows itself).
    dense_ffn: Option<(Stacked<2>, GpuMatrix)>,
}

/// A layer's attention weights on the GPU, and the FFN norm that follows them.
struct GpuAttnWeights {
    attn_norm: wgpu::Buffer,
    /// q, k and v.
    qkv: Stacked<3>,
    wo: GpuMatrix,
    biases: Option<[wgpu::Buffer; 3]>,
    /// qwen3's per-head q and k norm weights.
    qk_norm: Option<[wgpu::Buffer; 2]>,
    ffn_norm: wgpu::Buffer,
    /// Gemma's norms of the attention's and the FFN's outputs.
    post_norms: Option<[wgpu::Buffer; 2]>,
}

/// Matrices that multiply one activation vector: uploaded as one matrix where their types and
/// widths allow, so that one dispatch computes them all (each dispatch costs a few µs beyond
/// its bytes; a 4096x4096 Q4_0 product ran at a third of the bandwidth of one three times its
/// height), else apart.
enum Stacked<const N: usize> {
    One(GpuMatrix),
    Apart([GpuMatrix; N]),
}

impl<const N: usize> Stacked<N> {
    fn upload(ctx: &GpuContext, name: &str, parts: [&crate::model::Matrix; N], interleave: bool) -> Result<Self, GpuError> {
        Ok(match GpuMatrix::upload_stacked(ctx, name, &parts, interleave)? {
            Some(m) => Stacked::One(m),
            None => {
                let mut v = Vec::with_capacity(N);
                for m in parts {
                    v.push(GpuMatrix::upload(ctx, m)?);
                }
                Stacked::Apart(v.try_into().unwrap_or_else(|_| unreachable!()))
            }
        })
    }

    fn gpu_bytes(&self) -> u64 {
        match self {
            Stacked::One(m) => m.gpu_bytes(),
            Stacked::Apart(ms) => ms.iter().map(|m| m.gpu_bytes()).sum(),
        }
    }

    /// The GPU bytes of the matrix a profile entry of this name reads: `fused` names the
    /// stacked matrix, `names[i]` part i when apart.
    fn bytes_named(&self, name: &str, fused: &str, names: [&str; N]) -> Option<u64> {
        match self {
            Stacked::One(m) => (name == fused).then(|| m.gpu_bytes()),
            Stacked::Apart(ms) => names.iter().position(|n| *n == name).map(|i| ms[i].gpu_bytes()),
        }
    }
}

fn f32_buffer(ctx: &GpuContext, label: &str, v: &[f32]) -> wgpu::Buffer {
    ctx.upload(label, bytemuck::cast_slice(v))
}

impl GpuWeights {
    /// GPU bytes of the matrices a profile entry named `name` reads, summed over layers.
    pub fn matmul_bytes(&self, name: &str) -> u64 {
        let layer = |l: &GpuLayerWeights| -> Option<u64> {
            match name {
                "matmul o" => l.attn.as_ref().map(|a| a.wo.gpu_bytes()),
                "matmul down" => l.dense_ffn.as_ref().map(|f| f.1.gpu_bytes()),
                _ => l
                    .attn
                    .as_ref()
                    .map(|a| &a.qkv)
                    .or(l.qkv_only.as_ref().map(|q| &q.1))
                    .and_then(|qkv| qkv.bytes_named(name, "matmul qkv", ["matmul q", "matmul k", "matmul v"]))
                    .or_else(|| l.dense_ffn.as_ref().and_then(|f| f.0.bytes_named(name, "matmul gate_up", ["matmul gate", "matmul up"]))),
            }
        };
        match name {
            "matmul output" => self.head.as_ref().map_or(0, |h| h.1.gpu_bytes()),
            _ => self.layers.iter().filter_map(layer).sum(),
        }
    }

    /// Uploads every weight, with a progress bar on stderr.
    pub fn upload(ctx: &GpuContext, model: &Model, progress: bool) -> Result<GpuWeights, GpuError> {
        Self::upload_layers(ctx, model, model.layers.len(), true, progress)
    }

    /// Uploads the embedding and the first `n_layers` layers, and the output head when that
    /// is every layer: llama.cpp's `-ngl` dense offload. Without `dense_ffn` the FFN matrices
    /// stay on the host (a neuron-aware FFN uploads its hot rows itself).
    pub fn upload_layers(ctx: &GpuContext, model: &Model, n_layers: usize, dense_ffn: bool, progress: bool) -> Result<GpuWeights, GpuError> {
        let n_layers = n_layers.min(model.layers.len());
        Self::upload_parts(ctx, model, &vec![AttnSite::Gpu; n_layers], dense_ffn, progress)
    }

    /// [`Self::upload_layers`] for the first `sites.len()` layers, where a layer whose site is
    /// not [`AttnSite::Gpu`] keeps its attention (norms, o; q/k/v too unless its site is
    /// [`AttnSite::Qkv`]; and, in the session, its KV cache) off the GPU: the session's wrapper
    /// runs it (host attention). Such layers need an external FFN too (`dense_ffn` false): the
    /// wrapper hands the GPU the FFN norm's output.
    pub fn upload_parts(ctx: &GpuContext, model: &Model, sites: &[AttnSite], dense_ffn: bool, progress: bool) -> Result<GpuWeights, GpuError> {
        let n_layers = sites.len().min(model.layers.len());
        let all_on_gpu = sites.iter().all(|&s| s == AttnSite::Gpu);
        // Gemma runs only as a whole dense model here (the offload's and the hybrid's layers
        // have no post-norms, soft-capping or windows).
        if let Some(why) = model.hp.gpu_dense_only() {
            if n_layers < model.layers.len() || !dense_ffn || !all_on_gpu {
                return Err(GpuError::Unsupported(why));
            }
        }
        if dense_ffn && !all_on_gpu {
            return Err(GpuError::Unsupported("attention off the GPU needs the FFN off it too (the hybrid's host-attention layers)".into()));
        }
        let with_head = n_layers == model.layers.len();
        let bar = if progress { indicatif::ProgressBar::new(n_layers as u64 + 1) } else { indicatif::ProgressBar::hidden() };
        bar.set_style(indicatif::ProgressStyle::with_template("ember: uploading weights {bar:30} {pos}/{len} layers").unwrap());
        let token_embd = Arc::new(GpuMatrix::upload(ctx, &model.token_embd)?);
        let mut bytes = token_embd.gpu_bytes();
        let head = if with_head {
            let output = if model.tied_embeddings { token_embd.clone() } else { Arc::new(GpuMatrix::upload(ctx, &model.output)?) };
            bytes += if model.tied_embeddings { 0 } else { output.gpu_bytes() } + 4 * model.output_norm.len() as u64;
            Some((f32_buffer(ctx, "output_norm", &model.output_norm), output))
        } else {
            None
        };
        bar.inc(1);
        let mut layers = Vec::with_capacity(n_layers);
        for (i, l) in model.layers.iter().enumerate().take(n_layers) {
            let biases = match (&l.bq, &l.bk, &l.bv) {
                (Some(q), Some(k), Some(v)) => Some([f32_buffer(ctx, "bq", q), f32_buffer(ctx, "bk", k), f32_buffer(ctx, "bv", v)]),
                _ => None,
            };
            // The attention norm and q/k/v weights: on the GPU for both sites that run the
            // product there.
            let norm_qkv = match sites[i] {
                AttnSite::Host => None,
                AttnSite::Gpu | AttnSite::Qkv => Some((f32_buffer(ctx, &format!("blk.{i}.attn_norm"), &l.attn_norm), Stacked::upload(ctx, &format!("blk.{i}.attn_qkv"), [&l.wq, &l.wk, &l.wv], false)?)),
            };
            let (attn, qkv_only) = match (sites[i], norm_qkv) {
                (AttnSite::Gpu, Some((attn_norm, qkv))) => (Some(GpuAttnWeights {
                    attn_norm,
                    qkv,
                    wo: GpuMatrix::upload(ctx, &l.wo)?,
                    biases,
                    qk_norm: match (&l.q_norm, &l.k_norm) {
                        (Some(q), Some(k)) => Some([f32_buffer(ctx, &format!("blk.{i}.attn_q_norm"), q), f32_buffer(ctx, &format!("blk.{i}.attn_k_norm"), k)]),
                        _ => None,
                    },
                    ffn_norm: f32_buffer(ctx, &format!("blk.{i}.ffn_norm"), &l.ffn_norm),
                    post_norms: match (&l.attn_post_norm, &l.ffn_post_norm) {
                        (Some(a), Some(f)) => Some([f32_buffer(ctx, &format!("blk.{i}.post_attention_norm"), a), f32_buffer(ctx, &format!("blk.{i}.post_ffw_norm"), f)]),
                        _ => None,
                    },
                }), None),
                (_, norm_qkv) => (None, norm_qkv),
            };
            if let Some((_, qkv)) = &qkv_only {
                bytes += qkv.gpu_bytes() + 4 * l.attn_norm.len() as u64;
            }
            let lw = GpuLayerWeights {
                attn,
                qkv_only,
                dense_ffn: match dense_ffn {
                    true => Some((Stacked::upload(ctx, &format!("blk.{i}.ffn_gate_up"), [&l.ffn_gate, &l.ffn_up], true)?, GpuMatrix::upload(ctx, &l.ffn_down)?)),
                    false => None,
                },
            };
            if let Some(a) = &lw.attn {
                bytes += a.qkv.gpu_bytes() + a.wo.gpu_bytes() + 4 * (l.attn_norm.len() + l.ffn_norm.len()) as u64;
            }
            bytes += lw.dense_ffn.as_ref().map_or(0, |(gate_up, down)| gate_up.gpu_bytes() + down.gpu_bytes());
            layers.push(lw);
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(GpuWeights { token_embd, head, layers, bytes })
    }
}

pub(super) struct LayerOps {
    /// The attention half up to the FFN norm; None where it runs outside the session.
    pub(super) attn: Option<AttnOps>,
    /// A host-attention layer's q/k/v product on the GPU ([`AttnSite::Qkv`]): attention norm
    /// and q/k/v into `qkv` (before biases and RoPE), for the wrapper to read.
    pub(super) qkv_only: Option<QkvOps>,
    pub(super) ffn: FfnOps,
    /// Gemma: the FFN's output (stored in xn) normalised into `post`, then x += post.
    ffn_post: Option<(RmsNormOp, AddOp)>,
}

/// A host-attention layer's q/k/v product on the GPU.
pub(super) struct QkvOps {
    /// The attention's RMSNorm where q, k and v are apart (a stacked product holds it).
    norm: Option<RmsNormOp>,
    qkv: StackedOps,
}

/// A layer's attention half on the GPU.
pub(super) struct AttnOps {
    /// The attention's RMSNorm where q, k and v are apart (a stacked qkv product holds it: a
    /// one-token product folds it into its kernel).
    pub(super) attn_norm: Option<RmsNormOp>,
    /// One product for q, k and v, or three.
    pub(super) qkv: StackedOps,
    pub(super) biases: Option<[BiasOp; 3]>,
    /// qwen3: every head of q and k normalised in place, after the biases, before RoPE.
    pub(super) qk_norm: Option<[HeadNormOp; 2]>,
    /// RoPE + KV write; for one token the qkv product's epilogue does it where
    /// `qkv_has_rope` (llama's pairs, no biases).
    rope_kv: RopeKvOp,
    qkv_has_rope: bool,
    pub(super) attention: AttentionOp,
    /// x += Wo attn (the residual add in the product's epilogue); Gemma: xn = Wo attn.
    pub(super) o: MatmulOp,
    /// Gemma: xn normalised into `post`, then x += post.
    post_norm: Option<(RmsNormOp, AddOp)>,
    /// The FFN's RMSNorm unless the stacked gate/up product holds it (a neuron-aware FFN reads
    /// its output).
    pub(super) ffn_norm: Option<RmsNormOp>,
}

/// The products of a [`Stacked`] weight.
pub(super) enum StackedOps {
    One(MatmulOp),
    /// Gate, up apart, then the activation.
    GateUpApart(MatmulOp, MatmulOp, GatedActOp),
    QkvApart([MatmulOp; 3]),
}

/// A layer's FFN on the GPU. One per layer, built once: the size difference of the variants
/// does not matter.
#[allow(clippy::large_enum_variant)]
pub(super) enum FfnOps {
    /// h = act(gate) * up (one product over gate and up interleaved, or two and the
    /// activation), then x += W_down h.
    Dense { gate_up: StackedOps, down: MatmulOp },
    /// The FFN is not this session's: a session wrapping it records its own dispatches after
    /// the FFN norm (the hybrid's hot neurons, see `engine::hybrid`).
    External,
}

impl StackedOps {
    /// A q/k/v product's dispatches, named for profiles.
    pub(super) fn qkv_named(&self) -> Vec<NamedOp<'_>> {
        match self {
            StackedOps::QkvApart([q, k, v]) => vec![("matmul q", q as &dyn Op), ("matmul k", k), ("matmul v", v)],
            StackedOps::One(qkv) => vec![("matmul qkv", qkv)],
            StackedOps::GateUpApart(..) => unreachable!("q, k, v are stacked or apart"),
        }
    }
}

impl AttnOps {
    /// The attention half's dispatches for `n_tokens` in order, up to the FFN norm.
    fn sequence(&self, n_tokens: u32) -> Vec<(&'static str, &dyn Op)> {
        let mut v: Vec<(&'static str, &dyn Op)> = Vec::new();
        if let Some(norm) = &self.attn_norm {
            v.push(("attn_norm", norm));
        }
        v.extend(self.qkv.qkv_named());
        if let Some(b) = &self.biases {
            v.extend(b.iter().map(|op| ("bias", op as &dyn Op)));
        }
        if let Some(n) = &self.qk_norm {
            v.extend(n.iter().map(|op| ("qk_norm", op as &dyn Op)));
        }
        let rope_in_qkv = self.qkv_has_rope && matches!(&self.qkv, StackedOps::One(op) if op.folds(n_tokens));
        if !rope_in_qkv {
            v.push(("rope_kv", &self.rope_kv));
        }
        v.extend([("attention", &self.attention as &dyn Op), ("matmul o", &self.o)]);
        if let Some((norm, add)) = &self.post_norm {
            v.extend([("post_norm", norm as &dyn Op), ("post_add", add)]);
        }
        if let Some(norm) = &self.ffn_norm {
            v.push(("ffn_norm", norm));
        }
        v
    }
}

impl LayerOps {
    /// The layer's dispatches for `n_tokens` in order, each with a name for profiles.
    fn sequence(&self, n_tokens: u32) -> Vec<(&'static str, &dyn Op)> {
        let mut v = self.attention_sequence(n_tokens);
        v.extend(self.ffn_sequence());
        v
    }

    /// The attention half: everything up to and including the FFN's norm (nothing where the
    /// attention runs outside the session).
    pub(super) fn attention_sequence(&self, n_tokens: u32) -> Vec<(&'static str, &dyn Op)> {
        self.attn.as_ref().map_or_else(Vec::new, |a| a.sequence(n_tokens))
    }

    /// A host-attention layer's q/k/v product, where it runs here (else nothing).
    pub(super) fn qkv_sequence(&self) -> Vec<(&'static str, &dyn Op)> {
        let Some(q) = &self.qkv_only else { return Vec::new() };
        let mut v: Vec<(&'static str, &dyn Op)> = Vec::new();
        if let Some(norm) = &q.norm {
            v.push(("attn_norm", norm));
        }
        v.extend(q.qkv.qkv_named());
        v
    }

    /// Whether this session computes the layer's attention (else its wrapper does, and
    /// writes x and xn before the FFN).
    pub(super) fn attention_on_gpu(&self) -> bool {
        self.attn.is_some()
    }

    /// The FFN's GPU dispatches (for a split layer, the hot neurons only).
    pub(super) fn ffn_sequence(&self) -> Vec<(&'static str, &dyn Op)> {
        let mut v: Vec<(&'static str, &dyn Op)> = match &self.ffn {
            FfnOps::Dense { gate_up: StackedOps::One(gate_up), down } => vec![("matmul gate_up", gate_up), ("matmul down", down)],
            FfnOps::Dense { gate_up: StackedOps::GateUpApart(gate, up, act), down } => vec![("matmul gate", gate), ("matmul up", up), ("gated_act", act), ("matmul down", down)],
            FfnOps::Dense { gate_up: StackedOps::QkvApart(..), .. } => unreachable!("gate and up are stacked or apart"),
            FfnOps::External => Vec::new(),
        };
        if let Some((norm, add)) = &self.ffn_post {
            v.extend([("post_norm", norm as &dyn Op), ("post_add", add)]);
        }
        v
    }
}

/// Activation buffers sized for `max_tokens` tokens.
pub(super) struct Scratch {
    pub(super) ids: wgpu::Buffer,
    pub(super) x: wgpu::Buffer,
    pub(super) xn: wgpu::Buffer,
    /// q, k and v of up to max_tokens tokens, each a range of this buffer (`qkv_ranges`), so
    /// that one product fills all three.
    pub(super) qkv: wgpu::Buffer,
    /// Byte offset and size of q, k and v in `qkv` (offsets aligned for binding).
    pub(super) qkv_ranges: [(u64, u64); 3],
    pub(super) attn: wgpu::Buffer,
    /// The FFN's hidden vector act(gate) * up (gate, where gate and up are computed apart).
    pub(super) gate: wgpu::Buffer,
    pub(super) up: wgpu::Buffer,
    /// Gemma: a post-norm's output (n_embd per token), added to x.
    pub(super) post: wgpu::Buffer,
    pub(super) x_last: wgpu::Buffer,
    pub(super) xn_last: wgpu::Buffer,
    pub(super) logits_last: wgpu::Buffer,
    pub(super) logits_all: wgpu::Buffer,
    pub(super) argmax: wgpu::Buffer,
    pub(super) step: wgpu::Buffer,
    pub(super) step_last: wgpu::Buffer,
}

/// The output head: final norm and logits of the last row (and argmax), or of every row (the
/// products hold the norm, see [`GpuMatrix::bind_matmul_normed`]).
pub(super) struct HeadOps {
    output_last: MatmulOp,
    pub(super) output_all: MatmulOp,
    /// Gemma's final soft-capping of the last row's logits and of every row's.
    softcap_last: Option<ScaleOp>,
    softcap_all: Option<ScaleOp>,
    argmax: ArgmaxOp,
}

/// A model on the GPU plus one sequence's state.
pub struct GpuSession {
    pub model: Arc<Model>,
    pub ctx: Arc<GpuContext>,
    pub weights: Arc<GpuWeights>,
    pub(super) kv: GpuKvCache,
    pub(super) s: Scratch,
    pub(super) embed: crate::gpu::matrix::GetRowsOp,
    /// Gemma's embedding scale, after the lookup.
    embed_scale: Option<ScaleOp>,
    pub(super) layers: Vec<LayerOps>,
    /// Final norm, logits and argmax; None when the CPU computes them (dense layer offload).
    pub(super) head: Option<HeadOps>,
    pub(super) n_ctx: usize,
    /// Most tokens one forward call takes (larger batches are split).
    pub(super) max_tokens: usize,
    pub(super) n_past: usize,
    /// Host-readable copies of the argmax of the tokens in flight ([`Forward::decode_greedy`]).
    argmax_ring: Vec<wgpu::Buffer>,
    /// Top-k and the draw over the last logits row, writing the token where the argmax put
    /// its own; made on the first sampled decoding ([`Forward::decode_sampled`]).
    sampling: Option<SampleOp>,
}

/// Where a batch's token ids come from.
#[derive(Clone, Copy)]
enum Ids<'a> {
    Host(&'a [u32]),
    /// One token: the argmax of the batch submitted before (still on the GPU).
    PreviousArgmax,
}

impl GpuSession {
    pub fn new(model: Arc<Model>, ctx: Arc<GpuContext>, weights: Arc<GpuWeights>, n_ctx: usize) -> Result<GpuSession, GpuError> {
        Self::with_batch(model, ctx, weights, n_ctx, 512)
    }

    /// A session whose forward calls take at most `max_batch` tokens at once (longer inputs
    /// are split): the activation buffers, the all-logits one above all, scale with it.
    pub fn with_batch(model: Arc<Model>, ctx: Arc<GpuContext>, weights: Arc<GpuWeights>, n_ctx: usize, max_batch: usize) -> Result<GpuSession, GpuError> {
        Self::with_batch_logits(model, ctx, weights, n_ctx, max_batch, true)
    }

    /// [`with_batch`](Self::with_batch); without `all_logits` the buffer of every row's logits
    /// is a placeholder (batch x n_vocab floats, 100 MiB at 512 tokens of a 49k vocabulary, that
    /// a session reading only the last row's logits of a batch need not hold): the caller must
    /// then never ask for [`Logits::All`] of more than one token.
    pub fn with_batch_logits(model: Arc<Model>, ctx: Arc<GpuContext>, weights: Arc<GpuWeights>, n_ctx: usize, max_batch: usize, all_logits: bool) -> Result<GpuSession, GpuError> {
        Self::build(model, ctx, weights, n_ctx, max_batch, all_logits, None)
    }

    /// [`new`](Self::new) over `kv`, one sequence's view of a cache of several (a batched
    /// session's, `engine::gpu_batch`), of `n_ctx` positions for every attention layer.
    pub(super) fn with_kv(model: Arc<Model>, ctx: Arc<GpuContext>, weights: Arc<GpuWeights>, n_ctx: usize, kv: GpuKvCache) -> Result<GpuSession, GpuError> {
        Self::build(model, ctx, weights, n_ctx, 512, true, Some(kv))
    }

    fn build(model: Arc<Model>, ctx: Arc<GpuContext>, weights: Arc<GpuWeights>, n_ctx: usize, max_batch: usize, all_logits: bool, kv: Option<GpuKvCache>) -> Result<GpuSession, GpuError> {
        let hp = &model.hp;
        let (e, qd, kvd, ff) = (hp.n_embd as u64, hp.q_dim() as u64, hp.kv_dim() as u64, hp.n_ff as u64);
        let with_head = weights.head.is_some();
        // Without the head there are no logits to hold.
        let nv = if with_head { hp.n_vocab as u64 } else { 1 };
        // The all-logits buffer bounds the batch: it must fit in one binding.
        let max_tokens = (ctx.max_binding() / (4 * if all_logits { nv } else { 1 })).clamp(1, max_batch.max(1) as u64) as usize;
        let mt = max_tokens as u64;
        let f = |label: &str, n: u64| ctx.zeros(label, 4 * n);
        let align = ctx.limits.min_storage_buffer_offset_alignment as u64;
        let (q_bytes, kv_bytes) = (4 * mt * qd, 4 * mt * kvd);
        let k_off = q_bytes.next_multiple_of(align);
        let v_off = (k_off + kv_bytes).next_multiple_of(align);
        let s = Scratch {
            ids: f("ids", mt),
            x: f("x", mt * e),
            xn: f("xn", mt * e),
            qkv: ctx.zeros("qkv", v_off + kv_bytes),
            qkv_ranges: [(0, q_bytes), (k_off, kv_bytes), (v_off, kv_bytes)],
            attn: f("attn", mt * qd),
            gate: f("gate", mt * ff),
            // Only gate and up computed apart need it.
            up: f("up", if weights.layers.iter().any(|l| matches!(l.dense_ffn, Some((Stacked::Apart(_), _)))) { mt * ff } else { 1 }),
            post: f("post", if hp.post_norms { mt * e } else { 1 }),
            x_last: f("x_last", e),
            xn_last: f("xn_last", e),
            logits_last: f("logits_last", nv),
            logits_all: f("logits_all", if all_logits { mt * nv } else { 1 }),
            argmax: f("argmax", 3),
            step: ctx.uniform("step", bytemuck::bytes_of(&Step::default())),
            step_last: ctx.uniform("step_last", bytemuck::bytes_of(&Step::default())),
        };
        // Caches only for the layers whose attention runs here, in layer order.
        let kv_slots: Vec<Option<usize>> = weights.layers.iter().scan(0, |n, w| Some(w.attn.as_ref().map(|_| { *n += 1; *n - 1 }))).collect();
        let n_slots = kv_slots.iter().flatten().count();
        let kv = match kv {
            Some(kv) if kv.n_layer() == n_slots && kv.n_ctx == n_ctx && kv.kv_dim == hp.kv_dim() => kv,
            Some(_) => return Err(GpuError::Unsupported("the KV cache given is of another shape than the session's".into())),
            None => GpuKvCache::new(&ctx, n_slots, n_ctx, hp.kv_dim())?,
        };
        let (rope, attn_shape) = (rope_shape(hp), attn_shape(hp));
        let act = hp.activation;
        // q, k and v: sections of `qkv` (offsets in f32 elements).
        let [(q_off, _), (k_off, _), (v_off, _)] = s.qkv_ranges;
        let sections = vec![(qd as u32, (q_off / 4) as u32), (kvd as u32, (k_off / 4) as u32), (kvd as u32, (v_off / 4) as u32)];
        let [q_range, k_range, v_range] = s.qkv_ranges.map(|(off, len)| s.qkv.slice(off..off + len));
        let add = MatOut::with(Epilogue::Add);
        // The q/k/v product of x normalised by `norm` into the sections of `qkv`: the norm
        // folded into a stacked product (for one token), else a separate dispatch into xn.
        let bind_qkv = |qkv: &Stacked<3>, norm: &NormIn| -> (Option<RmsNormOp>, StackedOps) {
            match qkv {
                Stacked::One(m) => (None, StackedOps::One(m.bind_matmul_normed(&ctx, norm, &s.xn, &s.qkv, &s.step, &MatOut { epilogue: Epilogue::Store, sections: sections.clone() }))),
                Stacked::Apart(ms) => (
                    Some(RmsNormOp::new(&ctx, norm.x, norm.weight, &s.xn, e as u32, norm.eps, &s.step)),
                    StackedOps::QkvApart(std::array::from_fn(|i| ms[i].bind_matmul_out(&ctx, &s.xn, &s.qkv, &s.step, &MatOut { epilogue: Epilogue::Store, sections: vec![sections[i]] }))),
                ),
            }
        };
        let mut layers = Vec::with_capacity(hp.n_layer);
        for (il, (w, slot)) in weights.layers.iter().zip(&kv_slots).enumerate() {
            let (Some(a), Some(slot)) = (&w.attn, *slot) else {
                // Host attention: the wrapper writes x and xn; the FFN is external too
                // (`GpuWeights::upload_parts` refuses a dense one). Its q/k/v product may run
                // here, into `qkv`, for the wrapper to read.
                let qkv_only = w.qkv_only.as_ref().map(|(norm_w, qkv)| {
                    let (norm, qkv) = bind_qkv(qkv, &NormIn { x: &s.x, weight: norm_w, eps: hp.rms_eps });
                    QkvOps { norm, qkv }
                });
                layers.push(LayerOps { attn: None, qkv_only, ffn: FfnOps::External, ffn_post: None });
                continue;
            };
            let attn_norm = NormIn { x: &s.x, weight: &a.attn_norm, eps: hp.rms_eps };
            let ffn_norm = NormIn { x: &s.x, weight: &a.ffn_norm, eps: hp.rms_eps };
            let separate = |n: &NormIn| RmsNormOp::new(&ctx, n.x, n.weight, &s.xn, e as u32, n.eps, &s.step);
            // RoPE and the KV write in the qkv product's epilogue: llama's adjacent pairs, and no
            // biases or per-head norms (they come between the product and RoPE).
            let rope_in_qkv = !rope.neox && a.biases.is_none() && a.qk_norm.is_none();
            // Gemma: local layers' RoPE and window, the query scale, soft-capped scores.
            let local = hp.swa.as_ref().filter(|w| w.layers[il]);
            let rope = match local {
                Some(w) => RopeShape { base: w.rope_base, freq_scale: w.rope_freq_scale, ..rope },
                None => rope,
            };
            let attn_opts = AttnOpts { scale: hp.q_scale.unwrap_or(1.0 / (hp.head_dim as f32).sqrt()), softcap: hp.attn_softcap.unwrap_or(0.0), window: local.map_or(0, |w| w.window) };
            // Gemma: the output products store into xn, normalised into `post` and added.
            let post = |weight: &wgpu::Buffer| (RmsNormOp::new(&ctx, &s.xn, weight, &s.post, e as u32, hp.rms_eps, &s.step), AddOp::new(&ctx, &s.x, &s.post, e as u32, &s.step));
            let out_to = |post: bool| if post { (&s.xn, MatOut::with(Epilogue::Store)) } else { (&s.x, add.clone()) };
            let (attn_norm_op, qkv) = match &a.qkv {
                Stacked::One(m) if rope_in_qkv => {
                    let r = RopeIn { cache_k: kv.k_range(slot), cache_v: kv.v_range(slot), shape: rope };
                    (None, StackedOps::One(m.bind_matmul_normed_rope(&ctx, &attn_norm, &r, &s.xn, &s.qkv, &s.step, &MatOut { epilogue: Epilogue::Store, sections: sections.clone() })))
                }
                other => bind_qkv(other, &attn_norm),
            };
            let attn = AttnOps {
                attn_norm: attn_norm_op,
                qkv,
                biases: a.biases.as_ref().map(|[bq, bk, bv]| {
                    [BiasOp::new(&ctx, q_range, bq, qd as u32, &s.step), BiasOp::new(&ctx, k_range, bk, kvd as u32, &s.step), BiasOp::new(&ctx, v_range, bv, kvd as u32, &s.step)]
                }),
                qk_norm: a.qk_norm.as_ref().map(|[qn, kn]| {
                    let hd = hp.head_dim as u32;
                    [HeadNormOp::new(&ctx, q_range, qn, hd, hp.n_head as u32, hp.rms_eps, &s.step), HeadNormOp::new(&ctx, k_range, kn, hd, hp.n_head_kv as u32, hp.rms_eps, &s.step)]
                }),
                rope_kv: RopeKvOp::new(&ctx, q_range, k_range, v_range, kv.k_range(slot), kv.v_range(slot), rope, &s.step),
                qkv_has_rope: rope_in_qkv && matches!(a.qkv, Stacked::One(_)),
                attention: AttentionOp::with_opts(&ctx, q_range, kv.k_range(slot), kv.v_range(slot), &s.attn, attn_shape, attn_opts, n_ctx as u32, max_tokens as u32, &s.step)?,
                o: {
                    let (y, out) = out_to(a.post_norms.is_some());
                    a.wo.bind_matmul_out(&ctx, &s.attn, y, &s.step, &out)
                },
                post_norm: a.post_norms.as_ref().map(|[w, _]| post(w)),
                ffn_norm: (!matches!(w.dense_ffn, Some((Stacked::One(_), _)))).then(|| separate(&ffn_norm)),
            };
            let ffn = match &w.dense_ffn {
                Some((gate_up, down)) => FfnOps::Dense {
                    gate_up: match gate_up {
                        Stacked::One(m) => StackedOps::One(m.bind_matmul_normed(&ctx, &ffn_norm, &s.xn, &s.gate, &s.step, &MatOut::with(Epilogue::GatedPairs { act }))),
                        Stacked::Apart([gate, up]) => StackedOps::GateUpApart(
                            gate.bind_matmul(&ctx, &s.xn, &s.gate, &s.step),
                            up.bind_matmul(&ctx, &s.xn, &s.up, &s.step),
                            GatedActOp::new(&ctx, &s.gate, &s.up, ff as u32, act, &s.step),
                        ),
                    },
                    down: {
                        let (y, out) = out_to(a.post_norms.is_some());
                        down.bind_matmul_out(&ctx, &s.gate, y, &s.step, &out)
                    },
                },
                None => FfnOps::External,
            };
            let ffn_post = match (&w.dense_ffn, &a.post_norms) {
                (Some(_), Some([_, f])) => Some(post(f)),
                _ => None,
            };
            layers.push(LayerOps { attn: Some(attn), qkv_only: None, ffn, ffn_post });
        }
        let embed = weights.token_embd.bind_get_rows(&ctx, &s.ids, &s.x, &s.step);
        let head = weights.head.as_ref().map(|(output_norm, output)| HeadOps {
            output_last: output.bind_matmul_normed(&ctx, &NormIn { x: &s.x_last, weight: output_norm, eps: hp.rms_eps }, &s.xn_last, &s.logits_last, &s.step_last, &MatOut::default()),
            output_all: output.bind_matmul_normed(&ctx, &NormIn { x: &s.x, weight: output_norm, eps: hp.rms_eps }, &s.xn, &s.logits_all, &s.step, &MatOut::default()),
            softcap_last: hp.final_softcap.map(|c| ScaleOp::softcap(&ctx, &s.logits_last, nv as u32, c, &s.step_last)),
            softcap_all: hp.final_softcap.map(|c| ScaleOp::softcap(&ctx, &s.logits_all, nv as u32, c, &s.step)),
            argmax: ArgmaxOp::new(&ctx, &s.logits_last, nv as u32, &s.argmax, &s.step_last),
        });
        let embed_scale = hp.embd_scale.map(|v| ScaleOp::scale(&ctx, &s.x, e as u32, v, &s.step));
        let argmax_ring = (0..=ctx.tuning.decode_ahead.min(3)).map(|_| ctx.readback_buffer("argmax readback", ARGMAX_BYTES)).collect();
        Ok(GpuSession { model, ctx, weights, kv, s, embed, embed_scale, layers, head, n_ctx, max_tokens, n_past: 0, argmax_ring, sampling: None })
    }

    /// Whether layer `il`'s attention (and KV cache) runs in this session; where not, the
    /// session's wrapper computes it and writes x and xn before the layer's FFN.
    pub fn attention_on_gpu(&self, il: usize) -> bool {
        self.layers.get(il).is_some_and(|l| l.attention_on_gpu())
    }

    /// GPU bytes of the KV cache (weights and scratch buffers not included).
    pub fn state_bytes(&self) -> u64 {
        self.kv.gpu_bytes()
    }

    /// Encodes and submits one batch (at most max_tokens). Returns after submission; the caller
    /// reads what it needs.
    fn run_batch(&mut self, tokens: &[u32], want: Logits) -> Result<(), ForwardError> {
        self.submit_batch(Ids::Host(tokens), want, None, None);
        Ok(())
    }

    /// Encodes and submits one batch of `ids`; with `argmax_to`, the batch's argmax is copied
    /// there at its end. With `sample` (and the head here, and `self.sampling` made), the
    /// token drawn with it replaces the argmax's.
    fn submit_batch(&mut self, ids: Ids, want: Logits, argmax_to: Option<usize>, sample: Option<&SampleParams>) -> wgpu::SubmissionIndex {
        let n = match ids {
            Ids::Host(t) => t.len() as u32,
            Ids::PreviousArgmax => 1,
        };
        let pos0 = self.n_past as u32;
        let step = Step { n_tokens: n, pos0, n_kv: pos0 + n, _pad: 0 };
        self.set_n_kv(step.n_kv);
        let step_last = Step { n_tokens: 1, ..step };
        let q = &self.ctx.queue;
        q.write_buffer(&self.s.step, 0, bytemuck::bytes_of(&step));
        q.write_buffer(&self.s.step_last, 0, bytemuck::bytes_of(&step_last));
        let mut enc = self.ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("forward") });
        match ids {
            Ids::Host(tokens) => q.write_buffer(&self.s.ids, 0, bytemuck::cast_slice(tokens)),
            Ids::PreviousArgmax => enc.copy_buffer_to_buffer(&self.s.argmax, 0, &self.s.ids, 0, 4),
        }
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("layers"), timestamp_writes: None });
            for (_, op) in self.layer_sequence(want, n) {
                op.record(&mut pass, n);
            }
        }
        if want == Logits::Last && self.head.is_some() {
            self.copy_last_row(&mut enc, n);
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("output"), timestamp_writes: None });
            for (_, op) in self.output_sequence() {
                op.record(&mut pass, 1);
            }
            if let (Some(p), Some(op)) = (sample, &self.sampling) {
                // Written before this submission, after the one before: each queued token
                // draws with its own counter.
                op.set(&self.ctx, p);
                op.encode(&mut pass, 1);
            }
        }
        if let Some(slot) = argmax_to {
            enc.copy_buffer_to_buffer(&self.s.argmax, 0, &self.argmax_ring[slot], 0, ARGMAX_BYTES);
        }
        let index = self.ctx.queue.submit([enc.finish()]);
        self.n_past += n as usize;
        index
    }

    /// Greedy or (with `sample`: the rule and the first draw's counter) sampled decoding with
    /// tokens queued on the GPU: each step's token moves from the argmax buffer (where the
    /// sampling kernel overwrites the argmax's id) into the next step's embedding lookup, and
    /// the host reads the steps' copies behind them. Needs the head on the GPU.
    fn decode_queued(&mut self, token: u32, n: usize, sample: Option<(&SampleRule, u32)>, each: &mut dyn FnMut(u32) -> bool) -> Result<usize, ForwardError> {
        self.check(&[token])?;
        if self.n_past + n > self.n_ctx {
            return Err(ForwardError::ContextFull { needed: self.n_past + n, n_ctx: self.n_ctx, n_ctx_train: self.model.hp.n_ctx_train });
        }
        let start = self.n_past;
        let slots = self.argmax_ring.len();
        let mut queued = std::collections::VecDeque::new();
        let mut made = 0;
        while made < n {
            // Keep slots - 1 tokens queued behind the one read next.
            while queued.len() < slots && made + queued.len() < n {
                let i = made + queued.len();
                let ids = if i == 0 { Ids::Host(std::slice::from_ref(&token)) } else { Ids::PreviousArgmax };
                let p = sample.map(|(r, draw0)| SampleParams { top_k: r.top_k, top_p: r.top_p, ln_min_p: r.ln_min_p, inv_temp: r.inv_temp, seed: r.seed, draw: draw0.wrapping_add(i as u32) });
                queued.push_back(self.submit_batch(ids, Logits::Last, Some(i % slots), p.as_ref()));
            }
            let index = queued.pop_front().expect("a token is queued");
            let t = self.read_argmax_slot(made % slots, index)?;
            made += 1;
            if !each(t) {
                break;
            }
        }
        // Tokens fed after the last prediction taken are forgotten (their cache rows are
        // overwritten later).
        for index in queued {
            self.ctx.device.poll(wgpu::PollType::Wait { submission_index: Some(index), timeout: None }).map_err(|e| ForwardError::Gpu(GpuError::Lost(e.to_string())))?;
        }
        self.n_past = start + made;
        Ok(made)
    }

    /// Waits for `index` and reads the token id in readback slot `slot`.
    fn read_argmax_slot(&self, slot: usize, index: wgpu::SubmissionIndex) -> Result<u32, ForwardError> {
        let bytes = self.ctx.read_mapped(&self.argmax_ring[slot], ARGMAX_BYTES, Some(index)).map_err(ForwardError::Gpu)?;
        let word = |i: usize| u32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]);
        argmax_id([word(0), word(1), word(2)])
    }

    /// Tells the attention ops the cache's key count for the steps recorded next.
    pub(super) fn set_n_kv(&self, n_kv: u32) {
        for a in self.layers.iter().filter_map(|l| l.attn.as_ref()) {
            a.attention.set_n_kv(Some(n_kv));
        }
    }

    /// Embedding, every layer, and for [`Logits::All`] the final norm and output product.
    fn layer_sequence(&self, want: Logits, n_tokens: u32) -> Vec<NamedOp<'_>> {
        self.layer_sequence_with(want, n_tokens, &|_| Vec::new())
    }

    /// [`Self::layer_sequence`] with `external(layer)`'s dispatches after the FFN norm of each
    /// layer whose FFN this session does not hold.
    fn layer_sequence_with<'a>(&'a self, want: Logits, n_tokens: u32, external: &dyn Fn(usize) -> Vec<NamedOp<'a>>) -> Vec<NamedOp<'a>> {
        let mut v: Vec<NamedOp<'a>> = vec![("embed", &self.embed)];
        if let Some(op) = &self.embed_scale {
            v.push(("embed_scale", op));
        }
        for (il, l) in self.layers.iter().enumerate() {
            v.extend(l.sequence(n_tokens));
            if matches!(l.ffn, FfnOps::External) {
                v.extend(external(il));
            }
        }
        if let (Logits::All, Some(h)) = (want, &self.head) {
            v.push(("matmul output", &h.output_all));
            if let Some(op) = &h.softcap_all {
                v.push(("softcap", op));
            }
        }
        v
    }

    /// After `copy_last_row`: the last token's final norm, logits and argmax.
    pub(super) fn output_sequence(&self) -> Vec<(&'static str, &dyn Op)> {
        match &self.head {
            Some(h) => {
                let mut v: Vec<(&'static str, &dyn Op)> = vec![("matmul output", &h.output_last)];
                if let Some(op) = &h.softcap_last {
                    v.push(("softcap", op));
                }
                v.push(("argmax", &h.argmax));
                v
            }
            None => Vec::new(),
        }
    }

    /// Copies the first `n` tokens' q, k and v from their sections of the qkv buffer into
    /// `dst`, one after another from byte `at` (n rows of q, then of k, then of v).
    pub(super) fn copy_qkv_sections(&self, enc: &mut wgpu::CommandEncoder, n: u32, dst: &wgpu::Buffer, at: u64) {
        let hp = &self.model.hp;
        let mut at = at;
        for (&(off, _), d) in self.s.qkv_ranges.iter().zip([hp.q_dim(), hp.kv_dim(), hp.kv_dim()]) {
            let len = 4 * n as u64 * d as u64;
            enc.copy_buffer_to_buffer(&self.s.qkv, off, dst, at, len);
            at += len;
        }
    }

    pub(super) fn copy_last_row(&self, enc: &mut wgpu::CommandEncoder, n: u32) {
        let e = self.model.hp.n_embd as u64 * 4;
        enc.copy_buffer_to_buffer(&self.s.x, (n as u64 - 1) * e, &self.s.x_last, 0, e);
    }

    /// Decodes `token` at the next position with every dispatch in its own timestamped pass,
    /// then (where the adapter can) in one pass with a timestamp after each dispatch, then as it
    /// really runs, timed on the host (one pass, one submission, argmax read back). The
    /// position is not consumed. None without timestamp queries.
    pub fn profile_decode(&mut self, token: u32) -> Result<Option<Profile>, ForwardError> {
        let Some((alone, in_pass)) = self.profile_passes(token, &|_| Vec::new())? else { return Ok(None) };
        // The same token again, as one pass, timed on the host.
        let start = std::time::Instant::now();
        self.forward_argmax(&[token])?;
        let wall_ns = start.elapsed().as_secs_f64() * 1e9;
        self.n_past -= 1;
        Ok(Some(Profile { alone, in_pass, wall_ns }))
    }

    /// The timed passes of [`Self::profile_decode`] (each dispatch alone, then all in one pass),
    /// with `external(layer)`'s dispatches as the FFN of layers whose FFN this session does not
    /// hold. The position is not consumed.
    #[allow(clippy::type_complexity)]
    pub(super) fn profile_passes<'a>(&'a self, token: u32, external: &dyn Fn(usize) -> Vec<NamedOp<'a>>) -> Result<Option<(Vec<(&'static str, f64)>, Option<Vec<(&'static str, f64)>>)>, ForwardError> {
        let n_ops = self.layer_sequence_with(Logits::Last, 1, external).len() + self.output_sequence().len();
        let Some(mut timer) = crate::gpu::timer::PassTimer::new(&self.ctx, n_ops as u32) else { return Ok(None) };
        self.check(&[token])?;
        let pos0 = self.n_past as u32;
        let step = Step { n_tokens: 1, pos0, n_kv: pos0 + 1, _pad: 0 };
        self.set_n_kv(step.n_kv);
        self.ctx.queue.write_buffer(&self.s.step, 0, bytemuck::bytes_of(&step));
        self.ctx.queue.write_buffer(&self.s.step_last, 0, bytemuck::bytes_of(&step));
        self.ctx.queue.write_buffer(&self.s.ids, 0, bytemuck::bytes_of(&token));
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        let mut names = Vec::with_capacity(n_ops);
        for (name, op) in self.layer_sequence_with(Logits::Last, 1, external) {
            op.record(&mut timer.pass(&mut enc, name), 1);
            names.push(name);
        }
        self.copy_last_row(&mut enc, 1);
        for (name, op) in self.output_sequence() {
            op.record(&mut timer.pass(&mut enc, name), 1);
            names.push(name);
        }
        let times = timer.finish(&self.ctx, enc).map_err(ForwardError::Gpu)?;
        let alone = names.iter().copied().zip(times).collect();

        let in_pass = if self.ctx.has_timestamps_in_passes() {
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            let mut i = 0;
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("layers"), timestamp_writes: None });
                timer.mark(&mut pass, 0);
                for (_, op) in self.layer_sequence_with(Logits::Last, 1, external) {
                    op.record(&mut pass, 1);
                    i += 1;
                    timer.mark(&mut pass, i);
                }
            }
            self.copy_last_row(&mut enc, 1);
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("output"), timestamp_writes: None });
                for (_, op) in self.output_sequence() {
                    op.record(&mut pass, 1);
                    i += 1;
                    timer.mark(&mut pass, i);
                }
            }
            let ends = timer.finish_marks(&self.ctx, enc).map_err(ForwardError::Gpu)?;
            Some(names.iter().copied().zip(crate::gpu::timer::intervals(&ends)).collect())
        } else {
            None
        };
        Ok(Some((alone, in_pass)))
    }

    /// Runs `tokens` through the layers this session holds and reads back their hidden states
    /// (`tokens.len()` rows of n_embd): the GPU half of a dense layer offload.
    pub fn forward_hidden(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ForwardError> {
        self.check(tokens)?;
        let e = self.model.hp.n_embd;
        let mut out = Vec::with_capacity(tokens.len() * e);
        for chunk in tokens.chunks(self.max_tokens) {
            self.run_batch(chunk, Logits::All)?;
            out.extend(self.ctx.read::<f32>(&self.s.x, chunk.len() * e).map_err(ForwardError::Gpu)?);
        }
        Ok(out)
    }

    /// Most tokens one batch takes.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub(super) fn check(&self, tokens: &[u32]) -> Result<(), ForwardError> {
        super::forward::check_batch(&self.model.hp, self.n_past, self.n_ctx, tokens)
    }
}

impl Forward for GpuSession {
    fn forward(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>, ForwardError> {
        self.check(tokens)?;
        let nv = self.model.hp.n_vocab;
        let mut all = Vec::new();
        for chunk in tokens.chunks(self.max_tokens) {
            self.run_batch(chunk, want)?;
            if want == Logits::All {
                all.extend(self.ctx.read::<f32>(&self.s.logits_all, chunk.len() * nv).map_err(ForwardError::Gpu)?);
            }
        }
        match want {
            Logits::All => Ok(all),
            Logits::Last => self.ctx.read::<f32>(&self.s.logits_last, nv).map_err(ForwardError::Gpu),
        }
    }

    fn forward_argmax(&mut self, tokens: &[u32]) -> Result<u32, ForwardError> {
        self.check(tokens)?;
        for chunk in tokens.chunks(self.max_tokens) {
            self.run_batch(chunk, Logits::Last)?;
        }
        let out: Vec<u32> = self.ctx.read(&self.s.argmax, 3).map_err(ForwardError::Gpu)?;
        argmax_id([out[0], out[1], out[2]])
    }

    fn decode_greedy(&mut self, token: u32, n: usize, each: &mut dyn FnMut(u32) -> bool) -> Result<usize, ForwardError> {
        if self.head.is_none() || n == 0 {
            // Without a head there is no argmax on the GPU.
            return super::forward::decode_greedy_one_by_one(self, token, n, each);
        }
        self.decode_queued(token, n, None, each)
    }

    fn decode_sampled(&mut self, token: u32, n: usize, rule: &SampleRule, draw0: u32, each: &mut dyn FnMut(u32) -> bool) -> Result<usize, ForwardError> {
        if self.head.is_none() || n == 0 || !(1..=64).contains(&rule.top_k) {
            // Without a head there are no logits here; the top-k kernel keeps at most 64.
            return super::forward::decode_sampled_one_by_one(self, token, n, rule, draw0, each);
        }
        if self.sampling.is_none() {
            let nv = self.model.hp.n_vocab as u32;
            self.sampling = Some(SampleOp::new(&self.ctx, &self.s.logits_last, nv, &self.s.argmax, &self.s.step_last));
        }
        self.decode_queued(token, n, Some((rule, draw0)), each)
    }

    fn n_past(&self) -> usize {
        self.n_past
    }

    fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    fn reset(&mut self) {
        self.n_past = 0;
    }

    fn model(&self) -> &Arc<Model> {
        &self.model
    }

    fn backend_name(&self) -> String {
        format!("GPU {:?}", self.ctx.adapter.backend)
    }

    fn as_gpu(&mut self) -> Option<&mut GpuSession> {
        Some(self)
    }
}

/// The model's RoPE for the GPU kernels.
pub(super) fn rope_shape(hp: &crate::model::HParams) -> RopeShape {
    RopeShape {
        n_head: hp.n_head as u32,
        n_head_kv: hp.n_head_kv as u32,
        head_dim: hp.head_dim as u32,
        rope_dim: hp.rope_dim as u32,
        base: hp.rope_base,
        freq_scale: hp.rope_freq_scale,
        neox: hp.rope_style == RopeStyle::Halves,
    }
}

/// The model's attention heads for the GPU kernels.
pub(super) fn attn_shape(hp: &crate::model::HParams) -> crate::gpu::ops::AttnShape {
    crate::gpu::ops::AttnShape { n_head: hp.n_head as u32, n_head_kv: hp.n_head_kv as u32, head_dim: hp.head_dim as u32 }
}

/// Bytes the argmax kernel writes: the id, its logit's bits, and the non-finite flag.
pub(super) const ARGMAX_BYTES: u64 = 12;

/// The token id from the argmax kernel's output, or the error the CPU path gives when the
/// logits hold a NaN or an infinity (the kernel flags them; see argmax.wgsl).
pub(super) fn argmax_id(out: [u32; 3]) -> Result<u32, ForwardError> {
    if out[2] != 0 {
        return Err(ForwardError::NonFiniteLogits);
    }
    Ok(out[0])
}
