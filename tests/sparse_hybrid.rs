//! The neuron-aware GPU session (lavapipe in CI): hot neurons on the GPU, cold ones on the
//! CPU, under VRAM budgets, against the dense path on the real ReLU model; the budget is
//! never exceeded; dense layer offload as the baseline.

mod common;

use ember::cpu::Precision;
use ember::engine::{AttentionPlace, FfnMode, Forward, HotSubmit, HybridPlan, HybridSession, HybridTuning, Logits, OffloadSession, Session, SparseFfn};
use ember::model::Model;
use ember::sparse::predictor::Predictors;
use ember::sparse::placement::AttnSite;
use ember::sparse::profile::Profiler;
use ember::sparse::simulate::{PredictorSim, SimulatedActivity};
use std::sync::Arc;



/// Firing counts of the model over the prompts (what placement ranks neurons by).
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
fn hybrid_at_several_budgets_gives_the_dense_tokens_and_stays_in_budget() {
    let Some(path) = common::relu_model() else { return };
    let Some(ctx0) = common::gpu() else { return };
    drop(ctx0);
    let model = Arc::new(Model::load(&path).unwrap());
    let prompts = common::ref_prompts();
    let (counts, counts_tokens) = profile_counts(&model, &prompts);
    let relu = Arc::new(SparseFfn::new(&model, FfnMode::Relu, None, Vec::new(), Precision::F32, false).unwrap());
    let mut dense = Session::new(model.clone(), 96);
    dense.precision = Precision::F32;
    const N: usize = 4;
    let want: Vec<Vec<u32>> = prompts.iter().map(|p| common::greedy(&mut dense, p, N)).collect();

    // The model's fixed GPU parts take ~85 MiB here; budgets from "a few hot neurons" to
    // "all of them", and no budget (GPU-resident sparse).
    for budget_mib in [Some(100u64), Some(125), None] {
        let ctx = Arc::new(common::gpu().unwrap());
        let plan = HybridPlan { ffn: relu.clone(), budget: budget_mib.map(|m| m << 20), counts: counts.clone(), counts_tokens, cpu_precision: Precision::F32, simulate: None, sim_predictors: None, hot: None, note: None, attention: AttentionPlace::AllGpu, reserve: 0 };
        let mut s = HybridSession::new(model.clone(), ctx.clone(), 96, plan, false).unwrap();
        let placement = s.placement().clone();
        let n_hot = placement.n_hot();
        if let Some(m) = budget_mib {
            assert!(ctx.allocated_bytes() <= m << 20, "allocated {} over {m} MiB", ctx.allocated_bytes());
            assert!(n_hot > 0 && n_hot < model.hp.n_layer * model.hp.n_ff, "{m} MiB: {n_hot} hot neurons");
        } else {
            assert_eq!(n_hot, model.hp.n_layer * model.hp.n_ff);
        }
        // Every reference prompt at the tightest budget, two at the others (test time).
        let n_prompts = if budget_mib == Some(100) { prompts.len() } else { 2 };
        for (p, w) in prompts.iter().zip(&want).take(n_prompts) {
            assert_eq!(&common::greedy(&mut s, p, N), w, "budget {budget_mib:?} MiB ({n_hot} hot), prompt {p:?}");
        }
        // The same logits run after run.
        s.reset();
        let a = s.forward(&prompts[1], Logits::Last).unwrap();
        s.reset();
        let b = s.forward(&prompts[1], Logits::Last).unwrap();
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "budget {budget_mib:?}: not deterministic");
        dense.reset();
        let d = dense.forward(&prompts[1], Logits::Last).unwrap();
        assert!(common::rel_err(&a, &d) < 1e-3, "budget {budget_mib:?}: relative logit error {}", common::rel_err(&a, &d));
    }
}

/// Layers whose attention and KV cache run on the CPU, in every combination with the FFN
/// split (all neurons hot, all cold, half and half; attention on the GPU or the host): the
/// dense CPU's greedy tokens, deterministic logits, and no VRAM for the host layers' caches.
#[test]
fn hybrid_with_host_attention_layers_gives_the_dense_tokens() {
    let Some(path) = common::relu_model() else { return };
    let Some(ctx) = common::gpu() else { return };
    let model = Arc::new(Model::load(&path).unwrap());
    let hp = &model.hp;
    let prompts = common::ref_prompts();
    let relu = Arc::new(SparseFfn::new(&model, FfnMode::Relu, None, Vec::new(), Precision::F32, false).unwrap());
    // Attention on the host in layers 0, 3, 4, 7, 8, ... (the q/k/v product on the GPU in
    // 3, 7, 11, ...); neurons by layer % 3: all hot, all cold, the even ones hot. So layer 0
    // is host + all hot, 1 GPU + all cold, 2 GPU + split, 3 q/k/v + all hot, 4 host + all
    // cold, 6 GPU + all hot, 7 q/k/v + all cold, 8 host + split, 11 q/k/v + split.
    let sites: Vec<AttnSite> = (0..hp.n_layer).map(|l| match l % 4 {
        0 => AttnSite::Host,
        3 => AttnSite::Qkv,
        _ => AttnSite::Gpu,
    }).collect();
    let on_gpu: Vec<bool> = sites.iter().map(|&s| s == AttnSite::Gpu).collect();
    let hot: Vec<Vec<u32>> = (0..hp.n_layer)
        .map(|l| match l % 3 {
            0 => (0..hp.n_ff as u32).collect(),
            1 => Vec::new(),
            _ => (0..hp.n_ff as u32).step_by(2).collect(),
        })
        .collect();
    let counts = vec![vec![1u32; hp.n_ff]; hp.n_layer];
    let counts_tokens = 1;
    let n_ctx = 96;
    let plan = HybridPlan { ffn: relu, budget: Some(400 << 20), counts, counts_tokens, cpu_precision: Precision::F32, simulate: None, sim_predictors: None, hot: Some(hot.clone()), note: None, attention: AttentionPlace::Given(sites.clone()), reserve: 0 };
    let ctx = Arc::new(ctx);
    // Four threads, so the cold team has members besides the caller.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
    let mut s = pool.install(|| HybridSession::new(model.clone(), ctx.clone(), n_ctx, plan, false)).unwrap();
    assert_eq!(s.attention_sites(), sites);
    assert_eq!(s.placement().hot, hot);
    assert!(s.backend_name().contains(&format!("attention of {} layers on the CPU, the q/k/v of {} of them on the GPU", on_gpu.iter().filter(|&&g| !g).count(), hp.n_layer / 4)), "{}", s.backend_name());
    // Only the GPU layers' caches are on the GPU.
    let n_gpu = on_gpu.iter().filter(|&&g| g).count() as u64;
    assert_eq!(s.gpu().state_bytes(), n_gpu * hp.kv_bytes_per_layer(n_ctx));

    let mut dense = Session::new(model.clone(), n_ctx);
    dense.precision = Precision::F32;
    for p in &prompts[..3] {
        assert_eq!(common::greedy(&mut s, p, 4), common::greedy(&mut dense, p, 4), "prompt {p:?}");
    }
    // Logits close to the dense CPU's, and the same run after run.
    let p = &prompts[1];
    s.reset();
    let a = s.forward(p, Logits::Last).unwrap();
    s.reset();
    let b = s.forward(p, Logits::Last).unwrap();
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "not deterministic");
    // Decode token by token: the same bits whatever the decode's tuning (upload slots and
    // queue.write_buffer carry the same bytes, in the same order whichever thread submits).
    let by_token = |s: &mut HybridSession| -> Vec<f32> {
        s.reset();
        let mut last = Vec::new();
        for &t in p {
            last = s.forward(&[t], Logits::Last).unwrap();
        }
        last
    };
    let reference = by_token(&mut s);
    assert_eq!(HybridTuning::default(), HybridTuning { hot_submit: HotSubmit::Team, upload_slots: true });
    for hot_submit in [HotSubmit::Team, HotSubmit::Thread, HotSubmit::Main] {
        for upload_slots in [false, true] {
            s = s.with_tuning(HybridTuning { hot_submit, upload_slots });
            let other = pool.install(|| by_token(&mut s));
            assert!(other.iter().zip(&reference).all(|(x, y)| x.to_bits() == y.to_bits()), "hot neurons submitted by {hot_submit:?}, upload slots {upload_slots}: other logits");
        }
    }
    dense.reset();
    let d = dense.forward(p, Logits::Last).unwrap();
    assert!(common::rel_err(&a, &d) < 1e-3, "relative logit error {}", common::rel_err(&a, &d));
    // Every layer's attention on the host: the GPU holds no KV cache at all.
    let all_host = HybridPlan {
        ffn: Arc::new(SparseFfn::new(&model, FfnMode::Relu, None, Vec::new(), Precision::F32, false).unwrap()),
        budget: None,
        counts: vec![vec![1u32; hp.n_ff]; hp.n_layer], counts_tokens,
        cpu_precision: Precision::F32,
        simulate: None,
        sim_predictors: None,
        hot: None,
        note: None,
        attention: AttentionPlace::Given(vec![AttnSite::Host; hp.n_layer]),
        reserve: 0,
    };
    let mut s = HybridSession::new(model.clone(), Arc::new(common::gpu().unwrap()), n_ctx, all_host, false).unwrap();
    assert_eq!(s.gpu().state_bytes(), 0);
    assert_eq!(common::greedy(&mut s, &prompts[0], 4), common::greedy(&mut dense, &prompts[0], 4));
    // A per-layer list of the wrong length is a typed error.
    let bad = HybridPlan {
        ffn: Arc::new(SparseFfn::new(&model, FfnMode::Relu, None, Vec::new(), Precision::F32, false).unwrap()),
        budget: None,
        counts: vec![vec![1u32; hp.n_ff]; hp.n_layer], counts_tokens,
        cpu_precision: Precision::F32,
        simulate: None,
        sim_predictors: None,
        hot: None,
        note: None,
        attention: AttentionPlace::Given(vec![AttnSite::Gpu; 3]),
        reserve: 0,
    };
    assert!(HybridSession::new(model.clone(), Arc::new(common::gpu().unwrap()), n_ctx, bad, false).is_err());
}

#[test]
fn hybrid_predict_with_always_on_predictors_matches_dense() {
    let Some(path) = common::relu_model() else { return };
    let Some(ctx) = common::gpu() else { return };
    let model = Arc::new(Model::load(&path).unwrap());
    let hp = &model.hp;
    let prompts = common::ref_prompts();
    let always = Arc::new(Predictors::always_on(hp.n_layer, hp.n_embd, hp.n_ff));
    let ffn = Arc::new(SparseFfn::new(&model, FfnMode::Predict, Some(always), Vec::new(), Precision::F32, false).unwrap());
    let counts = vec![vec![1u32; hp.n_ff]; hp.n_layer];
    let counts_tokens = 1;
    let plan = HybridPlan { ffn, budget: Some(110 << 20), counts, counts_tokens, cpu_precision: Precision::F32, simulate: None, sim_predictors: None, hot: None, note: None, attention: AttentionPlace::AllGpu, reserve: 0 };
    let mut s = HybridSession::new(model.clone(), Arc::new(ctx), 96, plan, false).unwrap();
    let mut dense = Session::new(model.clone(), 96);
    dense.precision = Precision::F32;
    for p in &prompts[..3] {
        assert_eq!(common::greedy(&mut s, p, 4), common::greedy(&mut dense, p, 4), "prompt {p:?}");
    }
}

/// Predictors of random weights (about half of each layer's neurons predicted, unrelated to
/// which fire, so a predictor that reads the wrong vector or inverts its threshold shows): the
/// hybrid's GPU predictor, selection and cold split give the logits of the CPU session's predict
/// mode, which are far from the dense model's. One token from an empty context each: over
/// several tokens such predictors make the model chaotic (two CPU summation orders already
/// differ by 40% after five tokens).
#[test]
fn hybrid_predict_with_random_predictors_matches_the_cpu() {
    use ember::gguf::GgmlType;
    use ember::sparse::predictor::Predictor;
    let Some(path) = common::relu_model() else { return };
    let Some(ctx) = common::gpu() else { return };
    let model = Arc::new(Model::load(&path).unwrap());
    let hp = &model.hp;
    let mut rng = common::Rng(51);
    let rank = 32;
    let layers = (0..hp.n_layer)
        .map(|_| Predictor::from_f32(&rng.vec(rank * hp.n_embd), &rng.vec(hp.n_ff * rank), rank, hp.n_embd, hp.n_ff, 0.0, GgmlType::F32).unwrap())
        .collect();
    let preds = Arc::new(Predictors { layers, model_name: String::new() });
    let ffn = || SparseFfn::new(&model, FfnMode::Predict, Some(preds.clone()), Vec::new(), Precision::F32, false).unwrap();
    let counts = vec![vec![1u32; hp.n_ff]; hp.n_layer];
    let counts_tokens = 1;
    // A budget that leaves part of every layer's neurons to the CPU.
    let plan = HybridPlan { ffn: Arc::new(ffn()), budget: Some(110 << 20), counts, counts_tokens, cpu_precision: Precision::F32, simulate: None, sim_predictors: None, hot: None, note: None, attention: AttentionPlace::AllGpu, reserve: 0 };
    let mut gpu = HybridSession::new(model.clone(), Arc::new(ctx), 96, plan, false).unwrap();
    // The CPU session's own way (neuron bundles over fixed ranges), as `--backend cpu` runs it.
    let mut cpu = Session::new(model.clone(), 96).with_ffn(Arc::new(ffn().with_bundles(&model)));
    cpu.precision = Precision::F32;
    let mut dense = Session::new(model.clone(), 96);
    dense.precision = Precision::F32;
    let tokens = [1u32, 504, 6403, 1604, 9000, 30000, 777, 12345];
    let mut agree = Vec::new();
    for token in tokens {
        let [g, c, d] = [&mut gpu as &mut dyn Forward, &mut cpu, &mut dense].map(|s| {
            s.reset();
            s.forward(&[token], Logits::Last).unwrap()
        });
        let off = common::rel_err(&c, &d);
        assert!(off > 0.1, "token {token}: random predictors left the logits near the dense model's ({off}): the test would not see a broken predictor");
        if common::rel_err(&g, &c) < 1e-3 {
            agree.push(token);
        }
    }
    // A neuron whose logit is within rounding of the threshold flips between any two
    // implementations and moves the logits by about 10% (measured: the CPU's two summation
    // orders agree within 1e-3 on 4 of 6 tokens, the GPU and the CPU on 5 of 6); a broken
    // predictor agrees on none.
    assert!(agree.len() * 2 >= tokens.len(), "GPU and CPU predict mode agree within 1e-3 on only {agree:?} of {tokens:?}");
}

#[test]
fn dense_layer_offload_matches_the_cpu() {
    let Some(path) = common::relu_model() else { return };
    let Some(ctx) = common::gpu() else { return };
    let model = Arc::new(Model::load(&path).unwrap());
    let ctx = Arc::new(ctx);
    let prompts = common::ref_prompts();
    let mut dense = Session::new(model.clone(), 96);
    dense.precision = Precision::F32;
    let mut off = OffloadSession::new(model.clone(), ctx, 11, 96, 16, false).unwrap();
    off.cpu_mut().precision = Precision::F32;
    for p in &prompts[..3] {
        assert_eq!(common::greedy(&mut off, p, 4), common::greedy(&mut dense, p, 4), "prompt {p:?}");
    }
}

#[test]
fn a_budget_too_small_for_attention_is_a_clear_error() {
    let Some(path) = common::relu_model() else { return };
    let Some(ctx) = common::gpu() else { return };
    let model = Arc::new(Model::load(&path).unwrap());
    let relu = Arc::new(SparseFfn::new(&model, FfnMode::Relu, None, Vec::new(), Precision::F32, false).unwrap());
    let counts = vec![vec![1u32; model.hp.n_ff]; model.hp.n_layer];
    let counts_tokens = 1;
    let plan = HybridPlan { ffn: relu, budget: Some(10 << 20), counts, counts_tokens, cpu_precision: Precision::F32, simulate: None, sim_predictors: None, hot: None, note: None, attention: AttentionPlace::AllGpu, reserve: 0 };
    let err = HybridSession::new(model.clone(), Arc::new(ctx), 96, plan, false).err().expect("10 MiB cannot hold the attention weights");
    assert!(err.to_string().contains("--vram-budget"), "{err}");
}

/// Random predictor matrices of rank 32 (their output is set aside in a simulation).
fn random_predictors(model: &Model, seed: u64) -> Arc<Predictors> {
    let hp = &model.hp;
    let mut rng = common::Rng(seed);
    let layers = (0..hp.n_layer)
        .map(|_| ember::sparse::predictor::Predictor::from_f32(&rng.vec(32 * hp.n_embd), &rng.vec(hp.n_ff * 32), 32, hp.n_embd, hp.n_ff, 0.0, ember::gguf::GgmlType::Q8_0).unwrap())
        .collect();
    Arc::new(Predictors { layers, model_name: String::new() })
}

/// A simulated hybrid session of the ReLU model at 110 MiB (hot and cold neurons in every
/// layer), drawing at a 25% rate with the given predictor; the q/k/v product alone on the GPU
/// in every fifth layer from layer 2 (their x and q/k/v reach the CPU with the predictor's
/// input, x, in the same exchange).
fn simulated_session(model: &Arc<Model>, opts: &str, predictors: Option<Arc<Predictors>>, hot: Option<Vec<Vec<u32>>>) -> HybridSession {
    let hp = &model.hp;
    let opts: PredictorSim = opts.parse().unwrap();
    let sim = SimulatedActivity::uniform(hp.n_layer, hp.n_ff, 0.25, 0).with_predictor(&opts).unwrap();
    // Place by rates that differ from the draws' (every neuron draws at 25%).
    let counts = (0..hp.n_layer).map(|l| (0..hp.n_ff as u32).map(|j| (j * 7 + l as u32 * 13) % 101).collect()).collect();
    let counts_tokens = 101;
    let ffn = Arc::new(SparseFfn::simulated(model, Precision::F32, false).unwrap());
    // A given placement gets room for the charged predictor's rows.
    let budget = if hot.is_some() { 116 << 20 } else { 110 << 20 };
    let sites = (0..hp.n_layer).map(|l| if l % 5 == 2 { AttnSite::Qkv } else { AttnSite::Gpu }).collect();
    let plan = HybridPlan { ffn, budget: Some(budget), counts, counts_tokens, cpu_precision: Precision::F32, simulate: Some(sim), sim_predictors: predictors, hot, note: None, attention: AttentionPlace::Given(sites), reserve: 0 };
    let ctx = Arc::new(common::gpu().unwrap());
    HybridSession::new(model.clone(), ctx, 96, plan, false).unwrap()
}

/// The charged simulation: a perfect predictor run through the charged path (its matrices
/// run, candidates and firing neurons in two lists) gives the free perfect predictor's tokens
/// and logits bit for bit; the predictor's GPU and CPU work really runs; an imperfect
/// predictor gives the same tokens for the same seed, run after run.
#[test]
fn simulated_predictor_is_charged_deterministic_and_perfect_equals_the_free_path() {
    let Some(path) = common::relu_model() else { return };
    let Some(ctx0) = common::gpu() else { return };
    drop(ctx0);
    let model = Arc::new(Model::load(&path).unwrap());
    let prompt = &common::ref_prompts()[1];
    let predictors = random_predictors(&model, 5);
    let run = |s: &mut HybridSession| -> (Vec<u32>, Vec<f32>) {
        s.reset();
        let logits = s.forward(prompt, Logits::Last).unwrap();
        let tokens = common::greedy(s, prompt, 6);
        (tokens, logits)
    };
    let same = |a: &[f32], b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());

    let mut free = simulated_session(&model, "perfect,seed=7", None, None);
    // The same hot neurons (the charged predictor's matrices would shift the placement, and
    // with it the order of the final sum).
    let hot = free.placement().hot.clone();
    let mut charged = simulated_session(&model, "perfect,seed=7,rank=32", Some(predictors.clone()), Some(hot));
    let (tf, lf) = run(&mut free);
    let (tc, lc) = run(&mut charged);
    assert_eq!(tf, tc, "perfect predictor: free and charged paths differ in tokens");
    assert!(same(&lf, &lc), "perfect predictor: free and charged paths differ in logits (relative error {})", common::rel_err(&lc, &lf));
    assert_eq!(free.charged_work(0).0, 0, "a free predictor runs no predictor rows");
    assert!(!free.charged_work(0).1.contains(&"predictor fc1"));

    for opts in ["recall=0.99,precision=0.3,seed=3", "recall=0.9,precision=0.5,seed=3"] {
        let mut a = simulated_session(&model, opts, Some(predictors.clone()), None);
        let mut b = simulated_session(&model, opts, Some(predictors.clone()), None);
        let (ta, la) = run(&mut a);
        let (tb, lb) = run(&mut b);
        assert_eq!(ta, tb, "{opts}: tokens differ between runs with one seed");
        assert!(same(&la, &lb), "{opts}: logits differ between runs with one seed");
        assert!(!same(&la, &lf), "{opts}: an imperfect predictor cannot give the perfect one's logits");
        let (rows, names) = a.charged_work(0);
        // fc1's 32 rows and the cold rows of fc2, in every layer with cold neurons, every token.
        assert!(rows > 32, "{opts}: the CPU ran {rows} predictor rows");
        for want in ["predictor fc1", "predictor relu", "predictor fc2", "sparse select candidates", "sparse gate candidates", "sparse axpy"] {
            assert!(names.contains(&want), "{opts}: layer 0's GPU dispatches {names:?} lack {want}");
        }
        let (t, _) = a.timing(false);
        assert!(t.cpu_predictor > 0.0, "{opts}: no CPU predictor time charged");
    }
}
