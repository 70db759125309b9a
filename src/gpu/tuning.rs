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
    /// The cooperative-matrix prefill kernel's tile ([`CoopShape`]).
    pub coop_shape: CoopShape,
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
            coop_shape: CoopShape::default(),
            batch_matvec: None,
            batch_units: false,
            batch_max_tokens: 8,
            batch_prefetch: true,
            batch_kq: None,
        }
    }
}

/// The tile of shaders/matmul_coop.wgsl's `mm_coop`: `tokens` per workgroup (32, 64 or 128),
/// `kb` blocks of 32 k per step between two barriers (1, 2 or 4), `ft` token fragments of 16 per
/// subgroup (2 or 4). Its 8 subgroups of 32 rows each tile the tokens in `tokens / (16 ft)`
/// columns, so the rows per workgroup follow: [`CoopShape::rows`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopShape {
    pub tokens: u32,
    pub kb: u32,
    pub ft: u32,
}

impl Default for CoopShape {
    /// 128 rows x 64 tokens, two blocks a step, 2 x 2 fragments a subgroup: the shape measured
    /// at pp512 4395 t/s on an H100 (session 8).
    fn default() -> Self {
        CoopShape { tokens: 64, kb: 2, ft: 2 }
    }
}

impl CoopShape {
    /// Subgroups per workgroup.
    const SUBGROUPS: u32 = 8;

    /// Rows per workgroup: 32 per subgroup row.
    pub fn rows(&self) -> u32 {
        32 * (Self::SUBGROUPS / (self.tokens / (16 * self.ft)))
    }

    /// Shared memory the kernel declares: both f16 tiles (a step's k plus 8 halves of padding a
    /// row) and one f32 fragment per subgroup for the epilogue.
    pub fn shared_bytes(&self) -> u32 {
        (self.rows() + self.tokens) * (32 * self.kb + 8) * 2 + Self::SUBGROUPS * 256 * 4
    }

    /// Whether the shape is one the kernel is written for, within `max_shared` bytes of
    /// workgroup memory; the error names the limit that fails.
    pub fn check(&self, max_shared: u32) -> Result<(), String> {
        if ![32, 64, 128].contains(&self.tokens) || ![1, 2, 4].contains(&self.kb) || ![2, 4].contains(&self.ft) {
            return Err(format!("cooperative-matrix tile {}:{}:{}: tokens must be 32, 64 or 128, kb 1, 2 or 4, ft 2 or 4", self.tokens, self.kb, self.ft));
        }
        let columns = self.tokens / (16 * self.ft);
        if columns == 0 || !Self::SUBGROUPS.is_multiple_of(columns) {
            return Err(format!("cooperative-matrix tile {}:{}:{}: {} tokens are not a whole number of {}-token subgroup columns (at most 8)", self.tokens, self.kb, self.ft, self.tokens, 16 * self.ft));
        }
        if self.shared_bytes() > max_shared {
            return Err(format!(
                "cooperative-matrix tile {}:{}:{} ({} rows) needs {} bytes of workgroup memory, over the adapter's {max_shared}",
                self.tokens, self.kb, self.ft, self.rows(), self.shared_bytes()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::CoopShape;

    #[test]
    fn coop_tiles_and_their_limits() {
        let s = |tokens, kb, ft| CoopShape { tokens, kb, ft };
        // The default is the kernel's original tile: 128 rows x 64 tokens, 35 KiB.
        assert_eq!((CoopShape::default().rows(), CoopShape::default().shared_bytes()), (128, 35840));
        assert_eq!(s(128, 2, 4).rows(), 128);
        assert_eq!(s(128, 2, 2).rows(), 64);
        assert_eq!(s(32, 1, 2).rows(), 256);
        assert!(s(128, 2, 4).check(48 * 1024).is_ok());
        // 60 KiB: over NVIDIA's 48, and the error says so.
        let e = s(64, 4, 2).check(48 * 1024).unwrap_err();
        assert!(e.contains("60416") && e.contains("49152"), "{e}");
        // 32 tokens cannot hold a subgroup of 64; odd values are refused.
        assert!(s(32, 1, 4).check(u32::MAX).is_err());
        assert!(s(48, 2, 2).check(u32::MAX).is_err());
        assert!(s(64, 3, 2).check(u32::MAX).is_err());
    }
}
