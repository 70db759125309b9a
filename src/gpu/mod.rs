//! The WebGPU backend: a context owning the device, WGSL kernels from `shaders/`, and the
//! dispatchers that run them.

mod context;
mod kquant;
pub mod matrix;
pub mod ops;
pub mod shaders;
mod spec;
pub mod sparse;
pub mod timer;
pub mod tuning;
pub mod upload;

pub use spec::ShaderSpec;
pub use tuning::GpuTuning;
pub use context::{list_adapters, AdapterSummary, DeviceChoice, GpuContext, GpuMemory, PLANNING_MARGIN, STAGING_CAP};

/// Per-forward values every kernel may read, in one uniform buffer written once per forward
/// call, so that bind groups can be built once per model.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Step {
    /// Tokens in this batch (1 for decode).
    pub n_tokens: u32,
    /// Position of the batch's first token.
    pub pos0: u32,
    /// Keys in the cache after this batch: pos0 + n_tokens.
    pub n_kv: u32,
    /// The batch's first row in q, k, v and the attention output, for RoPE with the KV write
    /// and decode attention: 0 but in a batched decode's per-sequence steps, where each
    /// sequence's token sits at its own row of the batch (`engine::gpu_batch`). Other kernels
    /// ignore it. (Named as padding for the many callers that write 0.)
    pub _pad: u32,
}

use thiserror::Error;

#[derive(Debug, Error)]
pub enum GpuError {
    #[error("no GPU adapter found (no Vulkan, Metal or DX12 driver?). On Linux install a Vulkan driver, e.g. mesa-vulkan-drivers and libvulkan1; or use --backend cpu")]
    NoAdapter,
    #[error("only a software or OpenGL adapter is available ({0}); pass --backend gpu to use it anyway, or --backend cpu")]
    OnlySoftware(String),
    #[error("no adapter with {0} among {1} (see `ember devices`)")]
    NoSuchDevice(String, usize),
    #[error("cannot open {0}: {1}")]
    Device(String, String),
    #[error("GPU device lost or failed: {0}")]
    Lost(String),
    #[error("{0}")]
    Unsupported(String),
}
