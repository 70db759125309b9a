//! The new block types' dot products against llama.cpp's own results.
//!
//! `tests/refs/kquant_llama_dots.txt` holds what llama.cpp (build 0c1e570, x86 CPU backend,
//! compiled with -march=native on an AVX-512 Sapphire Rapids VM) returns from
//! `ggml_get_type_traits_cpu(T)->vec_dot` after quantising the activations with its own
//! `from_float`, for weights and activations drawn from the generator below (a small C program
//! drew the same numbers: xorshift64, exact integer-to-float steps only). Each line: type,
//! blocks, the result's f32 bits, the value. The Q2_K and Q3_K lines come from
//! `tests/refs/tools/kquant_dots.c` (see tests/refs/README.md).

use ember::quant::blocks::WeightBlock;
mod common;

use ember::cpu::sparse::matvec_rows;
use ember::cpu::{matmul, Activations, Precision};
use ember::gguf::GgmlType;
use ember::quant::{self, f16, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8K, BlockQ8_0, BlockQ8_1};

struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 32) as u32
    }
    fn float(&mut self) -> f32 {
        ((self.next() >> 8) as i32 - (1 << 23)) as f32 * (1.0 / (1 << 23) as f32)
    }
    fn half(&mut self) -> [u8; 2] {
        let u = self.next();
        (0x2000 | (u & 0x0FFF) | (u & 0x8000)).to_le_bytes()[..2].try_into().unwrap()
    }
}

/// Type number, block elements, block bytes, offsets of the f16 fields the generator sets.
const TYPES: [(&str, u32, usize, usize, &[usize]); 7] = [
    ("q2_K", 10, 256, 84, &[80, 82]),
    ("q3_K", 11, 256, 110, &[108]),
    ("q5_0", 6, 32, 22, &[0]),
    ("q5_1", 7, 32, 24, &[0, 2]),
    ("q4_K", 12, 256, 144, &[0, 2]),
    ("q5_K", 13, 256, 176, &[0, 2]),
    ("q6_K", 14, 256, 210, &[208]),
];

fn ember_dot(name: &str, w: &[u8], a: &[f32]) -> f32 {
    let n = a.len();
    match name {
        "q5_0" | "q5_1" => {
            if name == "q5_0" {
                let mut y = vec![BlockQ8_0 { d: f16::ZERO, qs: [0; 32] }; n / 32];
                quant::quantize_row_q8_0(a, &mut y);
                BlockQ5_0::dot(bytemuck::cast_slice(w), &y)
            } else {
                let mut y = vec![BlockQ8_1 { d: f16::ZERO, s: f16::ZERO, qs: [0; 32] }; n / 32];
                quant::quantize_row_q8_1(a, &mut y);
                BlockQ5_1::dot(bytemuck::cast_slice(w), &y)
            }
        }
        _ => {
            let mut y = vec![BlockQ8K::ZERO; n / 256];
            quant::quantize_row_q8_k(a, &mut y);
            match name {
                "q4_K" => BlockQ4K::dot(bytemuck::cast_slice(w), &y),
                "q5_K" => BlockQ5K::dot(bytemuck::cast_slice(w), &y),
                "q2_K" => BlockQ2K::dot(bytemuck::cast_slice(w), &y),
                "q3_K" => BlockQ3K::dot(bytemuck::cast_slice(w), &y),
                _ => BlockQ6K::dot(bytemuck::cast_slice(w), &y),
            }
        }
    }
}

#[test]
fn dots_equal_llama_cpp_bit_for_bit() {
    let refs = include_str!("refs/kquant_llama_dots.txt");
    let mut checked = 0;
    for line in refs.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (name, nb, bits) = (f[0], f[1].parse::<usize>().unwrap(), u32::from_str_radix(f[2], 16).unwrap());
        let &(_, ty, bl, bsz, halves) = TYPES.iter().find(|t| t.0 == name).unwrap();
        let mut g = Gen(0x9E37_79B9_7F4A_7C15 ^ u64::from(ty * 1000 + nb as u32));
        // Blocks are read unaligned from a Vec<u8>; copy into u32 words for the casts.
        let mut w: Vec<u8> = (0..bsz * nb).map(|_| g.next() as u8).collect();
        for b in 0..nb {
            for &off in halves {
                let h = g.half();
                w[b * bsz + off..b * bsz + off + 2].copy_from_slice(&h);
            }
        }
        let a: Vec<f32> = (0..bl * nb).map(|_| g.float()).collect();
        let mut words = vec![0u32; w.len().div_ceil(4)];
        bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..w.len()].copy_from_slice(&w);
        let got = ember_dot(name, &bytemuck::cast_slice::<u32, u8>(&words)[..w.len()], &a);
        assert_eq!(got.to_bits(), bits, "{name} x {nb} blocks: ember {got}, llama.cpp {}", f32::from_bits(bits));
        checked += 1;
    }
    assert_eq!(checked, 28);
}

/// One weight type's row dot against Q8_K activations (the kernel `matmul` runs for it).
fn k_dot(ty: GgmlType, row: &[u8], y: &[BlockQ8K]) -> f32 {
    match ty {
        GgmlType::Q2_K => BlockQ2K::dot(bytemuck::cast_slice(row), y),
        GgmlType::Q3_K => BlockQ3K::dot(bytemuck::cast_slice(row), y),
        GgmlType::Q4_K => BlockQ4K::dot(bytemuck::cast_slice(row), y),
        GgmlType::Q5_K => BlockQ5K::dot(bytemuck::cast_slice(row), y),
        _ => BlockQ6K::dot(bytemuck::cast_slice(row), y),
    }
}

/// The decode matvec (one token) and the batched product (several tokens) of the K-quant
/// matrices, at odd row counts and several widths, for 1 and 3 threads: every output is bit
/// for bit the row kernel's dot with that token's Q8_K activations, independent of the thread
/// count, and within rounding of a plain f64 dequantise-then-dot of the same numbers; the sparse
/// row gather gives the same bits on any listed subset.
#[test]
fn k_quant_products_equal_the_row_kernel_and_a_dequantised_reference() {
    let mut rng = common::Rng(0x2b3b);
    let pools: Vec<rayon::ThreadPool> = [1, 3].iter().map(|&n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap()).collect();
    for ty in [GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
        for (rows, cols, n_tokens) in [(37, 256, 1), (37, 768, 5), (3, 1280, 2), (129, 512, 1)] {
            let w = common::matrix(ty, rows, cols, &mut rng);
            let x = rng.vec(cols * n_tokens);
            let mut y = vec![BlockQ8K::ZERO; cols * n_tokens / 256];
            quant::quantize_row_q8_k(&x, &mut y);
            let per = cols / 256;
            let rb = w.row_bytes();
            let mut first: Option<Vec<f32>> = None;
            for pool in &pools {
                let mut out = vec![f32::NAN; rows * n_tokens];
                pool.install(|| matmul(&w, &Activations::new(&x, n_tokens).with_precision(Precision::Llama), &mut out));
                for t in 0..n_tokens {
                    let yt = &y[t * per..(t + 1) * per];
                    let ya: Vec<f64> = yt.iter().flat_map(|b| b.qs.iter().map(move |&q| f64::from(q) * f64::from(b.d))).collect();
                    for r in 0..rows {
                        let got = out[t * rows + r];
                        let want = k_dot(ty, &w.bytes()[r * rb..(r + 1) * rb], yt);
                        assert_eq!(got.to_bits(), want.to_bits(), "{ty} {rows}x{cols} token {t} row {r}: {got} vs the row kernel's {want}");
                        let wr = w.row_f32(r);
                        let plain: f64 = wr.iter().zip(&ya).map(|(&a, b)| f64::from(a) * b).sum();
                        let mag: f64 = wr.iter().zip(&ya).map(|(&a, b)| (f64::from(a) * b).abs()).sum();
                        assert!((f64::from(got) - plain).abs() <= 1e-5 * mag + 1e-6, "{ty} {rows}x{cols} token {t} row {r}: {got} vs plain {plain}");
                    }
                }
                match &first {
                    None => first = Some(out),
                    Some(f) => assert!(f.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()), "{ty} {rows}x{cols}: thread counts differ"),
                }
            }
            // The sparse gather (one token): listed rows only, same bits as the dense product.
            let x1 = &x[..cols];
            let mut dense = vec![0.0; rows];
            matmul(&w, &Activations::new(x1, 1), &mut dense);
            let listed: Vec<u32> = (0..rows as u32).filter(|_| rng.next_u64() % 3 != 0).collect();
            let mut got = vec![-1.0f32; rows];
            pools[1].install(|| matvec_rows(&w, &Activations::new(x1, 1), &listed, &mut got));
            for r in 0..rows {
                let want = if listed.contains(&(r as u32)) { dense[r] } else { -1.0 };
                assert_eq!(got[r].to_bits(), want.to_bits(), "{ty} {rows}x{cols} gathered row {r}");
            }
        }
    }
}
