//! `ember synth`: a model of real shape with random weights, for speed tests of shapes we cannot
//! download (llama-7B by default). Random weights are fine for speed, never for accuracy claims.

use super::Result;
use crate::gguf::{GgmlType, GgufFile, GgufWriter, Value};
use clap::{Args, ValueEnum};
use rayon::prelude::*;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SynthType {
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
}

impl SynthType {
    fn ggml(self) -> GgmlType {
        match self {
            SynthType::F16 => GgmlType::F16,
            SynthType::Q8_0 => GgmlType::Q8_0,
            SynthType::Q4_0 => GgmlType::Q4_0,
            SynthType::Q4_1 => GgmlType::Q4_1,
        }
    }
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Output GGUF file
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Type of every 2D weight (token embedding and output included); norms are F32
    #[arg(long = "type", value_enum, default_value = "q4_0")]
    pub ty: SynthType,
    /// FFN activation
    #[arg(long, default_value = "silu", value_parser = ["silu", "relu"])]
    pub act: String,
    #[arg(long, default_value_t = 4096)]
    pub n_embd: u64,
    #[arg(long, default_value_t = 11008)]
    pub n_ff: u64,
    #[arg(long, default_value_t = 32)]
    pub n_layer: u64,
    #[arg(long, default_value_t = 32)]
    pub n_head: u64,
    #[arg(long, default_value_t = 32)]
    pub n_head_kv: u64,
    /// GGUF whose tokenizer (and so vocabulary size) the model gets [default: the default model]
    #[arg(long)]
    pub tokenizer_from: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// splitmix64: a fast, seedable stream for filling gigabytes.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` with a random tensor of `cols`-long rows whose values have a standard deviation of
/// about 1/sqrt(cols), so activations keep their scale through the layers.
pub(crate) fn fill(buf: &mut [u8], ty: GgmlType, cols: u64, seed: u64) {
    let std = 1.0 / (cols as f32).sqrt();
    let bb = ty.block_bytes();
    let chunk = bb * 4096;
    buf.par_chunks_mut(chunk).enumerate().for_each(|(ci, part)| {
        let mut s = seed ^ mix(ci as u64);
        for word in part.chunks_mut(8) {
            s = mix(s);
            word.copy_from_slice(&s.to_le_bytes()[..word.len()]);
        }
        let half = |v: f32| half::f16::from_f32(v).to_le_bytes();
        match ty {
            GgmlType::F16 => {
                for v in part.chunks_exact_mut(2) {
                    // Uniform in [-sqrt(3) std, sqrt(3) std] from the random bits.
                    let u = u16::from_le_bytes([v[0], v[1]]) as f32 / 65535.0 * 2.0 - 1.0;
                    v.copy_from_slice(&half(u * std * 1.732));
                }
            }
            GgmlType::F32 => {
                for v in part.chunks_exact_mut(4) {
                    let u = u32::from_le_bytes([v[0], v[1], v[2], v[3]]) as f32 / u32::MAX as f32;
                    v.copy_from_slice(&(0.9 + 0.2 * u).to_le_bytes());
                }
            }
            // Random quants with a scale giving the wanted spread: 4-bit codes spread about 4.6
            // steps, 8-bit ones about 74.
            GgmlType::Q4_0 => part.chunks_exact_mut(bb).for_each(|b| b[..2].copy_from_slice(&half(std / 4.6))),
            GgmlType::Q8_0 => part.chunks_exact_mut(bb).for_each(|b| b[..2].copy_from_slice(&half(std / 74.0))),
            GgmlType::Q4_1 => part.chunks_exact_mut(bb).for_each(|b| {
                b[..2].copy_from_slice(&half(std / 4.6));
                b[2..4].copy_from_slice(&half(-7.5 * std / 4.6));
            }),
            _ => unreachable!("synth writes F32, F16, Q8_0, Q4_0 and Q4_1"),
        }
    });
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

pub fn synth(a: SynthArgs) -> Result<()> {
    let divides = |n: u64, d: u64| d != 0 && n.is_multiple_of(d);
    if !(divides(a.n_embd, 32) && divides(a.n_ff, 32) && divides(a.n_embd, a.n_head) && divides(a.n_head, a.n_head_kv)) {
        return Err("shape: n_embd and n_ff must be multiples of 32, n_head must divide n_embd and be a multiple of n_head_kv".into());
    }
    // The loader's own limits: a model ember could not load is not worth hours of writing.
    for (flag, v, max) in [("--n-layer", a.n_layer, 1024), ("--n-embd", a.n_embd, 1 << 16), ("--n-ff", a.n_ff, 1 << 20), ("--n-head", a.n_head, 1024), ("--n-head-kv", a.n_head_kv, 1024)] {
        if v == 0 || v > max {
            return Err(format!("{flag} {v}: use 1 to {max}").into());
        }
    }
    let tok_path = a.tokenizer_from.clone().unwrap_or_else(|| PathBuf::from(super::DEFAULT_MODEL_FILE));
    crate::files::check_output(&a.output, [tok_path.as_path()])?;
    let tok = GgufFile::open(&tok_path).map_err(|e| format!("--tokenizer-from {}: {e}", tok_path.display()))?;
    let vocab = tok.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).map(|t| t.len() as u64).ok_or("the tokenizer source has no tokenizer.ggml.tokens")?;

    let ty = a.ty.ggml();
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("general.name", Value::String(format!("ember-synth {}x{} {} {} (random weights)", a.n_layer, a.n_embd, a.act, ty)));
    for (k, v) in [("block_count", a.n_layer), ("embedding_length", a.n_embd), ("feed_forward_length", a.n_ff), ("attention.head_count", a.n_head), ("attention.head_count_kv", a.n_head_kv), ("context_length", 4096), ("vocab_size", vocab), ("rope.dimension_count", a.n_embd / a.n_head)] {
        w.set(&format!("llama.{k}"), Value::U32(v as u32));
    }
    w.set("llama.rope.freq_base", Value::F32(10000.0));
    w.set("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
    if a.act == "relu" {
        w.set("ember.ffn_activation", Value::String("relu".into()));
    }
    for (k, v) in tok.metadata() {
        if k.starts_with("tokenizer.") {
            w.set(k, v.clone());
        }
    }
    let (e, ff, kv) = (a.n_embd, a.n_ff, a.n_embd / a.n_head * a.n_head_kv);
    w.add_generated("token_embd.weight", &[e, vocab], ty);
    w.add_generated("output_norm.weight", &[e], GgmlType::F32);
    w.add_generated("output.weight", &[e, vocab], ty);
    for l in 0..a.n_layer {
        let n = |s: &str| format!("blk.{l}.{s}");
        w.add_generated(&n("attn_norm.weight"), &[e], GgmlType::F32);
        w.add_generated(&n("attn_q.weight"), &[e, e], ty);
        w.add_generated(&n("attn_k.weight"), &[e, kv], ty);
        w.add_generated(&n("attn_v.weight"), &[e, kv], ty);
        w.add_generated(&n("attn_output.weight"), &[e, e], ty);
        w.add_generated(&n("ffn_norm.weight"), &[e], GgmlType::F32);
        w.add_generated(&n("ffn_gate.weight"), &[e, ff], ty);
        w.add_generated(&n("ffn_up.weight"), &[e, ff], ty);
        w.add_generated(&n("ffn_down.weight"), &[ff, e], ty);
    }
    // Each tensor is generated in memory, then written: the largest must fit in memory, the
    // whole file on disk (sizes within the limits above cannot overflow a u64).
    let (tensor_max, total) = w.tensor_sizes();
    if let Some(avail) = super::available_memory() {
        if tensor_max > avail / 2 {
            return Err(format!("the largest tensor takes {:.1} GiB, more than half the {:.1} GiB of memory available; choose a smaller --n-embd, --n-ff or --type", gib(tensor_max), gib(avail)).into());
        }
    }
    if let Some(free) = crate::files::free_space(&a.output) {
        if total > free {
            return Err(format!("{}: the model takes {:.1} GiB, more than the {:.1} GiB free there", a.output.display(), gib(total), gib(free)).into());
        }
    }
    let n_tensors = 3 + 9 * a.n_layer;
    let bar = indicatif::ProgressBar::new(n_tensors);
    bar.set_style(indicatif::ProgressStyle::with_template("ember: writing {msg} {bar:30} {pos}/{len} tensors").unwrap());
    bar.set_message(a.output.display().to_string());
    let mut index = 0u64;
    crate::files::write_atomic(&a.output, |out| {
        w.write_generated(out, &mut |name, t, buf| {
            let cols = if name.ends_with("ffn_down.weight") { ff } else { e };
            fill(buf, t, cols, mix(a.seed ^ mix(index)));
            index += 1;
            bar.inc(1);
        })
    })
    .map_err(|e| format!("{}: {e}", a.output.display()))?;
    bar.finish_and_clear();
    let size = std::fs::metadata(&a.output)?.len();
    eprintln!("ember: wrote {} ({:.2} GiB, {} layers, {ty} weights, {} FFN, random weights: for speed tests only)", a.output.display(), size as f64 / (1u64 << 30) as f64, a.n_layer, a.act);
    Ok(())
}
