//! LLaMA and Mistral: pre-norm decoder, RMSNorm, GQA, RoPE on adjacent pairs, gated FFN.
use super::{Activation, ArchSpec, RopeStyle};

pub const LLAMA: ArchSpec = ArchSpec { names: &["llama", "mistral"], rope: RopeStyle::Adjacent, qkv_bias: false, activation: Activation::Silu, qk_norm: false, fused_gate_up: false, gemma: None };
