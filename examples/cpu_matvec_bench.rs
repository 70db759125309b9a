//! Single-thread decode matrix-vector throughput of the CPU kernels (the packed ones where the
//! CPU has them), rotating over more matrices than the caches hold (as a token does), next
//! to a plain streaming read of as many bytes (the memory's ceiling on this core).
//!
//! `cargo run --release --example cpu_matvec_bench [TYPE] [ROWS] [COLS] [MIB]`

use ember::cpu::{matmul, Activations};
use ember::gguf::GgmlType;
use ember::model::Matrix;
use std::time::Instant;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ty = match args.get(1).map(String::as_str).unwrap_or("q4_1") {
        "q4_0" => GgmlType::Q4_0,
        "q8_0" => GgmlType::Q8_0,
        _ => GgmlType::Q4_1,
    };
    let rows: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(1536);
    let cols: usize = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(576);
    let mib: usize = args.get(4).and_then(|v| v.parse().ok()).unwrap_or(96);
    let v = random(rows * cols, 7);
    let bytes: Vec<u8> = match ty {
        GgmlType::Q4_0 => bytemuck::cast_slice(&ember::quant::quantize_q4_0(&v)).to_vec(),
        GgmlType::Q8_0 => bytemuck::cast_slice(&ember::quant::quantize_q8_0(&v)).to_vec(),
        _ => bytemuck::cast_slice(&ember::quant::quantize_q4_1(&v)).to_vec(),
    };
    let n = (mib << 20) / bytes.len() + 1;
    let mats: Vec<Matrix> = (0..n).map(|i| Matrix::from_raw(&format!("m{i}"), rows, cols, ty, &bytes)).collect();
    let total = (n * bytes.len()) as f64;
    let x = random(cols, 3);
    let mut out = vec![0.0f32; rows];
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    pool.install(|| {
        for m in &mats {
            m.packed();
        }
        // Best of 12: other processes on a shared machine only ever slow a run down.
        let (mut best_mv, mut best_read, mut sum) = (f64::MAX, f64::MAX, 0u64);
        for _ in 0..12 {
            let t = Instant::now();
            for m in &mats {
                matmul(m, &Activations::new(&x, 1), &mut out);
            }
            best_mv = best_mv.min(t.elapsed().as_secs_f64());
        }
        // Separately: a read of the GGUF bytes in between would evict the packed copy from a
        // last-level cache large enough to hold it, which a model's decode does not do.
        for _ in 0..3 {
            let t = Instant::now();
            for m in &mats {
                sum = sum.wrapping_add(m.bytes().chunks_exact(64).map(|c| u64::from(c[0])).sum::<u64>());
            }
            best_read = best_read.min(t.elapsed().as_secs_f64());
        }
        println!("{ty} {rows}x{cols} x{n} ({:.0} MiB): matvec {:.2} GB/s ({:.2} ms), streaming read {:.2} GB/s ({})", total / 1048576.0, total / best_mv / 1e9, best_mv * 1e3, total / best_read / 1e9, sum % 2);
    });
}
