//! Weight quantisers, used to write synthetic models. They follow ggml's reference quantisers
//! (`quantize_row_q4_0_ref`, `quantize_row_q4_1_ref`, `quantize_row_q8_0_ref` in `ggml-quants.c`),
//! so files written by ember hold the same bytes llama.cpp's `llama-quantize` would write
//! without an importance matrix.

use super::{f16, BlockQ4_0, BlockQ4_1, BlockQ8_0, QK};

fn blocks<'a>(x: &'a [f32], what: &str) -> std::slice::ChunksExact<'a, f32> {
    assert!(x.len().is_multiple_of(QK), "{what}: {} elements are not a whole number of blocks", x.len());
    x.chunks_exact(QK)
}

/// Packs element `j` of a block into the low nibble of byte `j` and element `j + 16` into its
/// high nibble.
fn pack_nibbles(q: impl Fn(usize) -> u8) -> [u8; 16] {
    std::array::from_fn(|j| q(j) | (q(j + 16) << 4))
}

/// Quantises to Q4_0: the scale maps the element of largest magnitude (the first one on ties)
/// to -8, and quants are `x / d + 8.5` truncated and capped at 15.
///
/// # Panics
/// If `x.len()` is not a multiple of 32.
pub fn quantize_q4_0(x: &[f32]) -> Vec<BlockQ4_0> {
    blocks(x, "quantize_q4_0")
        .map(|xb| {
            let mut amax = 0.0f32;
            let mut max = 0.0f32;
            for &v in xb {
                if amax < v.abs() {
                    amax = v.abs();
                    max = v;
                }
            }
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            BlockQ4_0 { d: f16::from_f32(d), qs: pack_nibbles(|e| ((xb[e] * id + 8.5) as i8).min(15) as u8) }
        })
        .collect()
}

/// Quantises to Q4_1: 16 levels spread from the block's minimum to its maximum, quants
/// `(x - min) / d + 0.5` truncated and capped at 15.
///
/// # Panics
/// If `x.len()` is not a multiple of 32.
pub fn quantize_q4_1(x: &[f32]) -> Vec<BlockQ4_1> {
    blocks(x, "quantize_q4_1")
        .map(|xb| {
            let (mut min, mut max) = (f32::MAX, -f32::MAX);
            for &v in xb {
                if v < min {
                    min = v;
                }
                if v > max {
                    max = v;
                }
            }
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            BlockQ4_1 {
                d: f16::from_f32(d),
                m: f16::from_f32(min),
                qs: pack_nibbles(|e| (((xb[e] - min) * id + 0.5) as i8).min(15) as u8),
            }
        })
        .collect()
}

/// Quantises to Q8_0 with ggml's reference rounding (`d = amax / 127`, quants `round(x / d)`
/// half away from zero). Activations use [`super::quantize_row_q8_0`] instead, which rounds
/// differently, as llama.cpp does.
///
/// # Panics
/// If `x.len()` is not a multiple of 32.
pub fn quantize_q8_0(x: &[f32]) -> Vec<BlockQ8_0> {
    blocks(x, "quantize_q8_0")
        .map(|xb| {
            let amax = xb.iter().fold(0.0f32, |a, v| if a > v.abs() { a } else { v.abs() });
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            BlockQ8_0 { d: f16::from_f32(d), qs: std::array::from_fn(|e| (xb[e] * id).round() as i8) }
        })
        .collect()
}
