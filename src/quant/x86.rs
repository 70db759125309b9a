//! AVX2 kernels (with FMA and F16C), bit-identical to the scalar ones in [`super::reference`].
//!
//! Each block's integer dot product lands in eight i32 lanes of four adjacent products, as in
//! llama.cpp's `mul_sum_us8_pairs_float`. llama.cpp forms them with VNNI's `vpdpbusd` when built
//! for it; the integers are exact either way, and a single row is bound by the latency of the
//! per-block FMA into the float accumulator, so `vpmaddubsw` + `vpmaddwd` serve every AVX2 CPU.
//!
//! Rows are processed one at a time on purpose: interleaving several rows hides that latency
//! when the weights are in cache, but from DRAM the concurrent row streams defeat the hardware
//! prefetchers and were measured 45% slower than one row at a time. (Where the CPU allows,
//! matrix products use [`super::packed`] instead, whose groups of rows are one stream.)

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::{f16, BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1, QK};

/// Whether the CPU has everything the kernels here are compiled for.
pub(super) fn has_avx2() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// ggml's `hsum_float_8`; see [`super::reference`] for the order.
#[inline(always)]
pub(super) unsafe fn hsum_ps(v: __m256) -> f32 {
    let r = _mm_add_ps(_mm256_extractf128_ps::<1>(v), _mm256_castps256_ps128(v));
    let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)))
}

/// The first two f16 values of a block (`d` and `m` or `s`) as f32 in lanes 0 and 1.
#[inline(always)]
pub(super) unsafe fn head_f16x2<T>(block: &T) -> __m128 {
    let bits = (block as *const T).cast::<u32>().read_unaligned();
    _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))
}

/// The product of the leading f16 scales of two blocks, broadcast to eight lanes. Both scales go
/// through one conversion: converting one alone lets LLVM narrow the load into a lane insert that
/// depends on whatever register it picks, often the accumulator, which serialises the loop.
#[inline(always)]
pub(super) unsafe fn scale_product<X, Y>(x: &X, y: &Y) -> __m256 {
    let dx = (x as *const X).cast::<u16>().read_unaligned();
    let dy = (y as *const Y).cast::<u16>().read_unaligned();
    let d = _mm_cvtph_ps(_mm_cvtsi32_si128((u32::from(dx) | u32::from(dy) << 16) as i32));
    _mm256_broadcastss_ps(_mm_mul_ss(d, _mm_movehdup_ps(d)))
}

/// 32 nibbles as bytes 0..=15 in element order: low nibbles in the lower 128 bits.
#[inline(always)]
pub(super) unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
    let lo = _mm_loadu_si128(qs.as_ptr().cast());
    let hi = _mm_srli_epi16::<4>(lo);
    _mm256_and_si256(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(0x0F))
}

/// Unsigned-by-signed byte products, summed in groups of four into i32 lanes.
#[inline(always)]
pub(super) unsafe fn mul_sum_us8(ux: __m256i, sy: __m256i) -> __m256 {
    let pairs = _mm256_maddubs_epi16(ux, sy);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
}

/// Signed-by-signed byte products via the sign trick, as llama.cpp's `mul_sum_i8_pairs_float`.
#[inline(always)]
pub(super) unsafe fn mul_sum_i8(x: __m256i, y: __m256i) -> __m256 {
    mul_sum_us8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_dot_q4_0_q8_0(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (bx, by) in x.iter().zip(y) {
        let d = scale_product(bx, by);
        let qx = _mm256_sub_epi8(nibbles(&bx.qs), _mm256_set1_epi8(8));
        let qy = _mm256_loadu_si256(by.qs.as_ptr().cast());
        acc = _mm256_fmadd_ps(d, mul_sum_i8(qx, qy), acc);
    }
    hsum_ps(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_dot_q8_0_q8_0(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (bx, by) in x.iter().zip(y) {
        let d = scale_product(bx, by);
        let qx = _mm256_loadu_si256(bx.qs.as_ptr().cast());
        let qy = _mm256_loadu_si256(by.qs.as_ptr().cast());
        acc = _mm256_fmadd_ps(d, mul_sum_i8(qx, qy), acc);
    }
    hsum_ps(acc)
}

/// Q4_1 by Q8_1. Lane 1 of `summs` carries ggml's scalar sum of `m * s` (the product is exact,
/// so the FMA rounds exactly like a separate add); lane 0 of the same FMA computes nothing of use.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_dot_q4_1_q8_1(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = _mm_setzero_ps();
    for (bx, by) in x.iter().zip(y) {
        let (dm, ds) = (head_f16x2(bx), head_f16x2(by));
        summs = _mm_fmadd_ps(dm, ds, summs);
        let d = _mm256_broadcastss_ps(_mm_mul_ss(dm, ds));
        let qy = _mm256_loadu_si256(by.qs.as_ptr().cast());
        acc = _mm256_fmadd_ps(d, mul_sum_us8(nibbles(&bx.qs), qy), acc);
    }
    hsum_ps(acc) + _mm_cvtss_f32(_mm_movehdup_ps(summs))
}

/// Four rows' [`vec_dot_q4_0_q8_0`] at once: each row's instructions are the one-row kernel's,
/// in its order (so each result is bit-identical to it), interleaved so that the four
/// accumulators' FMA latency chains overlap instead of following one another.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_dot_q4_0_q8_0_x4(x: [&[BlockQ4_0]; 4], y: &[BlockQ8_0]) -> [f32; 4] {
    let mut acc = [_mm256_setzero_ps(); 4];
    for (b, by) in y.iter().enumerate() {
        let qy = _mm256_loadu_si256(by.qs.as_ptr().cast());
        for r in 0..4 {
            let bx = x[r].get_unchecked(b);
            let d = scale_product(bx, by);
            let qx = _mm256_sub_epi8(nibbles(&bx.qs), _mm256_set1_epi8(8));
            acc[r] = _mm256_fmadd_ps(d, mul_sum_i8(qx, qy), acc[r]);
        }
    }
    acc.map(|a| hsum_ps(a))
}

/// Four rows' [`vec_dot_q8_0_q8_0`], as [`vec_dot_q4_0_q8_0_x4`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_dot_q8_0_q8_0_x4(x: [&[BlockQ8_0]; 4], y: &[BlockQ8_0]) -> [f32; 4] {
    let mut acc = [_mm256_setzero_ps(); 4];
    for (b, by) in y.iter().enumerate() {
        let qy = _mm256_loadu_si256(by.qs.as_ptr().cast());
        for r in 0..4 {
            let bx = x[r].get_unchecked(b);
            let d = scale_product(bx, by);
            let qx = _mm256_loadu_si256(bx.qs.as_ptr().cast());
            acc[r] = _mm256_fmadd_ps(d, mul_sum_i8(qx, qy), acc[r]);
        }
    }
    acc.map(|a| hsum_ps(a))
}

/// Four rows' [`vec_dot_q4_1_q8_1`], as [`vec_dot_q4_0_q8_0_x4`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_dot_q4_1_q8_1_x4(x: [&[BlockQ4_1]; 4], y: &[BlockQ8_1]) -> [f32; 4] {
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut summs = [_mm_setzero_ps(); 4];
    for (b, by) in y.iter().enumerate() {
        let ds = head_f16x2(by);
        let qy = _mm256_loadu_si256(by.qs.as_ptr().cast());
        for r in 0..4 {
            let bx = x[r].get_unchecked(b);
            let dm = head_f16x2(bx);
            summs[r] = _mm_fmadd_ps(dm, ds, summs[r]);
            let d = _mm256_broadcastss_ps(_mm_mul_ss(dm, ds));
            acc[r] = _mm256_fmadd_ps(d, mul_sum_us8(nibbles(&bx.qs), qy), acc[r]);
        }
    }
    std::array::from_fn(|r| hsum_ps(acc[r]) + _mm_cvtss_f32(_mm_movehdup_ps(summs[r])))
}

/// The 64-element steps of ggml's AVX-512 F16/F32 dot, with each 16-lane accumulator held as two
/// 8-lane halves (`acc[2j]` lanes 0..8 and `acc[2j + 1]` lanes 8..16 of accumulator `j`).
/// Returns the reduced sum of the first `n - n % 64` elements.
#[inline(always)]
unsafe fn dot_steps(n: usize, load: impl Fn(usize) -> (__m256, __m256)) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 8];
    for base in (0..n - n % 64).step_by(64) {
        for (k, a) in acc.iter_mut().enumerate() {
            let (xv, yv) = load(base + 8 * k);
            *a = _mm256_fmadd_ps(xv, yv, *a);
        }
    }
    let lo = _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6]));
    let hi = _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7]));
    hsum_ps(_mm256_add_ps(lo, hi))
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_dot_f16_f16(x: &[f16], y: &[f16]) -> f32 {
    let n = x.len();
    let (px, py) = (x.as_ptr(), y.as_ptr());
    let steps = dot_steps(n, |i| {
        (
            _mm256_cvtph_ps(_mm_loadu_si128(px.add(i).cast())),
            _mm256_cvtph_ps(_mm_loadu_si128(py.add(i).cast())),
        )
    });
    let mut sum = f64::from(steps);
    for i in n - n % 64..n {
        sum += f64::from(x[i].to_f32() * y[i].to_f32());
    }
    sum as f32
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_dot_f32(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len();
    let (px, py) = (x.as_ptr(), y.as_ptr());
    let mut sum = dot_steps(n, |i| (_mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i))));
    for i in n - n % 64..n {
        sum = x[i].mul_add(y[i], sum);
    }
    sum
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f32_to_f16_row(x: &[f32], y: &mut [f16]) {
    let n8 = x.len() - x.len() % 8;
    for i in (0..n8).step_by(8) {
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(x.as_ptr().add(i)));
        _mm_storeu_si128(y.as_mut_ptr().add(i).cast(), h);
    }
    for i in n8..x.len() {
        y[i] = f16::from_f32(x[i]);
    }
}

/// f32 to f16 bits with round to nearest even, as F16C's `vcvtps2ph`.
#[inline(always)]
unsafe fn to_f16(v: f32) -> f16 {
    f16::from_bits(_mm_extract_epi16::<0>(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(v))) as u16)
}

/// One block of llama.cpp's x86 activation quantiser: the f32 scale `amax / 127` and the i32
/// quants (not yet saturated) in four vectors of eight elements.
#[inline(always)]
unsafe fn quantize_block(x: &[f32]) -> (f32, [__m256i; 4]) {
    let v: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(x.as_ptr().add(8 * k)));
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_andnot_ps(sign, v[0]);
    for vk in &v[1..] {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vk));
    }
    let m4 = _mm_max_ps(_mm256_extractf128_ps::<1>(m), _mm256_castps256_ps128(m));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
    let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    let q =
        v.map(|vk| _mm256_cvtps_epi32(_mm256_round_ps::<_MM_FROUND_TO_NEAREST_INT>(_mm256_mul_ps(vk, id))));
    (amax / 127.0, q)
}

/// Saturates the 32 i32 quants to i8 and stores them in element order (the pack instructions
/// work per 128-bit half, the permutation restores the order).
#[inline(always)]
unsafe fn store_quants(q: &[__m256i; 4], out: &mut [i8; 32]) {
    let w = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    let w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(out.as_mut_ptr().cast(), w);
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_row_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    for (block, xb) in y.iter_mut().zip(x.chunks_exact(QK)) {
        let (d, q) = quantize_block(xb);
        block.d = to_f16(d);
        store_quants(&q, &mut block.qs);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_row_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    for (block, xb) in y.iter_mut().zip(x.chunks_exact(QK)) {
        let (d, q) = quantize_block(xb);
        let s8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256::<1>(s8));
        let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<0b01>(s2)));
        block.d = to_f16(d);
        block.s = to_f16(d * sum as f32);
        store_quants(&q, &mut block.qs);
    }
}

/// `y = f16(x * v + y)` element-wise, fused, rounding to nearest even: the f16 accumulator
/// update of attention's weighted value sum.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_mad_f16(y: &mut [f16], x: &[f16], v: f32) {
    let n8 = y.len() / 8 * 8;
    let vv = _mm256_set1_ps(v);
    for i in (0..n8).step_by(8) {
        let yp = y.as_mut_ptr().add(i).cast::<__m128i>();
        let a = _mm256_cvtph_ps(_mm_loadu_si128(yp));
        let b = _mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().add(i).cast()));
        _mm_storeu_si128(yp, _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_fmadd_ps(b, vv, a)));
    }
    super::reference::vec_mad_f16(&mut y[n8..], &x[n8..], v);
}

/// `y = f16(y * v)` element-wise.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_scale_f16(y: &mut [f16], v: f32) {
    let n8 = y.len() / 8 * 8;
    let vv = _mm256_set1_ps(v);
    for i in (0..n8).step_by(8) {
        let yp = y.as_mut_ptr().add(i).cast::<__m128i>();
        let a = _mm256_cvtph_ps(_mm_loadu_si128(yp));
        _mm_storeu_si128(yp, _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_mul_ps(a, vv)));
    }
    super::reference::vec_scale_f16(&mut y[n8..], v);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::reference::hsum8;

    /// The SIMD horizontal sum must use the same tree as the scalar one; lanes that cancel in
    /// different pairings expose any other order.
    #[test]
    fn hsum_matches_scalar_tree() {
        if !has_avx2() {
            return;
        }
        let big = 3.0e8f32;
        for perm in 0..8 {
            let mut l = [1.0f32, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
            l[perm] = big;
            l[(perm + 4) % 8] = -big;
            l[(perm + 1) % 8] += 0.75;
            // SAFETY: AVX2 is present.
            let simd = unsafe { hsum_ps(_mm256_loadu_ps(l.as_ptr())) };
            assert_eq!(simd.to_bits(), hsum8(l).to_bits(), "lanes {l:?}");
        }
    }
}
