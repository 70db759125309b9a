//! The GPU kernels' choices that measurements made, as one value each context owns
//! ([`GpuContext::with_tuning`](super::GpuContext::with_tuning)). The library never reads them
//! from the environment: callers pass them in (the `ember` binary fills one from `ember bench
//! --tune KEY=VALUE` or its `EMBER_*` benchmark variables, `cli::gpu_tuning`).

use super::matrix::{DecodeChoice, KqTokens};

#[derive(Clone, Debug)]
pub struct GpuTuning {
    /// Q4_0/Q4_1, Q4_K and Q6_K decode products with llama.cpp's 8-bit activations on the integer
    /// kernel (`--gpu-precision q8`) instead of f32 activations. It decides the Q4_0/Q4_1
    /// matrices' layout at upload (GGUF block order) as well as the kernel.
    pub integer_decode: bool,
    /// Tokens greedy decoding keeps queued on the GPU ahead of the one being read back (0 to
    /// 3): one keeps the GPU busy while the host reads a token and records the next.
    pub decode_ahead: usize,
    /// Decode attention runs as one dispatch up to this many keys, split over chunks beyond.
    pub attn_single_max_keys: u32,
    /// Threads per decode attention workgroup: 64, 128 or 256 (64 measured best on an H200).
    pub attn_wg: u32,
    /// Per weight type (lower-case name), a decode kernel replacing the measured default.
    pub decode_overrides: Vec<(String, DecodeChoice)>,
    /// RMSNorm (and RoPE) folded into the decode products; off keeps them separate dispatches.
    pub fold_norms: bool,
    /// Activations per word in the blocks decode kernel (DV_XW: 0 per slot, 1 per row, 2 once
    /// for all rows); None takes each type's measured default.
    pub decode_xw: Option<u32>,
    /// The prefill products on cooperative matrices where the adapter has them (f16 inputs,
    /// f32 sums); off keeps the portable f32 tiled kernel everywhere.
    pub coop_matrix: bool,
    /// (threads, rows) per workgroup of the few-token matvec (2 to 16 tokens: a batched
    /// decode's products), replacing [`matrix::default_mv_configs`](super::matrix::default_mv_configs)'
    /// choice for every group size; threads a power of two, rows even, within the adapter's
    /// limits, else ignored. None keeps the default.
    pub batch_matvec: Option<(u32, u32)>,
    /// The few-token matvec on the earlier units kernel (matmul_common.wgsl's `mv_main`,
    /// groups of up to 8 tokens) instead of the blocks kernel (matmul_dec.wgsl's `dvt_main`).
    pub batch_units: bool,
    /// The blocks kernel's largest group of tokens per workgroup, 2 to 16, default 8 (more tokens run in
    /// several groups, each reading the weights again).
    pub batch_max_tokens: u32,
    /// The blocks kernel loads the next step's weights before this step's arithmetic.
    pub batch_prefetch: bool,
    /// The few-token products on the integer kernel (shaders/matmul_kq_tok.wgsl) with this
    /// shape, for the types it serves (Q4_0, Q4_1, Q4_K, Q6_K); None keeps the blocks kernel.
    /// `--gpu-precision q8` sets [`KqTokens::DEFAULT`]. Like `integer_decode` it decides the
    /// Q4_0/Q4_1 matrices' layout at upload (GGUF block order).
    pub batch_kq: Option<KqTokens>,
}

impl Default for GpuTuning {
    fn default() -> Self {
        GpuTuning {
            integer_decode: false,
            decode_ahead: 1,
            attn_single_max_keys: super::ops::SINGLE_PASS_MAX_KEYS,
            attn_wg: 64,
            decode_overrides: Vec::new(),
            fold_norms: true,
            decode_xw: None,
            coop_matrix: true,
            batch_matvec: None,
            batch_units: false,
            batch_max_tokens: 8,
            batch_prefetch: true,
            batch_kq: None,
        }
    }
}
