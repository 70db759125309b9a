//! Activation sparsity: which FFN neurons fire (profiles), guessing them ahead of time
//! (predictors), and where each neuron lives under a VRAM budget (placement).
//!
//! A *neuron* i of a gated FFN `down(act(gate·x) * (up·x))` is row i of gate, row i of up and
//! column i of down (row i of the transposed `down_t`). With ReLU most neurons are exactly zero
//! per token, so their up row and down column need not be read at all.

pub mod accounting;
pub mod placement;
pub mod powerinfer;
pub mod simulate;
pub mod predictor;
pub mod profile;
pub mod threshold;
pub mod train;

/// Sees every FFN block the CPU forward pass runs, one token at a time: the profiler counts
/// firing neurons through it and collects predictor training samples.
pub trait FfnObserver: Send {
    /// `resid`: the residual stream entering the FFN block (before its RMSNorm; PowerInfer's
    /// predictor input for llama models), `n_embd` values. `gate_pre`: the gate projection
    /// before the activation, `n_ff` values; `up_pre`: the up projection, `n_ff` values.
    /// Neuron i fires when its hidden value can be non-zero
    /// ([`profile::fires`]`(act, gate_pre[i], up_pre[i])`: the gate's activation, and for
    /// dReLU the up value's ReLU too).
    fn observe(&mut self, layer: usize, resid: &[f32], gate_pre: &[f32], up_pre: &[f32]);
}
