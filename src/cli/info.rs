//! `ember info`: what a GGUF file holds and what running it needs.

use super::Result;
use crate::cpu::KvCache;
use crate::gguf::GgufFile;
use clap::Args;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// GGUF file, or the name of a model in the user cache
    pub path: PathBuf,
    /// Also list every metadata key and every tensor
    #[arg(long)]
    pub verbose: bool,
    /// Context size for the KV-cache estimate
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    pub ctx_size: usize,
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

pub fn info(a: InfoArgs) -> Result<()> {
    let path = super::resolve_model(Some(&a.path))?;
    let file = Arc::new(GgufFile::open(&path)?);
    println!("file:          {} ({:?} magic, GGUF v{}, {} tensors, {} metadata keys)", path.display(), file.magic, file.version, file.tensors().len(), file.metadata().len());
    if let Some(name) = file.get("general.name").and_then(|v| v.as_str()) {
        println!("name:          {name}");
    }
    let mut by_type: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for t in file.tensors() {
        let e = by_type.entry(t.ty.name().to_string()).or_default();
        e.0 += 1;
        e.1 += t.n_bytes;
    }
    let types: Vec<String> = by_type.iter().map(|(t, (n, b))| format!("{t} x{n} ({})", mib(*b))).collect();
    println!("tensor types:  {}", types.join(", "));
    let n_params: u64 = file.tensors().iter().map(|t| t.n_elements()).sum();
    println!("parameters:    {:.2} M", n_params as f64 / 1e6);

    match crate::model::Model::from_gguf(file.clone()) {
        Ok(model) => {
            let hp = &model.hp;
            println!("architecture:  {} ({} layers, n_embd {}, n_ff {}, {} heads / {} KV heads, head dim {})", hp.arch, hp.n_layer, hp.n_embd, hp.n_ff, hp.n_head, hp.n_head_kv, hp.head_dim);
            println!("ffn:           gated, activation {}", hp.activation.name());
            println!("rope:          base {}, {} dims, {:?} pairs, freq scale {}", hp.rope_base, hp.rope_dim, hp.rope_style, hp.rope_freq_scale);
            if let Some(w) = &hp.swa {
                let local = w.layers.iter().filter(|&&l| l).count();
                println!("attention:     sliding window of {} on {local} of {} layers (RoPE base {}, freq scale {} there)", w.window, hp.n_layer, w.rope_base, w.rope_freq_scale);
            }
            if hp.post_norms {
                let cap = |c: Option<f32>| c.map_or("none".to_string(), |c| c.to_string());
                println!("gemma:         embedding x {}, post-norms, query scale {}, soft-capping: attention {}, logits {}", hp.embd_scale.unwrap_or(1.0), hp.q_scale.unwrap_or(0.0), cap(hp.attn_softcap), cap(hp.final_softcap));
            }
            if let Some(why) = hp.gpu_dense_only() {
                println!("gpu:           {why}");
            }
            println!("vocab:         {} (embeddings {})", hp.n_vocab, if model.tied_embeddings { "tied to the output" } else { "separate from the output" });
            println!("context:       trained for {}", hp.n_ctx_train);
            for (name, from, to) in &model.conversions {
                println!("converted:     {name} {from} -> {to} at load time (no fast kernel for {from})");
            }
            let held = model.matrix_bytes_by_type();
            let total: u64 = held.iter().map(|(_, b)| b).sum();
            let shares: Vec<String> = held.iter().map(|(t, b)| format!("{t} {} ({:.1}%)", mib(*b), 100.0 * *b as f64 / total.max(1) as f64)).collect();
            println!("as loaded:     {}", shares.join(", "));
            let kv = KvCache::bytes(hp.n_layer, a.ctx_size, hp.kv_dim());
            println!("memory:        weights {} + KV cache {} at context {} (f16) = {}", mib(model.weight_bytes()), mib(kv), a.ctx_size, mib(model.weight_bytes() + kv));
        }
        Err(e) => println!("model:         not runnable by ember: {e}"),
    }
    match crate::tokenizer::Tokenizer::from_gguf(&file) {
        Ok(t) => println!(
            "tokenizer:     {} ({} tokens, bos {:?}, eos {:?}, add bos {}, chat template {})",
            file.get("tokenizer.ggml.model").and_then(|v| v.as_str()).unwrap_or("?"),
            t.vocab_size(),
            t.bos_id(),
            t.eos_id(),
            t.add_bos(),
            if t.chat_template().is_some() { "yes" } else { "no" }
        ),
        Err(e) => println!("tokenizer:     unusable: {e}"),
    }
    if a.verbose {
        println!("\nmetadata:");
        for (k, v) in file.metadata() {
            println!("  {k} = {}", v.summary());
        }
        println!("\ntensors:");
        for t in file.tensors() {
            println!("  {:40} {:5} {:?}", t.name, t.ty.name(), t.dims);
        }
    }
    Ok(())
}
