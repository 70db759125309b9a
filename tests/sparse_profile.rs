//! Activation profiles, samples, predictors and predictor training, on small ReLU models
//! written by the test (and on the real ReLU model when it is present).

mod common;

use common::Rng;
use ember::cpu::Precision;
use ember::engine::{Forward, Logits, Session};
use ember::gguf::{GgmlType, GgufFile, GgufWriter, Value};
use ember::model::Model;
use ember::sparse::predictor::{Predictor, PredictorError, Predictors};
use ember::sparse::profile::{ActivationProfile, LayerSamples, NeuronId, ProfileError, Profiler, SampleCollector, SampleSet, SampleType};
use ember::sparse::train::{self, Init, TrainOptions};
use ember::sparse::FfnObserver;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const E: usize = 64;
// Not a multiple of 32: the last mask word is partly used.
const FF: usize = 80;
const LAYERS: usize = 2;
const VOCAB: usize = 50;

/// A 2-layer llama model with a ReLU FFN and random F32 weights; returns it and its weights.
fn relu_model(seed: u64) -> (Arc<Model>, HashMap<String, Vec<f32>>) {
    let mut rng = Rng(seed);
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("general.name", Value::String("tiny-relu".into()));
    for (k, v) in [("block_count", LAYERS), ("embedding_length", E), ("feed_forward_length", FF), ("attention.head_count", 4), ("attention.head_count_kv", 2), ("context_length", 256), ("vocab_size", VOCAB)] {
        w.set(&format!("llama.{k}"), Value::U32(v as u32));
    }
    w.set("llama.rope.freq_base", Value::F32(10000.0));
    w.set("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
    w.set("ember.ffn_activation", Value::String("relu".into()));
    let mut values = HashMap::new();
    let (e, ff, kv, v) = (E as u64, FF as u64, 32u64, VOCAB as u64);
    let mut add = |w: &mut GgufWriter, name: String, dims: &[u64], scale: f32, offset: f32| {
        let n: u64 = dims.iter().product();
        let vals: Vec<f32> = rng.vec(n as usize).iter().map(|x| x * scale + offset).collect();
        w.add_f32(&name, dims, &vals);
        values.insert(name, vals);
    };
    add(&mut w, "token_embd.weight".into(), &[e, v], 1.0, 0.0);
    add(&mut w, "output_norm.weight".into(), &[e], 0.2, 1.0);
    for l in 0..LAYERS {
        for (t, dims, scale, offset) in [
            ("attn_norm.weight", vec![e], 0.2, 1.0),
            ("attn_q.weight", vec![e, e], 0.3, 0.0),
            ("attn_k.weight", vec![e, kv], 0.3, 0.0),
            ("attn_v.weight", vec![e, kv], 0.3, 0.0),
            ("attn_output.weight", vec![e, e], 0.2, 0.0),
            ("ffn_norm.weight", vec![e], 0.2, 1.0),
            ("ffn_gate.weight", vec![e, ff], 0.3, 0.0),
            ("ffn_up.weight", vec![e, ff], 0.3, 0.0),
            ("ffn_down.weight", vec![ff, e], 0.2, 0.0),
        ] {
            add(&mut w, format!("blk.{l}.{t}"), &dims, scale, offset);
        }
    }
    let model = Model::from_gguf(Arc::new(GgufFile::from_bytes(w.to_bytes()).unwrap())).unwrap();
    (Arc::new(model), values)
}

/// One call of the hook: layer, residual, gate pre-activation.
type Seen = (usize, Vec<f32>, Vec<f32>);

/// Keeps everything the hook shows.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Seen>>>);

impl FfnObserver for Recorder {
    fn observe(&mut self, layer: usize, resid: &[f32], gate_pre: &[f32], _up_pre: &[f32]) {
        self.0.lock().unwrap().push((layer, resid.to_vec(), gate_pre.to_vec()));
    }
}

/// Windows of random tokens.
fn windows(seed: u64, n: usize, len: usize) -> Vec<Vec<u32>> {
    let mut rng = Rng(seed);
    (0..n).map(|_| (0..len).map(|_| (rng.next_u64() % VOCAB as u64) as u32).collect()).collect()
}

fn run(model: &Arc<Model>, observer: Box<dyn FfnObserver>, wins: &[Vec<u32>]) {
    let mut s = Session::new(model.clone(), 64);
    s.precision = Precision::F32;
    s.observer = Some(observer);
    for w in wins {
        s.reset();
        s.forward(w, Logits::All).unwrap();
    }
}

/// Per layer, in stream order: (resid, gate_pre) of every token.
fn record(model: &Arc<Model>, wins: &[Vec<u32>]) -> Vec<Vec<(Vec<f32>, Vec<f32>)>> {
    let rec = Recorder::default();
    run(model, Box::new(rec.clone()), wins);
    let mut per_layer = vec![Vec::new(); LAYERS];
    for (l, r, g) in rec.0.lock().unwrap().drain(..) {
        per_layer[l].push((r, g));
    }
    per_layer
}

#[test]
fn counts_equal_a_brute_force_recount() {
    let (model, weights) = relu_model(7);
    let wins = windows(1, 3, 21);
    let shared = Profiler::for_model(&model).shared();
    run(&model, Box::new(shared.clone()), &wins);
    let rec = record(&model, &wins);
    let p = &shared.lock().unwrap().profile;
    assert_eq!(p.model_name, "tiny-relu");
    assert_eq!(p.n_tokens(), 63);
    assert_eq!(p.layer_tokens, vec![63; LAYERS]);
    let mut zeros = 0usize;
    for l in 0..LAYERS {
        let mut want = vec![0u32; FF];
        for (resid, gate) in &rec[l] {
            for (i, &g) in gate.iter().enumerate() {
                want[i] += (g > 0.0) as u32;
                zeros += (g <= 0.0) as usize;
            }
            // The hook's input is the residual stream before ffn_norm: the gate is
            // gate · rmsnorm(resid), recomputed here in f64 from the weights.
            let rms = (resid.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / E as f64 + 1e-5).sqrt();
            let (gw, nw) = (&weights[&format!("blk.{l}.ffn_gate.weight")], &weights[&format!("blk.{l}.ffn_norm.weight")]);
            for (i, &g) in gate.iter().enumerate() {
                let r: f64 = (0..E).map(|j| gw[i * E + j] as f64 * nw[j] as f64 * resid[j] as f64 / rms).sum();
                assert!((r - g as f64).abs() < 1e-3 * (1.0 + r.abs()), "layer {l} neuron {i}: {r} vs {g}");
            }
        }
        assert_eq!(p.counts[l], want, "layer {l}");
    }
    let mean_sparsity = (0..LAYERS).map(|l| p.sparsity(l)).sum::<f64>() / LAYERS as f64;
    assert!((mean_sparsity - zeros as f64 / (63 * FF * LAYERS) as f64).abs() < 1e-12);
    // Summary: coverage counts are monotone and bounded.
    for s in p.summary() {
        assert!(s.cover50 <= s.cover80 && s.cover80 <= s.cover95 && s.cover95 <= FF, "{s:?}");
        assert!((s.active_per_token - (1.0 - s.sparsity) * FF as f64).abs() < 1e-9);
    }
}

#[test]
fn top_k_is_exact_with_ties() {
    let mut rng = Rng(3);
    let mut p = ActivationProfile::new("m", 3, 40);
    for c in p.counts.iter_mut().flatten() {
        *c = (rng.next_u64() % 5) as u32;
    }
    p.layer_tokens = vec![10; 3];
    let mut all: Vec<(u32, NeuronId)> = Vec::new();
    for (l, c) in p.counts.iter().enumerate() {
        for (i, &v) in c.iter().enumerate() {
            all.push((v, NeuronId { layer: l as u32, index: i as u32 }));
        }
    }
    all.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for k in [0, 1, 7, 39, 40, 41, 64, 119, 120, 500] {
        let want: Vec<NeuronId> = all.iter().take(k).map(|x| x.1).collect();
        assert_eq!(p.top_k(k), want, "k = {k}");
        let per = p.top_k_per_layer(k);
        assert_eq!(per.iter().map(Vec::len).sum::<usize>(), k.min(120));
        assert!(per.iter().all(|v| v.windows(2).all(|w| w[0] < w[1])));
    }
    assert_eq!(p.top_k_coverage(120), 1.0);
}

#[test]
fn profile_round_trips_and_rejects_bad_files() {
    let (model, _) = relu_model(9);
    let shared = Profiler::for_model(&model).shared();
    run(&model, Box::new(shared.clone()), &windows(2, 2, 17));
    let mut p = shared.lock().unwrap().profile.clone();
    p.source = "two windows".into();
    let dir = std::env::temp_dir().join(format!("ember-sparse-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("p.profile.gguf");
    p.save(&path).unwrap();
    assert_eq!(ActivationProfile::load(&path).unwrap(), p);

    let mut twice = p.clone();
    twice.merge(&p).unwrap();
    assert_eq!(twice.n_tokens(), 2 * p.n_tokens());
    assert_eq!(twice.sparsity(1), p.sparsity(1));
    assert!(matches!(twice.merge(&ActivationProfile::new("x", 3, FF)), Err(ProfileError::Mismatch(_))));

    // A count above the layer's tokens is corruption.
    let f = GgufFile::from_bytes(p.to_gguf().unwrap().to_bytes()).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata() {
        w.set(k, v.clone());
    }
    for t in f.tensors() {
        let mut data = f.tensor_data(t).to_vec();
        if t.name == "blk.1.act_count" {
            data[..4].copy_from_slice(&1000i32.to_le_bytes());
        }
        w.add_tensor(&t.name, &t.dims, t.ty, data);
    }
    let e = ActivationProfile::from_gguf(&GgufFile::from_bytes(w.to_bytes()).unwrap()).unwrap_err();
    assert!(matches!(&e, ProfileError::BadTensor { name, .. } if name == "blk.1.act_count"), "{e}");
    // A model is not a profile.
    let e = ActivationProfile::from_gguf(&model.file).unwrap_err();
    assert!(matches!(e, ProfileError::WrongKind { .. }), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn samples_hold_the_hooks_inputs_and_firing_masks() {
    let (model, _) = relu_model(11);
    let wins = windows(4, 3, 20);
    let rec = record(&model, &wins);
    let dir = std::env::temp_dir().join(format!("ember-sparse-samples-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut kept = Vec::new();
    for (ty, seed) in [(SampleType::F32, 5), (SampleType::F16, 5), (SampleType::F32, 6)] {
        let shared = Profiler::for_model(&model).with_samples(E, 25, ty, seed).shared();
        run(&model, Box::new(shared.clone()), &wins);
        let p = shared.lock().unwrap();
        let col = p.samples.as_ref().unwrap();
        let layers = col.finish();
        for (l, s) in layers.iter().enumerate() {
            assert_eq!(s.n, 25);
            assert_eq!(s.tokens, layers[0].tokens, "every layer keeps the same tokens");
            assert!(s.tokens.windows(2).all(|w| w[0] < w[1]) && *s.tokens.last().unwrap() < 60);
            for t in 0..s.n {
                let (resid, gate) = &rec[l][s.tokens[t] as usize];
                for (a, &b) in s.resid_row(t).iter().zip(resid) {
                    let tol = if ty == SampleType::F16 { 1e-3 * b.abs() + 1e-7 } else { 0.0 };
                    assert!((a - b).abs() <= tol, "layer {l} token {t}: {a} vs {b}");
                }
                for (i, &g) in gate.iter().enumerate() {
                    assert_eq!(s.fired(t, i), g > 0.0, "layer {l} token {t} neuron {i}");
                }
                assert_eq!(s.mask(t)[2] >> 16, 0, "no bits past neuron {FF}");
            }
        }
        // Through the file.
        let path = dir.join("s.samples.gguf");
        col.save(&path, "tiny-relu").unwrap();
        let set = SampleSet::open(&path).unwrap();
        assert_eq!((set.n_layer, set.n_embd, set.n_ff, set.n, set.n_tokens_seen), (LAYERS, E, FF, 25, 60));
        for (l, s) in layers.iter().enumerate() {
            assert_eq!(&set.layer(l).unwrap(), s);
        }
        assert!(matches!(ActivationProfile::load(&path), Err(ProfileError::WrongKind { .. })));
        kept.push(layers[0].tokens.clone());
    }
    assert_eq!(kept[0], kept[1], "same seed, same tokens");
    assert_ne!(kept[0], kept[2], "another seed, another sample");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sampling_is_uniform() {
    // Each of 50 positions is kept with probability 10/50 over many seeds.
    let mut hits = [0u32; 50];
    let seeds = 2000;
    for seed in 0..seeds {
        let mut c = SampleCollector::new(1, 1, 1, 10, SampleType::F32, seed);
        for _ in 0..50 {
            c.offer(0, ember::model::Activation::Relu, &[0.0], &[1.0], &[1.0]);
        }
        for t in &c.finish()[0].tokens {
            hits[*t as usize] += 1;
        }
    }
    for (pos, &h) in hits.iter().enumerate() {
        let rate = h as f64 / seeds as f64;
        assert!((rate - 0.2).abs() < 0.035, "position {pos} kept at rate {rate}");
    }
}

fn predictor_values(rng: &mut Rng, rank: usize, d: usize, ff: usize) -> (Vec<f32>, Vec<f32>) {
    (rng.vec(rank * d), rng.vec(ff * rank))
}

#[test]
fn predictors_round_trip_through_gguf() {
    let mut rng = Rng(17);
    let (d, ff) = (64, 80);
    let mut layers = Vec::new();
    for (rank, ty, th) in [(32, GgmlType::F32, 0.5f32), (7, GgmlType::F16, -1.25), (64, GgmlType::Q8_0, 0.0)] {
        let (a, b) = predictor_values(&mut rng, rank, d, ff);
        layers.push(Predictor::from_f32(&a, &b, rank, d, ff, th, ty).unwrap());
    }
    // fc1 of Q8_0 has rows of 64 (whole blocks); fc2's rows of 64 too.
    assert_eq!((layers[2].fc1.ty, layers[2].fc2.ty), (GgmlType::Q8_0, GgmlType::Q8_0));
    let preds = Predictors { layers, model_name: "tiny".into() };
    let back = Predictors::from_gguf(Arc::new(GgufFile::from_bytes(preds.to_gguf().to_bytes()).unwrap())).unwrap();
    assert_eq!(back.model_name, "tiny");
    assert_eq!(back.layers.len(), 3);
    let x = rng.vec(d);
    for (a, b) in preds.layers.iter().zip(&back.layers) {
        assert_eq!((a.rank(), a.fc1.ty, a.fc2.ty, a.threshold), (b.rank(), b.fc1.ty, b.fc2.ty, b.threshold));
        assert_eq!(a.fc1.bytes(), b.fc1.bytes());
        assert_eq!(a.fc2.bytes(), b.fc2.bytes());
        let (mut la, mut lb) = (vec![0.0; ff], vec![0.0; ff]);
        a.predict(&x, &mut la);
        b.predict(&x, &mut lb);
        assert_eq!(la, lb);
        let mut ids = Vec::new();
        b.active(&x, &mut ids);
        assert_eq!(ids, (0..ff as u32).filter(|&i| lb[i as usize] >= b.threshold).collect::<Vec<_>>());
    }
    // F32 predictions are fc2 · relu(fc1 · x), up to float rounding.
    let p = &preds.layers[0];
    let (a, b) = (p.fc1.bytes(), p.fc2.bytes());
    let (w1, w2): (&[f32], &[f32]) = (bytemuck::cast_slice(a), bytemuck::cast_slice(b));
    let h: Vec<f64> = (0..32).map(|r| (0..d).map(|j| w1[r * d + j] as f64 * x[j] as f64).sum::<f64>().max(0.0)).collect();
    let mut got = vec![0.0; ff];
    p.predict(&x, &mut got);
    for i in 0..ff {
        let want: f64 = (0..32).map(|r| w2[i * 32 + r] as f64 * h[r]).sum();
        assert!((want - got[i] as f64).abs() < 1e-3, "neuron {i}");
    }
    // Batched = one by one.
    let xs = rng.vec(3 * d);
    let mut batch = vec![0.0; 3 * ff];
    p.predict_batch(&xs, &mut batch);
    for t in 0..3 {
        let mut one = vec![0.0; ff];
        p.predict(&xs[t * d..(t + 1) * d], &mut one);
        assert_eq!(one, batch[t * ff..(t + 1) * ff]);
    }

    // PowerInfer's single threshold; no per-layer array.
    let mut w = GgufWriter::new();
    w.set("powerinfer.sparse_threshold", Value::F32(0.25));
    for (l, p) in preds.layers.iter().enumerate() {
        w.add_tensor(&format!("blk.{l}.fc1.weight"), &[d as u64, p.rank() as u64], p.fc1.ty, p.fc1.bytes().to_vec());
        w.add_tensor(&format!("blk.{l}.fc2.weight"), &[p.rank() as u64, ff as u64], p.fc2.ty, p.fc2.bytes().to_vec());
    }
    let pi = Predictors::from_gguf(Arc::new(GgufFile::from_bytes(w.to_bytes()).unwrap())).unwrap();
    assert!(pi.layers.iter().all(|p| p.threshold == 0.25));

    // A layer without fc2, and a file without predictors.
    let mut w = GgufWriter::new();
    let p0 = &preds.layers[0];
    w.add_tensor("blk.0.fc1", &[d as u64, 32], GgmlType::F32, p0.fc1.bytes().to_vec());
    let e = Predictors::from_gguf(Arc::new(GgufFile::from_bytes(w.to_bytes()).unwrap())).unwrap_err();
    assert!(matches!(e, PredictorError::BadLayer { layer: 0, .. }), "{e}");
    let (model, _) = relu_model(1);
    assert!(matches!(Predictors::from_gguf(model.file.clone()), Err(PredictorError::NoPredictors(_))));
    assert!(preds.check_model(&model.hp).is_err());
}

#[test]
fn always_on_predicts_every_neuron() {
    let preds = Predictors::always_on(LAYERS, E, FF);
    let (model, _) = relu_model(2);
    preds.check_model(&model.hp).unwrap();
    let mut ids = Vec::new();
    for p in &preds.layers {
        p.active(&Rng(4).vec(E), &mut ids);
        assert_eq!(ids, (0..FF as u32).collect::<Vec<_>>());
    }
    let back = Predictors::from_gguf(Arc::new(GgufFile::from_bytes(preds.to_gguf().to_bytes()).unwrap())).unwrap();
    back.layers[1].active(&[0.0; E], &mut ids);
    assert_eq!(ids.len(), FF);
}

/// Tokens whose firing follows a rank-`k` map of the normalised input plus per-neuron offsets
/// (inputs share a common direction, as residual streams do): a predictor of the format can
/// represent it exactly.
fn low_rank_problem(seed: u64, n: usize, d: usize, ff: usize, k: usize) -> (LayerSamples, Vec<f32>) {
    let mut rng = Rng(seed);
    let common = rng.vec(d);
    let v = rng.vec(k * d);
    let u = rng.vec(ff * k);
    let offset: Vec<f32> = (0..ff).map(|_| rng.signed() * 2.0 - 1.0).collect();
    let words = ff.div_ceil(32);
    let mut s = LayerSamples { n, n_embd: d, n_ff: ff, resid: Vec::new(), masks: vec![0; n * words], tokens: (0..n as u64).collect() };
    for t in 0..n {
        let scale = 0.5 + 3.0 * (rng.signed().abs());
        let x: Vec<f32> = (0..d).map(|j| (2.0 * common[j] + rng.signed()) * scale).collect();
        let norm = (x.iter().map(|a| a * a).sum::<f32>() / d as f32).sqrt();
        let h: Vec<f32> = (0..k).map(|r| (0..d).map(|j| v[r * d + j] * x[j]).sum::<f32>() / norm).collect();
        for i in 0..ff {
            let logit: f32 = (0..k).map(|r| u[i * k + r] * h[r]).sum::<f32>() / (k as f32).sqrt() + offset[i] * 2.0;
            if logit > 0.0 {
                s.masks[t * words + i / 32] |= 1 << (i % 32);
            }
        }
        s.resid.extend_from_slice(&x);
    }
    // The exact linear part, as a "gate" for the gate-based start.
    let mut g = vec![0.0f32; ff * d];
    for i in 0..ff {
        for j in 0..d {
            g[i * d + j] = (0..k).map(|r| u[i * k + r] * v[r * d + j]).sum();
        }
    }
    (s, g)
}

fn small_opts(seed: u64) -> TrainOptions {
    TrainOptions { ranks: vec![8, 16, 32], epochs: 12, batch: 128, seed, ty: GgmlType::F32, ..TrainOptions::default() }
}

#[test]
fn training_reaches_the_recall_target_on_a_low_rank_problem() {
    let (d, ff) = (48, 96);
    let (data, g) = low_rank_problem(21, 3000, d, ff, 4);
    let truth = data.active_fraction();
    assert!(truth > 0.2 && truth < 0.8, "{truth}");
    for (init, gate) in [(Init::Random, None), (Init::Gate, Some(g.as_slice()))] {
        let opts = TrainOptions { init, ..small_opts(1) };
        let (p, r) = train::train_layer(0, &data, gate, &opts).unwrap();
        assert!(r.recall >= 0.985, "{init:?}: held-out recall {} ({r:?})", r.recall);
        assert!(r.predicted_active < truth + 0.15, "{init:?}: predicts {} active, truth {truth} ({r:?})", r.predicted_active);
        // From the gate's exact linear part, the copy is nearly perfect.
        let min_precision = if init == Init::Gate { 0.9 } else { 0.7 };
        assert!(r.precision > min_precision, "{init:?}: {r:?}");
        assert_eq!(p.rank(), r.rank);
        assert_eq!((r.n_train + r.n_val + r.n_test), 3000);
        assert!(!r.trials.is_empty() && r.trials.iter().any(|t| t.rank == r.rank));
    }
}

#[test]
fn training_is_deterministic() {
    let (d, ff) = (32, 64);
    let (data, g) = low_rank_problem(5, 1200, d, ff, 3);
    let opts = TrainOptions { ranks: vec![8, 16], epochs: 4, ..small_opts(9) };
    let (a, ra) = train::train_layer(3, &data, Some(&g), &opts).unwrap();
    let (b, rb) = train::train_layer(3, &data, Some(&g), &opts).unwrap();
    assert_eq!(a.fc1.bytes(), b.fc1.bytes());
    assert_eq!(a.fc2.bytes(), b.fc2.bytes());
    assert_eq!(a.threshold, b.threshold);
    assert_eq!((ra.recall, ra.predicted_active), (rb.recall, rb.predicted_active));
    let (c, _) = train::train_layer(3, &data, Some(&g), &TrainOptions { seed: 10, ..opts.clone() }).unwrap();
    assert_ne!(a.fc2.bytes(), c.fc2.bytes(), "another seed trains another predictor");
    // Too few samples is an error, not a panic.
    let tiny = LayerSamples { n: 5, ..data.clone() };
    assert!(matches!(train::train_layer(0, &tiny, None, &opts), Err(train::TrainError::TooFewSamples { .. })));
}

#[test]
fn whole_model_training_from_a_samples_file() {
    // The synthetic model's samples through the file, trained for every layer.
    let (model, _) = relu_model(13);
    let shared = Profiler::for_model(&model).with_samples(E, 400, SampleType::F16, 1).shared();
    run(&model, Box::new(shared.clone()), &windows(8, 10, 50));
    let dir = std::env::temp_dir().join(format!("ember-sparse-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("t.samples.gguf");
    shared.lock().unwrap().samples.as_ref().unwrap().save(&path, "tiny-relu").unwrap();
    let set = SampleSet::open(&path).unwrap();
    let opts = TrainOptions { ranks: vec![16, 32], epochs: 6, batch: 64, ..TrainOptions::default() };
    let (preds, reports) = train::train(std::slice::from_ref(&set), Some(&model), &opts, &|_| {}).unwrap();
    preds.check_model(&model.hp).unwrap();
    assert_eq!(preds.model_name, "tiny-relu");
    assert_eq!(reports.len(), LAYERS);
    for r in &reports {
        // 60 held-out tokens: the recall estimate is coarse.
        assert!(r.recall > 0.95, "{r:?}");
        assert!(r.predicted_active < 1.0 && r.predicted_active >= r.true_active * 0.9, "{r:?}");
    }
    let out = dir.join("t.predictors.gguf");
    preds.save(&out).unwrap();
    let back = Predictors::load(&out).unwrap();
    assert_eq!(back.n_bytes(), preds.n_bytes());
    // Measured on every sampled token (training ones included): recall stays high.
    let m = train::evaluate(&back, &set).unwrap();
    assert_eq!(m.len(), LAYERS);
    assert!(m.iter().all(|m| m.recall > 0.95 && m.predicted >= m.truth * 0.9), "{m:?}");
    // One thread gives the same bytes as many.
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let (again, _) = one.install(|| train::train(std::slice::from_ref(&set), Some(&model), &opts, &|_| {})).unwrap();
    for (a, b) in preds.layers.iter().zip(&again.layers) {
        assert_eq!((a.fc1.bytes(), a.fc2.bytes(), a.threshold), (b.fc1.bytes(), b.fc2.bytes(), b.threshold));
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn real_relu_model_zero_fraction_matches_its_card() {
    let Some(path) = common::relu_model() else { return };
    let model = Arc::new(Model::load(&path).unwrap());
    let tok = ember::tokenizer::Tokenizer::from_gguf(&model.file).unwrap();
    let text = std::fs::read_to_string(path.parent().unwrap().join("eval-text/english_heldout.txt")).unwrap();
    let tokens = tok.encode(&text, true, false).unwrap();
    let shared = Profiler::for_model(&model).shared();
    let mut s = Session::new(model.clone(), 128);
    s.observer = Some(Box::new(shared.clone()));
    s.forward(&tokens[..128], Logits::All).unwrap();
    let p = &shared.lock().unwrap().profile;
    assert_eq!(p.n_tokens(), 128);
    let per: Vec<f64> = (0..p.n_layer()).map(|l| p.sparsity(l)).collect();
    let mean = per.iter().sum::<f64>() / per.len() as f64;
    // The card: 0.762 on the whole English text, layers from 0.629 to 0.890.
    assert!((0.70..0.83).contains(&mean), "mean zero fraction {mean}");
    assert!(per.iter().all(|&z| (0.5..0.95).contains(&z)), "{per:?}");
}

/// A Q8_0 predictor's logits (fc1 by 8-bit integer dots, then the transposed fc2's rows of
/// the non-zero hidden units summed) stay close to `fc2 · relu(fc1 · x)` over its own
/// dequantised weights in f64: the re-quantised transpose and the 8-bit input cost little.
#[test]
fn q8_0_predictor_logits_follow_the_f64_formula() {
    let mut rng = Rng(18);
    let (rank, d, ff) = (64, 96, 160);
    let (a, b) = predictor_values(&mut rng, rank, d, ff);
    let p = Predictor::from_f32(&a, &b, rank, d, ff, 0.0, GgmlType::Q8_0).unwrap();
    assert_eq!((p.fc1.ty, p.fc2.ty), (GgmlType::Q8_0, GgmlType::Q8_0));
    assert!(p.cpu_bytes() >= p.n_bytes() * 9 / 10 && p.cpu_bytes() <= p.n_bytes() * 11 / 10, "{} vs {}", p.cpu_bytes(), p.n_bytes());
    let w1: Vec<f32> = (0..rank).flat_map(|r| p.fc1.row_f32(r)).collect();
    let w2: Vec<f32> = (0..ff).flat_map(|i| p.fc2.row_f32(i)).collect();
    for _ in 0..4 {
        let x = rng.vec(d);
        let h: Vec<f64> = (0..rank).map(|r| (0..d).map(|j| w1[r * d + j] as f64 * x[j] as f64).sum::<f64>().max(0.0)).collect();
        // Some hidden units are silenced by the ReLU, so the sum skips rows.
        assert!(h.contains(&0.0) && h.iter().any(|&v| v > 0.0));
        let want: Vec<f64> = (0..ff).map(|i| (0..rank).map(|r| w2[i * rank + r] as f64 * h[r]).sum()).collect();
        let mut got = vec![0.0; ff];
        p.predict(&x, &mut got);
        let scale = want.iter().map(|v| v * v).sum::<f64>().sqrt() / (ff as f64).sqrt();
        for i in 0..ff {
            assert!((want[i] - got[i] as f64).abs() < 0.03 * scale, "neuron {i}: {} vs {}", got[i], want[i]);
        }
    }
}

/// TurboSparse's accounting on a real profile of the tiny ReLU model, against a hand count of
/// its tensors: always active = the embedding table whole + the output norm + per layer the
/// attention norms, q, k, v, o and the FFN norm; a firing neuron = a gate row, an up row and a
/// down column (3 x E parameters).
#[test]
fn activated_parameters_equal_a_hand_count() {
    use ember::sparse::accounting::ParamCounts;
    let (model, _) = relu_model(7);
    let shared = Profiler::for_model(&model).shared();
    run(&model, Box::new(shared.clone()), &windows(1, 3, 21));
    let p = shared.lock().unwrap().profile.clone();
    let (e, ff, kv, v) = (E as u64, FF as u64, 32u64, VOCAB as u64);
    let per_layer = e + e * e + e * kv + e * kv + e * e + e;
    let always = e * v + e + LAYERS as u64 * per_layer;
    assert_eq!(always, 28_096);
    let counts = ParamCounts::of(&model.file, LAYERS, FF);
    assert_eq!(counts, ParamCounts { always, ffn: vec![3 * e * ff; LAYERS], n_ff: ff });
    let got = counts.activated_by(&p);
    let fired: Vec<f64> = p.counts.iter().map(|c| c.iter().map(|&n| f64::from(n)).sum::<f64>() / 63.0).collect();
    let want = always as f64 + fired.iter().map(|f| f * (3 * e) as f64).sum::<f64>();
    assert!((got.per_token - want).abs() < 1e-6 * want, "{} vs {want}", got.per_token);
    assert_eq!(got.total, always + 2 * 3 * e * ff);
    for (l, f) in got.ffn_fraction.iter().enumerate() {
        assert!((f - fired[l] / FF as f64).abs() < 1e-12, "layer {l}");
        assert!(*f > 0.05 && *f < 0.95, "layer {l}: a random ReLU layer fires on some neurons, not all: {f}");
    }
    let line = got.summary();
    assert!(line.contains("of 58.82 K parameters per token"), "{line}");
    // Predictors and a transposed copy of down are not parameters; a file holding only the
    // transposed down counts it as the down matrix.
    let named = [("token_embd.weight", 10u64), ("blk.0.ffn_gate.weight", 30), ("blk.0.ffn_up.weight", 30), ("blk.0.ffn_down.weight", 30), ("blk.0.ffn_down_t.weight", 30), ("blk.0.fc1.weight", 7), ("blk.0.fc2.weight", 7), ("blk.0.ffn_gate_inp.weight", 4), ("blk.1.ffn_up.weight", 30), ("blk.1.ffn_down_t.weight", 30)];
    let c = ParamCounts::from_tensors(named.iter().copied(), 2, 10);
    assert_eq!(c, ParamCounts { always: 14, ffn: vec![90, 60], n_ff: 10 });
    let a = c.activated(&[2.0, 5.0]);
    assert_eq!(a.per_token, 14.0 + 2.0 * 9.0 + 5.0 * 6.0);
    assert_eq!(a.ffn_fraction, vec![0.2, 0.5]);
}
