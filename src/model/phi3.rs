//! Phi-3 (mini/medium, 4k context): the llama recipe with fused tensors and NeoX RoPE. q, k
//! and v are one `attn_qkv` tensor (q's rows, then k's, then v's) and gate and up one `ffn_up`
//! of 2 x n_ff rows (gate first: llama.cpp's SwiGLU over the two halves); both are split at
//! load time into row-range views of the same bytes, so nothing is copied and every kernel
//! sees the usual separate matrices. RoPE rotates halves (NeoX). No biases. The 128k variants'
//! per-dimension RoPE factors (`rope_factors_long/short`) are not supported and refused;
//! `phi3.attention.sliding_window` is ignored, as llama.cpp does.
use super::{Activation, ArchSpec, RopeStyle};

pub const PHI3: ArchSpec = ArchSpec { names: &["phi3"], rope: RopeStyle::Halves, qkv_bias: false, activation: Activation::Silu, qk_norm: false, fused_gate_up: true, gemma: None };
