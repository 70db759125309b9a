//! Dequantisation of raw GGUF tensor bytes, following `dequantize_row_*` in ggml's
//! `ggml-quants.c`. Products of f16 scales, sub-block scales and quants need at most 22
//! significant bits and are exact in f32, so each element is rounded at most once (in the final
//! add of the minimum, or the last product for Q6_K and Q8_K) and the results equal ggml's
//! whatever the order of operations or FMA contraction; the expressions keep ggml's order anyway.

use super::{f16, QuantError, QK_K};
use crate::gguf::GgmlType;

/// Dequantises `dst.len()` elements of type `ty` from `src`, which must hold exactly their bytes
/// (`ty.bytes_for(dst.len())`). Supports F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K,
/// Q3_K, Q4_K, Q5_K, Q6_K and Q8_K.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    use GgmlType::*;
    let decode: fn(&[u8], &mut [f32]) = match ty {
        F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        F16 => |b, y| y[0] = f16::from_le_bytes([b[0], b[1]]).to_f32(),
        BF16 => |b, y| y[0] = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16),
        Q4_0 => q4_0,
        Q4_1 => q4_1,
        Q5_0 => q5_0,
        Q5_1 => q5_1,
        Q8_0 => q8_0,
        Q2_K => q2_k,
        Q3_K => q3_k,
        Q4_K => q4_k,
        Q5_K => q5_k,
        Q6_K => q6_k,
        Q8_K => q8_k,
        Q8_1 | I8 | I16 | I32 | I64 | F64 => return Err(QuantError::Unsupported(ty)),
    };
    let n = dst.len();
    let expected = ty.bytes_for(n as u64).ok_or(QuantError::PartialBlock { ty, n })?;
    if src.len() as u64 != expected {
        return Err(QuantError::SourceLength { ty, n, expected: expected as usize, got: src.len() });
    }
    for (b, y) in src.chunks_exact(ty.block_bytes()).zip(dst.chunks_exact_mut(ty.block_len())) {
        decode(b, y);
    }
    Ok(())
}

#[inline(always)]
fn half_at(b: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

/// 4-bit quant `e` (0..32) of the 16 bytes at `qs`: low nibbles first, then high nibbles.
#[inline(always)]
fn nibble(qs: &[u8], e: usize) -> u8 {
    if e < 16 {
        qs[e] & 0x0F
    } else {
        qs[e - 16] >> 4
    }
}

/// Fifth bit of element `e` of a Q5 block, from the little-endian 32-bit `qh`.
#[inline(always)]
fn fifth_bit(qh: &[u8], e: usize) -> u8 {
    ((qh[e / 8] >> (e % 8)) & 1) << 4
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for (e, v) in y.iter_mut().enumerate() {
        *v = (i32::from(nibble(&b[2..], e)) - 8) as f32 * d;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    for (e, v) in y.iter_mut().enumerate() {
        *v = f32::from(nibble(&b[4..], e)) * d + m;
    }
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let (qh, qs) = (&b[2..6], &b[6..]);
    for (e, v) in y.iter_mut().enumerate() {
        *v = (i32::from(nibble(qs, e) | fifth_bit(qh, e)) - 16) as f32 * d;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let (qh, qs) = (&b[4..8], &b[8..]);
    for (e, v) in y.iter_mut().enumerate() {
        *v = f32::from(nibble(qs, e) | fifth_bit(qh, e)) * d + m;
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for (v, &q) in y.iter_mut().zip(&b[2..]) {
        *v = f32::from(q as i8) * d;
    }
}

/// Q2_K (84 bytes): 16 scale bytes (low nibble scale, high nibble min), 64 bytes of 2-bit quants,
/// `d`, `dmin`. Each 128-element half reads 32 quant bytes four times at shifts 0, 2, 4, 6; every
/// 16 elements take the next scale byte.
fn q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, min) = (half_at(b, 80), half_at(b, 82));
    for (e, v) in y.iter_mut().enumerate() {
        let (half, shift, l) = (e / 128, 2 * (e % 128 / 32), e % 32);
        let sc = scales[e / 16];
        let dl = d * f32::from(sc & 0x0F);
        let ml = min * f32::from(sc >> 4);
        *v = dl * f32::from((qs[32 * half + l] >> shift) & 3) - ml;
    }
}

/// The sixteen 6-bit Q3_K scales, packed as: bytes 0..8 hold the low nibbles of scales 0..8
/// (low) and 8..16 (high); byte `8 + j % 4` holds the top two bits of scale `j` at bit
/// `2 * (j / 4)`.
fn q3_k_scale(packed: &[u8], j: usize) -> i32 {
    let low = if j < 8 { packed[j] & 0x0F } else { packed[j - 8] >> 4 };
    let high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
    i32::from(low | (high << 4)) - 32
}

/// Q3_K (110 bytes): 32 bytes of high-bit masks, 64 bytes of 2-bit quants, 12 bytes of scales,
/// `d`. Quant layout as in Q2_K; bit `e / 32` of mask byte `e % 32` set means the quant is not
/// lowered by 4.
fn q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs, scales) = (&b[0..32], &b[32..96], &b[96..108]);
    let d_all = half_at(b, 108);
    for (e, v) in y.iter_mut().enumerate() {
        let (half, shift, l) = (e / 128, 2 * (e % 128 / 32), e % 32);
        let dl = d_all * q3_k_scale(scales, e / 16) as f32;
        let low = i32::from((qs[32 * half + l] >> shift) & 3);
        let high_missing = if hmask[l] & (1 << (e / 32)) != 0 { 0 } else { 4 };
        *v = dl * (low - high_missing) as f32;
    }
}

/// Scale and min `j` (0..8) of the 12 packed bytes of Q4_K/Q5_K (ggml's `get_scale_min_k4`):
/// 6-bit values, the first four stored whole in bytes 0..4 / 4..8, the last four split into a
/// nibble of bytes 8..12 and the top two bits of bytes 0..4 / 4..8.
fn scale_min_k4(packed: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        ((packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4), (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4))
    }
}

/// Q4_K (144 bytes): `d`, `dmin`, 12 bytes of scales and mins, 128 bytes of quants. Each 64
/// elements use 32 bytes: low nibbles with sub-block scale `2c`, high nibbles with `2c + 1`.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, min) = (half_at(b, 0), half_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for (sub, ys) in y.chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(scales, sub);
        let (d1, m1) = (d * f32::from(sc), min * f32::from(m));
        let q = &qs[32 * (sub / 2)..][..32];
        for (v, &byte) in ys.iter_mut().zip(q) {
            let nib = if sub % 2 == 0 { byte & 0x0F } else { byte >> 4 };
            *v = d1 * f32::from(nib) - m1;
        }
    }
}

/// Q5_K (176 bytes): as Q4_K with 32 bytes of fifth bits before the quants; bit `sub` of
/// `qh[l]` belongs to element `l` of 32-element sub-block `sub`.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, min) = (half_at(b, 0), half_at(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for (sub, ys) in y.chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(scales, sub);
        let (d1, m1) = (d * f32::from(sc), min * f32::from(m));
        let q = &qs[32 * (sub / 2)..][..32];
        for (l, v) in ys.iter_mut().enumerate() {
            let nib = if sub % 2 == 0 { q[l] & 0x0F } else { q[l] >> 4 };
            let high = if qh[l] & (1 << sub) != 0 { 16 } else { 0 };
            *v = d1 * f32::from(nib + high) - m1;
        }
    }
}

/// Q6_K (210 bytes): 128 bytes of low nibbles, 64 bytes of high bit pairs, 16 signed scales, `d`.
/// In each 128-element half, element `32k + l` takes nibble `l + 32 * (k % 2)` of the half's
/// 64 low-nibble bytes (low nibble for k < 2) and bits `2k..2k+2` of high byte `l`.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = half_at(b, 208);
    for (e, v) in y.iter_mut().enumerate() {
        let (half, k, l) = (e / 128, e % 128 / 32, e % 32);
        let lo_byte = ql[64 * half + l + 32 * (k % 2)];
        let lo = if k < 2 { lo_byte & 0x0F } else { lo_byte >> 4 };
        let hi = (qh[32 * half + l] >> (2 * k)) & 3;
        let q = i32::from(lo | (hi << 4)) - 32;
        let sc = scales[8 * half + 2 * k + l / 16] as i8;
        *v = d * f32::from(sc) * q as f32;
    }
}

/// Q8_K (292 bytes): an f32 scale, 256 quants and 16 group sums that dequantisation ignores.
fn q8_k(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (v, &q) in y.iter_mut().zip(&b[4..4 + QK_K]) {
        *v = d * f32::from(q as i8);
    }
}
