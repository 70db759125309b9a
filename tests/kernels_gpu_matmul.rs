//! GPU weight matrices (src/gpu/matrix.rs): matvec, tiled matmul and get_rows against the CPU
//! on random inputs at awkward sizes, for every weight type, split across bindings too.
//! Runs on lavapipe in CI; `bench_matvec` (ignored) times the kernels on a real GPU.

mod common;

use common::{gpu, matrix, Rng};
use ember::cpu::{matmul, Activations, Precision};
use ember::gguf::GgmlType;
use ember::gpu::matrix::{default_mv_configs, DecodeKernel, Epilogue, GpuMatrix, Kernel, KqTokens, MatOut, MatmulOp, MvConfig, NormIn, RopeIn, MATVEC_MAX_TOKENS};
use ember::gpu::{GpuContext, Step};
use ember::model::{Activation, Matrix};

const TYPES: [GgmlType; 5] = [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1];

/// The types the fused-epilogue tests run: TYPES, Q4_K and Q6_K (the grouped types the integer
/// kernel also serves), at widths of whole super-blocks (see [`width`]).
const FUSED_TYPES: [GgmlType; 7] = [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q4_K, GgmlType::Q6_K];

/// A test's column count for `ty`: K-quant rows are whole 256-element super-blocks (608 becomes
/// 768, 96 256).
fn width(ty: GgmlType, cols: usize) -> usize {
    if matches!(ty, GgmlType::Q4_K | GgmlType::Q6_K) {
        cols.next_multiple_of(256)
    } else {
        cols
    }
}

/// The CPU product with f32 activations, and sum |w x| per output for the tolerance.
fn reference(m: &Matrix, x: &[f32], n: usize) -> (Vec<f32>, Vec<f32>) {
    reference_at(m, x, n, Precision::F32)
}

fn reference_at(m: &Matrix, x: &[f32], n: usize, precision: Precision) -> (Vec<f32>, Vec<f32>) {
    let mut want = vec![0.0; n * m.rows];
    matmul(m, &Activations::new(x, n).with_precision(precision), &mut want);
    let mut mag = vec![0.0; n * m.rows];
    for r in 0..m.rows {
        let w = m.row_f32(r);
        for t in 0..n {
            mag[t * m.rows + r] = w.iter().zip(&x[t * m.cols..(t + 1) * m.cols]).map(|(a, b)| (a * b).abs()).sum();
        }
    }
    (want, mag)
}

/// Buffers of one test: x, y and the Step uniform.
struct Bufs {
    x: wgpu::Buffer,
    y: wgpu::Buffer,
    step: wgpu::Buffer,
}

impl Bufs {
    fn new(ctx: &GpuContext, x: &[f32], y_len: usize) -> Bufs {
        Bufs { x: ctx.upload("x", bytemuck::cast_slice(x)), y: ctx.zeros("y", (y_len * 4) as u64), step: ctx.uniform("step", bytemuck::bytes_of(&Step::default())) }
    }
}

/// Runs `op` for n tokens into a NaN-poisoned y and reads n * rows outputs back.
fn run(ctx: &GpuContext, op: &MatmulOp, b: &Bufs, rows: usize, n: usize, kernel: Kernel) -> Vec<f32> {
    ctx.queue.write_buffer(&b.step, 0, bytemuck::bytes_of(&Step { n_tokens: n as u32, pos0: 0, n_kv: n as u32, _pad: 0 }));
    ctx.queue.write_buffer(&b.y, 0, bytemuck::cast_slice(&vec![f32::NAN; (b.y.size() / 4) as usize]));
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
        op.encode_with(&mut pass, n as u32, kernel);
    }
    ctx.submit_and_wait(enc).unwrap();
    ctx.read(&b.y, n * rows).unwrap()
}

fn check(what: &str, got: &[f32], want: &[f32], mag: &[f32]) {
    check_tol(what, got, want, mag, 1e-4)
}

fn check_tol(what: &str, got: &[f32], want: &[f32], mag: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len());
    let mut worst = 0.0f32;
    for (i, ((g, w), m)) in got.iter().zip(want).zip(mag).enumerate() {
        let err = (g - w).abs() / m.max(1e-30);
        assert!(err < tol, "{what}: element {i}: got {g}, want {w} (sum |w x| {m}, relative error {err:.2e})");
        worst = worst.max(err);
    }
    eprintln!("{what}: ok, worst relative error {worst:.1e}");
}

/// Every kernel on one matrix: the default matvec variants and the tiled kernel for each n
/// (the matvec for n within its limit), the shared-memory reduction too where subgroups are
/// the default.
fn check_matrix(ctx: &GpuContext, m: &Matrix, g: &GpuMatrix, tokens: &[usize], rng: &mut Rng) {
    let max_n = *tokens.iter().max().unwrap();
    let x = rng.vec(max_n * m.cols);
    let (want, mag) = reference(m, &x, max_n);
    let b = Bufs::new(ctx, &x, max_n * m.rows);
    let mut configs = vec![("default", default_mv_configs(ctx))];
    if ctx.has_subgroups() {
        configs.push(("shared-memory", default_mv_configs(ctx).into_iter().map(|c| MvConfig { subgroups: false, ..c }).collect()));
    }
    for (ci, (label, cfg)) in configs.iter().enumerate() {
        let op = g.bind_matmul_with(ctx, &b.x, &b.y, &b.step, cfg);
        for &n in tokens {
            let len = n * m.rows;
            // Auto is the matvec up to MATVEC_MAX_TOKENS (in groups of 8), the tiled kernel
            // above; each also runs the other way once.
            let mut kernels = vec![Kernel::Auto];
            let auto_matvec = n as u32 <= MATVEC_MAX_TOKENS;
            if ci == 0 {
                kernels.push(if auto_matvec { Kernel::Tiled } else { Kernel::Matvec });
            } else if !auto_matvec {
                continue;
            }
            for k in kernels {
                let got = run(ctx, &op, &b, m.rows, n, k);
                check_tol(&format!("{} ({} chunks) n={n} {k:?} {label}", m.name, g.n_chunks()), &got, &want[..len], &mag[..len], tol(ctx, n, k));
            }
        }
    }
}

/// The tiled kernels over several workgroups of tokens and rows (a partial last one of each),
/// GGUF and permuted word orders: the portable kernel at f32's tolerance, and the
/// cooperative-matrix one where the adapter has it (`ember devices` says; lavapipe does not)
/// at f16's.
#[test]
fn tiled_many_tokens_match_cpu() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(0x7117);
    for ty in TYPES {
        for (rows, cols, n) in [(300, 96, 130), (131, 512, 70), (64, 608, 65)] {
            let m = matrix(ty, rows, cols, &mut rng);
            let g = GpuMatrix::upload(&ctx, &m).unwrap();
            let x = rng.vec(n * cols);
            let (want, mag) = reference(&m, &x, n);
            let b = Bufs::new(&ctx, &x, n * rows);
            let op = g.bind_matmul(&ctx, &b.x, &b.y, &b.step);
            for kernel in [Kernel::Tiled, Kernel::Coop, Kernel::Auto] {
                let got = run(&ctx, &op, &b, rows, n, kernel);
                check_tol(&format!("{ty:?} {rows}x{cols} n={n} {kernel:?}"), &got, &want, &mag, tol(&ctx, n, kernel));
            }
        }
    }
    if !ctx.has_coop_matrix() {
        eprintln!("{}: no cooperative matrices, Kernel::Coop ran the portable kernel", ctx.adapter.name);
    }
}

#[test]
fn matrix_shaders_validate() {
    for (name, src) in ember::gpu::matrix::SHADERS {
        let module = naga::front::wgsl::parse_str(src).unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(src)));
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
}

#[test]
fn matmul_matches_cpu_every_type() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(0x5EED);
    let shapes = [(1, 32), (37, 96), (130, 576), (1000, 1536), (67, 1536), (1000, 96)];
    for ty in TYPES {
        let t0 = std::time::Instant::now();
        for &(rows, cols) in &shapes {
            let m = matrix(ty, rows, cols, &mut rng);
            let g = GpuMatrix::upload(&ctx, &m).unwrap();
            assert_eq!(g.n_chunks(), 1);
            let tokens: &[usize] = if rows * cols > 500_000 { &[1, 2, 5, 17, 64] } else { &[1, 2, 3, 5, 8, 9, 17, 64] };
            check_matrix(&ctx, &m, &g, tokens, &mut rng);
        }
        eprintln!("{ty:?}: {:.2} s", t0.elapsed().as_secs_f64());
    }
}

#[test]
fn odd_matvec_configs() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(77);
    for ty in [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::F16] {
        let m = matrix(ty, 75, 608, &mut rng);
        let g = GpuMatrix::upload(&ctx, &m).unwrap();
        let x = rng.vec(3 * m.cols);
        let (want, mag) = reference(&m, &x, 3);
        let b = Bufs::new(&ctx, &x, 3 * m.rows);
        // nt > 1: the units kernel and the blocks kernel (unroll 2: two slots per row and step,
        // with and without prefetch); nt = 1: the decode kernel.
        for (wg, nr, nt, unroll) in [(32, 1, 3, 1), (64, 3, 3, 1), (256, 4, 3, 1), (1024, 1, 3, 1), (8, 5, 3, 1), (32, 3, 3, 2), (32, 3, 1, 2), (8, 5, 1, 2), (64, 1, 1, 1)] {
            for subgroups in [false, true] {
                for (units, prefetch) in [(true, false), (false, true), (false, false)] {
                    if (nt == 1 && !units) || (units && unroll > 2) {
                        continue;
                    }
                    let cfg = [MvConfig { nt, wg, nr, unroll, units, prefetch, subgroups, kq: None }];
                    let op = g.bind_matmul_with(&ctx, &b.x, &b.y, &b.step, &cfg);
                    for n in [1, 3] {
                        let got = run(&ctx, &op, &b, m.rows, n, Kernel::Matvec);
                        check(&format!("{} wg {wg} nr {nr} nt {nt} unroll {unroll} units {units} pf {prefetch} sg {subgroups} n={n}", m.name), &got, &want[..n * m.rows], &mag[..n * m.rows]);
                    }
                }
            }
        }
    }
}

/// The few-token blocks kernel (a batched decode's products, matmul_dec.wgsl's `dvt_main`) at
/// every token count 2..=16 for every weight type, odd row counts, GGUF and permuted word
/// orders (608 and 1024 columns for the Q4/Q8 types), against the CPU's f32 product at f32's
/// tolerance: the default variants (groups of 2, 4 and 8 tokens, so 9..16 tokens run as two;
/// padding tokens of a group never stored), both reductions, and for Q4_0, Q8_0, F16 and Q4_K
/// other shapes (groups of 16; 2 slots per row and step; 6 rows; no prefetch).
#[test]
fn few_token_matvec_every_count() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(0xB47C);
    let defaults = default_mv_configs(&ctx);
    // Groups of up to 8 by default (16 spilled on an H100), so 9..16 tokens run as two.
    assert!(defaults.iter().any(|c| c.nt == 8 && !c.units) && !defaults.iter().any(|c| c.nt > 8), "the default reads the weights once for up to 8 tokens: {defaults:?}");
    let sg = ctx.has_subgroups();
    let shape = |wg: u32, nr: u32, unroll: u32, prefetch: bool, max_nt: u32| -> Vec<MvConfig> {
        [1, 2, 4, 8, 16].into_iter().filter(|&nt| nt <= max_nt).map(|nt| MvConfig { nt, wg, nr, unroll, units: false, prefetch, subgroups: sg, kq: None }).collect()
    };
    let mut variants = vec![("default", defaults.clone()), ("shared-memory", defaults.iter().map(|c| MvConfig { subgroups: false, ..*c }).collect())];
    variants.push(("32x2 up to 8, no prefetch", shape(32, 2, 1, false, 8)));
    variants.push(("16x6 unroll 2", shape(16, 6, 2, true, 16)));
    variants.push(("64x2 up to 16", shape(64, 2, 1, true, 16)));
    let grouped = [GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::Q2_K, GgmlType::Q3_K];
    for ty in TYPES.into_iter().chain(grouped) {
        let shapes: &[(usize, usize)] = if grouped.contains(&ty) { &[(37, 768)] } else { &[(75, 608), (67, 1024)] };
        for &(rows, cols) in shapes {
            let m = matrix(ty, rows, cols, &mut rng);
            let g = GpuMatrix::upload(&ctx, &m).unwrap();
            let x = rng.vec(16 * cols);
            let (want, mag) = reference(&m, &x, 16);
            let b = Bufs::new(&ctx, &x, 16 * rows);
            // The other shapes on the types of the 7B models batched decode is measured with
            // (lavapipe's time).
            let shapes_too = matches!(ty, GgmlType::Q4_0 | GgmlType::Q8_0 | GgmlType::F16 | GgmlType::Q4_K);
            for (label, cfg) in variants.iter().take(if shapes_too { variants.len() } else { 2 }) {
                let op = g.bind_matmul_with(&ctx, &b.x, &b.y, &b.step, cfg);
                for n in 2..=16 {
                    let got = run(&ctx, &op, &b, rows, n, Kernel::Auto);
                    let what = format!("{ty:?} {rows}x{cols} n={n} {label}");
                    let len = n * rows;
                    for (i, ((&gv, &w), &mg)) in got.iter().zip(&want[..len]).zip(&mag[..len]).enumerate() {
                        let err = (gv - w).abs() / mg.max(1e-30);
                        assert!(err < 1e-4, "{what}: element {i}: got {gv}, want {w} (sum |w x| {mg}, relative error {err:.2e})");
                    }
                    // The group's padding tokens store nothing.
                    let all: Vec<f32> = ctx.read(&b.y, 16 * rows).unwrap();
                    assert!(all[len..].iter().all(|v| v.is_nan()), "{what}: a value stored past token {n}");
                }
            }
        }
    }
}

/// The integer-dot-product decode matvec (`EMBER_MV_DEC=q4_0=kq:...`): with 22-bit
/// activations against the f32 product, with 8-bit ones against llama.cpp's CPU numerics (the
/// CPU's Q8_0/Q8_1 activations: worst relative error 6e-8 on lavapipe).
#[test]
fn integer_matvec_matches_cpu() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(4242);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1] {
        for (rows, cols) in [(75, 608), (37, 96), (130, 352)] {
            let m = matrix(ty, rows, cols, &mut rng);
            let g = GpuMatrix::upload_layout(&ctx, &m, ctx.max_binding(), false).unwrap();
            let x = rng.vec(3 * cols);
            for limbs in [3, 1] {
                let (want, mag) = reference_at(&m, &x, 3, if limbs == 3 { Precision::F32 } else { Precision::Llama });
                let b = Bufs::new(&ctx, &x, 3 * rows);
                for (nr, rg, prefetch) in [(1, 1, false), (4, 2, true), (3, 3, false), (2, 5, true)] {
                    for subgroups in [false, true] {
                        let cfg = [MvConfig { nt: 1, wg: 64, nr: 2, unroll: 1, units: false, prefetch: false, subgroups, kq: None }];
                        let kernel = ember::gpu::matrix::DecodeKernel::Quantized { nr, rg, prefetch, limbs };
                        let op = g.bind_matmul_variant(&ctx, &b.x, &b.y, &b.step, &cfg, kernel, &MatOut::default());
                        for n in [1, 3] {
                            let got = run(&ctx, &op, &b, rows, n, Kernel::Matvec);
                            let what = format!("{} limbs {limbs} nr {nr} rg {rg} pf {prefetch} sg {subgroups} n={n}", m.name);
                            check(&what, &got, &want[..n * rows], &mag[..n * rows]);
                        }
                    }
                }
            }
        }
    }
}

/// The few-token integer kernel (matmul_kq_tok.wgsl's `kqt_main`, a batched decode's products at
/// `--gpu-precision q8`) at 2, 3, 5, 8 and 16 tokens on Q4_0 and Q4_1 (GGUF block order), Q4_K
/// and Q6_K, row counts that no workgroup's rows divide, a few blocks per row (3 to 24), with
/// its activations in registers and staged in workgroup memory, groups of 2 to 16 tokens (and of
/// at most 4, so 5..16 tokens run as several groups, the last one partial):
/// - 8-bit activations (KQ_LIMBS = 1) against the CPU computed with the same Q8_0 (Q4_0) or
///   Q8_1 (Q4_1) activations (`Precision::Llama`) or [`k_q8_reference`] (Q4_K, Q6_K): the same
///   integer sums and f16 scales, so only the f32 order of the per-block terms differs; the
///   bound is f32's 1e-4 of sum |w x| (as the one-token kernel's 8-bit test).
/// - 22-bit activations (registers only) against the f32 product at the same bound.
///
/// Tokens past n (the group's padding) store nothing.
#[test]
fn few_token_integer_matvec_matches_cpu() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(0x4B7E);
    let sg = ctx.has_subgroups();
    let variants = |kq: KqTokens, max_nt: u32| -> Vec<MvConfig> {
        [2, 4, 8, 16].into_iter().filter(|&nt| nt <= max_nt).map(|nt| MvConfig { nt, wg: 64, nr: 2, unroll: 1, units: false, prefetch: true, subgroups: sg, kq: Some(kq) }).collect()
    };
    let q8 = |nr, rg, prefetch, staged| KqTokens { nr, rg, prefetch, limbs: 1, staged };
    let shapes: Vec<(&str, KqTokens, u32)> = vec![
        ("default", KqTokens::DEFAULT, 16),
        ("registers 3x3 pf", q8(3, 3, true, None), 16),
        ("registers 1x1, groups of 4", q8(1, 1, false, None), 4),
        ("staged 64 threads 2x4", q8(2, 4, false, Some(64)), 16),
        ("staged 32 threads 3x2, groups of 4", q8(3, 2, false, Some(32)), 4),
        ("22-bit registers 2x3", KqTokens { nr: 2, rg: 3, prefetch: true, limbs: 3, staged: None }, 8),
    ];
    // Every shape on the measured model's type, a few on the others (lavapipe compiles each
    // shape and group size once per type).
    let cases: [(GgmlType, usize, usize, &[usize]); 6] = [
        (GgmlType::Q4_0, 75, 608, &[0, 1, 2, 3, 4, 5]),
        (GgmlType::Q4_0, 37, 96, &[0, 4]),
        (GgmlType::Q4_1, 75, 608, &[0, 3, 5]),
        (GgmlType::Q4_1, 130, 352, &[1]),
        (GgmlType::Q4_K, 37, 768, &[0, 3]),
        (GgmlType::Q6_K, 19, 256, &[0, 4]),
    ];
    for (ty, rows, cols, picks) in cases {
        let m = matrix(ty, rows, cols, &mut rng);
        let g = GpuMatrix::upload_layout(&ctx, &m, ctx.max_binding(), false).unwrap();
        let x: Vec<f32> = rng.vec(16 * cols).iter().enumerate().map(|(i, v)| v + if i % 97 == 0 { 3.0 } else { 0.0 }).collect();
        let (want32, mag) = reference(&m, &x, 16);
        let want8 = if matches!(ty, GgmlType::Q4_K | GgmlType::Q6_K) { k_q8_reference(&m, &x, 16) } else { reference_at(&m, &x, 16, Precision::Llama).0 };
        let b = Bufs::new(&ctx, &x, 16 * rows);
        for (label, kq, max_nt) in picks.iter().map(|&i| &shapes[i]) {
            let want = if kq.limbs == 1 { &want8 } else { &want32 };
            let op = g.bind_matmul_with(&ctx, &b.x, &b.y, &b.step, &variants(*kq, *max_nt));
            for n in [2, 3, 5, 8, 16] {
                let got = run(&ctx, &op, &b, rows, n, Kernel::Auto);
                let what = format!("{ty:?} {rows}x{cols} n={n} {label}");
                check(&what, &got, &want[..n * rows], &mag[..n * rows]);
                let all: Vec<f32> = ctx.read(&b.y, 16 * rows).unwrap();
                assert!(all[n * rows..].iter().all(|v| v.is_nan()), "{what}: a value stored past token {n}");
            }
        }
    }
}

/// ggml's get_scale_min_k4: sub-block j's 6-bit scale and minimum from a Q4_K block's 12 bytes.
fn scale_min_k4(q: &[u8], j: usize) -> (f32, f32) {
    let (sc, m) = if j < 4 { (q[j] & 63, q[j + 4] & 63) } else { ((q[j + 4] & 15) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)) };
    (sc as f32, m as f32)
}

/// Q4_K or Q6_K (GGUF blocks) times 8-bit activations as the integer kernel computes them with
/// KQ_LIMBS = 1: per 32 elements xq = round(x / s), s = max|x| / 127 (then rounded to f16), Q4_K's
/// minimum times Q8_1's sum f16(s sum xq), summed in f64.
fn k_q8_reference(m: &Matrix, x: &[f32], n: usize) -> Vec<f32> {
    let f16 = |v: f32| half::f16::from_f32(v).to_f32();
    let mut out = vec![0.0; n * m.rows];
    for t in 0..n {
        let groups: Vec<([i32; 32], f32, f32)> = x[t * m.cols..(t + 1) * m.cols]
            .chunks_exact(32)
            .map(|g| {
                let amax = g.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let inv = if amax > 0.0 { 1.0 / d } else { 0.0 };
                let mut q = [0i32; 32];
                for (qi, v) in q.iter_mut().zip(g) {
                    *qi = (v * inv).round() as i32;
                }
                let qsum: i32 = q.iter().sum();
                (q, f16(d), f16(d * qsum as f32))
            })
            .collect();
        for r in 0..m.rows {
            let row = &m.bytes()[r * m.row_bytes()..(r + 1) * m.row_bytes()];
            let mut acc = 0.0f64;
            if m.ty == GgmlType::Q6_K {
                for (sb, b) in row.chunks_exact(210).enumerate() {
                    let d = half::f16::from_le_bytes([b[208], b[209]]).to_f32() as f64;
                    for j in 0..8 {
                        let (xq, s, _) = &groups[8 * sb + j];
                        let (hf, k) = (j / 4, j % 4);
                        for e in 0..32 {
                            let byte = b[64 * hf + e + 32 * (k % 2)];
                            let lo = if k < 2 { byte & 15 } else { byte >> 4 };
                            let q = (lo | ((b[128 + 32 * hf + e] >> (2 * k)) & 3) << 4) as i32 - 32;
                            let sc = b[192 + 2 * j + e / 16] as i8 as f64;
                            acc += d * sc * *s as f64 * (q * xq[e]) as f64;
                        }
                    }
                }
                out[t * m.rows + r] = acc as f32;
                continue;
            }
            for (sb, b) in row.chunks_exact(144).enumerate() {
                let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                let dmin = half::f16::from_le_bytes([b[2], b[3]]).to_f32();
                for j in 0..8 {
                    let (sc, mn) = scale_min_k4(&b[4..16], j);
                    let (xq, s, sum) = &groups[8 * sb + j];
                    let dot: i32 = (0..32)
                        .map(|e| {
                            let byte = b[16 + 32 * (j / 2) + e];
                            let q = if j % 2 == 0 { byte & 15 } else { byte >> 4 };
                            q as i32 * xq[e]
                        })
                        .sum();
                    acc += (d * sc) as f64 * *s as f64 * dot as f64 - (dmin * mn) as f64 * *sum as f64;
                }
            }
            out[t * m.rows + r] = acc as f32;
        }
    }
    out
}

/// The integer-dot-product decode matvec on Q4_K and Q6_K (grouped layout: a 32-element group as
/// a block; Q4_K's scale and minimum from the super-block header, Q6_K's high bit pairs or'ed
/// into the nibbles and a scale per 16): 22-bit activations against the CPU's f32 product,
/// 8-bit ones against [`k_q8_reference`]; row counts that no step shape divides, one to many
/// super-blocks (16640 columns: two groups per thread and row), both reductions.
#[test]
fn integer_matvec_k_quants_match_cpu() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(0x4B4B);
    for (ty, rows, cols) in [GgmlType::Q4_K, GgmlType::Q6_K].into_iter().flat_map(|ty| [(75, 768), (37, 256), (130, 1280), (5, 16640)].map(|(r, c)| (ty, r, c))) {
        let m = matrix(ty, rows, cols, &mut rng);
        let g = GpuMatrix::upload(&ctx, &m).unwrap();
        let x: Vec<f32> = rng.vec(3 * cols).iter().enumerate().map(|(i, v)| v + if i % 97 == 0 { 3.0 } else { 0.0 }).collect();
        let (want32, mag) = reference(&m, &x, 3);
        let want8 = k_q8_reference(&m, &x, 3);
        let b = Bufs::new(&ctx, &x, 3 * rows);
        for limbs in [3, 1] {
            let want = if limbs == 3 { &want32 } else { &want8 };
            for (nr, rg, prefetch) in [(1, 1, false), (4, 2, true), (3, 3, false), (8, 4, false)] {
                for subgroups in [false, true] {
                    let cfg = [MvConfig { nt: 1, wg: 64, nr: 2, unroll: 1, units: false, prefetch: false, subgroups, kq: None }];
                    let kernel = DecodeKernel::Quantized { nr, rg, prefetch, limbs };
                    let op = g.bind_matmul_variant(&ctx, &b.x, &b.y, &b.step, &cfg, kernel, &MatOut::default());
                    for n in [1, 3] {
                        let got = run(&ctx, &op, &b, rows, n, Kernel::Matvec);
                        let what = format!("{} limbs {limbs} nr {nr} rg {rg} pf {prefetch} sg {subgroups} n={n}", m.name);
                        check(&what, &got, &want[..n * rows], &mag[..n * rows]);
                    }
                }
            }
        }
    }
}

#[test]
fn split_across_bindings() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(99);
    for ty in TYPES {
        let (rows, cols) = (200, 256);
        let m = matrix(ty, rows, cols, &mut rng);
        // Room for 64..127 rows of quants per buffer: four chunks (64, 64, 64, 8).
        let row_bytes = match ty {
            GgmlType::F32 => cols * 4,
            GgmlType::F16 => cols * 2,
            GgmlType::Q8_0 => cols,
            _ => cols / 2,
        };
        let g = GpuMatrix::upload_with_limit(&ctx, &m, (row_bytes * 100) as u64).unwrap();
        assert_eq!(g.n_chunks(), 4, "{ty:?}");
        let whole = GpuMatrix::upload(&ctx, &m).unwrap();
        assert!(g.gpu_bytes() >= whole.gpu_bytes());
        check_matrix(&ctx, &m, &g, &[1, 3, 17], &mut rng);
        check_get_rows(&ctx, &m, &g, &[0, 199, 64, 63, 128, 127, 192, 5, 5], &mut rng);
        // Too small for even 64 rows.
        assert!(GpuMatrix::upload_with_limit(&ctx, &m, (row_bytes * 63) as u64).is_err());
    }
}

/// Runs `op` for n tokens over y holding `y0` and reads all of y back.
fn run_over(ctx: &GpuContext, op: &MatmulOp, b: &Bufs, y0: &[f32], n: usize, kernel: Kernel) -> Vec<f32> {
    ctx.queue.write_buffer(&b.step, 0, bytemuck::bytes_of(&Step { n_tokens: n as u32, pos0: 0, n_kv: n as u32, _pad: 0 }));
    ctx.queue.write_buffer(&b.y, 0, bytemuck::cast_slice(y0));
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
        op.encode_with(&mut pass, n as u32, kernel);
    }
    ctx.submit_and_wait(enc).unwrap();
    ctx.read(&b.y, y0.len()).unwrap()
}

/// The variants a fused product is checked with: (label, matvec configs, one-token kernel).
/// The integer kernel (22-bit activations, so that the f32 references hold; its 8-bit numerics
/// are checked by `integer_matvec_matches_cpu` and `integer_matvec_k_quants_match_cpu`) runs on
/// Q4 matrices in GGUF block order (608 columns here), Q4_K and Q6_K; elsewhere it falls back to
/// the blocks kernel.
fn fused_variants(ctx: &GpuContext) -> Vec<(&'static str, Vec<MvConfig>, DecodeKernel)> {
    let blocks = DecodeKernel::Blocks { prefetch: true };
    let integer = DecodeKernel::Quantized { nr: 4, rg: 3, prefetch: false, limbs: 3 };
    let shared = default_mv_configs(ctx).into_iter().map(|c| MvConfig { subgroups: false, ..c }).collect::<Vec<_>>();
    // The few-token products of the integer variant on the integer kernel too (22-bit, 3 rows a
    // step: 4 with pairs).
    let kq = KqTokens { nr: 3, rg: 2, prefetch: true, limbs: 3, staged: None };
    let integer_mv = |subgroups: bool| default_mv_configs(ctx).into_iter().map(|c| MvConfig { subgroups: subgroups && c.subgroups, kq: (c.nt > 1).then_some(kq), ..c }).collect::<Vec<_>>();
    let mut v = vec![("default", default_mv_configs(ctx), blocks), ("integer", integer_mv(true), integer)];
    if ctx.has_subgroups() {
        v.push(("shared-memory", shared, blocks));
        v.push(("integer shared-memory", integer_mv(false), integer));
    }
    v
}

/// Auto and the other kernels for n tokens: the tiled one up to MATVEC_MAX_TOKENS; beyond, the
/// matvec and the portable tiled kernel (Auto is the cooperative-matrix one where the adapter
/// has it, else the portable one again).
fn kernels_for(n: usize) -> Vec<Kernel> {
    if n as u32 <= MATVEC_MAX_TOKENS {
        vec![Kernel::Auto, Kernel::Tiled]
    } else {
        vec![Kernel::Auto, Kernel::Matvec, Kernel::Tiled]
    }
}

/// The relative error (of sum |w x|) allowed for `kernel` at n tokens: f32's 1e-4, or for the
/// cooperative-matrix kernel, whose weights and activations are rounded to f16 (each product
/// off by at most 2 * 2^-11 of itself), 1.5e-3.
fn tol(ctx: &GpuContext, n: usize, kernel: Kernel) -> f32 {
    let coop = match kernel {
        Kernel::Coop => true,
        Kernel::Auto => n as u32 > MATVEC_MAX_TOKENS,
        _ => false,
    };
    if coop && ctx.has_coop_matrix() {
        1.5e-3
    } else {
        1e-4
    }
}

/// q, k and v stacked into one matrix and stored into three sections of one y at odd offsets
/// (and added to what y holds, the residual epilogue), against three CPU products; y outside
/// the sections is left alone.
#[test]
fn stacked_sections_and_residual_add_match_cpu() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(0xADD);
    // 608 columns: 19 blocks, GGUF word order; 512: the permuted order of the Q4/Q8 kernels.
    for ty in FUSED_TYPES {
        for (cols, heights) in [(608, [70, 23, 23]), (512, [64, 33, 1])] {
            let cols = width(ty, cols);
            let parts: Vec<Matrix> = heights.iter().map(|&r| matrix(ty, r, cols, &mut rng)).collect();
            let refs: Vec<&Matrix> = parts.iter().collect();
            let g = GpuMatrix::upload_stacked(&ctx, "qkv", &refs, false).unwrap().expect("same type and width");
            let max_n = 40;
            let x = rng.vec(max_n * cols);
            let offsets = [5usize, 5 + max_n * heights[0] + 3, 5 + max_n * (heights[0] + heights[1]) + 100];
            let y_len = offsets[2] + max_n * heights[2] + 7;
            let y0 = rng.vec(y_len);
            let b = Bufs::new(&ctx, &x, y_len);
            let sections: Vec<(u32, u32)> = heights.iter().zip(offsets).map(|(&r, o)| (r as u32, o as u32)).collect();
            let wants: Vec<(Vec<f32>, Vec<f32>)> = parts.iter().map(|m| reference(m, &x, max_n)).collect();
            for epilogue in [Epilogue::Store, Epilogue::Add] {
                let out = MatOut { epilogue, sections: sections.clone() };
                for (label, cfg, decode) in fused_variants(&ctx) {
                    let op = g.bind_matmul_variant(&ctx, &b.x, &b.y, &b.step, &cfg, decode, &out);
                    for n in [1, 2, 3, 9, 17, 40] {
                        for kernel in kernels_for(n) {
                            let got = run_over(&ctx, &op, &b, &y0, n, kernel);
                            let what = format!("{ty:?} stacked {heights:?}x{cols} {epilogue:?} n={n} {kernel:?} {label}");
                            let mut expect = y0.clone();
                            let mut mag = vec![1e-30f32; y_len];
                            for (s, (want, m)) in wants.iter().enumerate() {
                                let len = n * heights[s];
                                for i in 0..len {
                                    let o = offsets[s] + i;
                                    expect[o] = if epilogue == Epilogue::Add { y0[o] + want[i] } else { want[i] };
                                    mag[o] = m[i] + if epilogue == Epilogue::Add { y0[o].abs() } else { 0.0 };
                                }
                            }
                            for (i, ((&gv, &w), &m)) in got.iter().zip(&expect).zip(&mag).enumerate() {
                                let err = (gv - w).abs() / m;
                                assert!(err < tol(&ctx, n, kernel) || gv == w, "{what}: element {i}: got {gv}, want {w} (relative error {err:.2e})");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Gate and up interleaved into one matrix with the gated epilogue (SiLU and ReLU): act(gate) *
/// up against the CPU's products and an f64 activation.
#[test]
fn gated_pairs_match_cpu() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(0x6A7E);
    for ty in FUSED_TYPES {
        for (ff, cols) in [(45, 608), (64, 512), (1, 96)] {
            let cols = width(ty, cols);
            let gate = matrix(ty, ff, cols, &mut rng);
            let up = matrix(ty, ff, cols, &mut rng);
            let g = GpuMatrix::upload_stacked(&ctx, "gate_up", &[&gate, &up], true).unwrap().expect("same type and shape");
            let max_n = 40;
            // Activations large enough that gate values reach both sides of SiLU's bend.
            let x: Vec<f32> = rng.vec(max_n * cols).iter().map(|v| 4.0 * v).collect();
            let (wg, mg) = reference(&gate, &x, max_n);
            let (wu, mu) = reference(&up, &x, max_n);
            let b = Bufs::new(&ctx, &x, max_n * ff);
            for act in [Activation::Silu, Activation::Relu, Activation::Drelu] {
                let out = MatOut::with(Epilogue::GatedPairs { act });
                for (label, cfg, decode) in fused_variants(&ctx) {
                    let op = g.bind_matmul_variant(&ctx, &b.x, &b.y, &b.step, &cfg, decode, &out);
                    for n in [1, 2, 3, 9, 17, 40] {
                        for kernel in kernels_for(n) {
                            let got = run_over(&ctx, &op, &b, &vec![f32::NAN; max_n * ff], n, kernel);
                            for i in 0..n * ff {
                                let (gv, uv) = (wg[i] as f64, wu[i] as f64);
                                let want = match act {
                                    Activation::Silu => gv / (1.0 + (-gv).exp()) * uv,
                                    Activation::Relu => gv.max(0.0) * uv,
                                    Activation::Drelu => gv.max(0.0) * uv.max(0.0),
                                    Activation::GeluTanh => unreachable!("no GPU kernel computes GeLU"),
                                };
                                // The products' own error (1e-4 of sum |w x|) through act(g) * u.
                                let bound = 2.0 * tol(&ctx, n, kernel) as f64 * (mg[i] as f64 * uv.abs() + (gv.abs() + mg[i] as f64) * mu[i] as f64) + 1e-6;
                                assert!(
                                    (got[i] as f64 - want).abs() <= bound,
                                    "{ty:?} gate_up {ff}x{cols} {act:?} n={n} {kernel:?} {label}: element {i}: got {}, want {want} (bound {bound:.2e})",
                                    got[i]
                                );
                            }
                        }
                    }
                }
            }
            // The model's own decode kernel (the type's configuration) too.
            let op = g.bind_matmul_out(&ctx, &b.x, &b.y, &b.step, &MatOut::with(Epilogue::GatedPairs { act: Activation::Silu }));
            let got = run_over(&ctx, &op, &b, &vec![f32::NAN; max_n * ff], 1, Kernel::Auto);
            for i in 0..ff {
                let (gv, uv) = (wg[i] as f64, wu[i] as f64);
                let want = gv / (1.0 + (-gv).exp()) * uv;
                let bound = 2e-4 * (mg[i] as f64 * uv.abs() + (gv.abs() + mg[i] as f64) * mu[i] as f64) + 1e-6;
                assert!((got[i] as f64 - want).abs() <= bound, "{ty:?} gate_up {ff}x{cols} type's decode kernel: element {i}: got {}, want {want}", got[i]);
            }
        }
    }
}

/// An RMSNorm folded into the product (one token: inside the decode kernel; more: a separate
/// norm first) against the CPU's rms_norm then product: plain and stacked-with-sections stores,
/// gated pairs, matrices split across bindings, every type, the default and shared-memory
/// reductions and the type's own decode kernel. The raw rows are large and offset (not
/// already normalised) and the norm weights random, so a missing scale or weight shows.
#[test]
fn folded_rms_norm_matches_cpu() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(0x4E0F);
    let eps = 1e-5f32;
    for ty in FUSED_TYPES {
        // 608: GGUF word order; 512: the permuted order; 96: fewer slots than threads.
        for (rows, cols, split) in [(70, 608, false), (133, 512, false), (4, 96, false), (200, 256, true)] {
            let cols = width(ty, cols);
            let m = matrix(ty, rows, cols, &mut rng);
            let g = if split {
                let row_bytes = GpuMatrix::upload(&ctx, &m).unwrap().gpu_bytes() as usize / rows;
                let g = GpuMatrix::upload_with_limit(&ctx, &m, (row_bytes * 100) as u64).unwrap();
                assert!(g.n_chunks() > 1);
                g
            } else {
                GpuMatrix::upload(&ctx, &m).unwrap()
            };
            let max_n = 17;
            let raw: Vec<f32> = rng.vec(max_n * cols).iter().enumerate().map(|(i, v)| 30.0 * v + (i % 7) as f32).collect();
            let weight: Vec<f32> = rng.vec(cols).iter().map(|v| 1.0 + v).collect();
            let mut xn = vec![0.0; max_n * cols];
            for t in 0..max_n {
                ember::cpu::ops::rms_norm(&raw[t * cols..(t + 1) * cols], &weight, eps, &mut xn[t * cols..(t + 1) * cols]);
            }
            let (want, mag) = reference(&m, &xn, max_n);
            let xb = ctx.upload("raw", bytemuck::cast_slice(&raw));
            let wb = ctx.upload("norm weight", bytemuck::cast_slice(&weight));
            // The product's own input buffer starts as garbage: the norm must fill it.
            let b = Bufs::new(&ctx, &vec![f32::NAN; max_n * cols], 3 + max_n * rows);
            let norm = NormIn { x: &xb, weight: &wb, eps };
            let out = MatOut { epilogue: Epilogue::Store, sections: vec![(rows as u32, 3)] };
            let mut ops: Vec<(&str, MatmulOp)> = fused_variants(&ctx).into_iter().map(|(label, cfg, decode)| (label, g.bind_matmul_normed_with(&ctx, &norm, &b.x, &b.y, &b.step, &cfg, decode, &out))).collect();
            ops.push(("type's decode kernel", g.bind_matmul_normed(&ctx, &norm, &b.x, &b.y, &b.step, &out)));
            for (label, op) in &ops {
                for n in [1, 3, 17] {
                    for kernel in kernels_for(n) {
                        let got = run_over(&ctx, op, &b, &vec![f32::NAN; 3 + max_n * rows], n, kernel);
                        let len = n * rows;
                        check_tol(&format!("{ty:?} normed {rows}x{cols} ({} chunks) n={n} {kernel:?} {label}", g.n_chunks()), &got[3..3 + len], &want[..len], &mag[..len], tol(&ctx, n, kernel));
                    }
                }
            }
            // Gated pairs over the normalised rows (gate and up interleaved).
            if rows % 2 == 0 && !split {
                let up = matrix(ty, rows, cols, &mut rng);
                let gu = GpuMatrix::upload_stacked(&ctx, "gate_up", &[&m, &up], true).unwrap().unwrap();
                let (wu, mu) = reference(&up, &xn, max_n);
                let yb = Bufs::new(&ctx, &vec![f32::NAN; max_n * cols], max_n * rows);
                let op = gu.bind_matmul_normed(&ctx, &norm, &yb.x, &yb.y, &yb.step, &MatOut::with(Epilogue::GatedPairs { act: Activation::Silu }));
                for n in [1, 3] {
                    let got = run_over(&ctx, &op, &yb, &vec![f32::NAN; max_n * rows], n, Kernel::Auto);
                    for i in 0..n * rows {
                        let (gv, uv) = (want[i] as f64, wu[i] as f64);
                        let w = gv / (1.0 + (-gv).exp()) * uv;
                        // The products' own error (1e-4 of sum |w x|) through act(g) * u.
                        let (mg, mu) = (mag[i] as f64, mu[i] as f64);
                        let bound = 2e-4 * (mg * uv.abs() + (gv.abs() + mg) * mu) + 1e-6;
                        assert!((got[i] as f64 - w).abs() <= bound, "{ty:?} normed gate_up {rows}x{cols} n={n}: element {i}: got {}, want {w} (bound {bound:.2e})", got[i]);
                    }
                }
            }
        }
    }
}

/// RoPE and the KV-cache write in the stacked q/k/v product's epilogue (one token, norm folded)
/// against the same product stored plainly and the separate RoPE + KV write kernel (itself
/// checked against the CPU in kernels_gpu_ops.rs): rotated q, the cache rows at the step's
/// position, and the cache elsewhere untouched. Partial rotation (rope_dim < head_dim), GQA,
/// every type, both word orders, the default and shared-memory reductions.
#[test]
fn rope_epilogue_matches_separate_rope() {
    use ember::gpu::ops::{RopeKvOp, RopeShape};
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(0x209E);
    let (n_head, n_head_kv, head_dim, n_ctx, pos) = (3u32, 1u32, 64u32, 50u32, 37u32);
    let (qd, kvd) = ((n_head * head_dim) as usize, (n_head_kv * head_dim) as usize);
    let shape = RopeShape { n_head, n_head_kv, head_dim, rope_dim: 48, base: 10000.0, freq_scale: 0.5, neox: false };
    for ty in FUSED_TYPES {
        for cols in [608, 512] {
            let cols = width(ty, cols);
            let parts: Vec<Matrix> = [qd, kvd, kvd].iter().map(|&r| matrix(ty, r, cols, &mut rng)).collect();
            let refs: Vec<&Matrix> = parts.iter().collect();
            let g = GpuMatrix::upload_stacked(&ctx, "qkv", &refs, false).unwrap().unwrap();
            let raw: Vec<f32> = rng.vec(cols).iter().map(|v| 20.0 * v + 1.0).collect();
            let weight: Vec<f32> = rng.vec(cols).iter().map(|v| 1.0 + v).collect();
            let xb = ctx.upload("raw", bytemuck::cast_slice(&raw));
            let wb = ctx.upload("norm weight", bytemuck::cast_slice(&weight));
            let norm = NormIn { x: &xb, weight: &wb, eps: 1e-6 };
            // q, k, v sections at aligned offsets of one buffer, as the forward pass binds them.
            let align = ctx.limits.min_storage_buffer_offset_alignment as u64 / 4;
            let k_off = (qd as u64).next_multiple_of(align);
            let v_off = (k_off + kvd as u64).next_multiple_of(align);
            let b = Bufs::new(&ctx, &vec![f32::NAN; cols], (v_off as usize) + kvd);
            let out = MatOut { epilogue: Epilogue::Store, sections: vec![(qd as u32, 0), (kvd as u32, k_off as u32), (kvd as u32, v_off as u32)] };
            let cache0: Vec<u32> = (0..n_ctx as usize * kvd / 2).map(|i| i as u32 * 2654435761).collect();
            let caches: Vec<wgpu::Buffer> = (0..4).map(|i| ctx.upload(&format!("cache {i}"), bytemuck::cast_slice(&cache0))).collect();
            let range = |off: u64, len: usize| b.y.slice(off * 4..(off + len as u64) * 4);
            let separate = RopeKvOp::new(&ctx, range(0, qd), range(k_off, kvd), range(v_off, kvd), &caches[2], &caches[3], shape, &b.step);
            let rope = RopeIn { cache_k: (&caches[0]).into(), cache_v: (&caches[1]).into(), shape };
            let mut ops = vec![("type's decode kernel", g.bind_matmul_normed_rope(&ctx, &norm, &rope, &b.x, &b.y, &b.step, &out))];
            for (label, cfg, decode) in fused_variants(&ctx) {
                ops.push((label, g.bind_matmul_normed_rope_with(&ctx, &norm, &rope, &b.x, &b.y, &b.step, &cfg, decode, &out)));
            }
            for (label, op) in &ops {
                assert!(op.folds(1) && !op.folds(2));
                for c in &caches {
                    ctx.queue.write_buffer(c, 0, bytemuck::cast_slice(&cache0));
                }
                ctx.queue.write_buffer(&b.step, 0, bytemuck::bytes_of(&Step { n_tokens: 1, pos0: pos, n_kv: pos + 1, _pad: 0 }));
                let run = |fold: bool| {
                    let mut enc = ctx.device.create_command_encoder(&Default::default());
                    {
                        let mut pass = enc.begin_compute_pass(&Default::default());
                        if fold {
                            op.encode(&mut pass, 1);
                        } else {
                            op.encode_with(&mut pass, 1, Kernel::Tiled);
                            separate.encode(&mut pass, 1);
                        }
                    }
                    ctx.submit_and_wait(enc).unwrap();
                    ctx.read::<f32>(&b.y, qd).unwrap()
                };
                let q_want = run(false);
                let q_got = run(true);
                let what = format!("{ty:?} qkv rope {cols} {label}");
                let scale = q_want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                for i in 0..qd {
                    assert!((q_got[i] - q_want[i]).abs() <= 1e-4 * scale, "{what}: q[{i}]: got {}, want {}", q_got[i], q_want[i]);
                }
                for (kind, got, want) in [("k", &caches[0], &caches[2]), ("v", &caches[1], &caches[3])] {
                    let got: Vec<u32> = ctx.read(got, cache0.len()).unwrap();
                    let want: Vec<u32> = ctx.read(want, cache0.len()).unwrap();
                    let row = pos as usize * kvd / 2..(pos as usize + 1) * kvd / 2;
                    for i in 0..cache0.len() {
                        if !row.contains(&i) {
                            assert_eq!(got[i], cache0[i], "{what}: {kind} cache word {i} outside the position changed");
                            continue;
                        }
                        let h = |w: u32| [half::f16::from_bits(w as u16).to_f32(), half::f16::from_bits((w >> 16) as u16).to_f32()];
                        let (g2, w2) = (h(got[i]), h(want[i]));
                        for j in 0..2 {
                            assert!((g2[j] - w2[j]).abs() <= 2e-3 * (1.0 + w2[j].abs()), "{what}: {kind} cache word {i}.{j}: got {}, want {}", g2[j], w2[j]);
                        }
                    }
                }
            }
        }
    }
}

fn check_get_rows(ctx: &GpuContext, m: &Matrix, g: &GpuMatrix, ids: &[u32], _rng: &mut Rng) {
    let n = ids.len();
    let idb = ctx.upload("ids", bytemuck::cast_slice(ids));
    let out = ctx.zeros("out", (n * m.cols * 4) as u64);
    ctx.queue.write_buffer(&out, 0, bytemuck::cast_slice(&vec![f32::NAN; n * m.cols]));
    let step = ctx.uniform("step", bytemuck::bytes_of(&Step { n_tokens: n as u32, pos0: 0, n_kv: 0, _pad: 0 }));
    let op = g.bind_get_rows(ctx, &idb, &out, &step);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
        op.encode(&mut pass, n as u32);
    }
    ctx.submit_and_wait(enc).unwrap();
    let got: Vec<f32> = ctx.read(&out, n * m.cols).unwrap();
    for (i, &id) in ids.iter().enumerate() {
        let want = m.row_f32(id as usize);
        assert_eq!(&got[i * m.cols..(i + 1) * m.cols], &want[..], "{}: get_rows id {id} (position {i})", m.name);
    }
}

#[test]
fn get_rows_matches_cpu_every_type() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(4242);
    for ty in TYPES {
        for (rows, cols) in [(1, 32), (50, 96), (300, 576)] {
            let m = matrix(ty, rows, cols, &mut rng);
            let g = GpuMatrix::upload(&ctx, &m).unwrap();
            let ids: Vec<u32> = (0..7).map(|i| if i == 0 { rows as u32 - 1 } else { (rng.next_u64() % rows as u64) as u32 }).collect();
            check_get_rows(&ctx, &m, &g, &ids, &mut rng);
        }
    }
}

/// Grids over 65535 workgroups go 2D: a matvec over 70k row groups and a lookup of 70k ids.
#[test]
fn large_grids() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(31337);
    let m = matrix(GgmlType::Q4_0, 70_001, 32, &mut rng);
    let g = GpuMatrix::upload(&ctx, &m).unwrap();
    let x = rng.vec(3 * 32);
    let (want, mag) = reference(&m, &x, 3);
    let b = Bufs::new(&ctx, &x, 3 * m.rows);
    let cfg = [MvConfig { nt: 2, wg: 32, nr: 1, unroll: 1, units: false, prefetch: true, subgroups: ctx.has_subgroups(), kq: None }];
    let op = g.bind_matmul_with(&ctx, &b.x, &b.y, &b.step, &cfg);
    for n in [1, 3] {
        let got = run(&ctx, &op, &b, m.rows, n, Kernel::Matvec);
        check(&format!("{} n={n}", m.name), &got, &want[..n * m.rows], &mag[..n * m.rows]);
    }
    let ids: Vec<u32> = (0..70_000).map(|_| (rng.next_u64() % m.rows as u64) as u32).collect();
    check_get_rows(&ctx, &m, &g, &ids, &mut rng);
}

/// GPU time of each of `passes` compute passes (timestamps at their start and end), median in
/// microseconds over the passes, after one untimed run.
fn pass_times(ctx: &GpuContext, passes: usize, f: &dyn Fn(&mut wgpu::ComputePass<'_>, usize)) -> f64 {
    let qs = ctx.device.create_query_set(&wgpu::QuerySetDescriptor { label: None, ty: wgpu::QueryType::Timestamp, count: 2 * passes as u32 });
    let resolve = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 16 * passes as u64,
        usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let mut times = Vec::new();
    for round in 0..2 {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        for i in 0..passes {
            let tw = wgpu::ComputePassTimestampWrites { query_set: &qs, beginning_of_pass_write_index: Some(2 * i as u32), end_of_pass_write_index: Some(2 * i as u32 + 1) };
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: Some(tw) });
            f(&mut pass, i);
        }
        enc.resolve_query_set(&qs, 0..2 * passes as u32, &resolve, 0);
        ctx.submit_and_wait(enc).unwrap();
        if round == 1 {
            let ts: Vec<u64> = ctx.read(&resolve, 2 * passes).unwrap();
            let period = ctx.queue.get_timestamp_period() as f64;
            times = ts.chunks(2).map(|p| p[1].wrapping_sub(p[0]) as f64 * period / 1e3).collect();
        }
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

const COPY_WGSL: &str = "
@group(0) @binding(0) var<storage, read> a: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> b: array<vec4<u32>>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    b[gid.x] = a[gid.x];
}";

/// Timings on a real GPU: `cargo test --release --test kernels_gpu_matmul -- --ignored
/// bench_matvec --nocapture` (EMBER_BENCH_TYPES=Q4_0,F16 to choose types, EMBER_BENCH_SWEEP=1
/// to try matvec shapes). GPU time from timestamp queries: `alone` is one dispatch per pass,
/// `in a row` many dependent-free dispatches per pass (the pass time divided by their number).
/// Several copies of each matrix rotate so the L2 cache does not hold the weights.
#[test]
#[ignore]
fn bench_matvec() {
    let ctx = GpuContext::new(&ember::gpu::DeviceChoice::BestOrSoftware).unwrap();
    eprintln!(
        "adapter: {} ({:?}), subgroups {}, f16 {}, shared memory {} bytes",
        ctx.adapter.name,
        ctx.adapter.backend,
        ctx.has_subgroups(),
        ctx.has_f16(),
        ctx.limits.max_compute_workgroup_storage_size
    );
    assert!(ctx.has_timestamps(), "the benchmark needs timestamp queries");
    let mut rng = Rng(1);
    // Copy bandwidth through a compute kernel (bytes read + written).
    let size = 128u64 << 20;
    let (a, c) = (ctx.zeros("a", size), ctx.zeros("c", size));
    let p = ctx.pipeline(&ember::gpu::ShaderSpec::new("bench/copy", COPY_WGSL, "main"));
    let bg = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &p.get_bind_group_layout(0),
        entries: &[wgpu::BindGroupEntry { binding: 0, resource: a.as_entire_binding() }, wgpu::BindGroupEntry { binding: 1, resource: c.as_entire_binding() }],
    });
    let t = pass_times(&ctx, 20, &|pass, _| {
        pass.set_pipeline(&p);
        pass.set_bind_group(0, &bg, &[]);
        for _ in 0..4 {
            pass.dispatch_workgroups((size / 16 / 256) as u32, 1, 1);
        }
    }) / 4.0;
    let copy_bw = 2.0 * size as f64 / t / 1e3;
    eprintln!("copy kernel: {t:.1} us per 128 MiB, {copy_bw:.0} GB/s (read + write)");
    drop((a, c));
    // Per-dispatch cost of a tiny matvec.
    {
        let m = matrix(GgmlType::Q4_0, 64, 32, &mut rng);
        let g = GpuMatrix::upload(&ctx, &m).unwrap();
        let b = Bufs::new(&ctx, &rng.vec(32), 64);
        ctx.queue.write_buffer(&b.step, 0, bytemuck::bytes_of(&Step { n_tokens: 1, ..Default::default() }));
        let op = g.bind_matmul(&ctx, &b.x, &b.y, &b.step);
        let alone = pass_times(&ctx, 50, &|pass, _| op.encode(pass, 1));
        let row = pass_times(&ctx, 10, &|pass, _| (0..200).for_each(|_| op.encode(pass, 1))) / 200.0;
        eprintln!("tiny matvec (64x32): alone {alone:.1} us, in a row (same y) {row:.2} us");
    }
    let only: Option<String> = std::env::var("EMBER_BENCH_TYPES").ok();
    let sweep = std::env::var_os("EMBER_BENCH_SWEEP").is_some();
    // (wg, nr, unroll) of the decode matvec.
    let mut variants: Vec<(u32, u32, u32)> = vec![];
    if sweep {
        variants.extend([(128, 4, 1), (128, 2, 1), (256, 2, 1), (64, 2, 1), (128, 8, 1), (128, 4, 2), (128, 2, 2)]);
    }
    for ty in [GgmlType::Q4_0, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_1, GgmlType::F32] {
        if only.as_ref().is_some_and(|o| !o.split(',').any(|s| s.eq_ignore_ascii_case(ty.name()))) {
            continue;
        }
        for (rows, cols) in [(11008, 4096), (4096, 11008)] {
            let m = matrix(ty, rows, cols, &mut rng);
            let one = GpuMatrix::upload(&ctx, &m).unwrap();
            let bytes = one.gpu_bytes();
            let n_copies = (400u64 << 20).div_ceil(bytes).clamp(2, 16) as usize;
            let mats: Vec<GpuMatrix> = std::iter::once(one).chain((1..n_copies).map(|_| GpuMatrix::upload(&ctx, &m).unwrap())).collect();
            let max_t = 512;
            let x = ctx.upload("x", bytemuck::cast_slice(&rng.vec(max_t * cols)));
            let ys: Vec<wgpu::Buffer> = (0..n_copies).map(|_| ctx.zeros("y", (max_t * rows * 4) as u64)).collect();
            let step = ctx.uniform("step", bytemuck::bytes_of(&Step::default()));
            let report = |what: &str, n: u32, ops: &[MatmulOp], kernel: Kernel| {
                ctx.queue.write_buffer(&step, 0, bytemuck::bytes_of(&Step { n_tokens: n, ..Default::default() }));
                let alone = pass_times(&ctx, 4 * n_copies, &|pass, i| ops[i % n_copies].encode_with(pass, n, kernel));
                let reps = (64 / n_copies).max(1);
                let row = pass_times(&ctx, 4, &|pass, _| (0..reps).for_each(|_| ops.iter().for_each(|op| op.encode_with(pass, n, kernel)))) / (reps * n_copies) as f64;
                let flops = 2.0 * rows as f64 * cols as f64 * n as f64;
                eprintln!(
                    "{:5} {rows:5}x{cols:5} n={n:3} {what:22}: alone {alone:7.1} us {:5.0} GB/s {:5.1}% | in a row {row:7.1} us {:5.0} GB/s {:5.1}% | {:5.2} TFLOP/s",
                    ty.name(),
                    bytes as f64 / alone / 1e3,
                    100.0 * bytes as f64 / alone / 1e3 / copy_bw,
                    bytes as f64 / row / 1e3,
                    100.0 * bytes as f64 / row / 1e3 / copy_bw,
                    flops / row / 1e6,
                );
            };
            {
                for &(wg, nr, unroll) in &variants {
                    let cfg = [MvConfig { nt: 1, wg, nr, unroll, units: false, prefetch: false, subgroups: ctx.has_subgroups(), kq: None }];
                    let ops: Vec<MatmulOp> = mats.iter().zip(&ys).map(|(g, y)| g.bind_matmul_with(&ctx, &x, y, &step, &cfg)).collect();
                    report(&format!("mv wg {wg} nr {nr} x{unroll}"), 1, &ops, Kernel::Matvec);
                }
                let ops: Vec<MatmulOp> = mats.iter().zip(&ys).map(|(g, y)| g.bind_matmul(&ctx, &x, y, &step)).collect();
                for n in [1u32, 2, 4, 8, 16, 64] {
                    report("matvec (default)", n, &ops, Kernel::Matvec);
                }
                for n in [16u32, 64, 512] {
                    report("tiled", n, &ops, Kernel::Tiled);
                }
            }
        }
    }
}

/// The grouped types (5-bit and K-quants, src/gpu/kquant.rs): random blocks (every quant,
/// scale and high bit random) at odd row counts and widths of 1, 3 and 6 super-blocks, through
/// every kernel (decode with both reductions, the few-token matvec, tiled), split across
/// bindings, the embedding lookup (exact), stacked sections with the residual add, gated
/// pairs and a folded RMSNorm, against the CPU's plain dequantise-then-dot product.
#[test]
fn grouped_types_match_dequantised_reference() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(0x6B51);
    let blocks = DecodeKernel::Blocks { prefetch: true };
    for ty in [GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::Q2_K, GgmlType::Q3_K] {
        let t0 = std::time::Instant::now();
        for (rows, cols) in [(1, 256), (37, 768), (133, 1536)] {
            let m = matrix(ty, rows, cols, &mut rng);
            let g = GpuMatrix::upload(&ctx, &m).unwrap();
            // The file's bytes, plus at most 16 bytes of padding per buffer and the uniform (and
            // Q3_K's 2 bytes per super-block).
            let extra = if ty == GgmlType::Q3_K { m.n_bytes() / 110 * 2 } else { 0 };
            assert!(g.gpu_bytes() as usize <= m.n_bytes() + extra + 32 + 16, "{ty:?}: {} GPU bytes for {} file bytes", g.gpu_bytes(), m.n_bytes());
            check_matrix(&ctx, &m, &g, &[1, 2, 5, 9, 17], &mut rng);
        }
        // Q5_0 and Q5_1 rows of 3 blocks: an odd number of groups per buffer.
        if matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1) {
            let m = matrix(ty, 7, 96, &mut rng);
            check_matrix(&ctx, &m, &GpuMatrix::upload(&ctx, &m).unwrap(), &[1, 3], &mut rng);
        }
        // Split by rows: 200 rows in chunks of 64 (room for 80 rows of both arrays).
        let m = matrix(ty, 200, 512, &mut rng);
        let row_bytes = GpuMatrix::upload(&ctx, &m).unwrap().gpu_bytes() as usize / 200;
        let g = GpuMatrix::upload_with_limit(&ctx, &m, (row_bytes * 80) as u64).unwrap();
        assert_eq!(g.n_chunks(), 4, "{ty:?}");
        check_matrix(&ctx, &m, &g, &[1, 3, 17], &mut rng);
        check_get_rows(&ctx, &m, &g, &[0, 199, 64, 63, 128, 127, 192, 5, 5], &mut rng);

        // Stacked q/k/v-like sections, stored and added.
        let heights = [64, 33, 1];
        let parts: Vec<Matrix> = heights.iter().map(|&r| matrix(ty, r, 512, &mut rng)).collect();
        let refs: Vec<&Matrix> = parts.iter().collect();
        let g = GpuMatrix::upload_stacked(&ctx, "qkv", &refs, false).unwrap().unwrap();
        let max_n = 17;
        let x = rng.vec(max_n * 512);
        let offsets = [5usize, 5 + max_n * 64 + 3, 5 + max_n * 97 + 100];
        let y_len = offsets[2] + max_n + 7;
        let y0 = rng.vec(y_len);
        let b = Bufs::new(&ctx, &x, y_len);
        let wants: Vec<(Vec<f32>, Vec<f32>)> = parts.iter().map(|m| reference(m, &x, max_n)).collect();
        let out = MatOut { epilogue: Epilogue::Add, sections: heights.iter().zip(offsets).map(|(&r, o)| (r as u32, o as u32)).collect() };
        let op = g.bind_matmul_variant(&ctx, &b.x, &b.y, &b.step, &default_mv_configs(&ctx), blocks, &out);
        for n in [1, 3, 17] {
            let got = run_over(&ctx, &op, &b, &y0, n, Kernel::Auto);
            for (s, (want, mag)) in wants.iter().enumerate() {
                for i in 0..n * heights[s] {
                    let o = offsets[s] + i;
                    let err = (got[o] - (y0[o] + want[i])).abs() / (mag[i] + y0[o].abs());
                    assert!(err < 1e-4, "{ty:?} stacked add n={n}: section {s} element {i}: got {}, want {}", got[o], y0[o] + want[i]);
                }
            }
        }

        // Gated pairs (SiLU) over a folded RMSNorm: one token folds it into the decode kernel.
        let (ff, cols) = (45, 768);
        let gate = matrix(ty, ff, cols, &mut rng);
        let up = matrix(ty, ff, cols, &mut rng);
        let gu = GpuMatrix::upload_stacked(&ctx, "gate_up", &[&gate, &up], true).unwrap().unwrap();
        let max_n = 3;
        let raw: Vec<f32> = rng.vec(max_n * cols).iter().enumerate().map(|(i, v)| 30.0 * v + (i % 7) as f32).collect();
        let weight: Vec<f32> = rng.vec(cols).iter().map(|v| 1.0 + v).collect();
        let mut xn = vec![0.0; max_n * cols];
        for t in 0..max_n {
            ember::cpu::ops::rms_norm(&raw[t * cols..(t + 1) * cols], &weight, 1e-5, &mut xn[t * cols..(t + 1) * cols]);
        }
        let (wg, mg) = reference(&gate, &xn, max_n);
        let (wu, mu) = reference(&up, &xn, max_n);
        let xb = ctx.upload("raw", bytemuck::cast_slice(&raw));
        let wb = ctx.upload("norm weight", bytemuck::cast_slice(&weight));
        let yb = Bufs::new(&ctx, &vec![f32::NAN; max_n * cols], max_n * ff);
        let norm = NormIn { x: &xb, weight: &wb, eps: 1e-5 };
        let op = gu.bind_matmul_normed(&ctx, &norm, &yb.x, &yb.y, &yb.step, &MatOut::with(Epilogue::GatedPairs { act: Activation::Silu }));
        assert!(op.folds(1));
        for n in [1, 3] {
            let got = run_over(&ctx, &op, &yb, &vec![f32::NAN; max_n * ff], n, Kernel::Auto);
            for i in 0..n * ff {
                let (gv, uv) = (wg[i] as f64, wu[i] as f64);
                let want = gv / (1.0 + (-gv).exp()) * uv;
                let bound = 2e-4 * (mg[i] as f64 * uv.abs() + (gv.abs() + mg[i] as f64) * mu[i] as f64) + 1e-6;
                assert!((got[i] as f64 - want).abs() <= bound, "{ty:?} normed gate_up n={n}: element {i}: got {}, want {want} (bound {bound:.2e})", got[i]);
            }
        }
        eprintln!("{ty:?}: {:.2} s", t0.elapsed().as_secs_f64());
    }
}
