//! Running a model: the forward pass over a KV cache, sampling and the generation loop.

pub mod forward;
pub mod generate;
pub mod perplexity;
pub mod sampler;

pub use forward::{ForwardError, Logits, Session};
pub use generate::{generate, Generation, StopReason, Timings};
pub use sampler::{Sampler, SamplerConfig};
