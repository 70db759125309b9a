//! Q5_0: 32 weights `x = d * (q - 16)` with 5-bit quants: the low four bits as in Q4_0's
//! nibbles, the fifth bit of element i in bit i of `qh`. Multiplied with Q8_0 activations.

use super::WeightBlock;
use crate::gguf::GgmlType;
use crate::quant::reference::{accumulate_signed, hsum8, nibble};
use crate::quant::{f16, BlockQ8_0};

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

impl BlockQ5_0 {
    /// Signed quant of element `e` (-16..=15).
    #[inline(always)]
    pub fn quant(&self, e: usize) -> i8 {
        let high = ((u32::from_le_bytes(self.qh) >> e) & 1) as u8;
        (nibble(&self.qs, e) | (high << 4)) as i8 - 16
    }
}

impl WeightBlock for BlockQ5_0 {
    const TYPE: GgmlType = GgmlType::Q5_0;
    type Act = BlockQ8_0;

    fn dot(x: &[Self], y: &[BlockQ8_0]) -> f32 {
        assert_eq!(x.len(), y.len(), "Q5_0 dot: block counts differ");
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2() {
            // SAFETY: the CPU has the kernel's features; lengths checked.
            return unsafe { avx2::dot(x, y) };
        }
        Self::dot_ref(x, y)
    }

    /// As Q4_0's: eight lanes of four adjacent signed products (formed with the sign trick),
    /// one FMA per block with `d_x * d_y`, ggml's horizontal sum.
    fn dot_ref(x: &[Self], y: &[BlockQ8_0]) -> f32 {
        assert_eq!(x.len(), y.len(), "Q5_0 dot: block counts differ");
        let mut acc = [0.0f32; 8];
        for (bx, by) in x.iter().zip(y) {
            let d = bx.d.to_f32() * by.d.to_f32();
            accumulate_signed(&mut acc, d, |e| bx.quant(e), &by.qs);
        }
        hsum8(acc)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::simd::bytes_from_bits;
    use super::*;
    use crate::quant::x86::{hsum_ps, mul_sum_i8, nibbles, scale_product};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(x: &[BlockQ5_0], y: &[BlockQ8_0]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (bx, by) in x.iter().zip(y) {
            let d = scale_product(bx, by);
            // A clear fifth bit means q - 16 < 0: or-ing 0xF0 into the nibble gives that
            // negative byte directly; a set bit leaves the nibble (q - 16 = nibble).
            let missing = _mm256_andnot_si256(bytes_from_bits(u32::from_le_bytes(bx.qh)), _mm256_set1_epi8(0xF0u8 as i8));
            let qx = _mm256_or_si256(nibbles(&bx.qs), missing);
            let qy = _mm256_loadu_si256(by.qs.as_ptr().cast());
            acc = _mm256_fmadd_ps(d, mul_sum_i8(qx, qy), acc);
        }
        hsum_ps(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::Rng;
    use super::*;

    #[test]
    fn simd_equals_scalar_twin_and_dequantised_dot() {
        let mut rng = Rng(0x5_0);
        for n in [1usize, 3, 7, 18, 33] {
            let x: Vec<BlockQ5_0> = rng.blocks(n, |b: &mut BlockQ5_0, r| b.d = r.half(0.05));
            let y: Vec<BlockQ8_0> = rng.blocks(n, |b: &mut BlockQ8_0, r| {
                b.d = r.half(0.02);
                for q in &mut b.qs {
                    *q = (*q).max(-127);
                }
            });
            let r = BlockQ5_0::dot_ref(&x, &y);
            assert_eq!(BlockQ5_0::dot(&x, &y).to_bits(), r.to_bits(), "n = {n}");
            let mut w = vec![0.0f32; 32 * n];
            crate::quant::dequantize(GgmlType::Q5_0, bytemuck::cast_slice(&x), &mut w).unwrap();
            let plain: f64 = w.iter().enumerate().map(|(i, &v)| f64::from(v) * f64::from(y[i / 32].qs[i % 32]) * f64::from(y[i / 32].d.to_f32())).sum();
            assert!((f64::from(r) - plain).abs() <= 1e-4 * (1.0 + plain.abs()), "n = {n}: {r} vs {plain}");
        }
    }
}
