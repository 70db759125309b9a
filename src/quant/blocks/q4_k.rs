//! Q4_K: 256 weights in eight sub-blocks of 32, `x = d * sc_j * q - dmin * m_j` with 4-bit
//! quants and 6-bit sub-block scales and mins. Each 64 elements use 32 bytes of `qs`: the low
//! nibbles are sub-block 2c, the high nibbles 2c + 1. Multiplied with Q8_K activations.
//!
//! llama.cpp has two x86 products for it. `ggml_vec_dot_q4_K_q8_K`, with eight float lanes
//! and four for the mins, is [`BlockQ4K::dot`], what [`crate::cpu`] uses: it is llama.cpp's
//! product with `--no-repack` (no extra buffer types), and for matrices whose rows are not a
//! multiple of 8. By default llama.cpp repacks other Q4_K matrices at load into 8-row groups
//! (`block_q4_Kx8`, `ggml_gemv_q4_K_8x8_q8_K` on AVX2), which keeps one float accumulator per
//! row and term: `sum += isum * (d * d8)` and `mins += imin * (dmin * d8)` per super-block,
//! `sum - mins` at the end ([`dot_repacked`], kept and tested for a caller that wants those
//! numerics). On CPUs with AMX, its AMX buffer type has numerics of its own again. The
//! reference tokens in `tests/refs` were made with `--no-repack`: on the development VM the
//! default run dies in the AMX kernels (the hypervisor does not grant the AMX tile state).

use super::{scales_mins_k4, to_f32, BlockQ8K, WeightBlock};
use crate::gguf::GgmlType;
use crate::quant::reference::hsum8;
use crate::quant::f16;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; 128],
}

/// The eight i32 lanes of one super-block's scaled products, as the x86 kernels form them:
/// lane `l` holds elements `4l..4l + 4` of every sub-block, times the sub-block's scale.
fn int_lanes(bx: &BlockQ4K, by: &BlockQ8K, sc: &[u8; 8]) -> [i32; 8] {
    let mut lanes = [0i32; 8];
    for sub in 0..8 {
        let q = &bx.qs[32 * (sub / 2)..][..32];
        for (e, &byte) in q.iter().enumerate() {
            let nib = if sub % 2 == 0 { byte & 0x0F } else { byte >> 4 };
            let p = i32::from(nib) * i32::from(by.qs[32 * sub + e]) * i32::from(sc[sub]);
            lanes[e / 4 % 8] = lanes[e / 4 % 8].wrapping_add(p);
        }
    }
    lanes
}

/// `sum_j m_j * (bsums[2j] + bsums[2j + 1])`: the mins' integer term of a super-block.
fn min_term(by: &BlockQ8K, m: &[u8; 8]) -> i32 {
    (0..8).map(|j| i32::from(m[j]) * (i32::from(by.bsums[2 * j]) + i32::from(by.bsums[2 * j + 1]))).sum()
}

impl WeightBlock for BlockQ4K {
    const TYPE: GgmlType = GgmlType::Q4_K;
    type Act = BlockQ8K;

        fn dot(x: &[Self], y: &[BlockQ8K]) -> f32 {
        dot_lanes(x, y)
    }

    fn dot_ref(x: &[Self], y: &[BlockQ8K]) -> f32 {
        dot_lanes_ref(x, y)
    }
}

/// The repacked (8-row) product's numerics, SIMD where the CPU has it; bit-identical to
/// [`dot_repacked_ref`].
pub fn dot_repacked(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    assert_eq!(x.len(), y.len(), "Q4_K dot: block counts differ");
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: the CPU has the kernel's features; lengths checked.
        return unsafe { avx2::dot_repacked(x, y) };
    }
    dot_repacked_ref(x, y)
}

/// Scalar twin of [`dot_repacked`].
pub fn dot_repacked_ref(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    assert_eq!(x.len(), y.len(), "Q4_K dot: block counts differ");
    let (mut sum, mut mins) = (0.0f32, 0.0f32);
    for (bx, by) in x.iter().zip(y) {
        let (sc, m) = scales_mins_k4(&bx.scales);
        let isum = int_lanes(bx, by, &sc).iter().fold(0i32, |a, &v| a.wrapping_add(v));
        sum = to_f32(isum).mul_add(bx.d.to_f32() * by.d, sum);
        mins = to_f32(min_term(by, &m)).mul_add(bx.dmin.to_f32() * by.d, mins);
    }
    sum - mins
}

/// `ggml_vec_dot_q4_K_q8_K`'s numerics, SIMD where the CPU has it; bit-identical to
/// [`dot_lanes_ref`].
pub fn dot_lanes(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    assert_eq!(x.len(), y.len(), "Q4_K dot: block counts differ");
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: the CPU has the kernel's features; lengths checked.
        return unsafe { avx2::dot_lanes(x, y) };
    }
    dot_lanes_ref(x, y)
}

/// Scalar twin of [`dot_lanes`]: eight float lanes fed by one FMA per super-block with
/// `d8 * d`; the mins in four lanes (pairs of sub-blocks) with `-d8 * dmin`; the four reduced
/// as (0 + 2) + (1 + 3) and added after ggml's horizontal sum of the eight.
pub fn dot_lanes_ref(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    assert_eq!(x.len(), y.len(), "Q4_K dot: block counts differ");
    let mut acc = [0.0f32; 8];
    let mut acc_m = [0.0f32; 4];
    for (bx, by) in x.iter().zip(y) {
        let d = by.d * bx.d.to_f32();
        let dmin = -by.d * bx.dmin.to_f32();
        let (sc, m) = scales_mins_k4(&bx.scales);
        for (a, &l) in acc.iter_mut().zip(&int_lanes(bx, by, &sc)) {
            *a = d.mul_add(to_f32(l), *a);
        }
        // 16-bit sums of each sub-block's two bsums (wrapping, as `_mm_hadd_epi16`).
        let q8s: [i16; 8] = std::array::from_fn(|j| by.bsums[2 * j].wrapping_add(by.bsums[2 * j + 1]));
        for (i, a) in acc_m.iter_mut().enumerate() {
            let p = i32::from(m[2 * i]) * i32::from(q8s[2 * i]) + i32::from(m[2 * i + 1]) * i32::from(q8s[2 * i + 1]);
            *a = dmin.mul_add(to_f32(p), *a);
        }
    }
    hsum8(acc) + ((acc_m[0] + acc_m[2]) + (acc_m[1] + acc_m[3]))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::simd::{hsum_i32, scaled_pair};
    use super::*;
    use crate::quant::x86::hsum_ps;
    use std::arch::x86_64::*;

    /// The super-block's eight scaled i32 lanes (see [`int_lanes`]).
    #[inline(always)]
    unsafe fn lanes(bx: &BlockQ4K, by: &BlockQ8K, sc: &[u8; 8]) -> __m256i {
        let m4 = _mm256_set1_epi8(0x0F);
        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            let bits = _mm256_loadu_si256(bx.qs.as_ptr().add(32 * c).cast());
            let lo = _mm256_and_si256(bits, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4);
            let ylo = _mm256_loadu_si256(by.qs.as_ptr().add(64 * c).cast());
            let yhi = _mm256_loadu_si256(by.qs.as_ptr().add(64 * c + 32).cast());
            sumi = _mm256_add_epi32(sumi, scaled_pair(lo, ylo, sc[2 * c], hi, yhi, sc[2 * c + 1]));
        }
        sumi
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_repacked(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
        let (mut sum, mut mins) = (0.0f32, 0.0f32);
        for (bx, by) in x.iter().zip(y) {
            let (sc, m) = scales_mins_k4(&bx.scales);
            let isum = hsum_i32(lanes(bx, by, &sc));
            sum = to_f32(isum).mul_add(bx.d.to_f32() * by.d, sum);
            mins = to_f32(min_term(by, &m)).mul_add(bx.dmin.to_f32() * by.d, mins);
        }
        sum - mins
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_lanes(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut acc_m = _mm_setzero_ps();
        for (bx, by) in x.iter().zip(y) {
            let d = by.d * bx.d.to_f32();
            let dmin = -by.d * bx.dmin.to_f32();
            let (sc, m) = scales_mins_k4(&bx.scales);
            let bs = _mm256_loadu_si256(by.bsums.as_ptr().cast());
            let q8s = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256::<1>(bs));
            let mins16 = _mm_cvtepu8_epi16(_mm_loadl_epi64(m.as_ptr().cast()));
            let prod = _mm_madd_epi16(mins16, q8s);
            acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(lanes(bx, by, &sc)), acc);
        }
        let m2 = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
        let m1 = _mm_add_ss(m2, _mm_movehdup_ps(m2));
        hsum_ps(acc) + _mm_cvtss_f32(m1)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::Rng;
    use super::super::quantize_row_q8_k;
    use super::*;

    pub(crate) fn random_q4k(rng: &mut Rng, n: usize) -> Vec<BlockQ4K> {
        rng.blocks(n, |b: &mut BlockQ4K, r| {
            b.d = r.half(0.01);
            b.dmin = r.half(0.01);
        })
    }

    #[test]
    fn simd_equals_scalar_twins_and_dequantised_dot() {
        let mut rng = Rng(0x4_b);
        for n in [1usize, 2, 3, 5] {
            let x = random_q4k(&mut rng, n);
            let a: Vec<f32> = (0..256 * n).map(|_| rng.f32()).collect();
            let mut y = vec![BlockQ8K::ZERO; n];
            quantize_row_q8_k(&a, &mut y);
            let r = dot_repacked_ref(&x, &y);
            assert_eq!(dot_repacked(&x, &y).to_bits(), r.to_bits(), "n = {n}");
            assert_eq!(BlockQ4K::dot(&x, &y).to_bits(), dot_lanes_ref(&x, &y).to_bits(), "n = {n}");
            let rl = dot_lanes_ref(&x, &y);
            assert_eq!(dot_lanes(&x, &y).to_bits(), rl.to_bits(), "n = {n}");
            let mut w = vec![0.0f32; 256 * n];
            crate::quant::dequantize(GgmlType::Q4_K, bytemuck::cast_slice(&x), &mut w).unwrap();
            let plain: f64 = w.iter().enumerate().map(|(i, &v)| f64::from(v) * f64::from(y[i / 256].qs[i % 256]) * f64::from(y[i / 256].d)).sum();
            for got in [r, rl] {
                assert!((f64::from(got) - plain).abs() <= 1e-4 * (1.0 + plain.abs()), "n = {n}: {got} vs {plain}");
            }
        }
    }
}
