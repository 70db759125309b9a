//! Small llama-family models written by the test (random weights), run by ember and by a plain
//! f64 reference forward pass written here from the architectures' definitions. Covers what the
//! real model does not: qwen2's biases and NeoX RoPE, ReLU, untied outputs, converted types,
//! and the loader's errors.

mod common;

use common::Rng;
use ember::cpu::Precision;
use ember::engine::{Forward, Logits, Session};
use ember::gguf::{GgmlType, GgufFile, GgufWriter, Value};
use ember::model::{Model, ModelError};
use std::collections::HashMap;
use std::sync::Arc;

const E: usize = 64;
const FF: usize = 96;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HD: usize = E / HEADS;
const VOCAB: usize = 50;
const LAYERS: usize = 2;

struct Spec {
    arch: &'static str,
    /// `ember.ffn_activation`, when the file names one (else the architecture's own).
    act: Option<&'static str>,
    tied: bool,
    /// Store this tensor of layer 0 as Q5_0 (converted at load time).
    q5_tensor: Option<&'static str>,
}

/// Writes the model; returns the file and every tensor's (dequantised) values.
fn build(spec: &Spec, seed: u64) -> (Vec<u8>, HashMap<String, Vec<f32>>) {
    let mut rng = Rng(seed);
    let mut w = GgufWriter::new();
    let a = spec.arch;
    w.set("general.architecture", Value::String(a.into()));
    for (k, v) in [("block_count", LAYERS), ("embedding_length", E), ("feed_forward_length", FF), ("attention.head_count", HEADS), ("attention.head_count_kv", KV_HEADS), ("context_length", 128), ("vocab_size", VOCAB)] {
        w.set(&format!("{a}.{k}"), Value::U32(v as u32));
    }
    w.set(&format!("{a}.rope.freq_base"), Value::F32(10000.0));
    w.set(&format!("{a}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5));
    if let Some(act) = spec.act {
        w.set("ember.ffn_activation", Value::String(act.into()));
    }
    let mut values = HashMap::new();
    let mut add = |w: &mut GgufWriter, name: String, dims: &[u64], scale: f32, q5: bool| {
        let n: u64 = dims.iter().product();
        let v: Vec<f32> = rng.vec(n as usize).iter().map(|x| x * scale).collect();
        if q5 {
            let bytes = q5_0_blocks(&mut rng, n as usize);
            let mut deq = vec![0.0; n as usize];
            ember::quant::dequantize(GgmlType::Q5_0, &bytes, &mut deq).unwrap();
            w.add_tensor(&name, dims, GgmlType::Q5_0, bytes);
            values.insert(name, deq);
        } else {
            w.add_f32(&name, dims, &v);
            values.insert(name, v);
        }
    };
    let (e, ff, kv, v) = (E as u64, FF as u64, (KV_HEADS * HD) as u64, VOCAB as u64);
    add(&mut w, "token_embd.weight".into(), &[e, v], 1.0, false);
    add(&mut w, "output_norm.weight".into(), &[e], 1.0, false);
    if !spec.tied {
        add(&mut w, "output.weight".into(), &[e, v], 0.3, false);
    }
    for l in 0..LAYERS {
        let q5 = |t: &str| l == 0 && spec.q5_tensor == Some(t);
        for (t, dims, scale) in [
            ("attn_norm.weight", vec![e], 1.0),
            ("attn_q.weight", vec![e, e], 0.3),
            ("attn_k.weight", vec![e, kv], 0.3),
            ("attn_v.weight", vec![e, kv], 0.3),
            ("attn_output.weight", vec![e, e], 0.2),
            ("ffn_norm.weight", vec![e], 1.0),
            ("ffn_gate.weight", vec![e, ff], 0.3),
            ("ffn_up.weight", vec![e, ff], 0.3),
            ("ffn_down.weight", vec![ff, e], 0.2),
        ] {
            add(&mut w, format!("blk.{l}.{t}"), &dims, scale, q5(t));
        }
        if a == "qwen2" {
            add(&mut w, format!("blk.{l}.attn_q.bias"), &[e], 0.5, false);
            add(&mut w, format!("blk.{l}.attn_k.bias"), &[kv], 0.5, false);
            add(&mut w, format!("blk.{l}.attn_v.bias"), &[kv], 0.5, false);
        }
    }
    (w.to_bytes(), values)
}

/// Random Q5_0 blocks with a sane scale.
fn q5_0_blocks(rng: &mut Rng, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..n / 32 {
        out.extend_from_slice(&half::f16::from_f32(0.02 + 0.01 * rng.signed()).to_le_bytes());
        for _ in 0..20 {
            out.push(rng.next_u64() as u8);
        }
    }
    out
}

/// The architectures' definition in f64: RMSNorm, RoPE, causal GQA softmax attention, gated FFN.
fn reference_logits(spec: &Spec, w: &HashMap<String, Vec<f32>>, tokens: &[u32]) -> Vec<Vec<f64>> {
    let g = |n: &str| w[n].iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let matvec = |m: &[f64], x: &[f64], rows: usize| -> Vec<f64> {
        let cols = x.len();
        (0..rows).map(|r| (0..cols).map(|c| m[r * cols + c] * x[c]).sum()).collect()
    };
    let norm = |x: &[f64], wt: &[f64]| -> Vec<f64> {
        let rms = (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + 1e-5).sqrt();
        x.iter().zip(wt).map(|(v, w)| v / rms * w).collect()
    };
    let rope = |x: &mut [f64], pos: usize| {
        for head in x.chunks_mut(HD) {
            for i in 0..HD / 2 {
                let theta = pos as f64 * 10000f64.powf(-2.0 * i as f64 / HD as f64);
                let (a, b) = if spec.arch == "qwen2" { (i, i + HD / 2) } else { (2 * i, 2 * i + 1) };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * theta.cos() - x1 * theta.sin();
                head[b] = x0 * theta.sin() + x1 * theta.cos();
            }
        }
    };
    let kvd = KV_HEADS * HD;
    let mut xs: Vec<Vec<f64>> = tokens.iter().map(|&t| g("token_embd.weight")[t as usize * E..(t as usize + 1) * E].to_vec()).collect();
    for l in 0..LAYERS {
        let p = |t: &str| g(&format!("blk.{l}.{t}"));
        let (mut ks, mut vs, mut qs) = (vec![], vec![], vec![]);
        for (pos, x) in xs.iter().enumerate() {
            let h = norm(x, &p("attn_norm.weight"));
            let (mut q, mut k, mut v) = (matvec(&p("attn_q.weight"), &h, E), matvec(&p("attn_k.weight"), &h, kvd), matvec(&p("attn_v.weight"), &h, kvd));
            if spec.arch == "qwen2" {
                for (buf, b) in [(&mut q, p("attn_q.bias")), (&mut k, p("attn_k.bias")), (&mut v, p("attn_v.bias"))] {
                    buf.iter_mut().zip(b).for_each(|(x, b)| *x += b);
                }
            }
            rope(&mut q, pos);
            rope(&mut k, pos);
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        for (pos, x) in xs.iter_mut().enumerate() {
            let mut att = vec![0.0; E];
            for hh in 0..HEADS {
                let kvh = hh / (HEADS / KV_HEADS);
                let s: Vec<f64> = (0..=pos).map(|j| (0..HD).map(|i| qs[pos][hh * HD + i] * ks[j][kvh * HD + i]).sum::<f64>() / (HD as f64).sqrt()).collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                for i in 0..HD {
                    att[hh * HD + i] = (0..=pos).map(|j| (s[j] - m).exp() / z * vs[j][kvh * HD + i]).sum();
                }
            }
            let o = matvec(&p("attn_output.weight"), &att, E);
            x.iter_mut().zip(o).for_each(|(a, b)| *a += b);
            let h = norm(x, &p("ffn_norm.weight"));
            let (gate, up) = (matvec(&p("ffn_gate.weight"), &h, FF), matvec(&p("ffn_up.weight"), &h, FF));
            // Bamboo (PowerInfer's dReLU architecture) is dReLU unless the file says otherwise.
            let act_name = spec.act.unwrap_or(if spec.arch == "bamboo" { "drelu" } else { "silu" });
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(&g, &u)| match act_name {
                    "relu" => g.max(0.0) * u,
                    "drelu" => g.max(0.0) * u.max(0.0),
                    _ => g / (1.0 + (-g).exp()) * u,
                })
                .collect();
            let d = matvec(&p("ffn_down.weight"), &act, E);
            x.iter_mut().zip(d).for_each(|(a, b)| *a += b);
        }
    }
    let out = if spec.tied { g("token_embd.weight") } else { g("output.weight") };
    xs.iter().map(|x| matvec(&out, &norm(x, &g("output_norm.weight")), VOCAB)).collect()
}

fn check(spec: Spec) {
    let (bytes, weights) = build(&spec, 42);
    let model = Arc::new(Model::from_gguf(Arc::new(GgufFile::from_bytes(bytes).unwrap())).unwrap());
    // Q5_0 has CPU kernels of its own: nothing is converted at load, and the tensor keeps its type.
    assert!(model.conversions.is_empty(), "converted at load: {:?}", model.conversions);
    if spec.q5_tensor.is_some() {
        assert_eq!(model.layers[0].ffn_down.ty, GgmlType::Q5_0);
    }
    let tokens = [3u32, 17, 42, 0, 9, 31, 8];
    let want = reference_logits(&spec, &weights, &tokens);
    let mut session = Session::new(model.clone(), 32);
    session.precision = Precision::F32;
    let got = session.forward(&tokens, Logits::All).unwrap();
    for (t, w) in want.iter().enumerate() {
        for (v, &wv) in w.iter().enumerate() {
            let g = got[t * VOCAB + v] as f64;
            // f16 KV cache and f16 attention accumulation: about 3 significant digits.
            assert!((g - wv).abs() < 2e-2 * wv.abs().max(1.0), "{} token {t} logit {v}: {g} vs {wv}", spec.arch);
        }
    }
}

#[test]
fn llama_matches_the_reference() {
    check(Spec { arch: "llama", act: None, tied: true, q5_tensor: None });
}

#[test]
fn qwen2_biases_and_neox_rope_match_the_reference() {
    check(Spec { arch: "qwen2", act: None, tied: false, q5_tensor: None });
}

#[test]
fn relu_ffn_matches_the_reference() {
    check(Spec { arch: "mistral", act: Some("relu"), tied: false, q5_tensor: None });
}

#[test]
fn drelu_ffn_matches_the_reference() {
    check(Spec { arch: "mistral", act: Some("drelu"), tied: false, q5_tensor: None });
}

#[test]
fn bamboo_is_drelu_without_a_key() {
    check(Spec { arch: "bamboo", act: None, tied: true, q5_tensor: None });
    let (bytes, _) = build(&Spec { arch: "bamboo", act: None, tied: true, q5_tensor: None }, 42);
    let model = Model::from_gguf(Arc::new(GgufFile::from_bytes(bytes).unwrap())).unwrap();
    assert_eq!(model.hp.activation, ember::model::Activation::Drelu);
}

/// dReLU under `--ffn relu`: the sparse paths pick neurons by a positive gate and apply the
/// up value's ReLU after, so over the matrices and over the bundles they give the dense
/// logits up to summation order, and skip the neurons whose gate is not positive.
#[test]
fn drelu_sparse_ffn_matches_dense() {
    use ember::engine::{FfnMode, SparseFfn};
    let spec = Spec { arch: "bamboo", act: None, tied: false, q5_tensor: None };
    let (bytes, _) = build(&spec, 7);
    let model = Arc::new(Model::from_gguf(Arc::new(GgufFile::from_bytes(bytes).unwrap())).unwrap());
    let tokens = [3u32, 17, 42, 0, 9, 31, 8, 11];
    let mut dense = Session::new(model.clone(), 32);
    dense.precision = Precision::F32;
    let want = dense.forward(&tokens, Logits::All).unwrap();
    for bundled in [false, true] {
        let f = SparseFfn::new(&model, FfnMode::Relu, None, Vec::new(), Precision::F32, false).unwrap();
        let f = Arc::new(if bundled { f.with_bundles(&model) } else { f });
        let mut s = Session::new(model.clone(), 32);
        s.precision = Precision::F32;
        let mut s = s.with_ffn(f);
        let got = s.forward(&tokens, Logits::All).unwrap();
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "bundled {bundled}: logit {i}: {g} vs {w}");
        }
        let density = s.ffn_stats.density(FF);
        let mean = density.iter().sum::<f64>() / density.len() as f64;
        assert!(mean > 0.2 && mean < 0.8, "bundled {bundled}: mean active fraction {mean} (positive gates)");
    }
}

/// The dense GPU forward pass (lavapipe in CI) on a dReLU model: gate and up stacked, the
/// product's dReLU epilogue, against the CPU at f32 precision.
#[test]
fn drelu_on_the_gpu_matches_the_cpu() {
    use ember::engine::{GpuSession, GpuWeights};
    let Some(ctx) = common::gpu() else { return };
    let ctx = Arc::new(ctx);
    let (bytes, _) = build(&Spec { arch: "bamboo", act: None, tied: false, q5_tensor: None }, 9);
    let model = Arc::new(Model::from_gguf(Arc::new(GgufFile::from_bytes(bytes).unwrap())).unwrap());
    let tokens = [3u32, 17, 42, 0, 9, 31, 8];
    let mut cpu = Session::new(model.clone(), 32);
    cpu.precision = Precision::F32;
    let want = cpu.forward(&tokens, Logits::All).unwrap();
    let weights = Arc::new(GpuWeights::upload(&ctx, &model, false).unwrap());
    let mut gpu = GpuSession::new(model.clone(), ctx, weights, 32).unwrap();
    // The prompt as one batch, then token by token (the decode kernels and their epilogue).
    let got = gpu.forward(&tokens, Logits::All).unwrap();
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-3 * w.abs().max(1.0), "batch: logit {i}: {g} vs {w}");
    }
    gpu.reset();
    for (t, &tok) in tokens.iter().enumerate() {
        let got = gpu.forward(&[tok], Logits::Last).unwrap();
        for (v, &g) in got.iter().enumerate() {
            let w = want[t * VOCAB + v];
            assert!((g - w).abs() <= 1e-3 * w.abs().max(1.0), "decode token {t}: logit {v}: {g} vs {w}");
        }
    }
}

/// The profiler counts a dReLU neuron as firing only when gate and up are both positive.
#[test]
fn drelu_fires_only_when_both_branches_are_positive() {
    use ember::model::Activation;
    use ember::sparse::profile::fires;
    assert!(fires(Activation::Drelu, 0.5, 0.1));
    assert!(!fires(Activation::Drelu, 0.5, -0.1));
    assert!(!fires(Activation::Drelu, -0.5, 0.1));
    assert!(!fires(Activation::Drelu, 0.0, 1.0));
    assert!(fires(Activation::Relu, 0.5, -0.1), "relu ignores the up value");
    assert_eq!(ember::cpu::ops::gated(Activation::Drelu, 2.0, -3.0), 0.0);
    assert_eq!(ember::cpu::ops::gated(Activation::Drelu, 2.0, 3.0), 6.0);
    let (mut g, u) = (vec![2.0f32, -1.0, 0.5, 3.0], vec![3.0f32, 2.0, -4.0, 0.0]);
    ember::cpu::ops::gated_activation(Activation::Drelu, &mut g, &u);
    assert_eq!(g, vec![6.0, 0.0, 0.0, 0.0]);
}

#[test]
fn q5_0_weights_are_kept_native_and_still_match() {
    check(Spec { arch: "llama", act: Some("relu"), tied: true, q5_tensor: Some("ffn_down.weight") });
}

fn load_err(bytes: Vec<u8>) -> ModelError {
    match Model::from_gguf(Arc::new(GgufFile::from_bytes(bytes).unwrap())) {
        Ok(_) => panic!("model loaded"),
        Err(e) => e,
    }
}

/// Rewrites the synthetic model with one metadata key changed or one tensor dropped.
fn variant(edit: impl Fn(&str, &Value) -> Option<Value>, drop_tensor: Option<&str>) -> Vec<u8> {
    variant_with(edit, drop_tensor, None)
}

fn variant_with(edit: impl Fn(&str, &Value) -> Option<Value>, drop_tensor: Option<&str>, extra: Option<(&str, Value)>) -> Vec<u8> {
    let (bytes, _) = build(&Spec { arch: "llama", act: None, tied: true, q5_tensor: None }, 1);
    let f = GgufFile::from_bytes(bytes).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata() {
        w.set(k, edit(k, v).unwrap_or_else(|| v.clone()));
    }
    if let Some((k, v)) = extra {
        w.set(k, v);
    }
    for t in f.tensors() {
        if Some(t.name.as_str()) != drop_tensor {
            w.add_tensor(&t.name, &t.dims, t.ty, f.tensor_data(t).to_vec());
        }
    }
    w.to_bytes()
}

#[test]
fn loader_errors_name_what_is_wrong() {
    let e = load_err(variant(|_, _| None, Some("blk.1.ffn_up.weight")));
    assert!(matches!(&e, ModelError::MissingTensor(n, _) if n == "blk.1.ffn_up.weight"), "{e}");

    let e = load_err(variant(|k, _| (k == "general.architecture").then(|| Value::String("gpt-j".into())), None));
    assert!(e.to_string().contains("gpt-j") && e.to_string().contains("llama"), "{e}");

    let e = load_err(variant(|k, _| (k == "llama.feed_forward_length").then_some(Value::U32(97)), None));
    assert!(matches!(&e, ModelError::BadShape { name, .. } if name == "blk.0.ffn_gate.weight"), "{e}");

    let e = load_err(variant(|k, _| (k == "llama.attention.head_count_kv").then_some(Value::U32(3)), None));
    assert!(matches!(e, ModelError::BadHParams(_)), "{e}");

    let e = load_err(variant(|k, _| (k == "llama.block_count").then_some(Value::U32(1 << 30)), None));
    assert!(e.to_string().contains("block_count"), "{e}");

    let e = load_err(variant_with(|_, _| None, None, Some(("ember.ffn_activation", Value::String("gelu".into())))));
    assert!(matches!(&e, ModelError::BadHParams(m) if m.contains("gelu")), "{e}");
}
