//! Streamed hybrid prefill (lavapipe in CI) on the real ReLU model: a large batch's cold
//! neurons and host-attention layers' q/k/v/o rows packed into the GPU layout, streamed
//! through the two-slot area and computed by the GPU give the logits of the token-by-token hybrid, of the batched path with the cold neurons
//! on the CPU and of the dense CPU path within the hybrid tests' tolerance, with split, wholly
//! hot and host-attention layers, prompts spanning several batches (some streamed, some small
//! enough for the CPU), a prompt extending an earlier one (n_past > 0), chunks reused many
//! times per layer, the same bits run after run, the greedy text of dense, and the budget
//! kept with the area counted.

mod common;

use ember::cpu::Precision;
use ember::engine::{AttentionPlace, FfnMode, Forward, HybridPlan, HybridSession, Logits, PrefillConfig, Session, SparseFfn, StreamConfig};
use ember::gpu::sparse::HotFfn;
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
fn streamed_prefill_matches_cpu_cold_token_by_token_and_dense() {
    let Some(path) = common::relu_model() else { return };
    let Some(ctx0) = common::gpu() else { return };
    drop(ctx0);
    let model = Arc::new(Model::load(&path).unwrap());
    let hp = model.hp.clone();
    let prompts = common::ref_prompts();
    assert!(prompts.len() >= 2);
    let (counts, counts_tokens) = profile_counts(&model, &prompts);
    let relu = Arc::new(SparseFfn::new(&model, FfnMode::Relu, None, Vec::new(), Precision::F32, false).unwrap());
    let mut dense = Session::new(model.clone(), 128);
    dense.precision = Precision::F32;
    // 41 tokens: batches of 16, 16 and 9.
    let long: Vec<u32> = prompts.iter().flatten().copied().cycle().take(41).collect();
    let plan = |budget: Option<u64>, hot: Option<Vec<Vec<u32>>>, attention: AttentionPlace| HybridPlan { ffn: relu.clone(), budget, counts: counts.clone(), counts_tokens, cpu_precision: Precision::F32, simulate: None, sim_predictors: None, hot, note: None, attention, reserve: 0 };
    // Even layers wholly hot, odd ones with every third neuron hot (1024 cold neurons);
    // host attention in every third layer.
    let mixed: Vec<Vec<u32>> = (0..hp.n_layer).map(|l| (0..hp.n_ff as u32).filter(|i| l % 2 == 0 || i % 3 == 0).collect()).collect();
    // (Layers 4, 10, ... run their q/k/v product on the GPU in decode.)
    let sites: Vec<AttnSite> = (0..hp.n_layer).map(|l| match l % 6 {
        1 => AttnSite::Host,
        4 => AttnSite::Qkv,
        _ => AttnSite::Gpu,
    }).collect();
    let n_host = sites.iter().filter(|&&s| s != AttnSite::Gpu).count() as u64;
    // Chunks of 64 neurons (their gate, up and down_t rows): 16 per split layer,
    // each slot reused 8 times per layer. Batches of 10 tokens or more stream: of the long
    // prompt's 16, 16 and 9, the last goes to the CPU.
    let l = &model.layers[1];
    let neuron: u64 = [l.ffn_gate.ty, l.ffn_up.ty, relu.down_t[1].ty].iter().map(|&t| HotFfn::row_bytes(t, hp.n_embd)).sum();
    let tiny = StreamConfig { min_rows: 10, chunk_bytes: 64 * neuron };
    let budget = Some(240u64 << 20);
    let ctx = Arc::new(common::gpu().unwrap());
    let streamed_cfg = PrefillConfig { batch: 16, stream: Some(tiny) };
    let mut s = HybridSession::with_prefill(model.clone(), ctx.clone(), 128, plan(budget, Some(mixed.clone()), AttentionPlace::Given(sites.clone())), streamed_cfg, false).unwrap();
    assert_eq!(s.stream_chunk_rows(), Some(64));
    let mut cpu = HybridSession::with_prefill(model.clone(), Arc::new(common::gpu().unwrap()), 128, plan(budget, Some(mixed.clone()), AttentionPlace::Given(sites.clone())), 16, false).unwrap();
    assert_eq!(cpu.stream_chunk_rows(), None);
    let mut tok = HybridSession::with_prefill(model.clone(), Arc::new(common::gpu().unwrap()), 128, plan(budget, Some(mixed), AttentionPlace::Given(sites)), 1, false).unwrap();
    assert_eq!(s.placement().hot, tok.placement().hot);
    let check = |what: &str, a: &[f32], c: &[f32], b: &[f32], d: &[f32]| {
        let (ec, eb, ed) = (common::rel_err(a, c), common::rel_err(a, b), common::rel_err(a, d));
        eprintln!("{what}: relative logit error {ec:e} against the CPU's cold neurons, {eb:e} against token by token, {ed:e} against dense");
        assert!(ec < 1e-3 && eb < 1e-3 && ed < 3e-3, "{what}: relative logit error {ec} against the CPU's cold neurons, {eb} against token by token, {ed} against dense");
    };
    for p in prompts.iter().take(2).chain([&long]) {
        let (ch_before, b_before, al_before, ga_before) = {
            let t = s.prefill_timing(false);
            (t.stream.chunks, t.streamed_batches, t.stream.attn_layers, t.gpu_attention_layers)
        };
        s.reset();
        let a = s.forward(p, Logits::Last).unwrap();
        let t = s.prefill_timing(false);
        // A batch of 10 or more streamed, every split layer's 1024 cold neurons in 16 chunks.
        let big = p.chunks(16).filter(|c| c.len() >= 10).count() as u64;
        assert_eq!(t.streamed_batches - b_before, big, "{} tokens", p.len());
        assert_eq!(t.stream.chunks - ch_before, big * 16 * (hp.n_layer as u64 / 2), "{} tokens", p.len());
        // Every host-attention layer's products streamed too.
        assert_eq!(t.stream.attn_layers - al_before, big * n_host, "{} tokens", p.len());
        // The first batch (from position 0, streamed) ran the q/k/v-on-GPU layers' attention
        // on the GPU, the others theirs on the CPU.
        let n_qkv = (0..hp.n_layer).filter(|l| l % 6 == 4).count() as u64;
        assert_eq!(t.gpu_attention_layers - ga_before, if p.len() >= 10 { n_qkv } else { 0 }, "{} tokens", p.len());
        cpu.reset();
        let c = cpu.forward(p, Logits::Last).unwrap();
        tok.reset();
        let b = tok.forward(p, Logits::Last).unwrap();
        dense.reset();
        let d = dense.forward(p, Logits::Last).unwrap();
        check(&format!("{} tokens", p.len()), &a, &c, &b, &d);
        // The same bits run after run.
        s.reset();
        let again = s.forward(p, Logits::Last).unwrap();
        assert!(again.iter().zip(&a).all(|(x, y)| x.to_bits() == y.to_bits()), "{} tokens: not deterministic", p.len());
    }
    // A prompt extending an earlier one (n_past > 0): the second part streams on top of the
    // KV cache (host and GPU layers) the first part left.
    let (first, second) = long.split_at(12);
    s.reset();
    s.forward(first, Logits::Last).unwrap();
    let a = s.forward(second, Logits::Last).unwrap();
    cpu.reset();
    cpu.forward(first, Logits::Last).unwrap();
    let c = cpu.forward(second, Logits::Last).unwrap();
    tok.reset();
    tok.forward(first, Logits::Last).unwrap();
    let b = tok.forward(second, Logits::Last).unwrap();
    dense.reset();
    let d = dense.forward(&long, Logits::Last).unwrap();
    check("12 then 29 tokens", &a, &c, &b, &d);
    // Decode after a streamed prefill sees the KV cache it would have: greedy text of dense.
    assert_eq!(common::greedy(&mut s, &long, 6), common::greedy(&mut dense, &long, 6));
    ctx.flush_uploads();
    let m = ctx.memory();
    assert!(m.peak() <= 240 << 20, "{m} over the budget");
}

/// A placed budget: the area comes out of it (counted before the neurons are placed), small
/// chunks are reused several times per layer, the allocation
/// stays within the budget after the largest batch, and greedy text is dense's.
#[test]
fn streamed_prefill_stays_in_a_small_budget() {
    let Some(path) = common::relu_model() else { return };
    let Some(ctx0) = common::gpu() else { return };
    drop(ctx0);
    let model = Arc::new(Model::load(&path).unwrap());
    let hp = model.hp.clone();
    let prompts = common::ref_prompts();
    let (counts, counts_tokens) = profile_counts(&model, &prompts);
    let relu = Arc::new(SparseFfn::new(&model, FfnMode::Relu, None, Vec::new(), Precision::F32, false).unwrap());
    let mut dense = Session::new(model.clone(), 128);
    dense.precision = Precision::F32;
    let long: Vec<u32> = prompts.iter().flatten().copied().cycle().take(64).collect();
    let budget_mib = 100u64;
    let budget = Some(budget_mib << 20);
    let default = StreamConfig::for_budget(budget).unwrap();
    assert_eq!((default.chunk_bytes, default.min_rows), ((budget_mib << 20) / 64, StreamConfig::DEFAULT_MIN_ROWS));
    // Chunks of 200 KiB (96 neurons), so that layers take several.
    let cfg = StreamConfig { chunk_bytes: (budget_mib << 20) / 512, ..default };
    let plan = |stream: Option<StreamConfig>| {
        let p = HybridPlan { ffn: relu.clone(), budget, counts: counts.clone(), counts_tokens, cpu_precision: Precision::F32, simulate: None, sim_predictors: None, hot: None, note: None, attention: AttentionPlace::AllGpu, reserve: 0 };
        (p, PrefillConfig { batch: 64, stream })
    };
    let ctx = Arc::new(common::gpu().unwrap());
    let (p, pc) = plan(Some(cfg));
    let mut s = HybridSession::with_prefill(model.clone(), ctx.clone(), 128, p, pc, false).unwrap();
    let rows = s.stream_chunk_rows().unwrap();
    let placement = s.placement().clone();
    let cold: Vec<usize> = placement.hot.iter().map(|h| hp.n_ff - h.len()).collect();
    assert!(cold.iter().any(|&c| c > 2 * rows), "some layer's cold neurons take several chunks ({rows} rows each): {cold:?}");
    let area = placement.fixed.iter().find(|f| f.name.contains("streaming area")).expect("the area is a fixed part of the placement");
    assert!(area.bytes >= 4 * (cfg.chunk_bytes / 2) && area.bytes <= cfg.area_bytes(), "area {} bytes, estimate {}", area.bytes, cfg.area_bytes());
    // Without an area more neurons are hot than with a large one (this one's 0.8 MiB may fit
    // in the allocator's blocks' unused room, which the placement charges anyway).
    let n_hot = |stream| {
        let (p, pc) = plan(stream);
        let s = HybridSession::with_prefill(model.clone(), Arc::new(common::gpu().unwrap()), 128, p, pc, false).unwrap();
        s.placement().n_hot()
    };
    let (without, large) = (n_hot(None), n_hot(Some(StreamConfig { chunk_bytes: 4 << 20, ..default })));
    assert!(without > large, "{without} hot neurons without the area, {large} with a 16 MiB one");
    let a = s.forward(&long, Logits::Last).unwrap();
    let t = s.prefill_timing(false);
    let want: u64 = cold.iter().map(|&c| c.div_ceil(rows) as u64).sum();
    assert_eq!((t.streamed_batches, t.stream.chunks), (1, want));
    dense.reset();
    let d = dense.forward(&long, Logits::Last).unwrap();
    let ed = common::rel_err(&a, &d);
    assert!(ed < 3e-3, "relative logit error {ed} against dense");
    assert_eq!(common::greedy(&mut s, &long, 6), common::greedy(&mut dense, &long, 6));
    ctx.flush_uploads();
    let m = ctx.memory();
    assert!(m.peak() <= budget_mib << 20, "{m} over the budget of {budget_mib} MiB");
}
