//! Weight matrices on the GPU (repacked layouts) and their matrix-product kernels.

/// (file name, source) of this module's kernels.
pub const SHADERS: &[(&str, &str)] = &[];
