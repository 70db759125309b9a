//! Matrix products `out[t][r] = W[r] · x[t]` over rayon, for decode (one token) and batched
//! prefill (many tokens share each weight row while it is in cache).

use crate::gguf::GgmlType;
use crate::model::Matrix;
use crate::quant::packed::{ActScales, Isa, PackedActs, PackedMatrix};
use crate::quant::{self, f16, BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Activation rows (`n_tokens` x `cols`) and, computed once on first use, their conversions
/// to the format each weight type multiplies with (Q8_0 for Q4_0/Q8_0, Q8_1 for Q4_1, f16 for
/// F16), so q/k/v or gate/up reuse one quantisation.
pub struct Activations<'a> {
    pub x: &'a [f32],
    pub n_tokens: usize,
    pub cols: usize,
    pub precision: Precision,
    q8_0: OnceLock<Vec<BlockQ8_0>>,
    q8_1: OnceLock<Vec<BlockQ8_1>>,
    half: OnceLock<Vec<f16>>,
    q8_0_scales: OnceLock<ActScales>,
    q8_1_scales: OnceLock<ActScales>,
}

impl<'a> Activations<'a> {
    pub fn new(x: &'a [f32], n_tokens: usize) -> Self {
        assert!(n_tokens > 0 && x.len().is_multiple_of(n_tokens));
        Activations { x, n_tokens, cols: x.len() / n_tokens, precision: Precision::Llama, q8_0: OnceLock::new(), q8_1: OnceLock::new(), half: OnceLock::new(), q8_0_scales: OnceLock::new(), q8_1_scales: OnceLock::new() }
    }

    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// The token(s) quantised to Q8_0, once (also read by the sparse row products).
    pub(crate) fn q8_0(&self) -> &[BlockQ8_0] {
        self.q8_0.get_or_init(|| {
            let mut y = vec![BlockQ8_0 { d: f16::ZERO, qs: [0; 32] }; self.x.len() / 32];
            quant::quantize_row_q8_0(self.x, &mut y);
            y
        })
    }

    pub(crate) fn q8_1(&self) -> &[BlockQ8_1] {
        self.q8_1.get_or_init(|| {
            let mut y = vec![BlockQ8_1 { d: f16::ZERO, s: f16::ZERO, qs: [0; 32] }; self.x.len() / 32];
            quant::quantize_row_q8_1(self.x, &mut y);
            y
        })
    }

    /// The activations as the packed kernels of `w`'s type read them.
    fn packed_for(&self, ty: GgmlType) -> PackedActs<'_> {
        if ty == GgmlType::Q4_1 {
            let y = self.q8_1();
            PackedActs::q8_1(y, self.q8_1_scales.get_or_init(|| ActScales::from_q8_1(y, self.cols)), self.n_tokens)
        } else {
            let y = self.q8_0();
            PackedActs::q8_0(y, self.q8_0_scales.get_or_init(|| ActScales::from_q8_0(y, self.cols)), self.n_tokens)
        }
    }

    pub(crate) fn half(&self) -> &[f16] {
        self.half.get_or_init(|| self.x.iter().map(|&v| f16::from_f32(v)).collect())
    }
}

/// How activations meet quantised weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// Activations are quantised to 8 bits (Q8_0/Q8_1) or rounded to f16 to match the weight
    /// type, and dot products run on integers: llama.cpp's CPU numerics, bit for bit, and fast.
    #[default]
    Llama,
    /// Weights are dequantised and multiplied with f32 activations: slower, closer to the
    /// unquantised model (what fp32 reference implementations compute).
    F32,
}

/// Raw pointer to the output, shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Going through a method makes closures capture the whole (Send) wrapper rather than
    /// its raw-pointer field.
    fn at(self, i: usize) -> *mut f32 {
        // SAFETY: callers index inside the output slice the pointer came from.
        unsafe { self.0.add(i) }
    }
}

/// Rows per task: small enough for every thread to get several tasks (load balance), large
/// enough to amortise scheduling.
fn rows_per_task(rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    (rows / (threads * 8)).clamp(8, 256)
}

/// `out[t * w.rows + r] = dot(w row r, x row t)` for every token t and row r.
pub fn matmul(w: &Matrix, x: &Activations, out: &mut [f32]) {
    assert_eq!(x.cols, w.cols, "{}: activation width {} vs matrix columns {}", w.name, x.cols, w.cols);
    assert_eq!(out.len(), x.n_tokens * w.rows);
    if x.precision == Precision::F32 && w.ty != GgmlType::F32 {
        return run_dequantised(w, x, out);
    }
    if let (Some(isa), Some(p)) = (Isa::detect(), w.packed()) {
        return run_packed(p, isa, &x.packed_for(w.ty), out);
    }
    match w.ty {
        GgmlType::Q4_0 => run::<BlockQ4_0, BlockQ8_0>(w, x.q8_0(), x, out, quant::vec_dot_q4_0_q8_0),
        GgmlType::Q4_1 => run::<BlockQ4_1, BlockQ8_1>(w, x.q8_1(), x, out, quant::vec_dot_q4_1_q8_1),
        GgmlType::Q8_0 => run::<BlockQ8_0, BlockQ8_0>(w, x.q8_0(), x, out, quant::vec_dot_q8_0_q8_0),
        GgmlType::F16 => run::<f16, f16>(w, x.half(), x, out, quant::vec_dot_f16_f16),
        GgmlType::F32 => run::<f32, f32>(w, x.x, x, out, quant::vec_dot_f32),
        other => panic!("{}: no CPU kernel for {other} (the loader converts such types)", w.name),
    }
}

fn run<W: bytemuck::Pod + Sync, A: Sync>(
    w: &Matrix,
    acts: &[A],
    x: &Activations,
    out: &mut [f32],
    dot: fn(&[W], &[A]) -> f32,
) {
    let weights: &[W] = bytemuck::cast_slice(w.bytes());
    let per_row = weights.len() / w.rows;
    let per_tok = acts.len() / x.n_tokens;
    let rows = w.rows;
    let chunk = rows_per_task(rows);
    let n_tasks = rows.div_ceil(chunk);
    let ptr = OutPtr(out.as_mut_ptr());
    (0..n_tasks).into_par_iter().for_each(|task| {
        let r0 = task * chunk;
        let r1 = (r0 + chunk).min(rows);
        for t in 0..x.n_tokens {
            let a = &acts[t * per_tok..(t + 1) * per_tok];
            for r in r0..r1 {
                let v = dot(&weights[r * per_row..(r + 1) * per_row], a);
                // SAFETY: tasks own disjoint row ranges, so each (t, r) is written once.
                unsafe { *ptr.at(t * rows + r) = v };
            }
        }
    });
}

/// The product over interleaved groups: each task takes an equal share of the groups (equal
/// bytes) and walks every token over its share while it is in cache.
fn run_packed(p: &PackedMatrix, isa: Isa, acts: &PackedActs, out: &mut [f32]) {
    let groups = p.groups();
    let parts = rayon::current_num_threads().clamp(1, groups);
    let ptr = OutPtr(out.as_mut_ptr());
    (0..parts).into_par_iter().for_each(|k| {
        let range = groups * k / parts..groups * (k + 1) / parts;
        // SAFETY: the ranges are disjoint, so every (token, row) is written by one task, and
        // `out` holds n_tokens * rows elements (checked by `matmul`); the ISA was detected.
        unsafe { p.mul_groups(isa, acts, range, ptr.at(0), p.rows()) }
    });
}

/// The [`Precision::F32`] product: each task dequantises one weight row at a time into a
/// scratch row and takes f32 dot products with every token.
fn run_dequantised(w: &Matrix, x: &Activations, out: &mut [f32]) {
    let rows = w.rows;
    let chunk = rows_per_task(rows);
    let ptr = OutPtr(out.as_mut_ptr());
    (0..rows.div_ceil(chunk)).into_par_iter().for_each(|task| {
        let mut row = vec![0.0f32; w.cols];
        let rb = w.row_bytes();
        for r in task * chunk..((task + 1) * chunk).min(rows) {
            quant::dequantize(w.ty, &w.bytes()[r * rb..(r + 1) * rb], &mut row).expect("native types dequantise");
            for t in 0..x.n_tokens {
                let v = quant::vec_dot_f32(&row, &x.x[t * w.cols..(t + 1) * w.cols]);
                // SAFETY: tasks own disjoint row ranges, so each (t, r) is written once.
                unsafe { *ptr.at(t * rows + r) = v };
            }
        }
    });
}
