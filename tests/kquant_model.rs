//! SmolLM2 in K-quant mixes against llama.cpp: greedy tokens, perplexity, memory.
//!
//! References (`tests/refs/smollm2-q{4,5}_k_m.*`) come from llama.cpp 0c1e570's CPU backend
//! with extra buffer types off (`--no-repack`), run on files its `llama-quantize
//! --allow-requantize` made from the default SmolLM2 Q4_1 model; see tests/refs/README.md.

mod common;

use ember::cpu::Precision;
use ember::engine::{generate, Sampler, SamplerConfig, Session};
use ember::gguf::GgmlType;
use ember::model::Model;
use ember::tokenizer::Tokenizer;
use std::path::Path;
use std::sync::Arc;

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

/// Greedy tokens for every reference prompt; a divergence is allowed only where llama.cpp
/// itself saw a near tie (top-2 margin under 0.05), and at most one prompt may diverge.
fn check_greedy(model_path: &Path, refs: &str) {
    let model = Arc::new(Model::load(model_path).expect("model loads"));
    let tok = Tokenizer::from_gguf(&model.file).expect("tokenizer loads");
    let mut full = 0;
    let mut report = Vec::new();
    let cases: Vec<serde_json::Value> = refs.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for case in &cases {
        let (prompt, want) = (ids(&case["prompt_ids"]), ids(&case["generated_ids"]));
        let margins: Vec<f64> = case["top1_top2_logit_margin"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let mut session = Session::new(model.clone(), 512);
        session.precision = Precision::Llama;
        let mut sampler = Sampler::new(SamplerConfig { temperature: 0.0, ..Default::default() });
        let got = generate(&mut session, &tok, &mut sampler, &prompt, want.len(), &[], |_| {}).unwrap().tokens;
        match got.iter().zip(&want).position(|(a, b)| a != b) {
            None if got.len() == want.len() => full += 1,
            None => panic!("{:?}: stopped after {} of {} tokens", case["prompt"], got.len(), want.len()),
            Some(step) => report.push((format!("{:?}: diverges at step {step} (llama.cpp's top-2 margin {})", case["prompt"], margins[step]), margins[step])),
        }
    }
    eprintln!("{}: {full} of {} prompts match all tokens; {report:?}", model_path.display(), cases.len());
    for (what, margin) in &report {
        assert!(*margin < 0.05, "{what}");
    }
    assert!(full + 1 >= cases.len(), "only {full} of {} prompts match: {report:?}", cases.len());
}

/// sha256 of llama-quantize's output (0c1e570, `--allow-requantize`, no imatrix) from the
/// default SmolLM2 Q4_1 file, which ember's must equal byte for byte.
const LLAMA_Q4_K_M_SHA256: &str = "dc0f3a02e821146247a0af6895adf9872124f368682cb110cb9ed09ff2a9f9f1";
const LLAMA_Q5_K_M_SHA256: &str = "8170c7ef444692b3b2fe63459c326def0358807ef9be6e3cb020efb86a71015e";

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The default model quantised by ember into a temporary file; None without the model.
fn quantised(ty: &str) -> Option<(tempdir::Dir, std::path::PathBuf, String)> {
    let src = common::default_model()?;
    let file = ember::gguf::GgufFile::open(&src).unwrap();
    let w = ember::model::quantize::quantize(&file, ty.parse().unwrap(), &|_, _| {}).unwrap();
    let bytes = w.to_bytes();
    let dir = tempdir::Dir::new(ty);
    let path = dir.0.join(format!("smollm2-{ty}.gguf"));
    std::fs::write(&path, &bytes).unwrap();
    Some((dir, path, sha256(&bytes)))
}

mod tempdir {
    /// A folder under the system's temporary folder, removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let p = std::env::temp_dir().join(format!("ember-kq-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn q4_k_m_is_llama_quantize_byte_for_byte_and_runs_like_llama_cpp() {
    let Some((_dir, path, hash)) = quantised("Q4_K_M") else { return };
    assert_eq!(hash, LLAMA_Q4_K_M_SHA256, "ember quantize Q4_K_M differs from llama-quantize's file");
    // Memory after load: the matrices stay in the file's types and bytes.
    let model = Model::load(&path).unwrap();
    assert!(model.conversions.is_empty(), "converted at load: {:?}", model.conversions);
    let held: u64 = model.matrix_bytes_by_type().iter().map(|(_, b)| b).sum();
    let in_file: u64 = model.file.tensors().iter().filter(|t| t.dims.iter().filter(|&&d| d > 1).count() == 2).map(|t| t.n_bytes).sum();
    assert!((held as f64 / in_file as f64 - 1.0).abs() < 0.05, "held {held} bytes of matrices, the file has {in_file}");
    let types: Vec<_> = model.matrix_bytes_by_type().iter().map(|(t, _)| *t).collect();
    for t in [GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K] {
        assert!(types.contains(&t), "{t} missing from {types:?}");
    }
    // Perplexity over llama-perplexity's first 6 windows of 256 (-c 256 -b 256 -nr): 20.1783.
    if let Some(refs) = common::refs_dir() {
        let tok = Tokenizer::from_gguf(&model.file).unwrap();
        let text = std::fs::read_to_string(refs.join("ppl-text.txt")).unwrap();
        let tokens = tok.encode(&text, true, false).unwrap();
        let mut session = Session::new(Arc::new(model), 256);
        let got = ember::engine::perplexity::score(&mut session, &tokens, 256, 6, |_, _| {}).unwrap();
        let want = 20.1783;
        assert!((got.ppl / want - 1.0).abs() < 0.005, "PPL after 6 windows {} vs llama.cpp {want}", got.ppl);
    }
    check_greedy(&path, include_str!("refs/smollm2-q4_k_m.greedy.jsonl"));
}

#[test]
fn q5_k_m_is_llama_quantize_byte_for_byte_and_runs_like_llama_cpp() {
    let Some((_dir, path, hash)) = quantised("Q5_K_M") else { return };
    assert_eq!(hash, LLAMA_Q5_K_M_SHA256, "ember quantize Q5_K_M differs from llama-quantize's file");
    check_greedy(&path, include_str!("refs/smollm2-q5_k_m.greedy.jsonl"));
}

#[test]
fn quantize_is_deterministic_across_thread_counts() {
    let Some(src) = common::default_model() else { return };
    let file = ember::gguf::GgufFile::open(&src).unwrap();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| sha256(&ember::model::quantize::quantize(&file, "Q6_K".parse().unwrap(), &|_, _| {}).unwrap().to_bytes()))
    };
    assert_eq!(run(1), run(3));
}

/// `ember synth --type TY` at the small shape the Q2_K/Q3_K references were made with (every
/// matrix, embedding and output included, in that type), with the default model's tokenizer.
fn synth_k(dir: &tempdir::Dir, ty: &str) -> Option<std::path::PathBuf> {
    let tok = common::default_model()?;
    let out = dir.0.join(format!("synth-{ty}.gguf"));
    let args = ["--type", ty, "--n-embd", "256", "--n-ff", "512", "--n-layer", "2", "--n-head", "4", "--n-head-kv", "2", "--seed", "7"];
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_ember")).arg("synth").args(args).arg("--tokenizer-from").arg(&tok).arg("-o").arg(&out).status().unwrap();
    assert!(status.success(), "ember synth {args:?}");
    Some(out)
}

/// A model whose every matrix is Q2_K (or Q3_K) stays in that type at load and gives
/// llama.cpp's greedy tokens (tests/refs/synth-q{2,3}_k.greedy.jsonl; sha256 of the files
/// there). Random weights leave small margins, so `check_greedy`'s near-tie allowance applies.
#[test]
fn q2_k_and_q3_k_synthetic_models_run_like_llama_cpp() {
    for (ty, gty, sha, refs) in [
        ("q2_k", GgmlType::Q2_K, "f389547e663680313d317106e272262c4ed9adaca32274147762f0ac4fd972a9", include_str!("refs/synth-q2_k.greedy.jsonl")),
        ("q3_k", GgmlType::Q3_K, "54404416fb21637ca135ac4225a5b8905b2b53f96ce1e9d8ac238b33540fa7be", include_str!("refs/synth-q3_k.greedy.jsonl")),
    ] {
        let dir = tempdir::Dir::new(ty);
        let Some(path) = synth_k(&dir, ty) else { return };
        assert_eq!(sha256(&std::fs::read(&path).unwrap()), sha, "ember synth --type {ty} wrote other bytes than the reference's file");
        let model = Model::load(&path).unwrap();
        assert!(model.conversions.is_empty(), "{ty}: converted at load: {:?}", model.conversions);
        assert_eq!(model.matrix_bytes_by_type().iter().map(|(t, _)| *t).collect::<Vec<_>>(), [gty], "{ty}");
        check_greedy(&path, &with_prompts(refs));
    }
}

/// The synthetic references carry no prompt text; `check_greedy` names cases by it.
fn with_prompts(refs: &str) -> String {
    refs.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["prompt"] = v["prompt_ids"].clone();
            v.to_string() + "\n"
        })
        .collect()
}

/// SmolLM2 quantised by llama.cpp's `llama-quantize --allow-requantize` (0c1e570) from the
/// default Q4_1 file, which `ember quantize` cannot write (no Q2_K/Q3_K quantiser): found in
/// the folder `EMBER_LLAMA_KQ_DIR` names, else skipped (CI included: it has no llama.cpp).
///   llama-quantize --allow-requantize Q4_1.gguf q2_k.gguf Q2_K             (ffn_down Q3_K)
///   llama-quantize --allow-requantize --pure Q4_1.gguf q2_k_pure.gguf Q2_K (ffn_down Q2_K)
///   llama-quantize --allow-requantize Q4_1.gguf q3_k_m.gguf Q3_K_M         (no Q3_K tensor:
///     every other matrix is 576 wide, not whole super-blocks, and falls back)
fn llama_kq_file(name: &str, sha: &str) -> Option<std::path::PathBuf> {
    let Some(dir) = std::env::var_os("EMBER_LLAMA_KQ_DIR") else {
        eprintln!("SKIPPED: {name}: set EMBER_LLAMA_KQ_DIR to a folder of llama-quantize's SmolLM2 Q2_K/Q3_K files (see this test's comment)");
        return None;
    };
    let path = std::path::PathBuf::from(dir).join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(sha256(&bytes), sha, "{}: not the file the references were made from", path.display());
    Some(path)
}

/// llama.cpp's Q2_K, pure Q2_K and Q3_K_M SmolLM2 files: held at their file size, greedy tokens
/// as llama.cpp's (tests/refs/smollm2-*.greedy.jsonl), perplexity within 0.5% of
/// llama-perplexity's after 6 windows of 256 (-c 256 -b 256 -nr).
#[test]
fn llama_quantize_q2_k_and_q3_k_m_files_run_like_llama_cpp() {
    for (name, sha, ppl, refs) in [
        ("q2_k.gguf", "1733ab14bc423774519aa464e0d74e190617e877c9d0aa07a698b500d1788895", PPL_Q2_K, include_str!("refs/smollm2-q2_k.greedy.jsonl")),
        ("q2_k_pure.gguf", "dc183fb648339d62e10b7f7a2cbafa8a502ff5e6c8c284b821c1d890426777a2", PPL_Q2_K_PURE, include_str!("refs/smollm2-q2_k-pure.greedy.jsonl")),
        ("q3_k_m.gguf", "01045a8fee6c962e4f7b0f80dccf937503738f61f987c305378fd3f527eac9d4", PPL_Q3_K_M, include_str!("refs/smollm2-q3_k_m.greedy.jsonl")),
    ] {
        let Some(path) = llama_kq_file(name, sha) else { return };
        let model = Model::load(&path).unwrap();
        assert!(model.conversions.is_empty(), "{name}: converted at load: {:?}", model.conversions);
        let held: u64 = model.matrix_bytes_by_type().iter().map(|(_, b)| b).sum();
        let in_file: u64 = model.file.tensors().iter().filter(|t| t.dims.iter().filter(|&&d| d > 1).count() == 2).map(|t| t.n_bytes).sum();
        assert_eq!(held, in_file, "{name}: held {held} bytes of matrices, the file has {in_file}");
        if let Some(dir) = common::refs_dir() {
            let tok = Tokenizer::from_gguf(&model.file).unwrap();
            let tokens = tok.encode(&std::fs::read_to_string(dir.join("ppl-text.txt")).unwrap(), true, false).unwrap();
            let mut session = Session::new(Arc::new(model), 256);
            let got = ember::engine::perplexity::score(&mut session, &tokens, 256, 6, |_, _| {}).unwrap();
            // The pure Q2_K file is a badly damaged model (PPL ~100) whose every other matrix,
            // output included, is Q4_0: llama.cpp multiplies those in prompt batches with
            // llamafile's sgemm, whose rounding ember does not follow, and at this perplexity
            // that moves the value by ~0.9% (100.90 vs 101.79; the Q2_K mix: within 0.5%), while
            // its decode gives llama.cpp's greedy tokens exactly.
            eprintln!("{name}: ember's PPL after 6 windows {:.4}, llama.cpp's {ppl}", got.ppl);
            let tol = if name == "q2_k_pure.gguf" { 0.015 } else { 0.005 };
            assert!((got.ppl / ppl - 1.0).abs() < tol, "{name}: PPL after 6 windows {} vs llama.cpp {ppl}", got.ppl);
        }
        check_greedy(&path, refs);
    }
}

/// llama-perplexity's running value after 6 windows of 256 on ../shared/refs/ppl-text.txt
/// (-c 256 -b 256 -t 2 -nr; tests/refs/smollm2-q2_k.ppl.txt holds all 38).
const PPL_Q2_K: f64 = 25.9046;
const PPL_Q2_K_PURE: f64 = 101.7933;
const PPL_Q3_K_M: f64 = 22.9690;
