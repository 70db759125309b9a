//! Quantisation formats and dot kernels: dequantisation against hand-computed values and small
//! decoders written from the format definitions, quantiser round trips, SIMD against scalar
//! (bit-exact, as both follow llama.cpp's operation order) and dots against f64.

use ember::gguf::GgmlType;
use ember::quant::{self, f16, reference, BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1, QuantError, QK};

/// splitmix64: small, seedable, good enough to spread test inputs.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
    /// Uniform in [-1, 1), never exactly zero.
    fn unit(&mut self) -> f32 {
        let v = (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
        if v == 0.0 {
            0.5
        } else {
            v
        }
    }
    /// Nonzero values over a few orders of magnitude, like activations with outliers.
    fn activation(&mut self) -> f32 {
        let scale = [0.01, 0.1, 1.0, 1.0, 1.0, 3.0, 20.0][(self.next_u64() % 7) as usize];
        self.unit() * scale
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.activation()).collect()
    }
    fn i8(&mut self, lo: i8, hi: i8) -> i8 {
        (i64::from(lo) + (self.next_u64() % (i64::from(hi) - i64::from(lo) + 1) as u64) as i64) as i8
    }
}

fn h(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

fn deq(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; n];
    quant::dequantize(ty, bytes, &mut out).unwrap_or_else(|e| panic!("dequantize {ty}: {e}"));
    out
}

/// Bitwise comparison that treats every NaN alike.
fn assert_same(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "{what}[{i}]: got {g:e}, want {w:e}"
        );
    }
}

// ---------------------------------------------------------------- dequantisation: plain types

#[test]
fn dequantize_f32_f16_bf16_edge_values() {
    let f32s = [0.0f32, -0.0, 1.5, -3.25e-7, f32::MAX, f32::MIN_POSITIVE, 1e-45, f32::INFINITY];
    let bytes: Vec<u8> = f32s.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_same(&deq(GgmlType::F32, &bytes, f32s.len()), &f32s, "F32");

    let f16s: [(u16, f32); 11] = [
        (0x0000, 0.0),
        (0x8000, -0.0),
        (0x3C00, 1.0),
        (0xC000, -2.0),
        (0x3555, 1365.0 / 4096.0),
        (0x7BFF, 65504.0),
        (0x0400, 1.0 / 16384.0),          // smallest normal, 2^-14
        (0x0001, 1.0 / 16_777_216.0),     // smallest subnormal, 2^-24
        (0x83FF, -1023.0 / 16_777_216.0), // largest subnormal, negative
        (0x7C00, f32::INFINITY),
        (0x7E00, f32::NAN),
    ];
    let bytes: Vec<u8> = f16s.iter().flat_map(|(b, _)| b.to_le_bytes()).collect();
    let want: Vec<f32> = f16s.iter().map(|&(_, v)| v).collect();
    assert_same(&deq(GgmlType::F16, &bytes, f16s.len()), &want, "F16");

    let bf16s: [(u16, f32); 9] = [
        (0x0000, 0.0),
        (0x8000, -0.0),
        (0x3F80, 1.0),
        (0xC040, -3.0),
        (0x3EAB, 171.0 / 512.0),
        (0x7F7F, 3.389_531_4e38),
        (0x0001, f32::from_bits(0x0001_0000)), // subnormal
        (0xFF80, f32::NEG_INFINITY),
        (0x7FC0, f32::NAN),
    ];
    let bytes: Vec<u8> = bf16s.iter().flat_map(|(b, _)| b.to_le_bytes()).collect();
    let want: Vec<f32> = bf16s.iter().map(|&(_, v)| v).collect();
    assert_same(&deq(GgmlType::BF16, &bytes, bf16s.len()), &want, "BF16");
}

// ---------------------------------------------------------------- dequantisation: 32-blocks

#[test]
fn dequantize_q4_0_and_q4_1_hand_values() {
    // qs[j] = j | (15 - j) << 4: element j (< 16) is j, element 16 + j is 15 - j.
    let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
    let nib = |e: usize| if e < 16 { e as f32 } else { (31 - e) as f32 };

    let mut q4_0 = h(-0.25).to_vec();
    q4_0.extend(&qs);
    let want: Vec<f32> = (0..32).map(|e| (nib(e) - 8.0) * -0.25).collect();
    assert_same(&deq(GgmlType::Q4_0, &q4_0, 32), &want, "Q4_0");
    assert_eq!(want[0], 2.0);
    assert_eq!(want[16], -1.75);

    let mut q4_1 = [h(0.5), h(-3.0)].concat();
    q4_1.extend(&qs);
    let want: Vec<f32> = (0..32).map(|e| nib(e) * 0.5 - 3.0).collect();
    assert_same(&deq(GgmlType::Q4_1, &q4_1, 32), &want, "Q4_1");
    assert_eq!((want[0], want[15], want[16]), (-3.0, 4.5, 4.5));
}

#[test]
fn dequantize_q5_0_q5_1_q8_0_hand_values() {
    let mut rng = Rng(5);
    let qs = rng.bytes(16);
    let qh = rng.bytes(4);
    let qh32 = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let q5 = |e: usize| {
        let nib = if e < 16 { qs[e] & 15 } else { qs[e - 16] >> 4 };
        f32::from(nib) + if qh32 >> e & 1 == 1 { 16.0 } else { 0.0 }
    };

    let block = [&h(0.125)[..], &qh, &qs].concat();
    let want: Vec<f32> = (0..32).map(|e| (q5(e) - 16.0) * 0.125).collect();
    assert_same(&deq(GgmlType::Q5_0, &block, 32), &want, "Q5_0");

    let block = [&h(0.25)[..], &h(-2.5), &qh, &qs].concat();
    let want: Vec<f32> = (0..32).map(|e| q5(e) * 0.25 - 2.5).collect();
    assert_same(&deq(GgmlType::Q5_1, &block, 32), &want, "Q5_1");

    let q8: Vec<i8> = (0..32).map(|e| (e as i8 - 16) * 8).collect();
    let block = [&h(-0.5)[..], bytemuck::cast_slice(&q8)].concat();
    let want: Vec<f32> = q8.iter().map(|&q| f32::from(q) * -0.5).collect();
    assert_same(&deq(GgmlType::Q8_0, &block, 32), &want, "Q8_0");
    assert_eq!((want[0], want[31]), (64.0, -60.0));
}

#[test]
fn block_structs_match_gguf_layout() {
    assert_eq!(std::mem::size_of::<BlockQ4_0>(), GgmlType::Q4_0.block_bytes());
    assert_eq!(std::mem::size_of::<BlockQ4_1>(), GgmlType::Q4_1.block_bytes());
    assert_eq!(std::mem::size_of::<BlockQ8_0>(), GgmlType::Q8_0.block_bytes());
    assert_eq!(std::mem::size_of::<BlockQ8_1>(), GgmlType::Q8_1.block_bytes());
    let b = BlockQ4_1 { d: f16::from_f32(2.0), m: f16::from_f32(-1.0), qs: [0x21; 16] };
    let got = deq(GgmlType::Q4_1, bytemuck::bytes_of(&b), 32);
    assert_eq!((got[0], got[16]), (1.0, 3.0));
}

// ---------------------------------------------------------------- dequantisation: K-quants
//
// Scales are powers of two and quants small integers, so every value is exact in f32 and the
// expected numbers do not depend on the order of operations.

/// Packs eight 6-bit scales and mins the way Q4_K/Q5_K store them.
fn pack_k4(sc: [u8; 8], mn: [u8; 8]) -> [u8; 12] {
    let mut p = [0u8; 12];
    for j in 0..4 {
        p[j] = sc[j] | (sc[j + 4] >> 4) << 6;
        p[j + 4] = mn[j] | (mn[j + 4] >> 4) << 6;
        p[j + 8] = (sc[j + 4] & 15) | (mn[j + 4] & 15) << 4;
    }
    p
}

#[test]
fn dequantize_q4_k_known_scales_and_mins() {
    let sc = [1u8, 2, 3, 63, 17, 40, 5, 62];
    let mn = [0u8, 1, 2, 3, 33, 48, 63, 7];
    let (d, dmin) = (0.5f32, 0.25f32);
    let qs: Vec<u8> = (0..128).map(|i| (i * 7 % 16) as u8 | ((i * 3 % 16) as u8) << 4).collect();
    let block = [&h(d)[..], &h(dmin), &pack_k4(sc, mn), &qs].concat();
    // Element 64c + l (l < 32) is the low nibble of qs[32c + l] with sub-block 2c;
    // element 64c + 32 + l the high nibble with sub-block 2c + 1.
    let mut want = Vec::new();
    for c in 0..4 {
        for (sub, shift) in [(2 * c, 0), (2 * c + 1, 4)] {
            for l in 0..32 {
                let q = (qs[32 * c + l] >> shift) & 15;
                want.push(d * f32::from(sc[sub]) * f32::from(q) - dmin * f32::from(mn[sub]));
            }
        }
    }
    let got = deq(GgmlType::Q4_K, &block, 256);
    assert_same(&got, &want, "Q4_K");
    // Spot values by hand: element 0: q = 0, sc 1, min 0 -> 0; element 255: q = qs[127] >> 4 =
    // (127*3 % 16) = 13, sub-block 7 (sc 62, min 7) -> 0.5*62*13 - 0.25*7 = 401.25.
    assert_eq!((got[0], got[255]), (0.0, 401.25));
}

#[test]
fn dequantize_q5_k_random_block() {
    let mut rng = Rng(55);
    let sc: [u8; 8] = std::array::from_fn(|_| rng.byte() & 63);
    let mn: [u8; 8] = std::array::from_fn(|_| rng.byte() & 63);
    let (qh, qs) = (rng.bytes(32), rng.bytes(128));
    let (d, dmin) = (0.0625f32, 0.125f32);
    let block = [&h(d)[..], &h(dmin), &pack_k4(sc, mn), &qh, &qs].concat();
    let mut want = Vec::new();
    for sub in 0..8 {
        for l in 0..32 {
            let byte = qs[32 * (sub / 2) + l];
            let low = if sub % 2 == 0 { byte & 15 } else { byte >> 4 };
            let q = low + ((qh[l] >> sub) & 1) * 16;
            want.push(d * f32::from(sc[sub]) * f32::from(q) - dmin * f32::from(mn[sub]));
        }
    }
    assert_same(&deq(GgmlType::Q5_K, &block, 256), &want, "Q5_K");
}

#[test]
fn dequantize_q2_k_random_block() {
    let mut rng = Rng(22);
    let (scales, qs) = (rng.bytes(16), rng.bytes(64));
    let (d, dmin) = (0.25f32, 0.0625f32);
    let block = [&scales[..], &qs, &h(d), &h(dmin)].concat();
    // Walk the format: two halves of 128, each reading 32 quant bytes at shifts 0, 2, 4, 6,
    // 16 elements per scale byte.
    let mut want = Vec::new();
    let mut is = 0;
    for half in 0..2 {
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let s = scales[is];
                is += 1;
                for l in 0..16 {
                    let q = (qs[32 * half + 16 * part + l] >> shift) & 3;
                    want.push(d * f32::from(s & 15) * f32::from(q) - dmin * f32::from(s >> 4));
                }
            }
        }
    }
    assert_same(&deq(GgmlType::Q2_K, &block, 256), &want, "Q2_K");
}

#[test]
fn dequantize_q3_k_random_block() {
    let mut rng = Rng(33);
    let (hmask, qs, scales) = (rng.bytes(32), rng.bytes(64), rng.bytes(12));
    let d = 0.5f32;
    let block = [&hmask[..], &qs, &scales, &h(d)].concat();
    // Unpack the sixteen 6-bit scales with 32-bit masks over the 12 bytes.
    let w = |i: usize| u32::from_le_bytes(scales[4 * i..4 * i + 4].try_into().unwrap());
    let (a0, a1, t) = (w(0), w(1), w(2));
    let (m2, m4) = (0x0303_0303u32, 0x0f0f_0f0fu32);
    let words = [
        (a0 & m4) | (t & m2) << 4,
        (a1 & m4) | ((t >> 2) & m2) << 4,
        ((a0 >> 4) & m4) | ((t >> 4) & m2) << 4,
        ((a1 >> 4) & m4) | ((t >> 6) & m2) << 4,
    ];
    let sc: Vec<i32> = words.iter().flat_map(|w| w.to_le_bytes()).map(|b| i32::from(b) - 32).collect();
    let mut want = Vec::new();
    let mut is = 0;
    for half in 0..2 {
        for j in 0..4 {
            let bit = 4 * half + j;
            for part in 0..2 {
                let s = sc[is];
                is += 1;
                for l in 16 * part..16 * part + 16 {
                    let low = i32::from((qs[32 * half + l] >> (2 * j)) & 3);
                    let q = low - if hmask[l] >> bit & 1 == 1 { 0 } else { 4 };
                    want.push(d * s as f32 * q as f32);
                }
            }
        }
    }
    assert_same(&deq(GgmlType::Q3_K, &block, 256), &want, "Q3_K");
}

#[test]
fn dequantize_q6_k_random_block() {
    let mut rng = Rng(66);
    let (ql, qh) = (rng.bytes(128), rng.bytes(64));
    let scales: Vec<i8> = (0..16).map(|_| rng.i8(-128, 127)).collect();
    let d = 0.03125f32;
    let block = [&ql[..], &qh, bytemuck::cast_slice(&scales), &h(d)].concat();
    let mut want = vec![0.0f32; 256];
    for half in 0..2 {
        let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &scales[8 * half..]);
        for l in 0..32 {
            let is = l / 16;
            let q = [
                (ql[l] & 15) | (qh[l] & 3) << 4,
                (ql[l + 32] & 15) | (qh[l] >> 2 & 3) << 4,
                (ql[l] >> 4) | (qh[l] >> 4 & 3) << 4,
                (ql[l + 32] >> 4) | (qh[l] >> 6 & 3) << 4,
            ];
            for k in 0..4 {
                want[128 * half + 32 * k + l] = d * f32::from(sc[is + 2 * k]) * (i32::from(q[k]) - 32) as f32;
            }
        }
    }
    assert_same(&deq(GgmlType::Q6_K, &block, 256), &want, "Q6_K");
}

#[test]
fn dequantize_q8_k_block() {
    let mut rng = Rng(88);
    let qs: Vec<i8> = (0..256).map(|_| rng.i8(-128, 127)).collect();
    let d = 0.001f32;
    let block = [&d.to_le_bytes()[..], bytemuck::cast_slice(&qs), &[0u8; 32]].concat();
    let want: Vec<f32> = qs.iter().map(|&q| d * f32::from(q)).collect();
    assert_same(&deq(GgmlType::Q8_K, &block, 256), &want, "Q8_K");
}

#[test]
fn dequantize_rejects_bad_input_without_panicking() {
    let mut out = vec![0.0f32; 64];
    assert!(matches!(quant::dequantize(GgmlType::I8, &[0; 64], &mut out), Err(QuantError::Unsupported(_))));
    assert!(matches!(quant::dequantize(GgmlType::Q8_1, &[0; 72], &mut out), Err(QuantError::Unsupported(_))));
    assert!(matches!(
        quant::dequantize(GgmlType::Q4_0, &[0; 35], &mut out),
        Err(QuantError::SourceLength { expected: 36, got: 35, .. })
    ));
    assert!(matches!(
        quant::dequantize(GgmlType::Q4_K, &[0; 144], &mut out),
        Err(QuantError::PartialBlock { .. })
    ));
    // Any length and any bytes: an error or a result, never a panic.
    let mut rng = Rng(1);
    for ty in GgmlType::ALL {
        for n in [0usize, 1, 31, 32, 256, 300] {
            for extra in [0i64, -1, 1] {
                let len = ty.bytes_for(n as u64).map_or(n as i64, |b| b as i64) + extra;
                let src = rng.bytes(len.max(0) as usize);
                let mut dst = vec![0.0f32; n];
                let _ = quant::dequantize(ty, &src, &mut dst);
            }
        }
    }
}

// ---------------------------------------------------------------- weight quantisers

/// Quantises random data of 37 blocks and checks every element is within `bound` of the input,
/// where `bound` gets the dequantised block.
fn round_trip<B: bytemuck::Pod>(ty: GgmlType, quantize: fn(&[f32]) -> Vec<B>, bound: impl Fn(&[u8]) -> f32) {
    let mut rng = Rng(ty as u64);
    // Mostly positive, with both signs, never zero.
    let x: Vec<f32> =
        (0..32 * 37).map(|_| rng.unit() * 4.0 + 1.0).map(|v| if v == 0.0 { 1.0 } else { v }).collect();
    let blocks = quantize(&x);
    assert_eq!(blocks.len(), 37);
    let bytes: &[u8] = bytemuck::cast_slice(&blocks);
    let y = deq(ty, bytes, x.len());
    for (b, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
        let limit = bound(&bytes[b * ty.block_bytes()..][..ty.block_bytes()]);
        for (xv, yv) in xs.iter().zip(ys) {
            assert!((xv - yv).abs() <= limit, "{ty} block {b}: {xv} -> {yv}, error above {limit}");
        }
    }
}

fn half_at(b: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

#[test]
fn weight_quantisers_round_trip() {
    // Q4_0 maps the largest magnitude to -8, so the other extreme can lose a whole step.
    round_trip(GgmlType::Q4_0, quant::quantize_q4_0, |b| half_at(b, 0).abs() * 1.01);
    round_trip(GgmlType::Q4_1, quant::quantize_q4_1, |b| half_at(b, 0) * 0.52 + half_at(b, 2).abs() * 1e-3);
    round_trip(GgmlType::Q8_0, quant::quantize_q8_0, |b| half_at(b, 0) * 0.57);
}

#[test]
fn weight_quantisers_match_ggml_reference_on_hand_input() {
    // Block 0..31 = e - 12 (amax 19 at e = 31, positive) -> Q4_0 d = 19 / -8.
    let x: Vec<f32> = (0..32).map(|e| e as f32 - 12.0).collect();
    let b = quant::quantize_q4_0(&x)[0];
    assert_eq!(b.d, f16::from_f32(-2.375));
    // x = -12: -12 / -2.375 + 8.5 = 13.55 -> 13; x = 19: -8 + 8.5 -> 0.
    assert_eq!((b.qs[0] & 15, b.qs[15] >> 4), (13, 0));

    let b = quant::quantize_q4_1(&x)[0];
    assert_eq!((b.d, b.m), (f16::from_f32(31.0 / 15.0), f16::from_f32(-12.0)));
    assert_eq!((b.qs[0] & 15, b.qs[15] >> 4), (0, 15));

    // Q8_0 reference rounds half away from zero: 0.5 * 127/amax with amax = 127 -> 1.
    let mut x = vec![0.5f32; 32];
    x[3] = 127.0;
    x[4] = -2.5;
    let b = quant::quantize_q8_0(&x)[0];
    assert_eq!((b.qs[0], b.qs[3], b.qs[4]), (1, 127, -3));
}

// ---------------------------------------------------------------- activation quantisers

fn q8_0_row(x: &[f32]) -> (Vec<BlockQ8_0>, Vec<BlockQ8_0>) {
    let zero = BlockQ8_0 { d: f16::ZERO, qs: [0; 32] };
    let (mut fast, mut slow) = (vec![zero; x.len() / QK], vec![zero; x.len() / QK]);
    quant::quantize_row_q8_0(x, &mut fast);
    reference::quantize_row_q8_0(x, &mut slow);
    (fast, slow)
}

fn q8_1_row(x: &[f32]) -> (Vec<BlockQ8_1>, Vec<BlockQ8_1>) {
    let zero = BlockQ8_1 { d: f16::ZERO, s: f16::ZERO, qs: [0; 32] };
    let (mut fast, mut slow) = (vec![zero; x.len() / QK], vec![zero; x.len() / QK]);
    quant::quantize_row_q8_1(x, &mut fast);
    reference::quantize_row_q8_1(x, &mut slow);
    (fast, slow)
}

fn bits<T: bytemuck::Pod>(v: &[T]) -> &[u8] {
    bytemuck::cast_slice(v)
}

#[test]
fn activation_quantisers_round_half_to_even() {
    // amax = 127 makes the multiplier exactly 1, so every .5 is a tie.
    let mut x: Vec<f32> = (0..32).map(|e| e as f32 - 15.5).collect(); // -15.5 ..= 15.5
    x[31] = 127.0;
    x[30] = -126.5;
    x[29] = 0.5;
    x[28] = -0.5;
    x[27] = 2.5;
    let want: Vec<i8> = x.iter().map(|&v| v.round_ties_even() as i8).collect();
    assert_eq!((want[0], want[1], want[30], want[27], want[28]), (-16, -14, -126, 2, 0));

    let (fast, slow) = q8_0_row(&x);
    assert_eq!(bits(&fast), bits(&slow));
    assert_eq!(fast[0].qs.to_vec(), want);
    assert_eq!(fast[0].d, f16::from_f32(1.0));

    let (fast, slow) = q8_1_row(&x);
    assert_eq!(bits(&fast), bits(&slow));
    assert_eq!(fast[0].qs.to_vec(), want);
    let sum: i32 = want.iter().map(|&q| i32::from(q)).sum();
    assert_eq!(fast[0].s, f16::from_f32(sum as f32));
}

#[test]
fn activation_quantisers_simd_equal_scalar() {
    let mut rng = Rng(7);
    for blocks in [1usize, 3, 37, 129] {
        let mut x = rng.vec(32 * blocks);
        // Every other block is made of ties: with amax = 127 * 2^k the multiplier is exactly
        // 2^-k, and the other elements are (j + 1/2) * 2^k.
        for (b, xb) in x.chunks_mut(32).enumerate().filter(|(b, _)| b % 2 == 0) {
            let scale = 2.0f32.powi(b as i32 % 7 - 3);
            for v in xb.iter_mut() {
                *v = ((rng.unit() * 120.0).round() + 0.5) * scale;
            }
            xb[b % 32] = 127.0 * scale;
        }
        let (fast, slow) = q8_0_row(&x);
        assert_eq!(bits(&fast), bits(&slow), "q8_0, {blocks} blocks");
        let (fast, slow) = q8_1_row(&x);
        assert_eq!(bits(&fast), bits(&slow), "q8_1, {blocks} blocks");
    }
}

#[test]
fn activation_quantisers_simd_equal_scalar_on_odd_values() {
    let tiny = f32::from_bits(1);
    let specials =
        [0.0, -0.0, tiny, -tiny, f32::MIN_POSITIVE, f32::MAX, -f32::MAX, 1e-30, f32::INFINITY, f32::NAN];
    let mut rng = Rng(9);
    let mut x = Vec::new();
    x.extend([0.0f32; 32]); // all-zero block: d = 0, id = 0
    x.extend([tiny; 32]);
    for s in specials {
        let mut block = rng.vec(32);
        let at = (rng.next_u64() % 32) as usize;
        block[at] = s;
        x.extend(block);
    }
    let (fast, slow) = q8_0_row(&x);
    assert_eq!(bits(&fast), bits(&slow));
    assert_eq!(fast[0].qs, [0; 32]);
    let (fast, slow) = q8_1_row(&x);
    assert_eq!(bits(&fast), bits(&slow));
}

#[test]
fn activation_quantisers_error_bounds() {
    let mut rng = Rng(11);
    let x = rng.vec(32 * 37);
    let (q0, _) = q8_0_row(&x);
    let (q1, _) = q8_1_row(&x);
    for (b, xb) in x.chunks(32).enumerate() {
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = q0[b].d.to_f32();
        assert!((d - amax / 127.0).abs() <= amax / 127.0 * 1e-3);
        for (e, &v) in xb.iter().enumerate() {
            assert!((f32::from(q0[b].qs[e]) * d - v).abs() <= d * 0.57, "block {b} elt {e}");
        }
        assert_eq!(q0[b].qs, q1[b].qs);
        let sum: i32 = q1[b].qs.iter().map(|&q| i32::from(q)).sum();
        let s = f64::from(q1[b].s.to_f32());
        let want = f64::from(amax / 127.0) * f64::from(sum);
        assert!((s - want).abs() <= want.abs() * 1e-3 + 1e-6, "block {b}: s {s} vs {want}");
    }
}

// ---------------------------------------------------------------- dot products

fn random_q4_0(rng: &mut Rng, n: usize) -> Vec<BlockQ4_0> {
    (0..n)
        .map(|_| BlockQ4_0 { d: f16::from_f32(rng.unit() * 0.05), qs: std::array::from_fn(|_| rng.byte()) })
        .collect()
}

fn random_q4_1(rng: &mut Rng, n: usize) -> Vec<BlockQ4_1> {
    (0..n)
        .map(|_| BlockQ4_1 {
            d: f16::from_f32(rng.unit().abs() * 0.02),
            m: f16::from_f32(rng.unit() * 0.1),
            qs: std::array::from_fn(|_| rng.byte()),
        })
        .collect()
}

fn random_q8_0(rng: &mut Rng, n: usize) -> Vec<BlockQ8_0> {
    (0..n)
        .map(|_| BlockQ8_0 {
            d: f16::from_f32(rng.unit() * 0.05),
            qs: std::array::from_fn(|_| rng.i8(-127, 127)),
        })
        .collect()
}

/// f64 dot of the dequantised rows and the sum of absolute products, the scale of its error.
fn exact_dot(x: &[f32], y: &[f32]) -> (f64, f64) {
    x.iter().zip(y).fold((0.0, 0.0), |(s, a), (&u, &v)| {
        let p = f64::from(u) * f64::from(v);
        (s + p, a + p.abs())
    })
}

fn assert_close(got: f32, (exact, scale): (f64, f64), what: &str) {
    let err = (f64::from(got) - exact).abs();
    assert!(err <= 1e-3 * scale.max(1e-30), "{what}: {got} vs exact {exact} (sum |xy| {scale})");
}

const BLOCK_COUNTS: [usize; 5] = [1, 3, 37, 128, 129];

#[test]
fn dot_q4_0_q8_0_simd_equals_scalar_and_exact() {
    let mut rng = Rng(40);
    for nb in BLOCK_COUNTS {
        let x = random_q4_0(&mut rng, nb);
        let act = rng.vec(32 * nb);
        let mut y = vec![BlockQ8_0 { d: f16::ZERO, qs: [0; 32] }; nb];
        quant::quantize_row_q8_0(&act, &mut y);
        let fast = quant::vec_dot_q4_0_q8_0(&x, &y);
        let slow = reference::vec_dot_q4_0_q8_0(&x, &y);
        assert_eq!(fast.to_bits(), slow.to_bits(), "{nb} blocks: {fast} vs {slow}");
        let exact =
            exact_dot(&deq(GgmlType::Q4_0, bits(&x), 32 * nb), &deq(GgmlType::Q8_0, bits(&y), 32 * nb));
        assert_close(fast, exact, &format!("q4_0 {nb} blocks"));
    }
}

#[test]
fn dot_q4_1_q8_1_simd_equals_scalar_and_exact() {
    let mut rng = Rng(41);
    for nb in BLOCK_COUNTS {
        let rows: Vec<Vec<BlockQ4_1>> = (0..3).map(|_| random_q4_1(&mut rng, nb)).collect();
        let mut y = vec![BlockQ8_1 { d: f16::ZERO, s: f16::ZERO, qs: [0; 32] }; nb];
        quant::quantize_row_q8_1(&rng.vec(32 * nb), &mut y);
        let y_deq: Vec<f32> = y.iter().flat_map(|b| b.qs.map(|q| f32::from(q) * b.d.to_f32())).collect();
        for x in &rows {
            let fast = quant::vec_dot_q4_1_q8_1(x, &y);
            let slow = reference::vec_dot_q4_1_q8_1(x, &y);
            assert_eq!(fast.to_bits(), slow.to_bits(), "{nb} blocks: {fast} vs {slow}");
            // The minimums enter through s = f16(d * sum(q)), within 2^-10 of d16 * sum(q),
            // so |m * s| joins the error scale.
            let (exact, scale) = exact_dot(&deq(GgmlType::Q4_1, bits(x), 32 * nb), &y_deq);
            let ms: f64 = x.iter().zip(&y).map(|(b, a)| f64::from(b.m.to_f32() * a.s.to_f32()).abs()).sum();
            assert_close(fast, (exact, scale + ms), &format!("q4_1 {nb} blocks"));
        }
    }
}

#[test]
fn dot_q8_0_q8_0_simd_equals_scalar_and_exact() {
    let mut rng = Rng(42);
    for nb in BLOCK_COUNTS {
        let (x, y) = (random_q8_0(&mut rng, nb), random_q8_0(&mut rng, nb));
        let fast = quant::vec_dot_q8_0_q8_0(&x, &y);
        let slow = reference::vec_dot_q8_0_q8_0(&x, &y);
        assert_eq!(fast.to_bits(), slow.to_bits(), "{nb} blocks: {fast} vs {slow}");
        let exact =
            exact_dot(&deq(GgmlType::Q8_0, bits(&x), 32 * nb), &deq(GgmlType::Q8_0, bits(&y), 32 * nb));
        assert_close(fast, exact, &format!("q8_0 {nb} blocks"));
    }
}

#[test]
fn dot_sign_trick_quirk_on_minus_128_is_reproduced() {
    // x86's sign trick cannot negate -128: with x < 0 and y = -128 the product comes out as
    // -|x|*128. Both kernels must show the same quirk as llama.cpp.
    let x = BlockQ8_0 { d: f16::ONE, qs: [-3; 32] };
    let y = BlockQ8_0 { d: f16::ONE, qs: [-128; 32] };
    let fast = quant::vec_dot_q8_0_q8_0(&[x], &[y]);
    assert_eq!(fast, reference::vec_dot_q8_0_q8_0(&[x], &[y]));
    assert_eq!(fast, -3.0 * 128.0 * 32.0);
    let w = BlockQ4_0 { d: f16::ONE, qs: [0x11; 16] }; // every quant 1 - 8 = -7
    let fast = quant::vec_dot_q4_0_q8_0(&[w], &[y]);
    assert_eq!(fast, reference::vec_dot_q4_0_q8_0(&[w], &[y]));
    assert_eq!(fast, -7.0 * 128.0 * 32.0);
}

const LENGTHS: [usize; 9] = [1, 31, 63, 64, 65, 200, 32 * 37, 4096, 4096 + 17];

#[test]
fn dot_f16_simd_equals_scalar_and_exact() {
    let mut rng = Rng(43);
    for n in LENGTHS {
        let x: Vec<f16> = (0..n).map(|_| f16::from_f32(rng.unit() * 0.1)).collect();
        let act = rng.vec(n);
        let mut y = vec![f16::ZERO; n];
        quant::f32_to_f16_row(&act, &mut y);
        assert!(y.iter().zip(&act).all(|(h, &a)| *h == f16::from_f32(a)), "f32_to_f16_row rounding");
        let fast = quant::vec_dot_f16_f16(&x, &y);
        let slow = reference::vec_dot_f16_f16(&x, &y);
        assert_eq!(fast.to_bits(), slow.to_bits(), "n = {n}: {fast} vs {slow}");
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let yf: Vec<f32> = y.iter().map(|v| v.to_f32()).collect();
        assert_close(fast, exact_dot(&xf, &yf), &format!("f16 n = {n}"));
    }
}

#[test]
fn dot_f32_simd_equals_scalar_and_exact() {
    let mut rng = Rng(44);
    for n in LENGTHS {
        let (x, y) = (rng.vec(n), rng.vec(n));
        let fast = quant::vec_dot_f32(&x, &y);
        let slow = reference::vec_dot_f32(&x, &y);
        assert_eq!(fast.to_bits(), slow.to_bits(), "n = {n}: {fast} vs {slow}");
        assert_close(fast, exact_dot(&x, &y), &format!("f32 n = {n}"));
    }
}

#[test]
fn dot_lane_order_follows_ggml() {
    // Lane j sums the products of elements 4j..4j+4. Block 0 (scale 2^30) puts 127 * 2^30 in
    // lane 0 and -127 * 2^30 in lane 4, block 1 (scale 1) puts 1 in lane 1. ggml's tree adds
    // lanes 0 and 4 first, so the 1 survives; summing the lanes in order would round it away.
    let mut big = [0i8; 32];
    big[0] = 127;
    big[16] = -127;
    let mut small = [0i8; 32];
    small[4] = 1;
    let x = [BlockQ8_0 { d: f16::from_f32(32768.0), qs: big }, BlockQ8_0 { d: f16::ONE, qs: small }];
    let y = [BlockQ8_0 { d: f16::from_f32(32768.0), qs: [1; 32] }, BlockQ8_0 { d: f16::ONE, qs: [1; 32] }];
    assert_eq!(reference::vec_dot_q8_0_q8_0(&x, &y), 1.0);
    assert_eq!(quant::vec_dot_q8_0_q8_0(&x, &y), 1.0);
}

// ---------------------------------------------------------------- throughput

/// Single-thread throughput of the dot kernels: bytes of a row-major weight matrix streamed per
/// second, once for a matrix that fits in the caches and once for one far larger. Run with
/// `cargo test --release --test kernels_quant -- --ignored --nocapture bench`.
#[test]
#[ignore]
fn bench_dot_kernels() {
    use std::time::Instant;
    const COLS: usize = 4096;
    const NB: usize = COLS / QK;
    let mut rng = Rng(99);
    let act = rng.vec(COLS);
    let mut y8_0 = vec![BlockQ8_0 { d: f16::ZERO, qs: [0; 32] }; NB];
    let mut y8_1 = vec![BlockQ8_1 { d: f16::ZERO, s: f16::ZERO, qs: [0; 32] }; NB];
    quant::quantize_row_q8_0(&act, &mut y8_0);
    quant::quantize_row_q8_1(&act, &mut y8_1);
    let mut yh = vec![f16::ZERO; COLS];
    quant::f32_to_f16_row(&act, &mut yh);

    /// Calls `dot` on each row of `matrix`; best of five sweeps.
    fn run<T>(name: &str, matrix: &[T], row_len: usize, dot: impl Fn(&[T]) -> f32) {
        let mut sink = 0.0f32;
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for row in matrix.chunks_exact(row_len) {
                sink += dot(row);
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let gb = std::mem::size_of_val(matrix) as f64 / 1e9;
        println!(
            "{name:>16}: {:6.1} GB/s  ({:.1} ms for {:.0} MB, sink {sink:.3e})",
            gb / best,
            best * 1e3,
            gb * 1e3
        );
    }
    /// Stacks rows into a row-major matrix of at least `mb` MiB.
    fn matrix<T>(mb: usize, mut row: impl FnMut() -> Vec<T>) -> Vec<T> {
        let mut m = Vec::new();
        while std::mem::size_of_val(m.as_slice()) < mb << 20 {
            m.extend(row());
        }
        m
    }

    for (label, mb) in [("in cache", 1usize), ("from DRAM", 512)] {
        println!("-- {label}: {mb} MB weight matrices, {COLS} columns");
        let m = matrix(mb, || random_q4_0(&mut rng, NB));
        run("q4_0 x q8_0", &m, NB, |r| quant::vec_dot_q4_0_q8_0(r, &y8_0));
        drop(m);
        let m = matrix(mb, || random_q4_1(&mut rng, NB));
        run("q4_1 x q8_1", &m, NB, |r| quant::vec_dot_q4_1_q8_1(r, &y8_1));
        drop(m);
        let m = matrix(mb, || random_q8_0(&mut rng, NB));
        run("q8_0 x q8_0", &m, NB, |r| quant::vec_dot_q8_0_q8_0(r, &y8_0));
        drop(m);
        let m = matrix(mb, || yh.clone());
        run("f16 x f16", &m, COLS, |r| quant::vec_dot_f16_f16(r, &yh));
        drop(m);
        let m = matrix(mb, || act.clone());
        run("f32 x f32", &m, COLS, |r| quant::vec_dot_f32(r, &act));
    }
}

// ---------------------------------------------------------------- packed (interleaved) matrices

/// Every packed ISA this CPU runs; none on other architectures (the row kernels serve there).
fn packed_isas() -> Vec<quant::packed::Isa> {
    use quant::packed::Isa;
    [Isa::Avx512Vnni, Isa::Avx2].into_iter().filter(|i| i.available()).collect()
}

/// The packed product of `rows` weight rows with `n_tokens` activation rows, for each ISA,
/// bit for bit against the reference dot of each (row, token).
fn check_packed<W: bytemuck::Pod>(
    ty: GgmlType,
    rows: usize,
    nb: usize,
    n_tokens: usize,
    w: &[W],
    reference_dot: impl Fn(&[W], usize) -> f32,
    product: impl Fn(&quant::packed::PackedMatrix, quant::packed::Isa, &mut [f32]),
) {
    let packed = quant::packed::PackedMatrix::new(ty, rows, 32 * nb, bits(w)).unwrap();
    assert_eq!(packed.groups(), rows.div_ceil(16));
    for isa in packed_isas() {
        let mut out = vec![f32::NAN; n_tokens * rows];
        product(&packed, isa, &mut out);
        for t in 0..n_tokens {
            for r in 0..rows {
                let want = reference_dot(&w[r * nb..(r + 1) * nb], t);
                let got = out[t * rows + r];
                assert_eq!(got.to_bits(), want.to_bits(), "{ty} {isa:?} {rows}x{nb} blocks, token {t} row {r}: {got} vs {want}");
            }
        }
    }
}

/// Odd shapes: a partial group alone, partial groups after whole ones, one and many blocks.
const PACKED_SHAPES: [(usize, usize); 6] = [(1, 1), (15, 3), (16, 1), (17, 5), (37, 18), (50, 37)];

/// The types with Q8_0 activations. Q5_0's fifth bits travel as per-lane masks beside the
/// nibbles; every bit pattern is drawn, so each lane's masked lift is exercised on both halves
/// of every group.
#[test]
fn packed_q4_0_q5_0_and_q8_0_equal_reference_dots() {
    use ember::quant::{BlockQ5_0, WeightBlock};
    use quant::packed::{ActScales, PackedActs};
    let mut rng = Rng(60);
    for (rows, nb) in PACKED_SHAPES {
        for n_tokens in [1, 3] {
            let mut y = vec![BlockQ8_0 { d: f16::ZERO, qs: [0; 32] }; n_tokens * nb];
            quant::quantize_row_q8_0(&rng.vec(32 * nb * n_tokens), &mut y);
            let scales = ActScales::from_q8_0(&y, 32 * nb);
            let acts = PackedActs::q8_0(&y, &scales, n_tokens);
            let tok = |t: usize| &y[t * nb..(t + 1) * nb];

            let w4 = random_q4_0(&mut rng, rows * nb);
            check_packed(GgmlType::Q4_0, rows, nb, n_tokens, &w4, |x, t| reference::vec_dot_q4_0_q8_0(x, tok(t)), |p, isa, out| p.mul(isa, &acts, out));

            // Q8_0 weights include -128, which other tools may write.
            let mut w8 = random_q8_0(&mut rng, rows * nb);
            w8[0].qs[5] = -128;
            w8[rows * nb - 1].qs[31] = -128;
            check_packed(GgmlType::Q8_0, rows, nb, n_tokens, &w8, |x, t| reference::vec_dot_q8_0_q8_0(x, tok(t)), |p, isa, out| p.mul(isa, &acts, out));

            let w5: Vec<BlockQ5_0> = (0..rows * nb)
                .map(|_| BlockQ5_0 { d: f16::from_f32(rng.unit() * 0.05), qh: std::array::from_fn(|_| rng.byte()), qs: std::array::from_fn(|_| rng.byte()) })
                .collect();
            check_packed(GgmlType::Q5_0, rows, nb, n_tokens, &w5, |x, t| BlockQ5_0::dot_ref(x, tok(t)), |p, isa, out| p.mul(isa, &acts, out));
        }
    }
}

#[test]
fn packed_q4_1_equals_reference_dots() {
    use quant::packed::{ActScales, PackedActs};
    let mut rng = Rng(61);
    for (rows, nb) in PACKED_SHAPES {
        for n_tokens in [1, 2] {
            let mut y = vec![BlockQ8_1 { d: f16::ZERO, s: f16::ZERO, qs: [0; 32] }; n_tokens * nb];
            quant::quantize_row_q8_1(&rng.vec(32 * nb * n_tokens), &mut y);
            let scales = ActScales::from_q8_1(&y, 32 * nb);
            let acts = PackedActs::q8_1(&y, &scales, n_tokens);
            let w = random_q4_1(&mut rng, rows * nb);
            check_packed(GgmlType::Q4_1, rows, nb, n_tokens, &w, |x, t| reference::vec_dot_q4_1_q8_1(x, &y[t * nb..(t + 1) * nb]), |p, isa, out| p.mul(isa, &acts, out));
        }
    }
}

/// A matrix of several MiB is packed in parallel into a huge-page mapping (where the kernel
/// has them): the same products, with and without huge pages, at any prefetch distance.
#[test]
fn large_packed_matrices_equal_reference_dots() {
    use quant::packed::{ActScales, PackOptions, PackedActs, PackedMatrix};
    let mut rng = Rng(62);
    let (rows, nb) = (1001, 131);
    let mut y = vec![BlockQ8_0 { d: f16::ZERO, qs: [0; 32] }; nb];
    quant::quantize_row_q8_0(&rng.vec(32 * nb), &mut y);
    let scales = ActScales::from_q8_0(&y, 32 * nb);
    let acts = PackedActs::q8_0(&y, &scales, 1);
    let w = random_q4_0(&mut rng, rows * nb);
    let want: Vec<u32> = (0..rows).map(|r| reference::vec_dot_q4_0_q8_0(&w[r * nb..(r + 1) * nb], &y).to_bits()).collect();
    for huge_pages in [true, false] {
        let p = PackedMatrix::with_options(GgmlType::Q4_0, rows, 32 * nb, bits(&w), PackOptions { huge_pages, release_source: false }).unwrap();
        assert!(p.n_bytes() > 2 << 20);
        for isa in packed_isas() {
            for prefetch in [0, 64, 4096, 1 << 16] {
                let mut out = vec![f32::NAN; rows];
                // Two uneven parts, as a team's members would take them.
                for part in [0..7, 7..p.groups()] {
                    // SAFETY: the ISA is available and `out` holds every row of these groups.
                    unsafe { p.mul_groups(isa, &acts, part, out.as_mut_ptr(), rows, prefetch) };
                }
                let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "{isa:?} huge pages {huge_pages}, prefetch {prefetch}");
            }
        }
    }
}

#[test]
fn packed_matrix_rejects_bad_input() {
    use quant::packed::{PackError, PackedMatrix};
    assert!(matches!(PackedMatrix::new(GgmlType::F16, 2, 32, &[0; 128]), Err(PackError::Unsupported(GgmlType::F16))));
    assert!(matches!(PackedMatrix::new(GgmlType::Q4_0, 2, 32, &[0; 35]), Err(PackError::Length { expected: 36, got: 35, .. })));
    assert!(matches!(PackedMatrix::new(GgmlType::Q8_0, 1, 40, &[0; 34]), Err(PackError::Length { .. })));
}

/// The row dots given the token's scales (AVX-512 VNNI, two rows per register, where the CPU
/// has it) give the reference's values bit for bit, at block counts below, at and past the
/// sixteen-block scale runs, with random rows side by side.
#[test]
fn row_dots_with_scales_equal_the_reference() {
    let mut rng = Rng(0x5CA1E);
    for nb in [1usize, 3, 15, 16, 17, 37, 130] {
        let mut y = vec![BlockQ8_0 { d: f16::ZERO, qs: [0; 32] }; nb];
        quant::quantize_row_q8_0(&rng.vec(32 * nb), &mut y);
        let s = quant::packed::ActScales::from_q8_0(&y, 32 * nb);
        let w4 = random_q4_0(&mut rng, 4 * nb);
        let w8 = random_q8_0(&mut rng, 4 * nb);
        let row = |r: usize| r * nb..(r + 1) * nb;
        let got4 = quant::vec_dot_q4_0_q8_0_x4_with(std::array::from_fn(|r| &w4[row(r)]), &y, &s);
        let got8 = quant::vec_dot_q8_0_q8_0_x4_with(std::array::from_fn(|r| &w8[row(r)]), &y, &s);
        for r in 0..4 {
            let want4 = reference::vec_dot_q4_0_q8_0(&w4[row(r)], &y).to_bits();
            let want8 = reference::vec_dot_q8_0_q8_0(&w8[row(r)], &y).to_bits();
            assert_eq!(got4[r].to_bits(), want4, "q4_0 x4 nb {nb} row {r}");
            assert_eq!(quant::vec_dot_q4_0_q8_0_with(&w4[row(r)], &y, &s).to_bits(), want4, "q4_0 nb {nb} row {r}");
            assert_eq!(got8[r].to_bits(), want8, "q8_0 x4 nb {nb} row {r}");
            assert_eq!(quant::vec_dot_q8_0_q8_0_with(&w8[row(r)], &y, &s).to_bits(), want8, "q8_0 nb {nb} row {r}");
        }
    }
}

/// The four-row dots give each row's one-row (and reference) value bit for bit, at odd
/// block counts, with rows of different contents side by side.
#[test]
fn four_row_dots_equal_one_row_dots() {
    let mut rng = Rng(63);
    for nb in [1usize, 3, 37, 130] {
        let mut y0 = vec![BlockQ8_0 { d: f16::ZERO, qs: [0; 32] }; nb];
        quant::quantize_row_q8_0(&rng.vec(32 * nb), &mut y0);
        let mut y1 = vec![BlockQ8_1 { d: f16::ZERO, s: f16::ZERO, qs: [0; 32] }; nb];
        quant::quantize_row_q8_1(&rng.vec(32 * nb), &mut y1);
        let w4 = random_q4_0(&mut rng, 4 * nb);
        let w41 = random_q4_1(&mut rng, 4 * nb);
        let w8 = random_q8_0(&mut rng, 4 * nb);
        let row = |r: usize| r * nb..(r + 1) * nb;
        let got = quant::vec_dot_q4_0_q8_0_x4(std::array::from_fn(|r| &w4[row(r)]), &y0);
        let got41 = quant::vec_dot_q4_1_q8_1_x4(std::array::from_fn(|r| &w41[row(r)]), &y1);
        let got8 = quant::vec_dot_q8_0_q8_0_x4(std::array::from_fn(|r| &w8[row(r)]), &y0);
        for r in 0..4 {
            assert_eq!(got[r].to_bits(), reference::vec_dot_q4_0_q8_0(&w4[row(r)], &y0).to_bits(), "q4_0 nb {nb} row {r}");
            assert_eq!(got[r].to_bits(), quant::vec_dot_q4_0_q8_0(&w4[row(r)], &y0).to_bits(), "q4_0 nb {nb} row {r}");
            assert_eq!(got41[r].to_bits(), reference::vec_dot_q4_1_q8_1(&w41[row(r)], &y1).to_bits(), "q4_1 nb {nb} row {r}");
            assert_eq!(got8[r].to_bits(), reference::vec_dot_q8_0_q8_0(&w8[row(r)], &y0).to_bits(), "q8_0 nb {nb} row {r}");
        }
    }
}
