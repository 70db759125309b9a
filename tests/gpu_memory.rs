//! GPU memory under a budget (lavapipe in CI): uploads go through one bounded staging buffer,
//! and the hybrid's allocations, measured by ember and by the allocator under wgpu, stay
//! within --vram-budget after setup and after its largest batch, with a long prompt.

mod common;

use ember::cpu::Precision;
use ember::engine::{AttentionPlace, FfnMode, Forward, HybridPlan, HybridSession, Logits, SparseFfn};
use ember::gpu::STAGING_CAP;
use ember::model::Model;
use std::sync::Arc;

/// Uploads larger than the staging buffer, at odd sizes and offsets, land intact, and the
/// allocator never holds a second copy of them.
#[test]
fn uploads_through_the_staging_buffer_land_intact_and_stay_bounded() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = common::Rng(7);
    // 2.5 staging buffers, 3 bytes short of a multiple of 4 (padded by `upload`), then small
    // writes between big ones.
    let sizes = [(STAGING_CAP as usize) * 5 / 2 - 3, 12, 4 * 1001, STAGING_CAP as usize + 8, 4];
    let before = ctx.memory();
    let mut bufs = Vec::new();
    for &n in &sizes {
        let data: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
        bufs.push((ctx.upload("test data", &data), data));
    }
    // A partial write at an offset into the first buffer.
    let patch: Vec<u8> = (0..4 * 333).map(|i| (i * 7) as u8).collect();
    ctx.write(&bufs[0].0, 4 * 1234, &patch);
    bufs[0].1[4 * 1234..4 * 1234 + patch.len()].copy_from_slice(&patch);
    for (buf, data) in &bufs {
        let got = ctx.read_bytes(buf, data.len() as u64).unwrap();
        assert!(got == *data, "an upload of {} bytes differs", data.len());
    }
    ctx.flush_uploads();
    let after = ctx.memory();
    let padded: u64 = sizes.iter().map(|&n| (n as u64).div_ceil(4) * 4).sum();
    // ember counts the buffers and its staging buffer once.
    assert_eq!(after.counted - before.counted, padded + STAGING_CAP);
    if let (Some(r0), Some(peak)) = (before.reserved, after.reserved_peak) {
        // The allocator held the data, one staging buffer and block room (4-8 MiB blocks),
        // never a second copy of the ~14 MiB uploaded.
        assert!(peak - r0 <= padded + STAGING_CAP + (16 << 20), "allocator peak grew by {} for {padded} bytes", peak - r0);
        assert!(peak < r0 + 2 * padded, "a second copy was held: {} for {padded}", peak - r0);
    }
}

/// The ReLU model as a hybrid at a small budget with a prompt of many tokens in a long
/// context: ember's count and the allocator's blocks stay within the budget after setup and
/// after the batch, and the result is the dense CPU's.
#[test]
fn hybrid_with_a_long_prompt_stays_within_the_budget() {
    let Some(path) = common::relu_model() else { return };
    let Some(ctx) = common::gpu() else { return };
    let model = Arc::new(Model::load(&path).unwrap());
    let hp = &model.hp;
    let budget: u64 = 96 << 20;
    // 1024 positions: a 22.5 MiB KV cache, a quarter of the budget.
    let n_ctx = 1024;
    let relu = Arc::new(SparseFfn::new(&model, FfnMode::Relu, None, Vec::new(), Precision::F32, false).unwrap());
    // Lower neuron ids fire more often, by fiat (placement only ranks by it).
    let counts: Vec<Vec<u32>> = (0..hp.n_layer).map(|_| (0..hp.n_ff as u32).map(|i| hp.n_ff as u32 - i).collect()).collect();
    let counts_tokens = 2 * hp.n_ff as u64;
    let plan = HybridPlan { ffn: relu, budget: Some(budget), counts, counts_tokens, cpu_precision: Precision::F32, simulate: None, sim_predictors: None, hot: None, note: None, attention: AttentionPlace::AllGpu, reserve: 0 };
    let ctx = Arc::new(ctx);
    let mut s = HybridSession::new(model.clone(), ctx.clone(), n_ctx, plan, false).unwrap();
    let n_hot = s.placement().n_hot();
    assert!(n_hot > 0 && n_hot < hp.n_layer * hp.n_ff, "{n_hot} hot neurons: the budget should split the FFN");
    let check = |when: &str| {
        let m = ctx.memory();
        assert!(m.peak() <= budget, "after {when}: {m}, over {budget}");
        assert!(m.counted <= budget, "after {when}: ember counted {} over {budget}", m.counted);
        if let Some(r) = m.reserved_peak {
            assert!(r >= m.counted.saturating_sub(1 << 20), "after {when}: the allocator's {r} below ember's {}", m.counted);
        }
        m
    };
    let setup = check("setup");
    // The largest batch this session runs: a 40-token prompt, every token's logits read back.
    let prompt: Vec<u32> = (0..40u32).map(|i| ((i * 2654435761u32) >> 7) % hp.n_vocab as u32).collect();
    let logits = s.forward(&prompt, Logits::All).unwrap();
    assert_eq!(logits.len(), prompt.len() * hp.n_vocab);
    let after = check("the prompt");
    // Nothing the batch did grew ember's own count.
    assert_eq!(after.counted, setup.counted);
    let mut dense = ember::engine::Session::new(model.clone(), n_ctx);
    dense.precision = Precision::F32;
    let want = dense.forward(&prompt, Logits::All).unwrap();
    assert!(common::rel_err(&logits, &want) < 1e-3, "relative logit error {}", common::rel_err(&logits, &want));
}

/// A budget that cannot hold every layer's KV cache for a long context: the placement leaves
/// some layers' attention on the host, as `ember plan --host-attention` says, and a prompt of
/// a few hundred tokens runs with ember's count and the allocator's blocks within the budget
/// after setup and after the prompt, with the dense CPU's result.
#[test]
fn hybrid_with_host_attention_never_exceeds_a_small_budget_at_a_long_context() {
    let Some(path) = common::relu_model() else { return };
    let Some(ctx) = common::gpu() else { return };
    let model = Arc::new(Model::load(&path).unwrap());
    let hp = &model.hp;
    // 4096 positions: a 90 MiB KV cache over the 30 layers, more than the budget leaves
    // beside the attention weights, embeddings and buffers (~80 MiB).
    let (budget, n_ctx): (u64, usize) = (140 << 20, 4096);
    let relu = || Arc::new(SparseFfn::new(&model, FfnMode::Relu, None, Vec::new(), Precision::F32, false).unwrap());
    // Lower neuron ids fire more often, by fiat, over 2 n_ff tokens (rates up to 1/2: an
    // attention block, whose bytes the host would read at about 0.55 per token, ranks first).
    let counts: Vec<Vec<u32>> = (0..hp.n_layer).map(|_| (0..hp.n_ff as u32).map(|i| hp.n_ff as u32 - i).collect()).collect();
    let counts_tokens = 2 * hp.n_ff as u64;
    let plan = |attention| HybridPlan { ffn: relu(), budget: Some(budget), counts: counts.clone(), counts_tokens, cpu_precision: Precision::F32, simulate: None, sim_predictors: None, hot: None, note: None, attention, reserve: 0 };
    // With every layer's attention on the GPU the budget is refused.
    // With every layer's attention on the GPU the budget is refused.
    assert!(HybridSession::new(model.clone(), Arc::new(common::gpu().unwrap()), n_ctx, plan(AttentionPlace::AllGpu), false).is_err());

    // As `engine::builder` opens it: where lavapipe's allocator wastes more than the estimate
    // allows, the choice is made again on a fresh device with the shortfall kept free.
    drop(ctx);
    let mut attention = AttentionPlace::Placed { slack: 0, kv_depth: n_ctx / 2 };
    let (ctx, mut s) = loop {
        let ctx = Arc::new(common::gpu().unwrap());
        match HybridSession::new(model.clone(), ctx.clone(), n_ctx, plan(attention.clone()), false) {
            Ok(s) => break (ctx, s),
            Err(e) => match attention.with_more_slack(&e) {
                Some(more) if attention == (AttentionPlace::Placed { slack: 0, kv_depth: n_ctx / 2 }) => attention = more,
                _ => panic!("{e}"),
            },
        }
    };
    let slack = match attention {
        AttentionPlace::Placed { slack, .. } => slack,
        _ => unreachable!(),
    };
    let on_gpu = s.attention_sites().to_vec();
    let n_host = on_gpu.iter().filter(|&&g| g != ember::sparse::placement::AttnSite::Gpu).count();
    assert!(n_host > 0 && n_host < hp.n_layer, "{n_host} layers' attention on the host");
    let n_hot = s.placement().n_hot();
    assert!(n_hot > 0 && n_hot < hp.n_layer * hp.n_ff, "{n_hot} hot neurons: the budget should split the FFN");
    // `ember plan --host-attention`'s choice: the same function with the same arguments.
    let neuron_bytes: Vec<u64> = (0..hp.n_layer).map(|l| ember::engine::hybrid::hot_neuron_bytes(&model.layers[l], relu().down_t[l].ty, hp.n_embd)).collect();
    let relu_ffn = relu();
    let reads = ember::engine::host_attention::cold_reads(&model, relu_ffn.down_t[0].ty, FfnMode::Relu, None, false);
    let (_, planned) = ember::engine::host_attention::choose_attention(&model, n_ctx, n_ctx / 2, budget, &counts, counts_tokens, reads, neuron_bytes, 0, ember::gpu::PLANNING_MARGIN + slack).unwrap();
    assert_eq!(on_gpu, planned);
    assert_eq!(s.gpu().state_bytes(), (hp.n_layer - n_host) as u64 * hp.kv_bytes_per_layer(n_ctx));
    let check = |when: &str| {
        let m = ctx.memory();
        assert!(m.peak() <= budget, "after {when}: {m}, over {budget}");
        assert!(m.counted <= budget, "after {when}: ember counted {} over {budget}", m.counted);
        m
    };
    let setup = check("setup");
    // A 128-token prompt (batched prefill: the largest batches this session runs).
    let prompt: Vec<u32> = (0..128u32).map(|i| ((i * 2654435761u32) >> 7) % hp.n_vocab as u32).collect();
    let logits = s.forward(&prompt, Logits::Last).unwrap();
    let after = check("the prompt");
    assert_eq!(after.counted, setup.counted);
    let mut dense = ember::engine::Session::new(model.clone(), n_ctx);
    dense.precision = Precision::F32;
    let want = dense.forward(&prompt, Logits::Last).unwrap();
    assert!(common::rel_err(&logits, &want) < 1e-3, "relative logit error {}", common::rel_err(&logits, &want));
}

/// A budget below what attention, the embeddings and the KV cache need is refused before
/// anything is uploaded: the context's count stays where it was.
#[test]
fn hybrid_refuses_a_budget_too_small_before_uploading() {
    let Some(path) = common::relu_model() else { return };
    let Some(ctx) = common::gpu() else { return };
    let model = Arc::new(Model::load(&path).unwrap());
    let hp = &model.hp;
    let relu = Arc::new(SparseFfn::new(&model, FfnMode::Relu, None, Vec::new(), Precision::F32, false).unwrap());
    let counts: Vec<Vec<u32>> = vec![vec![1; hp.n_ff]; hp.n_layer];
    let counts_tokens = 1;
    // The ReLU model's attention and embeddings alone take more than 16 MiB.
    let plan = HybridPlan { ffn: relu, budget: Some(16 << 20), counts, counts_tokens, cpu_precision: Precision::F32, simulate: None, sim_predictors: None, hot: None, note: None, attention: AttentionPlace::AllGpu, reserve: 0 };
    let ctx = Arc::new(ctx);
    let before = ctx.allocated_bytes();
    let err = HybridSession::new(model.clone(), ctx.clone(), 4096, plan, false).err().expect("a 16 MiB budget must be refused");
    let text = err.to_string();
    assert!(text.contains("cannot hold") && text.contains("KV cache for 4096 positions"), "{text}");
    assert_eq!(ctx.allocated_bytes(), before, "nothing is uploaded before the refusal");
}
