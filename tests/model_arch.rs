//! The model families beyond llama (qwen3, phi3, gemma2, gemma3; PowerInfer's dReLU `bamboo`) on small models that
//! `ember synth` writes with each family's real tensor names, shapes and metadata keys:
//! ember's forward pass against a plain f64 forward pass written here from the architectures'
//! descriptions, and ember's greedy tokens against llama.cpp's on the same files
//! (`tests/refs/arch-*.greedy.jsonl`, made by `tests/refs/tools/greedy_ids.c`; see
//! tests/refs/README.md). The synthetic models take the default model's tokenizer, so these
//! tests skip without it.

mod common;

use ember::cpu::Precision;
use ember::engine::{Forward, Logits, Session};
use ember::gguf::GgufFile;
use ember::model::Model;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// A folder under the system's temporary folder, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("ember-arch-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `ember synth ARGS -o DIR/NAME.gguf` with the default model's tokenizer (None without it).
/// The same arguments give the same bytes (the seed is fixed), which is what the llama.cpp
/// references were made from.
fn synth(dir: &TempDir, name: &str, args: &[&str]) -> Option<PathBuf> {
    let tok = common::default_model()?;
    let out = dir.0.join(format!("{name}.gguf"));
    let status = Command::new(env!("CARGO_BIN_EXE_ember"))
        .arg("synth")
        .args(args)
        .arg("--tokenizer-from")
        .arg(&tok)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "ember synth {args:?}");
    Some(out)
}

/// The small shapes the references were made with (a few MB, most of it the 49152-token
/// embedding and output).
const QWEN3: &[&str] = &["--arch", "qwen3", "--type", "q8_0", "--n-embd", "64", "--n-ff", "128", "--n-layer", "2", "--n-head", "4", "--n-head-kv", "2", "--head-dim", "32", "--seed", "3"];
const PHI3: &[&str] = &["--arch", "phi3", "--type", "q8_0", "--n-embd", "64", "--n-ff", "128", "--n-layer", "2", "--n-head", "4", "--n-head-kv", "2", "--seed", "4"];
/// Gemma: a window of 8 positions, which the prompts (and the greedy runs) cross, and small
/// caps, which bend the scores and logits of random weights (the real 50 and 30 barely would).
const GEMMA2: &[&str] = &["--arch", "gemma2", "--type", "q8_0", "--n-embd", "64", "--n-ff", "128", "--n-layer", "2", "--n-head", "4", "--n-head-kv", "2", "--head-dim", "32", "--sliding-window", "8", "--attn-softcap", "2", "--final-softcap", "10", "--seed", "6"];
/// Seven layers: local 0-4 and 6, global 5 (RoPE base 1e6 scaled by 1/8 there, 10000 on the
/// local ones); a window of 8.
const GEMMA3: &[&str] = &["--arch", "gemma3", "--type", "q8_0", "--n-embd", "64", "--n-ff", "128", "--n-layer", "7", "--n-head", "4", "--n-head-kv", "2", "--head-dim", "32", "--sliding-window", "8", "--seed", "7"];
const BAMBOO: &[&str] = &["--arch", "bamboo", "--act", "drelu", "--type", "q8_0", "--n-embd", "64", "--n-ff", "128", "--n-layer", "2", "--n-head", "4", "--n-head-kv", "2", "--seed", "5"];

/// A tensor's values, dequantised.
fn values(f: &GgufFile, name: &str) -> Vec<f64> {
    let t = f.tensor(name).unwrap_or_else(|| panic!("no tensor {name}"));
    let n = t.dims.iter().product::<u64>() as usize;
    let mut out = vec![0.0f32; n];
    ember::quant::dequantize(t.ty, f.tensor_data(t), &mut out).unwrap();
    out.into_iter().map(f64::from).collect()
}

/// The forward pass from the architectures' descriptions, in f64, read straight from the file:
/// pre-norm decoder; RMSNorm; q, k, v projections (qwen3: each head of q and k RMS-normalised
/// with its own weights, then RoPE on halves; llama/bamboo: RoPE on adjacent pairs); causal
/// softmax attention with grouped KV heads; gated FFN (SiLU, or dReLU: relu(gate) * relu(up)).
/// Gemma (2 and 3): the embedding times sqrt(n_embd); the attention's and the FFN's outputs
/// RMS-normalised again (`post_attention_norm`, `post_ffw_norm`) before each residual add;
/// q times 1/sqrt(head_dim) and no other score scaling; scores `cap * tanh(s / cap)` (gemma2's
/// `attn_logit_softcapping`); local layers (gemma2: the even ones; gemma3: all but every sixth)
/// see the last `sliding_window` positions only, gemma3's with RoPE base 10000 and its global
/// ones with the file's base and linear scaling; FFN gelu(gate) * up with GELU's tanh form
/// (exact here: ember rounds as llama.cpp does); logits `cap * tanh(l / cap)`; output tied.
/// Returns every position's logits.
fn reference_logits(f: &GgufFile, tokens: &[u32]) -> Vec<Vec<f64>> {
    let arch = f.get_str("general.architecture").unwrap().to_string();
    let u = |k: &str| f.get_u64(&format!("{arch}.{k}")).unwrap() as usize;
    let (n_layer, e, ff, n_head, n_kv) = (u("block_count"), u("embedding_length"), u("feed_forward_length"), u("attention.head_count"), u("attention.head_count_kv"));
    let hd = f.get_u64(&format!("{arch}.attention.key_length")).map(|v| v as usize).unwrap_or(e / n_head);
    let eps = f.get_f32(&format!("{arch}.attention.layer_norm_rms_epsilon")).unwrap() as f64;
    let file_base = f.get_f32(&format!("{arch}.rope.freq_base")).map(f64::from).unwrap_or(10000.0);
    let (qwen3, phi3, drelu) = (arch == "qwen3", arch == "phi3", arch == "bamboo");
    let (gemma2, gemma3) = (arch == "gemma2", arch == "gemma3");
    let gemma = gemma2 || gemma3;
    let neox = qwen3 || phi3 || gemma;
    let opt_f = |k: &str| f.get_f32(&format!("{arch}.{k}")).ok().map(f64::from);
    // RoPE scaling (gemma3's global layers): positions divided by the factor.
    let rope_factor = opt_f("rope.scaling.factor").unwrap_or(1.0);
    let window = f.get_u64(&format!("{arch}.attention.sliding_window")).map(|v| v as usize).ok();
    let local = |l: usize| window.is_some() && if gemma2 { l.is_multiple_of(2) } else { gemma3 && l % 6 != 5 };
    let attn_cap = if gemma2 { opt_f("attn_logit_softcapping") } else { None };
    let final_cap = if gemma { opt_f("final_logit_softcapping") } else { None };
    let gelu = |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
    let vocab = f.tensor("token_embd.weight").unwrap().dims[1] as usize;
    let matvec = |m: &[f64], x: &[f64]| -> Vec<f64> { m.chunks_exact(x.len()).map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum()).collect() };
    let norm = |x: &[f64], w: &[f64]| -> Vec<f64> {
        let rms = (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + eps).sqrt();
        x.iter().zip(w).map(|(v, w)| v / rms * w).collect()
    };
    // (base, position divisor) of layer l's RoPE.
    let rope_of = |l: usize| if gemma3 && local(l) { (10000.0, 1.0) } else { (file_base, rope_factor) };
    let rope = |x: &mut [f64], pos: usize, (base, div): (f64, f64)| {
        for head in x.chunks_mut(hd) {
            for i in 0..hd / 2 {
                let theta = pos as f64 / div * base.powf(-2.0 * i as f64 / hd as f64);
                let (a, b) = if neox { (i, i + hd / 2) } else { (2 * i, 2 * i + 1) };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * theta.cos() - x1 * theta.sin();
                head[b] = x0 * theta.sin() + x1 * theta.cos();
            }
        }
    };
    let embd = values(f, "token_embd.weight");
    let emb_scale = if gemma { (e as f64).sqrt() } else { 1.0 };
    let mut xs: Vec<Vec<f64>> = tokens.iter().map(|&t| embd[t as usize * e..(t as usize + 1) * e].iter().map(|v| v * emb_scale).collect()).collect();
    for l in 0..n_layer {
        let p = |t: &str| values(f, &format!("blk.{l}.{t}"));
        let (q_len, kv_len) = (n_head * hd * e, n_kv * hd * e);
        let (wq, wk, wv) = match phi3 {
            // One tensor: q's rows, k's, v's.
            true => {
                let qkv = p("attn_qkv.weight");
                (qkv[..q_len].to_vec(), qkv[q_len..q_len + kv_len].to_vec(), qkv[q_len + kv_len..].to_vec())
            }
            false => (p("attn_q.weight"), p("attn_k.weight"), p("attn_v.weight")),
        };
        let wo = p("attn_output.weight");
        let (mut qs, mut ks, mut vs) = (vec![], vec![], vec![]);
        for (pos, x) in xs.iter().enumerate() {
            let h = norm(x, &p("attn_norm.weight"));
            let (mut q, mut k) = (matvec(&wq, &h), matvec(&wk, &h));
            if qwen3 || gemma3 {
                let (qn, kn) = (p("attn_q_norm.weight"), p("attn_k_norm.weight"));
                q = q.chunks(hd).flat_map(|head| norm(head, &qn)).collect();
                k = k.chunks(hd).flat_map(|head| norm(head, &kn)).collect();
            }
            rope(&mut q, pos, rope_of(l));
            rope(&mut k, pos, rope_of(l));
            qs.push(q);
            ks.push(k);
            vs.push(matvec(&wv, &h));
        }
        let (gate_w, up_w) = match phi3 {
            // ffn_up holds the gate's rows, then up's.
            true => {
                let gu = p("ffn_up.weight");
                (gu[..ff * e].to_vec(), gu[ff * e..].to_vec())
            }
            false => (p("ffn_gate.weight"), p("ffn_up.weight")),
        };
        let down_w = p("ffn_down.weight");
        // Keys a query at `pos` sees: the last `window` positions on local layers.
        let first = |pos: usize| if local(l) { (pos + 1).saturating_sub(window.unwrap()) } else { 0 };
        for (pos, x) in xs.iter_mut().enumerate() {
            let mut att = vec![0.0; n_head * hd];
            for h in 0..n_head {
                let kvh = h / (n_head / n_kv);
                let keys = first(pos)..=pos;
                let s: Vec<f64> = keys.clone().map(|j| {
                    let s = (0..hd).map(|i| qs[pos][h * hd + i] * ks[j][kvh * hd + i]).sum::<f64>() / (hd as f64).sqrt();
                    attn_cap.map_or(s, |c| c * (s / c).tanh())
                }).collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                for i in 0..hd {
                    att[h * hd + i] = keys.clone().zip(&s).map(|(j, &sj)| (sj - m).exp() / z * vs[j][kvh * hd + i]).sum();
                }
            }
            let mut o = matvec(&wo, &att);
            if gemma {
                o = norm(&o, &p("post_attention_norm.weight"));
            }
            x.iter_mut().zip(o).for_each(|(a, b)| *a += b);
            let h = norm(x, &p("ffn_norm.weight"));
            let (g, u) = (matvec(&gate_w, &h), matvec(&up_w, &h));
            assert_eq!(g.len(), ff);
            let act: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| if drelu { g.max(0.0) * u.max(0.0) } else if gemma { gelu(g) * u } else { g / (1.0 + (-g).exp()) * u }).collect();
            let mut d = matvec(&down_w, &act);
            if gemma {
                d = norm(&d, &p("post_ffw_norm.weight"));
            }
            x.iter_mut().zip(d).for_each(|(a, b)| *a += b);
        }
    }
    let out = if f.tensor("output.weight").is_some() { values(f, "output.weight") } else { embd };
    let on = values(f, "output_norm.weight");
    xs.iter().map(|x| {
        let l = matvec(&out, &norm(x, &on));
        assert_eq!(l.len(), vocab);
        l.into_iter().map(|v| final_cap.map_or(v, |c| c * (v / c).tanh())).collect()
    }).collect()
}

/// ember's CPU logits at f32 precision within the f16 KV cache's rounding of the reference.
fn check_reference(path: &Path) {
    check_reference_on(path, &[504u32, 3575, 282, 4649, 314, 17, 9001]);
}

/// Twenty tokens: past a window of 8 several times over.
const LONG_PROMPT: [u32; 20] = [504, 3575, 282, 4649, 314, 17, 9001, 6403, 1980, 253, 655, 1604, 3987, 46477, 24, 94, 727, 788, 216, 33];

/// [`check_reference`] on `tokens` (as one batch).
fn check_reference_on(path: &Path, tokens: &[u32]) {
    let file = Arc::new(GgufFile::open(path).unwrap());
    let model = Arc::new(Model::from_gguf(file.clone()).unwrap());
    let want = reference_logits(&file, tokens);
    let mut s = Session::new(model.clone(), 64);
    s.precision = Precision::F32;
    let got = s.forward(tokens, Logits::All).unwrap();
    let vocab = model.hp.n_vocab;
    let mut worst = 0.0f64;
    for (t, w) in want.iter().enumerate() {
        for (v, &wv) in w.iter().enumerate() {
            let g = got[t * vocab + v] as f64;
            let err = (g - wv).abs() / wv.abs().max(1.0);
            worst = worst.max(err);
            // f16 keys and values in the cache: about three significant digits.
            assert!(err < 1e-2, "{} token {t} logit {v}: {g} vs {wv}", model.hp.arch);
        }
    }
    eprintln!("{}: worst relative logit error vs the f64 reference {worst:.1e}", model.hp.arch);
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

/// ember's greedy tokens (CPU, llama.cpp's precision) against llama.cpp's for each prompt.
/// Random weights over a 49152-token vocabulary leave small top-2 margins, so a prompt may
/// leave llama.cpp's tokens only at a step where llama.cpp's own margin was a near tie
/// (under 0.02), and at least five of the six must match to the end.
fn check_llama_cpp(path: &Path, refs: &str) {
    let model = Arc::new(Model::load(path).unwrap());
    let cases: Vec<serde_json::Value> = refs.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(cases.len(), 6);
    let mut full = 0;
    let mut report = Vec::new();
    for case in &cases {
        let (prompt, want) = (ids(&case["prompt_ids"]), ids(&case["generated_ids"]));
        let margins: Vec<f64> = case["top1_top2_logit_margin"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let mut s = Session::new(model.clone(), 64);
        s.precision = Precision::Llama;
        let got = common::greedy(&mut s, &prompt, want.len());
        match got.iter().zip(&want).position(|(a, b)| a != b) {
            None => full += 1,
            Some(step) => report.push((format!("prompt {prompt:?}: diverges at step {step}: {got:?} vs llama.cpp {want:?}"), margins[step])),
        }
    }
    eprintln!("{}: {full} of 6 prompts give llama.cpp's tokens; {report:?}", model.hp.arch);
    for (what, margin) in &report {
        assert!(*margin < 0.02, "{what} (llama.cpp's top-2 margin {margin})");
    }
    assert!(full >= 5, "only {full} of 6 prompts match llama.cpp: {report:?}");
}

#[test]
fn qwen3_matches_the_reference_and_llama_cpp() {
    let dir = TempDir::new("qwen3");
    let Some(path) = synth(&dir, "qwen3", QWEN3) else { return };
    let model = Model::load(&path).unwrap();
    // The head size is the file's (32), not n_embd / n_head (16).
    assert_eq!((model.hp.head_dim, model.hp.q_dim()), (32, 128));
    assert!(model.layers.iter().all(|l| l.q_norm.as_ref().map(|v| v.len()) == Some(32) && l.bq.is_none()));
    check_reference(&path);
    check_llama_cpp(&path, include_str!("refs/arch-qwen3.greedy.jsonl"));
}

#[test]
fn gemma2_matches_the_reference_and_llama_cpp() {
    let dir = TempDir::new("gemma2");
    let Some(path) = synth(&dir, "gemma2", GEMMA2) else { return };
    let model = Model::load(&path).unwrap();
    let hp = &model.hp;
    // Even layers local over 8 positions, the caps the file gives, q scaled by 1/sqrt(32),
    // the output tied to the embedding.
    let swa = hp.swa.as_ref().unwrap();
    assert_eq!((swa.window, swa.layers.as_slice(), swa.rope_base), (8, &[true, false][..], 10000.0));
    assert_eq!((hp.attn_softcap, hp.final_softcap, hp.q_scale, hp.embd_scale), (Some(2.0), Some(10.0), Some(1.0 / 32f32.sqrt()), Some(8.0)));
    assert!(model.tied_embeddings && model.layers.iter().all(|l| l.attn_post_norm.is_some() && l.ffn_post_norm.is_some()));
    assert_eq!(hp.activation, ember::model::Activation::GeluTanh);
    check_reference_on(&path, &LONG_PROMPT);
    check_llama_cpp(&path, include_str!("refs/arch-gemma2.greedy.jsonl"));
}

#[test]
fn gemma3_matches_the_reference_and_llama_cpp() {
    let dir = TempDir::new("gemma3");
    let Some(path) = synth(&dir, "gemma3", GEMMA3) else { return };
    let model = Model::load(&path).unwrap();
    let hp = &model.hp;
    // Five of every six layers local, with RoPE base 10000 unscaled; the global one at the
    // file's 1e6 with its linear factor 8; no soft-capping; q/k norms of the head size.
    let swa = hp.swa.as_ref().unwrap();
    assert_eq!((swa.window, swa.layers.as_slice()), (8, &[true, true, true, true, true, false, true][..]));
    assert_eq!((swa.rope_base, swa.rope_freq_scale, hp.rope_base, hp.rope_freq_scale), (10000.0, 1.0, 1e6, 0.125));
    assert_eq!((hp.attn_softcap, hp.final_softcap), (None, None));
    assert!(model.tied_embeddings && model.layers.iter().all(|l| l.q_norm.as_ref().map(|v| v.len()) == Some(32) && l.attn_post_norm.is_some()));
    check_reference_on(&path, &LONG_PROMPT);
    check_llama_cpp(&path, include_str!("refs/arch-gemma3.greedy.jsonl"));
}

/// Gemma's decode (one token at a time, the window sliding past the cache's first positions)
/// gives the logits of the whole prompt run as one batch.
#[test]
fn gemma2_decode_equals_the_batch() {
    let dir = TempDir::new("gemma2-decode");
    let Some(path) = synth(&dir, "gemma2", GEMMA2) else { return };
    let model = Arc::new(Model::load(&path).unwrap());
    let mut s = Session::new(model.clone(), 64);
    s.precision = Precision::F32;
    let batch = s.forward(&LONG_PROMPT, Logits::All).unwrap();
    s.reset();
    let one: Vec<f32> = LONG_PROMPT.iter().flat_map(|&t| s.forward(&[t], Logits::Last).unwrap()).collect();
    for (i, (a, b)) in batch.iter().zip(&one).enumerate() {
        assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "logit {i}: batch {a} vs decode {b}");
    }
    // Two sequences at different positions (one past the window, one not) decoded together:
    // each row's logits are its sequence's alone.
    let vocab = model.hp.n_vocab;
    let mut two = Session::new(model.clone(), 64).with_seqs(2);
    two.precision = Precision::F32;
    let prompts = [&LONG_PROMPT[..12], &LONG_PROMPT[12..15]];
    for (q, p) in prompts.iter().enumerate() {
        two.select_seq(q).unwrap();
        two.forward(p, Logits::Last).unwrap();
    }
    let got = two.decode_batch(&[(0, 9001), (1, 17)]).unwrap();
    for (q, (p, t)) in prompts.iter().zip([9001u32, 17]).enumerate() {
        s.reset();
        let toks: Vec<u32> = p.iter().copied().chain([t]).collect();
        let want = s.forward(&toks, Logits::Last).unwrap();
        for (v, (&g, &w)) in got[q * vocab..(q + 1) * vocab].iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "sequence {q}: logit {v}: {g} vs {w}");
        }
    }
}

/// Only the dense single-sequence GPU session runs Gemma: `--backend gpu` with several
/// sequences (or an offload, a budget, a sparse FFN) says so, `auto` then runs it on the CPU,
/// and the sparse FFN refuses GeGLU.
#[test]
fn gemma2_beyond_the_dense_gpu_session_is_refused() {
    use ember::engine::builder::{self, BackendChoice, SessionOptions};
    use ember::engine::FfnMode;
    let dir = TempDir::new("gemma2-gpu");
    let Some(path) = synth(&dir, "gemma2", GEMMA2) else { return };
    let model = Arc::new(Model::load(&path).unwrap());
    let mut opts = SessionOptions::new(&path, BackendChoice::Gpu);
    opts.n_seqs = 2;
    let err = builder::open(&opts, model.clone(), 64, &|_| {}).err().expect("a batched GPU session of gemma2");
    assert!(err.to_string().contains("gemma2 runs on the GPU only as one dense sequence yet"), "{err}");
    let lines = std::sync::Mutex::new(Vec::new());
    opts.backend = BackendChoice::Auto;
    let auto = builder::open(&opts, model.clone(), 64, &|l| lines.lock().unwrap().push(l.to_string())).unwrap();
    assert_eq!(auto.session.backend_name(), "CPU");
    assert!(lines.lock().unwrap().iter().any(|l| l.contains("gemma2 runs on the GPU only as one dense sequence")));
    // The library's own sessions refuse it too (no GPU needed to ask: the check comes first).
    if let Some(ctx) = common::gpu() {
        let ctx = Arc::new(ctx);
        let e = ember::engine::OffloadSession::new(model.clone(), ctx.clone(), 1, 64, 16, false).err().expect("an offload of gemma2");
        assert!(e.to_string().contains("one dense sequence"), "{e}");
        let w = Arc::new(ember::engine::GpuWeights::upload(&ctx, &model, false).unwrap());
        let e = ember::engine::GpuBatch::open(model.clone(), ctx, w, 64, 2).err().expect("a GPU batch of gemma2");
        assert!(e.to_string().contains("one dense sequence"), "{e}");
    }
    let e = ember::engine::SparseFfn::new(&model, FfnMode::Threshold, None, vec![0.0; 2], Precision::F32, false).err().expect("a sparse FFN for gemma2");
    assert!(e.to_string().contains("gemma2"), "{e}");
}

#[test]
fn phi3_matches_the_reference_and_llama_cpp() {
    let dir = TempDir::new("phi3");
    let Some(path) = synth(&dir, "phi3", PHI3) else { return };
    let model = Model::load(&path).unwrap();
    // The fused tensors become views: q, k, v of 64, 32, 32 rows; gate and up of 128.
    let l = &model.layers[0];
    assert_eq!((l.wq.rows, l.wk.rows, l.wv.rows, l.ffn_gate.rows, l.ffn_up.rows), (64, 32, 32, 128, 128));
    assert!(model.conversions.is_empty());
    check_reference(&path);
    check_llama_cpp(&path, include_str!("refs/arch-phi3.greedy.jsonl"));
}

/// The dense GPU forward pass (lavapipe in CI) against the f64 reference, within the f16 KV
/// cache's rounding as the CPU's is: the prompt as one batch, then token by token (the decode
/// kernels).
fn check_gpu(name: &str, args: &[&str]) {
    check_gpu_on(name, args, &[504u32, 3575, 282, 4649, 314]);
}

/// [`check_gpu`] on `tokens`.
fn check_gpu_on(name: &str, args: &[&str], tokens: &[u32]) {
    use ember::engine::{GpuSession, GpuWeights};
    let Some(ctx) = common::gpu() else { return };
    let ctx = Arc::new(ctx);
    let dir = TempDir::new(&format!("{name}-gpu"));
    let Some(path) = synth(&dir, name, args) else { return };
    let file = Arc::new(GgufFile::open(&path).unwrap());
    let model = Arc::new(Model::from_gguf(file.clone()).unwrap());
    let want: Vec<f64> = reference_logits(&file, tokens).concat();
    let weights = Arc::new(GpuWeights::upload(&ctx, &model, false).unwrap());
    let mut gpu = GpuSession::new(model.clone(), ctx, weights, 32).unwrap();
    let batch = gpu.forward(tokens, Logits::All).unwrap();
    gpu.reset();
    let one_by_one: Vec<f32> = tokens.iter().flat_map(|&t| gpu.forward(&[t], Logits::Last).unwrap()).collect();
    let mut worst = 0.0f64;
    for (what, got) in [("batch", batch), ("decode", one_by_one)] {
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            let err = (g as f64 - w).abs() / w.abs().max(1.0);
            worst = worst.max(err);
            assert!(err < 1e-2, "{name} {what}: logit {i}: {g} vs {w}");
        }
    }
    eprintln!("{name} on the GPU: worst relative logit error vs the f64 reference {worst:.1e}");
}

/// phi3's split views upload like separate matrices.
#[test]
fn phi3_on_the_gpu_matches_the_reference() {
    check_gpu("phi3", PHI3);
}

/// qwen3's per-head norms run between the qkv product and RoPE (`shaders/head_norm.wgsl`).
#[test]
fn qwen3_on_the_gpu_matches_the_reference() {
    check_gpu("qwen3", QWEN3);
}

/// Gemma on the GPU: GeGLU in the stacked gate/up product's epilogue, the post-norms, the
/// embedding scale, the query scale and soft-capping, a window of 8 that the 20 tokens cross
/// (the prefill kernel's mask, then the decode kernel's), final soft-capping.
#[test]
fn gemma2_on_the_gpu_matches_the_reference() {
    check_gpu_on("gemma2", GEMMA2, &LONG_PROMPT);
}

/// gemma3's q/k norms and its local layers' own RoPE on the GPU.
#[test]
fn gemma3_on_the_gpu_matches_the_reference() {
    check_gpu_on("gemma3", GEMMA3, &LONG_PROMPT);
}

/// dReLU through the stacked gate/up product's epilogue.
#[test]
fn bamboo_on_the_gpu_matches_the_reference() {
    check_gpu("bamboo", BAMBOO);
}

#[test]
fn bamboo_drelu_matches_the_reference() {
    let dir = TempDir::new("bamboo");
    let Some(path) = synth(&dir, "bamboo", BAMBOO) else { return };
    assert_eq!(Model::load(&path).unwrap().hp.activation, ember::model::Activation::Drelu);
    check_reference(&path);
}


/// qwen3 on a GPU session of two sequences decoded together (`decode_batch`, the batched
/// decode's own dispatch sequence): each row's logits are its sequence's alone.
#[test]
fn qwen3_batched_gpu_decode_matches_each_sequence() {
    use ember::engine::builder::{self, BackendChoice, SessionOptions};
    if common::gpu().is_none() {
        return;
    }
    let dir = TempDir::new("qwen3-batch");
    let Some(path) = synth(&dir, "qwen3", QWEN3) else { return };
    let model = Arc::new(Model::load(&path).unwrap());
    let vocab = model.hp.n_vocab;
    let mut opts = SessionOptions::new(&path, BackendChoice::Gpu);
    let mut single = builder::open(&opts, model.clone(), 64, &|_| {}).unwrap().session;
    opts.n_seqs = 2;
    let mut batch = builder::open(&opts, model.clone(), 64, &|_| {}).unwrap().session;
    let prompts = [vec![504u32, 3575, 282], vec![6403u32, 1980, 253, 655, 12]];
    let mut next = Vec::new();
    for (s, p) in prompts.iter().enumerate() {
        batch.select_seq(s).unwrap();
        let l = batch.forward(p, Logits::Last).unwrap();
        next.push(ember::cpu::ops::argmax(&l).0 as u32);
    }
    let rows: Vec<(usize, u32)> = next.iter().enumerate().map(|(s, &t)| (s, t)).collect();
    let got = batch.decode_batch(&rows).unwrap();
    for (s, p) in prompts.iter().enumerate() {
        single.reset();
        let toks: Vec<u32> = p.iter().copied().chain([next[s]]).collect();
        let want = single.forward(&toks, Logits::Last).unwrap();
        for (v, (&g, &w)) in got[s * vocab..(s + 1) * vocab].iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-3 * w.abs().max(1.0), "sequence {s}: logit {v}: {g} vs {w}");
        }
    }
}

/// `path`'s metadata without the keys `drop`, edited by `edit` (tensors as they are), loaded.
fn load_edited(path: &Path, tag: &str, drop: &[&str], edit: impl FnOnce(&mut ember::gguf::GgufWriter)) -> Result<Model, ember::model::ModelError> {
    let f = GgufFile::open(path).unwrap();
    let mut w = ember::gguf::GgufWriter::new();
    for (k, v) in f.metadata() {
        if k != "general.alignment" && !drop.contains(&k.as_str()) {
            w.set(k, v.clone());
        }
    }
    edit(&mut w);
    for t in f.tensors() {
        w.add_tensor(&t.name, &t.dims, t.ty, f.tensor_data(t).to_vec());
    }
    let out = path.with_file_name(format!("{tag}.gguf"));
    w.write_file(&out).unwrap();
    Model::load(&out)
}

/// Gemma's hyper-parameters as llama.cpp reads them: its defaults where keys are missing
/// (gemma2: window 4096 and caps 50/30; gemma3: no window, every layer global), the pattern
/// and local RoPE base keys, the 27B's query scale; bad values refused with the key named.
#[test]
fn gemma_hyper_parameters_follow_llama_cpp() {
    use ember::gguf::Value;
    let dir = TempDir::new("gemma-hparams");
    let Some(g2) = synth(&dir, "gemma2", GEMMA2) else { return };
    let Some(g3) = synth(&dir, "gemma3", GEMMA3) else { return };
    // gemma2 without its optional keys.
    let m = load_edited(&g2, "g2-bare", &["gemma2.attention.sliding_window", "gemma2.attn_logit_softcapping", "gemma2.final_logit_softcapping"], |_| {}).unwrap();
    assert_eq!((m.hp.swa.as_ref().map(|s| s.window), m.hp.attn_softcap, m.hp.final_softcap), (Some(4096), Some(50.0), Some(30.0)));
    // A pattern of 3 (layers 0 and 1 local of 2), a local RoPE base of its own, caps of 0 (none).
    let m = load_edited(&g2, "g2-keys", &[], |w| {
        w.set("gemma2.attention.sliding_window_pattern", Value::U32(3));
        w.set("gemma2.rope.freq_base_swa", Value::F32(5000.0));
        w.set("gemma2.final_logit_softcapping", Value::F32(0.0));
    })
    .unwrap();
    let swa = m.hp.swa.as_ref().unwrap();
    assert_eq!((swa.layers.as_slice(), swa.rope_base, m.hp.final_softcap), (&[true, true][..], 5000.0, None));
    // The pattern as one bool per layer.
    let m = load_edited(&g2, "g2-arr", &[], |w| {
        w.set("gemma2.attention.sliding_window_pattern", Value::Array(ember::gguf::ValueType::Bool, vec![Value::Bool(false), Value::Bool(true)]));
    })
    .unwrap();
    assert_eq!(m.hp.swa.as_ref().unwrap().layers, vec![false, true]);
    // q scaled by 1/sqrt(head_dim), not 1/sqrt(n_embd / n_head) = 1/4 ...
    assert_eq!(m.hp.q_scale, Some(1.0 / 32f32.sqrt()));
    // ... which is the 27B's, told by its 46 layers (gemma3's: 62).
    let mut args = GEMMA2.to_vec();
    assert_eq!(args[8], "--n-layer");
    args[9] = "46";
    let Some(g27) = synth(&dir, "gemma2-46", &args) else { return };
    assert_eq!(Model::load(&g27).unwrap().hp.q_scale, Some(0.25));
    // gemma3 without a window: every layer global, at the file's RoPE.
    let m = load_edited(&g3, "g3-bare", &["gemma3.attention.sliding_window"], |_| {}).unwrap();
    assert!(m.hp.swa.is_none() && m.hp.attn_softcap.is_none());
    // Bad values name their key.
    for (tag, key, v, want) in [
        ("g2-cap", "gemma2.attn_logit_softcapping", Value::F32(-1.0), "attn_logit_softcapping = -1"),
        ("g2-pat", "gemma2.attention.sliding_window_pattern", Value::Array(ember::gguf::ValueType::Bool, vec![Value::Bool(true)]), "one bool per layer"),
        ("g2-base", "gemma2.rope.freq_base_swa", Value::F32(f32::NAN), "rope.freq_base_swa = NaN"),
    ] {
        let e = load_edited(&g2, tag, &[], |w| {
            w.set(key, v);
        })
        .err()
        .unwrap_or_else(|| panic!("{key} accepted"));
        assert!(e.to_string().contains(want), "{key}: {e}");
    }
}
