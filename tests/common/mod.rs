//! Shared helpers for integration tests: where the real models and llama.cpp references live.
//!
//! Real-model tests find their files through environment variables or the default places
//! (models/ for the fetched default model, ../shared for the ReLU model and references). When a
//! file is absent they say so plainly and skip, except under CI (`CI` set), where absence fails.
//! Each skip is also noted in the file `EMBER_SKIP_LOG` names, when set, so that `.ci/run`'s
//! summary counts skipped tests as skipped rather than passed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn find(env_var: &str, default: PathBuf, what: &str) -> Option<PathBuf> {
    let path = std::env::var_os(env_var).map(PathBuf::from).unwrap_or(default);
    if path.exists() {
        return Some(path);
    }
    let msg = format!("{what} not found at {} (set {env_var} to its path)", path.display());
    if std::env::var_os("CI").is_some() {
        panic!("{msg}; CI must have it");
    }
    eprintln!("SKIPPED: {msg}");
    record_skip();
    None
}

/// SmolLM2-135M-Instruct Q4_1, fetched by `ember fetch` (or `cargo run --release -- fetch`).
pub fn default_model() -> Option<PathBuf> {
    find("EMBER_MODEL", repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"), "default model (run `cargo run --release -- fetch`)")
}

/// The ReLU-fied SmolLM2-135M from ../shared/models.
pub fn relu_model() -> Option<PathBuf> {
    find("EMBER_RELU_MODEL", repo_root().join("../shared/models/smollm2-135m-relu.Q8_0.gguf"), "ReLU model")
}

/// llama.cpp's reference outputs (../shared/refs).
pub fn refs_dir() -> Option<PathBuf> {
    find("EMBER_REFS", repo_root().join("../shared/refs"), "llama.cpp reference outputs")
}

/// Reads a JSON-lines file.
pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("valid JSON line"))
        .collect()
}

/// A small deterministic PRNG (splitmix64) so tests need no rand crate.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1), never exactly zero.
    pub fn signed(&mut self) -> f32 {
        let v = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
        if v == 0.0 { 0.5 } else { v }
    }

    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.signed()).collect()
    }
}

/// A GPU context for kernel tests: any Vulkan, Metal or DX12 adapter, software ones included
/// (lavapipe in CI). Without one the test says so and skips, except under CI, where it fails.
/// An OpenGL adapter (what wgpu falls back to without a Vulkan driver, llvmpipe on Linux) counts
/// as none: the GPU tests would run for hours on it. The adapter is probed once per test binary,
/// which reports a missing driver in one line on stderr.
pub fn gpu() -> Option<ember::gpu::GpuContext> {
    static UNUSABLE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if let Some(Some(why)) = UNUSABLE.get() {
        return skip_gpu(why);
    }
    // Mesa complains on stderr without a runtime dir (headless CI); the binary sets one too.
    // One directory for every test binary (one per process left ~140 empty ones in /tmp).
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = std::env::temp_dir().join("ember-tests-xdg");
        let _ = std::fs::create_dir_all(&dir);
        std::env::set_var("XDG_RUNTIME_DIR", dir);
    }
    let ctx = ember::gpu::GpuContext::new(&ember::gpu::DeviceChoice::BestOrSoftware);
    let why = match &ctx {
        Ok(c) if c.adapter.is_gl() => Some(format!("no Vulkan, Metal or DX12 driver, only the OpenGL adapter {:?} (install mesa-vulkan-drivers for lavapipe)", c.adapter.name)),
        Ok(_) => None,
        Err(e) => Some(format!("no GPU adapter: {e}")),
    };
    if UNUSABLE.set(why.clone()).is_ok() {
        if let Some(w) = &why {
            // Past the test harness's capture: once per binary, whatever the test's outcome.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED: GPU tests of this binary: {w}");
        }
    }
    match why {
        None => ctx.ok(),
        Some(w) => skip_gpu(&w),
    }
}

fn skip_gpu(why: &str) -> Option<ember::gpu::GpuContext> {
    if std::env::var_os("CI").is_some() {
        panic!("{why}; CI must have a GPU driver");
    }
    record_skip();
    None
}

/// Notes a runtime skip for the test runner's summary (`.ci/run` sets `EMBER_SKIP_LOG` and counts
/// skipped tests as skipped, not passed): one line per skipping test, `binary test`.
fn record_skip() {
    let Some(log) = std::env::var_os("EMBER_SKIP_LOG") else { return };
    let exe = std::env::current_exe().ok().and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned())).unwrap_or_default();
    let test = std::thread::current().name().unwrap_or("?").to_string();
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
        use std::io::Write;
        let _ = writeln!(f, "{exe} {test}");
    }
}

/// The prompt ids of ../shared/refs' greedy generations (empty when the references are absent).
pub fn ref_prompts() -> Vec<Vec<u32>> {
    let Some(refs) = refs_dir() else { return Vec::new() };
    read_jsonl(&refs.join("greedy-generations.jsonl"))
        .iter()
        .map(|case| case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect())
        .collect()
}

/// Greedy continuation of `prompt` from a fresh sequence, `n` tokens, one call per token.
pub fn greedy(s: &mut dyn ember::engine::Forward, prompt: &[u32], n: usize) -> Vec<u32> {
    s.reset();
    let mut out = Vec::new();
    let mut t = s.forward_argmax(prompt).unwrap();
    for _ in 0..n {
        out.push(t);
        t = s.forward_argmax(&[t]).unwrap();
    }
    out
}

/// A matrix of `rows` x `cols` random values (`Rng::vec`) stored as `ty` (F32, F16, Q8_0,
/// Q4_0 or Q4_1), named after its type and shape.
pub fn matrix(ty: ember::gguf::GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> ember::model::Matrix {
    use ember::gguf::GgmlType;
    use ember::model::Matrix;
    use ember::quant::{quantize_q4_0, quantize_q4_1, quantize_q8_0};
    let v = rng.vec(rows * cols);
    let name = format!("{ty:?} {rows}x{cols}");
    match ty {
        GgmlType::F32 | GgmlType::F16 => Matrix::from_f32(&name, rows, cols, &v, ty),
        GgmlType::Q8_0 => Matrix::from_raw(&name, rows, cols, ty, bytemuck::cast_slice(&quantize_q8_0(&v))),
        GgmlType::Q4_0 => Matrix::from_raw(&name, rows, cols, ty, bytemuck::cast_slice(&quantize_q4_0(&v))),
        GgmlType::Q4_1 => Matrix::from_raw(&name, rows, cols, ty, bytemuck::cast_slice(&quantize_q4_1(&v))),
        GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K | GgmlType::Q2_K | GgmlType::Q3_K => Matrix::from_raw(&name, rows, cols, ty, &random_blocks(ty, rows * cols, rng)),
        _ => panic!("random matrices are F32, F16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K or Q6_K, not {ty}"),
    }
}

/// `n` elements of random blocks of `ty` (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, Q2_K, Q3_K): every quant, scale
/// and high bit random, the f16 scales random in (-1/64, 1/64) (positive for the K-quants'
/// super-block scales, as llama.cpp writes them) so that products stay finite.
pub fn random_blocks(ty: ember::gguf::GgmlType, n: usize, rng: &mut Rng) -> Vec<u8> {
    use ember::gguf::GgmlType;
    let bb = ty.block_bytes();
    let mut bytes: Vec<u8> = (0..n / ty.block_len() * bb).map(|_| rng.next_u64() as u8).collect();
    for b in bytes.chunks_exact_mut(bb) {
        let mut half = |at: usize, positive: bool, rng: &mut Rng| {
            let v = rng.signed() / 64.0;
            b[at..at + 2].copy_from_slice(&half::f16::from_f32(if positive { v.abs() } else { v }).to_le_bytes());
        };
        match ty {
            GgmlType::Q5_0 => half(0, false, rng),
            GgmlType::Q5_1 => {
                half(0, false, rng);
                half(2, false, rng);
            }
            GgmlType::Q4_K | GgmlType::Q5_K => {
                half(0, true, rng);
                half(2, true, rng);
            }
            GgmlType::Q6_K => half(208, true, rng),
            GgmlType::Q2_K => {
                half(80, true, rng);
                half(82, true, rng);
            }
            GgmlType::Q3_K => half(108, true, rng),
            _ => panic!("random_blocks makes Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, Q2_K or Q3_K, not {ty}"),
        }
    }
    bytes
}

/// [`matrix`], named `w`, and its dequantised values, row-major.
pub fn random_matrix(rng: &mut Rng, rows: usize, cols: usize, ty: ember::gguf::GgmlType) -> (ember::model::Matrix, Vec<f32>) {
    let mut m = matrix(ty, rows, cols, rng);
    m.name = "w".into();
    let deq: Vec<f32> = (0..rows).flat_map(|r| m.row_f32(r)).collect();
    (m, deq)
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt();
    num / b.iter().map(|y| y * y).sum::<f32>().sqrt()
}

/// A Python interpreter that imports the official `openai` client (`EMBER_PYTHON`, else
/// `python3`; `.ci/run` installs the client). Without one the test says so and skips, except
/// under CI, where it fails.
pub fn python_with_openai() -> Option<PathBuf> {
    let python = std::env::var_os("EMBER_PYTHON").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("python3"));
    let ok = std::process::Command::new(&python).args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    let msg = format!("{} cannot import the openai client (pip install openai, or set EMBER_PYTHON to an interpreter that has it)", python.display());
    if std::env::var_os("CI").is_some() {
        panic!("{msg}; CI must have it (.ci/run installs it)");
    }
    eprintln!("SKIPPED: {msg}");
    record_skip();
    None
}
