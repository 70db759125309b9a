//! Turning `--backend`/`--device` into a [`Forward`] implementation.

use super::{Backend, ModelArgs, Result};
use crate::engine::{Forward, GpuSession, GpuWeights, Session};
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
    let cpu = || -> Box<dyn Forward> {
        let mut s = Session::new(model.clone(), n_ctx);
        s.precision = args.precision.into();
        Box::new(s)
    };
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
