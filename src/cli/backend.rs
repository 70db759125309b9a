//! Turning `--backend`/`--device` and the sparse flags into [`SessionOptions`] for the
//! library's session builder ([`crate::engine::builder`]), which opens the session.

use super::{Backend, ModelArgs, Result};
use crate::engine::builder::{self, BackendChoice, DerivedFiles, SessionOptions};
use crate::engine::Forward;
use crate::gpu::{DeviceChoice, GpuContext};
use crate::model::Model;
use crate::sparse::placement::parse_budget;
use std::sync::Arc;

/// The backend the flags ask for, with the model loaded onto it.
pub fn open(args: &ModelArgs, model: Arc<Model>, n_ctx: usize) -> Result<Box<dyn Forward>> {
    Ok(open_with_context(args, model, n_ctx)?.0)
}

/// A session and the GPU context it runs on (None on the CPU).
pub type Opened = (Box<dyn Forward>, Option<Arc<GpuContext>>);

/// [`open`] for a known workload: decode tokens attend over `kv_depth` positions on average
/// (`SessionOptions::kv_depth`: a hybrid values its KV caches by it), unless --kv-depth says.
pub fn open_for_depth(args: &ModelArgs, model: Arc<Model>, n_ctx: usize, kv_depth: usize) -> Result<Box<dyn Forward>> {
    let mut opts = session_options(args)?;
    opts.kv_depth = opts.kv_depth.or(Some(kv_depth));
    Ok(builder::open(&opts, model, n_ctx, &log)?.session)
}

/// [`open`], and the GPU context it runs on (None on the CPU), whose memory the caller can
/// check after running batches.
pub fn open_with_context(args: &ModelArgs, model: Arc<Model>, n_ctx: usize) -> Result<Opened> {
    let opts = session_options(args)?;
    let o = builder::open(&opts, model, n_ctx, &log)?;
    Ok((o.session, o.gpu))
}

/// What the builder says, as ember's other diagnostics: on stderr.
pub fn log(line: &str) {
    eprintln!("ember: {line}");
}

/// The library's options for these flags (the model path resolved, fetched when missing).
pub fn session_options(args: &ModelArgs) -> Result<SessionOptions> {
    let model_path = args.resolve_model()?;
    // Parsed only where it is used: commands that never simulate leave it empty.
    let simulate_predictor = match &args.simulate_activity {
        Some(_) => args.simulate_predictor.parse().map_err(|e| format!("--simulate-predictor {}: {e}", args.simulate_predictor))?,
        None => Default::default(),
    };
    // Profiles and predictors are read from the cache, else from beside the model (older
    // runs put them there); placements are written to the cache only.
    let derived = super::cache::derived(&model_path)?;
    let beside = DerivedFiles::beside(&model_path);
    let found = |suffix: &str| -> Option<std::path::PathBuf> {
        let p = beside.path(suffix);
        (!derived.path(suffix).exists() && p.exists()).then_some(p)
    };
    Ok(SessionOptions {
        act_profile: args.act_profile.clone().or_else(|| found(".profile.gguf")),
        predictor: args.predictor.clone().or_else(|| found(".predictors.gguf")),
        derived,
        model_path,
        backend: match args.backend {
            Backend::Auto => BackendChoice::Auto,
            Backend::Cpu => BackendChoice::Cpu,
            Backend::Gpu => BackendChoice::Gpu,
        },
        device: args.device.as_deref().map(|d| d.parse::<DeviceChoice>().unwrap()),
        precision: args.precision.into(),
        // The tuning goes in before any weight is uploaded: --gpu-precision fixes the layout too.
        gpu_tuning: super::gpu_tuning(args.gpu_precision, &[])?,
        cpu_tuning: super::cpu_tuning(&[])?,
        hybrid_tuning: super::hybrid_tuning(&[])?,
        ffn: args.ffn.into(),
        ffn_sparsity: args.ffn_sparsity,
        calibration: args.calibration.clone(),
        vram_budget: args.vram_budget.as_deref().map(parse_budget).transpose()?,
        prefill_batch: args.prefill_batch as usize,
        stream_min_batch: args.stream_min_batch as usize,
        placement: args.placement.clone(),
        n_gpu_layers: args.n_gpu_layers,
        simulate_activity: args.simulate_activity.clone(),
        simulate_predictor,
        kv_depth: args.kv_depth,
        n_seqs: 1,
    })
}

/// Checks the GPU memory of `ctx` against `--vram-budget` after `when` (setup, the largest
/// batch) and prints it; an error when over.
pub fn check_gpu_memory(args: &ModelArgs, ctx: &GpuContext, when: &str) -> Result<()> {
    let budget = args.vram_budget.as_deref().map(parse_budget).transpose()?;
    Ok(builder::check_gpu_memory(budget, ctx, when, &log)?)
}
