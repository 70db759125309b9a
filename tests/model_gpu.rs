//! The whole forward pass on the GPU (lavapipe in CI) against the CPU. The GPU multiplies f32
//! activations with dequantised weights, so its reference is the CPU at `Precision::F32`.

mod common;

use ember::cpu::Precision;
use ember::engine::{Forward, GpuSession, GpuWeights, Logits, Session};
use ember::model::Model;
use std::sync::Arc;

fn sessions(path: &std::path::Path, n_ctx: usize) -> Option<(Session, GpuSession)> {
    let ctx = Arc::new(common::gpu()?);
    let model = Arc::new(Model::load(path).unwrap());
    let weights = Arc::new(GpuWeights::upload(&ctx, &model, false).unwrap());
    let gpu = GpuSession::new(model.clone(), ctx, weights, n_ctx).unwrap();
    let mut cpu = Session::new(model, n_ctx);
    cpu.precision = Precision::F32;
    Some((cpu, gpu))
}


#[test]
fn gpu_greedy_tokens_and_logits_match_the_cpu() {
    let (Some(path), Some(refs)) = (common::default_model(), common::refs_dir()) else { return };
    let Some((mut cpu, mut gpu)) = sessions(&path, 128) else { return };
    const STEPS: usize = 12;
    for case in common::read_jsonl(&refs.join("greedy-generations.jsonl")) {
        let prompt: Vec<u32> = case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        cpu.reset();
        gpu.reset();
        let (mut c, mut g) = (cpu.forward(&prompt, Logits::Last).unwrap(), gpu.forward(&prompt, Logits::Last).unwrap());
        for step in 0..STEPS {
            let err = common::rel_err(&g, &c);
            // Measured on lavapipe: 1.1e-3 at the first steps, at most 2.8e-3 after 12 (the
            // differences build up through the KV cache); `--gpu-precision`'s help says 0.3%.
            assert!(err < 5e-3, "{:?} step {step}: relative logit error {err}", case["prompt"]);
            let (tc, tg) = (ember::cpu::ops::argmax(&c), ember::cpu::ops::argmax(&g));
            if tc.0 != tg.0 {
                // Only a near tie may go either way.
                let margin = (c[tc.0] - c[tg.0]).abs();
                assert!(margin < 0.05, "{:?} step {step}: CPU {} vs GPU {}, CPU margin {margin}", case["prompt"], tc.0, tg.0);
                break;
            }
            let t = tc.0 as u32;
            c = cpu.forward(&[t], Logits::Last).unwrap();
            g = gpu.forward(&[t], Logits::Last).unwrap();
        }
    }
}

/// A prompt of over 1000 tokens (the refs prompts one after another, repeated) in one batch:
/// the tiled products over many token tiles and the prefill attention over many key tiles give
/// the CPU's logits and token; the greedy tokens after it (decode at positions past 1000) are
/// the CPU's too, or a near tie.
#[test]
fn gpu_long_prompt_greedy_matches_the_cpu() {
    let (Some(path), Some(refs)) = (common::default_model(), common::refs_dir()) else { return };
    let mut prompt: Vec<u32> = Vec::new();
    let cases = common::read_jsonl(&refs.join("greedy-generations.jsonl"));
    while prompt.len() <= 1030 {
        for case in &cases {
            prompt.extend(case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32));
        }
    }
    let Some((mut cpu, mut gpu)) = sessions(&path, prompt.len() + 8) else { return };
    let (mut c, mut g) = (cpu.forward(&prompt, Logits::Last).unwrap(), gpu.forward(&prompt, Logits::Last).unwrap());
    let err = common::rel_err(&g, &c);
    assert!(err < 5e-3, "{}-token prompt: relative logit error {err}", prompt.len());
    for step in 0..4 {
        // Decode steps at positions past 1000 were measured at a 3.1e-2 relative logit error on
        // lavapipe (the prompt's own logits: under 5e-3), so after the prompt only the tokens
        // are held to the CPU's (issue 14's decode work).
        eprintln!("{}-token prompt, step {step}: relative logit error {:.2e}", prompt.len(), common::rel_err(&g, &c));
        let (tc, tg) = (ember::cpu::ops::argmax(&c), ember::cpu::ops::argmax(&g));
        if tc.0 != tg.0 {
            let margin = (c[tc.0] - c[tg.0]).abs();
            assert!(margin < 0.05, "{}-token prompt, step {step}: CPU {} vs GPU {}, CPU margin {margin}", prompt.len(), tc.0, tg.0);
            break;
        }
        c = cpu.forward(&[tc.0 as u32], Logits::Last).unwrap();
        g = gpu.forward(&[tc.0 as u32], Logits::Last).unwrap();
    }
}

#[test]
fn gpu_argmax_batched_prefill_and_all_logits_agree() {
    let Some(path) = common::default_model() else { return };
    let Some((mut cpu, mut gpu)) = sessions(&path, 64) else { return };
    let tokens: Vec<u32> = (0..37).map(|i| (i * 997 + 13) % 49152).collect();
    let all_g = gpu.forward(&tokens, Logits::All).unwrap();
    let all_c = cpu.forward(&tokens, Logits::All).unwrap();
    let err = common::rel_err(&all_g, &all_c);
    assert!(err < 1e-3, "relative logit error {err} over every position");
    // The GPU's own argmax equals the argmax of its logits.
    gpu.reset();
    let id = gpu.forward_argmax(&tokens).unwrap();
    let last = &all_g[36 * 49152..];
    assert_eq!(id as usize, ember::cpu::ops::argmax(last).0);
}

#[test]
fn gpu_queued_greedy_decoding_matches_token_by_token_and_stops_cleanly() {
    let Some(path) = common::default_model() else { return };
    let Some((_, mut gpu)) = sessions(&path, 64) else { return };
    let prompt: Vec<u32> = (0..9).map(|i| (i * 4099 + 77) % 49152).collect();
    let first = gpu.forward_argmax(&prompt).unwrap();
    let mut expect = Vec::new();
    let mut t = first;
    for _ in 0..10 {
        t = gpu.forward_argmax(&[t]).unwrap();
        expect.push(t);
    }
    let end = gpu.n_past();

    // The whole run, each token fed back on the GPU.
    gpu.reset();
    assert_eq!(gpu.forward_argmax(&prompt).unwrap(), first);
    let mut got = Vec::new();
    let n = gpu
        .decode_greedy(first, 10, &mut |t| {
            got.push(t);
            true
        })
        .unwrap();
    assert_eq!((n, &got, gpu.n_past()), (10, &expect, end));

    // Stopped after four: the token queued behind the fourth is forgotten, and decoding goes on
    // from the fourth exactly as if it had never been queued.
    gpu.reset();
    gpu.forward_argmax(&prompt).unwrap();
    let mut got = Vec::new();
    let n = gpu
        .decode_greedy(first, 10, &mut |t| {
            got.push(t);
            got.len() < 4
        })
        .unwrap();
    assert_eq!((n, &got[..], gpu.n_past()), (4, &expect[..4], prompt.len() + 4));
    let mut rest = Vec::new();
    gpu.decode_greedy(got[3], 6, &mut |t| {
        rest.push(t);
        true
    })
    .unwrap();
    assert_eq!(rest, expect[4..]);
    // More predictions than the context holds: refused up front.
    assert!(gpu.decode_greedy(rest[5], 64, &mut |_| true).is_err());
}

#[test]
fn gpu_queued_sampling_matches_host_sampling_of_the_same_logits() {
    use ember::engine::sampler::SampleRule;
    let Some(path) = common::default_model() else { return };
    let Some((_, mut gpu)) = sessions(&path, 64) else { return };
    let prompt: Vec<u32> = (0..9).map(|i| (i * 4099 + 77) % 49152).collect();
    // A high temperature, so that the draws really leave the argmax.
    let rule = SampleRule::new(&ember::engine::SamplerConfig { temperature: 1.5, top_k: 40, top_p: 0.95, min_p: 0.0, seed: 77, ..Default::default() });
    let logits = gpu.forward(&prompt, Logits::Last).unwrap();
    let first = rule.pick(&logits, 0);
    // On the host: each token's logits read back and drawn from with draws 1, 2, ...
    let (mut expect, mut greedy) = (Vec::new(), Vec::new());
    let mut t = first;
    for i in 0..10 {
        let logits = gpu.forward(&[t], Logits::Last).unwrap();
        greedy.push(ember::cpu::ops::argmax(&logits).0 as u32);
        t = rule.pick(&logits, 1 + i);
        expect.push(t);
    }
    assert_ne!(expect, greedy, "the draws never left the argmax: the test checks nothing");
    let end = gpu.n_past();
    // Drawn on the GPU, each token fed back there.
    gpu.reset();
    gpu.forward(&prompt, Logits::Last).unwrap();
    let mut got = Vec::new();
    let n = gpu
        .decode_sampled(first, 10, &rule, 1, &mut |t| {
            got.push(t);
            true
        })
        .unwrap();
    assert_eq!((n, &got, gpu.n_past()), (10, &expect, end));
    // Stopped after four, then resumed from the fourth with the next counter: the same run.
    gpu.reset();
    gpu.forward(&prompt, Logits::Last).unwrap();
    let mut got = Vec::new();
    gpu.decode_sampled(first, 10, &rule, 1, &mut |t| {
        got.push(t);
        got.len() < 4
    })
    .unwrap();
    assert_eq!((&got[..], gpu.n_past()), (&expect[..4], prompt.len() + 4));
    let mut rest = Vec::new();
    gpu.decode_sampled(got[3], 6, &rule, 5, &mut |t| {
        rest.push(t);
        true
    })
    .unwrap();
    assert_eq!(rest, expect[4..]);
}

/// `ember synth --type ty` with `layers` small layers into `dir`, the tokenizer from `tok`.
fn synth(dir: &std::path::Path, ty: &str, layers: &str, tok: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join(format!("{ty}.gguf"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["synth", "--type", ty, "--n-embd", "256", "--n-ff", "512", "--n-layer", layers, "--n-head", "4", "--n-head-kv", "2", "--seed", "7", "-o"])
        .arg(&path)
        .arg("--tokenizer-from")
        .arg(tok)
        .output()
        .unwrap();
    assert!(out.status.success(), "synth {ty}: {}", String::from_utf8_lossy(&out.stderr));
    path
}

/// A synthetic Q4_K_M model (Q4_K and Q6_K) with its decode products on the integer kernel
/// (`--gpu-precision q8`'s selection, the RMSNorm, RoPE and gate/up epilogues included): with
/// 22-bit activations (`kq:8:4:0`) the logits of a prompt and greedy steps stay within the f32
/// GPU's bound of the CPU's f32 products (measured on lavapipe: 9.1e-4); with the default 8-bit
/// ones (llama.cpp's numerics) within 3e-2 (measured: 1.6e-2; the CPU's llama precision, 8-bit
/// and Q8_K activations, is 3.0e-2 from f32 on this model).
#[test]
fn q4_k_m_integer_decode_matches_the_cpu() {
    let Some(tok) = common::default_model() else { return };
    if common::gpu().is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ember-kq4k-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = synth(&dir, "q4_k_m", "4", &tok);
    let model = Arc::new(Model::load_keeping(&path, &ember::gpu::matrix::GPU_TYPES).unwrap());
    let types: Vec<_> = model.layers.iter().flat_map(|l| [l.wv.ty, l.ffn_down.ty, l.ffn_gate.ty]).chain([model.output.ty]).collect();
    assert!(types.contains(&ember::gguf::GgmlType::Q4_K) && types.contains(&ember::gguf::GgmlType::Q6_K), "{types:?}");
    let limbs3 = ember::gpu::matrix::parse_decode("kq:8:4:0").unwrap();
    for (label, overrides, bound) in [("22-bit", vec![("q4_k".to_string(), limbs3), ("q6_k".to_string(), limbs3)], 2e-3), ("8-bit", vec![], 3e-2)] {
        let tuning = ember::gpu::GpuTuning { integer_decode: true, decode_overrides: overrides, ..Default::default() };
        let ctx = Arc::new(common::gpu().unwrap().with_tuning(tuning).unwrap());
        for ty in [ember::gguf::GgmlType::Q4_K, ember::gguf::GgmlType::Q6_K] {
            assert!(matches!(ember::gpu::matrix::decode_config(&ctx, ty).0, ember::gpu::matrix::DecodeKernel::Quantized { .. }));
        }
        let weights = Arc::new(GpuWeights::upload(&ctx, &model, false).unwrap());
        let mut gpu = GpuSession::new(model.clone(), ctx, weights, 64).unwrap();
        let mut cpu = Session::new(model.clone(), 64);
        cpu.precision = Precision::F32;
        // llama.cpp's CPU numerics (8-bit activations, Q8_K for the K-quants) for scale.
        let mut llama = Session::new(model.clone(), 64);
        let prompt: Vec<u32> = (0..11).map(|i| (i * 4099 + 17) % 49152).collect();
        let (mut c, mut g) = (cpu.forward(&prompt, Logits::Last).unwrap(), gpu.forward(&prompt, Logits::Last).unwrap());
        let mut l = llama.forward(&prompt, Logits::Last).unwrap();
        let (mut worst, mut worst_llama) = (0.0f32, 0.0f32);
        for step in 0..4 {
            let err = common::rel_err(&g, &c);
            worst = worst.max(err);
            worst_llama = worst_llama.max(common::rel_err(&l, &c));
            assert!(err < bound, "{label} step {step}: relative logit error {err}");
            let t = ember::cpu::ops::argmax(&c).0 as u32;
            c = cpu.forward(&[t], Logits::Last).unwrap();
            g = gpu.forward(&[t], Logits::Last).unwrap();
            l = llama.forward(&[t], Logits::Last).unwrap();
        }
        eprintln!("q4_k_m integer decode, {label} activations: worst relative logit error {worst:.2e} (the CPU's llama precision: {worst_llama:.2e})");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Synthetic models in the grouped types (`ember synth --type q4_k_m`: llama.cpp's Q4_K_M mix
/// of Q4_K and Q6_K; and all-Q5_K, Q5_0, Q5_1), loaded keeping their types for a GPU-only
/// session: the GPU holds the file's tensor bytes (no F16 conversion), and its logits over a
/// prompt and a few greedy steps match the CPU's f32 products over the dequantised weights.
#[test]
fn grouped_type_models_stay_native_and_match_the_cpu() {
    let Some(tok) = common::default_model() else { return };
    let Some(ctx) = common::gpu().map(Arc::new) else { return };
    let dir = std::env::temp_dir().join(format!("ember-kq-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (ty, layers) in [("q4_k_m", "8"), ("q5_k", "2"), ("q5_0", "2"), ("q5_1", "2")] {
        let path = synth(&dir, ty, layers, &tok);
        let model = Arc::new(Model::load_keeping(&path, &ember::gpu::matrix::GPU_TYPES).unwrap());
        assert!(model.conversions.is_empty(), "{ty}: converted {:?}", model.conversions);
        let types: std::collections::BTreeSet<String> = model.layers.iter().flat_map(|l| [l.wv.ty, l.ffn_down.ty, l.ffn_gate.ty]).chain([model.output.ty]).map(|t| t.name().to_string()).collect();
        eprintln!("{ty}: matrix types {types:?}");
        // The context's reused upload staging buffer (made on the first upload) is not weights.
        let (before, margin) = (ctx.allocated_bytes(), ctx.upload_margin());
        let weights = Arc::new(GpuWeights::upload(&ctx, &model, false).unwrap());
        let on_gpu = ctx.allocated_bytes() - before - (margin - ctx.upload_margin());
        let file = model.weight_bytes();
        // The layouts add at most 16 bytes per buffer, plus the small per-matrix uniforms.
        assert!((on_gpu as f64 - file as f64).abs() < 0.01 * file as f64, "{ty}: {on_gpu} bytes on the GPU for {file} bytes of weights");
        let mut gpu = GpuSession::new(model.clone(), ctx.clone(), weights, 64).unwrap();
        let mut cpu = Session::new(model, 64);
        cpu.precision = Precision::F32;
        let prompt: Vec<u32> = (0..11).map(|i| (i * 4099 + 17) % 49152).collect();
        let (mut c, mut g) = (cpu.forward(&prompt, Logits::Last).unwrap(), gpu.forward(&prompt, Logits::Last).unwrap());
        for step in 0..4 {
            let err = common::rel_err(&g, &c);
            assert!(err < 2e-3, "{ty} step {step}: relative logit error {err}");
            let t = ember::cpu::ops::argmax(&c).0 as u32;
            c = cpu.forward(&[t], Logits::Last).unwrap();
            g = gpu.forward(&[t], Logits::Last).unwrap();
        }
        eprintln!("{ty}: {on_gpu} GPU bytes for {file} file bytes; logits within 2e-3");
    }
    std::fs::remove_dir_all(&dir).ok();
}
