//! Training activation predictors from profiled samples, on the CPU.
//!
//! Per layer, a low-rank MLP `fc2 · relu(fc1 · x)` learns which neurons fire from the residual
//! stream `x` entering the FFN block (weighted binary cross-entropy, Adam, mini-batches).
//!
//! Where training starts: in a ReLU FFN, neuron i fires when `gate_i · (w ⊙ x) / rms(x) > 0`
//! (`w` the FFN norm's weights), so the exact predictor is the linear map `G' = gate · diag(w)`
//! and the question is only how well a low-rank map copies its signs. Given the model,
//! training starts from the rank-k map closest to `G'` on the sampled inputs (the top-k
//! eigenvectors `U` of `G' C G'ᵀ`, C the inputs' second moments; `G' ≈ U Uᵀ G'`), written with
//! 2k hidden units as `relu(z) - relu(-z) = z`. Without a model (`Init::Random`) it starts from
//! random weights.
//!
//! Biases without a bias: the format has none, and every logit scales with the input's norm.
//! Hidden unit 0 is given the mean direction of the inputs; residual streams share a large
//! common component, so that unit is positive on every token and proportional to its norm, and
//! its fc2 column acts as per-neuron biases (fitted by Newton steps before Adam starts). The
//! recall target is then met by moving all those biases by one amount, chosen on a validation
//! split, which is a threshold on normalised logits; the stored threshold stays 0 (PowerInfer's
//! default). A plain threshold on raw logits would treat tokens by their norm.
//!
//! Inputs are divided by their RMS (the decision does not change when `x` is scaled; this only
//! evens out how much each token weighs in the loss) and by a per-dimension scale (folded into
//! `fc1` afterwards, so the stored predictor takes the raw residual). Adam's steps are relative
//! to each unit's starting size, so a good start is refined rather than wrecked.
//!
//! Rank: a lower bias buys any recall by calling more neurons active, so recall alone cannot
//! choose a rank. For each rank tried (small to large) the bias shift is set on the validation
//! split to reach the recall target; the rank kept is the one needing the least FFN work per
//! token (predictor multiply-adds, n_embd per predicted-active neuron for its gate, 2·n_embd
//! more per firing one for up and down: see [`relative_work`]), and the ladder
//! stops at the first rank that needs more work than the best so far. Reported numbers come
//! from a third, held-out split, computed by the stored (rounded) predictor itself.
//!
//! Determinism: every layer is trained by one task in a fixed order of floating-point
//! operations, seeded by (seed, layer); layers run in parallel. The same seed on the same CPU
//! gives the same bytes whatever the thread count.

use super::predictor::{Predictor, Predictors};
use super::profile::{mix64, LayerSamples, ProfileError, SampleSet, SplitMix};
use crate::gguf::GgmlType;
use crate::model::Model;
use rayon::prelude::*;
use std::time::Instant;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TrainError {
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error("layer {layer}: {n} samples are too few to train, validate and test (need at least {need}; profile more text or raise --samples)")]
    TooFewSamples { layer: usize, n: usize, need: usize },
    #[error("the samples do not fit the model: {0}")]
    Mismatch(String),
    #[error("bad training option: {0}")]
    BadOption(String),
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// Where training starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// From the best low-rank copy of the layer's gate (needs the model).
    Gate,
    /// From random weights.
    Random,
}

#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Share of truly active neurons that must be predicted active (held-out tokens).
    pub recall: f64,
    /// Hidden sizes (ranks) to try, ascending.
    pub ranks: Vec<usize>,
    pub epochs: usize,
    /// Adam's peak learning rate (cosine decay to a tenth).
    pub lr: f32,
    /// Tokens per step.
    pub batch: usize,
    /// Weight of the active class in the cross-entropy (above 1 favours recall).
    pub pos_weight: f32,
    /// Shares of the samples held out for choosing the threshold and rank, and for reporting.
    pub val_fraction: f64,
    pub test_fraction: f64,
    pub seed: u64,
    /// Storage of the predictor matrices (F32, F16 or Q8_0).
    pub ty: GgmlType,
    pub init: Init,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            recall: 0.99,
            ranks: vec![32, 64, 96, 128],
            epochs: 8,
            lr: 2e-2,
            batch: 256,
            pos_weight: 6.0,
            val_fraction: 0.15,
            test_fraction: 0.15,
            seed: 1,
            ty: GgmlType::Q8_0,
            init: Init::Gate,
        }
    }
}

impl TrainOptions {
    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::BadOption(m));
        if !(self.recall > 0.0 && self.recall <= 1.0) {
            return bad(format!("recall target {} must be in (0, 1]", self.recall));
        }
        if self.ranks.is_empty() || self.ranks.iter().any(|&r| r == 0 || r > 1 << 16) {
            return bad(format!("ranks {:?}: give one or more sizes from 1 to 65536", self.ranks));
        }
        if self.batch == 0 || self.epochs > 100_000 {
            return bad(format!("batch {} / epochs {}", self.batch, self.epochs));
        }
        if !(self.lr > 0.0 && self.lr < 1.0 && self.pos_weight > 0.0 && self.pos_weight < 1e4) {
            return bad(format!("learning rate {} / positive weight {}", self.lr, self.pos_weight));
        }
        let held = self.val_fraction + self.test_fraction;
        if !(self.val_fraction > 0.0 && self.test_fraction > 0.0 && held < 0.9) {
            return bad(format!("validation {} and test {} fractions must be positive and leave training data", self.val_fraction, self.test_fraction));
        }
        if ![GgmlType::F32, GgmlType::F16, GgmlType::Q8_0].contains(&self.ty) {
            return bad(format!("storage type {} (F32, F16 or Q8_0)", self.ty));
        }
        Ok(())
    }
}

/// One rank tried on one layer (validation split).
#[derive(Clone, Debug, PartialEq)]
pub struct RankTrial {
    pub rank: usize,
    pub threshold: f32,
    pub recall: f64,
    /// Fraction of neurons predicted active.
    pub active: f64,
    /// FFN work per token relative to the dense FFN (see [`relative_work`]).
    pub work: f64,
}

/// What training one layer gave, measured on its held-out test tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerReport {
    pub layer: usize,
    pub rank: usize,
    pub threshold: f32,
    pub recall: f64,
    pub precision: f64,
    /// Fraction of neurons predicted active per token.
    pub predicted_active: f64,
    /// Fraction of neurons that fired.
    pub true_active: f64,
    pub work: f64,
    pub bytes: usize,
    pub trials: Vec<RankTrial>,
    pub n_train: usize,
    pub n_val: usize,
    pub n_test: usize,
    pub seconds: f64,
}

/// FFN work per token (multiply-adds, which on the CPU are bytes read: every weight is read
/// once) with a predictor of `rank` that calls `predicted` of the neurons active when `truth`
/// of them fire, relative to the dense FFN's 3·n_embd·n_ff. The predictor costs
/// rank·(n_embd + n_ff); each predicted neuron costs its gate row (n_embd), and only those
/// whose gate then lets them through (the firing ones) cost their up and down rows
/// (2·n_embd), which is how the CPU's `--ffn predict` runs. So a false positive costs a third
/// of a true positive, and the rank that minimises this work is the one the ladder keeps.
pub fn relative_work(rank: usize, n_embd: usize, n_ff: usize, predicted: f64, truth: f64) -> f64 {
    let dense = 3.0 * n_embd as f64 * n_ff as f64;
    let per_neuron = n_embd as f64 * n_ff as f64;
    (rank as f64 * (n_embd + n_ff) as f64 + predicted * per_neuron + truth * 2.0 * per_neuron) / dense
}

/// `G' = gate · diag(ffn_norm)` of `layer` (n_ff rows of n_embd): the exact linear predictor
/// of a ReLU layer, and the start of training.
pub fn gate_init(model: &Model, layer: usize) -> Vec<f32> {
    let l = &model.layers[layer];
    let mut out = Vec::with_capacity(l.ffn_gate.rows * l.ffn_gate.cols);
    for r in 0..l.ffn_gate.rows {
        out.extend(l.ffn_gate.row_f32(r).iter().zip(&l.ffn_norm).map(|(g, w)| g * w));
    }
    out
}

/// Trains every layer's predictor from one or more sample sets (of the same model; their
/// tokens are pooled), layers in parallel; `progress` is told of each finished layer.
pub fn train(samples: &[SampleSet], model: Option<&Model>, opts: &TrainOptions, progress: &(dyn Fn(&LayerReport) + Sync)) -> Result<(Predictors, Vec<LayerReport>)> {
    opts.check()?;
    let first = samples.first().ok_or_else(|| TrainError::BadOption("no samples file".into()))?;
    let shape = (first.n_layer, first.n_embd, first.n_ff);
    for s in samples {
        if (s.n_layer, s.n_embd, s.n_ff) != shape {
            return Err(TrainError::Mismatch(format!("sample sets of {:?} and {:?} (layers, n_embd, n_ff)", shape, (s.n_layer, s.n_embd, s.n_ff))));
        }
    }
    if let Some(m) = model {
        let hp = &m.hp;
        if (hp.n_layer, hp.n_embd, hp.n_ff) != shape {
            return Err(TrainError::Mismatch(format!(
                "samples of {} layers {} -> {}, model of {} layers {} -> {}",
                shape.0, shape.1, shape.2, hp.n_layer, hp.n_embd, hp.n_ff
            )));
        }
    }
    let results: Vec<Result<(Predictor, LayerReport)>> = (0..shape.0)
        .into_par_iter()
        .map(|l| {
            let data = pooled(samples, l)?;
            let gate = match (opts.init, model) {
                (Init::Gate, Some(m)) => Some(gate_init(m, l)),
                _ => None,
            };
            let r = train_layer(l, &data, gate.as_deref(), opts)?;
            progress(&r.1);
            Ok(r)
        })
        .collect();
    let mut layers = Vec::new();
    let mut reports = Vec::new();
    for r in results {
        let (p, rep) = r?;
        layers.push(p);
        reports.push(rep);
    }
    let model_name = match model.and_then(|m| m.file.get("general.name")).and_then(|v| v.as_str()) {
        Some(n) => n.to_string(),
        None => first.model_name.clone(),
    };
    Ok((Predictors { layers, model_name }, reports))
}

/// Layer `l` of every sample set, one after another (token positions restart per set).
fn pooled(samples: &[SampleSet], l: usize) -> Result<LayerSamples> {
    let mut all = samples[0].layer(l)?;
    for s in &samples[1..] {
        let more = s.layer(l)?;
        all.n += more.n;
        all.resid.extend_from_slice(&more.resid);
        all.masks.extend_from_slice(&more.masks);
        all.tokens.extend_from_slice(&more.tokens);
    }
    Ok(all)
}

/// The training, validation and test tokens of one layer, inputs normalised.
struct Split {
    train: Vec<usize>,
    val: Vec<usize>,
    test: Vec<usize>,
}

/// Trains one layer. `gate` is [`gate_init`]'s matrix (n_ff x n_embd) or None for random
/// initialisation.
pub fn train_layer(layer: usize, data: &LayerSamples, gate: Option<&[f32]>, opts: &TrainOptions) -> Result<(Predictor, LayerReport)> {
    opts.check()?;
    let start = Instant::now();
    let (n, d, ff) = (data.n, data.n_embd, data.n_ff);
    if let Some(g) = gate {
        if g.len() != d * ff {
            return Err(TrainError::Mismatch(format!("gate of {} values for {ff} x {d}", g.len())));
        }
    }
    let n_val = ((n as f64 * opts.val_fraction).round() as usize).max(1);
    let n_test = ((n as f64 * opts.test_fraction).round() as usize).max(1);
    let need = 8;
    if n < n_val + n_test + need {
        return Err(TrainError::TooFewSamples { layer, n, need: n_val + n_test + need });
    }
    let mut rng = SplitMix(mix64(opts.seed ^ mix64(layer as u64 + 1)));
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(&mut order, &mut rng);
    let split = Split { val: order[..n_val].to_vec(), test: order[n_val..n_val + n_test].to_vec(), train: order[n_val + n_test..].to_vec() };

    // Inputs divided by their RMS, then by each dimension's RMS over the training tokens.
    let mut z = data.resid.clone();
    for row in z.chunks_exact_mut(d) {
        let rms = (row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64).sqrt();
        let inv = if rms > 0.0 { (1.0 / rms) as f32 } else { 0.0 };
        row.iter_mut().for_each(|v| *v *= inv);
    }
    let mut scale = vec![0.0f64; d];
    for &t in &split.train {
        for (s, &v) in scale.iter_mut().zip(&z[t * d..(t + 1) * d]) {
            *s += v as f64 * v as f64;
        }
    }
    let scale: Vec<f32> = scale.iter().map(|&s| ((s / split.train.len() as f64).sqrt() as f32).max(1e-6)).collect();
    for row in z.chunks_exact_mut(d) {
        row.iter_mut().zip(&scale).for_each(|(v, s)| *v /= s);
    }
    let labels = Labels { masks: &data.masks, words: data.words() };

    // The bias unit's input weights: the mean direction of the RMS-normalised inputs (before
    // the per-dimension scale, which would let small dimensions drown the common component),
    // scaled so that the unit's activation is 1 on average. Residual streams share a large
    // common component, so this unit is close to a constant and its fc2 column acts as
    // per-neuron biases (the format has no bias) that scale with the input like every logit.
    // In z = x̂ / s coordinates, m · x̂ = (m ⊙ s) · z.
    let bias_dir: Vec<f32> = {
        let mut m = vec![0.0f64; d];
        for &t in &split.train {
            m.iter_mut().zip(&z[t * d..(t + 1) * d]).for_each(|(a, &v)| *a += v as f64);
        }
        // Mean of x̂ (= mean of z times s), then times s again for z coordinates.
        m.iter_mut().zip(&scale).for_each(|(a, &s)| *a *= s as f64 * s as f64);
        let proj: f64 = split.train.iter().map(|&t| z[t * d..(t + 1) * d].iter().zip(&m).map(|(&v, &a)| v as f64 * a).sum::<f64>()).sum::<f64>() / split.train.len() as f64;
        let c = if proj > 0.0 { 1.0 / proj } else { 0.0 };
        m.iter().map(|&a| (a * c) as f32).collect()
    };

    // The linear map in the scaled input space and its principal directions, once per layer.
    let basis = gate.map(|g| {
        let gz: Vec<f32> = g.chunks_exact(d).flat_map(|row| row.iter().zip(&scale).map(|(a, s)| a * s)).collect();
        let kmax = opts.ranks.iter().max().copied().unwrap_or(1).div_ceil(2).min(ff).min(d);
        let u = top_directions(&gz, &z, &split.train, ff, d, kmax, &mut rng);
        (gz, u)
    });

    let mut trials = Vec::new();
    let mut best: Option<(f64, Predictor)> = None;
    let mut ranks = opts.ranks.clone();
    ranks.sort_unstable();
    ranks.dedup();
    for &rank in &ranks {
        // A predictor whose own cost exceeds the best total cannot win.
        if let Some((w, _)) = &best {
            if relative_work(rank, d, ff, 0.0, 0.0) >= *w {
                break;
            }
        }
        let (mut w1, mut w2) = match &basis {
            Some((gz, u)) => linear_start(gz, u, rank, d, ff, &z, &split.train, &labels, opts.pos_weight, &mut rng),
            None => random_start(rank, d, ff, &mut rng),
        };
        set_bias_unit(&mut w1, &mut w2, &bias_dir, rank, d, ff, &z, &split.train, &labels, opts.pos_weight);
        adam(&mut w1, &mut w2, rank, d, ff, &z, &split.train, &labels, opts, &mut rng);
        // Aim a fifth of the miss budget above the target on the validation split, so that the
        // held-out recall lands at or above it despite the noise of a few hundred tokens.
        let aim = opts.recall + (1.0 - opts.recall) * 0.2;
        shift_biases(&w1, &mut w2, rank, d, ff, &z, &split.val, &labels, aim);
        // Back to raw inputs: fc1 · (x / s) = (fc1 / s) · x; the RMS division only scales logits.
        for row in w1.chunks_exact_mut(d) {
            row.iter_mut().zip(&scale).for_each(|(v, s)| *v /= s);
        }
        balance_units(&mut w1, &mut w2, rank, d, ff);
        let mut p = Predictor::from_f32(&w1, &w2, rank, d, ff, 0.0, opts.ty).map_err(TrainError::BadOption)?;
        let mut m = measure(&p, data, &split.val);
        // Threshold 0 keeps PowerInfer's convention; a raw threshold is the fallback when the
        // bias unit cannot carry the calibration (inputs without a common direction).
        if m.recall < opts.recall {
            p.threshold = calibrate(&p, data, &split.val, aim);
            m = measure(&p, data, &split.val);
        }
        let work = relative_work(rank, d, ff, m.predicted, m.truth);
        trials.push(RankTrial { rank, threshold: p.threshold, recall: m.recall, active: m.predicted, work });
        match &best {
            Some((w, _)) if work >= *w => break,
            _ => best = Some((work, p)),
        }
    }
    let (_, p) = best.expect("at least one rank is tried");
    let m = measure(&p, data, &split.test);
    let report = LayerReport {
        layer,
        rank: p.rank(),
        threshold: p.threshold,
        recall: m.recall,
        precision: m.precision,
        predicted_active: m.predicted,
        true_active: m.truth,
        work: relative_work(p.rank(), d, ff, m.predicted, m.truth),
        bytes: p.n_bytes(),
        trials,
        n_train: split.train.len(),
        n_val: split.val.len(),
        n_test: split.test.len(),
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((p, report))
}

/// relu(c·a)·(w/c) = relu(a)·w for c > 0: gives each hidden unit's fc1 row and fc2 column the
/// same RMS, so that neither sinks into f16's subnormals (or a Q8_0 block's rounding).
fn balance_units(w1: &mut [f32], w2: &mut [f32], rank: usize, d: usize, ff: usize) {
    for h in 0..rank {
        let r1 = (w1[h * d..(h + 1) * d].iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64).sqrt();
        let r2 = ((0..ff).map(|i| w2[i * rank + h] as f64).map(|v| v * v).sum::<f64>() / ff as f64).sqrt();
        if r1 > 0.0 && r2 > 0.0 && r1.is_finite() && r2.is_finite() {
            let c = (r2 / r1).sqrt();
            w1[h * d..(h + 1) * d].iter_mut().for_each(|v| *v = (*v as f64 * c) as f32);
            (0..ff).for_each(|i| w2[i * rank + h] = (w2[i * rank + h] as f64 / c) as f32);
        }
    }
}

fn shuffle<T>(v: &mut [T], rng: &mut SplitMix) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i + 1));
    }
}

/// Bit masks of the samples.
struct Labels<'a> {
    masks: &'a [u32],
    words: usize,
}

impl Labels<'_> {
    fn fired(&self, t: usize, i: usize) -> bool {
        self.masks[t * self.words + i / 32] >> (i % 32) & 1 == 1
    }

    /// Row `t` as 0/1 floats.
    fn row(&self, t: usize, out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.fired(t, i) as u32 as f32;
        }
    }
}

/// A predictor's confusion counts over some tokens, as fractions.
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    /// Share of the (token, neuron) pairs that fired which were predicted active.
    pub recall: f64,
    /// Share of the pairs predicted active which fired.
    pub precision: f64,
    /// Fraction of pairs predicted active.
    pub predicted: f64,
    /// Fraction of pairs that fired.
    pub truth: f64,
}

/// Measures trained predictors on other samples (e.g. another text than the training one),
/// every token of every layer, layers in parallel.
pub fn evaluate(preds: &Predictors, samples: &SampleSet) -> Result<Vec<Measured>> {
    if preds.layers.len() != samples.n_layer || preds.layers.iter().any(|p| (p.n_embd(), p.n_ff()) != (samples.n_embd, samples.n_ff)) {
        return Err(TrainError::Mismatch(format!(
            "{} predictor layers vs samples of {} layers {} -> {}",
            preds.layers.len(),
            samples.n_layer,
            samples.n_embd,
            samples.n_ff
        )));
    }
    (0..samples.n_layer)
        .into_par_iter()
        .map(|l| {
            let data = samples.layer(l)?;
            let all: Vec<usize> = (0..data.n).collect();
            Ok(measure(&preds.layers[l], &data, &all))
        })
        .collect()
}

fn logits_of(p: &Predictor, data: &LayerSamples, tokens: &[usize]) -> Vec<f32> {
    let ff = p.n_ff();
    let mut out = vec![0.0f32; tokens.len() * ff];
    for (o, &t) in out.chunks_exact_mut(ff).zip(tokens) {
        p.predict(data.resid_row(t), o);
    }
    out
}

fn measure(p: &Predictor, data: &LayerSamples, tokens: &[usize]) -> Measured {
    let ff = p.n_ff();
    let logits = logits_of(p, data, tokens);
    let (mut tp, mut fp, mut pos) = (0u64, 0u64, 0u64);
    for (row, &t) in logits.chunks_exact(ff).zip(tokens) {
        for (i, &l) in row.iter().enumerate() {
            let (pred, truth) = (l >= p.threshold, data.fired(t, i));
            tp += (pred && truth) as u64;
            fp += (pred && !truth) as u64;
            pos += truth as u64;
        }
    }
    let all = (tokens.len() * ff).max(1) as f64;
    Measured {
        recall: if pos == 0 { 1.0 } else { tp as f64 / pos as f64 },
        precision: if tp + fp == 0 { 1.0 } else { tp as f64 / (tp + fp) as f64 },
        predicted: (tp + fp) as f64 / all,
        truth: pos as f64 / all,
    }
}

/// The largest threshold at which at least `aim` of the active (token, neuron) pairs of
/// `tokens` are predicted active; 0 when none is active.
fn calibrate(p: &Predictor, data: &LayerSamples, tokens: &[usize], aim: f64) -> f32 {
    let ff = p.n_ff();
    let logits = logits_of(p, data, tokens);
    let mut pos: Vec<f32> = Vec::new();
    for (row, &t) in logits.chunks_exact(ff).zip(tokens) {
        pos.extend(row.iter().enumerate().filter(|(i, _)| data.fired(t, *i)).map(|(_, &l)| l));
    }
    if pos.is_empty() {
        return 0.0;
    }
    let keep = ((aim.min(1.0) * pos.len() as f64).ceil() as usize).clamp(1, pos.len());
    let idx = pos.len() - keep;
    let (_, t, _) = pos.select_nth_unstable_by(idx, |a, b| a.total_cmp(b));
    *t
}

fn random_start(rank: usize, d: usize, ff: usize, rng: &mut SplitMix) -> (Vec<f32>, Vec<f32>) {
    // Uniform with the variance of He initialisation for fc1 and of Xavier for fc2.
    let mut uni = |n: usize, fan_in: usize, gain: f64| -> Vec<f32> {
        let a = (3.0 * gain / fan_in as f64).sqrt();
        (0..n).map(|_| ((rng.uniform() * 2.0 - 1.0) * a) as f32).collect()
    };
    (uni(rank * d, d, 2.0), uni(ff * rank, rank, 1.0))
}

/// fc1 = [B; -B], fc2 = α[U, -U] with B = Uᵀ G (the first rank/2 directions), so that
/// fc2 · relu(fc1 · z) = α U Uᵀ G z; an odd rank gets one extra unit of the next direction.
/// α is the scale of logits that fits the cross-entropy best on some training tokens.
#[allow(clippy::too_many_arguments)]
fn linear_start(g: &[f32], u: &[f32], rank: usize, d: usize, ff: usize, z: &[f32], train: &[usize], labels: &Labels, pos_weight: f32, rng: &mut SplitMix) -> (Vec<f32>, Vec<f32>) {
    // Unit 0 is the bias unit (set later); the pairs take units 1..=2k.
    let kmax = u.len() / ff;
    let k = ((rank - 1) / 2).min(kmax);
    // B = U_k G: k x d.
    let mut b = vec![0.0f32; k * d];
    if k > 0 {
        gemm::gemm(gemm::View::new(&u[..k * ff], k, ff), gemm::View::new(g, ff, d), &mut b, false);
    }
    // Units past the pairs (even ranks, or more than the directions computed) start random and
    // small: zero weights would never get a gradient through the ReLU.
    let (mut w1, mut w2) = random_start(rank, d, ff, rng);
    w2.iter_mut().for_each(|v| *v *= 0.01);
    for i in 0..ff {
        w2[i * rank] = 0.0;
    }
    for pair in 0..2 * k {
        // Unit 1 + pair: direction pair % k, sign + for the first k, - for the next k.
        let (h, dir, sign) = (1 + pair, pair % k, if pair < k { 1.0 } else { -1.0 });
        for j in 0..d {
            w1[h * d + j] = sign * b[dir * d + j];
        }
        for i in 0..ff {
            w2[i * rank + h] = sign * u[dir * ff + i];
        }
    }
    // Logits of up to 512 training tokens at scale 1, then the best scale by golden section
    // on log α.
    let probe: Vec<usize> = train.iter().copied().take(512).collect();
    let logits = forward_logits(&w1, &w2, rank, d, ff, z, &probe);
    let mut y = vec![0.0f32; ff];
    let mut ys = Vec::with_capacity(probe.len() * ff);
    for &t in &probe {
        labels.row(t, &mut y);
        ys.extend_from_slice(&y);
    }
    let loss = |la: f64| -> f64 {
        let a = la.exp() as f32;
        logits.iter().zip(&ys).map(|(&l, &y)| bce(a * l, y, pos_weight) as f64).sum::<f64>()
    };
    let (mut lo, mut hi) = (-12.0f64, 12.0f64);
    let phi = (5f64.sqrt() - 1.0) / 2.0;
    let (mut x1, mut x2) = (hi - phi * (hi - lo), lo + phi * (hi - lo));
    let (mut f1, mut f2) = (loss(x1), loss(x2));
    for _ in 0..24 {
        if f1 <= f2 {
            hi = x2;
            x2 = x1;
            f2 = f1;
            x1 = hi - phi * (hi - lo);
            f1 = loss(x1);
        } else {
            lo = x1;
            x1 = x2;
            f1 = f2;
            x2 = lo + phi * (hi - lo);
            f2 = loss(x2);
        }
    }
    let alpha = (((lo + hi) / 2.0).exp()) as f32;
    w2.iter_mut().for_each(|v| *v *= alpha);
    (w1, w2)
}

/// Makes unit 0 the bias unit (input weights `dir`) and sets its fc2 column to the per-neuron
/// biases that fit the cross-entropy best given the other units: Newton steps per neuron on up
/// to 512 training tokens. Adam alone would need thousands of steps to move biases that far.
#[allow(clippy::too_many_arguments)]
fn set_bias_unit(w1: &mut [f32], w2: &mut [f32], dir: &[f32], rank: usize, d: usize, ff: usize, z: &[f32], train: &[usize], labels: &Labels, pos_weight: f32) {
    w1[..d].copy_from_slice(dir);
    for i in 0..ff {
        w2[i * rank] = 0.0;
    }
    let probe: Vec<usize> = train.iter().copied().take(512).collect();
    let base = forward_logits(w1, w2, rank, d, ff, z, &probe);
    let a0: Vec<f32> = probe.iter().map(|&t| z[t * d..(t + 1) * d].iter().zip(dir).map(|(a, b)| a * b).sum::<f32>().max(0.0)).collect();
    for i in 0..ff {
        let mut b = 0.0f32;
        for _ in 0..12 {
            let (mut g, mut h) = (0.0f64, 1e-6f64);
            for (j, &t) in probe.iter().enumerate() {
                let y = labels.fired(t, i);
                let w = if y { pos_weight } else { 1.0 };
                let sg = sigmoid(base[j * ff + i] + b * a0[j]);
                let dz = if y { pos_weight * (sg - 1.0) } else { sg };
                g += (dz * a0[j]) as f64;
                h += (w * sg * (1.0 - sg) * a0[j] * a0[j]) as f64;
            }
            b -= ((g / h) as f32).clamp(-4.0, 4.0);
            b = b.clamp(-30.0, 30.0);
        }
        w2[i * rank] = b;
    }
}

/// Moves every neuron's bias by the same δ, the least that gets `aim` of the active (token,
/// neuron) pairs of `tokens` predicted active at threshold 0. The bias unit's activation is
/// proportional to the input's scale, so this is a threshold on the normalised logits, which
/// a plain threshold on raw logits is not (raw logits scale with each token's norm).
#[allow(clippy::too_many_arguments)]
fn shift_biases(w1: &[f32], w2: &mut [f32], rank: usize, d: usize, ff: usize, z: &[f32], tokens: &[usize], labels: &Labels, aim: f64) {
    let logits = forward_logits(w1, w2, rank, d, ff, z, tokens);
    let mut need: Vec<f32> = Vec::new();
    for (j, &t) in tokens.iter().enumerate() {
        let a0: f32 = z[t * d..(t + 1) * d].iter().zip(&w1[..d]).map(|(a, b)| a * b).sum::<f32>().max(0.0);
        for i in 0..ff {
            if labels.fired(t, i) {
                let l = logits[j * ff + i];
                need.push(if a0 > 0.0 { -l / a0 } else if l >= 0.0 { f32::NEG_INFINITY } else { f32::INFINITY });
            }
        }
    }
    if need.is_empty() {
        return;
    }
    let keep = ((aim.min(1.0) * need.len() as f64).ceil() as usize).clamp(1, need.len());
    let (_, delta, _) = need.select_nth_unstable_by(keep - 1, |a, b| a.total_cmp(b));
    let delta = *delta;
    if !delta.is_finite() {
        return;
    }
    // A hair past the boundary, so that the pair at the quantile itself stays active.
    let delta = delta + 1e-6 * delta.abs() + 1e-6;
    for i in 0..ff {
        w2[i * rank] += delta;
    }
}

/// Weighted binary cross-entropy of logit `l` for label `y`.
fn bce(l: f32, y: f32, pos_weight: f32) -> f32 {
    // log(1 + e^-l) and log(1 + e^l) without overflow.
    let softplus = |x: f32| if x > 0.0 { x + (-x).exp().ln_1p() } else { x.exp().ln_1p() };
    if y > 0.5 {
        pos_weight * softplus(-l)
    } else {
        softplus(l)
    }
}

/// Logits of `tokens` in the scaled space: (tokens x ff).
fn forward_logits(w1: &[f32], w2: &[f32], rank: usize, d: usize, ff: usize, z: &[f32], tokens: &[usize]) -> Vec<f32> {
    let x: Vec<f32> = tokens.iter().flat_map(|&t| z[t * d..(t + 1) * d].iter().copied()).collect();
    let nb = tokens.len();
    let mut h = vec![0.0f32; nb * rank];
    gemm::gemm(gemm::View::new(&x, nb, d), gemm::View::new(w1, rank, d).t(), &mut h, false);
    h.iter_mut().for_each(|v| *v = v.max(0.0));
    let mut out = vec![0.0f32; nb * ff];
    gemm::gemm(gemm::View::new(&h, nb, rank), gemm::View::new(w2, ff, rank).t(), &mut out, false);
    out
}

/// The top `k` eigenvectors (rows, n_ff long, largest eigenvalue first) of `M = G C Gᵀ`, C
/// the second moment of the training inputs. M has rank at most n_embd, so the work happens
/// in that space: with C = L Lᵀ (Cholesky) and P = G L, M = P Pᵀ, whose eigenvectors are
/// `P w / |P w|` for the eigenvectors w of `S = Pᵀ P = Lᵀ (Gᵀ G) L` (n_embd x n_embd). Those
/// come from subspace iteration with oversampling and a Rayleigh-Ritz step (Jacobi on the
/// small projected matrix).
fn top_directions(g: &[f32], z: &[f32], train: &[usize], ff: usize, d: usize, k: usize, rng: &mut SplitMix) -> Vec<f32> {
    use gemm::{gemm as mm, View};
    let k = k.min(d).min(ff).max(1);
    let l = (k + 32).min(d);
    // C = Zᵀ Z / n over the training tokens.
    let x: Vec<f32> = train.iter().flat_map(|&t| z[t * d..(t + 1) * d].iter().copied()).collect();
    let n = train.len();
    let mut c = vec![0.0f32; d * d];
    mm(View::new(&x, n, d).t(), View::new(&x, n, d), &mut c, false);
    let c64: Vec<f64> = c.iter().map(|&v| v as f64 / n as f64).collect();
    let lower = cholesky_ridged(&c64, d);
    let lf: Vec<f32> = lower.iter().map(|&v| v as f32).collect();
    // S = Lᵀ (Gᵀ G) L.
    let mut a = vec![0.0f32; d * d];
    mm(View::new(g, ff, d).t(), View::new(g, ff, d), &mut a, false);
    let mut t = vec![0.0f32; d * d];
    mm(View::new(&a, d, d), View::new(&lf, d, d), &mut t, false);
    let mut sm = vec![0.0f32; d * d];
    mm(View::new(&lf, d, d).t(), View::new(&t, d, d), &mut sm, false);
    for i in 0..d {
        for j in 0..i {
            let v = (sm[i * d + j] + sm[j * d + i]) / 2.0;
            sm[i * d + j] = v;
            sm[j * d + i] = v;
        }
    }
    // Rows of q: l vectors in R^d; q <- orth(q S), S symmetric.
    let mut q: Vec<f32> = (0..l * d).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect();
    orthonormalise(&mut q, l, d);
    let mut qs = vec![0.0f32; l * d];
    // A flat spectrum converges slowly; 30 steps of an n_embd-sized product are cheap.
    for _ in 0..30 {
        mm(View::new(&q, l, d), View::new(&sm, d, d), &mut qs, false);
        std::mem::swap(&mut q, &mut qs);
        orthonormalise(&mut q, l, d);
    }
    mm(View::new(&q, l, d), View::new(&sm, d, d), &mut qs, false);
    let mut tl = vec![0.0f32; l * l];
    mm(View::new(&qs, l, d), View::new(&q, l, d).t(), &mut tl, false);
    let mut t64: Vec<f64> = (0..l * l).map(|i| (tl[i] as f64 + tl[(i % l) * l + i / l] as f64) / 2.0).collect();
    let (vals, vecs) = jacobi_eigen(&mut t64, l);
    let mut idx: Vec<usize> = (0..l).collect();
    idx.sort_by(|&a, &b| vals[b].total_cmp(&vals[a]).then(a.cmp(&b)));
    // Ritz vectors w (k x d), then u = (L w)ᵀ Gᵀ, normalised.
    let mut w = vec![0.0f32; k * d];
    for (i, &e) in idx.iter().take(k).enumerate() {
        let row = &mut w[i * d..(i + 1) * d];
        for j in 0..l {
            let c = vecs[j * l + e] as f32;
            row.iter_mut().zip(&q[j * d..(j + 1) * d]).for_each(|(o, &v)| *o += c * v);
        }
    }
    let mut lw = vec![0.0f32; k * d];
    mm(View::new(&w, k, d), View::new(&lf, d, d).t(), &mut lw, false);
    let mut u = vec![0.0f32; k * ff];
    mm(View::new(&lw, k, d), View::new(g, ff, d).t(), &mut u, false);
    for row in u.chunks_exact_mut(ff) {
        let norm = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        let inv = if norm > 1e-30 { (1.0 / norm) as f32 } else { 0.0 };
        row.iter_mut().for_each(|v| *v *= inv);
    }
    u
}

/// Lower-triangular L with L Lᵀ = C + εI (row-major, n x n); ε starts at 1e-6 of the mean
/// diagonal and grows until the factorisation succeeds (C from few tokens is singular).
fn cholesky_ridged(c: &[f64], n: usize) -> Vec<f64> {
    let mean_diag = ((0..n).map(|i| c[i * n + i]).sum::<f64>() / n as f64).max(1e-30);
    let mut eps = 1e-6 * mean_diag;
    loop {
        let mut l = vec![0.0f64; n * n];
        let mut ok = true;
        'outer: for i in 0..n {
            for j in 0..=i {
                let mut s = c[i * n + j] + if i == j { eps } else { 0.0 };
                for p in 0..j {
                    s -= l[i * n + p] * l[j * n + p];
                }
                if i == j {
                    if s <= 0.0 || !s.is_finite() {
                        ok = false;
                        break 'outer;
                    }
                    l[i * n + i] = s.sqrt();
                } else {
                    l[i * n + j] = s / l[j * n + j];
                }
            }
        }
        if ok || eps > 1e6 * mean_diag {
            return l;
        }
        eps *= 100.0;
    }
}

/// Modified Gram-Schmidt on the rows of `q` (rows x n); a row that vanishes becomes zero.
fn orthonormalise(q: &mut [f32], rows: usize, n: usize) {
    for i in 0..rows {
        let (done, rest) = q.split_at_mut(i * n);
        let row = &mut rest[..n];
        for j in 0..i {
            let prev = &done[j * n..(j + 1) * n];
            let dot: f64 = row.iter().zip(prev).map(|(&a, &b)| a as f64 * b as f64).sum();
            row.iter_mut().zip(prev).for_each(|(a, &b)| *a -= dot as f32 * b);
        }
        let norm = row.iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt();
        let inv = if norm > 1e-20 { (1.0 / norm) as f32 } else { 0.0 };
        row.iter_mut().for_each(|a| *a *= inv);
    }
}

/// Eigenvalues and eigenvectors (columns of the returned row-major matrix) of the symmetric
/// `a` (n x n, destroyed) by cyclic Jacobi rotations.
fn jacobi_eigen(a: &mut [f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0.0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _sweep in 0..50 {
        let off: f64 = (0..n).flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j))).map(|(i, j)| a[i * n + j] * a[i * n + j]).sum();
        let diag: f64 = (0..n).map(|i| a[i * n + i] * a[i * n + i]).sum();
        if off <= 1e-22 * diag.max(1e-300) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let (app, aqq) = (a[p * n + p], a[q * n + q]);
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                // Rows/columns p and q of A.
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), v)
}

/// Adam on weighted cross-entropy over mini-batches, learning rate from `opts.lr` down to a
/// tenth of it on a cosine.
#[allow(clippy::too_many_arguments)]
fn adam(w1: &mut [f32], w2: &mut [f32], rank: usize, d: usize, ff: usize, z: &[f32], train: &[usize], labels: &Labels, opts: &TrainOptions, rng: &mut SplitMix) {
    let bs = opts.batch.min(train.len()).max(1);
    let steps_per_epoch = train.len() / bs;
    let total = (steps_per_epoch * opts.epochs).max(1);
    let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
    let (mut m1, mut v1) = (vec![0.0f32; w1.len()], vec![0.0f32; w1.len()]);
    let (mut m2, mut v2) = (vec![0.0f32; w2.len()], vec![0.0f32; w2.len()]);
    // Adam moves every weight by about the learning rate whatever its size, which would wreck
    // a good start whose weights are small. So steps are relative: each hidden unit's fc1 row
    // and fc2 column move in proportion to their starting RMS (floored at a tenth of the
    // matrix's, so that small units still learn). The bias unit's input weights stay fixed:
    // the unit must stay positive on every token to carry the biases.
    let group_rms = |w: &[f32], unit: usize, of_fc1: bool| -> f32 {
        let s: f64 = if of_fc1 { w[unit * d..(unit + 1) * d].iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64 } else { (0..ff).map(|i| w[i * rank + unit] as f64).map(|v| v * v).sum::<f64>() / ff as f64 };
        s.sqrt() as f32
    };
    let rel = |w: &[f32], of_fc1: bool| -> Vec<f32> {
        let g: Vec<f32> = (0..rank).map(|h| group_rms(w, h, of_fc1)).collect();
        let all = (g.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / rank as f64).sqrt() as f32;
        g.iter().map(|&v| v.max(0.1 * all)).collect()
    };
    let mut rel1 = rel(w1, true);
    rel1[0] = 0.0;
    let rel2 = rel(w2, false);
    let mut x = vec![0.0f32; bs * d];
    let mut h = vec![0.0f32; bs * rank];
    let mut g = vec![0.0f32; bs * ff];
    let mut y = vec![0.0f32; ff];
    let mut dw1 = vec![0.0f32; w1.len()];
    let mut dw2 = vec![0.0f32; w2.len()];
    let mut dh = vec![0.0f32; bs * rank];
    let mut order = train.to_vec();
    let mut step = 0usize;
    for _ in 0..opts.epochs {
        shuffle(&mut order, rng);
        for batch in order.chunks_exact(bs) {
            for (row, &t) in x.chunks_exact_mut(d).zip(batch) {
                row.copy_from_slice(&z[t * d..(t + 1) * d]);
            }
            // Forward: h = x W1ᵀ, logits = relu(h) W2ᵀ.
            gemm::gemm(gemm::View::new(&x, bs, d), gemm::View::new(w1, rank, d).t(), &mut h, false);
            let hr: Vec<f32> = h.iter().map(|v| v.max(0.0)).collect();
            gemm::gemm(gemm::View::new(&hr, bs, rank), gemm::View::new(w2, ff, rank).t(), &mut g, false);
            // dLoss/dlogit of the weighted cross-entropy, averaged over the batch.
            let inv = 1.0 / bs as f32;
            let pw = opts.pos_weight;
            for (row, &t) in g.chunks_exact_mut(ff).zip(batch) {
                labels.row(t, &mut y);
                // y = 1: pw (σ - 1); y = 0: σ.
                for (l, &yy) in row.iter_mut().zip(&y) {
                    let s = sigmoid(*l);
                    *l = (s * (pw * yy + 1.0 - yy) - pw * yy) * inv;
                }
            }
            // Backward: dW2 = gᵀ relu(h); dh = (g W2) ⊙ [h > 0]; dW1 = dhᵀ x.
            gemm::gemm(gemm::View::new(&g, bs, ff).t(), gemm::View::new(&hr, bs, rank), &mut dw2, false);
            gemm::gemm(gemm::View::new(&g, bs, ff), gemm::View::new(w2, ff, rank), &mut dh, false);
            dh.iter_mut().zip(&h).for_each(|(a, &hv)| if hv <= 0.0 { *a = 0.0 });
            gemm::gemm(gemm::View::new(&dh, bs, rank).t(), gemm::View::new(&x, bs, d), &mut dw1, false);

            step += 1;
            let progress = step as f32 / total as f32;
            let lr = opts.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos()));
            let c1 = 1.0 - b1.powi(step as i32);
            let c2 = 1.0 - b2.powi(step as i32);
            let (lr1, lr2) = (lr / c1, lr / c1);
            // fc1: rows are units; fc2: rows are neurons, columns units.
            for (((w, gr), (m, v)), &r) in w1.chunks_exact_mut(d).zip(dw1.chunks_exact(d)).zip(m1.chunks_exact_mut(d).zip(v1.chunks_exact_mut(d))).zip(&rel1) {
                adam_row(w, gr, m, v, |_| lr1 * r, b1, b2, c2, eps);
            }
            for ((w, gr), (m, v)) in w2.chunks_exact_mut(rank).zip(dw2.chunks_exact(rank)).zip(m2.chunks_exact_mut(rank).zip(v2.chunks_exact_mut(rank))) {
                adam_row(w, gr, m, v, |h| lr2 * rel2[h], b1, b2, c2, eps);
            }
        }
    }
}

/// One row of Adam updates; `step(i)` is the learning rate of element i, already divided by
/// the first moment's bias correction.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn adam_row(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], step: impl Fn(usize) -> f32, b1: f32, b2: f32, c2: f32, eps: f32) {
    let inv_c2 = 1.0 / c2;
    for i in 0..w.len() {
        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        w[i] -= step(i) * m[i] / ((v[i] * inv_c2).sqrt() + eps);
    }
}

/// The logistic function through [`exp_fast`]; branch-free, so loops over it vectorise.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_fast(-x))
}

/// e^x to about 2e-7 relative error, clamped to f32's range: 2^(x log2 e) as 2^n (exponent
/// bits) times a degree-6 polynomial of 2^f on f in [-0.5, 0.5]. No branches and no library
/// call, so it vectorises; training needs hundreds of thousands per step.
#[inline(always)]
fn exp_fast(x: f32) -> f32 {
    let t = (x * std::f32::consts::LOG2_E).clamp(-126.0, 126.0);
    let n = t.round_ties_even();
    let f = t - n;
    // Taylor coefficients of 2^f = e^(f ln 2).
    const C: [f32; 7] = [1.0, std::f32::consts::LN_2, 0.240_226_5, 0.055_504_11, 0.009_618_129, 0.001_333_355_8, 0.000_154_035_3];
    let p = C[0] + f * (C[1] + f * (C[2] + f * (C[3] + f * (C[4] + f * (C[5] + f * C[6])))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// A small blocked f32 matrix product for training (one thread; layers run in parallel).
/// The order of the sums is fixed, so results do not depend on anything but the inputs and
/// the CPU's FMA support.
mod gemm {
    /// A read-only strided matrix: element (i, j) at `data[i * rs + j * cs]`.
    #[derive(Clone, Copy)]
    pub struct View<'a> {
        pub data: &'a [f32],
        pub rows: usize,
        pub cols: usize,
        pub rs: usize,
        pub cs: usize,
    }

    impl<'a> View<'a> {
        /// A row-major `rows x cols` matrix.
        pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
            assert!(data.len() >= rows * cols, "matrix view of {rows}x{cols} over {} values", data.len());
            View { data, rows, cols, rs: cols, cs: 1 }
        }

        /// The transpose (no copy).
        pub fn t(self) -> Self {
            View { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
        }

        #[inline(always)]
        fn at(&self, i: usize, j: usize) -> f32 {
            self.data[i * self.rs + j * self.cs]
        }
    }

    const MR: usize = 6;
    const NR: usize = 16;
    const KC: usize = 256;
    const MC: usize = 72;
    const NC: usize = 2048;

    /// `c = a · b` (or `c += a · b` with `accumulate`), `c` row-major `a.rows x b.cols`.
    pub fn gemm(a: View, b: View, c: &mut [f32], accumulate: bool) {
        assert_eq!(a.cols, b.rows, "inner dimensions");
        let (m, n, k) = (a.rows, b.cols, a.cols);
        assert_eq!(c.len(), m * n, "output size");
        if !accumulate {
            c.fill(0.0);
        }
        if k == 0 || m == 0 || n == 0 {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has the features the function is compiled for.
                return unsafe { gemm_avx2(a, b, c, m, n, k) };
            }
        }
        gemm_generic::<false>(a, b, c, m, n, k)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn gemm_avx2(a: View, b: View, c: &mut [f32], m: usize, n: usize, k: usize) {
        gemm_generic::<true>(a, b, c, m, n, k)
    }

    #[inline(always)]
    fn gemm_generic<const FMA: bool>(a: View, b: View, c: &mut [f32], m: usize, n: usize, k: usize) {
        let mut bp = vec![0.0f32; KC.min(k) * NC.min(n.next_multiple_of(NR))];
        let mut ap = vec![0.0f32; MC * KC.min(k)];
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                // B block: panels of NR columns, each kc x NR, zero-padded.
                let panels = nc.div_ceil(NR);
                for pj in 0..panels {
                    let dst = &mut bp[pj * kc * NR..(pj + 1) * kc * NR];
                    for p in 0..kc {
                        for jj in 0..NR {
                            let j = jc + pj * NR + jj;
                            dst[p * NR + jj] = if j < jc + nc { b.at(pc + p, j) } else { 0.0 };
                        }
                    }
                }
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    let apanels = mc.div_ceil(MR);
                    for pi in 0..apanels {
                        let dst = &mut ap[pi * kc * MR..(pi + 1) * kc * MR];
                        for p in 0..kc {
                            for ii in 0..MR {
                                let i = ic + pi * MR + ii;
                                dst[p * MR + ii] = if i < ic + mc { a.at(i, pc + p) } else { 0.0 };
                            }
                        }
                    }
                    for pj in 0..panels {
                        let bpan = &bp[pj * kc * NR..(pj + 1) * kc * NR];
                        for pi in 0..apanels {
                            let apan = &ap[pi * kc * MR..(pi + 1) * kc * MR];
                            let acc = kernel::<FMA>(apan, bpan);
                            let (i0, j0) = (ic + pi * MR, jc + pj * NR);
                            for (ii, row) in acc.iter().enumerate().take((m - i0).min(MR)) {
                                let crow = &mut c[(i0 + ii) * n + j0..];
                                for (o, &v) in crow.iter_mut().zip(row.iter()).take((n - j0).min(NR)) {
                                    *o += v;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[inline(always)]
    fn kernel<const FMA: bool>(a: &[f32], b: &[f32]) -> [[f32; NR]; MR] {
        let mut acc = [[0.0f32; NR]; MR];
        for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
            for i in 0..MR {
                let av = ap[i];
                for j in 0..NR {
                    acc[i][j] = if FMA { av.mul_add(bp[j], acc[i][j]) } else { av * bp[j] + acc[i][j] };
                }
            }
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_matches_naive() {
        let mut rng = SplitMix(3);
        for &(m, n, k) in &[(1, 1, 1), (7, 19, 5), (13, 40, 300), (80, 17, 260)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.uniform() as f32 - 0.5).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.uniform() as f32 - 0.5).collect();
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let av = if ta { gemm::View::new(&a, k, m).t() } else { gemm::View::new(&a, m, k) };
                let bv = if tb { gemm::View::new(&b, n, k).t() } else { gemm::View::new(&b, k, n) };
                let mut c = vec![1.0f32; m * n];
                gemm::gemm(av, bv, &mut c, false);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|p| {
                                let x = if ta { a[p * m + i] } else { a[i * k + p] };
                                let y = if tb { b[j * k + p] } else { b[p * n + j] };
                                x as f64 * y as f64
                            })
                            .sum();
                        assert!((c[i * n + j] as f64 - want).abs() < 1e-4 * (k as f64).sqrt(), "{m}x{n}x{k} {ta} {tb} at ({i},{j})");
                    }
                }
            }
        }
    }

    #[test]
    fn exp_fast_is_close() {
        // Below e^-87 results clamp at 2^-126 (logits that far out saturate either way).
        for i in -1700..1700 {
            let x = i as f32 * 0.05;
            let (a, b) = (exp_fast(x) as f64, (x as f64).exp());
            assert!((a - b).abs() <= 1e-5 * b, "{x}: {a} vs {b}");
        }
        assert!(exp_fast(-1000.0) >= 0.0 && exp_fast(1000.0).is_finite());
    }

    #[test]
    #[ignore]
    fn gemm_speed() {
        let mut rng = SplitMix(1);
        for &(m, n, k, ta, tb) in &[(256, 128, 576, false, true), (256, 1536, 128, false, true), (1536, 128, 256, true, false), (256, 128, 1536, false, false), (128, 576, 256, true, false)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.uniform() as f32).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.uniform() as f32).collect();
            let mut c = vec![0.0f32; m * n];
            let t = std::time::Instant::now();
            let reps = 20;
            for _ in 0..reps {
                let av = if ta { gemm::View::new(&a, k, m).t() } else { gemm::View::new(&a, m, k) };
                let bv = if tb { gemm::View::new(&b, n, k).t() } else { gemm::View::new(&b, k, n) };
                gemm::gemm(av, bv, &mut c, false);
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            eprintln!("{m}x{n}x{k} {ta} {tb}: {:.2} ms, {:.1} GMAC/s", s * 1e3, (m * n * k) as f64 / s / 1e9);
        }
    }

    #[test]
    fn jacobi_diagonalises() {
        let n = 9;
        let mut rng = SplitMix(5);
        let r: Vec<f64> = (0..n * n).map(|_| rng.uniform() - 0.5).collect();
        let a: Vec<f64> = (0..n * n).map(|i| (0..n).map(|k| r[(i / n) * n + k] * r[(i % n) * n + k]).sum()).collect();
        let (vals, vecs) = jacobi_eigen(&mut a.clone(), n);
        for e in 0..n {
            for i in 0..n {
                let av: f64 = (0..n).map(|k| a[i * n + k] * vecs[k * n + e]).sum();
                assert!((av - vals[e] * vecs[i * n + e]).abs() < 1e-9);
            }
        }
    }
}
