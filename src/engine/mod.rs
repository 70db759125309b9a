//! Running a model: the forward pass over a KV cache, sampling and the generation loop.

pub mod batch;
pub mod builder;
pub mod cold;
pub mod ffn;
pub mod forward;
pub mod generate;
pub mod gpu_batch;
pub mod gpu_forward;
mod gpu_ops;
pub mod host_attention;
pub mod hybrid;
pub mod offload;
pub mod perplexity;
pub mod sampler;
pub mod slots;

pub use ffn::{FfnMode, SparseFfn};
pub use forward::{FfnStats, Forward, ForwardError, Logits, Session};
pub use gpu_batch::GpuBatch;
pub use gpu_forward::{GpuSession, GpuWeights};
pub use hybrid::{AttentionPlace, HotSubmit, HybridError, HybridTuning, HybridPlan, HybridSession, PrefillConfig, StreamConfig};
pub use offload::OffloadSession;
pub use generate::{generate, generate_cancellable, Generation, StopReason, Timings};
pub use sampler::{Sampler, SamplerConfig};
