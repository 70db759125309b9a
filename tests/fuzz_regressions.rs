//! The fuzz targets' seeds and their findings (see FUZZING.md).
//!
//! Each target's per-input work lives in `fuzz/checks.rs`, included here, so a kept input replays
//! through exactly the code the fuzzer ran: `seeds_pass_every_target` runs the seed corpora
//! (small files built here from the project's own writers, metadata taken from the real model),
//! and `kept_fuzz_inputs_replay` every input kept under `tests/fuzz_inputs/<target>/`.
//! `write_fuzz_seed_corpora` writes the seeds for a campaign when `EMBER_FUZZ_CORPUS` names a
//! folder (one sub-folder per target).

mod common;

#[path = "../fuzz/checks.rs"]
mod checks;

use common::Rng;
use ember::gguf::{GgmlType, GgufFile, GgufWriter, Magic, Value, ValueType};
use ember::model::Activation;
use ember::sparse::powerinfer::split_file;
use ember::sparse::predictor::{Predictor, Predictors};
use ember::sparse::profile::{samples_gguf, ActivationProfile, SampleCollector, SampleType};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Tokens kept from the real vocabulary in a tiny model: its specials and the first merges'
/// pieces, a few KiB of metadata instead of the real 1.5 MiB.
const SEED_VOCAB: usize = 400;

/// The real model's metadata with the vocabulary cut to its first `SEED_VOCAB` tokens (merges
/// kept only where both halves and the result survive), or a minimal gpt2 vocabulary when the
/// model is absent.
fn seed_metadata() -> Vec<(String, Value)> {
    let Some(path) = common::default_model() else {
        let tokens: Vec<Value> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "Ġ", "ab", "Ġa"].iter().map(|t| Value::String(t.to_string())).collect();
        return vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
            ("tokenizer.ggml.tokens".into(), Value::Array(ValueType::String, tokens)),
            ("tokenizer.ggml.merges".into(), Value::Array(ValueType::String, vec![Value::String("a b".into()), Value::String("Ġ a".into())])),
        ];
    };
    let f = GgufFile::open(path).unwrap();
    let tokens: Vec<String> = f.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap()[..SEED_VOCAB].iter().map(|v| v.as_str().unwrap().to_string()).collect();
    let kept: std::collections::HashSet<&str> = tokens.iter().map(String::as_str).collect();
    let mut out = Vec::new();
    for (k, v) in f.metadata() {
        let v = match (k.as_str(), v) {
            ("tokenizer.ggml.tokens", _) => Value::Array(ValueType::String, tokens.iter().map(|t| Value::String(t.clone())).collect()),
            ("tokenizer.ggml.token_type" | "tokenizer.ggml.scores", Value::Array(t, items)) => Value::Array(*t, items[..SEED_VOCAB].to_vec()),
            ("tokenizer.ggml.merges", Value::Array(t, items)) => Value::Array(
                *t,
                items
                    .iter()
                    .filter(|m| {
                        let m = m.as_str().unwrap_or("");
                        m.split_once(' ').is_some_and(|(a, b)| kept.contains(a) && kept.contains(b) && kept.contains(format!("{a}{b}").as_str()))
                    })
                    .cloned()
                    .collect(),
            ),
            _ => v.clone(),
        };
        out.push((k.clone(), v));
    }
    out
}

/// A tiny model: the seed metadata with a small shape, and random weights of type `ty`.
fn tiny_model(meta: &[(String, Value)], arch: &str, ty: GgmlType, relu: bool, rng: &mut Rng) -> GgufWriter {
    let (e, ff, heads, kv_heads, layers) = (32u64, 64u64, 2u64, 1u64, 2u64);
    let vocab = meta.iter().find(|(k, _)| k == "tokenizer.ggml.tokens").and_then(|(_, v)| v.as_array()).map_or(8, |a| a.len()) as u64;
    let mut w = GgufWriter::new();
    for (k, v) in meta {
        if !k.starts_with("llama.") && k != "general.architecture" {
            w.set(k, v.clone());
        }
    }
    w.set("general.architecture", Value::String(arch.into()));
    for (k, v) in [("block_count", layers), ("embedding_length", e), ("feed_forward_length", ff), ("attention.head_count", heads), ("attention.head_count_kv", kv_heads), ("context_length", 64), ("vocab_size", vocab)] {
        w.set(&format!("{arch}.{k}"), Value::U32(v as u32));
    }
    w.set(&format!("{arch}.rope.freq_base"), Value::F32(10000.0));
    w.set(&format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5));
    if relu {
        w.set("ember.ffn_activation", Value::String("relu".into()));
    }
    let hd = e / heads;
    let mut add = |w: &mut GgufWriter, name: String, dims: &[u64], ty: GgmlType| {
        let n: u64 = dims.iter().product();
        let v: Vec<f32> = rng.vec(n as usize).iter().map(|x| x * 0.3).collect();
        let bytes: Vec<u8> = match ty {
            GgmlType::F16 => v.iter().flat_map(|&x| ember::quant::f16::from_f32(x).to_le_bytes()).collect(),
            GgmlType::Q8_0 => bytemuck::cast_slice(&ember::quant::quantize_q8_0(&v)).to_vec(),
            GgmlType::Q4_0 => bytemuck::cast_slice(&ember::quant::quantize_q4_0(&v)).to_vec(),
            _ => bytemuck::cast_slice(&v).to_vec(),
        };
        w.add_tensor(&name, dims, ty, bytes);
    };
    add(&mut w, "token_embd.weight".into(), &[e, vocab], ty);
    add(&mut w, "output_norm.weight".into(), &[e], GgmlType::F32);
    for l in 0..layers {
        for (t, dims) in [
            ("attn_norm.weight", vec![e]),
            ("ffn_norm.weight", vec![e]),
        ] {
            add(&mut w, format!("blk.{l}.{t}"), &dims, GgmlType::F32);
        }
        for (t, dims) in [
            ("attn_q.weight", vec![e, e]),
            ("attn_k.weight", vec![e, kv_heads * hd]),
            ("attn_v.weight", vec![e, kv_heads * hd]),
            ("attn_output.weight", vec![e, e]),
            ("ffn_gate.weight", vec![e, ff]),
            ("ffn_up.weight", vec![e, ff]),
            ("ffn_down.weight", vec![ff, e]),
        ] {
            add(&mut w, format!("blk.{l}.{t}"), &dims, ty);
        }
        if arch == "qwen2" {
            for (t, n) in [("attn_q.bias", e), ("attn_k.bias", kv_heads * hd), ("attn_v.bias", kv_heads * hd)] {
                add(&mut w, format!("blk.{l}.{t}"), &[n], GgmlType::F32);
            }
        }
    }
    w
}

/// Random predictors for a model of this shape.
fn predictors(rng: &mut Rng, n_layer: usize, n_embd: usize, n_ff: usize, rank: usize) -> Predictors {
    let layers = (0..n_layer)
        .map(|_| Predictor::from_f32(&rng.vec(rank * n_embd), &rng.vec(n_ff * rank), rank, n_embd, n_ff, 0.0, GgmlType::F32).unwrap())
        .collect();
    Predictors { layers, model_name: "tiny".into() }
}

/// Every target's seeds: (target, name, bytes).
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut rng = Rng(13);
    let meta = seed_metadata();
    let mut out: Vec<(&'static str, String, Vec<u8>)> = Vec::new();

    // model_load: tiny models of each architecture and several weight types.
    for (arch, ty, relu) in [("llama", GgmlType::F32, false), ("llama", GgmlType::Q8_0, true), ("qwen2", GgmlType::F16, false), ("llama", GgmlType::Q4_0, false)] {
        let bytes = tiny_model(&meta, arch, ty, relu, &mut rng).to_bytes();
        out.push(("model_load", format!("tiny-{arch}-{ty:?}{}", if relu { "-relu" } else { "" }), bytes));
    }
    // A SentencePiece vocabulary (byte tokens, scores), which the real models lack.
    let mut spm: Vec<(String, Value)> = meta.iter().filter(|(k, _)| !k.starts_with("tokenizer.")).cloned().collect();
    let mut toks = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
    let mut types = vec![2i32, 3, 3];
    for b in 0..=255u8 {
        toks.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    for t in ["▁", "▁a", "▁the", "a", "e", "t", "h", "th", "he"] {
        toks.push(t.into());
        types.push(1);
    }
    let scores: Vec<Value> = (0..toks.len()).map(|i| Value::F32(-(i as f32))).collect();
    spm.extend([
        ("tokenizer.ggml.model".to_string(), Value::String("llama".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(ValueType::String, toks.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.scores".into(), Value::Array(ValueType::F32, scores)),
        ("tokenizer.ggml.token_type".into(), Value::Array(ValueType::I32, types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
    ]);
    out.push(("model_load", "tiny-llama-spm".into(), tiny_model(&spm, "llama", GgmlType::F32, false, &mut rng).to_bytes()));
    // A PowerInfer model: PWRI magic, transposed down projections and predictors inside.
    {
        let mut w = tiny_model(&meta, "llama", GgmlType::F32, true, &mut rng).with_magic(Magic::PowerInfer);
        for l in 0..2 {
            w.add_f32(&format!("blk.{l}.ffn_down_t.weight"), &[32, 64], &rng.vec(64 * 32));
        }
        let p = predictors(&mut rng, 2, 32, 64, 8);
        let pf = GgufFile::from_bytes(p.to_gguf().to_bytes()).unwrap();
        for t in pf.tensors() {
            w.add_tensor(&t.name, &t.dims, t.ty, pf.tensor_data(t).to_vec());
        }
        for (k, v) in pf.metadata() {
            if k.starts_with("ember.predictor") {
                w.set(k, v.clone());
            }
        }
        let bytes = w.to_bytes();
        out.push(("model_load", "tiny-powerinfer".into(), bytes.clone()));
        out.push(("sparse_files", "powerinfer-model".into(), bytes));
    }

    // sparse_files: a profile, samples of both types, predictors and split files.
    let (n_layer, n_embd, n_ff) = (2usize, 32usize, 64usize);
    let mut prof = ActivationProfile::new("tiny", n_layer, n_ff);
    let mut coll16 = SampleCollector::new(n_layer, n_embd, n_ff, 4, SampleType::F16, 1);
    let mut coll32 = SampleCollector::new(n_layer, n_embd, n_ff, 4, SampleType::F32, 2);
    for _ in 0..6 {
        for l in 0..n_layer {
            let (resid, gate) = (rng.vec(n_embd), rng.vec(n_ff));
            prof.record(l, Activation::Relu, &gate, &gate);
            coll16.offer(l, Activation::Relu, &resid, &gate, &gate);
            coll32.offer(l, Activation::Relu, &resid, &gate, &gate);
        }
    }
    out.push(("sparse_files", "profile".into(), prof.to_gguf().unwrap().to_bytes()));
    out.push(("sparse_files", "samples-f16".into(), samples_gguf(&coll16.finish(), SampleType::F16, "tiny", 1, 6).unwrap().to_bytes()));
    out.push(("sparse_files", "samples-f32".into(), samples_gguf(&coll32.finish(), SampleType::F32, "tiny", 2, 6).unwrap().to_bytes()));
    out.push(("sparse_files", "predictors".into(), predictors(&mut rng, n_layer, n_embd, n_ff, 8).to_gguf().to_bytes()));
    // Split files (checks.rs reads them against their own shape or one from the input's bytes).
    for (name, layers, ff, hot) in [("split-1x32", 1usize, 32usize, vec![vec![0u32, 5, 31]]), ("split-2x64", 2, 64, vec![vec![1, 2, 3], vec![]])] {
        out.push(("sparse_files", name.into(), split_file(&hot[..layers], ff, 1 << 20).to_bytes()));
    }

    // chat_template: the real templates and a few shapes real ones use, each with messages.
    let real = meta.iter().find(|(k, _)| k == "tokenizer.chat_template").and_then(|(_, v)| v.as_str()).map(str::to_string);
    let mut templates: Vec<(String, String)> = real.into_iter().map(|t| ("smollm2".to_string(), t)).collect();
    for (name, t) in [
        ("loop-concat", "{% for m in messages %}{{ '<|' + m.role + '|>' ~ m['content'] | trim }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"),
        ("namespace", "{% set ns = namespace(sys='') %}{% for m in messages %}{% if m.role == 'system' %}{% set ns.sys = ns.sys + m.content %}{% endif %}{% endfor %}{{ bos_token }}{{ ns.sys }}{{ messages|length }}"),
        ("macro-methods", "{% macro r(m) %}[{{ m.role.upper() }}]{{ m.content.strip().split(' ')|join(',') }}{% endmacro %}{% for m in messages %}{{ r(m) }}{% if not loop.last %}\n{% endif %}{% endfor %}{{ eos_token }}"),
        ("tojson-raise", "{{ messages|tojson(indent=2) }}{% if messages|length > 5 %}{{ raise_exception('too many') }}{% endif %}{{ strftime_now('%Y-%m-%d') }}"),
    ] {
        templates.push((name.into(), t.into()));
    }
    for (name, t) in templates {
        out.push(("chat_template", name, format!("{t}\0You are kind.\0hello there\0hi").into_bytes()));
    }

    // tokenizer: flag byte (see checks::tokenizer), then text or ids.
    let text = "Hello world! <|im_start|>user\nWhat's 2+2? naïve café 日本語 🙂\t\r\n  spaces<|im_end|>";
    for (name, flags) in [("plain", 0u8), ("special", 2), ("bos-special", 6)] {
        let mut b = vec![flags];
        b.extend_from_slice(text.as_bytes());
        out.push(("tokenizer", format!("text-{name}"), b));
    }
    let mut ids = vec![1u8];
    for id in [0u32, 1, 2, 100, 399, 49151, 49152, 60000] {
        ids.extend_from_slice(&id.to_le_bytes());
    }
    out.push(("tokenizer", "ids".into(), ids));

    // gguf_parse gets every GGUF seed too (gguf_format.rs writes its own synthetic ones).
    let gguf: Vec<_> = out.iter().filter(|(t, _, _)| *t == "model_load" || *t == "sparse_files").map(|(_, n, b)| ("gguf_parse", n.clone(), b.clone())).collect();
    out.extend(gguf);
    out
}

fn tokenizers() -> Option<Vec<checks::FuzzTokenizer>> {
    let mut paths: Vec<PathBuf> = common::default_model().into_iter().collect();
    paths.extend(common::relu_model());
    (!paths.is_empty()).then(|| checks::load_tokenizers(&paths))
}

/// Runs one input through its target's checks, within a time limit (a slow input is a finding).
fn replay(target: &str, name: &str, data: &[u8], toks: Option<&[checks::FuzzTokenizer]>) {
    let t = Instant::now();
    match target {
        "gguf_parse" => checks::gguf_parse(data),
        "model_load" => checks::model_load(data),
        "chat_template" => checks::chat_template(data),
        "sparse_files" => checks::sparse_files(data),
        "tokenizer" => match toks {
            Some(toks) => checks::tokenizer(toks, data),
            None => return,
        },
        other => panic!("unknown fuzz target {other} (input {name})"),
    }
    assert!(t.elapsed() < Duration::from_secs(2), "{target}/{name} took {:?}", t.elapsed());
}

#[test]
fn seeds_pass_every_target() {
    let toks = tokenizers();
    let seeds = seeds();
    for target in ["gguf_parse", "model_load", "chat_template", "sparse_files", "tokenizer"] {
        assert!(seeds.iter().any(|(t, _, _)| *t == target), "no seeds for {target}");
    }
    for (target, name, data) in &seeds {
        replay(target, name, data, toks.as_deref());
    }
    // The seeds must reach past the parsers, or the campaigns start from nothing useful.
    for (target, name, data) in &seeds {
        let f = || std::sync::Arc::new(GgufFile::from_bytes(data.clone()).unwrap());
        match (*target, name.as_str()) {
            ("model_load", _) => {
                ember::model::Model::from_gguf(f()).unwrap_or_else(|e| panic!("seed {name} does not load: {e}"));
                ember::tokenizer::Tokenizer::from_gguf(&f()).unwrap_or_else(|e| panic!("seed {name} has no tokenizer: {e}"));
            }
            ("sparse_files", "profile") => drop(ActivationProfile::from_gguf(&f()).unwrap()),
            ("sparse_files", "predictors" | "powerinfer-model") => drop(Predictors::from_gguf(f()).unwrap()),
            ("sparse_files", "split-2x64") => drop(ember::sparse::powerinfer::read_split(&f(), 2, 64).unwrap()),
            _ => {}
        }
    }
}

/// Writes the seed corpora for a fuzz campaign: `EMBER_FUZZ_CORPUS=fuzz/corpus cargo test
/// --release --test fuzz_regressions write_fuzz_seed_corpora`.
#[test]
fn write_fuzz_seed_corpora() {
    let Some(dir) = std::env::var_os("EMBER_FUZZ_CORPUS") else { return };
    for (target, name, data) in seeds() {
        let d = Path::new(&dir).join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), data).unwrap();
    }
}

/// Every input a campaign found (crashes, time-outs, out-of-memory), fixed and kept.
#[test]
fn kept_fuzz_inputs_replay() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_inputs");
    let toks = tokenizers();
    let mut n = 0;
    for target in ["gguf_parse", "model_load", "chat_template", "sparse_files", "tokenizer"] {
        let Ok(entries) = std::fs::read_dir(root.join(target)) else { continue };
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for p in files {
            let data = std::fs::read(&p).unwrap();
            replay(target, &p.file_name().unwrap().to_string_lossy(), &data, toks.as_deref());
            n += 1;
        }
    }
    eprintln!("{n} kept fuzz inputs replayed");
}
