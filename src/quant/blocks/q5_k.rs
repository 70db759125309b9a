//! Q5_K: Q4_K with a fifth bit per weight (`x = d * sc_j * q - dmin * m_j`, q in 0..32): bit
//! `j` of `qh[l]` belongs to element `l` of sub-block `j`. Multiplied with Q8_K activations.

use super::{scales_mins_k4, to_f32, BlockQ8K, WeightBlock};
use crate::gguf::GgmlType;
use crate::quant::reference::hsum8;
use crate::quant::f16;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qh: [u8; 32],
    pub qs: [u8; 128],
}

impl WeightBlock for BlockQ5K {
    const TYPE: GgmlType = GgmlType::Q5_K;
    type Act = BlockQ8K;

    fn dot(x: &[Self], y: &[BlockQ8K]) -> f32 {
        assert_eq!(x.len(), y.len(), "Q5_K dot: block counts differ");
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2() {
            // SAFETY: the CPU has the kernel's features; lengths checked.
            return unsafe { avx2::dot(x, y) };
        }
        Self::dot_ref(x, y)
    }

    /// `ggml_vec_dot_q5_K_q8_K` on AVX2: eight float lanes of scaled integer sums, one FMA per
    /// super-block with `d8 * d`; the mins' integer term summed whole and folded into a scalar
    /// with `-d8 * dmin` (GCC contracts that `summs += dmin * isum` into one FMA); the scalar
    /// added after the horizontal sum.
    fn dot_ref(x: &[Self], y: &[BlockQ8K]) -> f32 {
        assert_eq!(x.len(), y.len(), "Q5_K dot: block counts differ");
        let mut acc = [0.0f32; 8];
        let mut summs = 0.0f32;
        for (bx, by) in x.iter().zip(y) {
            let d = by.d * bx.d.to_f32();
            let dmin = -by.d * bx.dmin.to_f32();
            let (sc, m) = scales_mins_k4(&bx.scales);
            let imin: i32 = (0..8).map(|j| i32::from(m[j]) * i32::from(by.bsums[2 * j].wrapping_add(by.bsums[2 * j + 1]))).sum();
            summs = dmin.mul_add(to_f32(imin), summs);
            let mut lanes = [0i32; 8];
            for sub in 0..8 {
                let q = &bx.qs[32 * (sub / 2)..][..32];
                for (e, &byte) in q.iter().enumerate() {
                    let nib = if sub % 2 == 0 { byte & 0x0F } else { byte >> 4 };
                    let v = nib | (((bx.qh[e] >> sub) & 1) << 4);
                    let p = i32::from(v) * i32::from(by.qs[32 * sub + e]) * i32::from(sc[sub]);
                    lanes[e / 4] = lanes[e / 4].wrapping_add(p);
                }
            }
            for (a, &l) in acc.iter_mut().zip(&lanes) {
                *a = d.mul_add(to_f32(l), *a);
            }
        }
        hsum8(acc) + summs
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::simd::scaled_pair;
    use super::*;
    use crate::quant::x86::hsum_ps;
    use std::arch::x86_64::*;

    /// Bit `bit` of every byte of `h`, moved to bit 4.
    #[inline(always)]
    unsafe fn fifth(h: __m256i, bit: u32) -> __m256i {
        let one = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(bit as i32)), _mm256_set1_epi8(1));
        _mm256_slli_epi16::<4>(one)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(x: &[BlockQ5K], y: &[BlockQ8K]) -> f32 {
        let m4 = _mm256_set1_epi8(0x0F);
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0.0f32;
        for (bx, by) in x.iter().zip(y) {
            let d = by.d * bx.d.to_f32();
            let dmin = -by.d * bx.dmin.to_f32();
            let (sc, m) = scales_mins_k4(&bx.scales);
            let imin: i32 = (0..8).map(|j| i32::from(m[j]) * i32::from(by.bsums[2 * j].wrapping_add(by.bsums[2 * j + 1]))).sum();
            summs = dmin.mul_add(to_f32(imin), summs);
            let h = _mm256_loadu_si256(bx.qh.as_ptr().cast());
            let mut sumi = _mm256_setzero_si256();
            for c in 0..4 {
                let bits = _mm256_loadu_si256(bx.qs.as_ptr().add(32 * c).cast());
                let lo = _mm256_or_si256(_mm256_and_si256(bits, m4), fifth(h, 2 * c as u32));
                let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4), fifth(h, 2 * c as u32 + 1));
                let ylo = _mm256_loadu_si256(by.qs.as_ptr().add(64 * c).cast());
                let yhi = _mm256_loadu_si256(by.qs.as_ptr().add(64 * c + 32).cast());
                sumi = _mm256_add_epi32(sumi, scaled_pair(lo, ylo, sc[2 * c], hi, yhi, sc[2 * c + 1]));
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum_ps(acc) + summs
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::check_k_dot;
    use super::*;

    #[test]
    fn simd_equals_scalar_twin_and_dequantised_dot() {
        check_k_dot(0x5_b, |b: &mut BlockQ5K, r| {
            b.d = r.half(0.01);
            b.dmin = r.half(0.01);
        });
    }
}
