//! Q8_K: the activation format of the K-quant dot products. 256 signed quants, an f32 scale,
//! and the sums of each 16 quants (`bsums`), which let a kernel apply a block's minimums or
//! offsets with one small product per 16 or 32 elements instead of per element.

use crate::quant::QK_K;

/// 256 activation quants: `x = d * q`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

impl BlockQ8K {
    pub const ZERO: BlockQ8K = BlockQ8K { d: 0.0, qs: [0; QK_K], bsums: [0; QK_K / 16] };
}

/// ggml's `nearest_int`: adding 1.5 * 2^23 rounds to an integer (ties to even) in the
/// mantissa; valid for |v| < 2^22, which the quantiser guarantees (|v| <= 127).
#[inline(always)]
pub(crate) fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// Quantises activations to Q8_K as llama.cpp does on x86 (`quantize_row_q8_K` is its
/// reference code there): the element of largest magnitude (the first on ties) maps to -127,
/// so the scale carries its sign; quants round to nearest even; `d = 1 / iscale`.
///
/// # Panics
/// If `x.len()` is not `256 * y.len()`.
pub fn quantize_row_q8_k(x: &[f32], y: &mut [BlockQ8K]) {
    assert_eq!(x.len(), QK_K * y.len(), "quantize_row_q8_k: {} floats for {} blocks", x.len(), y.len());
    for (block, xb) in y.iter_mut().zip(x.chunks_exact(QK_K)) {
        let (mut max, mut amax) = (0.0f32, 0.0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *block = BlockQ8K::ZERO;
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in block.qs.iter_mut().zip(xb) {
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for (s, g) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
            *s = g.iter().map(|&q| i16::from(q)).sum();
        }
        block.d = 1.0 / iscale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantises_like_the_reference_formula() {
        let x: Vec<f32> = (0..512).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let mut y = vec![BlockQ8K::ZERO; 2];
        quantize_row_q8_k(&x, &mut y);
        for (b, xb) in y.iter().zip(x.chunks_exact(256)) {
            // The largest magnitude is -0.65 (first), so the scale is positive and it maps to -127.
            let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            assert!((b.d.abs() - amax / 127.0).abs() < 1e-6);
            for (q, v) in b.qs.iter().zip(xb) {
                assert!((f32::from(*q) * b.d - v).abs() <= b.d.abs() * 0.5 + 1e-6);
            }
            for g in 0..16 {
                assert_eq!(i32::from(b.bsums[g]), b.qs[16 * g..16 * g + 16].iter().map(|&q| i32::from(q)).sum::<i32>());
            }
        }
        // Exact ties round to even: 127 * 0.5 / 127 -> 0.5 -> 0, 1.5 -> 2.
        let mut t = vec![0.0f32; 256];
        t[0] = -127.0;
        t[1] = -0.5;
        t[2] = -1.5;
        t[3] = 2.5;
        let mut y = vec![BlockQ8K::ZERO; 1];
        quantize_row_q8_k(&t, &mut y);
        assert_eq!(&y[0].qs[..4], &[-127, 0, -2, 2]);
        assert_eq!(y[0].d, 1.0);
    }
}
