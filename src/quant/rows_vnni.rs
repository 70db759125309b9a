//! AVX-512 VNNI dot products of rows read one list position at a time: the sparse FFN's
//! gathered gate and up rows, which cannot use the interleaved groups of [`super::packed`].
//!
//! The AVX2 kernels of [`super::x86`] spend ~18 instructions per row and block, most of them
//! shuffles, sign tricks and scale conversions: a 7B layer's gathered Q4_0 rows ran at about
//! 4 GB/s per core from cache, a fifth of the packed product's rate. Here two rows share each
//! 512-bit register (row a's eight lanes, then row b's), the integer sums come from one
//! `vpdpbusd` seeded with the token's `-8 * sum(y)` (Q4_0) or `-128 * sum(y)` (Q8_0, whose quants
//! are flipped to `x + 128`), and the scales `dx * dy` are converted sixteen blocks at a time.
//!
//! Every value is the reference's bit for bit: per row, lane `j` of a block holds the exact
//! integer sum of elements `4j..4j+4`, converted to f32 and added with one fused multiply-add
//! by `dx * dy`, block after block, then ggml's horizontal sum of the eight lanes. (The
//! integers equal the reference's sign-trick products for every activation the quantiser
//! writes; see [`super::packed`].)

use super::{BlockQ4_0, BlockQ8_0};
use std::arch::x86_64::*;

/// Whether the CPU has what these kernels are compiled for: the packed products' AVX-512 VNNI
/// set.
pub(super) fn supported() -> bool {
    super::packed::Isa::Avx512Vnni.available()
}

/// Blocks whose scales are converted together.
const SCALE_RUN: usize = 16;

/// `out[k] = f32(d of block b0 + k) * dy[b0 + k]` for the `n <= 16` blocks from `b0`: the
/// reference's scale product, sixteen at a time.
#[inline(always)]
unsafe fn scale_run(d_bits: impl Fn(usize) -> u16, dy: &[f32], b0: usize, n: usize, out: &mut [f32; SCALE_RUN]) {
    let mut h = [0u16; SCALE_RUN];
    for (k, v) in h.iter_mut().enumerate().take(n) {
        *v = d_bits(b0 + k);
    }
    let mask = if n == SCALE_RUN { u16::MAX } else { (1u16 << n) - 1 };
    let y = _mm512_maskz_loadu_ps(mask, dy.as_ptr().add(b0));
    let x = _mm512_cvtph_ps(_mm256_loadu_si256(h.as_ptr().cast()));
    _mm512_storeu_ps(out.as_mut_ptr(), _mm512_mul_ps(x, y));
}

/// The reference's horizontal sums of the two rows of `acc` (lanes 0..8 and 8..16).
#[inline(always)]
unsafe fn hsum_pair(acc: __m512) -> [f32; 2] {
    let lo = _mm512_castps512_ps256(acc);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc)));
    [super::x86::hsum_ps(lo), super::x86::hsum_ps(hi)]
}

/// The scales of a row pair for one block: row a's in lanes 0..8, row b's in 8..16.
#[inline(always)]
unsafe fn pair_scale(a: f32, b: f32) -> __m512 {
    _mm512_mask_broadcastss_ps(_mm512_set1_ps(a), 0xFF00, _mm_set_ss(b))
}

/// What the row kernels need of a weight block: its f16 scale's bits, and its quants as
/// `vpdpbusd`'s unsigned bytes in the reference's lane order (lane j: elements 4j..4j+4), for
/// one row (256 bits) or two (512 bits, row a's then row b's). The token's lane sums passed as
/// `bias` correct what the unsigned form added.
trait RowBlock {
    fn d_bits(&self) -> u16;
    unsafe fn quants(&self) -> __m256i;
    unsafe fn pair_quants(a: &Self, b: &Self) -> __m512i;
}

impl RowBlock for BlockQ4_0 {
    #[inline(always)]
    fn d_bits(&self) -> u16 {
        self.d.to_bits()
    }

    /// The nibbles: low ones in the first 128 bits, high ones in the second.
    #[inline(always)]
    unsafe fn quants(&self) -> __m256i {
        let lo = _mm_loadu_si128(self.qs.as_ptr().cast());
        _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(lo), lo), _mm256_set1_epi8(0x0F))
    }

    #[inline(always)]
    unsafe fn pair_quants(a: &Self, b: &Self) -> __m512i {
        // [a's quants, a's quants, b's, b's], then the high nibbles in the 2nd and 4th.
        let v = _mm512_mask_broadcast_i32x4(_mm512_broadcast_i32x4(_mm_loadu_si128(a.qs.as_ptr().cast())), 0xFF00, _mm_loadu_si128(b.qs.as_ptr().cast()));
        _mm512_and_si512(_mm512_mask_blend_epi64(0xCC, v, _mm512_srli_epi16::<4>(v)), _mm512_set1_epi8(0x0F))
    }
}

impl RowBlock for BlockQ8_0 {
    #[inline(always)]
    fn d_bits(&self) -> u16 {
        self.d.to_bits()
    }

    /// The signed quants flipped to `x + 128`.
    #[inline(always)]
    unsafe fn quants(&self) -> __m256i {
        _mm256_xor_si256(_mm256_loadu_si256(self.qs.as_ptr().cast()), _mm256_set1_epi8(-128))
    }

    #[inline(always)]
    unsafe fn pair_quants(a: &Self, b: &Self) -> __m512i {
        let v = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(_mm256_loadu_si256(a.qs.as_ptr().cast())), _mm256_loadu_si256(b.qs.as_ptr().cast()));
        _mm512_xor_si512(v, _mm512_set1_epi8(-128))
    }
}

/// Four rows of `B` by a Q8_0 token whose per-block f32 scales are `dy` and corrected lane
/// sums `bias`; all slices hold the token's block count (checked by the caller). Inlined into
/// each kernel below, which carries the target features.
#[inline(always)]
unsafe fn dot_x4<B: RowBlock>(x: [&[B]; 4], y: &[BlockQ8_0], dy: &[f32], bias: &[[i32; 8]]) -> [f32; 4] {
    let nb = y.len();
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut sc = [[0.0f32; SCALE_RUN]; 4];
    let mut b0 = 0;
    while b0 < nb {
        let n = (nb - b0).min(SCALE_RUN);
        for (r, s) in sc.iter_mut().enumerate() {
            scale_run(|b| x[r].get_unchecked(b).d_bits(), dy, b0, n, s);
        }
        for k in 0..n {
            let b = b0 + k;
            let yq = _mm512_broadcast_i64x4(_mm256_loadu_si256(y.get_unchecked(b).qs.as_ptr().cast()));
            let seed = _mm512_broadcast_i64x4(_mm256_loadu_si256(bias.as_ptr().add(b).cast()));
            for (p, a) in acc.iter_mut().enumerate() {
                let q = B::pair_quants(x[2 * p].get_unchecked(b), x[2 * p + 1].get_unchecked(b));
                let s = _mm512_dpbusd_epi32(seed, q, yq);
                *a = _mm512_fmadd_ps(pair_scale(sc[2 * p][k], sc[2 * p + 1][k]), _mm512_cvtepi32_ps(s), *a);
            }
        }
        b0 += n;
    }
    let [r0, r1] = hsum_pair(acc[0]);
    let [r2, r3] = hsum_pair(acc[1]);
    [r0, r1, r2, r3]
}

/// One row, as [`dot_x4`] computes each of its four.
#[inline(always)]
unsafe fn dot_one<B: RowBlock>(x: &[B], y: &[BlockQ8_0], dy: &[f32], bias: &[[i32; 8]]) -> f32 {
    let nb = y.len();
    let mut acc = _mm256_setzero_ps();
    let mut sc = [0.0f32; SCALE_RUN];
    let mut b0 = 0;
    while b0 < nb {
        let n = (nb - b0).min(SCALE_RUN);
        scale_run(|b| x.get_unchecked(b).d_bits(), dy, b0, n, &mut sc);
        for (k, &d) in sc.iter().enumerate().take(n) {
            let b = b0 + k;
            let yq = _mm256_loadu_si256(y.get_unchecked(b).qs.as_ptr().cast());
            let seed = _mm256_loadu_si256(bias.as_ptr().add(b).cast());
            let s = _mm256_dpbusd_epi32(seed, x.get_unchecked(b).quants(), yq);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(s), acc);
        }
        b0 += n;
    }
    super::x86::hsum_ps(acc)
}

/// Four Q4_0 rows (`bias4`: the token's lane sums times -8).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub(super) unsafe fn dot_q4_0_x4(x: [&[BlockQ4_0]; 4], y: &[BlockQ8_0], dy: &[f32], bias4: &[[i32; 8]]) -> [f32; 4] {
    dot_x4(x, y, dy, bias4)
}

/// One Q4_0 row.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub(super) unsafe fn dot_q4_0(x: &[BlockQ4_0], y: &[BlockQ8_0], dy: &[f32], bias4: &[[i32; 8]]) -> f32 {
    dot_one(x, y, dy, bias4)
}

/// Four Q8_0 rows (`bias8`: the token's lane sums times -128).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub(super) unsafe fn dot_q8_0_x4(x: [&[BlockQ8_0]; 4], y: &[BlockQ8_0], dy: &[f32], bias8: &[[i32; 8]]) -> [f32; 4] {
    dot_x4(x, y, dy, bias8)
}

/// One Q8_0 row.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub(super) unsafe fn dot_q8_0(x: &[BlockQ8_0], y: &[BlockQ8_0], dy: &[f32], bias8: &[[i32; 8]]) -> f32 {
    dot_one(x, y, dy, bias8)
}
