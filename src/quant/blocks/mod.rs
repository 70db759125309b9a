//! Weight block types beyond Q4_0/Q4_1/Q8_0, one module each: the block's layout, its dot
//! product with 8-bit activations as llama.cpp's x86 CPU backend computes it (a scalar twin in
//! `reference` order and an AVX2 kernel, bit-identical, the kernel chosen at run time), and
//! for the K-quants the Q8_K activation format they multiply with.
//!
//! | weights | activations | llama.cpp kernel mirrored |
//! | --- | --- | --- |
//! | Q5_0 | Q8_0 | `ggml_vec_dot_q5_0_q8_0` (AVX2) |
//! | Q5_1 | Q8_1 | `ggml_vec_dot_q5_1_q8_1` (AVX2) |
//! | Q2_K | Q8_K | `ggml_vec_dot_q2_K_q8_K` (AVX2) |
//! | Q3_K | Q8_K | `ggml_vec_dot_q3_K_q8_K` (AVX2) |
//! | Q4_K | Q8_K | `ggml_vec_dot_q4_K_q8_K` (AVX2; the repacked `ggml_gemv_q4_K_8x8_q8_K` as `q4_k::dot_repacked`) |
//! | Q5_K | Q8_K | `ggml_vec_dot_q5_K_q8_K` (AVX2) |
//! | Q6_K | Q8_K | `ggml_vec_dot_q6_K_q8_K` (AVX2) |
//!
//! The integer parts of these kernels are exact (no 16-bit saturation is reachable with
//! llama.cpp's activation quants, which stay in -127..=127), so only the float steps carry
//! llama.cpp's order: which integer lanes exist, which scale multiplies them, and the order of
//! the fused multiply-adds and the final sums. The scalar twins spell that order out.

pub mod q2_k;
pub mod q3_k;
pub mod q4_k;
pub mod q5_0;
pub mod q5_1;
pub mod q5_k;
pub mod q6_k;
pub mod q8_k;

pub use q2_k::BlockQ2K;
pub use q3_k::BlockQ3K;
pub use q4_k::BlockQ4K;
pub use q5_0::BlockQ5_0;
pub use q5_1::BlockQ5_1;
pub use q5_k::BlockQ5K;
pub use q6_k::BlockQ6K;
pub use q8_k::{quantize_row_q8_k, BlockQ8K};

use crate::gguf::GgmlType;

/// A weight block type with a dot product against its activation format.
pub trait WeightBlock: bytemuck::Pod {
    /// The GGUF type these blocks are.
    const TYPE: GgmlType;
    /// The activation blocks one weight block multiplies with (same number of elements).
    type Act: bytemuck::Pod;
    /// The dot product, SIMD where the CPU has it; bit-identical to [`WeightBlock::dot_ref`].
    ///
    /// # Panics
    /// If the slices hold different numbers of blocks.
    fn dot(x: &[Self], y: &[Self::Act]) -> f32;
    /// The portable scalar twin that defines the result.
    fn dot_ref(x: &[Self], y: &[Self::Act]) -> f32;
}

/// Whether the AVX2 kernels may run (the same features as the Q4_0 kernels).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn has_avx2() -> bool {
    super::x86::has_avx2()
}

/// `_mm256_cvtepi32_ps` of an integer lane: round to nearest even, as `as f32` does.
#[inline(always)]
pub(crate) fn to_f32(v: i32) -> f32 {
    v as f32
}

/// The eight 6-bit scales and eight 6-bit mins of a Q4_K/Q5_K block (ggml's `get_scale_min_k4`
/// unrolled, as the x86 kernels unpack them with `kmask1..3`).
#[inline(always)]
pub(crate) fn scales_mins_k4(packed: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    for j in 0..4 {
        sc[j] = packed[j] & 63;
        m[j] = packed[j + 4] & 63;
        sc[j + 4] = (packed[j + 8] & 0x0F) | ((packed[j] >> 6) << 4);
        m[j + 4] = (packed[j + 8] >> 4) | ((packed[j + 4] >> 6) << 4);
    }
    (sc, m)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod simd {
    use std::arch::x86_64::*;

    /// Bytes 0xFF where bit i of `bits` is set, 0 elsewhere (element i = bit i).
    #[inline(always)]
    pub unsafe fn bytes_from_bits(bits: u32) -> __m256i {
        // Byte i takes byte i / 8 of the word, then every bit but bit i % 8 is forced on: the
        // byte is all ones exactly when bit i % 8 was set.
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(bits as i32),
            _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3),
        );
        let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64);
        _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1))
    }

    /// Sum of eight i32 lanes (exact, wrapping).
    #[inline(always)]
    pub unsafe fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s)))
    }

    /// Q4_K/Q5_K-style lane sums of one 32-element sub-block pair: `lo` and `hi` unsigned
    /// quants times the activations, each pair of 16-bit sums weighted by its sub-block scale.
    #[inline(always)]
    pub unsafe fn scaled_pair(lo: __m256i, ylo: __m256i, sc_lo: u8, hi: __m256i, yhi: __m256i, sc_hi: u8) -> __m256i {
        let pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, ylo), _mm256_set1_epi16(i16::from(sc_lo)));
        let ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, yhi), _mm256_set1_epi16(i16::from(sc_hi)));
        _mm256_add_epi32(pl, ph)
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    /// A small deterministic generator (xorshift), so the tests need no dependency.
    pub struct Rng(pub u64);

    impl Rng {
        pub fn next_u32(&mut self) -> u32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 32) as u32
        }
        pub fn f32(&mut self) -> f32 {
            (self.next_u32() as f32 / u32::MAX as f32) * 2.0 - 1.0
        }
        pub fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next_u32() as u8).collect()
        }
        /// Random blocks of any Pod type whose f16 scales are replaced by `fix`.
        pub fn blocks<T: bytemuck::Pod>(&mut self, n: usize, fix: impl Fn(&mut T, &mut Rng)) -> Vec<T> {
            let size = std::mem::size_of::<T>();
            (0..n)
                .map(|_| {
                    let mut b: T = bytemuck::pod_read_unaligned(&self.bytes(size));
                    fix(&mut b, self);
                    b
                })
                .collect()
        }
        pub fn half(&mut self, scale: f32) -> half::f16 {
            half::f16::from_f32(self.f32() * scale)
        }
    }

    /// A K-quant block type's dot at 1, 2, 3 and 5 blocks of random weights (scales set by
    /// `fix`) against Q8_K activations of random values: the SIMD dot equals the scalar twin
    /// bit for bit, and both are within 1e-4 (relative) of the plain dequantise-then-dot.
    pub fn check_k_dot<B: super::WeightBlock<Act = super::BlockQ8K>>(seed: u64, fix: impl Fn(&mut B, &mut Rng)) {
        let mut rng = Rng(seed);
        for n in [1usize, 2, 3, 5] {
            let x: Vec<B> = rng.blocks(n, &fix);
            let a: Vec<f32> = (0..256 * n).map(|_| rng.f32()).collect();
            let mut y = vec![super::BlockQ8K::ZERO; n];
            super::quantize_row_q8_k(&a, &mut y);
            let r = B::dot_ref(&x, &y);
            assert_eq!(B::dot(&x, &y).to_bits(), r.to_bits(), "{:?}, n = {n}", B::TYPE);
            let mut w = vec![0.0f32; 256 * n];
            crate::quant::dequantize(B::TYPE, bytemuck::cast_slice(&x), &mut w).unwrap();
            let plain: f64 = w.iter().enumerate().map(|(i, &v)| f64::from(v) * f64::from(y[i / 256].qs[i % 256]) * f64::from(y[i / 256].d)).sum();
            assert!((f64::from(r) - plain).abs() <= 1e-4 * (1.0 + plain.abs()), "{:?}, n = {n}: {r} vs {plain}", B::TYPE);
        }
    }
}
