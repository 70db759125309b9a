//! The new block types' dot products against llama.cpp's own results.
//!
//! `tests/refs/kquant_llama_dots.txt` holds what llama.cpp (build 0c1e570, x86 CPU backend,
//! compiled with -march=native on an AVX-512 Sapphire Rapids VM) returns from
//! `ggml_get_type_traits_cpu(T)->vec_dot` after quantising the activations with its own
//! `from_float`, for weights and activations drawn from the generator below (a small C program
//! drew the same numbers: xorshift64, exact integer-to-float steps only). Each line: type,
//! blocks, the result's f32 bits, the value.

use ember::quant::blocks::WeightBlock;
use ember::quant::{self, f16, BlockQ4K, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8K, BlockQ8_0, BlockQ8_1};

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
const TYPES: [(&str, u32, usize, usize, &[usize]); 5] = [
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
    assert_eq!(checked, 20);
}
