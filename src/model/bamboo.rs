//! Bamboo, PowerInfer's name for its dReLU models (Bamboo-7B, TurboSparse-Mistral): the llama
//! recipe (adjacent-pair RoPE, no biases, the same tensor names and `bamboo.*` keys as
//! `llama.*`) with the dReLU FFN, `relu(gate) * relu(up)`. PowerInfer's llama.cpp fork marks
//! no activation key: the architecture name is what selects ReLU on both branches
//! (`LLM_FFN_SYM` with `LLM_FFN_RELU` there). A llama or mistral file can ask for dReLU with
//! `ember.ffn_activation = drelu` instead.
use super::{Activation, ArchSpec, RopeStyle};

pub const BAMBOO: ArchSpec = ArchSpec { names: &["bamboo"], rope: RopeStyle::Adjacent, qkv_bias: false, activation: Activation::Drelu, qk_norm: false, fused_gate_up: false, gemma: None };
