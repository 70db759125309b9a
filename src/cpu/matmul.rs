//! Matrix products `out[t][r] = W[r] · x[t]` over rayon, for decode (one token) and batched
//! prefill (many tokens share each weight row while it is in cache).

use crate::gguf::GgmlType;
use crate::model::Matrix;
use crate::quant::packed::{ActScales, Isa, PackOptions, PackedActs, PackedMatrix, DEFAULT_PREFETCH};
use crate::quant::{self, f16, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8K, BlockQ8_0, BlockQ8_1, WeightBlock};
use super::team::Team;
use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// How the team's products stream their weights: values the caller passes in (the binary
/// fills one from `ember bench --tune` or its `EMBER_CPU_*` variables; the library reads no environment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTuning {
    /// Bytes ahead of the packed kernels' reads that they prefetch into L2 (0: none).
    pub prefetch: usize,
    /// 0: each member computes one equal share of every matrix of a step. N > 0: every matrix
    /// is cut into N parts per member, which the members take in turn from a shared counter,
    /// so that a member slowed down (another process, a busy host) delays the step by one
    /// part rather than by its whole share. Results are the same either way: each output is
    /// one group's dot products, whoever computes it.
    pub parts_per_member: usize,
    /// How matrices are packed on their first product.
    pub pack: PackOptions,
}

impl Default for CpuTuning {
    fn default() -> Self {
        CpuTuning { prefetch: DEFAULT_PREFETCH, parts_per_member: 0, pack: PackOptions::default() }
    }
}

/// Activation rows (`n_tokens` x `cols`) and, computed once on first use, their conversions
/// to the format each weight type multiplies with (Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for
/// Q4_1/Q5_1, Q8_K for the K-quants, f16 for F16), so q/k/v or gate/up reuse one quantisation.
pub struct Activations<'a> {
    pub x: &'a [f32],
    pub n_tokens: usize,
    pub cols: usize,
    pub precision: Precision,
    q8_0: OnceLock<Vec<BlockQ8_0>>,
    q8_1: OnceLock<Vec<BlockQ8_1>>,
    q8_k: OnceLock<Vec<BlockQ8K>>,
    half: OnceLock<Vec<f16>>,
    q8_0_scales: OnceLock<ActScales>,
    q8_1_scales: OnceLock<ActScales>,
}

impl<'a> Activations<'a> {
    pub fn new(x: &'a [f32], n_tokens: usize) -> Self {
        assert!(n_tokens > 0 && x.len().is_multiple_of(n_tokens));
        Activations { x, n_tokens, cols: x.len() / n_tokens, precision: Precision::Llama, q8_0: OnceLock::new(), q8_1: OnceLock::new(), q8_k: OnceLock::new(), half: OnceLock::new(), q8_0_scales: OnceLock::new(), q8_1_scales: OnceLock::new() }
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

    /// The token(s) quantised to Q8_K (rows of a multiple of 256 values), once.
    pub(crate) fn q8_k(&self) -> &[BlockQ8K] {
        self.q8_k.get_or_init(|| {
            let mut y = vec![BlockQ8K::ZERO; self.x.len() / quant::QK_K];
            quant::quantize_row_q8_k(self.x, &mut y);
            y
        })
    }

    /// The activations as the packed kernels of `w`'s type read them.
    fn packed_for(&self, ty: GgmlType) -> PackedActs<'_> {
        if ty == GgmlType::Q4_1 {
            let y = self.q8_1();
            PackedActs::q8_1(y, self.q8_1_scales.get_or_init(|| ActScales::from_q8_1(y, self.cols)), self.n_tokens)
        } else {
            PackedActs::q8_0(self.q8_0(), self.q8_0_scales(), self.n_tokens)
        }
    }

    /// The Q8_0 token(s)' per-block scales and lane sums, once (the packed products and the
    /// sparse row products read them).
    pub(crate) fn q8_0_scales(&self) -> &ActScales {
        let y = self.q8_0();
        self.q8_0_scales.get_or_init(|| ActScales::from_q8_0(y, self.cols))
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

/// `out[t * w.rows + r] = dot(w row r, x row t)` for every token t and row r, over rayon.
pub fn matmul(w: &Matrix, x: &Activations, out: &mut [f32]) {
    let plan = Plan::new(w, x, out.len(), &CpuTuning::default());
    let parts = plan.parts(rayon::current_num_threads());
    let ptr = OutPtr(out.as_mut_ptr());
    (0..parts).into_par_iter().for_each(|k| {
        // SAFETY: `Plan::new` checked the output's length; parts write disjoint rows.
        unsafe { plan.run_part(ptr, k, parts) }
    });
}

/// Several products of the same activations (q, k and v; gate and up) in one parallel step
/// of `team`: each member computes its equal share of every matrix, so the step costs one
/// start and one join however many matrices it has.
pub fn matmuls<const N: usize>(team: &mut Team, x: &Activations, products: [(&Matrix, &mut [f32]); N]) {
    matmuls_tuned(team, &CpuTuning::default(), x, products)
}

/// [`matmuls`] with the given [`CpuTuning`].
pub fn matmuls_tuned<const N: usize>(team: &mut Team, tuning: &CpuTuning, x: &Activations, products: [(&Matrix, &mut [f32]); N]) {
    let plans: [(Plan, OutPtr); N] = products.map(|(w, out)| (Plan::new(w, x, out.len(), tuning), OutPtr(out.as_mut_ptr())));
    // SAFETY: `Plan::new` checked each output's length, and the outputs are distinct `&mut`
    // slices borrowed for this call.
    unsafe { run_plans(team, tuning, &plans) }
}

/// Runs `plans` on `team`: each member its equal share of every matrix, or with
/// `tuning.parts_per_member` parts per member taken from a shared counter.
///
/// # Safety
/// Each plan's output pointer must be valid for its plan's outputs and not accessed elsewhere
/// during the call, and no two plans may share outputs.
unsafe fn run_plans<const N: usize>(team: &mut Team, tuning: &CpuTuning, plans: &[(Plan, OutPtr); N]) {
    unsafe { run_plans_first(team, tuning, plans, None) }
}

/// [`run_plans`], with member 0 (the caller) running `first` before it takes any part: a
/// small serial task overlapped with a bandwidth-bound product.
///
/// # Safety
/// As [`run_plans`].
unsafe fn run_plans_first<const N: usize>(team: &mut Team, tuning: &CpuTuning, plans: &[(Plan, OutPtr); N], first: Option<&(dyn Fn() + Sync)>) {
    if let (Some(f), 1) = (first, team.size()) {
        f();
    }
    if team.size() == 1 {
        for (plan, ptr) in plans {
            // SAFETY: as below, with one part.
            unsafe { plan.run_part(*ptr, 0, 1) };
        }
        return;
    }
    let size = team.size();
    if tuning.parts_per_member == 0 {
        team.run(&|member, size| {
            if let (Some(f), 0) = (first, member) {
                f();
            }
            for (plan, ptr) in plans {
                // SAFETY: the caller's outputs; members write disjoint rows.
                unsafe { plan.run_part(*ptr, member, size) };
            }
        });
        return;
    }
    // Parts numbered matrix after matrix; member m starts with part m of the first matrix,
    // then takes the next unclaimed part. With `first`, member 0 runs it and then takes parts
    // from the counter only, the others starting with parts 0..size - 1.
    let parts: [usize; N] = std::array::from_fn(|i| plans[i].0.parts(size * tuning.parts_per_member));
    let total: usize = parts.iter().sum();
    let claimed = if first.is_some() { size - 1 } else { size };
    let next = AtomicUsize::new(claimed);
    team.run(&|member, _| {
        let mut k = match first {
            None => member,
            Some(f) if member == 0 => {
                f();
                next.fetch_add(1, Ordering::Relaxed)
            }
            Some(_) => member - 1,
        };
        while k < total {
            let (mut i, mut part) = (0, k);
            while part >= parts[i] {
                part -= parts[i];
                i += 1;
            }
            // SAFETY: as above; every part number is claimed once (the first `size` by the
            // members' indices, the rest through the counter).
            unsafe { plans[i].0.run_part(plans[i].1, part, parts[i]) };
            k = next.fetch_add(1, Ordering::Relaxed);
        }
    });
}

/// `out[t * rows + r] = W[r] · x[t]` for a matrix that exists only packed (no GGUF bytes
/// beside it: the hybrid's dense copy of a layer's cold gate rows), on `team` as [`matmuls`]
/// splits a product. The numbers are [`matmuls`]' for the same rows: the packed kernels at
/// [`Precision::Llama`]. Panics if this CPU has no packed kernels ([`Isa::detect`]), for F32
/// precision, or on a shape mismatch.
pub fn matmul_packed(team: &mut Team, tuning: &CpuTuning, p: &PackedMatrix, x: &Activations, out: &mut [f32]) {
    matmul_packed_first(team, tuning, p, x, out, None)
}

/// [`matmul_packed`], with the caller running `first` (a small serial task) before it joins
/// the product: the others start on the product at once.
pub fn matmul_packed_first(team: &mut Team, tuning: &CpuTuning, p: &PackedMatrix, x: &Activations, out: &mut [f32], first: Option<&(dyn Fn() + Sync)>) {
    let plans = [(Plan::packed(p, x, out.len(), tuning), OutPtr(out.as_mut_ptr()))];
    // SAFETY: the output holds n_tokens x rows values (checked by `Plan::packed`), borrowed for
    // the call.
    unsafe { run_plans_first(team, tuning, &plans, first) }
}

/// [`matmul_packed_first`] with a second, small product (`w · x2` into `out2`, e.g. a
/// predictor's rows) split into the same parts in the same team run, so that no member
/// computes it alone.
#[allow(clippy::too_many_arguments)]
pub fn matmul_packed_beside(team: &mut Team, tuning: &CpuTuning, p: &PackedMatrix, x: &Activations, out: &mut [f32], w: &Matrix, x2: &Activations, out2: &mut [f32], first: Option<&(dyn Fn() + Sync)>) {
    let plans = [(Plan::packed(p, x, out.len(), tuning), OutPtr(out.as_mut_ptr())), (Plan::new(w, x2, out2.len(), tuning), OutPtr(out2.as_mut_ptr()))];
    // SAFETY: the outputs' lengths are checked by `Plan::packed` and `Plan::new`; they are
    // distinct `&mut` slices borrowed for the call.
    unsafe { run_plans_first(team, tuning, &plans, first) }
}

/// How one product is computed, decided once per call (before any thread starts): the packed
/// kernels where this CPU has them, else one row dot at a time.
enum Plan<'a> {
    Packed { p: &'a PackedMatrix, isa: Isa, acts: PackedActs<'a>, prefetch: usize },
    Rows { dot: RowDot<'a>, rows: usize, n_tokens: usize },
    /// [`Precision::F32`]: rows dequantised into a scratch row.
    Dequantised { w: &'a Matrix, x: &'a [f32], n_tokens: usize },
}

/// One weight type's row dot product with its activation format.
enum RowDot<'a> {
    Q4_0(&'a [BlockQ4_0], &'a [BlockQ8_0]),
    Q4_1(&'a [BlockQ4_1], &'a [BlockQ8_1]),
    Q8_0(&'a [BlockQ8_0], &'a [BlockQ8_0]),
    Q5_0(&'a [BlockQ5_0], &'a [BlockQ8_0]),
    Q5_1(&'a [BlockQ5_1], &'a [BlockQ8_1]),
    Q2K(&'a [BlockQ2K], &'a [BlockQ8K]),
    Q3K(&'a [BlockQ3K], &'a [BlockQ8K]),
    Q4K(&'a [BlockQ4K], &'a [BlockQ8K]),
    Q5K(&'a [BlockQ5K], &'a [BlockQ8K]),
    Q6K(&'a [BlockQ6K], &'a [BlockQ8K]),
    F16(&'a [f16], &'a [f16]),
    F32(&'a [f32], &'a [f32]),
}

impl RowDot<'_> {
    /// Row `r` of `rows` times token `t` of `n_tokens`.
    fn dot(&self, r: usize, rows: usize, t: usize, n_tokens: usize) -> f32 {
        fn split<T>(v: &[T], i: usize, n: usize) -> &[T] {
            let per = v.len() / n;
            &v[i * per..(i + 1) * per]
        }
        match self {
            RowDot::Q4_0(w, a) => quant::vec_dot_q4_0_q8_0(split(w, r, rows), split(a, t, n_tokens)),
            RowDot::Q4_1(w, a) => quant::vec_dot_q4_1_q8_1(split(w, r, rows), split(a, t, n_tokens)),
            RowDot::Q8_0(w, a) => quant::vec_dot_q8_0_q8_0(split(w, r, rows), split(a, t, n_tokens)),
            RowDot::Q5_0(w, a) => BlockQ5_0::dot(split(w, r, rows), split(a, t, n_tokens)),
            RowDot::Q5_1(w, a) => BlockQ5_1::dot(split(w, r, rows), split(a, t, n_tokens)),
            RowDot::Q2K(w, a) => BlockQ2K::dot(split(w, r, rows), split(a, t, n_tokens)),
            RowDot::Q3K(w, a) => BlockQ3K::dot(split(w, r, rows), split(a, t, n_tokens)),
            RowDot::Q4K(w, a) => BlockQ4K::dot(split(w, r, rows), split(a, t, n_tokens)),
            RowDot::Q5K(w, a) => BlockQ5K::dot(split(w, r, rows), split(a, t, n_tokens)),
            RowDot::Q6K(w, a) => BlockQ6K::dot(split(w, r, rows), split(a, t, n_tokens)),
            RowDot::F16(w, a) => quant::vec_dot_f16_f16(split(w, r, rows), split(a, t, n_tokens)),
            RowDot::F32(w, a) => quant::vec_dot_f32(split(w, r, rows), split(a, t, n_tokens)),
        }
    }
}

impl<'a> Plan<'a> {
    /// A matrix that exists only packed, multiplied with the packed kernels. Panics if this
    /// CPU has none, for F32 precision, or on a shape mismatch.
    fn packed(p: &'a PackedMatrix, x: &'a Activations, out_len: usize, tuning: &CpuTuning) -> Plan<'a> {
        let isa = Isa::detect().expect("a packed matrix is multiplied on a CPU with packed kernels");
        assert_eq!(x.precision, Precision::Llama, "packed products are the 8-bit activations' numerics");
        assert_eq!(x.cols, p.cols(), "packed product: activation width");
        assert_eq!(out_len, x.n_tokens * p.rows(), "packed product: output length");
        Plan::Packed { p, isa, acts: x.packed_for(p.ty()), prefetch: tuning.prefetch }
    }

    /// Checks the shapes and prepares the activations (quantised once, before any thread
    /// starts, so that no member waits on another's conversion).
    fn new(w: &'a Matrix, x: &'a Activations, out_len: usize, tuning: &CpuTuning) -> Plan<'a> {
        assert_eq!(x.cols, w.cols, "{}: activation width {} vs matrix columns {}", w.name, x.cols, w.cols);
        assert_eq!(out_len, x.n_tokens * w.rows, "{}: output length", w.name);
        let (rows, n_tokens) = (w.rows, x.n_tokens);
        if x.precision == Precision::F32 && w.ty != GgmlType::F32 {
            return Plan::Dequantised { w, x: x.x, n_tokens };
        }
        if let Some(isa) = Isa::detect() {
            if let Some(p) = w.packed_with(tuning.pack) {
                return Plan::Packed { p, isa, acts: x.packed_for(w.ty), prefetch: tuning.prefetch };
            }
        }
        let b = w.bytes();
        let dot = match w.ty {
            GgmlType::Q4_0 => RowDot::Q4_0(bytemuck::cast_slice(b), x.q8_0()),
            GgmlType::Q4_1 => RowDot::Q4_1(bytemuck::cast_slice(b), x.q8_1()),
            GgmlType::Q8_0 => RowDot::Q8_0(bytemuck::cast_slice(b), x.q8_0()),
            GgmlType::Q5_0 => RowDot::Q5_0(bytemuck::cast_slice(b), x.q8_0()),
            GgmlType::Q5_1 => RowDot::Q5_1(bytemuck::cast_slice(b), x.q8_1()),
            GgmlType::Q2_K => RowDot::Q2K(bytemuck::cast_slice(b), x.q8_k()),
            GgmlType::Q3_K => RowDot::Q3K(bytemuck::cast_slice(b), x.q8_k()),
            GgmlType::Q4_K => RowDot::Q4K(bytemuck::cast_slice(b), x.q8_k()),
            GgmlType::Q5_K => RowDot::Q5K(bytemuck::cast_slice(b), x.q8_k()),
            GgmlType::Q6_K => RowDot::Q6K(bytemuck::cast_slice(b), x.q8_k()),
            GgmlType::F16 => RowDot::F16(bytemuck::cast_slice(b), x.half()),
            GgmlType::F32 => RowDot::F32(bytemuck::cast_slice(b), x.x),
            other => panic!("{}: no CPU kernel for {other} (the loader converts such types)", w.name),
        };
        Plan::Rows { dot, rows, n_tokens }
    }

    /// How many parts to cut the product into for `threads` threads: one per thread for the
    /// packed kernels (equal shares of equal groups), several per thread otherwise so that
    /// rayon can balance rows of uneven cost.
    fn parts(&self, threads: usize) -> usize {
        let threads = threads.max(1);
        match self {
            Plan::Packed { p, .. } => threads.min(p.groups()),
            Plan::Rows { rows, .. } => (threads * 8).min(rows.div_ceil(8)).max(1),
            Plan::Dequantised { w, .. } => (threads * 8).min(w.rows.div_ceil(8)).max(1),
        }
    }

    /// Computes part `k` of `parts`: a contiguous range of rows (whole groups for the packed
    /// kernels), every token, written at `out[t * rows + r]`.
    ///
    /// # Safety
    /// `out` must hold `n_tokens * rows` elements, and no two concurrent calls may share `k`.
    unsafe fn run_part(&self, out: OutPtr, k: usize, parts: usize) {
        let share = |n: usize| n * k / parts..n * (k + 1) / parts;
        match self {
            Plan::Packed { p, isa, acts, prefetch } => p.mul_groups(*isa, acts, share(p.groups()), out.at(0), p.rows(), *prefetch),
            Plan::Rows { dot, rows, n_tokens } => {
                for r in share(*rows) {
                    for t in 0..*n_tokens {
                        *out.at(t * rows + r) = dot.dot(r, *rows, t, *n_tokens);
                    }
                }
            }
            Plan::Dequantised { w, x, n_tokens } => {
                let mut row = vec![0.0f32; w.cols];
                let rb = w.row_bytes();
                for r in share(w.rows) {
                    quant::dequantize(w.ty, &w.bytes()[r * rb..(r + 1) * rb], &mut row).expect("native types dequantise");
                    for t in 0..*n_tokens {
                        *out.at(t * w.rows + r) = quant::vec_dot_f32(&row, &x[t * w.cols..(t + 1) * w.cols]);
                    }
                }
            }
        }
    }
}
