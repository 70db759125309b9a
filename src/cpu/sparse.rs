//! Neuron-aware CPU operators for ReLU-sparse FFNs (the CPU half of PowerInfer's scheme).
//!
//! A neuron i of `down(act(gate·x) * (up·x))` is row i of gate, row i of up and row i of the
//! transposed down matrix `down_t`. When most neurons are exactly zero for a token, only the
//! active ones need their weights read:
//!
//! * [`matvec_rows`] computes the listed rows of `gate·x` or `up·x`. Each value is bit-identical
//!   to the dense [`matmul`](super::matmul::matmul)'s: the token is converted the same way and the
//!   same dot product kernel runs per row, so sparse and dense decoding agree exactly on them.
//! * [`axpy_rows`] computes the down projection as `Σ h[i] · down_t[i]` over the active
//!   neurons. Its sum order is fixed by the length of the active list alone (fixed chunks, partial
//!   sums added in chunk order), so the result is the same for any thread count.
//! * [`transpose_matrix`] builds `down_t` from `down` at load time.
//! * [`active_rows`] lists the neurons whose activation is positive.
//! * [`NeuronBundle`] stores a layer's up and `down_t` rows neuron by neuron, and
//!   [`ffn_over_ranges`] computes a whole FFN over them (gate, choice of neurons, up, down) in
//!   one parallel region of fixed neuron ranges: how a CPU session runs the sparse modes.

use super::matmul::{Activations, Precision};
use crate::quant::packed::ActScales;
use crate::gguf::GgmlType;
use crate::model::Matrix;
use crate::quant::{self, f16, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8K, BlockQ8_0, BlockQ8_1, QuantError, WeightBlock, QK};
use rayon::prelude::*;

/// Weight bytes below which a task is not worth handing to another thread: rayon's hand-off
/// costs a few microseconds, the time it takes to stream roughly this much from cache.
const MIN_TASK_BYTES: usize = 32 * 1024;

/// Bytes of weights between the row being read and the row being prefetched: enough to cover
/// a memory latency with the work in between (measured: short 612-byte rows gained from 6 rows
/// ahead over 2 at 50-77% sparsity).
const PREFETCH_DISTANCE: usize = 4096;

/// Bytes of weights between the neuron being computed and the one being prefetched into the
/// second-level cache in [`gated_ffn_chunks`]: one core streaming gathered rows needs more
/// lines in flight than the first-level cache's fill buffers allow (the packed products
/// measured the same: 10 GB/s prefetching into L1, 21-25 into L2 8-64 KiB ahead).
const GATHER_PREFETCH_DISTANCE: usize = 24 * 1024;

/// Bytes of a row prefetched at most: enough for the hardware prefetcher to have caught the
/// stream by then, and few enough instructions not to slow rows that are already cached.
const PREFETCH_BYTES: usize = 4096;

/// How many listed rows ahead to prefetch for rows of `row_bytes`: [`PREFETCH_DISTANCE`] worth,
/// at least `min` rows, at most 16.
fn rows_ahead(row_bytes: usize, min: usize) -> usize {
    (PREFETCH_DISTANCE / row_bytes.max(1)).clamp(min, 16)
}

/// Neurons per AXPY chunk at least; a chunk's partial sum costs one output-sized buffer and
/// one pass to add it, which 64 rows amortise.
const MIN_AXPY_CHUNK: usize = 64;

/// Chunks per AXPY call at most (longer lists get longer chunks), which bounds the buffers and
/// the final reduction while leaving enough tasks to balance 16 threads.
const MAX_AXPY_CHUNKS: usize = 32;

/// [`prefetch`] into the second-level cache only: for rows needed after more work than the
/// first-level cache can hold.
#[inline(always)]
fn prefetch_l2(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    prefetch_lines::<{ std::arch::x86_64::_MM_HINT_T1 }>(bytes);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// Asks the CPU to start loading (up to a cap of) a row that is about to be read. Listed rows
/// are scattered, so the hardware prefetchers, which follow sequential streams, would leave
/// the start of every row to a full memory latency.
#[inline(always)]
fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    prefetch_lines::<{ std::arch::x86_64::_MM_HINT_T0 }>(bytes);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// Prefetches each cache line of the first [`PREFETCH_BYTES`] of `bytes` with the given hint.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_lines<const HINT: i32>(bytes: &[u8]) {
    let n = bytes.len().min(PREFETCH_BYTES);
    let p = bytes.as_ptr();
    let mut off = 0;
    while off < n {
        // SAFETY: prefetching has no effect on program state, whatever the address.
        unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(p.wrapping_add(off).cast()) };
        off += 64;
    }
}

// ---------------------------------------------------------------------------------------------
// Row products
// ---------------------------------------------------------------------------------------------

/// The token converted to what one weight type multiplies with, exactly as [`Activations`]
/// converts it for [`matmul`](super::matmul::matmul): borrowed from the same cache, so gate,
/// up and the dense products of one token share one quantisation.
enum TokenForm<'a> {
    /// With the token's per-block scales and lane sums (the AVX-512 VNNI row kernels').
    Q8_0(&'a [BlockQ8_0], &'a ActScales),
    Q8_1(&'a [BlockQ8_1]),
    Q8K(&'a [BlockQ8K]),
    Half(&'a [f16]),
    F32(&'a [f32]),
    /// A weight type `matmul` has no kernel for at [`Precision::Llama`].
    NoKernel,
}

impl<'a> TokenForm<'a> {
    fn new(ty: GgmlType, acts: &'a Activations<'_>) -> TokenForm<'a> {
        let x = acts.x;
        if acts.precision == Precision::F32 {
            return TokenForm::F32(x);
        }
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => TokenForm::Q8_0(acts.q8_0(), acts.q8_0_scales()),
            GgmlType::Q4_1 | GgmlType::Q5_1 => TokenForm::Q8_1(acts.q8_1()),
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => TokenForm::Q8K(acts.q8_k()),
            GgmlType::F16 => TokenForm::Half(acts.half()),
            GgmlType::F32 => TokenForm::F32(x),
            _ => TokenForm::NoKernel,
        }
    }
}

/// Where the rows of one matrix lie in memory: row r is `row_bytes` bytes at
/// `r * stride + offset`. A matrix of its own has `stride == row_bytes`; in a
/// [`NeuronBundle`] the up and down rows of a neuron share one stride.
#[derive(Clone, Copy)]
struct RowsAt<'a> {
    bytes: &'a [u8],
    ty: GgmlType,
    /// Values per row.
    cols: usize,
    stride: usize,
    offset: usize,
    row_bytes: usize,
}

impl<'a> RowsAt<'a> {
    fn matrix(w: &'a Matrix) -> Self {
        RowsAt { bytes: w.bytes(), ty: w.ty, cols: w.cols, stride: w.row_bytes(), offset: 0, row_bytes: w.row_bytes() }
    }

    #[inline(always)]
    fn row(&self, r: usize) -> &'a [u8] {
        &self.bytes[r * self.stride + self.offset..][..self.row_bytes]
    }

    /// Asks for row r to be loaded into the cache (see [`prefetch`]).
    #[inline(always)]
    fn prefetch(&self, r: usize) {
        prefetch(self.row(r));
    }
}

/// One matrix's rows ready to be dotted with one token: the rows and the token in the
/// matching form, with the same kernel `matmul` picks.
enum RowDots<'a> {
    Q4_0(RowsAt<'a>, &'a [BlockQ8_0], &'a ActScales),
    Q4_1(RowsAt<'a>, &'a [BlockQ8_1]),
    Q8_0(RowsAt<'a>, &'a [BlockQ8_0], &'a ActScales),
    Q5_0(RowsAt<'a>, &'a [BlockQ8_0]),
    Q5_1(RowsAt<'a>, &'a [BlockQ8_1]),
    Q2K(RowsAt<'a>, &'a [BlockQ8K]),
    Q3K(RowsAt<'a>, &'a [BlockQ8K]),
    Q4K(RowsAt<'a>, &'a [BlockQ8K]),
    Q5K(RowsAt<'a>, &'a [BlockQ8K]),
    Q6K(RowsAt<'a>, &'a [BlockQ8K]),
    F16(RowsAt<'a>, &'a [f16]),
    F32(RowsAt<'a>, &'a [f32]),
    /// [`Precision::F32`] with a non-F32 matrix: each row is dequantised and dotted in f32.
    Dequantised(RowsAt<'a>, &'a [f32]),
}

impl<'a> RowDots<'a> {
    fn new(w: &'a Matrix, form: &TokenForm<'a>) -> RowDots<'a> {
        Self::at(RowsAt::matrix(w), form, &w.name)
    }

    fn at(rows: RowsAt<'a>, form: &TokenForm<'a>, name: &str) -> RowDots<'a> {
        match (rows.ty, form) {
            (GgmlType::F32, TokenForm::F32(x)) => RowDots::F32(rows, x),
            (_, TokenForm::F32(x)) => RowDots::Dequantised(rows, x),
            (GgmlType::Q4_0, TokenForm::Q8_0(x, s)) => RowDots::Q4_0(rows, x, s),
            (GgmlType::Q8_0, TokenForm::Q8_0(x, s)) => RowDots::Q8_0(rows, x, s),
            (GgmlType::Q4_1, TokenForm::Q8_1(x)) => RowDots::Q4_1(rows, x),
            (GgmlType::Q5_0, TokenForm::Q8_0(x, _)) => RowDots::Q5_0(rows, x),
            (GgmlType::Q5_1, TokenForm::Q8_1(x)) => RowDots::Q5_1(rows, x),
            (GgmlType::Q2_K, TokenForm::Q8K(x)) => RowDots::Q2K(rows, x),
            (GgmlType::Q3_K, TokenForm::Q8K(x)) => RowDots::Q3K(rows, x),
            (GgmlType::Q4_K, TokenForm::Q8K(x)) => RowDots::Q4K(rows, x),
            (GgmlType::Q5_K, TokenForm::Q8K(x)) => RowDots::Q5K(rows, x),
            (GgmlType::Q6_K, TokenForm::Q8K(x)) => RowDots::Q6K(rows, x),
            (GgmlType::F16, TokenForm::Half(x)) => RowDots::F16(rows, x),
            // Forms are made per weight type, so only `NoKernel` is left.
            (other, _) => panic!("{name}: no CPU kernel for {other} (the loader converts such types)"),
        }
    }

    fn rows(&self) -> &RowsAt<'a> {
        match self {
            RowDots::Q4_0(r, ..) | RowDots::Q4_1(r, _) | RowDots::Q8_0(r, ..) | RowDots::Q5_0(r, _) | RowDots::Q5_1(r, _) | RowDots::Q2K(r, _) | RowDots::Q3K(r, _) | RowDots::Q4K(r, _) | RowDots::Q5K(r, _) | RowDots::Q6K(r, _) | RowDots::F16(r, _) | RowDots::F32(r, _) | RowDots::Dequantised(r, _) => r,
        }
    }

    /// Length of the scratch row a task needs: a dequantised row for the f32 path, else none.
    fn scratch_len(&self) -> usize {
        match self {
            RowDots::Dequantised(rows, _) => rows.cols,
            _ => 0,
        }
    }

    /// [`RowDots::dot`] of four rows, each value bit-identical to it: the 8-bit types run
    /// the four rows side by side ([`quant::vec_dot_q4_0_q8_0_x4`]), so that a gathered list
    /// of rows is not paced by one row's chain of per-block multiply-adds.
    #[inline]
    fn dot4(&self, r: [usize; 4], scratch: &mut [f32]) -> [f32; 4] {
        match *self {
            RowDots::Q4_0(w, x, s) => quant::vec_dot_q4_0_q8_0_x4_with(r.map(|i| bytemuck::cast_slice(w.row(i))), x, s),
            RowDots::Q4_1(w, x) => quant::vec_dot_q4_1_q8_1_x4(r.map(|i| bytemuck::cast_slice(w.row(i))), x),
            RowDots::Q8_0(w, x, s) => quant::vec_dot_q8_0_q8_0_x4_with(r.map(|i| bytemuck::cast_slice(w.row(i))), x, s),
            _ => {
                let mut out = [0.0; 4];
                for (o, &i) in out.iter_mut().zip(&r) {
                    *o = self.dot(i, scratch);
                }
                out
            }
        }
    }

    /// `dot(row r, token)`, the value `matmul` writes for row r. A row holds as many weight
    /// blocks (or values) as the converted token.
    #[inline]
    fn dot(&self, r: usize, scratch: &mut [f32]) -> f32 {
        match *self {
            RowDots::Q4_0(w, x, s) => quant::vec_dot_q4_0_q8_0_with(bytemuck::cast_slice(w.row(r)), x, s),
            RowDots::Q4_1(w, x) => quant::vec_dot_q4_1_q8_1(bytemuck::cast_slice(w.row(r)), x),
            RowDots::Q8_0(w, x, s) => quant::vec_dot_q8_0_q8_0_with(bytemuck::cast_slice(w.row(r)), x, s),
            RowDots::Q5_0(w, x) => BlockQ5_0::dot(bytemuck::cast_slice(w.row(r)), x),
            RowDots::Q5_1(w, x) => BlockQ5_1::dot(bytemuck::cast_slice(w.row(r)), x),
            RowDots::Q2K(w, x) => BlockQ2K::dot(bytemuck::cast_slice(w.row(r)), x),
            RowDots::Q3K(w, x) => BlockQ3K::dot(bytemuck::cast_slice(w.row(r)), x),
            RowDots::Q4K(w, x) => BlockQ4K::dot(bytemuck::cast_slice(w.row(r)), x),
            RowDots::Q5K(w, x) => BlockQ5K::dot(bytemuck::cast_slice(w.row(r)), x),
            RowDots::Q6K(w, x) => BlockQ6K::dot(bytemuck::cast_slice(w.row(r)), x),
            RowDots::F16(w, x) => quant::vec_dot_f16_f16(bytemuck::cast_slice(w.row(r)), x),
            RowDots::F32(w, x) => quant::vec_dot_f32(bytemuck::cast_slice(w.row(r)), x),
            RowDots::Dequantised(w, x) => {
                let row = &mut scratch[..w.cols];
                quant::dequantize(w.ty, w.row(r), row).expect("native types dequantise");
                quant::vec_dot_f32(row, x)
            }
        }
    }
}

/// Listed rows per task: enough tasks for every thread to get several (the rows' cost is
/// uniform, but threads are not), none smaller than [`MIN_TASK_BYTES`] of weights.
fn rows_per_task(n_rows: usize, bytes_per_row: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let for_balance = n_rows.div_ceil(threads * 8);
    let for_overhead = MIN_TASK_BYTES.div_ceil(bytes_per_row.max(1));
    for_balance.max(for_overhead).max(1)
}

/// The row to prefetch while list position `k` is computed, `ahead` positions on, unless it
/// continues a run of consecutive rows: the hardware prefetcher follows those by itself.
#[inline(always)]
fn row_to_prefetch(rows: &[u32], k: usize, ahead: usize) -> Option<usize> {
    let next = *rows.get(k + ahead)? as usize;
    (next != rows[k] as usize + ahead).then_some(next)
}

/// Checks what the row products need of their arguments; these are invariants of the forward
/// pass, not user input, hence panics with the matrix named.
fn check_row_product(w: &Matrix, acts: &Activations, rows: &[u32], out: &[f32]) {
    check_rows(w, acts, rows);
    assert_eq!(out.len(), w.rows, "{}: output of {} values for {} rows", w.name, out.len(), w.rows);
}

/// One token as wide as the matrix, and every listed row inside it.
fn check_rows(w: &Matrix, acts: &Activations, rows: &[u32]) {
    assert_eq!(acts.n_tokens, 1, "{}: row products take one token, not {}", w.name, acts.n_tokens);
    assert_eq!(acts.cols, w.cols, "{}: activation width {} vs matrix columns {}", w.name, acts.cols, w.cols);
    if let Some(&bad) = rows.iter().find(|&&r| r as usize >= w.rows) {
        panic!("{}: row {bad} listed, the matrix has {}", w.name, w.rows);
    }
}

/// `vals[k] = value(k, scratch)` for every position k, over rayon tasks of `per_task`
/// positions (one task runs inline); each task has its own scratch row.
fn fill_by_position(
    vals: &mut [f32],
    per_task: usize,
    scratch_len: usize,
    value: impl Fn(usize, &mut [f32]) -> f32 + Sync,
) {
    if per_task >= vals.len() {
        let mut scratch = vec![0.0; scratch_len];
        for (k, v) in vals.iter_mut().enumerate() {
            *v = value(k, &mut scratch);
        }
        return;
    }
    vals.par_chunks_mut(per_task).enumerate().for_each(|(task, chunk)| {
        let mut scratch = vec![0.0; scratch_len];
        for (j, v) in chunk.iter_mut().enumerate() {
            *v = value(task * per_task + j, &mut scratch);
        }
    });
}

/// `out[r] = dot(row r of w, x)` for every r in `rows`, for the single token in `acts`, with
/// the numerics of the dense [`matmul`](super::matmul::matmul) (the values are bit-identical to
/// its output on those rows). Other entries of `out` (length `w.rows`) are left untouched;
/// unlisted rows are not read. `rows` may be in any order.
///
/// # Panics
/// If `acts` holds other than one token of `w.cols` values, `out` is not `w.rows` long, a row
/// is out of range, or `w` has a type the CPU kernels do not compute with.
pub fn matvec_rows(w: &Matrix, acts: &Activations, rows: &[u32], out: &mut [f32]) {
    check_row_product(w, acts, rows, out);
    if rows.is_empty() {
        return;
    }
    let dots = RowDots::new(w, &TokenForm::new(w.ty, acts));
    // Values are computed by list position, then scattered: tasks never write to `out` itself,
    // so a list with repeats is harmless.
    let mut vals = vec![0.0f32; rows.len()];
    let per_task = rows_per_task(rows.len(), w.row_bytes());
    let (bytes, rb) = (w.bytes(), w.row_bytes());
    let ahead = rows_ahead(rb, 2);
    fill_by_position(&mut vals, per_task, dots.scratch_len(), |k, scratch| {
        if let Some(next) = row_to_prefetch(rows, k, ahead) {
            prefetch(&bytes[next * rb..(next + 1) * rb]);
        }
        dots.dot(rows[k] as usize, scratch)
    });
    for (&r, &v) in rows.iter().zip(&vals) {
        out[r as usize] = v;
    }
}

/// [`matvec_rows`] on the calling thread, by list position: `vals[k]` = row `rows[k]` of `w`
/// times the token, the same values as [`matvec_rows`]. For callers that split a list over
/// their own threads (the hybrid's cold-neuron team).
///
/// # Panics
/// As [`matvec_rows`], or if `vals` is not as long as `rows`.
pub fn row_dots_serial(w: &Matrix, acts: &Activations, rows: &[u32], vals: &mut [f32]) {
    assert_eq!(vals.len(), rows.len(), "{}: {} outputs for {} rows", w.name, vals.len(), rows.len());
    check_rows(w, acts, rows);
    if rows.is_empty() {
        return;
    }
    let dots = RowDots::new(w, &TokenForm::new(w.ty, acts));
    let mut scratch = vec![0.0f32; dots.scratch_len()];
    let whole = rows.len() / 4 * 4;
    for (v, r) in vals[..whole].chunks_exact_mut(4).zip(rows.chunks_exact(4)) {
        v.copy_from_slice(&dots.dot4([r[0], r[1], r[2], r[3]].map(|i| i as usize), &mut scratch));
    }
    for (v, &r) in vals[whole..].iter_mut().zip(&rows[whole..]) {
        *v = dots.dot(r as usize, &mut scratch);
    }
}

/// [`matvec_rows`] for gate and up at once: one walk over the list computes both rows of each
/// neuron, and the token is converted once when both matrices have the same type. Each output
/// is bit-identical to what [`matvec_rows`] (and the dense matmul) gives. Measured 10-40%
/// faster than two calls on SmolLM2-sized matrices read from memory (one rayon dispatch and
/// one walk instead of two); the same as two calls on 7B-sized ones.
///
/// # Panics
/// As [`matvec_rows`], for either matrix.
pub fn matvec_rows_pair(
    gate: &Matrix,
    up: &Matrix,
    acts: &Activations,
    rows: &[u32],
    out_gate: &mut [f32],
    out_up: &mut [f32],
) {
    check_row_product(gate, acts, rows, out_gate);
    check_row_product(up, acts, rows, out_up);
    if rows.is_empty() {
        return;
    }
    let (gate_dots, up_dots) = (RowDots::new(gate, &TokenForm::new(gate.ty, acts)), RowDots::new(up, &TokenForm::new(up.ty, acts)));
    // Position 2k holds neuron k's gate value and 2k + 1 its up value.
    let mut vals = vec![0.0f32; 2 * rows.len()];
    let per_task = 2 * rows_per_task(rows.len(), gate.row_bytes() + up.row_bytes());
    let scratch_len = gate_dots.scratch_len().max(up_dots.scratch_len());
    let (gb, gr, ub, ur) = (gate.bytes(), gate.row_bytes(), up.bytes(), up.row_bytes());
    let ahead = rows_ahead(gr + ur, 2);
    fill_by_position(&mut vals, per_task, scratch_len, |k, scratch| {
        if k % 2 == 0 {
            if let Some(next) = row_to_prefetch(rows, k / 2, ahead) {
                prefetch(&gb[next * gr..(next + 1) * gr]);
                prefetch(&ub[next * ur..(next + 1) * ur]);
            }
        }
        let dots = if k % 2 == 0 { &gate_dots } else { &up_dots };
        dots.dot(rows[k / 2] as usize, scratch)
    });
    for (&r, pair) in rows.iter().zip(vals.chunks_exact(2)) {
        out_gate[r as usize] = pair[0];
        out_up[r as usize] = pair[1];
    }
}

/// Appends to the cleared `out` the indices of `values` greater than zero, ascending: the
/// neurons a ReLU lets through (NaN counts as inactive).
pub fn active_rows(values: &[f32], out: &mut Vec<u32>) {
    // Branch-free: at 50% sparsity a branch per value mispredicts half the time, which costs
    // more than writing every index and advancing only past the active ones.
    out.clear();
    out.resize(values.len(), 0);
    let mut n = 0;
    for (i, &v) in values.iter().enumerate() {
        out[n] = i as u32;
        n += usize::from(v > 0.0);
    }
    out.truncate(n);
}

// ---------------------------------------------------------------------------------------------
// Transposition
// ---------------------------------------------------------------------------------------------

/// Why [`transpose_matrix`] refused.
#[derive(Debug, thiserror::Error)]
pub enum TransposeError {
    #[error("{name}: a transposed matrix is stored as F32, F16, Q8_0 or Q4_0, not {ty}")]
    UnsupportedTarget { name: String, ty: GgmlType },
    #[error("{name}: Q8_0 rows are whole blocks of 32 values, and the transposed rows would hold {len}; store it as F16")]
    PartialBlock { name: String, len: usize },
    #[error("{name}: {source}")]
    Source { name: String, source: QuantError },
}

/// `w` transposed (`w.cols` rows of `w.rows` values) stored as `ty` (F32, F16, Q8_0 or Q4_0;
/// the quantised ones need `w.rows` to be a multiple of 32): how `ffn_down` becomes `ffn_down_t`, whose row i is
/// neuron i's output column. The result is named `<name>_t`.
///
/// Each task takes a band of source columns (whole source blocks), dequantises that band of
/// every source row into a tile, and encodes the band's output rows, so no full f32 copy of the
/// matrix is ever held. Values are the same as [`Matrix::transposed`]'s.
pub fn transpose_matrix(w: &Matrix, ty: GgmlType) -> Result<Matrix, TransposeError> {
    let (rows, cols) = (w.rows, w.cols);
    match ty {
        GgmlType::F32 | GgmlType::F16 => {}
        GgmlType::Q8_0 | GgmlType::Q4_0 if rows % QK == 0 => {}
        GgmlType::Q8_0 | GgmlType::Q4_0 => return Err(TransposeError::PartialBlock { name: w.name.clone(), len: rows }),
        other => return Err(TransposeError::UnsupportedTarget { name: w.name.clone(), ty: other }),
    }
    let source_error = |source| TransposeError::Source { name: w.name.clone(), source };
    let (block_len, block_bytes) = (w.ty.block_len(), w.ty.block_bytes());
    if !cols.is_multiple_of(block_len) {
        return Err(source_error(QuantError::PartialBlock { ty: w.ty, n: cols }));
    }
    let src = w.bytes();
    let src_row = cols / block_len * block_bytes;
    if src.len() != rows * src_row {
        let n = rows * cols;
        return Err(source_error(QuantError::SourceLength { ty: w.ty, n, expected: rows * src_row, got: src.len() }));
    }
    let out_row = ty.bytes_for(rows as u64).expect("checked above") as usize;
    let mut bytes = vec![0u8; cols * out_row];
    if !bytes.is_empty() {
        // 64 source columns per task (one K-quant block for those types): small enough for a
        // task's tile to stay in L2, large enough to amortise a dequantisation call per row.
        let band = block_len * (64 / block_len).max(1);
        bytes.par_chunks_mut(band * out_row).enumerate().try_for_each(|(b, out_band)| {
            let (c0, width) = (b * band, out_band.len() / out_row);
            let src_off = c0 / block_len * block_bytes;
            let src_len = width / block_len * block_bytes;
            // Source rows are taken 16 at a time, so that each tile row receives 16 adjacent
            // values (a cache line) per group rather than one value per source row.
            const GROUP_ROWS: usize = 16;
            let mut pieces = vec![0.0f32; GROUP_ROWS * width];
            // tile[k * rows + r] = w[r][c0 + k]: output row c0 + k is tile row k.
            let mut tile = vec![0.0f32; width * rows];
            for r0 in (0..rows).step_by(GROUP_ROWS) {
                let n = GROUP_ROWS.min(rows - r0);
                for (j, piece) in pieces.chunks_exact_mut(width).take(n).enumerate() {
                    let start = (r0 + j) * src_row + src_off;
                    quant::dequantize(w.ty, &src[start..start + src_len], piece).map_err(source_error)?;
                }
                for k in 0..width {
                    for (j, t) in tile[k * rows + r0..k * rows + r0 + n].iter_mut().enumerate() {
                        *t = pieces[j * width + k];
                    }
                }
            }
            for (values, dst) in tile.chunks_exact(rows).zip(out_band.chunks_exact_mut(out_row)) {
                encode_row(ty, values, dst);
            }
            Ok(())
        })?;
    }
    Ok(Matrix::from_raw(&format!("{}_t", w.name), cols, rows, ty, &bytes))
}

/// Stores one row of values as `ty` (F32, F16, or Q8_0 with ggml's reference rounding, as a
/// quantised weight file would hold it).
fn encode_row(ty: GgmlType, values: &[f32], dst: &mut [u8]) {
    match ty {
        GgmlType::F32 => {
            for (d, v) in dst.chunks_exact_mut(4).zip(values) {
                d.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (d, &v) in dst.chunks_exact_mut(2).zip(values) {
                d.copy_from_slice(&f16::from_f32(v).to_le_bytes());
            }
        }
        GgmlType::Q8_0 => dst.copy_from_slice(bytemuck::cast_slice(&quant::quantize_q8_0(values))),
        // PowerInfer's Q4_0 models keep down_t in Q4_0 (`ember convert --down-t-type q4_0`).
        GgmlType::Q4_0 => dst.copy_from_slice(bytemuck::cast_slice(&quant::quantize_q4_0(values))),
        other => unreachable!("transpose_matrix refuses {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Sums of rows (the sparse down projection)
// ---------------------------------------------------------------------------------------------

/// Rows fused into one pass over the accumulator. Every element still gets the rows'
/// multiply-adds one after another in list order, so the result is that of one row at a time;
/// fusing only saves loading and storing the accumulator between rows, which otherwise
/// costs more than the multiply-adds.
const GROUP: usize = 4;

/// The instruction sets of the row AXPY kernels; every one gives the scalar [`reference`]'s
/// results bit for bit (each element gets the same fused multiply-adds in the same order,
/// only more elements at a time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AxpyIsa {
    /// AVX-512 F (16 elements per instruction).
    Avx512,
    /// AVX2 + FMA + F16C (8 elements).
    Avx2,
    /// The portable scalar code.
    Scalar,
}

impl AxpyIsa {
    /// The widest kernels this CPU runs, chosen once.
    pub fn detect() -> AxpyIsa {
        static ISA: std::sync::OnceLock<AxpyIsa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| [AxpyIsa::Avx512, AxpyIsa::Avx2].into_iter().find(|i| i.available()).unwrap_or(AxpyIsa::Scalar))
    }

    /// Whether this CPU runs kernels written for `self` (tests try every one).
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            AxpyIsa::Avx512 => x86::has_avx2() && is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            AxpyIsa::Avx2 => x86::has_avx2(),
            AxpyIsa::Scalar => true,
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// `acc += h * row` for one row of type `ty` (F32, F16, Q8_0, Q4_0 or Q4_1; `row` its bytes)
/// with the kernels of `isa`: what the public `axpy_row_*` functions do with the detected one.
///
/// # Panics
/// If `isa` is not available, the type has no row AXPY, or the row is not as long as `acc`.
pub fn axpy_row_on(isa: AxpyIsa, ty: GgmlType, row: &[u8], h: f32, acc: &mut [f32]) {
    assert!(isa.available(), "{isa:?} AXPY kernels on a CPU without them");
    let want = ty.bytes_for(acc.len() as u64).filter(|_| acc.len().is_multiple_of(ty.block_len()));
    assert_eq!(want, Some(row.len() as u64), "axpy_row_on: {} bytes of {ty} for {} values", row.len(), acc.len());
    match (isa, ty) {
        #[cfg(target_arch = "x86_64")]
        (AxpyIsa::Avx512, _) => {
            // SAFETY: the features are present (checked above), the row's length matches.
            unsafe {
                match ty {
                    GgmlType::F32 => x512::axpy_f32([bytemuck::cast_slice(row)], [h], acc),
                    GgmlType::F16 => x512::axpy_f16([bytemuck::cast_slice(row)], [h], acc),
                    GgmlType::Q8_0 => x512::axpy_q8_0([bytemuck::cast_slice(row)], [h], acc),
                    GgmlType::Q4_0 => x512::axpy_q4_0([bytemuck::cast_slice(row)], [h], acc),
                    GgmlType::Q4_1 => x512::axpy_q4_1([bytemuck::cast_slice(row)], [h], acc),
                    other => panic!("no row AXPY for {other}"),
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        (AxpyIsa::Avx2, _) => {
            // SAFETY: as above.
            unsafe {
                match ty {
                    GgmlType::F32 => x86::axpy_f32([bytemuck::cast_slice(row)], [h], acc),
                    GgmlType::F16 => x86::axpy_f16([bytemuck::cast_slice(row)], [h], acc),
                    GgmlType::Q8_0 => x86::axpy_q8_0([bytemuck::cast_slice(row)], [h], acc),
                    GgmlType::Q4_0 => x86::axpy_q4_0([bytemuck::cast_slice(row)], [h], acc),
                    GgmlType::Q4_1 => x86::axpy_q4_1([bytemuck::cast_slice(row)], [h], acc),
                    other => panic!("no row AXPY for {other}"),
                }
            }
        }
        _ => match ty {
            GgmlType::F32 => reference::axpy_row_f32(bytemuck::cast_slice(row), h, acc),
            GgmlType::F16 => reference::axpy_row_f16(bytemuck::cast_slice(row), h, acc),
            GgmlType::Q8_0 => reference::axpy_row_q8_0(bytemuck::cast_slice(row), h, acc),
            GgmlType::Q4_0 => reference::axpy_row_q4_0(bytemuck::cast_slice(row), h, acc),
            GgmlType::Q4_1 => reference::axpy_row_q4_1(bytemuck::cast_slice(row), h, acc),
            other => panic!("no row AXPY for {other}"),
        },
    }
}

/// `acc[j] += h * row[j]` for one F32 row, one fused multiply-add per element.
pub fn axpy_row_f32(row: &[f32], h: f32, acc: &mut [f32]) {
    assert_eq!(row.len(), acc.len(), "axpy_row_f32: lengths differ");
    axpy_row_on(AxpyIsa::detect(), GgmlType::F32, bytemuck::cast_slice(row), h, acc)
}

/// `acc[j] += h * row[j]` for one F16 row (the f16 values convert to f32 exactly).
pub fn axpy_row_f16(row: &[f16], h: f32, acc: &mut [f32]) {
    assert_eq!(row.len(), acc.len(), "axpy_row_f16: lengths differ");
    axpy_row_on(AxpyIsa::detect(), GgmlType::F16, bytemuck::cast_slice(row), h, acc)
}

/// `acc += h * row` for one Q8_0 row: `h * d` is formed once per block, then one fused
/// multiply-add per quant.
pub fn axpy_row_q8_0(row: &[BlockQ8_0], h: f32, acc: &mut [f32]) {
    assert_eq!(QK * row.len(), acc.len(), "axpy_row_q8_0: {} blocks for {} values", row.len(), acc.len());
    axpy_row_on(AxpyIsa::detect(), GgmlType::Q8_0, bytemuck::cast_slice(row), h, acc)
}

/// `acc += h * row` for one Q4_0 row, `h * d` once per block as for Q8_0.
pub fn axpy_row_q4_0(row: &[BlockQ4_0], h: f32, acc: &mut [f32]) {
    assert_eq!(QK * row.len(), acc.len(), "axpy_row_q4_0: {} blocks for {} values", row.len(), acc.len());
    axpy_row_on(AxpyIsa::detect(), GgmlType::Q4_0, bytemuck::cast_slice(row), h, acc)
}

/// `acc += h * row` for one Q4_1 row: each weight is dequantised exactly (`q * d + m` has one
/// rounding, like the reference dequantisation) and fused into the sum, because scaling `d` and
/// `m` by `h` first would round twice per element.
pub fn axpy_row_q4_1(row: &[BlockQ4_1], h: f32, acc: &mut [f32]) {
    assert_eq!(QK * row.len(), acc.len(), "axpy_row_q4_1: {} blocks for {} values", row.len(), acc.len());
    axpy_row_on(AxpyIsa::detect(), GgmlType::Q4_1, bytemuck::cast_slice(row), h, acc)
}

/// Rows waiting to be added to an accumulator [`GROUP`] at a time (one pass over it per group),
/// in the order they were pushed.
struct PendingRows {
    rows: [usize; GROUP],
    h: [f32; GROUP],
    filled: usize,
}

impl PendingRows {
    fn new() -> PendingRows {
        PendingRows { rows: [0; GROUP], h: [0.0; GROUP], filled: 0 }
    }

    /// Queues `h * row i`, adding the group once it is full.
    #[inline(always)]
    fn push(&mut self, down: &AxpyRows, i: usize, h: f32, acc: &mut [f32]) {
        (self.rows[self.filled], self.h[self.filled]) = (i, h);
        self.filled += 1;
        if self.filled == GROUP {
            down.add(self.rows, self.h, acc);
            self.filled = 0;
        }
    }

    /// Adds what is still queued, row by row.
    fn flush(&mut self, down: &AxpyRows, acc: &mut [f32]) {
        for k in 0..self.filled {
            down.add([self.rows[k]], [self.h[k]], acc);
        }
        self.filled = 0;
    }
}

/// A `down_t` matrix's rows (or the down rows of a [`NeuronBundle`]), added with the row AXPY
/// of their type.
struct AxpyRows<'a> {
    rows: RowsAt<'a>,
}

impl<'a> AxpyRows<'a> {
    fn new(m: &'a Matrix) -> AxpyRows<'a> {
        Self::at(RowsAt::matrix(m), &m.name)
    }

    fn at(rows: RowsAt<'a>, name: &str) -> AxpyRows<'a> {
        match rows.ty {
            GgmlType::F32 | GgmlType::F16 | GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 => AxpyRows { rows },
            other => panic!("{name}: no row AXPY for {other} (the loader converts such types)"),
        }
    }

    /// `acc += h[k] * row rows[k]` for k = 0, 1, … in that order, with `acc` one row long.
    #[inline]
    fn add<const N: usize>(&self, rows: [usize; N], h: [f32; N], acc: &mut [f32]) {
        let at = &self.rows;
        #[cfg(target_arch = "x86_64")]
        if AxpyIsa::detect() == AxpyIsa::Avx512 {
            // SAFETY: as below, for the AVX-512 kernels.
            unsafe {
                match at.ty {
                    GgmlType::F32 => x512::axpy_f32(rows.map(|i| bytemuck::cast_slice(at.row(i))), h, acc),
                    GgmlType::F16 => x512::axpy_f16(rows.map(|i| bytemuck::cast_slice(at.row(i))), h, acc),
                    GgmlType::Q8_0 => x512::axpy_q8_0(rows.map(|i| bytemuck::cast_slice(at.row(i))), h, acc),
                    GgmlType::Q4_0 => x512::axpy_q4_0(rows.map(|i| bytemuck::cast_slice(at.row(i))), h, acc),
                    GgmlType::Q4_1 => x512::axpy_q4_1(rows.map(|i| bytemuck::cast_slice(at.row(i))), h, acc),
                    _ => unreachable!("checked in AxpyRows::at"),
                }
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if x86::has_avx2() {
            // SAFETY: the CPU supports the features the kernels are compiled for; every row
            // holds exactly the values (blocks) of `acc`, as they require.
            unsafe {
                match at.ty {
                    GgmlType::F32 => x86::axpy_f32(rows.map(|i| bytemuck::cast_slice(at.row(i))), h, acc),
                    GgmlType::F16 => x86::axpy_f16(rows.map(|i| bytemuck::cast_slice(at.row(i))), h, acc),
                    GgmlType::Q8_0 => x86::axpy_q8_0(rows.map(|i| bytemuck::cast_slice(at.row(i))), h, acc),
                    GgmlType::Q4_0 => x86::axpy_q4_0(rows.map(|i| bytemuck::cast_slice(at.row(i))), h, acc),
                    GgmlType::Q4_1 => x86::axpy_q4_1(rows.map(|i| bytemuck::cast_slice(at.row(i))), h, acc),
                    _ => unreachable!("checked in AxpyRows::at"),
                }
            }
            return;
        }
        for (i, h) in rows.into_iter().zip(h) {
            let row = at.row(i);
            match at.ty {
                GgmlType::F32 => reference::axpy_row_f32(bytemuck::cast_slice(row), h, acc),
                GgmlType::F16 => reference::axpy_row_f16(bytemuck::cast_slice(row), h, acc),
                GgmlType::Q8_0 => reference::axpy_row_q8_0(bytemuck::cast_slice(row), h, acc),
                GgmlType::Q4_0 => reference::axpy_row_q4_0(bytemuck::cast_slice(row), h, acc),
                GgmlType::Q4_1 => reference::axpy_row_q4_1(bytemuck::cast_slice(row), h, acc),
                _ => unreachable!("checked in AxpyRows::at"),
            }
        }
    }
}

/// Neurons per AXPY chunk for a list of `n`: a function of `n` alone, which is what makes the
/// sum order, and so the result, independent of the thread count.
pub fn axpy_chunk_len(n: usize) -> usize {
    n.div_ceil(MAX_AXPY_CHUNKS).max(MIN_AXPY_CHUNK)
}

/// `out` (length `down_t.cols`) is overwritten with `Σ h[i] · row i of down_t` over the `i` in
/// `active` with `h[i] != 0` (neurons listed with a zero are skipped unread): the down
/// projection of the active neurons. `h` holds one value per neuron (`down_t.rows`).
///
/// The list is cut into chunks of [`axpy_chunk_len`]`(active.len())` neurons; each chunk sums
/// its rows in list order into its own f32 buffer (one fused multiply-add per element and row),
/// and the buffers are added in chunk order. The result depends on the list and the values
/// only, never on the number of threads. An empty list gives zeros.
///
/// # Panics
/// If `h` is not `down_t.rows` long, `out` not `down_t.cols`, an index is out of range, or
/// `down_t` is not F32, F16, Q8_0, Q4_0 or Q4_1.
pub fn axpy_rows(down_t: &Matrix, h: &[f32], active: &[u32], out: &mut [f32]) {
    sum_rows(down_t, h, active, out, false)
}

/// As [`axpy_rows`], but adds to `out`: `out = ((out + c0) + c1) + …` over the chunk sums
/// `c0, c1, …` of [`axpy_rows`], which is what a hybrid step needs to add the CPU's neurons to
/// another part of the projection. With `out` zero it gives exactly [`axpy_rows`]'s result.
pub fn axpy_rows_into(down_t: &Matrix, h: &[f32], active: &[u32], out: &mut [f32]) {
    sum_rows(down_t, h, active, out, true)
}

fn sum_rows(down_t: &Matrix, h: &[f32], active: &[u32], out: &mut [f32], add: bool) {
    let (n_neurons, cols) = (down_t.rows, down_t.cols);
    assert_eq!(h.len(), n_neurons, "{}: {} activations for {} neurons", down_t.name, h.len(), n_neurons);
    assert_eq!(out.len(), cols, "{}: output of {} values for {} columns", down_t.name, out.len(), cols);
    if let Some(&bad) = active.iter().find(|&&i| i as usize >= n_neurons) {
        panic!("{}: neuron {bad} listed, the matrix has {n_neurons}", down_t.name);
    }
    if !add {
        out.fill(0.0);
    }
    if active.is_empty() || cols == 0 {
        return;
    }
    let rows = AxpyRows::new(down_t);
    let (bytes, rb) = (down_t.bytes(), down_t.row_bytes());
    // At least a group ahead, since rows are read a group at a time.
    let ahead = rows_ahead(rb, GROUP);
    // Sums the rows of `active[start..start + len]` into `acc`, in list order.
    let sum_chunk = |start: usize, len: usize, acc: &mut [f32]| {
        let mut pending = PendingRows::new();
        for k in start..start + len {
            if let Some(&next) = active.get(k + ahead) {
                if h[next as usize] != 0.0 {
                    prefetch(&bytes[next as usize * rb..(next as usize + 1) * rb]);
                }
            }
            let i = active[k] as usize;
            if h[i] == 0.0 {
                continue;
            }
            pending.push(&rows, i, h[i], acc);
        }
        pending.flush(&rows, acc);
    };
    let chunk_len = axpy_chunk_len(active.len());
    if chunk_len >= active.len() && !add {
        // One chunk summed straight into the zeroed output: the same operations as summing
        // into a fresh buffer and copying it.
        return sum_chunk(0, active.len(), out);
    }
    let new_partial = |chunk: usize| {
        let mut acc = vec![0.0f32; cols];
        let start = chunk * chunk_len;
        sum_chunk(start, chunk_len.min(active.len() - start), &mut acc);
        acc
    };
    let n_chunks = active.len().div_ceil(chunk_len);
    let parallel = active.len() * rb >= 2 * MIN_TASK_BYTES;
    let partials: Vec<Vec<f32>> = match parallel {
        true => (0..n_chunks).into_par_iter().map(new_partial).collect(),
        false => (0..n_chunks).map(new_partial).collect(),
    };
    // Adding the partials in chunk order, element by element; splitting the columns over
    // tasks does not change any element's order of additions.
    const REDUCE_COLS: usize = 1024;
    let add_partials = |(block, o): (usize, &mut [f32])| {
        let cols = block * REDUCE_COLS..block * REDUCE_COLS + o.len();
        let mut first = 0;
        if !add {
            o.copy_from_slice(&partials[0][cols.clone()]);
            first = 1;
        }
        for p in &partials[first..] {
            for (a, &b) in o.iter_mut().zip(&p[cols.clone()]) {
                *a += b;
            }
        }
    };
    if parallel && cols * partials.len() >= 16 * REDUCE_COLS {
        out.par_chunks_mut(REDUCE_COLS).enumerate().for_each(add_partials);
    } else {
        out.chunks_mut(REDUCE_COLS).enumerate().for_each(add_partials);
    }
}

// ---------------------------------------------------------------------------------------------
// The whole gated FFN over a neuron list, fused
// ---------------------------------------------------------------------------------------------

/// The FFN output of the neurons in `active` (ascending or not, no repeats) in one parallel
/// pass: for each neuron i, `g = gate_given[i]` (already computed, e.g. by a dense gate for the
/// ReLU criterion) or `dot(gate row i, x)`, `u = dot(up row i, x)`, `h = act(g) * u`, and
/// `out += h * row i of down_t`; `out` is overwritten.
///
/// The same numbers as [`matvec_rows_pair`] (or [`matvec_rows`]), the activation, and
/// [`axpy_rows`] in turn, bit for bit: the dots are the same kernels, and the sum follows
/// [`axpy_rows`]'s chunks (a function of the list length) and order. Fusing them means one
/// parallel region per layer instead of three, and each neuron's three rows are read together
/// while its values are in registers.
#[allow(clippy::too_many_arguments)]
pub fn gated_ffn_rows(gate: &Matrix, up: &Matrix, down_t: &Matrix, acts: &Activations, act: crate::model::Activation, gate_given: Option<&[f32]>, active: &[u32], out: &mut [f32]) {
    let cols = down_t.cols;
    assert_eq!(out.len(), cols, "{}: output of {} values for {} columns", down_t.name, out.len(), cols);
    out.fill(0.0);
    if active.is_empty() || cols == 0 {
        return;
    }
    let task_bytes = down_t.row_bytes() + 2 * up.row_bytes();
    gated_ffn_chunks(gate, up, down_t, acts, act, gate_given, active, None, |sum_chunk| {
        let chunk_len = axpy_chunk_len(active.len());
        if chunk_len >= active.len() {
            return sum_chunk(0, active.len(), out);
        }
        let n_chunks = active.len().div_ceil(chunk_len);
        let new_partial = |chunk: usize| {
            let mut acc = vec![0.0f32; cols];
            let start = chunk * chunk_len;
            sum_chunk(start, chunk_len.min(active.len() - start), &mut acc);
            acc
        };
        let partials: Vec<Vec<f32>> = if active.len() * task_bytes >= 2 * MIN_TASK_BYTES {
            (0..n_chunks).into_par_iter().map(new_partial).collect()
        } else {
            (0..n_chunks).map(new_partial).collect()
        };
        out.copy_from_slice(&partials[0]);
        for p in &partials[1..] {
            for (a, &b) in out.iter_mut().zip(p) {
                *a += b;
            }
        }
    })
}

/// The chunk kernel of [`gated_ffn_chunks`]: `sum_chunk(start, len, acc)` adds into `acc`
/// (n_embd values) the FFN output of the neurons `active[start..start + len]`, in list order.
pub type ChunkSum<'a> = dyn Fn(usize, usize, &mut [f32]) + Sync + 'a;

/// Calls `with` with the chunk kernel of [`gated_ffn_rows`] for this layer and token (the
/// token converted once, the dot kernels chosen once), for callers that schedule the chunks
/// themselves, such as the hybrid executor's worker team. Summing chunks of
/// [`axpy_chunk_len`] in order reproduces [`gated_ffn_rows`] bit for bit.
///
/// With `fires` (one flag per entry of `active`), every listed neuron's gate row is read but
/// only the flagged ones go on to their up and down rows: the cost of a predictor's
/// candidates of which only some fire (a simulated predictor names which). Without it every
/// listed neuron is computed.
///
/// # Panics
/// As [`gated_ffn_rows`].
#[allow(clippy::too_many_arguments)]
pub fn gated_ffn_chunks<R>(
    gate: &Matrix,
    up: &Matrix,
    down_t: &Matrix,
    acts: &Activations,
    act: crate::model::Activation,
    gate_given: Option<&[f32]>,
    active: &[u32],
    fires: Option<&[bool]>,
    with: impl FnOnce(&ChunkSum<'_>) -> R,
) -> R {
    if let Some(f) = fires {
        assert_eq!(f.len(), active.len(), "firing flags: {} for {} listed neurons", f.len(), active.len());
    }
    let n_neurons = down_t.rows;
    assert_eq!(up.rows, n_neurons, "{}: {} rows for {} neurons", up.name, up.rows, n_neurons);
    assert_eq!(acts.n_tokens, 1, "{}: row products take one token, not {}", up.name, acts.n_tokens);
    assert_eq!(acts.cols, up.cols, "{}: activation width {} vs matrix columns {}", up.name, acts.cols, up.cols);
    if let Some(&bad) = active.iter().find(|&&i| i as usize >= n_neurons) {
        panic!("{}: neuron {bad} listed, the FFN has {n_neurons}", down_t.name);
    }
    if let Some(g) = gate_given {
        assert_eq!(g.len(), n_neurons, "gate values: {} for {} neurons", g.len(), n_neurons);
    } else {
        assert_eq!((gate.rows, gate.cols), (up.rows, up.cols), "{}: shape differs from {}", gate.name, up.name);
    }
    let gate_dots = gate_given.is_none().then(|| RowDots::new(gate, &TokenForm::new(gate.ty, acts)));
    let up_dots = RowDots::new(up, &TokenForm::new(up.ty, acts));
    let scratch_len = up_dots.scratch_len().max(gate_dots.as_ref().map_or(0, |d| d.scratch_len()));
    let rows = AxpyRows::new(down_t);
    let (down_bytes, drb) = (down_t.bytes(), down_t.row_bytes());
    let (up_bytes, urb) = (up.bytes(), up.row_bytes());
    let (gate_bytes, grb) = (gate.bytes(), gate.row_bytes());
    // Gate rows are read four at a time (`dot4`), hence the four more.
    let gate_ahead = 4 + GATHER_PREFETCH_DISTANCE / grb.max(1);
    let ahead = (GATHER_PREFETCH_DISTANCE / (drb + urb).max(1)).clamp(2, 32);
    let sum_chunk = |start: usize, len: usize, acc: &mut [f32]| {
        assert_eq!(acc.len(), down_t.cols, "{}: output of {} values for {} columns", down_t.name, acc.len(), down_t.cols);
        let mut scratch = vec![0.0f32; scratch_len];
        let mut pending = PendingRows::new();
        // Gate values of the next four neurons, computed together (`RowDots::dot4`: the same
        // values as one at a time).
        let mut gates = [0.0f32; 4];
        for k in start..start + len {
            if let (Some(&next), None) = (active.get(k + gate_ahead), gate_given) {
                let n = next as usize;
                prefetch_l2(&gate_bytes[n * grb..(n + 1) * grb]);
            }
            if let Some(&next) = active.get(k + ahead) {
                let n = next as usize;
                if fires.is_none_or(|f| f[k + ahead]) {
                    prefetch_l2(&up_bytes[n * urb..(n + 1) * urb]);
                    prefetch_l2(&down_bytes[n * drb..(n + 1) * drb]);
                }
            }
            let i = active[k] as usize;
            let g = match (gate_given, &gate_dots) {
                (Some(v), _) => v[i],
                (None, Some(d)) => {
                    let j = (k - start) % 4;
                    if j == 0 && k + 4 <= start + len {
                        gates = d.dot4(std::array::from_fn(|m| active[k + m] as usize), &mut scratch);
                    } else if j == 0 {
                        // The chunk's last neurons, fewer than four.
                        for (m, g) in gates.iter_mut().enumerate().take(start + len - k) {
                            *g = d.dot(active[k + m] as usize, &mut scratch);
                        }
                    }
                    gates[j]
                }
                (None, None) => unreachable!("gate dots exist without given values"),
            };
            if fires.is_some_and(|f| !f[k]) {
                // The gate row was read; a candidate that does not fire stops here.
                std::hint::black_box(g);
                continue;
            }
            let h = super::ops::gated(act, g, up_dots.dot(i, &mut scratch));
            if h == 0.0 {
                continue;
            }
            pending.push(&rows, i, h, acc);
        }
        pending.flush(&rows, acc);
    };
    with(&sum_chunk)
}


// ---------------------------------------------------------------------------------------------
// Neuron bundles, and the whole FFN over fixed neuron ranges
// ---------------------------------------------------------------------------------------------

/// A cache line; bundles are made of them so that every neuron starts on a line of its own.
#[repr(C, align(64))]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Line([u8; 64]);

/// One layer's up rows and `down_t` rows stored neuron by neuron: neuron i's up row followed
/// by its down row, in whole cache lines of their own. A neuron that fires then costs one
/// contiguous read instead of two scattered ones (measured on the 2-core development machine,
/// SmolLM2-135M-ReLU, one thread: 0.75 vs 1.05 ms per token for the up and down work of the
/// active neurons).
pub struct NeuronBundle {
    lines: Vec<Line>,
    n_neurons: usize,
    /// Bytes from one neuron to the next.
    stride: usize,
    up: (GgmlType, usize, usize),
    down: (GgmlType, usize, usize),
}

impl NeuronBundle {
    /// Bundles `up` (n_ff rows of n_embd) with `down_t` (n_ff rows of n_embd).
    ///
    /// # Panics
    /// If the shapes differ or a type has no row kernel.
    pub fn new(up: &Matrix, down_t: &Matrix) -> NeuronBundle {
        assert_eq!((up.rows, up.cols), (down_t.rows, down_t.cols), "{} and {} are not one FFN's neurons", up.name, down_t.name);
        let (urb, drb) = (up.row_bytes(), down_t.row_bytes());
        let stride = (urb + drb).next_multiple_of(64);
        let mut lines = vec![Line([0; 64]); up.rows * stride / 64];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut lines);
        for (i, dst) in bytes.chunks_exact_mut(stride).enumerate() {
            dst[..urb].copy_from_slice(&up.bytes()[i * urb..(i + 1) * urb]);
            dst[urb..urb + drb].copy_from_slice(&down_t.bytes()[i * drb..(i + 1) * drb]);
        }
        let bundle = NeuronBundle { lines, n_neurons: up.rows, stride, up: (up.ty, up.cols, urb), down: (down_t.ty, down_t.cols, drb) };
        // Refuse types without kernels now rather than in the middle of a token.
        AxpyRows::at(bundle.down_rows(), &down_t.name);
        bundle
    }

    pub fn n_neurons(&self) -> usize {
        self.n_neurons
    }

    /// Bytes held (padding included).
    pub fn n_bytes(&self) -> usize {
        self.lines.len() * 64
    }

    fn up_rows(&self) -> RowsAt<'_> {
        let (ty, cols, row_bytes) = self.up;
        RowsAt { bytes: bytemuck::cast_slice(&self.lines), ty, cols, stride: self.stride, offset: 0, row_bytes }
    }

    fn down_rows(&self) -> RowsAt<'_> {
        let (ty, cols, row_bytes) = self.down;
        RowsAt { bytes: bytemuck::cast_slice(&self.lines), ty, cols, stride: self.stride, offset: self.up.2, row_bytes }
    }

    /// Neuron i's up and down rows together.
    #[inline(always)]
    fn neuron(&self, i: usize) -> &[u8] {
        &bytemuck::cast_slice(&self.lines)[i * self.stride..][..self.up.2 + self.down.2]
    }
}

/// Bytes between the row (or bundle) being read and the one being prefetched in
/// [`ffn_over_ranges`]: measured on the 2-core development machine, prefetching 8 bundles of
/// 1280 bytes ahead was 30% faster than 2 and as fast as 16.
const BUNDLE_PREFETCH_DISTANCE: usize = 12 * 1024;

/// Neurons per range of [`ffn_over_ranges`] for an FFN of `n_ff` neurons: a function of `n_ff`
/// alone, which fixes the order of the sum whatever the thread count. At most 16 ranges (each
/// costs an output-sized partial sum and its addition), of at least 384 neurons: every range
/// starts its gate stream and its prefetches afresh, and on SmolLM2-135M (1536 neurons, 2
/// threads) 4 ranges were 5-10% faster than 6 and 12.
pub fn neuron_range_len(n_ff: usize) -> usize {
    n_ff.div_ceil(16).max(384)
}

/// Neurons [`ffn_over_ranges`] went through for one token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeCounts {
    /// Neurons whose gate was computed.
    pub gated: usize,
    /// Neurons kept after their gate: their up row was read, and their down row unless
    /// `act(g)·u` came out zero.
    pub active: usize,
}

/// A range's candidate neurons, and the kept ones with their gate values.
type RangeLists = (Vec<u32>, Vec<(u32, f32)>);

thread_local! {
    /// A task's lists, reused from token to token. Nothing inside a range task calls back into
    /// rayon, so a thread never holds two of them at once.
    static RANGE_SCRATCH: std::cell::RefCell<RangeLists> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// One token's gated FFN `Σ act(g_i)·u_i·down_t[i]`, computed range by range of neurons in
/// one parallel region, `out` (n_embd) overwritten. Per range of [`neuron_range_len`]
/// neurons:
///
/// 1. `candidates(range, list)` appends the neurons of the range (ascending) whose gate is worth
///    computing: all of them for `--ffn relu`, the predicted ones for `--ffn predict`;
/// 2. `g_i = gate row i · x` for each candidate (the dense matmul's value, bit for bit), and
///    the neuron is kept when `keep(g_i)`: for ReLU, `g_i > 0`, so a predicted neuron whose
///    gate is negative costs one row, not three;
/// 3. for each kept neuron, `u_i = up row i · x` and `h_i = act(g_i)·u_i`; when `h_i != 0`,
///    `h_i·down_t[i]` is added to the range's partial sum, neurons in ascending order (rows
///    fused four at a time as in [`axpy_rows`], which keeps that order).
///
/// `out` is then the first range's partial plus the others', in range order. The ranges and
/// the order depend on `n_ff` only, so the result is the same for any thread count.
///
/// Compared with a dense gate followed by [`gated_ffn_rows`] this is one parallel region per
/// layer instead of two, with no list of the whole layer built in between, and each neuron's up
/// and down rows are one read from the bundle.
///
/// # Panics
/// If `acts` holds other than one token of the FFN's width, `out` is not that wide, the
/// matrices do not match, or `candidates` lists a neuron outside its range.
#[allow(clippy::too_many_arguments)]
pub fn ffn_over_ranges(
    gate: &Matrix,
    bundle: &NeuronBundle,
    acts: &Activations,
    act: crate::model::Activation,
    candidates: impl Fn(std::ops::Range<usize>, &mut Vec<u32>) + Sync,
    keep: impl Fn(f32) -> bool + Sync,
    out: &mut [f32],
) -> RangeCounts {
    let (n_ff, cols) = (bundle.n_neurons, bundle.down.1);
    assert_eq!((gate.rows, gate.cols), (n_ff, bundle.up.1), "{}: not the bundle's FFN", gate.name);
    assert_eq!(acts.n_tokens, 1, "{}: the ranged FFN takes one token, not {}", gate.name, acts.n_tokens);
    assert_eq!(acts.cols, gate.cols, "{}: activation width {} vs matrix columns {}", gate.name, acts.cols, gate.cols);
    assert_eq!(out.len(), cols, "{}: output of {} values for {} columns", gate.name, out.len(), cols);
    if n_ff == 0 || cols == 0 {
        out.fill(0.0);
        return RangeCounts::default();
    }
    let gate_dots = RowDots::new(gate, &TokenForm::new(gate.ty, acts));
    let up_dots = RowDots::at(bundle.up_rows(), &TokenForm::new(bundle.up.0, acts), &gate.name);
    let down = AxpyRows::at(bundle.down_rows(), &gate.name);
    let scratch_len = gate_dots.scratch_len().max(up_dots.scratch_len());
    // Predicted candidates leave gaps that the hardware prefetcher does not follow: measured on
    // SmolLM2-135M at 75% predicted, 20 rows ahead took 6% less time than 6, and no
    // prefetch at all 40% more.
    let gate_ahead = (BUNDLE_PREFETCH_DISTANCE / gate.row_bytes().max(1)).clamp(2, 32);
    let bundle_ahead = (BUNDLE_PREFETCH_DISTANCE / bundle.stride).clamp(2, 16);
    let range_len = neuron_range_len(n_ff);
    let n_ranges = n_ff.div_ceil(range_len);

    // Sums range r into `acc` (zeroed), returning its counts.
    let sum_range = |r: usize, acc: &mut [f32]| -> RangeCounts {
        RANGE_SCRATCH.with_borrow_mut(|(cand, kept)| {
            let range = r * range_len..((r + 1) * range_len).min(n_ff);
            cand.clear();
            kept.clear();
            candidates(range.clone(), cand);
            if let Some(&bad) = cand.iter().find(|&&i| !range.contains(&(i as usize))) {
                panic!("{}: candidate neuron {bad} outside its range {range:?}", gate.name);
            }
            let mut scratch = vec![0.0f32; scratch_len];
            for k in 0..cand.len() {
                if let Some(next) = row_to_prefetch(cand, k, gate_ahead) {
                    gate_dots.rows().prefetch(next);
                }
                let g = gate_dots.dot(cand[k] as usize, &mut scratch);
                if keep(g) {
                    // Its rows are needed once the gate pass is over: start loading them now,
                    // into the second-level cache (a range's kept rows outgrow the first).
                    prefetch_l2(bundle.neuron(cand[k] as usize));
                    kept.push((cand[k], g));
                }
            }
            let mut pending = PendingRows::new();
            for k in 0..kept.len() {
                if let Some(&(next, _)) = kept.get(k + bundle_ahead) {
                    prefetch(bundle.neuron(next as usize));
                }
                let (i, g) = (kept[k].0 as usize, kept[k].1);
                let h = super::ops::gated(act, g, up_dots.dot(i, &mut scratch));
                if h == 0.0 {
                    continue;
                }
                pending.push(&down, i, h, acc);
            }
            pending.flush(&down, acc);
            RangeCounts { gated: cand.len(), active: kept.len() }
        })
    };
    let add = |a: RangeCounts, b: RangeCounts| RangeCounts { gated: a.gated + b.gated, active: a.active + b.active };
    if n_ranges == 1 {
        out.fill(0.0);
        return sum_range(0, out);
    }
    let mut partials = vec![0.0f32; n_ranges * cols];
    let counts = partials.par_chunks_mut(cols).enumerate().map(|(r, acc)| sum_range(r, acc)).reduce(RangeCounts::default, add);
    out.copy_from_slice(&partials[..cols]);
    for p in partials[cols..].chunks_exact(cols) {
        for (a, &b) in out.iter_mut().zip(p) {
            *a += b;
        }
    }
    counts
}

/// Portable scalar twins of the row AXPY kernels: the same float operations in the same order,
/// so the SIMD kernels must match them bit for bit.
pub mod reference {
    use super::{f16, BlockQ4_0, BlockQ4_1, BlockQ8_0};

    /// Value of element `e` (0..32) of a 4-bit block: low nibbles first, then high nibbles.
    #[inline(always)]
    fn nibble(qs: &[u8; 16], e: usize) -> u8 {
        if e < 16 {
            qs[e] & 0x0F
        } else {
            qs[e - 16] >> 4
        }
    }

    pub fn axpy_row_f32(row: &[f32], h: f32, acc: &mut [f32]) {
        for (a, &w) in acc.iter_mut().zip(row) {
            *a = h.mul_add(w, *a);
        }
    }

    pub fn axpy_row_f16(row: &[f16], h: f32, acc: &mut [f32]) {
        for (a, &w) in acc.iter_mut().zip(row) {
            *a = h.mul_add(w.to_f32(), *a);
        }
    }

    pub fn axpy_row_q8_0(row: &[BlockQ8_0], h: f32, acc: &mut [f32]) {
        for (block, a) in row.iter().zip(acc.chunks_exact_mut(32)) {
            let s = h * block.d.to_f32();
            for (a, &q) in a.iter_mut().zip(&block.qs) {
                *a = s.mul_add(f32::from(q), *a);
            }
        }
    }

    pub fn axpy_row_q4_0(row: &[BlockQ4_0], h: f32, acc: &mut [f32]) {
        for (block, a) in row.iter().zip(acc.chunks_exact_mut(32)) {
            let s = h * block.d.to_f32();
            for (e, a) in a.iter_mut().enumerate() {
                *a = s.mul_add((i32::from(nibble(&block.qs, e)) - 8) as f32, *a);
            }
        }
    }

    pub fn axpy_row_q4_1(row: &[BlockQ4_1], h: f32, acc: &mut [f32]) {
        for (block, a) in row.iter().zip(acc.chunks_exact_mut(32)) {
            let (d, m) = (block.d.to_f32(), block.m.to_f32());
            for (e, a) in a.iter_mut().enumerate() {
                let w = f32::from(nibble(&block.qs, e)).mul_add(d, m);
                *a = h.mul_add(w, *a);
            }
        }
    }
}

/// AVX2 + FMA + F16C AXPY kernels over `N` rows at once, bit-identical to [`reference`]
/// applied to the rows one after another: every output element gets the same fused
/// multiply-adds in the same order; vectors only process eight elements at a time.
///
/// Callers pass rows of exactly `acc.len()` values (or `acc.len() / 32` blocks).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{f16, BlockQ4_0, BlockQ4_1, BlockQ8_0, QK};
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub(super) fn has_avx2() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
        })
    }

    /// f16 to f32 through F16C (exact), without a call into the half crate per block.
    #[inline(always)]
    unsafe fn half_to_f32(v: f16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(v.to_bits()))))
    }

    /// Eight bytes at `p` widened to i32 lanes, zero- or sign-extended.
    #[inline(always)]
    unsafe fn u8x8(p: *const u8) -> __m256i {
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast()))
    }

    #[inline(always)]
    unsafe fn i8x8(p: *const i8) -> __m256i {
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast()))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn axpy_f32<const N: usize>(rows: [&[f32]; N], h: [f32; N], acc: &mut [f32]) {
        debug_assert!(rows.iter().all(|r| r.len() == acc.len()));
        let n8 = acc.len() / 8 * 8;
        let p = acc.as_mut_ptr();
        let mut hv = [_mm256_setzero_ps(); N];
        for k in 0..N {
            hv[k] = _mm256_set1_ps(h[k]);
        }
        for i in (0..n8).step_by(8) {
            let mut v = _mm256_loadu_ps(p.add(i));
            for k in 0..N {
                v = _mm256_fmadd_ps(hv[k], _mm256_loadu_ps(rows[k].as_ptr().add(i)), v);
            }
            _mm256_storeu_ps(p.add(i), v);
        }
        for k in 0..N {
            super::reference::axpy_row_f32(&rows[k][n8..], h[k], &mut acc[n8..]);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn axpy_f16<const N: usize>(rows: [&[f16]; N], h: [f32; N], acc: &mut [f32]) {
        debug_assert!(rows.iter().all(|r| r.len() == acc.len()));
        let n8 = acc.len() / 8 * 8;
        let p = acc.as_mut_ptr();
        let mut hv = [_mm256_setzero_ps(); N];
        for k in 0..N {
            hv[k] = _mm256_set1_ps(h[k]);
        }
        for i in (0..n8).step_by(8) {
            let mut v = _mm256_loadu_ps(p.add(i));
            for k in 0..N {
                let w = _mm256_cvtph_ps(_mm_loadu_si128(rows[k].as_ptr().add(i).cast()));
                v = _mm256_fmadd_ps(hv[k], w, v);
            }
            _mm256_storeu_ps(p.add(i), v);
        }
        for k in 0..N {
            super::reference::axpy_row_f16(&rows[k][n8..], h[k], &mut acc[n8..]);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn axpy_q8_0<const N: usize>(rows: [&[BlockQ8_0]; N], h: [f32; N], acc: &mut [f32]) {
        debug_assert!(rows.iter().all(|r| QK * r.len() == acc.len()));
        let p = acc.as_mut_ptr();
        for b in 0..acc.len() / QK {
            let mut s = [_mm256_setzero_ps(); N];
            for k in 0..N {
                s[k] = _mm256_set1_ps(h[k] * half_to_f32(rows[k].get_unchecked(b).d));
            }
            for part in 0..4 {
                let a = p.add(QK * b + 8 * part);
                let mut v = _mm256_loadu_ps(a);
                for k in 0..N {
                    let q = i8x8(rows[k].get_unchecked(b).qs.as_ptr().add(8 * part));
                    v = _mm256_fmadd_ps(s[k], _mm256_cvtepi32_ps(q), v);
                }
                _mm256_storeu_ps(a, v);
            }
        }
    }

    /// Q4_0: bytes `8j..8j + 8` of a block hold elements `8j..8j + 8` in their low nibbles and
    /// `16 + 8j..16 + 8j + 8` in their high ones.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn axpy_q4_0<const N: usize>(rows: [&[BlockQ4_0]; N], h: [f32; N], acc: &mut [f32]) {
        debug_assert!(rows.iter().all(|r| QK * r.len() == acc.len()));
        let p = acc.as_mut_ptr();
        let (low4, eight) = (_mm256_set1_epi32(0x0F), _mm256_set1_epi32(8));
        for b in 0..acc.len() / QK {
            let mut s = [_mm256_setzero_ps(); N];
            for k in 0..N {
                s[k] = _mm256_set1_ps(h[k] * half_to_f32(rows[k].get_unchecked(b).d));
            }
            for j in 0..2 {
                let (lo_at, hi_at) = (p.add(QK * b + 8 * j), p.add(QK * b + 16 + 8 * j));
                let (mut lo, mut hi) = (_mm256_loadu_ps(lo_at), _mm256_loadu_ps(hi_at));
                for k in 0..N {
                    let q = u8x8(rows[k].get_unchecked(b).qs.as_ptr().add(8 * j));
                    let ql = _mm256_sub_epi32(_mm256_and_si256(q, low4), eight);
                    let qh = _mm256_sub_epi32(_mm256_srli_epi32::<4>(q), eight);
                    lo = _mm256_fmadd_ps(s[k], _mm256_cvtepi32_ps(ql), lo);
                    hi = _mm256_fmadd_ps(s[k], _mm256_cvtepi32_ps(qh), hi);
                }
                _mm256_storeu_ps(lo_at, lo);
                _mm256_storeu_ps(hi_at, hi);
            }
        }
    }

    /// Q4_1, nibbles as in Q4_0: each weight is `q * d + m` (exact product, one rounding).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn axpy_q4_1<const N: usize>(rows: [&[BlockQ4_1]; N], h: [f32; N], acc: &mut [f32]) {
        debug_assert!(rows.iter().all(|r| QK * r.len() == acc.len()));
        let p = acc.as_mut_ptr();
        let low4 = _mm256_set1_epi32(0x0F);
        let mut hv = [_mm256_setzero_ps(); N];
        for k in 0..N {
            hv[k] = _mm256_set1_ps(h[k]);
        }
        for b in 0..acc.len() / QK {
            let (mut d, mut m) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
            for k in 0..N {
                let block = rows[k].get_unchecked(b);
                d[k] = _mm256_set1_ps(half_to_f32(block.d));
                m[k] = _mm256_set1_ps(half_to_f32(block.m));
            }
            for j in 0..2 {
                let (lo_at, hi_at) = (p.add(QK * b + 8 * j), p.add(QK * b + 16 + 8 * j));
                let (mut lo, mut hi) = (_mm256_loadu_ps(lo_at), _mm256_loadu_ps(hi_at));
                for k in 0..N {
                    let q = u8x8(rows[k].get_unchecked(b).qs.as_ptr().add(8 * j));
                    let wl = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q, low4)), d[k], m[k]);
                    let wh = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(q)), d[k], m[k]);
                    lo = _mm256_fmadd_ps(hv[k], wl, lo);
                    hi = _mm256_fmadd_ps(hv[k], wh, hi);
                }
                _mm256_storeu_ps(lo_at, lo);
                _mm256_storeu_ps(hi_at, hi);
            }
        }
    }
}

/// AVX-512 twins of the [`x86`] AXPY kernels: 16 elements per instruction, the same fused
/// multiply-adds per element in the same order, so bit-identical to [`reference`]. A Q4_0/Q4_1
/// block's 16 quant bytes widen to one register, whose low nibbles are elements 0..16 and high
/// nibbles 16..32.
#[cfg(target_arch = "x86_64")]
mod x512 {
    use super::{f16, BlockQ4_0, BlockQ4_1, BlockQ8_0, QK};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn half_to_f32(v: f16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(v.to_bits()))))
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn axpy_f32<const N: usize>(rows: [&[f32]; N], h: [f32; N], acc: &mut [f32]) {
        debug_assert!(rows.iter().all(|r| r.len() == acc.len()));
        let n16 = acc.len() / 16 * 16;
        let p = acc.as_mut_ptr();
        let hv: [__m512; N] = std::array::from_fn(|k| _mm512_set1_ps(h[k]));
        for i in (0..n16).step_by(16) {
            let mut v = _mm512_loadu_ps(p.add(i));
            for k in 0..N {
                v = _mm512_fmadd_ps(hv[k], _mm512_loadu_ps(rows[k].as_ptr().add(i)), v);
            }
            _mm512_storeu_ps(p.add(i), v);
        }
        for k in 0..N {
            super::reference::axpy_row_f32(&rows[k][n16..], h[k], &mut acc[n16..]);
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn axpy_f16<const N: usize>(rows: [&[f16]; N], h: [f32; N], acc: &mut [f32]) {
        debug_assert!(rows.iter().all(|r| r.len() == acc.len()));
        let n16 = acc.len() / 16 * 16;
        let p = acc.as_mut_ptr();
        let hv: [__m512; N] = std::array::from_fn(|k| _mm512_set1_ps(h[k]));
        for i in (0..n16).step_by(16) {
            let mut v = _mm512_loadu_ps(p.add(i));
            for k in 0..N {
                let w = _mm512_cvtph_ps(_mm256_loadu_si256(rows[k].as_ptr().add(i).cast()));
                v = _mm512_fmadd_ps(hv[k], w, v);
            }
            _mm512_storeu_ps(p.add(i), v);
        }
        for k in 0..N {
            super::reference::axpy_row_f16(&rows[k][n16..], h[k], &mut acc[n16..]);
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn axpy_q8_0<const N: usize>(rows: [&[BlockQ8_0]; N], h: [f32; N], acc: &mut [f32]) {
        debug_assert!(rows.iter().all(|r| QK * r.len() == acc.len()));
        let p = acc.as_mut_ptr();
        for b in 0..acc.len() / QK {
            let s: [__m512; N] = std::array::from_fn(|k| _mm512_set1_ps(h[k] * half_to_f32(rows[k].get_unchecked(b).d)));
            for half in 0..2 {
                let a = p.add(QK * b + 16 * half);
                let mut v = _mm512_loadu_ps(a);
                for k in 0..N {
                    let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(rows[k].get_unchecked(b).qs.as_ptr().add(16 * half).cast()));
                    v = _mm512_fmadd_ps(s[k], _mm512_cvtepi32_ps(q), v);
                }
                _mm512_storeu_ps(a, v);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn axpy_q4_0<const N: usize>(rows: [&[BlockQ4_0]; N], h: [f32; N], acc: &mut [f32]) {
        debug_assert!(rows.iter().all(|r| QK * r.len() == acc.len()));
        let p = acc.as_mut_ptr();
        let (low4, eight) = (_mm512_set1_epi32(0x0F), _mm512_set1_epi32(8));
        for b in 0..acc.len() / QK {
            let s: [__m512; N] = std::array::from_fn(|k| _mm512_set1_ps(h[k] * half_to_f32(rows[k].get_unchecked(b).d)));
            let (lo_at, hi_at) = (p.add(QK * b), p.add(QK * b + 16));
            let (mut lo, mut hi) = (_mm512_loadu_ps(lo_at), _mm512_loadu_ps(hi_at));
            for k in 0..N {
                let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(rows[k].get_unchecked(b).qs.as_ptr().cast()));
                let ql = _mm512_sub_epi32(_mm512_and_si512(q, low4), eight);
                let qh = _mm512_sub_epi32(_mm512_srli_epi32::<4>(q), eight);
                lo = _mm512_fmadd_ps(s[k], _mm512_cvtepi32_ps(ql), lo);
                hi = _mm512_fmadd_ps(s[k], _mm512_cvtepi32_ps(qh), hi);
            }
            _mm512_storeu_ps(lo_at, lo);
            _mm512_storeu_ps(hi_at, hi);
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn axpy_q4_1<const N: usize>(rows: [&[BlockQ4_1]; N], h: [f32; N], acc: &mut [f32]) {
        debug_assert!(rows.iter().all(|r| QK * r.len() == acc.len()));
        let p = acc.as_mut_ptr();
        let low4 = _mm512_set1_epi32(0x0F);
        let hv: [__m512; N] = std::array::from_fn(|k| _mm512_set1_ps(h[k]));
        for b in 0..acc.len() / QK {
            let (lo_at, hi_at) = (p.add(QK * b), p.add(QK * b + 16));
            let (mut lo, mut hi) = (_mm512_loadu_ps(lo_at), _mm512_loadu_ps(hi_at));
            for k in 0..N {
                let block = rows[k].get_unchecked(b);
                let (d, m) = (_mm512_set1_ps(half_to_f32(block.d)), _mm512_set1_ps(half_to_f32(block.m)));
                let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(block.qs.as_ptr().cast()));
                let wl = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, low4)), d, m);
                let wh = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(q)), d, m);
                lo = _mm512_fmadd_ps(hv[k], wl, lo);
                hi = _mm512_fmadd_ps(hv[k], wh, hi);
            }
            _mm512_storeu_ps(lo_at, lo);
            _mm512_storeu_ps(hi_at, hi);
        }
    }
}
