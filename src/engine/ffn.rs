//! How each layer's FFN block is computed on the CPU: densely, or only for the neurons that
//! fire (neuron-aware: gathered up/gate rows, AXPY over the transposed down matrix).

use crate::cpu::ops::{activate, gated};
use crate::cpu::sparse::{axpy_rows, ffn_over_ranges, gated_ffn_rows, matvec_rows, matvec_rows_pair, transpose_matrix, NeuronBundle};
use crate::cpu::{matmul, Activations, Precision};
use crate::model::{Activation, Matrix, Model};
use crate::sparse::predictor::Predictors;
use rayon::prelude::*;
use std::sync::Arc;

/// `--ffn`: which neurons of each FFN block are computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FfnMode {
    /// Every neuron: three matrix products (the reference).
    #[default]
    Dense,
    /// The gate for every neuron, then up rows and down columns only where relu(gate) > 0:
    /// the dense result up to float reassociation (ReLU models only).
    Relu,
    /// A per-layer predictor chooses the neurons before the FFN runs; gate, up and down only
    /// for those (PowerInfer's scheme).
    Predict,
    /// The gate for every neuron, then only neurons with |act(gate)| above a per-layer
    /// threshold calibrated to a target sparsity (CATS-style, for SiLU models).
    Threshold,
}

impl FfnMode {
    pub fn name(self) -> &'static str {
        match self {
            FfnMode::Dense => "dense",
            FfnMode::Relu => "relu",
            FfnMode::Predict => "predict",
            FfnMode::Threshold => "threshold",
        }
    }
}

/// Everything a sparse FFN needs beyond the model's weights.
pub struct SparseFfn {
    pub mode: FfnMode,
    /// Per layer, `ffn_down` transposed: row i is neuron i's output column, contiguous.
    pub down_t: Vec<Matrix>,
    pub predictors: Option<Arc<Predictors>>,
    /// Per layer |act(gate)| thresholds ([`FfnMode::Threshold`]).
    pub thresholds: Vec<f32>,
    /// Per layer, up and `down_t` rows neuron by neuron ([`Self::with_bundles`]); empty when
    /// not built. CPU sessions use them; the hybrid's CPU side reads the matrices.
    pub bundles: Vec<NeuronBundle>,
}

/// Per-token buffers of the sparse FFN, reused across tokens.
#[derive(Default)]
pub struct FfnScratch {
    gate: Vec<f32>,
    up: Vec<f32>,
    h: Vec<f32>,
    pub active: Vec<u32>,
}

/// Why a sparse FFN cannot be set up for a model.
#[derive(Debug, thiserror::Error)]
pub enum FfnError {
    #[error("--ffn relu needs a ReLU or dReLU model (ember.ffn_activation = relu or drelu); this one uses {0}: try --ffn threshold")]
    NotRelu(&'static str),
    #[error("--ffn predict needs predictors: pass --predictor FILE (made by `ember train-predictor`) or use a PowerInfer model that carries blk.N.fc1/fc2")]
    NoPredictors,
    #[error("--ffn threshold needs per-layer thresholds: pass --ffn-sparsity with a calibration text")]
    NoThresholds,
    #[error("predictors do not fit this model: {0}")]
    PredictorShape(String),
    #[error("cannot transpose {0}: {1}")]
    Transpose(String, String),
    #[error("the neuron-aware FFN (--ffn, the hybrid) does not run {0} models yet (their GeGLU FFN has no sparse path): use the dense FFN (--ffn dense) on the CPU")]
    Unsupported(String),
}

impl SparseFfn {
    /// Prepares `mode` for `model`: the transposed down matrices (the file's `ffn_down_t` when
    /// it has one, else transposed now, in parallel, with a progress bar when asked).
    ///
    /// With [`Precision::F32`] the transposed down matrix is kept in f32, which holds every
    /// dequantised weight exactly, so the sparse result differs from the dense one only by
    /// summation order; with the default 8-bit precision it is re-quantised to Q8_0 (4x fewer
    /// bytes to read; the dense path quantises its activations to 8 bits as well).
    pub fn new(model: &Model, mode: FfnMode, predictors: Option<Arc<Predictors>>, thresholds: Vec<f32>, precision: Precision, progress: bool) -> Result<SparseFfn, FfnError> {
        Self::build(model, mode, predictors, thresholds, precision, false, progress)
    }

    /// Predict mode whose active sets come from outside ([`Self::token_with`]): simulated
    /// activity for benchmarks of models without trained predictors.
    pub fn simulated(model: &Model, precision: Precision, progress: bool) -> Result<SparseFfn, FfnError> {
        Self::build(model, FfnMode::Predict, None, Vec::new(), precision, true, progress)
    }

    fn build(model: &Model, mode: FfnMode, predictors: Option<Arc<Predictors>>, thresholds: Vec<f32>, precision: Precision, simulated: bool, progress: bool) -> Result<SparseFfn, FfnError> {
        let hp = &model.hp;
        // GeGLU's gate never rules a neuron out, nothing measured its sparsity, and the sparse
        // paths have no post-FFN norm (Gemma).
        if mode != FfnMode::Dense && (hp.activation == Activation::GeluTanh || hp.post_norms) {
            return Err(FfnError::Unsupported(hp.arch.clone()));
        }
        match mode {
            FfnMode::Relu if !hp.activation.gate_is_relu() => return Err(FfnError::NotRelu(hp.activation.name())),
            FfnMode::Predict if predictors.is_none() && !simulated => return Err(FfnError::NoPredictors),
            FfnMode::Threshold if thresholds.len() != hp.n_layer => return Err(FfnError::NoThresholds),
            _ => {}
        }
        if let Some(p) = &predictors {
            p.check_model(hp).map_err(|e| FfnError::PredictorShape(e.to_string()))?;
        }
        let down_t = transposed_downs(model, precision, progress)?;
        Ok(SparseFfn { mode, down_t, predictors, thresholds, bundles: Vec::new() })
    }

    /// Adds the per-neuron bundles of up and `down_t` rows that the CPU path reads (another
    /// copy of two thirds of the FFN weights), so that a CPU session's tokens run through
    /// [`ffn_over_ranges`].
    pub fn with_bundles(mut self, model: &Model) -> Self {
        self.bundles = model.layers.par_iter().zip(&self.down_t).map(|(l, down_t)| NeuronBundle::new(&l.ffn_up, down_t)).collect();
        self
    }

    /// Whether a neuron of layer `il` whose gate pre-activation is `g` is computed, in the modes
    /// that compute the gate first (dense, relu, threshold).
    pub(crate) fn keeps(&self, il: usize, act: Activation, g: f32) -> bool {
        match self.mode {
            FfnMode::Dense => true,
            // ReLU: exactly the neurons whose activation is non-zero. dReLU: those whose gate
            // is positive, a superset (the up value's sign is known only once its row is read;
            // a neuron with a negative one then contributes exactly zero).
            FfnMode::Relu => g > 0.0,
            FfnMode::Threshold => activate(act, g).abs() > self.thresholds[il],
            FfnMode::Predict => unreachable!("predict mode does not select by the gate"),
        }
    }

    /// One token's FFN output for layer `il` (overwrites `out`, n_embd values) from its
    /// normalised input `xn` and the residual stream `resid` entering the block (the
    /// predictor's input), over the neurons in `owned` (ascending; None = all of them; the
    /// hybrid executor's CPU side owns the cold ones). Returns how many neurons were computed.
    #[allow(clippy::too_many_arguments)]
    pub fn token(&self, model: &Model, il: usize, resid: &[f32], xn: &[f32], owned: Option<&[u32]>, precision: Precision, s: &mut FfnScratch, out: &mut [f32]) -> usize {
        self.token_with(model, il, resid, xn, owned, None, precision, s, out)
    }

    /// [`token`](Self::token) with, in predict mode, the active set `given` (ascending) instead
    /// of the predictor's: simulated activity in benchmarks.
    #[allow(clippy::too_many_arguments)]
    pub fn token_with(&self, model: &Model, il: usize, resid: &[f32], xn: &[f32], owned: Option<&[u32]>, given: Option<&[u32]>, precision: Precision, s: &mut FfnScratch, out: &mut [f32]) -> usize {
        let layer = &model.layers[il];
        let ff = model.hp.n_ff;
        let act = model.hp.activation;
        s.gate.resize(ff, 0.0);
        s.active.clear();
        let acts = Activations::new(xn, 1).with_precision(precision);
        if let (Some(bundle), None, None) = (self.bundles.get(il), owned, given) {
            return self.token_by_ranges(model, il, resid, &acts, bundle, out);
        }
        match self.mode {
            FfnMode::Dense | FfnMode::Relu | FfnMode::Threshold => {
                match owned {
                    None => matmul(&layer.ffn_gate, &acts, &mut s.gate),
                    Some(rows) => matvec_rows(&layer.ffn_gate, &acts, rows, &mut s.gate),
                }
                let keep = |g: f32| self.keeps(il, act, g);
                match owned {
                    None => s.active.extend((0..ff as u32).filter(|&i| keep(s.gate[i as usize]))),
                    Some(rows) => s.active.extend(rows.iter().copied().filter(|&i| keep(s.gate[i as usize]))),
                }
            }
            FfnMode::Predict => {
                match given {
                    Some(set) => s.active.extend_from_slice(set),
                    None => self.predictors.as_ref().expect("checked in new").layers[il].active(resid, &mut s.active),
                }
                if let Some(rows) = owned {
                    retain_sorted_intersection(&mut s.active, rows);
                }
            }
        }
        // Relu and threshold modes computed the gate above; predict computes it per neuron.
        let given = self.mode != FfnMode::Predict;
        // Both ways give the same bits (tested). The fused pass reads each neuron's three rows
        // together in one parallel region, but its tasks are the AXPY's chunks: with many
        // threads (16 on the GPU host) too few to balance, so there the row products run as
        // their own finely split region first (measured: 9.5 vs 11.2 ms per token of cold
        // neurons for a 7B model on 16 threads).
        if rayon::current_num_threads() <= 4 {
            gated_ffn_rows(&layer.ffn_gate, &layer.ffn_up, &self.down_t[il], &acts, act, given.then_some(s.gate.as_slice()), &s.active, out);
        } else {
            s.up.resize(ff, 0.0);
            s.h.resize(ff, 0.0);
            match given {
                true => matvec_rows(&layer.ffn_up, &acts, &s.active, &mut s.up),
                false => matvec_rows_pair(&layer.ffn_gate, &layer.ffn_up, &acts, &s.active, &mut s.gate, &mut s.up),
            }
            for &i in &s.active {
                let i = i as usize;
                s.h[i] = gated(act, s.gate[i], s.up[i]);
            }
            axpy_rows(&self.down_t[il], &s.h, &s.active, out);
        }
        s.active.len()
    }
}

impl SparseFfn {
    /// [`token`](Self::token) through the bundles: the neurons chosen range by range inside one
    /// parallel region ([`ffn_over_ranges`]). In predict mode the predictor's logits are
    /// computed first, and a predicted neuron whose activation turns out zero costs its gate
    /// row only. Returns the neurons the mode selected (ReLU: the
    /// firing ones; predict: the predicted ones).
    fn token_by_ranges(&self, model: &Model, il: usize, resid: &[f32], acts: &Activations, bundle: &NeuronBundle, out: &mut [f32]) -> usize {
        let layer = &model.layers[il];
        let act = model.hp.activation;
        let all = |range: std::ops::Range<usize>, list: &mut Vec<u32>| list.extend(range.start as u32..range.end as u32);
        match self.mode {
            FfnMode::Predict => {
                let p = &self.predictors.as_ref().expect("checked in new").layers[il];
                let mut logits = vec![0.0f32; model.hp.n_ff];
                p.predict(resid, &mut logits);
                let predicted = |range: std::ops::Range<usize>, list: &mut Vec<u32>| list.extend(range.filter(|&i| logits[i] >= p.threshold).map(|i| i as u32));
                ffn_over_ranges(&layer.ffn_gate, bundle, acts, act, predicted, |g| activate(act, g) != 0.0, out).gated
            }
            FfnMode::Relu => ffn_over_ranges(&layer.ffn_gate, bundle, acts, act, all, |g| g > 0.0, out).active,
            FfnMode::Threshold => {
                let thr = self.thresholds[il];
                ffn_over_ranges(&layer.ffn_gate, bundle, acts, act, all, |g| activate(act, g).abs() > thr, out).active
            }
            FfnMode::Dense => ffn_over_ranges(&layer.ffn_gate, bundle, acts, act, all, |_| true, out).active,
        }
    }
}

/// Keeps the elements of ascending `a` that are also in ascending `b`.
pub(crate) fn retain_sorted_intersection(a: &mut Vec<u32>, b: &[u32]) {
    let mut j = 0;
    a.retain(|&v| {
        while j < b.len() && b[j] < v {
            j += 1;
        }
        j < b.len() && b[j] == v
    });
}

/// Every layer's down matrix transposed (or the file's own `ffn_down_t`).
pub fn transposed_downs(model: &Model, precision: Precision, progress: bool) -> Result<Vec<Matrix>, FfnError> {
    let bar = if progress { indicatif::ProgressBar::new(model.layers.len() as u64) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(indicatif::ProgressStyle::with_template("ember: transposing ffn_down {bar:30} {pos}/{len} layers").unwrap());
    let out = model
        .layers
        .par_iter()
        .map(|l| {
            let t = match &l.ffn_down_t {
                Some(t) => Ok(t.clone()),
                None => transpose_matrix(&l.ffn_down, if precision == Precision::F32 { crate::gguf::GgmlType::F32 } else { l.ffn_down.transpose_type() }).map_err(|e| FfnError::Transpose(l.ffn_down.name.clone(), e.to_string())),
            };
            bar.inc(1);
            t
        })
        .collect();
    bar.finish_and_clear();
    out
}
