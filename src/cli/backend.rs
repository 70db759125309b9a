//! Turning `--backend`/`--device` into a [`Forward`] implementation.

use super::{Backend, ModelArgs, Result};
use crate::engine::{FfnMode, Forward, GpuSession, GpuWeights, Session, SparseFfn};
use crate::sparse::predictor::Predictors;
use crate::sparse::threshold::ThresholdCalibrator;
use std::path::PathBuf;
use crate::gpu::{DeviceChoice, GpuContext};
use crate::model::Model;
use std::sync::Arc;

/// The backend the flags ask for, with the model loaded onto it.
pub fn open(args: &ModelArgs, model: Arc<Model>, n_ctx: usize) -> Result<Box<dyn Forward>> {
    let gpu = |choice: DeviceChoice| -> Result<Box<dyn Forward>> {
        let ctx = Arc::new(GpuContext::new(&choice)?);
        let start = std::time::Instant::now();
        let weights = Arc::new(GpuWeights::upload(&ctx, &model, true)?);
        let session = GpuSession::new(model.clone(), ctx.clone(), weights.clone(), n_ctx)?;
        eprintln!(
            "ember: GPU {} ({:?}): weights {:.1} MiB + KV cache {:.1} MiB uploaded in {:.2} s",
            ctx.adapter.name,
            ctx.adapter.backend,
            weights.bytes as f64 / (1u64 << 20) as f64,
            session.state_bytes() as f64 / (1u64 << 20) as f64,
            start.elapsed().as_secs_f64()
        );
        Ok(Box::new(session))
    };
    let sparse = sparse_ffn(args, &model)?;
    let cpu = || -> Box<dyn Forward> {
        let mut s = Session::new(model.clone(), n_ctx);
        s.precision = args.precision.into();
        if let Some(f) = &sparse {
            s = s.with_ffn(f.clone());
        }
        Box::new(s)
    };
    if sparse.is_some() && args.backend != Backend::Cpu {
        return Err(format!("--ffn {} runs on the CPU for now; add --backend cpu", FfnMode::from(args.ffn).name()).into());
    }
    let explicit = args.device.as_deref().map(|d| d.parse::<DeviceChoice>().unwrap());
    match (args.backend, explicit) {
        (Backend::Cpu, _) => Ok(cpu()),
        (Backend::Gpu, choice) => gpu(choice.unwrap_or(DeviceChoice::BestOrSoftware)),
        (Backend::Auto, Some(choice)) => gpu(choice),
        (Backend::Auto, None) => match GpuContext::new(&DeviceChoice::Best) {
            // Probing opened a device; the real one is opened again (cheap) by `gpu`.
            Ok(_) => gpu(DeviceChoice::Best),
            Err(crate::gpu::GpuError::OnlySoftware(name)) => {
                eprintln!("ember: running on the CPU ({name} is a software adapter; --backend gpu would use it)");
                Ok(cpu())
            }
            Err(e) => {
                eprintln!("ember: running on the CPU (no usable GPU: {e})");
                Ok(cpu())
            }
        },
    }
}

/// The neuron-aware FFN the flags ask for (None for `--ffn dense`).
pub fn sparse_ffn(args: &ModelArgs, model: &Arc<Model>) -> Result<Option<Arc<SparseFfn>>> {
    let mode = FfnMode::from(args.ffn);
    if mode == FfnMode::Dense {
        return Ok(None);
    }
    let predictors = match mode {
        FfnMode::Predict => Some(Arc::new(load_predictors(args, model)?)),
        _ => None,
    };
    let thresholds = match mode {
        FfnMode::Threshold => calibrate_thresholds(args, model)?,
        _ => Vec::new(),
    };
    let ffn = SparseFfn::new(model, mode, predictors, thresholds, args.precision.into(), true)?;
    Ok(Some(Arc::new(ffn)))
}

/// `--predictor FILE`, else `MODEL.predictors.gguf` beside the model, else the model's own.
fn load_predictors(args: &ModelArgs, model: &Arc<Model>) -> Result<Predictors> {
    let model_path = args.resolve_model()?;
    let beside = PathBuf::from(format!("{}.predictors.gguf", model_path.display()));
    let path = args.predictor.clone().or_else(|| beside.exists().then_some(beside));
    let p = match path {
        Some(p) => Predictors::load(&p).map_err(|e| format!("{}: {e}", p.display()))?,
        None => Predictors::from_gguf(model.file.clone()).map_err(|e| format!("{}: {e}; train predictors with `ember profile` and `ember train-predictor`, then pass --predictor FILE", model_path.display()))?,
    };
    eprintln!("ember: predictors: {} layers, {:.1} MiB", p.layers.len(), p.n_bytes() as f64 / (1u64 << 20) as f64);
    Ok(p)
}

/// Runs the first 512 tokens of `--calibration` densely and derives per-layer thresholds.
fn calibrate_thresholds(args: &ModelArgs, model: &Arc<Model>) -> Result<Vec<f32>> {
    let Some(path) = &args.calibration else {
        return Err("--ffn threshold needs --calibration FILE: a text whose activations set the per-layer thresholds".into());
    };
    if !(0.0..1.0).contains(&args.ffn_sparsity) {
        return Err(format!("--ffn-sparsity {}: use a fraction in [0, 1)", args.ffn_sparsity).into());
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let tok = crate::tokenizer::Tokenizer::from_gguf(&model.file)?;
    let mut ids = tok.encode(&text, true, false)?;
    ids.truncate(512);
    if ids.len() < 16 {
        return Err(format!("{}: too short to calibrate on ({} tokens; at least 16)", path.display(), ids.len()).into());
    }
    let calib = Arc::new(std::sync::Mutex::new(ThresholdCalibrator::new(model.hp.activation, model.hp.n_layer)));
    let mut s = Session::new(model.clone(), ids.len());
    s.precision = args.precision.into();
    s.observer = Some(Box::new(calib.clone()));
    s.forward(&ids, crate::engine::Logits::All)?;
    let t = calib.lock().unwrap().thresholds(args.ffn_sparsity);
    eprintln!("ember: thresholds for sparsity {} calibrated on {} tokens of {}", args.ffn_sparsity, ids.len(), path.display());
    Ok(t)
}
