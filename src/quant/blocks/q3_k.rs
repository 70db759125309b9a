//! Q3_K: 256 weights in sixteen sub-blocks of 16, `x = d * (sc_j - 32) * (q - 4 * !h)` with
//! 3-bit quants: the low two bits placed as Q2_K's (element `128h + 32k + l` in bits
//! `2k..2k + 2` of `qs[32h + l]`), the third in bit `4h + k` of `hmask[l]`, a clear bit
//! meaning the quant is lowered by 4. Sixteen 6-bit scales packed in 12 bytes. Multiplied with
//! Q8_K activations.

use super::q2_k::int_lanes;
use super::{to_f32, BlockQ8K, WeightBlock};
use crate::gguf::GgmlType;
use crate::quant::f16;
use crate::quant::reference::hsum8;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ3K {
    pub hmask: [u8; 32],
    pub qs: [u8; 64],
    pub scales: [u8; 12],
    pub d: f16,
}

impl BlockQ3K {
    /// The signed quant of element `e` (0..256), -4..=3.
    #[inline(always)]
    pub fn quant(&self, e: usize) -> i32 {
        let (half, k, l) = (e / 128, e % 128 / 32, e % 32);
        let low = i32::from((self.qs[32 * half + l] >> (2 * k)) & 3);
        if self.hmask[l] & (1 << (e / 32)) != 0 {
            low
        } else {
            low - 4
        }
    }

    /// The sixteen scales, -32..=31: bytes 0..8 hold the low four bits of scales 0..8 (low
    /// nibbles) and 8..16 (high nibbles); byte `8 + j % 4` holds the top two bits of scale `j`
    /// at bit `2 * (j / 4)`.
    #[inline(always)]
    pub fn scales(&self) -> [i8; 16] {
        let p = &self.scales;
        std::array::from_fn(|j| {
            let low = if j < 8 { p[j] & 0x0F } else { p[j - 8] >> 4 };
            let high = (p[8 + j % 4] >> (2 * (j / 4))) & 3;
            (low | (high << 4)) as i8 - 32
        })
    }
}

impl WeightBlock for BlockQ3K {
    const TYPE: GgmlType = GgmlType::Q3_K;
    type Act = BlockQ8K;

    fn dot(x: &[Self], y: &[BlockQ8K]) -> f32 {
        assert_eq!(x.len(), y.len(), "Q3_K dot: block counts differ");
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2() {
            // SAFETY: the CPU has the kernel's features; lengths checked.
            return unsafe { avx2::dot(x, y) };
        }
        Self::dot_ref(x, y)
    }

    /// `ggml_vec_dot_q3_K_q8_K` on AVX2: lane `l` holds elements `4l..4l + 4` of every 32,
    /// signed quant times activation times scale (the kernel forms `low * y - 4 * y` for the
    /// cleared high bits in 16 bits, exactly); one FMA per super-block with `d8 * d`; ggml's
    /// horizontal sum.
    fn dot_ref(x: &[Self], y: &[BlockQ8K]) -> f32 {
        assert_eq!(x.len(), y.len(), "Q3_K dot: block counts differ");
        let mut acc = [0.0f32; 8];
        for (bx, by) in x.iter().zip(y) {
            let d = by.d * bx.d.to_f32();
            let sc = bx.scales();
            let lanes = int_lanes(|e| bx.quant(e), by, |j| i32::from(sc[j]));
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

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(x: &[BlockQ3K], y: &[BlockQ8K]) -> f32 {
        let m3 = _mm256_set1_epi8(3);
        let four = _mm256_set1_epi8(4);
        let zero = _mm256_setzero_si256();
        let mut acc = _mm256_setzero_ps();
        for (bx, by) in x.iter().zip(y) {
            let d = by.d * bx.d.to_f32();
            let sc = bx.scales().map(i16::from);
            let hbits = _mm256_loadu_si256(bx.hmask.as_ptr().cast());
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
                    // 4 where the element's high bit is clear, else 0.
                    let bit = _mm256_set1_epi8(1 << (4 * half + k));
                    let lowered = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hbits, bit), zero), four);
                    let p = _mm256_sub_epi16(_mm256_maddubs_epi16(qk, yk), _mm256_maddubs_epi16(lowered, yk));
                    let s = 8 * half + 2 * k;
                    let scales = _mm256_set_m128i(_mm_set1_epi16(sc[s + 1]), _mm_set1_epi16(sc[s]));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scales));
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
        check_k_dot(0x3_b, |b: &mut BlockQ3K, r| b.d = r.half(0.01));
    }
}
