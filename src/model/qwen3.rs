//! Qwen3 (dense): the qwen2 recipe with three differences. Each head of q and k passes through
//! an RMSNorm of its own before RoPE (`blk.N.attn_q_norm.weight`, `blk.N.attn_k_norm.weight`,
//! `head_dim` values each, the model's epsilon); the q/k/v projections carry no biases; and the
//! head size comes from `qwen3.attention.key_length`, which need not be n_embd / n_head (q is
//! n_head * head_dim wide, the output projection maps that back to n_embd). RoPE is NeoX-style
//! over the whole head. On the GPU the norms are a dispatch of their own between the qkv
//! product (and biases) and RoPE (`shaders/head_norm.wgsl`). Qwen3's tokenizer files name the `qwen2` pre-tokeniser, which
//! `tokenizer/pretok.rs` knows; the tests' synthetic qwen3 models carry SmolLM2's tokenizer, so
//! a real Qwen3 vocabulary is not tested here.
use super::{Activation, ArchSpec, RopeStyle};

pub const QWEN3: ArchSpec = ArchSpec { names: &["qwen3"], rope: RopeStyle::Halves, qkv_bias: false, activation: Activation::Silu, qk_norm: true, fused_gate_up: false, gemma: None };
