//! GGUF/ggml block quantisation: reference dequantisation, activation quantisation and the dot
//! products of the decode matvec.
//!
//! The numerics follow llama.cpp's x86 CPU backend rather than its portable C reference, because
//! ember has to reproduce llama.cpp's greedy tokens and those depend on rounding details:
//!
//! * Activations are quantised the way `quantize_row_q8_0` / `quantize_row_q8_1` in
//!   `ggml-cpu/arch/x86/quants.c` do it: multiply by `127/amax`, round half to even.
//!   The scalar reference in `ggml-quants.c` divides and rounds half away from zero instead,
//!   which gives different quants on ties.
//! * Dot products keep the eight f32 lanes of the AVX2 kernels (each lane sums four adjacent
//!   integer products per block and accumulates with one FMA per block) and finish with the same
//!   horizontal-sum tree. The F16 and F32 dots keep the four 16-lane accumulators that ggml uses
//!   when compiled for AVX-512, as a native or all-variants build of llama.cpp is on an AVX-512
//!   Zen.
//! * Dequantisation follows `ggml-quants.c`; its products are exact in f32, so there is nothing
//!   to mirror beyond the formulas.
//!
//! These are the kernels of llama.cpp's one-token matvec. It uses others for some weights and
//! batches: Q4_0 (and Q4_K, IQ4_NL) weights are repacked into interleaved rows with their own
//! kernels on AVX2 machines, and prompts of two or more tokens go through llamafile's `sgemm`
//! for F32, F16, Q8_0 and Q4_0 weights.
//!
//! Every kernel has a portable scalar twin in [`reference`](mod@reference) that performs the
//! same float operations in the same order, so SIMD and scalar results are bit-identical; the x86
//! versions are picked at run time from the CPU's features.

pub mod blocks;
mod dequant;
pub mod packed;
mod quantize;
pub mod reference;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;
#[cfg(target_arch = "x86_64")]
mod rows_vnni;

/// The sum of eight lanes (any order: for callers that do not reproduce a reference's).
///
/// # Safety
/// The CPU must have AVX.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn hsum8(v: std::arch::x86_64::__m256) -> f32 {
    x86::hsum_ps(v)
}

/// Whether the CPU has AVX2, FMA and F16C (the x86 kernels' features), for other modules'
/// run-time choices.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    x86::has_avx2()
}

use crate::gguf::GgmlType;

pub use blocks::{quantize_row_q8_k, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8K, WeightBlock};
pub use dequant::dequantize;
pub use half::f16;
pub use quantize::{quantize_q4_0, quantize_q4_1, quantize_q4_k, quantize_q5_0, quantize_q5_1, quantize_q5_k, quantize_q6_k, quantize_q8_0, quantize_to};

/// Elements per block of the 32-element formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1).
pub const QK: usize = 32;

/// Elements per K-quant super-block.
pub const QK_K: usize = 256;

/// 4-bit quants with one scale: `x = d * (q - 8)`. Element `j < 16` is the low nibble of
/// `qs[j]`, element `j + 16` its high nibble.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; 16],
}

/// 4-bit quants with scale and minimum: `x = d * q + m`, nibble order as in [`BlockQ4_0`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; 16],
}

/// 8-bit quants with one scale: `x = d * q`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; 32],
}

/// 8-bit activation quants for Q4_1/Q5_1 weights; `s = d * sum(qs)` lets the dot product apply
/// the weight block's minimum with one multiply.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ8_1 {
    pub d: f16,
    pub s: f16,
    pub qs: [i8; 32],
}

/// Why [`dequantize`] refused its arguments.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("dequantisation of {0} tensors is not supported")]
    Unsupported(GgmlType),
    #[error("{n} elements are not a whole number of {ty} blocks")]
    PartialBlock { ty: GgmlType, n: usize },
    #[error("{n} {ty} elements take {expected} bytes, but {got} were given")]
    SourceLength { ty: GgmlType, n: usize, expected: usize, got: usize },
}

/// Quantises activations to Q8_0 exactly as llama.cpp's AVX2 `quantize_row_q8_0`.
///
/// # Panics
/// If `x.len()` is not `32 * y.len()`.
pub fn quantize_row_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), QK * y.len(), "quantize_row_q8_0: {} floats for {} blocks", x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        // SAFETY: the CPU supports the features the kernel is compiled for.
        return unsafe { x86::quantize_row_q8_0(x, y) };
    }
    reference::quantize_row_q8_0(x, y)
}

/// Quantises activations to Q8_1 exactly as llama.cpp's AVX2 `quantize_row_q8_1`.
///
/// # Panics
/// If `x.len()` is not `32 * y.len()`.
pub fn quantize_row_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    assert_eq!(x.len(), QK * y.len(), "quantize_row_q8_1: {} floats for {} blocks", x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        // SAFETY: the CPU supports the features the kernel is compiled for.
        return unsafe { x86::quantize_row_q8_1(x, y) };
    }
    reference::quantize_row_q8_1(x, y)
}

/// Converts an f32 activation row to f16 (round to nearest even), as ggml does before an F16
/// weight's dot product.
///
/// # Panics
/// If the lengths differ.
pub fn f32_to_f16_row(x: &[f32], y: &mut [f16]) {
    assert_eq!(x.len(), y.len(), "f32_to_f16_row: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        // SAFETY: the CPU supports the features the kernel is compiled for.
        return unsafe { x86::f32_to_f16_row(x, y) };
    }
    for (o, &v) in y.iter_mut().zip(x) {
        *o = f16::from_f32(v);
    }
}

/// Dot product of a Q4_0 weight row with Q8_0 activations (llama.cpp `ggml_vec_dot_q4_0_q8_0`).
///
/// # Panics
/// If the slices hold different numbers of blocks.
pub fn vec_dot_q4_0_q8_0(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    assert_eq!(x.len(), y.len(), "vec_dot_q4_0_q8_0: block counts differ");
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        // SAFETY: the CPU supports the features the kernel is compiled for.
        return unsafe { x86::vec_dot_q4_0_q8_0(x, y) };
    }
    reference::vec_dot_q4_0_q8_0(x, y)
}

/// Four Q4_0 rows' [`vec_dot_q4_0_q8_0`] with one activation row, each result bit-identical to
/// the one-row function's (the rows' latency chains run side by side).
///
/// # Panics
/// If a row holds another number of blocks than `y`.
pub fn vec_dot_q4_0_q8_0_x4(x: [&[BlockQ4_0]; 4], y: &[BlockQ8_0]) -> [f32; 4] {
    assert!(x.iter().all(|r| r.len() == y.len()), "vec_dot_q4_0_q8_0_x4: block counts differ");
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        // SAFETY: the CPU supports the features the kernel is compiled for; lengths checked.
        return unsafe { x86::vec_dot_q4_0_q8_0_x4(x, y) };
    }
    x.map(|r| reference::vec_dot_q4_0_q8_0(r, y))
}

/// The token's per-block scales and lane biases for the row kernels, checked against `y`.
#[cfg(target_arch = "x86_64")]
fn row_scales<'a>(y: &[BlockQ8_0], s: &'a packed::ActScales) -> (&'a [f32], &'a [[i32; 8]], &'a [[i32; 8]]) {
    let (b4, b8) = s.biases();
    let nb = y.len();
    assert!(s.d().len() >= nb && b4.len() >= nb && b8.len() >= nb, "row dot: the activation scales cover {} blocks, the token has {nb}", s.d().len());
    (&s.d()[..nb], &b4[..nb], &b8[..nb])
}

/// [`vec_dot_q4_0_q8_0_x4`] given the token's [`packed::ActScales`] (made once per token from
/// `y`, as the packed products use them): two rows per register with AVX-512 VNNI where the
/// CPU has it, the same values bit for bit.
///
/// # Panics
/// If a row holds another number of blocks than `y`, or `s` covers fewer.
pub fn vec_dot_q4_0_q8_0_x4_with(x: [&[BlockQ4_0]; 4], y: &[BlockQ8_0], s: &packed::ActScales) -> [f32; 4] {
    assert!(x.iter().all(|r| r.len() == y.len()), "vec_dot_q4_0_q8_0_x4_with: block counts differ");
    #[cfg(target_arch = "x86_64")]
    if rows_vnni::supported() {
        let (d, b4, _) = row_scales(y, s);
        // SAFETY: the features are present; every slice holds the token's block count.
        return unsafe { rows_vnni::dot_q4_0_x4(x, y, d, b4) };
    }
    let _ = s;
    vec_dot_q4_0_q8_0_x4(x, y)
}

/// [`vec_dot_q4_0_q8_0`] given the token's scales, as [`vec_dot_q4_0_q8_0_x4_with`].
pub fn vec_dot_q4_0_q8_0_with(x: &[BlockQ4_0], y: &[BlockQ8_0], s: &packed::ActScales) -> f32 {
    assert_eq!(x.len(), y.len(), "vec_dot_q4_0_q8_0_with: block counts differ");
    #[cfg(target_arch = "x86_64")]
    if rows_vnni::supported() {
        let (d, b4, _) = row_scales(y, s);
        // SAFETY: as above.
        return unsafe { rows_vnni::dot_q4_0(x, y, d, b4) };
    }
    let _ = s;
    vec_dot_q4_0_q8_0(x, y)
}

/// [`vec_dot_q8_0_q8_0_x4`] given the token's scales, as [`vec_dot_q4_0_q8_0_x4_with`].
pub fn vec_dot_q8_0_q8_0_x4_with(x: [&[BlockQ8_0]; 4], y: &[BlockQ8_0], s: &packed::ActScales) -> [f32; 4] {
    assert!(x.iter().all(|r| r.len() == y.len()), "vec_dot_q8_0_q8_0_x4_with: block counts differ");
    #[cfg(target_arch = "x86_64")]
    if rows_vnni::supported() {
        let (d, _, b8) = row_scales(y, s);
        // SAFETY: as above.
        return unsafe { rows_vnni::dot_q8_0_x4(x, y, d, b8) };
    }
    let _ = s;
    vec_dot_q8_0_q8_0_x4(x, y)
}

/// [`vec_dot_q8_0_q8_0`] given the token's scales, as [`vec_dot_q4_0_q8_0_x4_with`].
pub fn vec_dot_q8_0_q8_0_with(x: &[BlockQ8_0], y: &[BlockQ8_0], s: &packed::ActScales) -> f32 {
    assert_eq!(x.len(), y.len(), "vec_dot_q8_0_q8_0_with: block counts differ");
    #[cfg(target_arch = "x86_64")]
    if rows_vnni::supported() {
        let (d, _, b8) = row_scales(y, s);
        // SAFETY: as above.
        return unsafe { rows_vnni::dot_q8_0(x, y, d, b8) };
    }
    let _ = s;
    vec_dot_q8_0_q8_0(x, y)
}

/// Four Q8_0 rows' [`vec_dot_q8_0_q8_0`], as [`vec_dot_q4_0_q8_0_x4`].
///
/// # Panics
/// If a row holds another number of blocks than `y`.
pub fn vec_dot_q8_0_q8_0_x4(x: [&[BlockQ8_0]; 4], y: &[BlockQ8_0]) -> [f32; 4] {
    assert!(x.iter().all(|r| r.len() == y.len()), "vec_dot_q8_0_q8_0_x4: block counts differ");
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        // SAFETY: as above.
        return unsafe { x86::vec_dot_q8_0_q8_0_x4(x, y) };
    }
    x.map(|r| reference::vec_dot_q8_0_q8_0(r, y))
}

/// Four Q4_1 rows' [`vec_dot_q4_1_q8_1`], as [`vec_dot_q4_0_q8_0_x4`].
///
/// # Panics
/// If a row holds another number of blocks than `y`.
pub fn vec_dot_q4_1_q8_1_x4(x: [&[BlockQ4_1]; 4], y: &[BlockQ8_1]) -> [f32; 4] {
    assert!(x.iter().all(|r| r.len() == y.len()), "vec_dot_q4_1_q8_1_x4: block counts differ");
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        // SAFETY: as above.
        return unsafe { x86::vec_dot_q4_1_q8_1_x4(x, y) };
    }
    x.map(|r| reference::vec_dot_q4_1_q8_1(r, y))
}

/// Dot product of a Q4_1 weight row with Q8_1 activations (llama.cpp `ggml_vec_dot_q4_1_q8_1`).
///
/// # Panics
/// If the slices hold different numbers of blocks.
pub fn vec_dot_q4_1_q8_1(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    assert_eq!(x.len(), y.len(), "vec_dot_q4_1_q8_1: block counts differ");
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        // SAFETY: the CPU supports the features the kernel is compiled for.
        return unsafe { x86::vec_dot_q4_1_q8_1(x, y) };
    }
    reference::vec_dot_q4_1_q8_1(x, y)
}

/// Dot product of two Q8_0 rows (llama.cpp `ggml_vec_dot_q8_0_q8_0`).
///
/// # Panics
/// If the slices hold different numbers of blocks.
pub fn vec_dot_q8_0_q8_0(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    assert_eq!(x.len(), y.len(), "vec_dot_q8_0_q8_0: block counts differ");
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        // SAFETY: the CPU supports the features the kernel is compiled for.
        return unsafe { x86::vec_dot_q8_0_q8_0(x, y) };
    }
    reference::vec_dot_q8_0_q8_0(x, y)
}

/// Dot product of two f16 rows with f32 products and sums (llama.cpp `ggml_vec_dot_f16`); ggml
/// converts the f32 activations with [`f32_to_f16_row`] first.
///
/// # Panics
/// If the lengths differ.
pub fn vec_dot_f16_f16(x: &[f16], y: &[f16]) -> f32 {
    assert_eq!(x.len(), y.len(), "vec_dot_f16_f16: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        // SAFETY: the CPU supports the features the kernel is compiled for.
        return unsafe { x86::vec_dot_f16_f16(x, y) };
    }
    reference::vec_dot_f16_f16(x, y)
}

/// `y = f16(x * v + y)` element-wise, fused (llama.cpp `ggml_vec_mad_f16`).
pub fn vec_mad_f16(y: &mut [f16], x: &[f16], v: f32) {
    assert_eq!(x.len(), y.len(), "vec_mad_f16: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        // SAFETY: the CPU supports the features the kernel is compiled for.
        return unsafe { x86::vec_mad_f16(y, x, v) };
    }
    reference::vec_mad_f16(y, x, v)
}

/// `y = f16(y * v)` element-wise (llama.cpp `ggml_vec_scale_f16`).
pub fn vec_scale_f16(y: &mut [f16], v: f32) {
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        // SAFETY: the CPU supports the features the kernel is compiled for.
        return unsafe { x86::vec_scale_f16(y, v) };
    }
    reference::vec_scale_f16(y, v)
}

/// Dot product of two f32 rows (llama.cpp `ggml_vec_dot_f32`).
///
/// # Panics
/// If the lengths differ.
pub fn vec_dot_f32(x: &[f32], y: &[f32]) -> f32 {
    assert_eq!(x.len(), y.len(), "vec_dot_f32: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        // SAFETY: the CPU supports the features the kernel is compiled for.
        return unsafe { x86::vec_dot_f32(x, y) };
    }
    reference::vec_dot_f32(x, y)
}
