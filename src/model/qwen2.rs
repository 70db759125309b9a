//! Qwen2: the llama recipe with biases on the q/k/v projections and NeoX-style RoPE.
use super::{Activation, ArchSpec, RopeStyle};

pub const QWEN2: ArchSpec = ArchSpec { names: &["qwen2"], rope: RopeStyle::Halves, qkv_bias: true, activation: Activation::Silu, qk_norm: false, fused_gate_up: false, gemma: None };
