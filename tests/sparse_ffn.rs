//! The neuron-aware FFN modes against the dense path: on the real ReLU model (greedy tokens of
//! the reference prompts, determinism) and on small synthetic ReLU models (logits).

mod common;

use ember::cpu::team::Aside;
use ember::cpu::Precision;
use ember::engine::{FfnMode, Forward, Logits, Session, SparseFfn};
use ember::model::Model;
use ember::sparse::predictor::Predictors;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;



fn session(model: &Arc<Model>, precision: Precision, ffn: Option<Arc<SparseFfn>>) -> Session {
    let mut s = Session::new(model.clone(), 96);
    s.precision = precision;
    match ffn {
        Some(f) => s.with_ffn(f),
        None => s,
    }
}

/// At f32 precision the transposed down matrix holds the dense weights exactly, so `relu` and
/// `predict` with an always-on predictor differ from dense only in summation order: the same
/// greedy tokens on every reference prompt, and the same tokens run after run. Both ways of
/// running them: over the matrices (the hybrid's CPU side) and over the neuron bundles (a CPU
/// session's, in ranges).
#[test]
fn relu_and_always_on_predict_give_the_dense_tokens_on_the_relu_model() {
    let Some(path) = common::relu_model() else { return };
    let model = Arc::new(Model::load(&path).unwrap());
    let hp = &model.hp;
    let prompts = common::ref_prompts();
    assert_eq!(prompts.len(), 6, "the six reference prompts");
    const N: usize = 10;
    let mut dense = session(&model, Precision::F32, None);
    let want: Vec<Vec<u32>> = prompts.iter().map(|p| common::greedy(&mut dense, p, N)).collect();
    for bundled in [false, true] {
        let build = |mode, predictors| {
            let f = SparseFfn::new(&model, mode, predictors, Vec::new(), Precision::F32, false).unwrap();
            Arc::new(if bundled { f.with_bundles(&model) } else { f })
        };
        let relu = build(FfnMode::Relu, None);
        assert_eq!(relu.bundles.len(), if bundled { hp.n_layer } else { 0 });
        let always = Arc::new(Predictors::always_on(hp.n_layer, hp.n_embd, hp.n_ff));
        let predict = build(FfnMode::Predict, Some(always));
        let mut sparse = session(&model, Precision::F32, Some(relu.clone()));
        let mut pred = session(&model, Precision::F32, Some(predict));
        for (p, want) in prompts.iter().zip(&want) {
            assert_eq!(&common::greedy(&mut sparse, p, N), want, "relu, bundled {bundled}, prompt {p:?}");
            assert_eq!(&common::greedy(&mut pred, p, N), want, "always-on predict, bundled {bundled}, prompt {p:?}");
        }
        // The ReLU model leaves most neurons silent: relu mode computed about a quarter of them.
        let density = sparse.ffn_stats.density(hp.n_ff);
        let mean = density.iter().sum::<f64>() / density.len() as f64;
        assert!((0.1..0.4).contains(&mean), "mean active fraction {mean}, bundled {bundled}");
        // Predict mode reports the neurons its predictor chose: every one.
        assert!(pred.ffn_stats.density(hp.n_ff).iter().all(|&d| d == 1.0));

        // Deterministic: a fresh session gives bit-identical logits.
        let mut again = session(&model, Precision::F32, Some(relu));
        sparse.reset();
        let a = sparse.forward(&prompts[0], Logits::All).unwrap();
        let b = again.forward(&prompts[0], Logits::All).unwrap();
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "bundled {bundled}");
    }
}

/// At the default 8-bit precision the dense path quantises the FFN's hidden vector before the
/// down product and the sparse path does not, so logits agree closely but not exactly.
#[test]
fn relu_mode_at_llama_precision_stays_close_to_dense() {
    let Some(path) = common::relu_model() else { return };
    let model = Arc::new(Model::load(&path).unwrap());
    let relu = SparseFfn::new(&model, FfnMode::Relu, None, Vec::new(), Precision::Llama, false).unwrap();
    let bundled = Arc::new(SparseFfn::new(&model, FfnMode::Relu, None, Vec::new(), Precision::Llama, false).unwrap().with_bundles(&model));
    let prompt = &common::ref_prompts()[0];
    let d = session(&model, Precision::Llama, None).forward(prompt, Logits::All).unwrap();
    let exact = session(&model, Precision::F32, None).forward(prompt, Logits::All).unwrap();
    for (what, ffn) in [("matrices", Arc::new(relu)), ("bundles", bundled)] {
        let s = session(&model, Precision::Llama, Some(ffn)).forward(prompt, Logits::All).unwrap();
        // The 8-bit dense path's own distance from f32 arithmetic is the scale of what is allowed.
        let (sparse_err, dense_err) = (common::rel_err(&s, &exact), common::rel_err(&d, &exact));
        eprintln!("relative logit error vs f32 dense: relu ({what}) {sparse_err}, dense {dense_err}; relu vs dense {}", common::rel_err(&s, &d));
        assert!(sparse_err > 0.0 && sparse_err < 1.5 * dense_err, "relu ({what}) {sparse_err} vs dense {dense_err}");
    }
}

#[test]
fn relu_mode_refuses_a_silu_model() {
    let Some(path) = common::default_model() else { return };
    let model = Model::load(&path).unwrap();
    let err = SparseFfn::new(&model, FfnMode::Relu, None, Vec::new(), Precision::Llama, false).err().unwrap();
    assert!(err.to_string().contains("--ffn threshold"), "{err}");
    let err = SparseFfn::new(&model, FfnMode::Predict, None, Vec::new(), Precision::Llama, false).err().unwrap();
    assert!(err.to_string().contains("predictors"), "{err}");
}

/// CATS-style thresholds on a SiLU model: calibrated on one part of a text to skip half of
/// the neurons, another part of the text then runs at about that sparsity, and still mostly
/// predicts the dense model's tokens.
#[test]
fn threshold_mode_reaches_its_calibrated_sparsity() {
    use ember::sparse::threshold::ThresholdCalibrator;
    let (Some(path), Some(refs)) = (common::default_model(), common::refs_dir()) else { return };
    let model = Arc::new(Model::load(&path).unwrap());
    let hp = &model.hp;
    let tok = ember::tokenizer::Tokenizer::from_gguf(&model.file).unwrap();
    let text = tok.encode(&std::fs::read_to_string(refs.join("ppl-text.txt")).unwrap(), true, false).unwrap();
    // Calibration and measurement on different tokens: a threshold test on its own
    // calibration tokens would measure the calibration, not the thresholds.
    let (calibration, tokens) = (&text[..96], &text[96..192]);
    let calib = Arc::new(std::sync::Mutex::new(ThresholdCalibrator::new(hp.activation, hp.n_layer)));
    let mut s = session(&model, Precision::Llama, None);
    s.observer = Some(Box::new(calib.clone()));
    s.forward(calibration, Logits::All).unwrap();
    let mut s = session(&model, Precision::Llama, None);
    let dense = s.forward(tokens, Logits::All).unwrap();
    let thresholds = calib.lock().unwrap().thresholds(0.5);
    assert!(thresholds.iter().all(|&t| t > 0.0));
    let ffn = Arc::new(SparseFfn::new(&model, FfnMode::Threshold, None, thresholds, Precision::Llama, false).unwrap());
    let mut sparse = session(&model, Precision::Llama, Some(ffn));
    let out = sparse.forward(tokens, Logits::All).unwrap();
    let density = sparse.ffn_stats.density(hp.n_ff);
    let mean = density.iter().sum::<f64>() / density.len() as f64;
    // Held-out tokens of the same text: the firing distribution carries over closely.
    assert!((mean - 0.5).abs() < 0.05, "mean density {mean}");
    let err = common::rel_err(&out, &dense);
    let n_vocab = hp.n_vocab;
    let argmax = |l: &[f32]| ember::cpu::ops::argmax(l).0;
    let same = (0..tokens.len()).filter(|&t| argmax(&out[t * n_vocab..(t + 1) * n_vocab]) == argmax(&dense[t * n_vocab..(t + 1) * n_vocab])).count();
    // Skipping half of a SiLU model's neurons is a real change on running text (measured: a
    // relative logit change of 0.61 and the same top token at 60 of 96 held-out positions; 0.47
    // and 53 on the calibration tokens themselves): the bounds catch a broken threshold, which
    // either skips nothing or everything.
    assert!(err > 0.0 && err < 0.75, "relative logit change {err}");
    assert!(same * 2 >= tokens.len(), "the same top token at only {same} of {} positions", tokens.len());

    // A CPU session's way (bundles, ranges) keeps the same neurons, layer by layer; only the
    // order of the down projection's sum differs. (Whole forward passes drift apart: a neuron
    // at the threshold that flips drops a contribution of the threshold's size.)
    let thresholds = calib.lock().unwrap().thresholds(0.5);
    let unbundled = SparseFfn::new(&model, FfnMode::Threshold, None, thresholds.clone(), Precision::Llama, false).unwrap();
    let bundled = SparseFfn::new(&model, FfnMode::Threshold, None, thresholds, Precision::Llama, false).unwrap().with_bundles(&model);
    let (mut s1, mut s2) = (Default::default(), Default::default());
    for (il, t) in [(0usize, 1u32), (7, 500), (hp.n_layer - 1, 9000)] {
        let x = model.token_embd.row_f32(t as usize);
        let mut xn = vec![0.0; hp.n_embd];
        ember::cpu::ops::rms_norm(&x, &model.layers[il].ffn_norm, hp.rms_eps, &mut xn);
        let (mut a, mut b) = (vec![0.0; hp.n_embd], vec![0.0; hp.n_embd]);
        let na = unbundled.token(&model, il, &x, &xn, None, Precision::Llama, &mut s1, &mut a);
        let nb = bundled.token(&model, il, &x, &xn, None, Precision::Llama, &mut s2, &mut b);
        assert_eq!(na, nb, "layer {il}: neurons kept");
        assert!(na > 0 && na < hp.n_ff, "layer {il}: {na} of {} kept", hp.n_ff);
        let err = common::rel_err(&b, &a);
        assert!(err < 1e-5, "layer {il}: by ranges vs over the matrices: relative difference {err}");
    }
}

/// The hybrid executor's cold neurons on a spinning team: the same neurons and numbers as
/// `SparseFfn::token_with` over the same owned set up to the order of the final sum, and the
/// same bits for any team size and split (relu mode, and predict mode with a given set), at both
/// precisions; and the same bits whether the cold gate rows are gathered or multiplied as a
/// dense packed copy (`ColdRows`: used at llama.cpp's precision in relu mode and past 40% of
/// the cold neurons listed, so the dense given set below takes it and the sparse one not).
#[test]
fn cold_neurons_on_a_team_match_the_serial_ffn_for_any_team_size() {
    use ember::engine::cold::{ColdFfn, ColdRows};
    use ember::engine::ffn::FfnScratch;
    let Some(path) = common::relu_model() else { return };
    let model = Arc::new(Model::load(&path).unwrap());
    let (e, ff) = (model.hp.n_embd, model.hp.n_ff);
    let mut rng = common::Rng(17);
    // The hybrid's split (parts from a counter) as well as equal shares.
    let parts = ember::cpu::matmul::CpuTuning { parts_per_member: 3, ..Default::default() };
    let mut teams = [ColdFfn::new(1), ColdFfn::new(3), ColdFfn::new(3).with_tuning(parts)];
    for precision in [Precision::F32, Precision::Llama] {
        let relu = SparseFfn::new(&model, FfnMode::Relu, None, Vec::new(), precision, false).unwrap();
        let always = Arc::new(Predictors::always_on(model.hp.n_layer, e, ff));
        let predict = SparseFfn::new(&model, FfnMode::Predict, Some(always.clone()), Vec::new(), precision, false).unwrap();
        for il in [0, 7, model.hp.n_layer - 1] {
            let xn = rng.vec(e);
            let resid = rng.vec(e);
            // About two thirds of the neurons are cold, in an irregular pattern.
            let cold: Vec<u32> = (0..ff as u32).filter(|_| !rng.next_u64().is_multiple_of(3)).collect();
            let packed = ColdRows::new(&model.layers[il].ffn_gate, cold.clone());
            let gathered = ColdRows::gathered(cold.clone());
            assert!(packed.packed_bytes() > 0 || !ember::quant::packed::packs(model.layers[il].ffn_gate.ty), "layer {il}: the gate is packed");
            let sparse: Vec<u32> = (0..ff as u32).filter(|_| rng.next_u64().is_multiple_of(4)).collect();
            let dense: Vec<u32> = (0..ff as u32).filter(|_| !rng.next_u64().is_multiple_of(4)).collect();
            for (ffn, given) in [(&relu, None), (&predict, Some(sparse.as_slice())), (&predict, Some(dense.as_slice()))] {
                let mut want = vec![0.0f32; e];
                let n_want = ffn.token_with(&model, il, &resid, &xn, Some(&cold), given, precision, &mut FfnScratch::default(), &mut want);
                let mut outs = Vec::new();
                for rows in [&gathered, &packed] {
                    for team in teams.iter_mut() {
                        let mut out = vec![f32::NAN; e];
                        // A task handed to the team (the hybrid's hot-neuron submission) runs
                        // once, whichever path the product takes.
                        let ran = AtomicUsize::new(0);
                        let aside = Aside::new(|| {
                            ran.fetch_add(1, Ordering::Relaxed);
                        });
                        let n = team.token(ffn, &model, il, &resid, &xn, rows, given, precision, &mut out, &aside);
                        assert_eq!(ran.load(Ordering::Relaxed), 1, "layer {il}, {:?}: the aside ran {} times", ffn.mode, ran.load(Ordering::Relaxed));
                        assert_eq!(n, n_want, "layer {il}, {:?}, {precision:?}: neurons computed", ffn.mode);
                        outs.push(out);
                    }
                }
                assert!(n_want > 50, "layer {il}: only {n_want} active cold neurons");
                let err = common::rel_err(&outs[0], &want);
                assert!(err < 1e-5, "layer {il}, {:?}, {precision:?}: relative error {err} against token_with", ffn.mode);
                for (k, out) in outs.iter().enumerate().skip(1) {
                    assert!(outs[0].iter().zip(out).all(|(a, b)| a.to_bits() == b.to_bits()), "layer {il}, {:?}, {precision:?}: run {k} (team size, gathered or packed gate) differs", ffn.mode);
                }
            }
            // A charged predictor's candidates (the dense set), of which some fire.
            let fires: Vec<bool> = dense.iter().map(|_| rng.next_u64().is_multiple_of(3)).collect();
            let charged: Vec<Vec<f32>> = [&gathered, &packed]
                .iter()
                .map(|rows| {
                    let mut out = vec![f32::NAN; e];
                    let n = teams[2].token_charged(&predict, &model, il, &resid, &xn, rows, &dense, &fires, None, precision, &mut out, &Aside::none());
                    assert!(n > 50, "layer {il}: {n} cold candidates");
                    out
                })
                .collect();
            assert!(charged[0].iter().zip(&charged[1]).all(|(a, b)| a.to_bits() == b.to_bits()), "layer {il}, {precision:?}: charged, gathered and packed gates differ");
            assert!(charged[0].iter().any(|&v| v != 0.0));
            // With the predictor charged (its logits set aside; beside the dense gate product
            // the caller runs it alone): the same bits, and its rows are computed.
            for team in teams.iter_mut() {
                for rows in [&gathered, &packed] {
                    let before = team.predictor_rows;
                    let mut out = vec![f32::NAN; e];
                    let ran = AtomicUsize::new(0);
                    let aside = Aside::new(|| {
                        ran.fetch_add(1, Ordering::Relaxed);
                    });
                    team.token_charged(&predict, &model, il, &resid, &xn, rows, &dense, &fires, Some(&always.layers[il]), precision, &mut out, &aside);
                    assert_eq!(ran.load(Ordering::Relaxed), 1, "layer {il}: the aside ran {} times beside the charged predictor", ran.load(Ordering::Relaxed));
                    // fc1's rows, then fc2's of the cold neurons (team products) or fc2's over
                    // every neuron (inside the dense gate product's parts).
                    let p = &always.layers[il];
                    let rows = team.predictor_rows - before;
                    assert!(rows == (p.rank() + cold.len()) as u64 || rows == (p.rank() + ff) as u64, "layer {il}: {rows} predictor rows");
                    assert!(out.iter().zip(&charged[0]).all(|(a, b)| a.to_bits() == b.to_bits()), "layer {il}, {precision:?}: a charged predictor changed the output");
                }
            }
        }
    }
}
