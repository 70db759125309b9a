//! Q6_K: 256 weights `x = d * sc_k * (q - 32)`, 6-bit quants (low four bits in `ql`, top two
//! in `qh`), sixteen signed 8-bit scales, one per 16 elements. In each 128-element half,
//! element `32k + l` takes nibble `l + 32 * (k % 2)` of the half's 64 `ql` bytes (low nibble
//! for k < 2) and bits `2k..2k + 2` of `qh[l]`. Multiplied with Q8_K activations.

use super::{to_f32, BlockQ8K, WeightBlock};
use crate::gguf::GgmlType;
use crate::quant::reference::hsum8;
use crate::quant::f16;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ6K {
    pub ql: [u8; 128],
    pub qh: [u8; 64],
    pub scales: [i8; 16],
    pub d: f16,
}

impl BlockQ6K {
    /// Unsigned quant of element `e` (0..64; the weight is `q - 32`).
    #[inline(always)]
    pub fn quant(&self, e: usize) -> u8 {
        let (half, k, l) = (e / 128, e % 128 / 32, e % 32);
        let lo_byte = self.ql[64 * half + l + 32 * (k % 2)];
        let lo = if k < 2 { lo_byte & 0x0F } else { lo_byte >> 4 };
        lo | (((self.qh[32 * half + l] >> (2 * k)) & 3) << 4)
    }
}

impl WeightBlock for BlockQ6K {
    const TYPE: GgmlType = GgmlType::Q6_K;
    type Act = BlockQ8K;

    fn dot(x: &[Self], y: &[BlockQ8K]) -> f32 {
        assert_eq!(x.len(), y.len(), "Q6_K dot: block counts differ");
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2() {
            // SAFETY: the CPU has the kernel's features; lengths checked.
            return unsafe { avx2::dot(x, y) };
        }
        Self::dot_ref(x, y)
    }

    /// `ggml_vec_dot_q6_K_q8_K` on AVX2: the quants enter unsigned (0..64), lane `l` holding
    /// elements `4l..4l + 4` of every 32, times their scale; the offset of 32 comes off each
    /// lane as `32 * (bsums[2l] * sc[2l] + bsums[2l + 1] * sc[2l + 1])`; one FMA per
    /// super-block with `d8 * d`; ggml's horizontal sum.
    fn dot_ref(x: &[Self], y: &[BlockQ8K]) -> f32 {
        assert_eq!(x.len(), y.len(), "Q6_K dot: block counts differ");
        let mut acc = [0.0f32; 8];
        for (bx, by) in x.iter().zip(y) {
            let d = by.d * bx.d.to_f32();
            let mut lanes = [0i32; 8];
            for e in 0..256 {
                let p = i32::from(bx.quant(e)) * i32::from(by.qs[e]) * i32::from(bx.scales[e / 16]);
                lanes[e % 32 / 4] = lanes[e % 32 / 4].wrapping_add(p);
            }
            for (l, a) in acc.iter_mut().enumerate() {
                let off = i32::from(by.bsums[2 * l]) * i32::from(bx.scales[2 * l]) + i32::from(by.bsums[2 * l + 1]) * i32::from(bx.scales[2 * l + 1]);
                *a = d.mul_add(to_f32(lanes[l].wrapping_sub(off << 5)), *a);
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

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(x: &[BlockQ6K], y: &[BlockQ8K]) -> f32 {
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(3);
        let mut acc = _mm256_setzero_ps();
        for (bx, by) in x.iter().zip(y) {
            let d = by.d * bx.d.to_f32();
            let scales = _mm_loadu_si128(bx.scales.as_ptr().cast());
            let bsums = _mm256_loadu_si256(by.bsums.as_ptr().cast());
            let off = _mm256_slli_epi32::<5>(_mm256_madd_epi16(bsums, _mm256_cvtepi8_epi16(scales)));
            let mut sumi = _mm256_setzero_si256();
            for half in 0..2 {
                let l0 = _mm256_loadu_si256(bx.ql.as_ptr().add(64 * half).cast());
                let l1 = _mm256_loadu_si256(bx.ql.as_ptr().add(64 * half + 32).cast());
                let h = _mm256_loadu_si256(bx.qh.as_ptr().add(32 * half).cast());
                let q = [
                    _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16::<4>(_mm256_and_si256(h, m2))),
                    _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(h), m2))),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(l0), m4), _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(h), m2))),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4), _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(h), m2))),
                ];
                for (k, &qk) in q.iter().enumerate() {
                    let yk = _mm256_loadu_si256(by.qs.as_ptr().add(128 * half + 32 * k).cast());
                    let s = 8 * half + 2 * k;
                    let sc = _mm256_set_m128i(_mm_set1_epi16(i16::from(bx.scales[s + 1])), _mm_set1_epi16(i16::from(bx.scales[s])));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(qk, yk), sc));
                }
            }
            sumi = _mm256_sub_epi32(sumi, off);
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
        check_k_dot(0x6_b, |b: &mut BlockQ6K, r| b.d = r.half(0.001));
    }
}
