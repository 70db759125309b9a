//! AVX2 kernels over one 16-row group, walked as two halves of 8 rows (AVX2 has 16 vector
//! registers: eight lane accumulators of 8 rows leave room for the rest, 16 rows would not).
//! The second half re-reads the group from L1/L2, where the first half just brought it.

use super::{prefetch_ahead, TokenActs, GROUP};
use std::arch::x86_64::*;

pub(super) fn supported() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

#[inline(always)]
unsafe fn lane(q: *const i8, j: usize) -> __m256i {
    _mm256_set1_epi32(q.cast::<i32>().add(j).read_unaligned())
}

#[inline(always)]
unsafe fn hsum_lanes(acc: &[__m256; 8]) -> __m256 {
    let a = _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6]));
    let b = _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7]));
    _mm256_add_ps(a, b)
}

#[inline(always)]
unsafe fn scales(p: *const u8, dy: f32) -> __m256 {
    _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(p.cast())), _mm256_set1_ps(dy))
}

/// Unsigned-by-signed byte products summed in fours (exact: no 16-bit pair sum of a nibble or
/// a sign-trick operand reaches the saturation bound).
#[inline(always)]
unsafe fn dot4(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

/// Shared body of the 4-bit kernels (see the AVX-512 twin): `SEED` times the lane bias
/// `-8 * sum(y)` (0 for Q4_1, 1 for Q4_0, 2 for Q5_0); with `high` (Q5_0), this half's 32 bits
/// of each lane's fifth-bit mask (a u32 every 8 bytes), spread to bytes, lift the nibbles by 16.
#[inline(always)]
unsafe fn q4_block<const SEED: i32>(qv: *const u8, high: Option<*const u32>, y: &TokenActs, b: usize, d: __m256, acc: &mut [__m256; 8]) {
    let q = y.qs.add(b * y.step);
    let mask = _mm256_set1_epi8(0x0F);
    for k in 0..4 {
        let v = _mm256_load_si256(qv.add(64 * k).cast());
        let lo = lift(_mm256_and_si256(v, mask), high, k);
        let hi = lift(_mm256_and_si256(_mm256_srli_epi16::<4>(v), mask), high, k + 4);
        let mut s_lo = dot4(lo, lane(q, k));
        let mut s_hi = dot4(hi, lane(q, k + 4));
        if SEED != 0 {
            let bias = y.bias4.add(8 * b);
            s_lo = _mm256_add_epi32(s_lo, _mm256_set1_epi32(SEED * *bias.add(k)));
            s_hi = _mm256_add_epi32(s_hi, _mm256_set1_epi32(SEED * *bias.add(k + 4)));
        }
        acc[k] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s_lo), acc[k]);
        acc[k + 4] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s_hi), acc[k + 4]);
    }
}

/// Lane `l`'s nibbles `v`, plus 16 where this half's bits of lane `l`'s mask in `high` are set.
#[inline(always)]
unsafe fn lift(v: __m256i, high: Option<*const u32>, l: usize) -> __m256i {
    use crate::quant::blocks::simd::bytes_from_bits;
    match high {
        Some(h) => _mm256_or_si256(v, _mm256_and_si256(bytes_from_bits(h.add(2 * l).read_unaligned()), _mm256_set1_epi8(16))),
        None => v,
    }
}

// The chunk layouts of the AVX-512 kernels; half `h` of the group is the upper or lower 32
// bytes of every 64-byte quant vector and 16 bytes of every 32-byte scale row.

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn group_q4_0(g: *const u8, nb: usize, y: &TokenActs, out: &mut [f32; GROUP]) {
    for h in 0..2 {
        let mut acc = [_mm256_setzero_ps(); 8];
        for b in 0..nb {
            let (chunk, j) = (g.add(576 * (b / 2)), b % 2);
            if h == 0 {
                prefetch_ahead(g.add(288 * b), 320, y.prefetch);
            }
            let d = scales(chunk.add(512 + 32 * j + 16 * h), *y.d.add(b));
            q4_block::<1>(chunk.add(256 * j + 32 * h), None, y, b, d, &mut acc);
        }
        _mm256_storeu_ps(out.as_mut_ptr().add(8 * h), hsum_lanes(&acc));
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn group_q4_1(g: *const u8, nb: usize, y: &TokenActs, out: &mut [f32; GROUP]) {
    for h in 0..2 {
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut summs = _mm256_setzero_ps();
        for b in 0..nb {
            let chunk = g.add(320 * b);
            if h == 0 {
                prefetch_ahead(chunk, 320, y.prefetch);
            }
            let d = scales(chunk.add(256 + 16 * h), *y.d.add(b));
            let m = _mm256_cvtph_ps(_mm_loadu_si128(chunk.add(288 + 16 * h).cast()));
            summs = _mm256_fmadd_ps(m, _mm256_set1_ps(*y.s.add(b)), summs);
            q4_block::<0>(chunk.add(32 * h), None, y, b, d, &mut acc);
        }
        _mm256_storeu_ps(out.as_mut_ptr().add(8 * h), _mm256_add_ps(hsum_lanes(&acc), summs));
    }
}

/// Q5_0: as `group_q4_0`, each nibble lifted by 16 where its fifth bit is set (half `h`'s 32
/// bits of lane `k`'s mask, spread to bytes), with the seed `-16 * sum(y)`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn group_q5_0(g: *const u8, nb: usize, y: &TokenActs, out: &mut [f32; GROUP]) {
    for h in 0..2 {
        let mut acc = [_mm256_setzero_ps(); 8];
        for b in 0..nb {
            let (chunk, j) = (g.add(704 * (b / 2)), b % 2);
            if h == 0 {
                prefetch_ahead(g.add(352 * b), 384, y.prefetch);
            }
            let d = scales(chunk.add(512 + 32 * j + 16 * h), *y.d.add(b));
            q4_block::<2>(chunk.add(256 * j + 32 * h), Some(chunk.add(576 + 64 * j + 4 * h).cast()), y, b, d, &mut acc);
        }
        _mm256_storeu_ps(out.as_mut_ptr().add(8 * h), hsum_lanes(&acc));
    }
}

/// Q8_0 with the reference's sign trick (`|x|` times `y` carrying x's sign), as the row kernel.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn group_q8_0(g: *const u8, nb: usize, y: &TokenActs, out: &mut [f32; GROUP]) {
    for h in 0..2 {
        let mut acc = [_mm256_setzero_ps(); 8];
        for b in 0..nb {
            let (chunk, j) = (g.add(1088 * (b / 2)), b % 2);
            if h == 0 {
                prefetch_ahead(g.add(544 * b), 576, y.prefetch);
            }
            let d = scales(chunk.add(1024 + 32 * j + 16 * h), *y.d.add(b));
            let q = y.qs.add(b * y.step);
            let qv = chunk.add(512 * j + 32 * h);
            for (v, a) in acc.iter_mut().enumerate() {
                let x = _mm256_load_si256(qv.add(64 * v).cast());
                let s = dot4(_mm256_sign_epi8(x, x), _mm256_sign_epi8(lane(q, v), x));
                *a = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), *a);
            }
        }
        _mm256_storeu_ps(out.as_mut_ptr().add(8 * h), hsum_lanes(&acc));
    }
}
