//! Batched hybrid prefill (lavapipe in CI) on the real ReLU model: a prompt run in batches gives
//! the logits of the token-by-token hybrid and of the dense CPU path, within the hybrid tests'
//! tolerance, with split and all-hot layers, batches of several sizes (the last one a single
//! token), the greedy text of dense, the same bits run after run, and the budget kept with the
//! batch's buffers counted.

mod common;

use ember::cpu::Precision;
use ember::engine::{AttentionPlace, FfnMode, Forward, HybridPlan, HybridSession, Logits, Session, SparseFfn};
use ember::model::Model;
use ember::sparse::placement::AttnSite;
use ember::sparse::profile::Profiler;
use std::sync::Arc;

fn profile_counts(model: &Arc<Model>, prompts: &[Vec<u32>]) -> (Vec<Vec<u32>>, u64) {
    let prof = Profiler::for_model(model).shared();
    let mut s = Session::new(model.clone(), 128);
    s.observer = Some(Box::new(prof.clone()));
    for p in prompts {
        s.reset();
        s.forward(p, Logits::All).unwrap();
    }
    let p = &prof.lock().unwrap().profile;
    (p.counts.clone(), p.n_tokens())
}

#[test]
fn batched_prefill_matches_token_by_token_and_dense() {
    let Some(path) = common::relu_model() else { return };
    let Some(ctx0) = common::gpu() else { return };
    drop(ctx0);
    let model = Arc::new(Model::load(&path).unwrap());
    let hp = model.hp.clone();
    let prompts = common::ref_prompts();
    assert!(!prompts.is_empty());
    let (counts, counts_tokens) = profile_counts(&model, &prompts);
    let relu = Arc::new(SparseFfn::new(&model, FfnMode::Relu, None, Vec::new(), Precision::F32, false).unwrap());
    let mut dense = Session::new(model.clone(), 96);
    dense.precision = Precision::F32;
    const N: usize = 4;
    // A longer prompt too: several batches.
    let mut long: Vec<u32> = prompts.iter().flatten().copied().collect();
    long.truncate(41);
    let plan = |budget: Option<u64>, hot: Option<Vec<Vec<u32>>>, attention: AttentionPlace| HybridPlan { ffn: relu.clone(), budget, counts: counts.clone(), counts_tokens, cpu_precision: Precision::F32, simulate: None, sim_predictors: None, hot, note: None, attention, reserve: 0 };
    // Mixed layers: the even ones wholly hot (no CPU part, no synchronisation), the odd ones
    // with every third neuron hot.
    let mixed: Vec<Vec<u32>> = (0..hp.n_layer).map(|l| (0..hp.n_ff as u32).filter(|i| l % 2 == 0 || i % 3 == 0).collect()).collect();
    let mut saw_mixed = false;
    // Host attention in every third layer (from layer 1: some split, some wholly hot).
    // (Of those, layers 4, 10, ... run their q/k/v product on the GPU in decode.)
    let sites: Vec<AttnSite> = (0..hp.n_layer).map(|l| match l % 6 {
        1 => AttnSite::Host,
        4 => AttnSite::Qkv,
        _ => AttnSite::Gpu,
    }).collect();
    // A placed budget with few hot neurons in one batch per prompt; the mixed placement with
    // host-attention layers in batches of 10 (the 31-token prompt: 10, 10, 10 and a last one
    // of a single token).
    let cases = [(100u64, None, AttentionPlace::AllGpu, 64usize), (240, Some(mixed), AttentionPlace::Given(sites), 10)];
    for (budget_mib, hot, attention, batch) in cases {
        let budget = Some(budget_mib << 20);
        let ctx = Arc::new(common::gpu().unwrap());
        let mut s = HybridSession::with_prefill(model.clone(), ctx.clone(), 96, plan(budget, hot.clone(), attention.clone()), batch, false).unwrap();
        let placement = s.placement().clone();
        let all_hot = placement.hot.iter().filter(|h| h.len() == hp.n_ff).count();
        saw_mixed |= all_hot > 0 && all_hot < hp.n_layer;
        let ctx_tok = Arc::new(common::gpu().unwrap());
        let mut tok = HybridSession::with_prefill(model.clone(), ctx_tok, 96, plan(budget, hot, attention), 1, false).unwrap();
        assert_eq!(tok.placement().hot, placement.hot, "the same placement with and without batches");
        for p in prompts.iter().take(3).chain([&long]) {
            s.reset();
            let a = s.forward(p, Logits::Last).unwrap();
            tok.reset();
            let b = tok.forward(p, Logits::Last).unwrap();
            dense.reset();
            let d = dense.forward(p, Logits::Last).unwrap();
            let (eb, ed, etd) = (common::rel_err(&a, &b), common::rel_err(&a, &d), common::rel_err(&b, &d));
            eprintln!("budget {budget_mib} batch {batch}, {} tokens: relative logit error {eb:e} against token by token, {ed:e} against dense (token by token against dense {etd:e})", p.len());
            assert!(eb < 1e-3 && ed < 3e-3, "budget {budget_mib} batch {batch}, {} tokens: relative logit error {eb} against token by token, {ed} against dense (token by token against dense {etd})", p.len());
            // The same bits run after run.
            s.reset();
            let again = s.forward(p, Logits::Last).unwrap();
            assert!(again.iter().zip(&a).all(|(x, y)| x.to_bits() == y.to_bits()), "budget {budget_mib} batch {batch}: not deterministic");
        }
        let t = s.prefill_timing(false);
        assert!(t.batches > 0 && t.tokens > 0, "no batch ran: {t:?}");
        // Greedy text of dense: the prompt in batches, then decode.
        for p in prompts.iter().take(1) {
            assert_eq!(common::greedy(&mut s, p, N), common::greedy(&mut dense, p, N), "budget {budget_mib} batch {batch}, prompt {p:?}");
        }
        // The largest batch has run: still inside the budget.
        ctx.flush_uploads();
        let m = ctx.memory();
        assert!(m.peak() <= budget_mib << 20, "budget {budget_mib} MiB, batch {batch}: {m} over the budget");
    }
    assert!(saw_mixed, "no run had both split and wholly hot layers");
}
