//! Weights repacked at load time into interleaved groups of 16 rows, for the matrix-vector and
//! matrix-matrix products of Q4_0, Q4_1, Q5_0 and Q8_0 matrices.
//!
//! # Why this layout
//!
//! ember's dot products must stay bit-identical to [`super::reference`]: per row, eight f32
//! lanes, lane `j` of a block holding the integer sum of elements `4j..4j+4` and accumulating
//! it with one fused multiply-add per block, then ggml's horizontal-sum tree. A row at a time
//! (the plain kernels in [`super::x86`]) spends most of its time on that per-block latency
//! chain and on shuffles; llama.cpp's repacked kernels instead put 16 rows side by side so
//! every vector instruction serves 16 rows.
//!
//! Here a *group* is 16 consecutive rows. For each block of 32 columns the group stores, per
//! lane `j`, the four quants of lane `j` of all 16 rows in one 64-byte vector (row `i` in
//! dword `i`). One `vpdpbusd` of that vector with the activation's dword `j` broadcast gives
//! lane `j`'s integer sums of all 16 rows at once, and one FMA adds them into a register
//! holding lane `j` of 16 rows' accumulators: exactly the reference's operations, in its
//! order, for 16 rows at a time. The horizontal sum becomes seven vector adds across the
//! eight lane registers. No shuffle is needed anywhere.
//!
//! For the 4-bit types, lane `j < 4` is the low nibbles of quant bytes `4j..4j+4` and lane
//! `j + 4` their high nibbles (GGUF stores element `e` and `e + 16` in one byte), so one
//! 64-byte vector of packed bytes feeds two lanes and the repack is a pure dword transpose.
//!
//! A group is a run of *chunks*, each the quants of one or two blocks followed by their 16
//! rows' scales (`d`, then `m` for Q4_1, as 16 f16 per block): Q4_1 one block per chunk (320
//! bytes), Q4_0 two (576), Q8_0 two (1088), so every chunk is whole cache lines and every
//! quant vector aligned. The scales travel with their quants: a group is one sequential stream
//! that a linear prefetch a few KiB ahead covers (scales kept in a region of their own missed
//! the cache at every group's start), and the matrix is as large as the original.
//!
//! Q5_0 is Q4_0's layout with the fifth bits added: per block, one 64-bit mask per lane after
//! the chunk's scales (bit `4i + t`: row `i`'s element `4 * lane + t`), so that a masked byte
//! add (AVX-512BW; AVX2 spreads the mask's 32 bits of a half group to bytes) lifts the nibbles
//! to 5 bits. Its chunk holds two blocks (704 bytes), the same bytes as the file's.
//!
//! # Integer products
//!
//! `vpdpbusd` multiplies unsigned by signed bytes. Q4_1's nibbles are unsigned already. Q4_0's
//! quant is `nibble - 8`, so its sum is `dot(nibble, y) - 8 * sum(y)` (Q5_0's `- 16 * sum(y)`); Q8_0's signed quants are
//! flipped to `x + 128` (one xor) and `128 * sum(y)` is taken off. The per-lane activation sums
//! are computed once per token ([`ActScales`]) and seed the integer accumulator, so the
//! correction costs no instruction in the loop. These are exact, and equal the reference's
//! sign-trick products for every activation the quantiser produces (it never writes -128;
//! see [`super::reference`] for that quirk).
//!
//! Without AVX-512 VNNI the same layout is walked 8 rows at a time with AVX2
//! (`vpmaddubsw` + `vpmaddwd`; Q8_0 keeps the reference's sign trick, since `x + 128` would
//! overflow `vpmaddubsw`'s 16-bit pair sums).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

use super::{BlockQ8_0, BlockQ8_1, QK};
use crate::gguf::GgmlType;
use crate::mem::ZeroedBuf;
use std::ops::Range;

/// Rows per interleaved group.
pub const GROUP: usize = 16;

/// The instruction sets the packed kernels are written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 F/BW/VL with VNNI (`vpdpbusd` on 16 rows at a time).
    Avx512Vnni,
    /// AVX2 with FMA and F16C (8 rows at a time).
    Avx2,
}

impl Isa {
    /// The best packed kernels this CPU runs, or `None` (the row-at-a-time kernels then serve).
    /// This is the one place where they are chosen.
    pub fn detect() -> Option<Isa> {
        static ISA: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if avx512::supported() {
                    return Some(Isa::Avx512Vnni);
                }
                if avx2::supported() {
                    return Some(Isa::Avx2);
                }
            }
            None
        })
    }

    /// Whether this CPU can run kernels written for `self` (tests force the narrower ISA).
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Avx512Vnni => avx512::supported(),
                Isa::Avx2 => avx2::supported(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}

/// How far ahead of the block being multiplied its group's stream is prefetched, by default
/// (callers pass their own distance to [`PackedMatrix::mul_groups`]). Decode reads every
/// weight once per token from memory or the last-level cache, and one core alone does not
/// keep enough requests in flight. Measured single-threaded on a Sapphire Rapids VM (Q4_1, 97
/// MiB of matrices): 7.3 GB/s without software prefetch, 9.9 GB/s prefetching into L1 4 KiB
/// ahead (L1's few fill buffers then cap it), 21-25 GB/s prefetching into L2 8-64 KiB ahead;
/// a plain streaming read gave 13 GB/s.
pub const DEFAULT_PREFETCH: usize = 16 << 10;

/// Prefetches into L2 the `bytes` (a multiple of 64) that lie `dist` bytes ahead of `p`
/// (nothing when `dist` is 0). Past the end of the matrix this names addresses that may not be
/// mapped, which prefetches ignore.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_ahead(p: *const u8, bytes: usize, dist: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T2};
    if dist == 0 {
        return;
    }
    for l in (0..bytes).step_by(64) {
        _mm_prefetch::<_MM_HINT_T2>(p.wrapping_add(dist + l).cast());
    }
}

/// Prefetches into L2 the first `dist` bytes from `p` (a part's start, which the in-loop
/// prefetch, always `dist` ahead, never names).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_start(p: *const u8, dist: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T2};
    for l in (0..dist).step_by(64) {
        _mm_prefetch::<_MM_HINT_T2>(p.wrapping_add(l).cast());
    }
}

/// Whether [`PackedMatrix`] handles weights of type `ty`.
pub fn packs(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q8_0)
}

/// One cache line; the packed bytes live in these so that every group starts 64-byte aligned.
#[derive(Clone, Copy, bytemuck::Zeroable, bytemuck::Pod)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Shape of one packed type.
#[derive(Clone, Copy, Debug)]
struct Format {
    /// f16 fields before the quants in a GGUF block (d; d and m for Q4_1).
    scales: usize,
    /// Quant bytes of one row's block.
    qbytes: usize,
    /// Blocks per chunk.
    k: usize,
    /// Q5_0's fifth bits (a u32 after the scale in a GGUF block): packed as one 64-bit mask
    /// per lane and block after the chunk's scales, bit `4i + t` for row i's element `4 *
    /// lane + t`, so a masked byte add lifts the nibbles to 5 bits.
    high_bits: bool,
}

impl Format {
    fn of(ty: GgmlType) -> Option<Format> {
        match ty {
            GgmlType::Q4_0 => Some(Format { scales: 1, qbytes: 16, k: 2, high_bits: false }),
            GgmlType::Q4_1 => Some(Format { scales: 2, qbytes: 16, k: 1, high_bits: false }),
            GgmlType::Q5_0 => Some(Format { scales: 1, qbytes: 16, k: 2, high_bits: true }),
            GgmlType::Q8_0 => Some(Format { scales: 1, qbytes: 32, k: 2, high_bits: false }),
            _ => None,
        }
    }

    /// Bytes of one row's block in the GGUF file.
    fn block_bytes(self) -> usize {
        2 * self.scales + self.high_bytes() + self.qbytes
    }

    /// Q5_0's fifth bits per row and block: 4 bytes in the file, and as many packed.
    fn high_bytes(self) -> usize {
        if self.high_bits { 4 } else { 0 }
    }

    /// Bytes of one chunk: `k` blocks of 16 rows, quants, scales and fifth bits.
    fn chunk_bytes(self) -> usize {
        self.k * GROUP * self.block_bytes()
    }
}

/// A Q4_0, Q4_1 or Q8_0 matrix in groups of 16 interleaved rows (see the module docs).
pub struct PackedMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    /// Blocks per row.
    nb: usize,
    /// Bytes from one group to the next (a whole number of lines).
    group_stride: usize,
    /// The packed bytes, in whole cache lines (so that every group starts 64-byte aligned),
    /// zeroed at allocation, in huge pages where asked; the repack's threads fault in the
    /// pages they fill.
    lines: ZeroedBuf<Line>,
}

/// How a matrix is packed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackOptions {
    /// Ask the kernel for transparent huge pages (2 MiB) for the packed copy. Decode streams
    /// every weight from memory once per token; with 4 KiB pages that is a TLB miss (a
    /// two-level walk in a virtual machine) every 4 KiB, and the hardware prefetchers stop at
    /// every 4 KiB boundary. Without effect where the kernel has no such pages.
    pub huge_pages: bool,
    /// Once a matrix mapped from the file is packed, hand the file's pages under it back to the
    /// OS ([`GgufFile::release`](crate::gguf::GgufFile::release)): the copy replaces them, so
    /// resident memory holds the weights once, not twice. Only for sessions in which nothing
    /// reads the matrix's rows from the file afterwards (the sparse FFN's row kernels do): such
    /// a read faults the pages back in, which is correct but slow.
    pub release_source: bool,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions { huge_pages: true, release_source: false }
    }
}

/// Why a matrix could not be packed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{0} matrices are not packed (Q4_0, Q4_1, Q5_0 and Q8_0 are)")]
    Unsupported(GgmlType),
    #[error("{rows}x{cols} {ty} takes {expected} bytes, but {got} were given")]
    Length { ty: GgmlType, rows: usize, cols: usize, expected: usize, got: usize },
}

impl PackedMatrix {
    /// Repacks `rows` rows of `cols` values in GGUF block order. Rows past the last whole
    /// group are padded with zero blocks, whose products are never stored.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, bytes: &[u8]) -> Result<PackedMatrix, PackError> {
        Self::with_options(ty, rows, cols, bytes, PackOptions::default())
    }

    /// [`PackedMatrix::new`] with the given options. Groups are filled in parallel (rayon):
    /// a 7B model's 3.6 GiB took seconds on one thread.
    pub fn with_options(ty: GgmlType, rows: usize, cols: usize, bytes: &[u8], opts: PackOptions) -> Result<PackedMatrix, PackError> {
        use rayon::prelude::*;
        let f = Format::of(ty).ok_or(PackError::Unsupported(ty))?;
        let nb = cols / QK;
        let expected = rows * nb * f.block_bytes();
        if !cols.is_multiple_of(QK) || bytes.len() != expected {
            return Err(PackError::Length { ty, rows, cols, expected, got: bytes.len() });
        }
        let groups = rows.div_ceil(GROUP);
        let group_stride = nb.div_ceil(f.k) * f.chunk_bytes();
        debug_assert!(f.chunk_bytes().is_multiple_of(64));
        let mut lines = ZeroedBuf::<Line>::new(groups * group_stride / 64, opts.huge_pages);
        let row_bytes = nb * f.block_bytes();
        let fill = |(g, dst): (usize, &mut [u8])| {
            for i in 0..GROUP.min(rows - g * GROUP) {
                let r = g * GROUP + i;
                for b in 0..nb {
                    let src = &bytes[r * row_bytes + b * f.block_bytes()..][..f.block_bytes()];
                    let (chunk, j) = (b / f.k * f.chunk_bytes(), b % f.k);
                    // Scale field s of block j of the chunk: after the chunk's quants, 16 f16
                    // per (field, block).
                    for s in 0..f.scales {
                        let at = chunk + f.k * GROUP * f.qbytes + (s * f.k + j) * 2 * GROUP + 2 * i;
                        dst[at..at + 2].copy_from_slice(&src[2 * s..2 * s + 2]);
                    }
                    // Lane l's fifth bits (elements 4l..4l+4) of row i: bits 4i..4i+4 of the
                    // block's mask l, after the chunk's scales.
                    if f.high_bits {
                        let qh = u32::from_le_bytes(src[2 * f.scales..2 * f.scales + 4].try_into().unwrap());
                        let masks = chunk + f.k * GROUP * (f.qbytes + 2 * f.scales) + j * 64;
                        for l in 0..8 {
                            let at = masks + 8 * l + i / 2;
                            dst[at] |= (((qh >> (4 * l)) & 0xF) as u8) << (4 * (i % 2));
                        }
                    }
                    // Quant dword v of the row goes to vector v of the block, dword i.
                    let qs = &src[2 * f.scales + f.high_bytes()..];
                    for v in 0..f.qbytes / 4 {
                        let at = chunk + j * GROUP * f.qbytes + v * 64 + 4 * i;
                        dst[at..at + 4].copy_from_slice(&qs[4 * v..4 * v + 4]);
                    }
                }
            }
        };
        if group_stride > 0 {
            let out: &mut [u8] = bytemuck::cast_slice_mut(&mut lines[..]);
            // Small matrices on the calling thread: a rayon hand-off would cost more.
            if out.len() < 1 << 20 {
                out.chunks_mut(group_stride).enumerate().for_each(fill);
            } else {
                out.par_chunks_mut(group_stride).enumerate().for_each(fill);
            }
        }
        Ok(PackedMatrix { ty, rows, cols, nb, group_stride, lines })
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Number of 16-row groups (the unit of work splitting).
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(GROUP)
    }

    /// Bytes held (the unit threads share the work in).
    pub fn n_bytes(&self) -> usize {
        self.lines.len() * 64
    }

    fn group_ptr(&self, g: usize) -> *const u8 {
        debug_assert!(g < self.groups());
        // SAFETY: g < groups, so the offset is inside `lines`.
        unsafe { self.lines.as_ptr().cast::<u8>().add(g * self.group_stride) }
    }

    /// `out[t * out_stride + r] = W[r] · x[t]` for every row `r` of the groups in `groups` and
    /// every token `t` of `acts`, with the kernels of `isa`, prefetching the groups' stream
    /// `prefetch` bytes ahead (0: none; [`DEFAULT_PREFETCH`]). Bit-identical to the reference
    /// dot products of [`super::reference`] for activations from this crate's quantisers.
    ///
    /// # Safety
    /// `out` must be valid for writes at every such index, no other thread may access those
    /// elements meanwhile, and `isa` must be [`Isa::available`].
    ///
    /// # Panics
    /// If the activations do not match the weight type or width.
    pub unsafe fn mul_groups(&self, isa: Isa, acts: &PackedActs<'_>, groups: Range<usize>, out: *mut f32, out_stride: usize, prefetch: usize) {
        assert!(groups.end <= self.groups());
        assert!(acts.nb == self.nb, "{} activation blocks for {} weight blocks", acts.nb, self.nb);
        let want = if self.ty == GgmlType::Q4_1 { ActKind::Q8_1 } else { ActKind::Q8_0 };
        assert!(acts.kind == want, "{} weights need {want:?} activations", self.ty);
        #[cfg(target_arch = "x86_64")]
        if !groups.is_empty() {
            prefetch_start(self.group_ptr(groups.start), prefetch.min((groups.end - groups.start) * self.group_stride));
        }
        for g in groups {
            let gp = self.group_ptr(g);
            let n_rows = (self.rows - g * GROUP).min(GROUP);
            for t in 0..acts.n_tokens {
                let mut tile = [0.0f32; GROUP];
                self.kernel(isa, gp, acts, t, prefetch, &mut tile);
                let dst = out.add(t * out_stride + g * GROUP);
                std::ptr::copy_nonoverlapping(tile.as_ptr(), dst, n_rows);
            }
        }
    }

    /// One group's 16 dot products with token `t`.
    #[inline(always)]
    unsafe fn kernel(&self, isa: Isa, gp: *const u8, acts: &PackedActs<'_>, t: usize, prefetch: usize, tile: &mut [f32; GROUP]) {
        let nb = self.nb;
        let mut a = acts.token(t);
        a.prefetch = prefetch;
        #[cfg(target_arch = "x86_64")]
        match (isa, self.ty) {
            (Isa::Avx512Vnni, GgmlType::Q4_0) => avx512::group_q4_0(gp, nb, &a, tile),
            (Isa::Avx512Vnni, GgmlType::Q4_1) => avx512::group_q4_1(gp, nb, &a, tile),
            (Isa::Avx512Vnni, GgmlType::Q5_0) => avx512::group_q5_0(gp, nb, &a, tile),
            (Isa::Avx512Vnni, GgmlType::Q8_0) => avx512::group_q8_0(gp, nb, &a, tile),
            (Isa::Avx2, GgmlType::Q4_0) => avx2::group_q4_0(gp, nb, &a, tile),
            (Isa::Avx2, GgmlType::Q4_1) => avx2::group_q4_1(gp, nb, &a, tile),
            (Isa::Avx2, GgmlType::Q5_0) => avx2::group_q5_0(gp, nb, &a, tile),
            (Isa::Avx2, GgmlType::Q8_0) => avx2::group_q8_0(gp, nb, &a, tile),
            _ => unreachable!("only packable types are packed"),
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (isa, gp, nb, a, tile);
            unreachable!("no packed kernels on this architecture");
        }
    }

    /// Single-threaded product over all rows: `out[t * rows + r]`.
    ///
    /// # Panics
    /// If `isa` is not available on this CPU, the activations do not match, or `out` has the
    /// wrong length.
    pub fn mul(&self, isa: Isa, acts: &PackedActs<'_>, out: &mut [f32]) {
        assert!(isa.available(), "{isa:?} kernels on a CPU without them");
        assert_eq!(out.len(), acts.n_tokens * self.rows);
        // SAFETY: the ISA is present and `out` covers every (token, row).
        unsafe { self.mul_groups(isa, acts, 0..self.groups(), out.as_mut_ptr(), self.rows, DEFAULT_PREFETCH) }
    }
}

/// The activation format a weight type multiplies with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ActKind {
    Q8_0,
    Q8_1,
}

/// Per-token, per-block values the packed kernels want in a form they can broadcast straight
/// from memory: the scales as f32, and for Q8_0 activations the lane sums that correct the
/// unsigned products (`-8 * sum` for Q4_0 weights, `-128 * sum` for Q8_0). Computed once per
/// activation row and shared by every matrix that multiplies it.
pub struct ActScales {
    kind: ActKind,
    nb: usize,
    d: Vec<f32>,
    /// Q8_1: `s`; Q8_0: unused.
    s: Vec<f32>,
    bias4: Vec<[i32; 8]>,
    bias8: Vec<[i32; 8]>,
}

impl ActScales {
    /// For Q8_0 activations (`cols / 32` blocks per token).
    pub fn from_q8_0(y: &[BlockQ8_0], cols: usize) -> ActScales {
        let sums: Vec<[i32; 8]> = y.iter().map(|b| std::array::from_fn(|j| b.qs[4 * j..4 * j + 4].iter().map(|&q| i32::from(q)).sum())).collect();
        ActScales {
            kind: ActKind::Q8_0,
            nb: cols / QK,
            d: y.iter().map(|b| b.d.to_f32()).collect(),
            s: Vec::new(),
            bias4: sums.iter().map(|s| s.map(|v| -8 * v)).collect(),
            bias8: sums.iter().map(|s| s.map(|v| -128 * v)).collect(),
        }
    }

    /// Per block of every token: the scales as f32.
    pub(crate) fn d(&self) -> &[f32] {
        &self.d
    }

    /// Per block of every token: Q8_0 activations' lane sums times -8 (Q4_0 weights) and times
    /// -128 (Q8_0 weights); empty for Q8_1 activations.
    pub(crate) fn biases(&self) -> (&[[i32; 8]], &[[i32; 8]]) {
        (&self.bias4, &self.bias8)
    }

    /// For Q8_1 activations.
    pub fn from_q8_1(y: &[BlockQ8_1], cols: usize) -> ActScales {
        ActScales {
            kind: ActKind::Q8_1,
            nb: cols / QK,
            d: y.iter().map(|b| b.d.to_f32()).collect(),
            s: y.iter().map(|b| b.s.to_f32()).collect(),
            bias4: Vec::new(),
            bias8: Vec::new(),
        }
    }
}

/// Activations as the packed kernels read them: quants and their [`ActScales`].
pub struct PackedActs<'a> {
    kind: ActKind,
    nb: usize,
    n_tokens: usize,
    /// The quants of each block, 32 bytes apart by `step` bytes (34 for Q8_0, 36 for Q8_1).
    qs: *const i8,
    step: usize,
    scales: &'a ActScales,
}

// SAFETY: the pointer is into a slice borrowed for 'a and only read.
unsafe impl Send for PackedActs<'_> {}
unsafe impl Sync for PackedActs<'_> {}

impl<'a> PackedActs<'a> {
    /// Q8_0 activations (for Q4_0 and Q8_0 weights), `n_tokens` rows of `cols`.
    ///
    /// # Panics
    /// If the sizes disagree.
    pub fn q8_0(y: &'a [BlockQ8_0], scales: &'a ActScales, n_tokens: usize) -> PackedActs<'a> {
        assert!(scales.kind == ActKind::Q8_0 && y.len() == scales.d.len() && y.len() == n_tokens * scales.nb);
        PackedActs { kind: ActKind::Q8_0, nb: scales.nb, n_tokens, qs: y.as_ptr().cast::<u8>().wrapping_add(2).cast(), step: 34, scales }
    }

    /// Q8_1 activations (for Q4_1 weights).
    ///
    /// # Panics
    /// If the sizes disagree.
    pub fn q8_1(y: &'a [BlockQ8_1], scales: &'a ActScales, n_tokens: usize) -> PackedActs<'a> {
        assert!(scales.kind == ActKind::Q8_1 && y.len() == scales.d.len() && y.len() == n_tokens * scales.nb);
        PackedActs { kind: ActKind::Q8_1, nb: scales.nb, n_tokens, qs: y.as_ptr().cast::<u8>().wrapping_add(4).cast(), step: 36, scales }
    }

    fn token(&self, t: usize) -> TokenActs {
        let b0 = t * self.nb;
        let s = self.scales;
        TokenActs {
            qs: self.qs.wrapping_add(b0 * self.step),
            step: self.step,
            d: s.d[b0..].as_ptr(),
            s: s.s.get(b0..).map_or(std::ptr::null(), |v| v.as_ptr()),
            bias4: s.bias4.get(b0..).map_or(std::ptr::null(), |v| v.as_ptr().cast()),
            bias8: s.bias8.get(b0..).map_or(std::ptr::null(), |v| v.as_ptr().cast()),
            prefetch: DEFAULT_PREFETCH,
        }
    }
}

/// One token's activation pointers, block 0 first; the kernels index blocks `0..nb`.
pub(crate) struct TokenActs {
    /// Block b's 32 quants at `qs + b * step`.
    pub qs: *const i8,
    pub step: usize,
    pub d: *const f32,
    pub s: *const f32,
    /// Eight i32 per block.
    pub bias4: *const i32,
    pub bias8: *const i32,
    /// Bytes ahead of the block being read that the kernels prefetch (0: none).
    pub prefetch: usize,
}
