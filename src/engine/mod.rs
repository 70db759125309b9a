//! Running a model: the forward pass over a KV cache, sampling and the generation loop.

pub mod forward;
pub mod generate;
pub mod gpu_forward;
pub mod offload;
pub mod perplexity;
pub mod sampler;

pub use forward::{Forward, ForwardError, Logits, Session};
pub use gpu_forward::{GpuSession, GpuWeights};
pub use offload::OffloadSession;
pub use generate::{generate, Generation, StopReason, Timings};
pub use sampler::{Sampler, SamplerConfig};
