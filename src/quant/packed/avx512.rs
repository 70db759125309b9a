//! AVX-512 VNNI kernels over one 16-row group: one zmm per lane holds that lane of 16 rows.

use super::{prefetch_ahead, TokenActs, GROUP};
use std::arch::x86_64::*;

pub(super) fn supported() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Lane `j` of the activation block at `q` (its quants `4j..4j+4`) in every dword.
#[inline(always)]
unsafe fn lane(q: *const i8, j: usize) -> __m512i {
    _mm512_set1_epi32(q.cast::<i32>().add(j).read_unaligned())
}

/// The reference's horizontal sum of the eight lanes, for 16 rows at once.
#[inline(always)]
unsafe fn hsum_lanes(acc: &[__m512; 8]) -> __m512 {
    let a = _mm512_add_ps(_mm512_add_ps(acc[0], acc[4]), _mm512_add_ps(acc[2], acc[6]));
    let b = _mm512_add_ps(_mm512_add_ps(acc[1], acc[5]), _mm512_add_ps(acc[3], acc[7]));
    _mm512_add_ps(a, b)
}

/// 16 f16 scales at `p` times the activation scale, as the reference's `dx * dy`.
#[inline(always)]
unsafe fn scales(p: *const u8, dy: f32) -> __m512 {
    _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(p.cast())), _mm512_set1_ps(dy))
}

/// Shared body of the 4-bit kernels: lanes `k` and `k + 4` come from the low and high nibbles
/// of quant vector `k`; the integer sums are seeded with `SEED` times the block's lane bias
/// `-8 * sum(y)` (0 for Q4_1, 1 for Q4_0, 2 for Q5_0's `-16 * sum(y)`). With `high` (Q5_0's
/// fifth bits, one 64-bit mask per lane), a nibble is lifted by 16 where its bit is set.
#[inline(always)]
unsafe fn q4_block<const SEED: i32>(qv: *const u8, high: Option<*const u64>, y: &TokenActs, b: usize, d: __m512, acc: &mut [__m512; 8]) {
    let q = y.qs.add(b * y.step);
    let mask = _mm512_set1_epi8(0x0F);
    for k in 0..4 {
        let v = _mm512_load_si512(qv.add(64 * k).cast());
        let lo = lift(_mm512_and_si512(v, mask), high, k);
        let hi = lift(_mm512_and_si512(_mm512_srli_epi16::<4>(v), mask), high, k + 4);
        let (seed_lo, seed_hi) = if SEED != 0 {
            let bias = y.bias4.add(8 * b);
            (_mm512_set1_epi32(SEED * *bias.add(k)), _mm512_set1_epi32(SEED * *bias.add(k + 4)))
        } else {
            (_mm512_setzero_si512(), _mm512_setzero_si512())
        };
        let s_lo = _mm512_dpbusd_epi32(seed_lo, lo, lane(q, k));
        let s_hi = _mm512_dpbusd_epi32(seed_hi, hi, lane(q, k + 4));
        acc[k] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s_lo), acc[k]);
        acc[k + 4] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s_hi), acc[k + 4]);
    }
}

/// Lane `l`'s nibbles `v`, plus 16 where lane `l`'s fifth-bit mask in `high` is set.
#[inline(always)]
unsafe fn lift(v: __m512i, high: Option<*const u64>, l: usize) -> __m512i {
    match high {
        Some(h) => _mm512_mask_add_epi8(v, h.add(l).read(), v, _mm512_set1_epi8(16)),
        None => v,
    }
}

// Chunk layouts (see the module docs of `packed`): Q4_0 [q b][q b+1][d b][d b+1] (576 bytes),
// Q4_1 [q][d][m] (320), Q5_0 [q b][q b+1][d b][d b+1][h b][h b+1] (704), Q8_0 [q b][q b+1][d b][d b+1]
// (1088).

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub(super) unsafe fn group_q4_0(g: *const u8, nb: usize, y: &TokenActs, out: &mut [f32; GROUP]) {
    let mut acc = [_mm512_setzero_ps(); 8];
    for b in 0..nb {
        let (chunk, j) = (g.add(576 * (b / 2)), b % 2);
        prefetch_ahead(g.add(288 * b), 320, y.prefetch);
        let d = scales(chunk.add(512 + 32 * j), *y.d.add(b));
        q4_block::<1>(chunk.add(256 * j), None, y, b, d, &mut acc);
    }
    _mm512_storeu_ps(out.as_mut_ptr(), hsum_lanes(&acc));
}

/// Q4_1: the minimums' term `sum m * s` is a separate per-row sum added after the lanes, as in
/// the reference (`m * s` is exact, so the FMA rounds like its separate add).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub(super) unsafe fn group_q4_1(g: *const u8, nb: usize, y: &TokenActs, out: &mut [f32; GROUP]) {
    let mut acc = [_mm512_setzero_ps(); 8];
    let mut summs = _mm512_setzero_ps();
    for b in 0..nb {
        let chunk = g.add(320 * b);
        prefetch_ahead(chunk, 320, y.prefetch);
        let d = scales(chunk.add(256), *y.d.add(b));
        let m = _mm512_cvtph_ps(_mm256_load_si256(chunk.add(288).cast()));
        summs = _mm512_fmadd_ps(m, _mm512_set1_ps(*y.s.add(b)), summs);
        q4_block::<0>(chunk, None, y, b, d, &mut acc);
    }
    _mm512_storeu_ps(out.as_mut_ptr(), _mm512_add_ps(hsum_lanes(&acc), summs));
}

/// Q5_0 (chunk [q b][q b+1][d b][d b+1][h b][h b+1], 704 bytes): Q4_0's lanes with each
/// nibble lifted by 16 where its fifth bit is set (a masked byte add from lane `k`'s 64-bit
/// mask), and the seed `-16 * sum(y)`, twice Q4_0's.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub(super) unsafe fn group_q5_0(g: *const u8, nb: usize, y: &TokenActs, out: &mut [f32; GROUP]) {
    let mut acc = [_mm512_setzero_ps(); 8];
    for b in 0..nb {
        let (chunk, j) = (g.add(704 * (b / 2)), b % 2);
        prefetch_ahead(g.add(352 * b), 384, y.prefetch);
        let d = scales(chunk.add(512 + 32 * j), *y.d.add(b));
        q4_block::<2>(chunk.add(256 * j), Some(chunk.add(576 + 64 * j).cast()), y, b, d, &mut acc);
    }
    _mm512_storeu_ps(out.as_mut_ptr(), hsum_lanes(&acc));
}

/// Q8_0: quants flipped to `x + 128` by an xor, corrected by the seed `-128 * sum(y)`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub(super) unsafe fn group_q8_0(g: *const u8, nb: usize, y: &TokenActs, out: &mut [f32; GROUP]) {
    let flip = _mm512_set1_epi8(-128);
    let mut acc = [_mm512_setzero_ps(); 8];
    for b in 0..nb {
        let (chunk, j) = (g.add(1088 * (b / 2)), b % 2);
        prefetch_ahead(g.add(544 * b), 576, y.prefetch);
        let d = scales(chunk.add(1024 + 32 * j), *y.d.add(b));
        let q = y.qs.add(b * y.step);
        let bias = y.bias8.add(8 * b);
        let qv = chunk.add(512 * j);
        for (v, a) in acc.iter_mut().enumerate() {
            let x = _mm512_xor_si512(_mm512_load_si512(qv.add(64 * v).cast()), flip);
            let s = _mm512_dpbusd_epi32(_mm512_set1_epi32(*bias.add(v)), x, lane(q, v));
            *a = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s), *a);
        }
    }
    _mm512_storeu_ps(out.as_mut_ptr(), hsum_lanes(&acc));
}
