//! Weight quantisers, used to write synthetic models. They follow ggml's reference quantisers
//! (`quantize_row_q4_0_ref`, `quantize_row_q4_1_ref`, `quantize_row_q8_0_ref` in `ggml-quants.c`),
//! so files written by ember hold the same bytes llama.cpp's `llama-quantize` would write
//! without an importance matrix.

use super::blocks::q8_k::nearest_int;
use super::{f16, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8_0, QK, QK_K};
use crate::gguf::GgmlType;

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

/// Quantises to Q5_0 as ggml's `quantize_row_q5_0_ref`: the element of largest magnitude (the
/// first on ties) maps to -16, quants `x / d + 16.5` truncated and capped at 31.
///
/// # Panics
/// If `x.len()` is not a multiple of 32.
pub fn quantize_q5_0(x: &[f32]) -> Vec<BlockQ5_0> {
    blocks(x, "quantize_q5_0")
        .map(|xb| {
            let (mut amax, mut max) = (0.0f32, 0.0f32);
            for &v in xb {
                if amax < v.abs() {
                    amax = v.abs();
                    max = v;
                }
            }
            let d = max / -16.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            // `(int8_t)(v + 16.5f)`: truncation toward zero, then the cap.
            let q = |e: usize| ((xb[e] * id + 16.5) as i8).min(31) as u8;
            let mut qh = 0u32;
            for e in 0..32 {
                qh |= u32::from((q(e) & 0x10) >> 4) << e;
            }
            BlockQ5_0 { d: f16::from_f32(d), qh: qh.to_le_bytes(), qs: pack_nibbles(|e| q(e) & 0x0F) }
        })
        .collect()
}

/// Quantises to Q5_1 as ggml's `quantize_row_q5_1_ref`: 32 levels from the block's minimum to
/// its maximum, quants `(x - min) / d + 0.5` truncated.
///
/// # Panics
/// If `x.len()` is not a multiple of 32.
pub fn quantize_q5_1(x: &[f32]) -> Vec<BlockQ5_1> {
    blocks(x, "quantize_q5_1")
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
            let d = (max - min) / 31.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q = |e: usize| ((xb[e] - min) * id + 0.5) as u8;
            let mut qh = 0u32;
            for e in 0..32 {
                qh |= u32::from((q(e) & 0x10) >> 4) << e;
            }
            BlockQ5_1 { d: f16::from_f32(d), m: f16::from_f32(min), qh: qh.to_le_bytes(), qs: pack_nibbles(|e| q(e) & 0x0F) }
        })
        .collect()
}

/// ggml's `make_qkx2_quants`: a scale and a minimum for `x` (levels 0..=nmax) chosen by a
/// weighted least-squares search over `nstep + 1` trial scales; returns (scale, -min) and
/// leaves the levels in `l`. Every float operation is ggml's, in its order (ggml-base is built
/// without FMA contraction, so products and sums round separately here too).
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(nmax: i32, x: &[f32], weights: &[f32], l: &mut [u8], rmin: f32, rdelta: f32, nstep: i32) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.iter_mut().for_each(|v| *v = 0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let (w, lf) = (weights[i], q as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// The common part of Q4_K and Q5_K (`quantize_row_q{4,5}_K_ref`): per 32-element sub-block
/// a scale and min from [`make_qkx2_quants`] with weights `rms + |x|`, both quantised to 6 bits
/// against the super-block's largest, then the levels recomputed with the rounded scales.
/// Returns (d, dmin, packed scales, levels).
fn quantize_k_scales(x: &[f32], nmax: i32, rmin: f32, nstep: i32) -> (f16, f16, [u8; 12], [u8; 256]) {
    let mut l = [0u8; 256];
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    let mut weights = [0.0f32; 32];
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(nmax, xs, &weights, &mut l[32 * j..32 * j + 32], rmin, 0.1, nstep);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        // `uint8_t ls = nearest_int(...)`: the conversion wraps before the cap.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0x0F) | ((lm & 0x0F) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    let (sc, m) = crate::quant::blocks::scales_mins_k4(&packed);
    for j in 0..8 {
        let dj = d.to_f32() * f32::from(sc[j]);
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * f32::from(m[j]);
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    (d, dmin, packed, l)
}

fn k_blocks<'a>(x: &'a [f32], what: &str) -> std::slice::ChunksExact<'a, f32> {
    assert!(x.len().is_multiple_of(QK_K), "{what}: {} elements are not a whole number of 256-element blocks", x.len());
    x.chunks_exact(QK_K)
}

/// Quantises to Q4_K as ggml's `quantize_row_q4_K_ref` (what `llama-quantize` uses without an
/// importance matrix).
///
/// # Panics
/// If `x.len()` is not a multiple of 256.
pub fn quantize_q4_k(x: &[f32]) -> Vec<BlockQ4K> {
    k_blocks(x, "quantize_q4_k")
        .map(|xb| {
            let (d, dmin, scales, l) = quantize_k_scales(xb, 15, -1.0, 20);
            let mut qs = [0u8; 128];
            for c in 0..4 {
                for i in 0..32 {
                    qs[32 * c + i] = l[64 * c + i] | (l[64 * c + 32 + i] << 4);
                }
            }
            BlockQ4K { d, dmin, scales, qs }
        })
        .collect()
}

/// Quantises to Q5_K as ggml's `quantize_row_q5_K_ref`.
///
/// # Panics
/// If `x.len()` is not a multiple of 256.
pub fn quantize_q5_k(x: &[f32]) -> Vec<BlockQ5K> {
    k_blocks(x, "quantize_q5_k")
        .map(|xb| {
            let (d, dmin, scales, l) = quantize_k_scales(xb, 31, -0.5, 15);
            let (mut qs, mut qh) = ([0u8; 128], [0u8; 32]);
            for c in 0..4 {
                for i in 0..32 {
                    let (mut l1, mut l2) = (l[64 * c + i], l[64 * c + 32 + i]);
                    if l1 > 15 {
                        l1 -= 16;
                        qh[i] |= 1 << (2 * c);
                    }
                    if l2 > 15 {
                        l2 -= 16;
                        qh[i] |= 2 << (2 * c);
                    }
                    qs[32 * c + i] = l1 | (l2 << 4);
                }
            }
            BlockQ5K { d, dmin, scales, qh, qs }
        })
        .collect()
}

/// ggml's `make_qx_quants` with `rmse_type` 1 (weights `x^2`) and no importance weights:
/// signed levels `-nmax..nmax` (stored `+ nmax` in `l`), the scale refined over 18 trial
/// inverse scales.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        l.iter_mut().for_each(|v| *v = 0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (i, &v) in x.iter().enumerate() {
        let q = level(iscale, v);
        l[i] = (q + nmax) as i8;
        let w = v * v;
        sumlx += w * v * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let q = level(iscale, v);
            let w = v * v;
            sumlx += w * v * q as f32;
            suml2 += w * q as f32 * q as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (i, &v) in x.iter().enumerate() {
                l[i] = (level(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Quantises to Q6_K as ggml's `quantize_row_q6_K_ref`.
///
/// # Panics
/// If `x.len()` is not a multiple of 256.
pub fn quantize_q6_k(x: &[f32]) -> Vec<BlockQ6K> {
    k_blocks(x, "quantize_q6_k")
        .map(|xb| {
            let mut l = [0i8; 256];
            let mut scales = [0.0f32; 16];
            let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
            for ib in 0..16 {
                let s = make_qx_quants(32, &xb[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
                scales[ib] = s;
                if s.abs() > max_abs_scale {
                    max_abs_scale = s.abs();
                    max_scale = s;
                }
            }
            let mut block = BlockQ6K { ql: [0; 128], qh: [0; 64], scales: [0; 16], d: f16::ZERO };
            if max_abs_scale < 1e-15 {
                return block;
            }
            let iscale = -128.0 / max_scale;
            block.d = f16::from_f32(1.0 / iscale);
            for ib in 0..16 {
                block.scales[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
            }
            for j in 0..16 {
                let d = block.d.to_f32() * f32::from(block.scales[j]);
                if d == 0.0 {
                    continue;
                }
                for ii in 0..16 {
                    l[16 * j + ii] = (nearest_int(xb[16 * j + ii] / d).clamp(-32, 31) + 32) as i8;
                }
            }
            for h in 0..2 {
                let (lh, ql, qh) = (&l[128 * h..], &mut block.ql[64 * h..], &mut block.qh[32 * h..]);
                for i in 0..32 {
                    let q = |k: usize| lh[i + 32 * k] as u8;
                    ql[i] = (q(0) & 0x0F) | ((q(2) & 0x0F) << 4);
                    ql[i + 32] = (q(1) & 0x0F) | ((q(3) & 0x0F) << 4);
                    qh[i] = (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
                }
            }
            block
        })
        .collect()
}

/// Quantises `x` (whole rows) to `ty`, returning the blocks' bytes: Q4_0, Q4_1, Q5_0, Q5_1,
/// Q8_0, Q4_K, Q5_K, Q6_K, or F16/F32 copies. None for other types.
pub fn quantize_to(ty: GgmlType, x: &[f32]) -> Option<Vec<u8>> {
    fn bytes<T: bytemuck::Pod>(v: Vec<T>) -> Vec<u8> {
        bytemuck::cast_slice(&v).to_vec()
    }
    Some(match ty {
        GgmlType::F32 => bytemuck::cast_slice(x).to_vec(),
        GgmlType::F16 => x.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
        GgmlType::Q4_0 => bytes(quantize_q4_0(x)),
        GgmlType::Q4_1 => bytes(quantize_q4_1(x)),
        GgmlType::Q5_0 => bytes(quantize_q5_0(x)),
        GgmlType::Q5_1 => bytes(quantize_q5_1(x)),
        GgmlType::Q8_0 => bytes(quantize_q8_0(x)),
        GgmlType::Q4_K => bytes(quantize_q4_k(x)),
        GgmlType::Q5_K => bytes(quantize_q5_k(x)),
        GgmlType::Q6_K => bytes(quantize_q6_k(x)),
        _ => return None,
    })
}
