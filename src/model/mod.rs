//! Model architectures: hyper-parameters read from GGUF metadata and the weights of each layer.
//!
//! Every supported architecture is one file holding an [`ArchSpec`]: the GGUF architecture
//! names it answers to, its RoPE layout and whether attention projections carry biases. The
//! layer recipe itself (pre-norm attention + gated FFN) is shared by the whole llama family.

mod bamboo;
mod gemma2;
mod gemma3;
mod llama;
mod phi3;
mod qwen2;
mod qwen3;
pub mod quantize;
mod weights;

pub use weights::{Matrix, TensorStore};

use crate::gguf::{GgufError, GgufFile};
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("unsupported architecture {0:?} (ember runs: {1})")]
    UnsupportedArch(String, String),
    #[error("missing tensor {0:?}; the file is not a complete {1} model")]
    MissingTensor(String, String),
    #[error("tensor {name:?} has shape {got:?}, expected {want:?}")]
    BadShape { name: String, got: Vec<u64>, want: Vec<u64> },
    #[error("tensor {name:?} has type {ty}, which ember cannot use for {role}")]
    UnsupportedType { name: String, ty: crate::gguf::GgmlType, role: &'static str },
    #[error("invalid hyper-parameter: {0}")]
    BadHParams(String),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// How a pair of values is rotated by RoPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (x[2i], x[2i+1]): llama.cpp's "normal" mode, used by GGUF llama models
    /// (the converter permutes q/k rows into this layout).
    Adjacent,
    /// Halves (x[i], x[i + d/2]): GPT-NeoX style, used by qwen2.
    Halves,
}

/// The gated FFN's activation: the hidden value of neuron i is `act(g_i, u_i)` for its gate
/// and up pre-activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `silu(g) * u` (SwiGLU).
    Silu,
    /// `relu(g) * u` (ReLU-fied llama models, PowerInfer's ReluLLaMA).
    Relu,
    /// dReLU, `relu(g) * relu(u)` (TurboSparse, Bamboo: ReLU on both branches, so a neuron is
    /// silent unless both are positive). Its gate factor is ReLU's, so every path that decides
    /// from the gate alone (`g > 0`) keeps a superset of the firing neurons and gets the exact
    /// result once the up value's ReLU is applied.
    Drelu,
    /// GeGLU, `gelu(g) * u` with GELU's tanh approximation (Gemma 2 and 3), computed as
    /// llama.cpp's CPU backend does (`ops::gelu_tanh`; the GPU's dense products and gated
    /// activation too; the sparse kernels do not have it).
    GeluTanh,
}

impl Activation {
    pub fn name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::Relu => "relu",
            Activation::Drelu => "drelu",
            Activation::GeluTanh => "gelu",
        }
    }

    /// Whether the gate passes through a ReLU: a neuron whose gate is not positive contributes
    /// exactly zero (ReLU and dReLU), which is what `--ffn relu` needs.
    pub fn gate_is_relu(self) -> bool {
        matches!(self, Activation::Relu | Activation::Drelu)
    }
}

/// What distinguishes one architecture of the llama family from another.
#[derive(Debug)]
pub struct ArchSpec {
    /// `general.architecture` values this spec handles.
    pub names: &'static [&'static str],
    pub rope: RopeStyle,
    /// q, k and v projections have biases.
    pub qkv_bias: bool,
    /// The FFN activation when the file does not say (`ember.ffn_activation`).
    pub activation: Activation,
    /// Each head of q and k passes through an RMSNorm of its own (`attn_q_norm`,
    /// `attn_k_norm`, `head_dim` weights) before RoPE.
    pub qk_norm: bool,
    /// The FFN's gate and up are one tensor, `ffn_up` of 2 x n_ff rows (gate first), as phi3
    /// writes them; q, k and v may be one `attn_qkv` tensor in every architecture.
    pub fused_gate_up: bool,
    /// Gemma's additions (embedding scale, post-norms, soft-capping, sliding-window layers).
    pub gemma: Option<GemmaSpec>,
}

/// What Gemma 2 and 3 add to the llama layer, with the defaults llama.cpp uses where the file
/// says nothing (see gemma2.rs and gemma3.rs). Every Gemma multiplies the token embedding by
/// sqrt(n_embd), has `post_attention_norm` and `post_ffw_norm`, and scales q before attention.
#[derive(Debug)]
pub struct GemmaSpec {
    /// Sliding-window layers: il is local when `il % swa_pattern < swa_pattern - 1`, unless
    /// the file's `sliding_window_pattern` says otherwise.
    pub swa_pattern: usize,
    /// The window when the file has no `attention.sliding_window` key (0: no local layers).
    pub default_window: usize,
    /// Attention score soft-capping (`attn_logit_softcapping`): `Some(default)` where the
    /// architecture always caps, `None` where it never does.
    pub attn_softcap: Option<f32>,
    /// Final logit soft-capping when the file has no `final_logit_softcapping` key.
    pub final_softcap: Option<f32>,
    /// The RoPE of local layers.
    pub swa_rope: SwaRope,
    /// The layer count of the 27B model, whose query scale is 1/sqrt(n_embd / n_head) instead
    /// of 1/sqrt(head_dim) (llama.cpp recognises it by its layer count).
    pub layers_27b: usize,
}

/// The RoPE of a model's sliding-window layers (`rope.freq_base_swa` overrides the base).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SwaRope {
    /// The global layers' base and scaling (Gemma 2).
    Global,
    /// This base, unscaled (Gemma 3's local layers: 10000).
    Fixed(f32),
}

/// Sliding-window attention: which layers have it, over how many positions, with which RoPE.
#[derive(Clone, Debug, PartialEq)]
pub struct SlidingWindow {
    /// A query at position p sees keys `p - window + 1 ..= p` (llama.cpp masks p - k >= window).
    pub window: usize,
    /// Per layer: whether it is local (windowed).
    pub layers: Vec<bool>,
    pub rope_base: f32,
    pub rope_freq_scale: f32,
}

const ARCHITECTURES: &[&ArchSpec] = &[&llama::LLAMA, &qwen2::QWEN2, &qwen3::QWEN3, &phi3::PHI3, &bamboo::BAMBOO, &gemma2::GEMMA2, &gemma3::GEMMA3];

fn arch_spec(name: &str) -> Result<&'static ArchSpec> {
    ARCHITECTURES.iter().copied().find(|a| a.names.contains(&name)).ok_or_else(|| {
        let known: Vec<&str> = ARCHITECTURES.iter().flat_map(|a| a.names.iter().copied()).collect();
        ModelError::UnsupportedArch(name.to_string(), known.join(", "))
    })
}

/// Largest trained context accepted (16M tokens; real models stop at 1M or so): larger means
/// corruption, and contexts are bounded by it.
const MAX_CTX_TRAIN: usize = 1 << 24;
/// Largest RoPE base accepted (real models use 1e4 to 1e8).
const MAX_ROPE_BASE: f32 = 1e12;
/// Largest linear RoPE scaling factor accepted.
const MAX_ROPE_SCALING: f32 = 1024.0;

/// Hyper-parameters of a llama-family model.
#[derive(Clone, Debug)]
pub struct HParams {
    pub arch: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_vocab: usize,
    /// Context length the model was trained for.
    pub n_ctx_train: usize,
    pub rope_base: f32,
    /// Number of leading dimensions of each head that RoPE rotates.
    pub rope_dim: usize,
    /// Linear RoPE scaling: positions are multiplied by this (1 = none).
    pub rope_freq_scale: f32,
    pub rope_style: RopeStyle,
    pub rms_eps: f32,
    pub activation: Activation,
    /// The token embedding is multiplied by this (Gemma: sqrt(n_embd)).
    pub embd_scale: Option<f32>,
    /// q is multiplied by this after RoPE and attention scores are not scaled again (Gemma,
    /// as llama.cpp does it: the product rounds q to f16 after the scaling). `None`: scores
    /// are scaled by 1/sqrt(head_dim) after the dot product.
    pub q_scale: Option<f32>,
    /// Attention scores become `cap * tanh(s / cap)` (Gemma 2).
    pub attn_softcap: Option<f32>,
    /// Logits become `cap * tanh(l / cap)` (Gemma 2, some Gemma 3).
    pub final_softcap: Option<f32>,
    /// Local (sliding-window) layers, where the model has them.
    pub swa: Option<SlidingWindow>,
    /// Each layer has `post_attention_norm` and `post_ffw_norm` (Gemma).
    pub post_norms: bool,
}

impl HParams {
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// One layer's KV cache for `n_ctx` positions: f16 keys and values.
    pub fn kv_bytes_per_layer(&self, n_ctx: usize) -> u64 {
        n_ctx as u64 * self.kv_dim() as u64 * 2 * 2
    }

    fn from_gguf(f: &GgufFile, spec: &ArchSpec) -> Result<Self> {
        let arch = f.get_str("general.architecture")?.to_string();
        let key = |k: &str| format!("{arch}.{k}");
        // An optional key that is present must have the right type: a wrongly typed one
        // silently replaced by a default would run a different model than the file describes.
        let opt_u = |k: &str| -> Result<Option<u64>> { f.get(&key(k)).map(|_| f.get_u64(&key(k))).transpose().map_err(ModelError::from) };
        let opt_f = |k: &str| -> Result<Option<f32>> { f.get(&key(k)).map(|_| f.get_f32(&key(k))).transpose().map_err(ModelError::from) };
        let opt_s = |k: &str| -> Result<Option<&str>> { f.get(k).map(|_| f.get_str(k)).transpose().map_err(ModelError::from) };
        let req_u = |k: &str| -> Result<usize> { Ok(usize::try_from(f.get_u64(&key(k))?).unwrap_or(usize::MAX)) };
        let usize_of = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        let n_embd = req_u("embedding_length")?;
        let n_head = req_u("attention.head_count")?;
        let n_head_kv = opt_u("attention.head_count_kv")?.map(usize_of).unwrap_or(n_head);
        // Qwen3 and others give heads a size of their own, not n_embd / n_head.
        let head_dim = opt_u("attention.key_length")?.map(usize_of).unwrap_or(n_embd.checked_div(n_head).unwrap_or(0));
        if let Some(v) = opt_u("attention.value_length")? {
            if usize_of(v) != head_dim {
                return Err(ModelError::BadHParams(format!("{arch}.attention.value_length = {v} differs from the key length {head_dim}; ember's attention needs them equal")));
            }
        }
        let n_vocab = match opt_u("vocab_size")? {
            Some(v) => usize_of(v),
            None => f.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).map(|a| a.len()).unwrap_or(0),
        };
        let activation = match opt_s("ember.ffn_activation")? {
            None => spec.activation,
            Some("silu") => Activation::Silu,
            Some("relu") => Activation::Relu,
            Some("drelu") => Activation::Drelu,
            // GeGLU comes with Gemma's architecture, not from this key.
            Some(other) => return Err(ModelError::BadHParams(format!("ember.ffn_activation = {other:?} (silu, relu or drelu)"))),
        };
        // llama.cpp takes a missing scaling type for linear and applies a factor the file
        // gives (`rope.scaling.factor`, or the older `rope.scale_linear`) whatever the type.
        let factor_key = ["rope.scaling.factor", "rope.scale_linear"].into_iter().map(key).find(|k| f.get(k).is_some());
        let rope_freq_scale = match (opt_s(&key("rope.scaling.type"))?, &factor_key) {
            (None, None) | (Some("none"), _) => 1.0,
            (None | Some("linear"), _) => {
                let factor = f.get_f32(factor_key.as_deref().unwrap_or(&key("rope.scaling.factor")))?;
                // Written so that NaN fails too; a factor of 0 would make every angle infinite.
                if !(factor.is_finite() && (1e-3..=MAX_ROPE_SCALING).contains(&factor)) {
                    return Err(ModelError::BadHParams(format!("{} = {factor} (must be a finite number from 0.001 to {MAX_ROPE_SCALING})", factor_key.unwrap_or_else(|| key("rope.scaling.factor")))));
                }
                1.0 / factor
            }
            (Some(other), _) => return Err(ModelError::BadHParams(format!("RoPE scaling {other:?} is not supported yet (none, linear)"))),
        };
        let n_layer = req_u("block_count")?;
        let rope_base = opt_f("rope.freq_base")?.unwrap_or(10000.0);
        let mut hp = HParams {
            arch: arch.clone(),
            n_layer,
            n_embd,
            n_ff: req_u("feed_forward_length")?,
            n_head,
            n_head_kv,
            head_dim,
            n_vocab,
            n_ctx_train: opt_u("context_length")?.map(usize_of).unwrap_or(2048),
            rope_base,
            rope_dim: opt_u("rope.dimension_count")?.map(usize_of).unwrap_or(head_dim),
            rope_freq_scale,
            rope_style: spec.rope,
            rms_eps: f.get_f32(&key("attention.layer_norm_rms_epsilon"))?,
            activation,
            embd_scale: None,
            q_scale: None,
            attn_softcap: None,
            final_softcap: None,
            swa: None,
            post_norms: false,
        };
        if let Some(g) = &spec.gemma {
            hp.embd_scale = Some((n_embd as f32).sqrt());
            hp.post_norms = true;
            // gemma_pytorch's query_pre_attn_scalar: n_embd / n_head for the 27B, else the
            // head size (llama.cpp tells the 27B by its layer count).
            let q_pre = if n_layer == g.layers_27b { n_embd.checked_div(n_head).unwrap_or(0) } else { head_dim };
            hp.q_scale = Some(1.0 / (q_pre as f32).sqrt());
            let cap = |k: &str, default: Option<f32>| -> Result<Option<f32>> {
                // A cap of 0 means none (llama.cpp tests the value), as does a missing key
                // where the architecture has no default.
                match opt_f(k)?.or(default) {
                    None => Ok(None),
                    Some(c) if c.is_finite() && c > 0.0 => Ok(Some(c)),
                    Some(c) => match c == 0.0 {
                        true => Ok(None),
                        false => Err(ModelError::BadHParams(format!("{arch}.{k} = {c} (must be a positive number)"))),
                    },
                }
            };
            // Gemma 3 has no attention soft-capping at all, whatever the file says.
            hp.attn_softcap = match g.attn_softcap {
                Some(d) => cap("attn_logit_softcapping", Some(d))?,
                None => None,
            };
            hp.final_softcap = cap("final_logit_softcapping", g.final_softcap)?;
            let window = opt_u("attention.sliding_window")?.map(usize_of).unwrap_or(g.default_window);
            if window > 0 {
                let layers = match f.get(&key("attention.sliding_window_pattern")) {
                    None => swa_pattern(n_layer, g.swa_pattern),
                    Some(v) => match v.as_array() {
                        Some(a) => {
                            let flags: Option<Vec<bool>> = a.iter().map(|v| v.as_bool()).collect();
                            match flags {
                                Some(flags) if flags.len() == n_layer => flags,
                                _ => return Err(ModelError::BadHParams(format!("{arch}.attention.sliding_window_pattern: an array must hold one bool per layer ({n_layer})"))),
                            }
                        }
                        None => swa_pattern(n_layer, usize_of(f.get_u64(&key("attention.sliding_window_pattern"))?)),
                    },
                };
                let (base, scale) = match g.swa_rope {
                    SwaRope::Global => (rope_base, rope_freq_scale),
                    SwaRope::Fixed(b) => (b, 1.0),
                };
                let base = opt_f("rope.freq_base_swa")?.unwrap_or(base);
                hp.swa = Some(SlidingWindow { window, layers, rope_base: base, rope_freq_scale: scale });
            }
        }
        hp.validate()?;
        Ok(hp)
    }

    /// Why only the dense, single-sequence GPU session runs this model, if so: the batched
    /// decode, the dense layer offload, the hybrid and the sparse kernels have no GeLU,
    /// post-norms, soft-capping or sliding window yet (Gemma).
    pub fn gpu_dense_only(&self) -> Option<String> {
        let gemma = self.post_norms || self.embd_scale.is_some() || self.swa.is_some() || self.attn_softcap.is_some() || self.final_softcap.is_some() || self.q_scale.is_some();
        (gemma || self.activation == Activation::GeluTanh).then(|| format!("{} runs on the GPU only as one dense sequence yet (not with --parallel, --n-gpu-layers, --vram-budget or --ffn): drop those options or use --backend cpu", self.arch))
    }

    /// Rejects values that would make later arithmetic or allocation absurd.
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::BadHParams(m));
        let limits = [
            ("block_count", self.n_layer, 1024),
            ("embedding_length", self.n_embd, 1 << 16),
            ("feed_forward_length", self.n_ff, 1 << 20),
            ("attention.head_count", self.n_head, 1024),
            ("attention.head_count_kv", self.n_head_kv, 1024),
            ("head dimension", self.head_dim, 1024),
            ("vocab size", self.n_vocab, 1 << 22),
            ("context_length", self.n_ctx_train, MAX_CTX_TRAIN),
        ];
        for (name, v, max) in limits {
            if v == 0 || v > max {
                return bad(format!("{name} = {v} (must be 1 to {max})"));
            }
        }
        if !self.n_head.is_multiple_of(self.n_head_kv) {
            return bad(format!("{} heads are not a multiple of {} KV heads", self.n_head, self.n_head_kv));
        }
        if self.rope_dim > self.head_dim || !self.rope_dim.is_multiple_of(2) {
            return bad(format!("RoPE dimension {} with head dimension {}", self.rope_dim, self.head_dim));
        }
        // Written so that NaN fails too.
        if !(self.rms_eps > 0.0 && self.rms_eps < 1.0) {
            return bad(format!("attention.layer_norm_rms_epsilon = {} (must be above 0 and below 1)", self.rms_eps));
        }
        if !(self.rope_base > 1.0 && self.rope_base <= MAX_ROPE_BASE) {
            return bad(format!("rope.freq_base = {} (must be a finite number above 1, at most {MAX_ROPE_BASE:e})", self.rope_base));
        }
        if !(self.rope_freq_scale.is_finite() && self.rope_freq_scale > 0.0) {
            return bad(format!("RoPE frequency scale {} (must be finite and positive)", self.rope_freq_scale));
        }
        if let Some(s) = &self.swa {
            if s.window > MAX_CTX_TRAIN {
                return bad(format!("attention.sliding_window = {} (at most {MAX_CTX_TRAIN})", s.window));
            }
            if !(s.rope_base > 1.0 && s.rope_base <= MAX_ROPE_BASE) {
                return bad(format!("rope.freq_base_swa = {} (must be a finite number above 1, at most {MAX_ROPE_BASE:e})", s.rope_base));
            }
        }
        Ok(())
    }
}

/// llama.cpp's `set_swa_pattern`: with a pattern of n, layer il is local unless it is the
/// last of each n (n = 0: every layer local; n = 1: none).
fn swa_pattern(n_layer: usize, n: usize) -> Vec<bool> {
    (0..n_layer).map(|il| n == 0 || il % n < n - 1).collect()
}

/// One transformer block's weights.
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub wq: Matrix,
    pub wk: Matrix,
    pub wv: Matrix,
    pub wo: Matrix,
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    /// Per-head RMSNorm weights of q and k (`head_dim` each; qwen3).
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    /// Gemma's norms of the attention's and the FFN's outputs, before each residual add.
    pub attn_post_norm: Option<Vec<f32>>,
    pub ffn_post_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub ffn_gate: Matrix,
    pub ffn_up: Matrix,
    pub ffn_down: Matrix,
    /// PowerInfer's transposed down projection (`blk.N.ffn_down_t`, row i = neuron i's
    /// column), when the file carries one.
    pub ffn_down_t: Option<Matrix>,
}

impl Layer {
    /// Bytes of the attention's four matrices as stored (q, k, v and o).
    pub fn attention_bytes(&self) -> u64 {
        self.qkv_bytes() + self.wo.n_bytes() as u64
    }

    /// Bytes of q, k and v as stored.
    pub fn qkv_bytes(&self) -> u64 {
        [&self.wq, &self.wk, &self.wv].iter().map(|m| m.n_bytes() as u64).sum()
    }
}

/// A loaded model: hyper-parameters and weights (mapped from the file where the type is
/// used as is, converted at load time otherwise).
pub struct Model {
    pub hp: HParams,
    pub file: Arc<GgufFile>,
    pub token_embd: Matrix,
    pub output_norm: Vec<f32>,
    /// The output projection; the token embedding again when the model ties them.
    pub output: Matrix,
    pub tied_embeddings: bool,
    pub layers: Vec<Layer>,
    /// Tensors converted at load time, as (name, from, to), for `ember info`.
    pub conversions: Vec<(String, crate::gguf::GgmlType, crate::gguf::GgmlType)>,
}

impl Model {
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        let file = Arc::new(GgufFile::open(path)?);
        Self::from_gguf(file)
    }

    pub fn from_gguf(file: Arc<GgufFile>) -> Result<Model> {
        Self::from_gguf_keeping(file, &[])
    }

    /// [`Model::load`] keeping matrices of the types in `keep` as the file has them, besides
    /// those the CPU kernels use ([`Matrix::NATIVE`]): a session that runs every product on the
    /// GPU passes the GPU's types (`gpu::matrix::GPU_TYPES`), so that they are not converted
    /// to F16 for a CPU that never computes with them. Only the CPU's F32 products (and
    /// dequantising lookups) work on such a model.
    pub fn load_keeping(path: impl AsRef<Path>, keep: &[crate::gguf::GgmlType]) -> Result<Model> {
        let file = Arc::new(GgufFile::open(path)?);
        Self::from_gguf_keeping(file, keep)
    }

    /// [`Model::from_gguf`] keeping the types in `keep` (see [`Model::load_keeping`]).
    pub fn from_gguf_keeping(file: Arc<GgufFile>, keep: &[crate::gguf::GgmlType]) -> Result<Model> {
        let arch = file.get_str("general.architecture")?.to_string();
        let spec = arch_spec(&arch)?;
        let hp = HParams::from_gguf(&file, spec)?;
        let mut store = TensorStore::new(file.clone(), &arch);
        store.keep = keep.to_vec();
        // Per-dimension RoPE factors (Phi-3 128k's LongRoPE) change every angle: without them
        // the model would run, wrongly.
        if let Some(t) = ["rope_factors_long.weight", "rope_factors_short.weight"].into_iter().find(|t| store.has(t)) {
            return Err(ModelError::Other(format!("{t}: per-dimension RoPE factors (long-context RoPE scaling) are not supported yet; use a model without them (e.g. a 4k-context variant)")));
        }
        let (e, ff, q, kv) = (hp.n_embd as u64, hp.n_ff as u64, hp.q_dim() as u64, hp.kv_dim() as u64);
        let v = hp.n_vocab as u64;

        let token_embd = store.matrix("token_embd.weight", &[e, v])?;
        let output_norm = store.vector("output_norm.weight", e)?;
        let (output, tied_embeddings) = match store.has("output.weight") {
            true => (store.matrix("output.weight", &[e, v])?, false),
            false => (token_embd.clone(), true),
        };
        let mut layers = Vec::with_capacity(hp.n_layer);
        for i in 0..hp.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}");
            let bias = |store: &mut TensorStore, s: &str, len: u64| -> Result<Option<Vec<f32>>> {
                if spec.qkv_bias { store.vector(&n(s), len).map(Some) } else { Ok(None) }
            };
            // In file order, so the first error named is the first bad tensor.
            let attn_norm = store.vector(&n("attn_norm.weight"), e)?;
            // A fused `attn_qkv` (phi3; llama.cpp accepts it for any architecture) is q's rows,
            // then k's, then v's: split into views of the same bytes.
            let (wq, wk, wv) = if store.has(&n("attn_qkv.weight")) {
                let qkv = store.matrix(&n("attn_qkv.weight"), &[e, q + 2 * kv])?;
                let (q, kv) = (q as usize, kv as usize);
                (qkv.row_range(&n("attn_q.weight"), 0, q), qkv.row_range(&n("attn_k.weight"), q, q + kv), qkv.row_range(&n("attn_v.weight"), q + kv, q + 2 * kv))
            } else {
                (store.matrix(&n("attn_q.weight"), &[e, q])?, store.matrix(&n("attn_k.weight"), &[e, kv])?, store.matrix(&n("attn_v.weight"), &[e, kv])?)
            };
            let wo = store.matrix(&n("attn_output.weight"), &[q, e])?;
            let bq = bias(&mut store, "attn_q.bias", q)?;
            let bk = bias(&mut store, "attn_k.bias", kv)?;
            let bv = bias(&mut store, "attn_v.bias", kv)?;
            let (q_norm, k_norm) = match spec.qk_norm {
                true => (Some(store.vector(&n("attn_q_norm.weight"), hp.head_dim as u64)?), Some(store.vector(&n("attn_k_norm.weight"), hp.head_dim as u64)?)),
                false => (None, None),
            };
            let attn_post_norm = if hp.post_norms { Some(store.vector(&n("post_attention_norm.weight"), e)?) } else { None };
            let ffn_norm = store.vector(&n("ffn_norm.weight"), e)?;
            let (ffn_gate, ffn_up) = if spec.fused_gate_up {
                // phi3: gate rows then up rows in one tensor (llama.cpp's SwiGLU over halves).
                let gate_up = store.matrix(&n("ffn_up.weight"), &[e, 2 * ff])?;
                let ff = ff as usize;
                (gate_up.row_range(&n("ffn_gate.weight"), 0, ff), gate_up.row_range(&n("ffn_up.weight"), ff, 2 * ff))
            } else {
                (store.matrix(&n("ffn_gate.weight"), &[e, ff])?, store.matrix(&n("ffn_up.weight"), &[e, ff])?)
            };
            // PowerInfer files store the down projection transposed; either form is enough.
            let down_t_name = [n("ffn_down_t.weight"), n("ffn_down_t")].into_iter().find(|t| store.has(t));
            let ffn_down_t = down_t_name.as_deref().map(|t| store.matrix(t, &[e, ff])).transpose()?;
            let ffn_down = match (&ffn_down_t, store.has(&n("ffn_down.weight"))) {
                (Some(t), false) => t.transposed(t.transpose_type()).map_err(|m| ModelError::Other(format!("{}: {m}", t.name)))?,
                _ => store.matrix(&n("ffn_down.weight"), &[ff, e])?,
            };
            let ffn_post_norm = if hp.post_norms { Some(store.vector(&n("post_ffw_norm.weight"), e)?) } else { None };
            layers.push(Layer { attn_norm, wq, wk, wv, wo, bq, bk, bv, q_norm, k_norm, attn_post_norm, ffn_post_norm, ffn_norm, ffn_gate, ffn_up, ffn_down, ffn_down_t });
        }
        Ok(Model { hp, file, token_embd, output_norm, output, tied_embeddings, layers, conversions: store.conversions })
    }

    /// The weight matrices, each once (the output only where it is not the embedding).
    pub fn matrices(&self) -> Vec<&Matrix> {
        let mut out = vec![&self.token_embd];
        if !self.tied_embeddings {
            out.push(&self.output);
        }
        for l in &self.layers {
            out.extend([&l.wq, &l.wk, &l.wv, &l.wo, &l.ffn_gate, &l.ffn_up, &l.ffn_down]);
        }
        out
    }

    /// Bytes of weight matrices as they are held, per type (largest first); norms and biases,
    /// held as f32, are left out.
    pub fn matrix_bytes_by_type(&self) -> Vec<(crate::gguf::GgmlType, u64)> {
        let mut by: Vec<(crate::gguf::GgmlType, u64)> = Vec::new();
        for m in self.matrices() {
            match by.iter_mut().find(|(t, _)| *t == m.ty) {
                Some(e) => e.1 += m.n_bytes() as u64,
                None => by.push((m.ty, m.n_bytes() as u64)),
            }
        }
        by.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.name().cmp(b.0.name())));
        by
    }

    /// Bytes of weights as they are held (mapped or converted).
    pub fn weight_bytes(&self) -> u64 {
        let mut total = self.token_embd.n_bytes() as u64 + 4 * self.output_norm.len() as u64;
        if !self.tied_embeddings {
            total += self.output.n_bytes() as u64;
        }
        for l in &self.layers {
            for m in [&l.wq, &l.wk, &l.wv, &l.wo, &l.ffn_gate, &l.ffn_up, &l.ffn_down] {
                total += m.n_bytes() as u64;
            }
            total += 4 * (l.attn_norm.len() + l.ffn_norm.len()) as u64;
            total += 4 * [&l.q_norm, &l.k_norm, &l.attn_post_norm, &l.ffn_post_norm].iter().map(|v| v.as_ref().map_or(0, |v| v.len())).sum::<usize>() as u64;
        }
        total
    }
}
