//! Dense layer offload, llama.cpp's `-ngl N`: the first N layers run on the GPU, the rest and
//! the output head on the CPU; the hidden state crosses the bus once per batch. The baseline
//! the hybrid hot/cold executor is measured against at the same VRAM budget.

use super::forward::{check_batch, Forward, ForwardError, Logits, Session};
use super::gpu_forward::{GpuSession, GpuWeights};
use crate::gpu::{GpuContext, GpuError};
use crate::model::Model;
use std::sync::Arc;

pub struct OffloadSession {
    gpu: GpuSession,
    cpu: Session,
    n_gpu_layers: usize,
}

impl OffloadSession {
    /// Uploads the first `n_gpu_layers` layers (all of them runs everything on the GPU but the
    /// head) and prepares the CPU for the rest.
    pub fn new(model: Arc<Model>, ctx: Arc<GpuContext>, n_gpu_layers: usize, n_ctx: usize, max_batch: usize, progress: bool) -> Result<Self, GpuError> {
        // The CPU's share of the layers and the head would follow Gemma, the GPU's would not
        // hand them over with its post-norms and caps in the right places: not yet.
        if let Some(why) = model.hp.gpu_dense_only() {
            return Err(GpuError::Unsupported(why));
        }
        let n_gpu_layers = n_gpu_layers.min(model.hp.n_layer);
        let mut weights = GpuWeights::upload_layers(&ctx, &model, n_gpu_layers, true, progress)?;
        // The CPU computes the head, even when every layer is on the GPU.
        weights.head = None;
        let gpu = GpuSession::with_batch(model.clone(), ctx, Arc::new(weights), n_ctx, max_batch)?;
        let cpu = Session::new(model, n_ctx);
        Ok(OffloadSession { gpu, cpu, n_gpu_layers })
    }

    pub fn n_gpu_layers(&self) -> usize {
        self.n_gpu_layers
    }

    /// The CPU half, e.g. to set its precision.
    pub fn cpu_mut(&mut self) -> &mut Session {
        &mut self.cpu
    }
}

impl Forward for OffloadSession {
    fn forward(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>, ForwardError> {
        check_batch(&self.cpu.model.hp, self.cpu.n_past(), self.cpu.n_ctx(), tokens)?;
        let mut out = Vec::new();
        let chunks: Vec<&[u32]> = tokens.chunks(self.gpu.max_tokens()).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let x = self.gpu.forward_hidden(chunk)?;
            // Only the last chunk's last row matters for Logits::Last.
            let logits = self.cpu.run_layers(x, self.n_gpu_layers, want)?;
            if want == Logits::All || i + 1 == chunks.len() {
                out.extend(logits);
            }
        }
        Ok(out)
    }

    fn n_past(&self) -> usize {
        self.cpu.n_past()
    }

    fn n_ctx(&self) -> usize {
        self.cpu.n_ctx()
    }

    fn reset(&mut self) {
        self.gpu.reset();
        self.cpu.reset();
    }

    fn model(&self) -> &Arc<Model> {
        self.cpu.model()
    }

    fn backend_name(&self) -> String {
        format!("GPU {} + CPU (offload {} layers)", self.gpu.backend_name().trim_start_matches("GPU "), self.n_gpu_layers)
    }
}
