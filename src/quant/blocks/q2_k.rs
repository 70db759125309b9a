//! Q2_K: 256 weights in sixteen sub-blocks of 16, `x = d * sc_j * q - dmin * m_j` with 2-bit
//! quants and 4-bit sub-block scales (low nibble of `scales[j]`) and mins (high nibble). Each
//! 128-element half reads its 32 bytes of `qs` four times: element `128h + 32k + l` is bits
//! `2k..2k + 2` of `qs[32h + l]`, in sub-block `8h + 2k + l / 16`. Multiplied with Q8_K
//! activations.

use super::{to_f32, BlockQ8K, WeightBlock};
use crate::gguf::GgmlType;
use crate::quant::f16;
use crate::quant::reference::hsum8;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ2K {
    pub scales: [u8; 16],
    pub qs: [u8; 64],
    pub d: f16,
    pub dmin: f16,
}

impl BlockQ2K {
    /// The 2-bit quant of element `e` (0..256).
    #[inline(always)]
    pub fn quant(&self, e: usize) -> u8 {
        let (half, k, l) = (e / 128, e % 128 / 32, e % 32);
        (self.qs[32 * half + l] >> (2 * k)) & 3
    }
}

/// The eight i32 lanes of one super-block's scaled products, as the x86 kernels form them:
/// lane `l` holds elements `4l..4l + 4` of every 32, each times its sub-block's scale. Shared
/// with Q3_K, whose quants have the same places.
#[inline(always)]
pub(super) fn int_lanes(quant: impl Fn(usize) -> i32, by: &BlockQ8K, scale: impl Fn(usize) -> i32) -> [i32; 8] {
    let mut lanes = [0i32; 8];
    for e in 0..256 {
        let p = quant(e) * i32::from(by.qs[e]) * scale(e / 16);
        lanes[e % 32 / 4] = lanes[e % 32 / 4].wrapping_add(p);
    }
    lanes
}

impl WeightBlock for BlockQ2K {
    const TYPE: GgmlType = GgmlType::Q2_K;
    type Act = BlockQ8K;

    fn dot(x: &[Self], y: &[BlockQ8K]) -> f32 {
        assert_eq!(x.len(), y.len(), "Q2_K dot: block counts differ");
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2() {
            // SAFETY: the CPU has the kernel's features; lengths checked.
            return unsafe { avx2::dot(x, y) };
        }
        Self::dot_ref(x, y)
    }

    /// `ggml_vec_dot_q2_K_q8_K` on AVX2: eight float lanes. Per super-block, first the mins:
    /// lane `l` gets `m[2l] * bsums[2l] + m[2l + 1] * bsums[2l + 1]` with one FMA by
    /// `-d8 * dmin`; then the quants, lane `l` holding elements `4l..4l + 4` of every 32 times
    /// their scale, with one FMA by `d8 * d`; ggml's horizontal sum at the end.
    fn dot_ref(x: &[Self], y: &[BlockQ8K]) -> f32 {
        assert_eq!(x.len(), y.len(), "Q2_K dot: block counts differ");
        let mut acc = [0.0f32; 8];
        for (bx, by) in x.iter().zip(y) {
            let d = by.d * bx.d.to_f32();
            let dmin = -by.d * bx.dmin.to_f32();
            let min = |j: usize| i32::from(bx.scales[j] >> 4);
            for (l, a) in acc.iter_mut().enumerate() {
                let p = min(2 * l) * i32::from(by.bsums[2 * l]) + min(2 * l + 1) * i32::from(by.bsums[2 * l + 1]);
                *a = dmin.mul_add(to_f32(p), *a);
            }
            let lanes = int_lanes(|e| i32::from(bx.quant(e)), by, |j| i32::from(bx.scales[j] & 0x0F));
            for (a, &l) in acc.iter_mut().zip(&lanes) {
                *a = d.mul_add(to_f32(l), *a);
            }
        }
        hsum8(acc)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use crate::quant::x86::hsum_ps;
    use std::arch::x86_64::*;

    /// `madd(maddubs(q, y), scales)`: 32 quants times 32 activations, the first 16 products
    /// weighted by `lo`, the last 16 by `hi`, as eight i32 lanes of four elements.
    #[inline(always)]
    unsafe fn scaled32(q: __m256i, y: __m256i, lo: i16, hi: i16) -> __m256i {
        let sc = _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo));
        _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), sc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(x: &[BlockQ2K], y: &[BlockQ8K]) -> f32 {
        let m3 = _mm256_set1_epi8(3);
        let m4 = _mm_set1_epi8(0x0F);
        let mut acc = _mm256_setzero_ps();
        for (bx, by) in x.iter().zip(y) {
            let d = by.d * bx.d.to_f32();
            let dmin = -by.d * bx.dmin.to_f32();
            let packed = _mm_loadu_si128(bx.scales.as_ptr().cast());
            let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(packed), m4));
            let prod = _mm256_madd_epi16(mins, _mm256_loadu_si256(by.bsums.as_ptr().cast()));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(prod), acc);
            let sc = bx.scales.map(|s| i16::from(s & 0x0F));
            let mut sumi = _mm256_setzero_si256();
            for half in 0..2 {
                let bits = _mm256_loadu_si256(bx.qs.as_ptr().add(32 * half).cast());
                let q = [
                    _mm256_and_si256(bits, m3),
                    _mm256_and_si256(_mm256_srli_epi16::<2>(bits), m3),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(bits), m3),
                    _mm256_and_si256(_mm256_srli_epi16::<6>(bits), m3),
                ];
                for (k, &qk) in q.iter().enumerate() {
                    let yk = _mm256_loadu_si256(by.qs.as_ptr().add(128 * half + 32 * k).cast());
                    let s = 8 * half + 2 * k;
                    sumi = _mm256_add_epi32(sumi, scaled32(qk, yk, sc[s], sc[s + 1]));
                }
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum_ps(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::check_k_dot;
    use super::*;

    #[test]
    fn simd_equals_scalar_twin_and_dequantised_dot() {
        check_k_dot(0x2_b, |b: &mut BlockQ2K, r| {
            b.d = r.half(0.01);
            b.dmin = r.half(0.01);
        });
    }
}
