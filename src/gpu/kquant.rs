//! GPU layouts of the 5-bit and K-quant weight types (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K; Q2_K and
//! Q3_K in a 2-bit variant, see `repack_two_bit`): the file's bytes rearranged, none added, so a
//! matrix takes its file size on the GPU (plus at most 16 bytes of padding per buffer; Q3_K 2
//! bytes per super-block more).
//!
//! Every type is cut into 32-element *groups* (a Q5 block, a K-quant sub-block of 32) whose
//! quants all go the same way, so the decode and unit kernels share one shape (see
//! shaders/matmul_dec_q4_k.wgsl):
//!
//! - `wq` (binding 4): the low 4 bits of every group's quants as 16 bytes in Q4_1's order (byte
//!   i holds element i in its low nibble and element i + 16 in its high nibble), groups one
//!   after another; then, for the 5- and 6-bit types, the high bits of every group, in a second
//!   segment at word `4 G` (G = groups in the buffer): one word per group for Q5_0, Q5_1 and
//!   Q5_K (bit e: element e's fifth bit), two for Q6_K (word 0 holds elements 0..16, word 1
//!   elements 16..32, two bits each at bit `2 (e % 16)`).
//! - `wd` (binding 5): the scales as the file has them. Q5_0: the f16 `d` of each group, two per
//!   word. Q5_1: `d | m << 16` per group. Q4_K and Q5_K: each 256-element super-block's first 16
//!   bytes unchanged (f16 `d`, `dmin`, the 12 bytes of packed 6-bit scales and mins), one vec4
//!   per super-block, unpacked by the kernels (8 threads share one 16-byte load, and keeping
//!   them packed costs a few integer operations per 32 elements instead of 4 bytes per
//!   super-block). Q6_K: its 16 signed 8-bit scales (one vec4 per super-block), then from word
//!   `4 SB` (SB = super-blocks) the f16 `d` of each super-block, two per word.
//!
//! The file's K-quant element orders (Q4_K's 32-byte runs that hold two sub-blocks in their low
//! and high nibbles, Q5_K's and Q6_K's bit planes) are resolved here once, so a kernel thread
//! reads one group's 16 contiguous bytes of quants and the activations of 32 contiguous elements.

use crate::gguf::GgmlType;

/// The types laid out here.
pub(super) fn is_grouped(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K) || is_two_bit(ty)
}

/// The 2-bit-based K-quants (Q2_K, Q3_K), whose groups hold 2-bit fields instead of nibbles
/// (see [`repack`]).
pub(super) fn is_two_bit(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q2_K | GgmlType::Q3_K)
}

/// Bytes per row of `wq` and `wd` for a row of `cols` (without padding).
pub(super) fn layout_bytes(ty: GgmlType, cols: usize) -> (usize, usize) {
    let groups = cols / 32;
    match ty {
        GgmlType::Q5_0 => (groups * 20, groups * 2),
        GgmlType::Q5_1 => (groups * 20, groups * 4),
        GgmlType::Q4_K => (groups * 16, groups * 2),
        GgmlType::Q5_K => (groups * 20, groups * 2),
        GgmlType::Q6_K => (groups * 24, groups * 2 + groups / 4),
        GgmlType::Q2_K => (groups * 8, groups * 5 / 2),
        GgmlType::Q3_K => (groups * 12, groups * 2),
        _ => unreachable!("not a grouped type: {ty}"),
    }
}

/// Quant `e` (0..32, unsigned, before the type's offset) of group `sub` of one file block.
fn codes(ty: GgmlType, b: &[u8], sub: usize) -> [u8; 32] {
    let nibble = |qs: &[u8], e: usize| if e < 16 { qs[e] & 15 } else { qs[e - 16] >> 4 };
    let fifth = |qh: &[u8], e: usize| ((qh[e / 8] >> (e % 8)) & 1) << 4;
    let mut q = [0u8; 32];
    for (e, v) in q.iter_mut().enumerate() {
        *v = match ty {
            GgmlType::Q5_0 => nibble(&b[6..22], e) | fifth(&b[2..6], e),
            GgmlType::Q5_1 => nibble(&b[8..24], e) | fifth(&b[4..8], e),
            GgmlType::Q4_K | GgmlType::Q5_K => {
                let (qs, qh) = if ty == GgmlType::Q4_K { (&b[16..144], None) } else { (&b[48..176], Some(&b[16..48])) };
                let byte = qs[32 * (sub / 2) + e];
                let lo = if sub.is_multiple_of(2) { byte & 15 } else { byte >> 4 };
                lo | qh.map_or(0, |h| ((h[e] >> sub) & 1) << 4)
            }
            GgmlType::Q6_K => {
                let (half, k) = (sub / 4, sub % 4);
                let byte = b[64 * half + e + 32 * (k % 2)];
                let lo = if k < 2 { byte & 15 } else { byte >> 4 };
                lo | ((b[128 + 32 * half + e] >> (2 * k)) & 3) << 4
            }
            _ => unreachable!(),
        };
    }
    q
}

/// Q2_K and Q3_K: each 32-element group's low 2 bits as 8 bytes (byte k holds elements 4k..4k+3
/// at bits 0, 2, 4, 6), then for Q3_K from word 2 G one word of high bits per group (bit e set:
/// element e is not lowered by 4). `wd`: Q2_K, each super-block's 16 scale bytes (low nibble
/// scale, high nibble min, one per 16 elements), then from word 4 SB its `d | dmin << 16`;
/// Q3_K, each super-block's 12 bytes of packed 6-bit scales and its f16 d, padded to 16 bytes
/// (112 bytes per 256 elements against the file's 110).
fn repack_two_bit(ty: GgmlType, bytes: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let blocks = bytes.len() / ty.block_bytes();
    let mut q = Vec::with_capacity(blocks * 96 + 16);
    let mut high = Vec::new();
    let mut d = Vec::with_capacity(blocks * 20 + 16);
    let mut d2 = Vec::new();
    for b in bytes.chunks_exact(ty.block_bytes()) {
        let qs = if ty == GgmlType::Q2_K { &b[16..80] } else { &b[32..96] };
        for sub in 0..8 {
            let code = |e: usize| {
                let el = 32 * sub + e;
                (qs[32 * (el / 128) + el % 32] >> (2 * (el % 128 / 32))) & 3
            };
            for k in 0..8 {
                q.push((0..4).map(|c| code(4 * k + c) << (2 * c)).fold(0, |a, v| a | v));
            }
            if ty == GgmlType::Q3_K {
                let hmask = &b[0..32];
                let bits = (0..32).map(|e| u32::from((hmask[e] >> sub) & 1) << e).fold(0, |a, v| a | v);
                high.extend_from_slice(&bits.to_le_bytes());
            }
        }
        if ty == GgmlType::Q2_K {
            d.extend_from_slice(&b[0..16]);
            d2.extend_from_slice(&b[80..84]);
        } else {
            d.extend_from_slice(&b[96..110]);
            d.extend_from_slice(&[0, 0]);
        }
    }
    q.extend_from_slice(&high);
    d.extend_from_slice(&d2);
    q.resize(q.len().div_ceil(16) * 16, 0);
    d.resize(d.len().div_ceil(16) * 16, 0);
    (q, d)
}

/// Rearranges whole blocks of a grouped type into its `wq` and `wd` arrays (see the module
/// docs), each padded to a multiple of 16 bytes.
pub(super) fn repack(ty: GgmlType, bytes: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if is_two_bit(ty) {
        return repack_two_bit(ty, bytes);
    }
    let bb = ty.block_bytes();
    let per_block = ty.block_len() / 32;
    let groups = bytes.len() / bb * per_block;
    let mut q = Vec::with_capacity(groups * 24 + 16);
    let mut high: Vec<u32> = Vec::with_capacity(groups * 2);
    let mut d = Vec::with_capacity(groups * 4 + 32);
    let mut d2 = Vec::new();
    for b in bytes.chunks_exact(bb) {
        for sub in 0..per_block {
            let c = codes(ty, b, sub);
            q.extend((0..16).map(|i| (c[i] & 15) | (c[i + 16] & 15) << 4));
            match ty {
                GgmlType::Q4_K => {}
                GgmlType::Q6_K => {
                    for half in c.chunks_exact(16) {
                        high.push(half.iter().enumerate().map(|(i, &v)| u32::from(v >> 4) << (2 * i)).fold(0, |a, v| a | v));
                    }
                }
                _ => high.push(c.iter().enumerate().map(|(e, &v)| u32::from(v >> 4) << e).fold(0, |a, v| a | v)),
            }
        }
        match ty {
            GgmlType::Q5_0 => d.extend_from_slice(&b[..2]),
            GgmlType::Q5_1 => d.extend_from_slice(&b[..4]),
            GgmlType::Q4_K | GgmlType::Q5_K => d.extend_from_slice(&b[..16]),
            GgmlType::Q6_K => {
                d.extend_from_slice(&b[192..208]);
                d2.extend_from_slice(&b[208..210]);
            }
            _ => unreachable!(),
        }
    }
    q.extend(high.iter().flat_map(|w| w.to_le_bytes()));
    // Q6_K's d segment starts right after 16 bytes per super-block: word 4 SB.
    d.extend_from_slice(&d2);
    q.resize(q.len().div_ceil(16) * 16, 0);
    d.resize(d.len().div_ceil(16) * 16, 0);
    (q, d)
}
