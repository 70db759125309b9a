//! Gemma 2: the llama layer with Google's additions, as llama.cpp runs `gemma2` files.
//! - The token embedding is multiplied by sqrt(n_embd) (exactly, in f32: not Hugging Face's
//!   bf16-rounded normaliser) and tied to the output.
//! - Four RMSNorms per layer: `attn_norm` before attention, `post_attention_norm` on the
//!   attention's output before the residual add, `ffn_norm` before the FFN, `post_ffw_norm` on
//!   its output before the add. The file's weights are used as they are: Gemma's `1 + w` was
//!   folded in by convert_hf_to_gguf.py (it adds 1 to every `*norm.weight`).
//! - GeGLU FFN: gelu_tanh(gate) * up ([`Activation::GeluTanh`]).
//! - q is multiplied by 1/sqrt(head_dim) before attention (1/sqrt(n_embd / n_head) for the
//!   46-layer 27B, llama.cpp deciding by the layer count as gemma_pytorch's config does), the
//!   scores are soft-capped, `cap * tanh(s / cap)` with `gemma2.attn_logit_softcapping`
//!   (default 50), and so are the logits with `gemma2.final_logit_softcapping` (default 30).
//! - Sliding-window attention of `gemma2.attention.sliding_window` positions (default 4096)
//!   on the even layers (llama.cpp's pattern 2: layer il is local when il % 2 < 1; a
//!   `sliding_window_pattern` key overrides it), the others global; both use the file's RoPE
//!   base. NeoX RoPE. No biases.
//!
//! The dense GPU session runs it (GeGLU in the products' epilogue, the post-norms as norm +
//! add dispatches, the options in the attention kernels); the batched decode, the offload, the
//! hybrid and the sparse FFN refuse it ([`super::HParams::gpu_dense_only`]).
use super::{Activation, ArchSpec, GemmaSpec, RopeStyle, SwaRope};

pub const GEMMA2: ArchSpec = ArchSpec {
    names: &["gemma2"],
    rope: RopeStyle::Halves,
    qkv_bias: false,
    activation: Activation::GeluTanh,
    qk_norm: false,
    fused_gate_up: false,
    gemma: Some(GemmaSpec { swa_pattern: 2, default_window: 4096, attn_softcap: Some(50.0), final_softcap: Some(30.0), swa_rope: SwaRope::Global, layers_27b: 46 }),
};
