//! The forward pass's other kernels: norms, RoPE with the KV-cache write, attention,
//! activations, argmax.

/// (file name, source) of this module's kernels.
pub const SHADERS: &[(&str, &str)] = &[];
