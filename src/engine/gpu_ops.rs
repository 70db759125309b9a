//! What the GPU sessions share below them: the [`Op`] trait through which a session records any
//! dispatch into a compute pass, and its implementations for the kernels' op types. The dense
//! GPU session ([`super::gpu_forward`]) and the hybrid ([`super::hybrid`], which wraps it) both
//! record through it, so neither needs the other's types to build a dispatch sequence.

use crate::gpu::matrix::{GetRowsOp, MatmulOp};
use crate::gpu::ops::{AddOp, ArgmaxOp, AttentionOp, BiasOp, GatedActOp, HeadNormOp, RmsNormOp, RopeKvOp, ScaleOp};
use crate::gpu::sparse::{BatchFfnOp, DenseGateOp, SelectOp, SparseAxpyOp, SparseMatvecOp};

/// Anything that records its dispatches into a compute pass.
pub(super) trait Op {
    fn record(&self, pass: &mut wgpu::ComputePass<'_>, n_tokens: u32);
}

/// A named dispatch of a sequence (the name groups dispatches in profiles).
pub(super) type NamedOp<'a> = (&'static str, &'a dyn Op);

/// Ops whose `encode` takes the batch's token count.
macro_rules! impl_op {
    ($($t:ty),*) => {$(
        impl Op for $t {
            fn record(&self, pass: &mut wgpu::ComputePass<'_>, n_tokens: u32) {
                self.encode(pass, n_tokens)
            }
        }
    )*};
}
impl_op!(RmsNormOp, HeadNormOp, MatmulOp, BiasOp, RopeKvOp, AttentionOp, AddOp, GatedActOp, ArgmaxOp, GetRowsOp, BatchFfnOp, ScaleOp);

/// The sparse kernels' ops: one token each, their sizes fixed when bound.
macro_rules! impl_op_one_token {
    ($($t:ty),*) => {$(
        impl Op for $t {
            fn record(&self, pass: &mut wgpu::ComputePass<'_>, _n_tokens: u32) {
                self.encode(pass)
            }
        }
    )*};
}
impl_op_one_token!(DenseGateOp, SelectOp, SparseMatvecOp, SparseAxpyOp);
