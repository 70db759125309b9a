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
