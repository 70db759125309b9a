//! Dense vs neuron-aware FFN products on the CPU, one token at a time.
//!
//! For each shape and type: the gate (or up) product dense (`matmul`) vs only the active rows
//! (`matvec_rows`, and gate+up together with `matvec_rows_pair` vs two calls), and the down
//! projection dense (`matmul` over activations that are zero outside the active set) vs the
//! sum of active `down_t` rows (`axpy_rows`). Active neurons are a random subset.
//!
//! "hot" reuses one layer's matrices, which then sit in cache; "cold" cycles through enough
//! layers' copies to exceed the last-level cache, as decoding a whole model does.
//!
//!     cargo run --release --example sparse_cpu_bench [-- --quick]

use ember::cpu::sparse::{axpy_rows, matvec_rows, matvec_rows_pair, transpose_matrix};
use ember::cpu::{matmul, Activations};
use ember::gguf::GgmlType;
use ember::model::Matrix;
use ember::quant;
use std::hint::black_box;
use std::time::Instant;

/// splitmix64, values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn signed(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.signed()).collect()
    }
}

fn matrix(rng: &mut Rng, name: &str, rows: usize, cols: usize, ty: GgmlType) -> Matrix {
    let v = rng.vec(rows * cols);
    match ty {
        GgmlType::F32 | GgmlType::F16 => Matrix::from_f32(name, rows, cols, &v, ty),
        GgmlType::Q4_0 => Matrix::from_raw(name, rows, cols, ty, bytemuck::cast_slice(&quant::quantize_q4_0(&v))),
        GgmlType::Q8_0 => Matrix::from_raw(name, rows, cols, ty, bytemuck::cast_slice(&quant::quantize_q8_0(&v))),
        other => panic!("bench has no generator for {other}"),
    }
}

/// One layer's FFN matrices.
struct Ffn {
    gate: Matrix,
    up: Matrix,
    down: Matrix,
    down_t: Matrix,
}

/// Microseconds per call of each of `ops`: the ops take turns, `iters` calls each per round,
/// and each keeps its best round of `reps`. Taking turns exposes every op to the same drift in
/// what other processes on a shared machine do; the best round filters out their bursts. An op
/// gets the call index to pick a layer.
fn time_us<const N: usize>(iters: usize, reps: usize, ops: &mut [&mut dyn FnMut(usize); N]) -> [f64; N] {
    let mut best = [f64::INFINITY; N];
    for op in ops.iter_mut() {
        op(0);
    }
    for _ in 0..reps {
        for (op, best) in ops.iter_mut().zip(&mut best) {
            let t = Instant::now();
            for i in 0..iters {
                op(i);
            }
            *best = best.min(t.elapsed().as_secs_f64() * 1e6 / iters as f64);
        }
    }
    best
}

fn main() {
    // Inside a pool, as `ember run` calls the kernels: the calling thread is a worker that
    // takes part in the work instead of waiting to be woken.
    rayon::ThreadPoolBuilder::new().build().expect("thread pool").install(run);
}

fn run() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 10 } else { 1 };
    println!("rayon threads: {}", rayon::current_num_threads());
    println!(
        "{:<22} {:>5} {:>4} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6}",
        "shape", "type", "sp%", "gate µs", "rows µs", "x", "2×rows µs", "pair µs", "x", "down µs", "axpy µs", "x"
    );
    // (label, n_ff, n_embd, types, runs as (name, layers cycled through), iterations per
    // repetition). One 1536x576 layer fits in the caches, 48 do not; the rows that eight
    // 11008x4096 layers read exceed a 32 MiB L3 even at 90% sparsity.
    type Case = (&'static str, usize, usize, [GgmlType; 2], &'static [(&'static str, usize)], usize);
    let cases: [Case; 2] = [
        ("1536x576", 1536, 576, [GgmlType::Q8_0, GgmlType::F16], &[("hot", 1), ("cold", 48)], 2000),
        ("11008x4096", 11008, 4096, [GgmlType::Q4_0, GgmlType::F16], &[("cold", 8)], 24),
    ];
    let only: Option<String> = std::env::var("BENCH_ONLY").ok();
    let mut rng = Rng(7);
    let mut transposes = Vec::new();
    for (label, n_ff, n_embd, types, runs, iters) in cases {
        for ty in types {
            if let Some(o) = &only {
                if !format!("{label} {ty}").contains(o.as_str()) {
                    continue;
                }
            }
            let down = matrix(&mut rng, "down", n_embd, n_ff, ty);
            let t = Instant::now();
            let down_t = transpose_matrix(&down, down.transpose_type()).expect("transposable");
            let ours = t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            let theirs = down.transposed(down.transpose_type()).expect("transposable");
            let existing = t.elapsed().as_secs_f64() * 1e3;
            assert!(down_t.bytes() == theirs.bytes());
            transposes.push(format!(
                "{label} {ty} -> {}: transpose_matrix {ours:.0} ms, Matrix::transposed {existing:.0} ms",
                down_t.ty
            ));
            let n_built = runs.iter().map(|r| r.1).max().unwrap_or(1);
            let layers: Vec<Ffn> = (0..n_built)
                .map(|_| {
                    let gate = matrix(&mut rng, "gate", n_ff, n_embd, ty);
                    let up = matrix(&mut rng, "up", n_ff, n_embd, ty);
                    let down = matrix(&mut rng, "down", n_embd, n_ff, ty);
                    let down_t = transpose_matrix(&down, down.transpose_type()).expect("transposable");
                    Ffn { gate, up, down, down_t }
                })
                .collect();
            for &(mode, n_layers) in runs {
                for sparsity in [0u64, 50, 77, 90] {
                    let x = rng.vec(n_embd);
                    // Each layer gets its own active set, as every layer of a model does, so
                    // the rows one layer reads are not left in cache by another.
                    let sets: Vec<(Vec<u32>, Vec<f32>)> = (0..n_layers)
                        .map(|_| {
                            let active: Vec<u32> = (0..n_ff as u32).filter(|_| rng.next() % 100 >= sparsity).collect();
                            let mut h = vec![0.0f32; n_ff];
                            for &i in &active {
                                h[i as usize] = rng.signed().abs();
                            }
                            (active, h)
                        })
                        .collect();
                    // Every op writes to its own outputs, so that the closures can coexist.
                    let [mut g1, mut g2, mut g3, mut g4, mut u3, mut u4] = std::array::from_fn(|_| vec![0.0f32; n_ff]);
                    let [mut o1, mut o2] = std::array::from_fn(|_| vec![0.0f32; n_embd]);
                    let at = |i: usize| (&layers[i % n_layers], &sets[i % n_layers].0, &sets[i % n_layers].1);
                    let (it, reps) = ((iters / scale).max(2), 7);
                    let gate_dense = &mut |i: usize| matmul(&at(i).0.gate, &Activations::new(&x, 1), black_box(&mut g1));
                    let gate_rows = &mut |i: usize| {
                        let (l, active, _) = at(i);
                        matvec_rows(&l.gate, &Activations::new(&x, 1), active, black_box(&mut g2))
                    };
                    let [dense_gate, rows] = time_us(it, reps, &mut [gate_dense, gate_rows]);
                    let two_calls = &mut |i: usize| {
                        let (l, active, _) = at(i);
                        let acts = Activations::new(&x, 1);
                        matvec_rows(&l.gate, &acts, active, black_box(&mut g3));
                        matvec_rows(&l.up, &acts, active, black_box(&mut u3));
                    };
                    let one_pair = &mut |i: usize| {
                        let (l, active, _) = at(i);
                        matvec_rows_pair(&l.gate, &l.up, &Activations::new(&x, 1), active, black_box(&mut g4), black_box(&mut u4))
                    };
                    let [two_rows, pair] = time_us(it, reps, &mut [two_calls, one_pair]);
                    let down_dense = &mut |i: usize| {
                        let (l, _, h) = at(i);
                        matmul(&l.down, &Activations::new(h, 1), black_box(&mut o1))
                    };
                    let down_sparse = &mut |i: usize| {
                        let (l, active, h) = at(i);
                        axpy_rows(&l.down_t, h, active, black_box(&mut o2))
                    };
                    let [dense_down, axpy] = time_us(it, reps, &mut [down_dense, down_sparse]);
                    let name = format!("{label} {mode}");
                    let tname = format!("{ty}/{}", layers[0].down_t.ty);
                    println!(
                        "{name:<22} {tname:>5} {sparsity:>4} | {dense_gate:>9.1} {rows:>9.1} {:>6.2} | {two_rows:>9.1} {pair:>9.1} {:>6.2} | {dense_down:>9.1} {axpy:>9.1} {:>6.2}",
                        dense_gate / rows,
                        two_rows / pair,
                        dense_down / axpy
                    );
                }
            }
        }
    }
    for line in transposes {
        println!("{line}");
    }
}
