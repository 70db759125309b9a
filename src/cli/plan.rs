//! `ember plan`: where each part of a model would live under a VRAM budget, without a GPU.
//! `ember convert`: write a model as a PowerInfer file.

use super::{ModelArgs, Result};
use crate::engine::ffn::transposed_downs;
use crate::engine::host_attention::{choose_attention, cold_reads};
use crate::sparse::simulate::PredictorSim;
use crate::engine::hybrid::hot_neuron_bytes;
use crate::sparse::placement::{parse_budget, place, AttnSite, Bytes, FixedPart, PlacementInput};
use crate::sparse::powerinfer;
use crate::sparse::predictor::Predictors;
use crate::sparse::profile::ActivationProfile;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Context size the KV cache is sized for
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    pub ctx_size: usize,
    /// Also write the placement as a PowerInfer split file (blk.N.gpu_idx / gpu_bucket)
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Let layers' attention and KV cache stay on the host (CPU attention; their q/k/v product
    /// may stay on the GPU, whose weights every token reads whole), chosen together with the
    /// hot neurons, as `ember run`/`bench --vram-budget` place them: what long contexts need
    /// under small budgets. Without it every layer's attention stays on the GPU
    /// (what a placement file without ember's attention record, e.g. PowerInfer's, gives)
    #[arg(long)]
    pub host_attention: bool,
}

/// The plan with estimated sizes: the GPU session measures its real allocations and places
/// neurons in what is really left, so its plan can differ by a few neurons; it never exceeds
/// the budget.
pub fn plan(a: PlanArgs) -> Result<()> {
    let path = a.model.resolve_model()?;
    let (model, _) = super::load(&path)?;
    let hp = &model.hp;
    let budget = parse_budget(a.model.vram_budget.as_deref().ok_or("ember plan needs --vram-budget GIB")?)?;
    let profile_path = match &a.model.act_profile {
        Some(p) => p.clone(),
        None => super::cache::derived_input(&path, ".profile.gguf")?,
    };
    if let Some(out) = &a.output {
        crate::files::check_output(out, [path.as_path(), profile_path.as_path()].into_iter().chain(a.model.predictor.as_deref()).chain(a.model.placement.as_deref()))?;
    }
    // Only the trained context bounds it: plan allocates no KV cache.
    if a.ctx_size == 0 || a.ctx_size > hp.n_ctx_train {
        return Err(format!("-c {}: use 1 to {}, the context the model was trained for", a.ctx_size, hp.n_ctx_train).into());
    }
    let profile = ActivationProfile::load(&profile_path).map_err(|e| format!("{}: {e} (make one with `ember profile -m {} -f TEXT`)", profile_path.display(), path.display()))?;
    // A random-weight model of real shape (`ember synth`) is planned as `--simulate-activity`
    // runs it: with the profile stretched to its shape.
    // Tokens the counts are over: stretched counts are per million.
    let (counts, counts_tokens) = if profile.n_layer() == hp.n_layer && profile.n_ff() == hp.n_ff {
        (profile.counts.clone(), profile.n_tokens())
    } else if a.model.simulate_activity.is_some() {
        (crate::sparse::simulate::stretched_counts(&profile, hp.n_layer, hp.n_ff)?, 1_000_000)
    } else {
        return Err(format!("{}: profile of {} x {} neurons, model {} x {} (add --simulate-activity to stretch it, as benchmarks of random-weight models do)", profile_path.display(), profile.n_layer(), profile.n_ff(), hp.n_layer, hp.n_ff).into());
    };
    let predictor_bytes = match &a.model.predictor {
        Some(p) => Predictors::load(p).map_err(|e| format!("{}: {e}", p.display()))?.n_bytes() as u64,
        None => 0,
    };
    // A hot neuron's GPU bytes, with the transposed down matrix the session would make.
    let f32_down = crate::cpu::Precision::from(a.model.precision) == crate::cpu::Precision::F32;
    let down_t_ty = |l: &crate::model::Layer| match &l.ffn_down_t {
        Some(t) => t.ty,
        None if f32_down => crate::gguf::GgmlType::F32,
        None => l.ffn_down.transpose_type(),
    };
    let neuron_bytes: Vec<u64> = model.layers.iter().map(|l| hot_neuron_bytes(l, down_t_ty(l), hp.n_embd)).collect();
    // What the host reads of a cold neuron, as the session values it.
    let simulated: Option<PredictorSim> = match &a.model.simulate_activity {
        Some(_) => Some(a.model.simulate_predictor.parse().map_err(|e| format!("--simulate-predictor {}: {e}", a.model.simulate_predictor))?),
        None => None,
    };
    let reads = cold_reads(
        &model,
        model.layers.first().map_or(crate::gguf::GgmlType::F32, down_t_ty),
        a.model.ffn.into(),
        simulated.as_ref().filter(|p| !p.is_perfect()).map(|p| (p.recall, p.precision)),
        simulated.as_ref().is_some_and(|p| p.is_perfect()),
    );
    let (p, attn_on_gpu) = if a.host_attention {
        // The session's own choice (same function and arguments), so that both agree.
        // The session keeps room for the prefill streaming area the same way.
        let area = crate::engine::builder::prefill_config(a.model.prefill_batch as usize, a.model.stream_min_batch as usize, Some(budget)).area_bytes(&model, a.ctx_size, Some(budget));
        // As the session values its KV caches: --kv-depth, else half the context.
        let kv_depth = crate::engine::host_attention::kv_depth_for(a.model.kv_depth, a.ctx_size);
        choose_attention(&model, a.ctx_size, kv_depth, budget, &counts, counts_tokens, reads, neuron_bytes, predictor_bytes, crate::gpu::PLANNING_MARGIN + area)?
    } else {
        let mut attention = model.token_embd.n_bytes() as u64 + 4 * hp.n_embd as u64;
        if !model.tied_embeddings {
            attention += model.output.n_bytes() as u64;
        }
        // Per layer: its attention weights and norms, and its KV cache (f16 keys and values).
        attention += model.layers.iter().map(|l| l.attention_bytes() + 8 * hp.n_embd as u64).sum::<u64>();
        let fixed = vec![
            FixedPart { name: "attention, norms, embeddings, output".into(), bytes: attention },
            FixedPart { name: format!("KV cache ({} tokens)", a.ctx_size), bytes: hp.n_layer as u64 * hp.kv_bytes_per_layer(a.ctx_size) },
            FixedPart { name: "predictors".into(), bytes: predictor_bytes },
            // Activations and per-layer sparse buffers (the AXPY's partial sums dominate).
            FixedPart { name: "activations and sparse buffers".into(), bytes: hp.n_layer as u64 * (64 * 4 * hp.n_embd as u64 + 4096) + 16 * hp.n_ff as u64 },
            FixedPart {
                name: "prefill streaming area".into(),
                bytes: crate::engine::builder::prefill_config(a.model.prefill_batch as usize, a.model.stream_min_batch as usize, Some(budget)).area_bytes(&model, a.ctx_size, Some(budget)),
            },
        ];
        let input = PlacementInput { fixed, neuron_bytes, counts, tokens: counts_tokens, reads };
        (place(&input, budget, hp.n_ff)?, vec![AttnSite::Gpu; hp.n_layer])
    };

    println!("budget {} on the GPU, placed in this order (estimated sizes):", Bytes(budget));
    for f in &p.fixed {
        println!("  {:<64} {:>12}", f.name, Bytes(f.bytes).to_string());
    }
    println!("  {:<64} {:>12}  ({} of {} neurons)", "FFN hot neurons", Bytes(p.hot_bytes()).to_string(), p.n_hot(), hp.n_layer * hp.n_ff);
    println!("  {:<64} {:>12}", "free", Bytes(budget - p.used()).to_string());
    println!("\n| layer | hot neurons | of layer | share of the layer's firings on the GPU | attention |");
    println!("| ---: | ---: | ---: | ---: | --- |");
    for (l, (h, c)) in p.hot.iter().zip(&p.covered_per_layer).enumerate() {
        println!("| {l} | {} | {:.1}% | {:.1}% | {} |", h.len(), 100.0 * h.len() as f64 / hp.n_ff as f64, 100.0 * c, match attn_on_gpu[l] {
            AttnSite::Gpu => "GPU",
            AttnSite::Qkv => "q/k/v on the GPU, the rest on the host",
            AttnSite::Host => "host",
        });
    }
    println!("\nexpected share of all FFN firings served by the GPU: {:.1}% (profile: {} tokens)", 100.0 * p.covered, profile.n_tokens());
    if let Some(out) = &a.output {
        let mut w = powerinfer::split_file(&p.hot, hp.n_ff, budget);
        powerinfer::set_attention(&mut w, &attn_on_gpu);
        w.write_file(out).map_err(|e| format!("{}: {e}", out.display()))?;
        println!("wrote the placement to {} (PowerInfer split format)", out.display());
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output file
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: PathBuf,
    /// Write PowerInfer's format: magic PWRI, ffn_down_t (transposed down), predictors as
    /// blk.N.fc1/fc2 (from --predictor)
    #[arg(long)]
    pub powerinfer: bool,
    /// Type of the transposed down matrices: q8_0 (default for quantised models; re-quantising
    /// at 8 bits adds little error), q4_0 (what PowerInfer's Q4_0 models hold: half the bytes,
    /// a second 4-bit rounding), f16, f32
    #[arg(long, value_name = "TYPE")]
    pub down_t_type: Option<String>,
}

pub fn convert(a: ConvertArgs) -> Result<()> {
    if !a.powerinfer {
        return Err("ember convert writes PowerInfer files only for now: pass --powerinfer".into());
    }
    let path = a.model.resolve_model()?;
    crate::files::check_output(&a.output, std::iter::once(path.as_path()).chain(a.model.predictor.as_deref()))?;
    let (model, _) = super::load(&path)?;
    let down_t = match a.down_t_type.as_deref() {
        None => transposed_downs(&model, a.model.precision.into(), true)?,
        Some(name) => {
            let ty = match name.to_ascii_lowercase().as_str() {
                "q8_0" => crate::gguf::GgmlType::Q8_0,
                "q4_0" => crate::gguf::GgmlType::Q4_0,
                "f16" => crate::gguf::GgmlType::F16,
                "f32" => crate::gguf::GgmlType::F32,
                other => return Err(format!("--down-t-type {other}: use q8_0, q4_0, f16 or f32").into()),
            };
            use rayon::prelude::*;
            model.layers.par_iter().map(|l| crate::cpu::sparse::transpose_matrix(&l.ffn_down, ty)).collect::<std::result::Result<Vec<_>, _>>()?
        }
    };
    let predictors = a.model.predictor.as_ref().map(|p| Predictors::load(p).map_err(|e| format!("{}: {e}", p.display()))).transpose()?;
    let w = powerinfer::export_model(&model, &down_t, predictors.as_ref())?;
    w.write_file(&a.output).map_err(|e| format!("{}: {e}", a.output.display()))?;
    eprintln!("ember: wrote {} (PowerInfer format: PWRI, ffn_down_t{})", a.output.display(), if predictors.is_some() { ", fc1/fc2 predictors" } else { "" });
    Ok(())
}
