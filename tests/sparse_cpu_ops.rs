//! The neuron-aware CPU operators (src/cpu/sparse.rs) against the dense kernels and plain f64
//! references, on random (never zero) inputs at awkward sizes and sparsities from none to all.

mod common;

use common::{random_matrix, Rng};
use ember::cpu::sparse::{
    self, active_rows, axpy_chunk_len, axpy_rows, axpy_rows_into, matvec_rows, matvec_rows_pair, transpose_matrix,
    TransposeError,
};
use ember::cpu::{matmul, Activations, Precision};
use ember::gguf::GgmlType;
use ember::model::Matrix;
use ember::quant::{self, f16, BlockQ4_0, BlockQ4_1, BlockQ8_0};

const TYPES: [GgmlType; 5] = [GgmlType::F32, GgmlType::F16, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0];
const SPARSITIES: [u64; 5] = [0, 50, 90, 99, 100];

/// Ascending indices of `0..n`, each kept with probability `1 - sparsity%`.
fn random_subset(rng: &mut Rng, n: usize, sparsity_pct: u64) -> Vec<u32> {
    (0..n as u32).filter(|_| rng.next_u64() % 100 >= sparsity_pct).collect()
}

/// Shapes (rows, cols) for a type: quantised types need whole 32-value blocks; the float
/// types also get odd widths.
fn shapes(ty: GgmlType) -> Vec<(usize, usize)> {
    let mut s = vec![(1007, 96), (333, 576)];
    if matches!(ty, GgmlType::F32 | GgmlType::F16) {
        s.push((333, 37));
    }
    s
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
}

/// A value no kernel produces from these inputs, to see which outputs were written.
const UNTOUCHED: f32 = -12345.678;

#[test]
fn matvec_rows_equals_dense_matmul_bit_for_bit_on_listed_rows_only() {
    let mut rng = Rng(11);
    let pool = pool(3);
    for ty in TYPES {
        for (rows, cols) in shapes(ty) {
            let (w, _) = random_matrix(&mut rng, rows, cols, ty);
            let x = rng.vec(cols);
            for precision in [Precision::Llama, Precision::F32] {
                let mut dense = vec![0.0; rows];
                matmul(&w, &Activations::new(&x, 1).with_precision(precision), &mut dense);
                for sparsity in SPARSITIES {
                    let listed = random_subset(&mut rng, rows, sparsity);
                    let mut out = vec![UNTOUCHED; rows];
                    let acts = Activations::new(&x, 1).with_precision(precision);
                    pool.install(|| matvec_rows(&w, &acts, &listed, &mut out));
                    let mut is_listed = vec![false; rows];
                    listed.iter().for_each(|&r| is_listed[r as usize] = true);
                    for r in 0..rows {
                        let want = if is_listed[r] { dense[r] } else { UNTOUCHED };
                        assert_eq!(
                            out[r].to_bits(),
                            want.to_bits(),
                            "{ty} {precision:?} {rows}x{cols} {sparsity}% row {r} (listed {}): {} vs {want}",
                            is_listed[r],
                            out[r]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn matvec_rows_takes_lists_in_any_order_with_repeats_and_any_thread_count() {
    let mut rng = Rng(12);
    let (rows, cols) = (1007, 576);
    let (w, _) = random_matrix(&mut rng, rows, cols, GgmlType::Q8_0);
    let x = rng.vec(cols);
    let mut dense = vec![0.0; rows];
    matmul(&w, &Activations::new(&x, 1), &mut dense);
    // Descending, every listed row twice, interleaved.
    let mut listed: Vec<u32> = random_subset(&mut rng, rows, 30).into_iter().rev().collect();
    listed = listed.iter().flat_map(|&r| [r, (r * 7) % rows as u32, r]).collect();
    for threads in [1, 2, 3] {
        let mut out = vec![UNTOUCHED; rows];
        pool(threads).install(|| matvec_rows(&w, &Activations::new(&x, 1), &listed, &mut out));
        for &r in &listed {
            assert_eq!(out[r as usize].to_bits(), dense[r as usize].to_bits(), "{threads} threads, row {r}");
        }
        assert_eq!(out.iter().filter(|v| **v != UNTOUCHED).count(), {
            let mut u = listed.clone();
            u.sort_unstable();
            u.dedup();
            u.len()
        });
    }
}

#[test]
fn matvec_rows_pair_equals_dense_matmul_for_both_matrices() {
    let mut rng = Rng(13);
    let pool = pool(3);
    // Same types share one activation conversion; mixed types each get their own.
    let pairs = [
        (GgmlType::Q8_0, GgmlType::Q8_0),
        (GgmlType::Q4_0, GgmlType::Q4_0),
        (GgmlType::F16, GgmlType::F16),
        (GgmlType::Q4_1, GgmlType::Q8_0),
        (GgmlType::F32, GgmlType::Q4_1),
    ];
    for (gate_ty, up_ty) in pairs {
        let (rows, cols) = (1007, 576);
        let (gate, _) = random_matrix(&mut rng, rows, cols, gate_ty);
        let (up, _) = random_matrix(&mut rng, rows, cols, up_ty);
        let x = rng.vec(cols);
        for precision in [Precision::Llama, Precision::F32] {
            let (mut dense_gate, mut dense_up) = (vec![0.0; rows], vec![0.0; rows]);
            matmul(&gate, &Activations::new(&x, 1).with_precision(precision), &mut dense_gate);
            matmul(&up, &Activations::new(&x, 1).with_precision(precision), &mut dense_up);
            for sparsity in SPARSITIES {
                let listed = random_subset(&mut rng, rows, sparsity);
                let (mut out_gate, mut out_up) = (vec![UNTOUCHED; rows], vec![UNTOUCHED; rows]);
                let acts = Activations::new(&x, 1).with_precision(precision);
                pool.install(|| matvec_rows_pair(&gate, &up, &acts, &listed, &mut out_gate, &mut out_up));
                let mut expect_gate = vec![UNTOUCHED; rows];
                let mut expect_up = vec![UNTOUCHED; rows];
                for &r in &listed {
                    expect_gate[r as usize] = dense_gate[r as usize];
                    expect_up[r as usize] = dense_up[r as usize];
                }
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                let what = format!("{gate_ty}/{up_ty} {precision:?} {sparsity}%");
                assert_eq!(bits(&out_gate), bits(&expect_gate), "gate {what}");
                assert_eq!(bits(&out_up), bits(&expect_up), "up {what}");
            }
        }
    }
}

#[test]
fn matvec_rows_with_an_empty_list_writes_nothing() {
    let mut rng = Rng(14);
    let (w, _) = random_matrix(&mut rng, 64, 32, GgmlType::Q4_0);
    let x = rng.vec(32);
    let mut out = vec![UNTOUCHED; 64];
    matvec_rows(&w, &Activations::new(&x, 1), &[], &mut out);
    let (mut g, mut u) = (vec![UNTOUCHED; 64], vec![UNTOUCHED; 64]);
    matvec_rows_pair(&w, &w, &Activations::new(&x, 1), &[], &mut g, &mut u);
    assert!(out.iter().chain(&g).chain(&u).all(|&v| v == UNTOUCHED));
}

#[test]
#[should_panic(expected = "row 64 listed")]
fn matvec_rows_refuses_an_out_of_range_row() {
    let mut rng = Rng(15);
    let (w, _) = random_matrix(&mut rng, 64, 32, GgmlType::Q8_0);
    let x = rng.vec(32);
    matvec_rows(&w, &Activations::new(&x, 1), &[3, 64], &mut [0.0; 64]);
}

/// `(h, active)`: the active neurons carry random non-zero values, the others zero. A few of
/// the listed neurons also get a zero value (predicted active, not firing).
fn random_activations(rng: &mut Rng, n: usize, sparsity_pct: u64) -> (Vec<f32>, Vec<u32>) {
    let active = random_subset(rng, n, sparsity_pct);
    let mut h = vec![0.0f32; n];
    for &i in &active {
        h[i as usize] = if rng.next_u64().is_multiple_of(16) { 0.0 } else { rng.signed() };
    }
    (h, active)
}

#[test]
fn axpy_rows_matches_an_f64_sum_of_dequantised_rows() {
    let mut rng = Rng(21);
    let pool = pool(3);
    for ty in TYPES {
        for (n_neurons, cols) in shapes(ty) {
            let (down_t, deq) = random_matrix(&mut rng, n_neurons, cols, ty);
            for sparsity in SPARSITIES {
                let (h, active) = random_activations(&mut rng, n_neurons, sparsity);
                let mut out = vec![UNTOUCHED; cols];
                pool.install(|| axpy_rows(&down_t, &h, &active, &mut out));
                // Each output element is at most `chain` rounded additions deep (a chunk's rows,
                // then the chunk sums), and Q4_0/Q8_0 round `h * d` once more per term.
                let chain = axpy_chunk_len(active.len()).min(active.len()) + active.len().div_ceil(axpy_chunk_len(active.len()));
                let unit = f64::from(f32::EPSILON) / 2.0;
                for j in 0..cols {
                    let terms = active.iter().map(|&i| f64::from(h[i as usize]) * f64::from(deq[i as usize * cols + j]));
                    let want: f64 = terms.clone().sum();
                    let scale: f64 = terms.map(f64::abs).sum();
                    let tol = (chain + 2) as f64 * unit * scale;
                    let got = f64::from(out[j]);
                    assert!(
                        (got - want).abs() <= tol,
                        "{ty} {n_neurons}x{cols} {sparsity}% col {j}: {got} vs {want} (tol {tol:e})"
                    );
                }
                if active.iter().all(|&i| h[i as usize] == 0.0) {
                    assert!(out.iter().all(|&v| v.to_bits() == 0), "{ty} {sparsity}%: exact zeros");
                }
            }
        }
    }
}

#[test]
fn axpy_rows_with_nothing_active_gives_exact_zeros_and_into_leaves_out_alone() {
    let mut rng = Rng(22);
    for ty in TYPES {
        let (down_t, _) = random_matrix(&mut rng, 200, 96, ty);
        let all_zero = vec![0.0f32; 200];
        let everyone: Vec<u32> = (0..200).collect();
        for (h, active) in [(&all_zero, &everyone[..]), (&all_zero, &[][..]), (&rng.vec(200), &[][..])] {
            let mut out = vec![UNTOUCHED; 96];
            axpy_rows(&down_t, h, active, &mut out);
            assert!(out.iter().all(|&v| v.to_bits() == 0), "{ty}: {out:?}");
            let init = rng.vec(96);
            let mut into = init.clone();
            axpy_rows_into(&down_t, h, active, &mut into);
            assert_eq!(into, init, "{ty}");
        }
    }
}

/// The documented order, with the scalar row kernels: chunks of `axpy_chunk_len` neurons, each
/// summed in list order from zero, then added to `init` in chunk order.
fn axpy_in_documented_order(down_t: &Matrix, h: &[f32], active: &[u32], init: Option<&[f32]>) -> Vec<f32> {
    let cols = down_t.cols;
    let row_bytes = down_t.row_bytes();
    let add_row = |i: usize, acc: &mut [f32]| {
        let b = &down_t.bytes()[i * row_bytes..(i + 1) * row_bytes];
        match down_t.ty {
            GgmlType::F32 => sparse::reference::axpy_row_f32(bytemuck::cast_slice(b), h[i], acc),
            GgmlType::F16 => sparse::reference::axpy_row_f16(bytemuck::cast_slice(b), h[i], acc),
            GgmlType::Q8_0 => sparse::reference::axpy_row_q8_0(bytemuck::cast_slice(b), h[i], acc),
            GgmlType::Q4_0 => sparse::reference::axpy_row_q4_0(bytemuck::cast_slice(b), h[i], acc),
            GgmlType::Q4_1 => sparse::reference::axpy_row_q4_1(bytemuck::cast_slice(b), h[i], acc),
            _ => unreachable!(),
        }
    };
    let chunk_sums: Vec<Vec<f32>> = active
        .chunks(axpy_chunk_len(active.len()).max(1))
        .map(|chunk| {
            let mut acc = vec![0.0f32; cols];
            chunk.iter().filter(|&&i| h[i as usize] != 0.0).for_each(|&i| add_row(i as usize, &mut acc));
            acc
        })
        .collect();
    let mut out = match init {
        Some(v) => v.to_vec(),
        None if chunk_sums.is_empty() => vec![0.0; cols],
        None => chunk_sums[0].clone(),
    };
    let first = usize::from(init.is_none());
    for s in chunk_sums.iter().skip(first) {
        out.iter_mut().zip(s).for_each(|(o, v)| *o += v);
    }
    out
}

#[test]
fn axpy_rows_is_bit_identical_for_any_thread_count_and_follows_its_documented_order() {
    let mut rng = Rng(23);
    // Large enough to run in parallel with many chunks.
    for (ty, n_neurons, cols) in [(GgmlType::Q8_0, 3000, 576), (GgmlType::F16, 2500, 416), (GgmlType::Q4_1, 1100, 4096)] {
        let (down_t, _) = random_matrix(&mut rng, n_neurons, cols, ty);
        for sparsity in [0, 50, 90] {
            let (h, active) = random_activations(&mut rng, n_neurons, sparsity);
            let init = rng.vec(cols);
            let run = |threads: usize| {
                let (mut out, mut into) = (vec![UNTOUCHED; cols], init.clone());
                pool(threads).install(|| {
                    axpy_rows(&down_t, &h, &active, &mut out);
                    axpy_rows_into(&down_t, &h, &active, &mut into);
                });
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                (bits(&out), bits(&into))
            };
            let one = run(1);
            assert_eq!(run(2), one, "{ty} {sparsity}%: 2 threads vs 1");
            assert_eq!(run(3), one, "{ty} {sparsity}%: 3 threads vs 1");
            let documented = axpy_in_documented_order(&down_t, &h, &active, None);
            let documented_into = axpy_in_documented_order(&down_t, &h, &active, Some(&init));
            assert_eq!(one.0, documented.iter().map(|f| f.to_bits()).collect::<Vec<_>>(), "{ty} {sparsity}%");
            assert_eq!(one.1, documented_into.iter().map(|f| f.to_bits()).collect::<Vec<_>>(), "{ty} {sparsity}% into");
            // Adding to zeros is the overwriting version.
            let mut into_zero = vec![0.0; cols];
            axpy_rows_into(&down_t, &h, &active, &mut into_zero);
            assert_eq!(into_zero.iter().map(|f| f.to_bits()).collect::<Vec<_>>(), one.0, "{ty} {sparsity}% into zeros");
        }
    }
}

/// Every AXPY instruction set this CPU has, one row at a time through `axpy_row_on`, against
/// the scalar twins at odd lengths (tails shorter than a vector included).
#[test]
fn every_axpy_isa_equals_the_scalar_twins() {
    use sparse::{axpy_row_on, AxpyIsa};
    let mut rng = Rng(25);
    let h = -1.3127f32;
    let isas: Vec<AxpyIsa> = [AxpyIsa::Avx512, AxpyIsa::Avx2, AxpyIsa::Scalar].into_iter().filter(|i| i.available()).collect();
    for n in [1usize, 15, 16, 17, 33, 1001] {
        let row = rng.vec(n);
        let init = rng.vec(n);
        let halves: Vec<f16> = row.iter().map(|&v| f16::from_f32(v)).collect();
        let (mut want32, mut want16) = (init.clone(), init.clone());
        sparse::reference::axpy_row_f32(&row, h, &mut want32);
        sparse::reference::axpy_row_f16(&halves, h, &mut want16);
        for &isa in &isas {
            let mut a = init.clone();
            axpy_row_on(isa, GgmlType::F32, bytemuck::cast_slice(&row), h, &mut a);
            assert_eq!(a, want32, "{isa:?} f32 n={n}");
            let mut a = init.clone();
            axpy_row_on(isa, GgmlType::F16, bytemuck::cast_slice(&halves), h, &mut a);
            assert_eq!(a, want16, "{isa:?} f16 n={n}");
        }
    }
    for blocks in [1usize, 5, 37] {
        let n = 32 * blocks;
        let values: Vec<f32> = rng.vec(n).iter().map(|v| v * 5.0).collect();
        let init = rng.vec(n);
        let q8 = quant::quantize_q8_0(&values);
        let q40 = quant::quantize_q4_0(&values);
        let q41 = quant::quantize_q4_1(&values);
        let mut want = [init.clone(), init.clone(), init.clone()];
        sparse::reference::axpy_row_q8_0(&q8, h, &mut want[0]);
        sparse::reference::axpy_row_q4_0(&q40, h, &mut want[1]);
        sparse::reference::axpy_row_q4_1(&q41, h, &mut want[2]);
        for &isa in &isas {
            let rows: [(GgmlType, &[u8]); 3] = [(GgmlType::Q8_0, bytemuck::cast_slice(&q8)), (GgmlType::Q4_0, bytemuck::cast_slice(&q40)), (GgmlType::Q4_1, bytemuck::cast_slice(&q41))];
            for ((ty, bytes), want) in rows.into_iter().zip(&want) {
                let mut a = init.clone();
                axpy_row_on(isa, ty, bytes, h, &mut a);
                assert_eq!(&a, want, "{isa:?} {ty} {blocks} blocks");
            }
        }
    }
}

#[test]
fn simd_row_axpy_kernels_equal_their_scalar_twins() {
    let mut rng = Rng(24);
    let h = 0.7371f32;
    for n in [0usize, 1, 7, 8, 9, 37, 64, 1000] {
        let row = rng.vec(n);
        let init = rng.vec(n);
        let (mut a, mut b) = (init.clone(), init.clone());
        sparse::axpy_row_f32(&row, h, &mut a);
        sparse::reference::axpy_row_f32(&row, h, &mut b);
        assert_eq!(a, b, "f32 n={n}");
        let halves: Vec<f16> = row.iter().map(|&v| f16::from_f32(v)).collect();
        let (mut a, mut b) = (init.clone(), init.clone());
        sparse::axpy_row_f16(&halves, h, &mut a);
        sparse::reference::axpy_row_f16(&halves, h, &mut b);
        assert_eq!(a, b, "f16 n={n}");
    }
    for blocks in [1usize, 3, 18] {
        let n = 32 * blocks;
        // Scaled values exercise every quant, including the extremes.
        let values: Vec<f32> = rng.vec(n).iter().map(|v| v * 3.0).collect();
        let init = rng.vec(n);
        let q8: Vec<BlockQ8_0> = quant::quantize_q8_0(&values);
        let q40: Vec<BlockQ4_0> = quant::quantize_q4_0(&values);
        let q41: Vec<BlockQ4_1> = quant::quantize_q4_1(&values);
        let (mut a, mut b) = (init.clone(), init.clone());
        sparse::axpy_row_q8_0(&q8, h, &mut a);
        sparse::reference::axpy_row_q8_0(&q8, h, &mut b);
        assert_eq!(a, b, "q8_0 {blocks} blocks");
        let (mut a, mut b) = (init.clone(), init.clone());
        sparse::axpy_row_q4_0(&q40, h, &mut a);
        sparse::reference::axpy_row_q4_0(&q40, h, &mut b);
        assert_eq!(a, b, "q4_0 {blocks} blocks");
        let (mut a, mut b) = (init.clone(), init.clone());
        sparse::axpy_row_q4_1(&q41, h, &mut a);
        sparse::reference::axpy_row_q4_1(&q41, h, &mut b);
        assert_eq!(a, b, "q4_1 {blocks} blocks");
        // And the kernels compute what they claim: acc + h * dequantised weight.
        let deq = {
            let mut d = vec![0.0; n];
            quant::dequantize(GgmlType::Q4_1, bytemuck::cast_slice(&q41), &mut d).unwrap();
            d
        };
        for j in 0..n {
            assert_eq!(a[j], h.mul_add(deq[j], init[j]), "q4_1 element {j}");
        }
    }
}

#[test]
#[should_panic(expected = "neuron 200 listed")]
fn axpy_rows_refuses_an_out_of_range_neuron() {
    let mut rng = Rng(25);
    let (down_t, _) = random_matrix(&mut rng, 200, 64, GgmlType::Q8_0);
    axpy_rows(&down_t, &rng.vec(200), &[1, 200], &mut [0.0; 64]);
}

#[test]
fn transpose_round_trips_and_equals_matrix_transposed() {
    let mut rng = Rng(31);
    for src_ty in TYPES {
        // Several column bands, and a row count that is a whole number of Q8_0 blocks.
        let (rows, cols) = (96, 224);
        let (w, deq) = random_matrix(&mut rng, rows, cols, src_ty);
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0] {
            let t = pool(3).install(|| transpose_matrix(&w, ty)).unwrap();
            assert_eq!((t.rows, t.cols, t.ty, t.name.as_str()), (cols, rows, ty, "w_t"));
            let column = |c: usize| (0..rows).map(|r| deq[r * cols + c]).collect::<Vec<f32>>();
            for c in 0..cols {
                let got = t.row_f32(c);
                let want: Vec<f32> = match ty {
                    GgmlType::F32 => column(c),
                    GgmlType::F16 => column(c).iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
                    _ => {
                        let q = quant::quantize_q8_0(&column(c));
                        let mut d = vec![0.0; rows];
                        quant::dequantize(GgmlType::Q8_0, bytemuck::cast_slice(&q), &mut d).unwrap();
                        d
                    }
                };
                assert_eq!(got, want, "{src_ty} -> {ty} row {c}");
            }
            let existing = w.transposed(ty).unwrap();
            assert!(t.bytes() == existing.bytes(), "{src_ty} -> {ty}: differs from Matrix::transposed");
        }
        // Transposing the f32 transpose back gives the dequantised source exactly.
        let back = transpose_matrix(&transpose_matrix(&w, GgmlType::F32).unwrap(), GgmlType::F32).unwrap();
        assert_eq!((back.rows, back.cols), (rows, cols));
        let back_values: Vec<f32> = (0..rows).flat_map(|r| back.row_f32(r)).collect();
        assert_eq!(back_values, deq, "{src_ty} round trip");
    }
}

#[test]
fn transpose_of_odd_float_shapes_and_empty_matrices() {
    let mut rng = Rng(32);
    let (w, deq) = random_matrix(&mut rng, 33, 37, GgmlType::F32);
    let t = transpose_matrix(&w, GgmlType::F16).unwrap();
    for c in 0..37 {
        let want: Vec<f32> = (0..33).map(|r| f16::from_f32(deq[r * 37 + c]).to_f32()).collect();
        assert_eq!(t.row_f32(c), want);
    }
    let empty = Matrix::from_f32("e", 0, 64, &[], GgmlType::F32);
    let te = transpose_matrix(&empty, GgmlType::Q8_0).unwrap();
    assert_eq!((te.rows, te.cols, te.n_bytes()), (64, 0, 0));
}

#[test]
fn transpose_explains_what_it_cannot_store() {
    let mut rng = Rng(33);
    let (w, _) = random_matrix(&mut rng, 40, 64, GgmlType::Q4_0);
    match transpose_matrix(&w, GgmlType::Q8_0) {
        Err(e @ TransposeError::PartialBlock { len: 40, .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("w:") && msg.contains("40") && msg.contains("F16"), "{msg}");
        }
        other => panic!("expected a partial-block error, got {:?}", other.map(|m| m.ty)),
    }
    match transpose_matrix(&w, GgmlType::Q4_1) {
        Err(e @ TransposeError::UnsupportedTarget { ty: GgmlType::Q4_1, .. }) => {
            assert!(e.to_string().contains("F32, F16, Q8_0 or Q4_0"), "{e}")
        }
        other => panic!("expected an unsupported-target error, got {:?}", other.map(|m| m.ty)),
    }
    // F16 is fine for the same shape.
    assert_eq!(transpose_matrix(&w, GgmlType::F16).unwrap().rows, 64);
}

#[test]
fn active_rows_lists_positive_values_in_order() {
    let values = [0.5, 0.0, -0.0, -1.0, f32::NAN, f32::INFINITY, 1e-38, -1e-38, 3.0, f32::NEG_INFINITY];
    let mut out = vec![99, 98, 97];
    active_rows(&values, &mut out);
    assert_eq!(out, [0, 5, 6, 8]);
    active_rows(&[], &mut out);
    assert!(out.is_empty());
    let mut rng = Rng(41);
    for sparsity in SPARSITIES {
        let v: Vec<f32> = (0..1007).map(|_| if rng.next_u64() % 100 < sparsity { -rng.signed().abs() } else { rng.signed().abs() }).collect();
        active_rows(&v, &mut out);
        let want: Vec<u32> = (0..v.len() as u32).filter(|&i| v[i as usize] > 0.0).collect();
        assert_eq!(out, want, "{sparsity}%");
    }
}

/// The whole sparse FFN of one token against the dense one: active neurons from the gate,
/// their up rows, and the down projection as a sum of `down_t` rows.
#[test]
fn sparse_relu_ffn_matches_the_dense_one() {
    let mut rng = Rng(51);
    let (n_ff, n_embd) = (1536, 576);
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0] {
        let (gate, _) = random_matrix(&mut rng, n_ff, n_embd, ty);
        let (up, _) = random_matrix(&mut rng, n_ff, n_embd, ty);
        let (down, _) = random_matrix(&mut rng, n_embd, n_ff, ty);
        let down_t = transpose_matrix(&down, GgmlType::F32).unwrap();
        let x = rng.vec(n_embd);
        let acts = Activations::new(&x, 1).with_precision(Precision::F32);
        let (mut g, mut u) = (vec![0.0; n_ff], vec![0.0; n_ff]);
        matmul(&gate, &acts, &mut g);
        matmul(&up, &acts, &mut u);
        let h_dense: Vec<f32> = g.iter().zip(&u).map(|(&g, &u)| g.max(0.0) * u).collect();
        let mut dense = vec![0.0; n_embd];
        matmul(&down, &Activations::new(&h_dense, 1).with_precision(Precision::F32), &mut dense);

        let mut active = Vec::new();
        active_rows(&g, &mut active);
        assert!(active.len() > n_ff / 4 && active.len() < 3 * n_ff / 4, "{} active", active.len());
        let (mut g2, mut u2) = (vec![0.0; n_ff], vec![0.0; n_ff]);
        let all: Vec<u32> = (0..n_ff as u32).collect();
        matvec_rows(&gate, &acts, &all, &mut g2);
        matvec_rows(&up, &acts, &active, &mut u2);
        let mut h = vec![0.0; n_ff];
        for &i in &active {
            h[i as usize] = g2[i as usize] * u2[i as usize];
        }
        let mut sparse_out = vec![0.0; n_embd];
        axpy_rows(&down_t, &h, &active, &mut sparse_out);
        let norm = dense.iter().map(|v| v * v).sum::<f32>().sqrt();
        for j in 0..n_embd {
            assert!((sparse_out[j] - dense[j]).abs() <= 1e-5 * norm, "{ty} col {j}: {} vs {}", sparse_out[j], dense[j]);
        }
    }
}

/// A Q5_0 matrix (a type the loader would convert) from random quants with a small scale.
fn random_q5_0(rng: &mut Rng, rows: usize, cols: usize) -> Matrix {
    let mut bytes = Vec::new();
    for _ in 0..rows * cols / 32 {
        bytes.extend_from_slice(&f16::from_f32(0.01 + 0.01 * rng.signed().abs()).to_le_bytes());
        bytes.extend((0..20).map(|_| rng.next_u64() as u8));
    }
    Matrix::from_raw("q5", rows, cols, GgmlType::Q5_0, &bytes)
}

#[test]
fn matvec_rows_follows_matmul_at_f32_precision_for_other_types_and_transposes_them() {
    let mut rng = Rng(61);
    let (rows, cols) = (70, 96);
    let w = random_q5_0(&mut rng, rows, cols);
    let x = rng.vec(cols);
    let mut dense = vec![0.0; rows];
    matmul(&w, &Activations::new(&x, 1).with_precision(Precision::F32), &mut dense);
    let listed = random_subset(&mut rng, rows, 50);
    let mut out = vec![UNTOUCHED; rows];
    matvec_rows(&w, &Activations::new(&x, 1).with_precision(Precision::F32), &listed, &mut out);
    for &r in &listed {
        assert_eq!(out[r as usize].to_bits(), dense[r as usize].to_bits(), "row {r}");
    }
    let t = transpose_matrix(&w, GgmlType::F32).unwrap();
    for c in 0..cols {
        let want: Vec<f32> = (0..rows).map(|r| w.row_f32(r)[c]).collect();
        assert_eq!(t.row_f32(c), want, "column {c}");
    }
}

/// BF16 has no CPU kernel (the loader converts it to F32): a row product over one is a bug in
/// the caller, and says so, rather than computing garbage.
#[test]
#[should_panic(expected = "no CPU kernel for BF16")]
fn matvec_rows_has_no_integer_kernel_where_matmul_has_none() {
    let mut rng = Rng(62);
    let bytes: Vec<u8> = (0..8 * 256 * 2).map(|_| rng.next_u64() as u8).collect();
    let w = Matrix::from_raw("bf16", 8, 256, GgmlType::BF16, &bytes);
    let x = rng.vec(256);
    matvec_rows(&w, &Activations::new(&x, 1), &[1], &mut [0.0; 8]);
}

/// The fused pass (gate and up dots, activation, AXPY) gives bit for bit what the three
/// operators give in turn, with the gate computed inside or handed in, for any thread count.
#[test]
fn gated_ffn_rows_equals_the_unfused_operators() {
    use ember::model::Activation;
    let mut rng = Rng(41);
    for (ty, down_ty, n_ff, n_embd) in [(GgmlType::Q8_0, GgmlType::Q8_0, 1007, 96), (GgmlType::Q4_0, GgmlType::Q8_0, 2000, 64), (GgmlType::F16, GgmlType::F16, 333, 37)] {
        let (gate, _) = random_matrix(&mut rng, n_ff, n_embd, ty);
        let (up, _) = random_matrix(&mut rng, n_ff, n_embd, ty);
        let (down_t, _) = random_matrix(&mut rng, n_ff, n_embd, down_ty);
        let x = rng.vec(n_embd);
        for precision in [Precision::Llama, Precision::F32] {
            for act in [Activation::Relu, Activation::Silu] {
                for sparsity in SPARSITIES {
                    let active = random_subset(&mut rng, n_ff, sparsity);
                    let acts = Activations::new(&x, 1).with_precision(precision);
                    let (mut g, mut u) = (vec![0.0; n_ff], vec![0.0; n_ff]);
                    matvec_rows_pair(&gate, &up, &acts, &active, &mut g, &mut u);
                    let mut h = vec![0.0; n_ff];
                    for &i in &active {
                        h[i as usize] = ember::cpu::ops::activate(act, g[i as usize]) * u[i as usize];
                    }
                    let mut want = vec![0.0; n_embd];
                    axpy_rows(&down_t, &h, &active, &mut want);
                    for threads in [1, 3] {
                        for given in [None, Some(g.as_slice())] {
                            let mut got = vec![f32::NAN; n_embd];
                            pool(threads).install(|| sparse::gated_ffn_rows(&gate, &up, &down_t, &acts, act, given, &active, &mut got));
                            assert!(
                                got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{ty}/{down_ty} {precision:?} {act:?} sparsity {sparsity}% threads {threads} gate given {}",
                                given.is_some()
                            );
                        }
                    }
                }
            }
        }
    }
}

/// `ffn_over_ranges`'s documented order, from the unfused operators and the scalar row AXPY:
/// per range of `neuron_range_len` neurons, the kept candidates' `act(g)·u·down_t[i]` in
/// ascending order from zero, then the range sums added in range order.
#[allow(clippy::too_many_arguments)]
fn ranged_ffn_in_documented_order(
    gate: &Matrix,
    up: &Matrix,
    down_t: &Matrix,
    acts: &Activations,
    act: ember::model::Activation,
    candidates: &[u32],
    keep: impl Fn(f32) -> bool,
) -> (Vec<f32>, sparse::RangeCounts) {
    let (n_ff, cols) = (gate.rows, down_t.cols);
    let (mut g, mut u) = (vec![0.0; n_ff], vec![0.0; n_ff]);
    matvec_rows_pair(gate, up, acts, candidates, &mut g, &mut u);
    let range_len = sparse::neuron_range_len(n_ff);
    let mut counts = sparse::RangeCounts { gated: candidates.len(), active: 0 };
    let mut out: Option<Vec<f32>> = None;
    for start in (0..n_ff).step_by(range_len) {
        let mut acc = vec![0.0f32; cols];
        for &i in candidates.iter().filter(|&&i| (start..start + range_len).contains(&(i as usize))) {
            let i = i as usize;
            if !keep(g[i]) {
                continue;
            }
            counts.active += 1;
            let h = ember::cpu::ops::activate(act, g[i]) * u[i];
            if h == 0.0 {
                continue;
            }
            let row = &down_t.bytes()[i * down_t.row_bytes()..(i + 1) * down_t.row_bytes()];
            match down_t.ty {
                GgmlType::F32 => sparse::reference::axpy_row_f32(bytemuck::cast_slice(row), h, &mut acc),
                GgmlType::F16 => sparse::reference::axpy_row_f16(bytemuck::cast_slice(row), h, &mut acc),
                GgmlType::Q8_0 => sparse::reference::axpy_row_q8_0(bytemuck::cast_slice(row), h, &mut acc),
                GgmlType::Q4_0 => sparse::reference::axpy_row_q4_0(bytemuck::cast_slice(row), h, &mut acc),
                _ => unreachable!(),
            }
        }
        match &mut out {
            None => out = Some(acc),
            Some(o) => o.iter_mut().zip(&acc).for_each(|(a, b)| *a += b),
        }
    }
    (out.unwrap_or_else(|| vec![0.0; cols]), counts)
}

/// The ranged FFN over bundled up/down rows gives its documented sum bit for bit, for any
/// thread count, whichever neurons are candidates (all: `--ffn relu`; a subset: predicted),
/// and counts the neurons it gated and kept.
#[test]
fn ffn_over_ranges_follows_its_documented_order_for_any_thread_count() {
    use ember::model::Activation;
    let mut rng = Rng(43);
    // 1007 neurons make two ranges and a short one; 300 a single range.
    for (ty, down_ty, n_ff, n_embd) in [(GgmlType::Q8_0, GgmlType::Q8_0, 1007, 96), (GgmlType::Q4_0, GgmlType::Q8_0, 2000, 64), (GgmlType::F16, GgmlType::F16, 300, 37), (GgmlType::Q4_1, GgmlType::Q4_0, 1100, 64)] {
        let (gate, _) = random_matrix(&mut rng, n_ff, n_embd, ty);
        let (up, _) = random_matrix(&mut rng, n_ff, n_embd, ty);
        let (down_t, _) = random_matrix(&mut rng, n_ff, n_embd, down_ty);
        let bundle = sparse::NeuronBundle::new(&up, &down_t);
        assert_eq!(bundle.n_neurons(), n_ff);
        assert!(bundle.n_bytes() >= up.n_bytes() + down_t.n_bytes());
        let x = rng.vec(n_embd);
        for precision in [Precision::Llama, Precision::F32] {
            for (act, sparsity) in [(Activation::Relu, 0), (Activation::Relu, 60), (Activation::Silu, 0), (Activation::Silu, 90)] {
                let candidates = random_subset(&mut rng, n_ff, sparsity);
                let acts = Activations::new(&x, 1).with_precision(precision);
                let keep = |g: f32| ember::cpu::ops::activate(act, g) != 0.0;
                let (want, want_counts) = ranged_ffn_in_documented_order(&gate, &up, &down_t, &acts, act, &candidates, keep);
                if act == Activation::Relu {
                    // About half of the gates are negative: those neurons cost no up or down row.
                    assert!(want_counts.active < want_counts.gated * 3 / 4 && want_counts.active > want_counts.gated / 4, "{want_counts:?}");
                }
                let list = |range: std::ops::Range<usize>, out: &mut Vec<u32>| out.extend(candidates.iter().copied().filter(|&i| range.contains(&(i as usize))));
                for threads in [1, 2, 3] {
                    let mut got = vec![f32::NAN; n_embd];
                    let counts = pool(threads).install(|| sparse::ffn_over_ranges(&gate, &bundle, &acts, act, list, keep, &mut got));
                    let what = format!("{ty}/{down_ty} {precision:?} {act:?} {sparsity}% threads {threads}");
                    assert_eq!(counts, want_counts, "{what}");
                    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: {:?} vs {:?}", &got[..4], &want[..4]);
                }
            }
        }
    }
}

#[test]
#[should_panic(expected = "outside its range")]
fn ffn_over_ranges_refuses_a_candidate_outside_its_range() {
    let mut rng = Rng(44);
    let (gate, _) = random_matrix(&mut rng, 900, 64, GgmlType::Q8_0);
    let (up, _) = random_matrix(&mut rng, 900, 64, GgmlType::Q8_0);
    let (down_t, _) = random_matrix(&mut rng, 900, 64, GgmlType::Q8_0);
    let bundle = sparse::NeuronBundle::new(&up, &down_t);
    let x = rng.vec(64);
    // Every range lists neuron 0.
    sparse::ffn_over_ranges(&gate, &bundle, &Activations::new(&x, 1), ember::model::Activation::Relu, |_, out: &mut Vec<u32>| out.push(0), |_| true, &mut [0.0; 64]);
}

/// `row_dots_serial` gives `matvec_rows`' (so the dense matmul's) values by list position.
#[test]
fn row_dots_serial_equals_dense_matmul_by_position() {
    let mut rng = Rng(61);
    for ty in TYPES {
        for (rows, cols) in shapes(ty) {
            let (w, _) = random_matrix(&mut rng, rows, cols, ty);
            let x = rng.vec(cols);
            for precision in [Precision::Llama, Precision::F32] {
                let acts = Activations::new(&x, 1).with_precision(precision);
                let mut dense = vec![0.0; rows];
                matmul(&w, &acts, &mut dense);
                for sparsity in SPARSITIES {
                    let mut listed = random_subset(&mut rng, rows, sparsity);
                    listed.reverse();
                    let mut vals = vec![UNTOUCHED; listed.len()];
                    sparse::row_dots_serial(&w, &acts, &listed, &mut vals);
                    for (k, &r) in listed.iter().enumerate() {
                        assert_eq!(vals[k].to_bits(), dense[r as usize].to_bits(), "{ty} {precision:?} {rows}x{cols} {sparsity}% position {k} row {r}");
                    }
                }
            }
        }
    }
}

/// With firing flags, `gated_ffn_chunks` over candidates gives exactly what it gives over the
/// flagged candidates alone (a candidate that does not fire costs its gate row, adds nothing).
#[test]
fn gated_ffn_chunks_with_firing_flags_equals_the_firing_subset() {
    let mut rng = Rng(62);
    for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::F16] {
        let (n_ff, n_embd) = (333, 96);
        let (gate, _) = random_matrix(&mut rng, n_ff, n_embd, ty);
        let (up, _) = random_matrix(&mut rng, n_ff, n_embd, ty);
        let (down_t, _) = random_matrix(&mut rng, n_ff, n_embd, GgmlType::Q8_0);
        let x = rng.vec(n_embd);
        let acts = Activations::new(&x, 1).with_precision(Precision::F32);
        for act in [ember::model::Activation::Silu, ember::model::Activation::Relu] {
            for sparsity in SPARSITIES {
                let candidates = random_subset(&mut rng, n_ff, sparsity);
                let fires: Vec<bool> = candidates.iter().map(|_| rng.next_u64().is_multiple_of(3)).collect();
                let firing: Vec<u32> = candidates.iter().zip(&fires).filter(|(_, &f)| f).map(|(&c, _)| c).collect();
                let run = |list: &[u32], flags: Option<&[bool]>| {
                    let mut acc = vec![0.0f32; n_embd];
                    sparse::gated_ffn_chunks(&gate, &up, &down_t, &acts, act, None, list, flags, |sum| sum(0, list.len(), &mut acc));
                    acc
                };
                let (a, b) = (run(&candidates, Some(&fires)), run(&firing, None));
                assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()), "{ty} {act:?} {sparsity}%: flags over candidates differ from the firing subset");
                // (A ReLU neuron whose random gate is negative adds nothing.)
                if !firing.is_empty() && act == ember::model::Activation::Silu {
                    assert!(b.iter().any(|&v| v != 0.0), "{ty} {act:?} {sparsity}%: nothing computed");
                }
            }
        }
    }
}
