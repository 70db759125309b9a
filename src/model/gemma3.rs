//! Gemma 3 (text): Gemma 2's layer (embedding scale, four norms, GeGLU, tied output, the
//! query scale) with per-head q/k RMSNorms before RoPE (as qwen3's), no attention
//! soft-capping, and final soft-capping only when the file gives
//! `gemma3.final_logit_softcapping`. Local layers: when the file has
//! `gemma3.attention.sliding_window`, five of every six (llama.cpp's pattern 6: layer il is
//! local when il % 6 < 5) attend to that many positions and use RoPE base 10000 without
//! scaling (or `gemma3.rope.freq_base_swa`); the global layers use the file's
//! `rope.freq_base` and its linear `rope.scaling` (4B and larger: factor 8). Without the key
//! every layer is global. The vision tower and Gemma 3n are out of scope.
use super::{Activation, ArchSpec, GemmaSpec, RopeStyle, SwaRope};

pub const GEMMA3: ArchSpec = ArchSpec {
    names: &["gemma3"],
    rope: RopeStyle::Halves,
    qkv_bias: false,
    activation: Activation::GeluTanh,
    qk_norm: true,
    fused_gate_up: false,
    gemma: Some(GemmaSpec { swa_pattern: 6, default_window: 0, attn_softcap: None, final_softcap: None, swa_rope: SwaRope::Fixed(10000.0), layers_27b: 62 }),
};
