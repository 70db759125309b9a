//! Q5_1: 32 weights `x = d * q + m` with 5-bit quants (fifth bits in `qh` as in Q5_0).
//! Multiplied with Q8_1 activations, whose `s = d * sum(q)` applies the minimum once per block.

use super::WeightBlock;
use crate::gguf::GgmlType;
use crate::quant::reference::{hsum8, nibble};
use crate::quant::{f16, BlockQ8_1};

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

impl BlockQ5_1 {
    /// Unsigned quant of element `e` (0..=31).
    #[inline(always)]
    pub fn quant(&self, e: usize) -> u8 {
        let high = ((u32::from_le_bytes(self.qh) >> e) & 1) as u8;
        nibble(&self.qs, e) | (high << 4)
    }
}

impl WeightBlock for BlockQ5_1 {
    const TYPE: GgmlType = GgmlType::Q5_1;
    type Act = BlockQ8_1;

    fn dot(x: &[Self], y: &[BlockQ8_1]) -> f32 {
        assert_eq!(x.len(), y.len(), "Q5_1 dot: block counts differ");
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2() {
            // SAFETY: the CPU has the kernel's features; lengths checked.
            return unsafe { avx2::dot(x, y) };
        }
        Self::dot_ref(x, y)
    }

    /// As Q4_1's: lanes of four unsigned-by-signed products, one FMA per block with
    /// `d_x * d_y`, the minimums summed in a scalar (`m * s` is exact) added last.
    fn dot_ref(x: &[Self], y: &[BlockQ8_1]) -> f32 {
        assert_eq!(x.len(), y.len(), "Q5_1 dot: block counts differ");
        let mut acc = [0.0f32; 8];
        let mut summs = 0.0f32;
        for (bx, by) in x.iter().zip(y) {
            let d = bx.d.to_f32() * by.d.to_f32();
            summs += bx.m.to_f32() * by.s.to_f32();
            for (lane, a) in acc.iter_mut().enumerate() {
                let s: i32 = (4 * lane..4 * lane + 4).map(|e| i32::from(bx.quant(e)) * i32::from(by.qs[e])).sum();
                *a = (s as f32).mul_add(d, *a);
            }
        }
        hsum8(acc) + summs
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::simd::bytes_from_bits;
    use super::*;
    use crate::quant::x86::{head_f16x2, hsum_ps, mul_sum_us8, nibbles};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(x: &[BlockQ5_1], y: &[BlockQ8_1]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut summs = _mm_setzero_ps();
        for (bx, by) in x.iter().zip(y) {
            let (dm, ds) = (head_f16x2(bx), head_f16x2(by));
            // Lane 1: m * s (exact) added to the running sum, as ggml's scalar `summs`.
            summs = _mm_fmadd_ps(dm, ds, summs);
            let d = _mm256_broadcastss_ps(_mm_mul_ss(dm, ds));
            let high = _mm256_and_si256(bytes_from_bits(u32::from_le_bytes(bx.qh)), _mm256_set1_epi8(0x10));
            let qx = _mm256_or_si256(nibbles(&bx.qs), high);
            let qy = _mm256_loadu_si256(by.qs.as_ptr().cast());
            acc = _mm256_fmadd_ps(mul_sum_us8(qx, qy), d, acc);
        }
        hsum_ps(acc) + _mm_cvtss_f32(_mm_movehdup_ps(summs))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::Rng;
    use super::*;

    #[test]
    fn simd_equals_scalar_twin_and_dequantised_dot() {
        let mut rng = Rng(0x5_1);
        for n in [1usize, 3, 7, 18, 33] {
            let x: Vec<BlockQ5_1> = rng.blocks(n, |b: &mut BlockQ5_1, r| {
                b.d = r.half(0.05);
                b.m = r.half(0.5);
            });
            let y: Vec<BlockQ8_1> = rng.blocks(n, |b: &mut BlockQ8_1, r| {
                b.d = r.half(0.02);
                for q in &mut b.qs {
                    *q = (*q).max(-127);
                }
                let sum: i32 = b.qs.iter().map(|&q| i32::from(q)).sum();
                b.s = f16::from_f32(b.d.to_f32() * sum as f32);
            });
            let r = BlockQ5_1::dot_ref(&x, &y);
            assert_eq!(BlockQ5_1::dot(&x, &y).to_bits(), r.to_bits(), "n = {n}");
            let mut w = vec![0.0f32; 32 * n];
            crate::quant::dequantize(GgmlType::Q5_1, bytemuck::cast_slice(&x), &mut w).unwrap();
            let plain: f64 = w.iter().enumerate().map(|(i, &v)| f64::from(v) * f64::from(y[i / 32].qs[i % 32]) * f64::from(y[i / 32].d.to_f32())).sum();
            // `s` is rounded to f16, so the minimum's share differs from the exact sum slightly.
            assert!((f64::from(r) - plain).abs() <= 2e-3 * (1.0 + plain.abs()), "n = {n}: {r} vs {plain}");
        }
    }
}
