//! Portable scalar kernels that perform exactly the float operations of llama.cpp's x86 SIMD
//! kernels, in the same order, so that they are bit-identical to the SIMD versions in this crate.
//!
//! They serve as the fallback on CPUs without AVX2 and as the oracle of the SIMD tests. Where the
//! x86 integer tricks differ from exact arithmetic (the sign trick on a quant of -128, saturating
//! float-to-int conversion of NaN) the quirk is reproduced too.

use super::{f16, BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1, QK};

/// Sum of eight lanes in the order of ggml's `hsum_float_8`: upper half onto lower half, then
/// the two pairs, then the last pair.
#[inline(always)]
pub(crate) fn hsum8(l: [f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

/// `_mm512_reduce_add_ps` as GCC and Clang expand it: halves are added until one lane is left,
/// which equals [`hsum8`] of the two 8-lane halves added lane-wise.
#[inline(always)]
fn reduce16(l: [f32; 16]) -> f32 {
    hsum8(std::array::from_fn(|i| l[i] + l[i + 8]))
}

/// Value of element `e` (0..32) of a 4-bit block: low nibbles first, then high nibbles.
#[inline(always)]
pub(crate) fn nibble(qs: &[u8; 16], e: usize) -> u8 {
    if e < 16 {
        qs[e] & 0x0F
    } else {
        qs[e - 16] >> 4
    }
}

/// Product of two signed quants the way `_mm256_sign_epi8` + `_mm256_maddubs_epi16` form it:
/// `|x|` as an unsigned byte times `y` negated (wrapping) where `x < 0`. This equals `x * y`
/// except for `y == -128` with `x < 0`, where the wrapping negation keeps -128; llama.cpp's
/// activation quantiser never produces -128, but weights from other tools may.
#[inline(always)]
fn sign_trick_product(x: i8, y: i8) -> i32 {
    let sy = match x {
        0 => 0,
        x if x < 0 => y.wrapping_neg(),
        _ => y,
    };
    i32::from(x.unsigned_abs()) * i32::from(sy)
}

/// One block of a signed-by-signed dot product accumulated into the eight lanes: lane `j` gets
/// the sum of the products of elements `4j..4j+4`, scaled by `d` with one fused multiply-add.
#[inline(always)]
pub(crate) fn accumulate_signed(acc: &mut [f32; 8], d: f32, x: impl Fn(usize) -> i8, y: &[i8; 32]) {
    for (lane, a) in acc.iter_mut().enumerate() {
        let s: i32 = (4 * lane..4 * lane + 4).map(|e| sign_trick_product(x(e), y[e])).sum();
        *a = d.mul_add(s as f32, *a);
    }
}

/// Scalar twin of [`super::vec_dot_q4_0_q8_0`].
pub fn vec_dot_q4_0_q8_0(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    assert_eq!(x.len(), y.len(), "vec_dot_q4_0_q8_0: block counts differ");
    let mut acc = [0.0f32; 8];
    for (bx, by) in x.iter().zip(y) {
        let d = bx.d.to_f32() * by.d.to_f32();
        accumulate_signed(&mut acc, d, |e| nibble(&bx.qs, e) as i8 - 8, &by.qs);
    }
    hsum8(acc)
}

/// Scalar twin of [`super::vec_dot_q8_0_q8_0`].
pub fn vec_dot_q8_0_q8_0(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    assert_eq!(x.len(), y.len(), "vec_dot_q8_0_q8_0: block counts differ");
    let mut acc = [0.0f32; 8];
    for (bx, by) in x.iter().zip(y) {
        let d = bx.d.to_f32() * by.d.to_f32();
        accumulate_signed(&mut acc, d, |e| bx.qs[e], &by.qs);
    }
    hsum8(acc)
}

/// Scalar twin of [`super::vec_dot_q4_1_q8_1`]: the minimums are summed in a separate scalar and
/// added after the horizontal sum. `m * s`, a product of two f16 values, is exact in f32, so it
/// does not matter whether a compiler fuses ggml's `summs += m*s` into an FMA.
pub fn vec_dot_q4_1_q8_1(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    assert_eq!(x.len(), y.len(), "vec_dot_q4_1_q8_1: block counts differ");
    let mut acc = [0.0f32; 8];
    let mut summs = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let d = bx.d.to_f32() * by.d.to_f32();
        summs += bx.m.to_f32() * by.s.to_f32();
        for (lane, a) in acc.iter_mut().enumerate() {
            let s: i32 =
                (4 * lane..4 * lane + 4).map(|e| i32::from(nibble(&bx.qs, e)) * i32::from(by.qs[e])).sum();
            *a = d.mul_add(s as f32, *a);
        }
    }
    hsum8(acc) + summs
}

/// Elements per step of ggml's F16/F32 dot with AVX-512: four accumulators of 16 lanes.
const STEP: usize = 64;

/// The 64-lane accumulation of ggml's AVX-512 F16/F32 dots over the first `n - n % 64`
/// elements, reduced as `GGML_F32x16_REDUCE` does (accumulator 2 onto 0 and 3 onto 1, then 1
/// onto 0, then the 16-lane reduction).
fn dot_steps(n: usize, x: impl Fn(usize) -> f32, y: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [[0.0f32; 16]; 4];
    for base in (0..n - n % STEP).step_by(STEP) {
        for (j, a) in acc.iter_mut().enumerate() {
            for (l, lane) in a.iter_mut().enumerate() {
                let i = base + 16 * j + l;
                *lane = x(i).mul_add(y(i), *lane);
            }
        }
    }
    let lanes: [f32; 16] = std::array::from_fn(|l| (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]));
    reduce16(lanes)
}

/// Scalar twin of [`super::vec_dot_f16_f16`]: leftover elements past the last 64-element step
/// are added in f64, like ggml's `ggml_float` sum.
pub fn vec_dot_f16_f16(x: &[f16], y: &[f16]) -> f32 {
    assert_eq!(x.len(), y.len(), "vec_dot_f16_f16: lengths differ");
    let n = x.len();
    let mut sum = f64::from(dot_steps(n, |i| x[i].to_f32(), |i| y[i].to_f32()));
    for i in n - n % STEP..n {
        sum += f64::from(x[i].to_f32() * y[i].to_f32());
    }
    sum as f32
}

/// Scalar twin of [`super::vec_dot_f32`]: leftover elements are fused into the f32 sum, as the
/// compilers contract ggml's `sumf += x[i]*y[i]` on FMA targets.
pub fn vec_dot_f32(x: &[f32], y: &[f32]) -> f32 {
    assert_eq!(x.len(), y.len(), "vec_dot_f32: lengths differ");
    let n = x.len();
    let mut sum = dot_steps(n, |i| x[i], |i| y[i]);
    for i in n - n % STEP..n {
        sum = x[i].mul_add(y[i], sum);
    }
    sum
}

/// `_mm256_max_ps(a, b)`: `a` if it is greater, else `b` (so a NaN in either operand yields `b`).
#[inline(always)]
fn max_ps(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// Absolute maximum of a 32-element block in the lane order of the x86 quantisers.
fn block_amax(x: &[f32]) -> f32 {
    let m: [f32; 8] = std::array::from_fn(|l| {
        max_ps(max_ps(max_ps(x[l].abs(), x[8 + l].abs()), x[16 + l].abs()), x[24 + l].abs())
    });
    let m4: [f32; 4] = std::array::from_fn(|l| max_ps(m[4 + l], m[l]));
    max_ps(max_ps(m4[0], m4[2]), max_ps(m4[1], m4[3]))
}

/// `_mm256_cvtps_epi32` of an already rounded value: NaN and out-of-range values become
/// `i32::MIN`.
#[inline(always)]
fn cvt_i32(v: f32) -> i32 {
    if (-2_147_483_648.0..2_147_483_648.0).contains(&v) {
        v as i32
    } else {
        i32::MIN
    }
}

/// Quantises one activation block: returns the f32 scale `amax / 127` and the unsaturated
/// integers, which the caller saturates to i8 like the AVX2 pack instructions.
fn quantize_block_q8(x: &[f32]) -> (f32, [i32; 32]) {
    let amax = block_amax(x);
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    (d, std::array::from_fn(|e| cvt_i32((x[e] * id).round_ties_even())))
}

#[inline(always)]
fn saturate_i8(v: i32) -> i8 {
    v.clamp(-128, 127) as i8
}

/// Scalar twin of [`super::quantize_row_q8_0`].
pub fn quantize_row_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), QK * y.len(), "quantize_row_q8_0: {} floats for {} blocks", x.len(), y.len());
    for (block, xb) in y.iter_mut().zip(x.chunks_exact(QK)) {
        let (d, q) = quantize_block_q8(xb);
        block.d = f16::from_f32(d);
        block.qs = q.map(saturate_i8);
    }
}

/// Scalar twin of [`super::quantize_row_q8_1`]; the sum in `s` is taken over the integers before
/// saturation, with wrapping adds, as the AVX2 kernel does.
pub fn quantize_row_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    assert_eq!(x.len(), QK * y.len(), "quantize_row_q8_1: {} floats for {} blocks", x.len(), y.len());
    for (block, xb) in y.iter_mut().zip(x.chunks_exact(QK)) {
        let (d, q) = quantize_block_q8(xb);
        let sum = q.iter().fold(0i32, |s, &v| s.wrapping_add(v));
        block.d = f16::from_f32(d);
        block.s = f16::from_f32(d * sum as f32);
        block.qs = q.map(saturate_i8);
    }
}

/// `y = f16(x * v + y)` element-wise with one rounding of the fused product-sum.
pub fn vec_mad_f16(y: &mut [f16], x: &[f16], v: f32) {
    for (a, &b) in y.iter_mut().zip(x) {
        *a = f16::from_f32(b.to_f32().mul_add(v, a.to_f32()));
    }
}

/// `y = f16(y * v)` element-wise.
pub fn vec_scale_f16(y: &mut [f16], v: f32) {
    for a in y.iter_mut() {
        *a = f16::from_f32(a.to_f32() * v);
    }
}
