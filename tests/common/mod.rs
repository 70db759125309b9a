//! Shared helpers for integration tests: where the real models and llama.cpp references live.
//!
//! Real-model tests find their files through environment variables or the default places
//! (models/ for the fetched default model, ../shared for the ReLU model and references). When a
//! file is absent they say so plainly and skip, except under CI (`CI` set), where absence fails.
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

/// A GPU context for kernel tests: any adapter, software ones included (lavapipe in CI). When
/// none exists the test says so and skips, except under CI, where it fails.
pub fn gpu() -> Option<ember::gpu::GpuContext> {
    // Mesa complains on stderr without a runtime dir (headless CI); the binary sets one too.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = std::env::temp_dir().join(format!("ember-xdg-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        std::env::set_var("XDG_RUNTIME_DIR", dir);
    }
    match ember::gpu::GpuContext::new(&ember::gpu::DeviceChoice::BestOrSoftware) {
        Ok(ctx) => Some(ctx),
        Err(e) if std::env::var_os("CI").is_some() => panic!("no GPU adapter in CI: {e}"),
        Err(e) => {
            eprintln!("SKIPPED: no GPU adapter: {e}");
            None
        }
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

/// ‖a − b‖ / ‖b‖.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt();
    num / b.iter().map(|y| y * y).sum::<f32>().sqrt()
}
