//! Training activation predictors from profiled samples, on the CPU.
//!
//! Per layer, a low-rank MLP `fc2 · relu(fc1 · x)` learns which neurons fire from the residual
//! stream `x` entering the FFN block (weighted binary cross-entropy, Adam, mini-batches).
//!
//! Why it starts where it does: in a ReLU FFN, neuron i fires when
//! `gate_i · (w ⊙ x) / rms(x) > 0` (`w` the FFN norm's weights), so the exact predictor is the
//! linear map `G' = gate · diag(w)` and the question is only how well a rank-r map copies its
//! signs. Given the model, training starts from the rank-k map closest to `G'` on the sampled
//! inputs (the top-k eigenvectors `U` of `G' C G'ᵀ`, C the inputs' second moments; then
//! `G' ≈ U Uᵀ G'`), written with 2k hidden units as `relu(z) - relu(-z) = z`. Without a model
//! (or with `Init::Random`) training starts from random weights.
//!
//! Inputs are divided by their RMS (the decision `logit >= 0` does not change when `x` is
//! scaled, so this only evens out how much each token weighs) and by a per-dimension scale
//! (folded into `fc1` afterwards, so the stored predictor takes the raw residual).
//!
//! Rank: a threshold can buy any recall by calling more neurons active, so recall alone cannot
//! choose a rank. For each rank tried (small to large), the threshold is set on a validation
//! split to reach the recall target; the rank kept is the one needing the least FFN work per
//! token (predictor multiply-adds plus 3·n_embd per predicted-active neuron), and the ladder
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
            ranks: vec![32, 64, 128, 256],
            epochs: 8,
            lr: 2e-3,
            batch: 256,
            pos_weight: 1.0,
            val_fraction: 0.15,
            test_fraction: 0.15,
            seed: 1,
            ty: GgmlType::F16,
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
        if !(self.lr > 0.0 && self.lr < 1.0) || !(self.pos_weight > 0.0 && self.pos_weight < 1e4) {
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

/// FFN multiply-adds per token with a predictor of `rank` calling `active` of the neurons
/// (each costs a gate row, an up row and a down column: 3·n_embd), relative to the dense
/// FFN's 3·n_embd·n_ff.
pub fn relative_work(rank: usize, n_embd: usize, n_ff: usize, active: f64) -> f64 {
    let dense = 3.0 * n_embd as f64 * n_ff as f64;
    (rank as f64 * (n_embd + n_ff) as f64 + active * dense) / dense
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

/// Trains every layer's predictor from `samples`, layers in parallel; `progress` is told of
/// each finished layer.
pub fn train(samples: &SampleSet, model: Option<&Model>, opts: &TrainOptions, progress: &(dyn Fn(&LayerReport) + Sync)) -> Result<(Predictors, Vec<LayerReport>)> {
    opts.check()?;
    if let Some(m) = model {
        let hp = &m.hp;
        if (hp.n_layer, hp.n_embd, hp.n_ff) != (samples.n_layer, samples.n_embd, samples.n_ff) {
            return Err(TrainError::Mismatch(format!(
                "samples of {} layers {} -> {}, model of {} layers {} -> {}",
                samples.n_layer, samples.n_embd, samples.n_ff, hp.n_layer, hp.n_embd, hp.n_ff
            )));
        }
    }
    let only: Option<Vec<usize>> = std::env::var("EMBER_TRAIN_LAYERS").ok().map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect());
    let results: Vec<Result<(Predictor, LayerReport)>> = (0..samples.n_layer)
        .filter(|l| only.as_ref().is_none_or(|o| o.contains(l)))
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|l| {
            let data = samples.layer(l)?;
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
    let model_name = if samples.model_name.is_empty() {
        model.and_then(|m| m.file.get("general.name")).and_then(|v| v.as_str()).unwrap_or("").to_string()
    } else {
        samples.model_name.clone()
    };
    Ok((Predictors { layers, model_name }, reports))
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

    // The linear map in the scaled input space and its principal directions, once per layer.
    let tb = Instant::now();
    let basis = gate.map(|g| {
        let gz: Vec<f32> = g.chunks_exact(d).flat_map(|row| row.iter().zip(&scale).map(|(a, s)| a * s)).collect();
        let kmax = opts.ranks.iter().max().copied().unwrap_or(1).div_ceil(2).min(ff).min(d);
        let u = top_directions(&gz, &z, &split.train, ff, d, kmax, &mut rng);
        (gz, u)
    });

    if std::env::var_os("EMBER_TRAIN_DEBUG").is_some() { eprintln!("DBG layer {layer}: basis {:.2}s", tb.elapsed().as_secs_f64()); }
    let mut trials = Vec::new();
    let mut best: Option<(f64, Predictor)> = None;
    let mut ranks = opts.ranks.clone();
    ranks.sort_unstable();
    ranks.dedup();
    for &rank in &ranks {
        // A predictor whose own cost exceeds the best total cannot win.
        if let Some((w, _)) = &best {
            if relative_work(rank, d, ff, 0.0) >= *w {
                break;
            }
        }
        let (mut w1, w2) = match &basis {
            Some((gz, u)) => linear_start(gz, u, rank, d, ff, &z, &split.train, &labels, opts.pos_weight, &mut rng),
            None => random_start(rank, d, ff, &mut rng),
        };
        let mut w2 = w2;
        let dbg = std::env::var_os("EMBER_TRAIN_DEBUG").is_some();
        let t0 = Instant::now();
        if dbg {
            let p0 = raw_predictor(&w1, &w2, &scale, rank, d, ff, opts.ty);
            let mut p0 = p0;
            p0.threshold = calibrate(&p0, data, &split.val, opts.recall);
            let m0 = measure(&p0, data, &split.val);
            eprintln!("DBG layer {layer} rank {rank}: init val active {:.3} ({:.2}s)", m0.predicted, t0.elapsed().as_secs_f64());
        }
        let t1 = Instant::now();
        adam(&mut w1, &mut w2, rank, d, ff, &z, &split.train, &labels, opts, &mut rng);
        if dbg {
            eprintln!("DBG layer {layer} rank {rank}: adam {:.2}s", t1.elapsed().as_secs_f64());
        }
        // Back to raw inputs: fc1 · (x / s) = (fc1 / s) · x; the RMS division only scales logits.
        for row in w1.chunks_exact_mut(d) {
            row.iter_mut().zip(&scale).for_each(|(v, s)| *v /= s);
        }
        let mut p = Predictor::from_f32(&w1, &w2, rank, d, ff, 0.0, opts.ty).map_err(TrainError::BadOption)?;
        let aim = opts.recall + (1.0 - opts.recall) * 0.1;
        p.threshold = calibrate(&p, data, &split.val, aim);
        let m = measure(&p, data, &split.val);
        let work = relative_work(rank, d, ff, m.predicted);
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
        work: relative_work(p.rank(), d, ff, m.predicted),
        bytes: p.n_bytes(),
        trials,
        n_train: split.train.len(),
        n_val: split.val.len(),
        n_test: split.test.len(),
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((p, report))
}

fn raw_predictor(w1: &[f32], w2: &[f32], scale: &[f32], rank: usize, d: usize, ff: usize, ty: GgmlType) -> Predictor {
    let mut w1 = w1.to_vec();
    for row in w1.chunks_exact_mut(d) {
        row.iter_mut().zip(scale).for_each(|(v, s)| *v /= s);
    }
    Predictor::from_f32(&w1, w2, rank, d, ff, 0.0, ty).unwrap()
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

/// The stored predictor's confusion counts over `tokens`.
struct Measured {
    recall: f64,
    precision: f64,
    predicted: f64,
    truth: f64,
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
    let kmax = u.len() / ff;
    let k = (rank / 2).clamp(1, kmax);
    // B = U_k G: k x d.
    let mut b = vec![0.0f32; k * d];
    gemm::gemm(gemm::View::new(&u[..k * ff], k, ff), gemm::View::new(g, ff, d), &mut b, false);
    // Units past the 2k of the pairs (odd ranks, or more than the directions computed) start
    // random and small: zero weights would never get a gradient through the ReLU.
    let (mut w1, mut w2) = random_start(rank, d, ff, rng);
    w2.iter_mut().for_each(|v| *v *= 0.01);
    for h in 0..rank.min(2 * k) {
        // Unit h: direction h % k, sign + for the first k, - for the next k.
        let (dir, sign) = (h % k, if h < k { 1.0 } else { -1.0 });
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

/// The top `k` eigenvectors (rows, n_ff long, largest eigenvalue first) of `G C Gᵀ`, C the
/// second moment of the training inputs: subspace iteration with oversampling, then a
/// Rayleigh-Ritz step (Jacobi on the small projected matrix).
fn top_directions(g: &[f32], z: &[f32], train: &[usize], ff: usize, d: usize, k: usize, rng: &mut SplitMix) -> Vec<f32> {
    let l = (k + 16).min(ff).min(d);
    let k = k.min(l);
    // C = Zᵀ Z / n over the training tokens.
    let x: Vec<f32> = train.iter().flat_map(|&t| z[t * d..(t + 1) * d].iter().copied()).collect();
    let n = train.len();
    let mut c = vec![0.0f32; d * d];
    gemm::gemm(gemm::View::new(&x, n, d).t(), gemm::View::new(&x, n, d), &mut c, false);
    c.iter_mut().for_each(|v| *v /= n as f32);
    // Rows of q: l vectors in R^ff.
    let mut q: Vec<f32> = (0..l * ff).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect();
    orthonormalise(&mut q, l, ff);
    // (Q M) for M = G C Gᵀ, as Q G -> (Q G) C -> ((Q G) C) Gᵀ.
    let apply = |q: &[f32]| -> Vec<f32> {
        let mut t1 = vec![0.0f32; l * d];
        gemm::gemm(gemm::View::new(q, l, ff), gemm::View::new(g, ff, d), &mut t1, false);
        let mut t2 = vec![0.0f32; l * d];
        gemm::gemm(gemm::View::new(&t1, l, d), gemm::View::new(&c, d, d), &mut t2, false);
        let mut t3 = vec![0.0f32; l * ff];
        gemm::gemm(gemm::View::new(&t2, l, d), gemm::View::new(g, ff, d).t(), &mut t3, false);
        t3
    };
    for _ in 0..6 {
        q = apply(&q);
        orthonormalise(&mut q, l, ff);
    }
    let qm = apply(&q);
    // T = Q M Qᵀ (l x l), symmetric.
    let mut t = vec![0.0f32; l * l];
    gemm::gemm(gemm::View::new(&qm, l, ff), gemm::View::new(&q, l, ff).t(), &mut t, false);
    let mut t64: Vec<f64> = (0..l * l).map(|i| (t[i] as f64 + t[(i % l) * l + i / l] as f64) / 2.0).collect();
    let (vals, vecs) = jacobi_eigen(&mut t64, l);
    let mut idx: Vec<usize> = (0..l).collect();
    idx.sort_by(|&a, &b| vals[b].total_cmp(&vals[a]).then(a.cmp(&b)));
    // Ritz vectors: row i = sum_j vecs[j][idx[i]] q[j].
    let mut u = vec![0.0f32; k * ff];
    for (i, &e) in idx.iter().take(k).enumerate() {
        let row = &mut u[i * ff..(i + 1) * ff];
        for j in 0..l {
            let w = vecs[j * l + e] as f32;
            row.iter_mut().zip(&q[j * ff..(j + 1) * ff]).for_each(|(o, &v)| *o += w * v);
        }
    }
    u
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
            for (row, &t) in g.chunks_exact_mut(ff).zip(batch) {
                labels.row(t, &mut y);
                for (l, &yy) in row.iter_mut().zip(&y) {
                    let s = sigmoid(*l);
                    *l = if yy > 0.5 { opts.pos_weight * (s - 1.0) } else { s } * inv;
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
            for (w, gr, m, v) in [(&mut *w1, &dw1, &mut m1, &mut v1), (&mut *w2, &dw2, &mut m2, &mut v2)] {
                for (((w, &gr), m), v) in w.iter_mut().zip(gr.iter()).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = b1 * *m + (1.0 - b1) * gr;
                    *v = b2 * *v + (1.0 - b2) * gr * gr;
                    *w -= lr * (*m / c1) / ((*v / c2).sqrt() + eps);
                }
            }
        }
    }
}

fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
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
