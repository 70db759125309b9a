//! Activation profiles: how often each FFN neuron fires over a corpus, and token samples for
//! training predictors.
//!
//! [`Profiler`] is an [`FfnObserver`]: given to a CPU [`Session`](crate::engine::Session) it
//! counts, per layer and neuron, the tokens on which `act(gate·xn) != 0`, and optionally keeps
//! a uniform sample of tokens (the residual stream entering the FFN block, which is the
//! predictor's input, plus a bit mask of the neurons that fired).
//!
//! Files:
//! * a profile is a GGUF file (`general.type` = `ember.activation_profile`) with one I32 tensor
//!   `blk.N.act_count` of `n_ff` firing counts per layer and the token counts in metadata
//!   (`ember.profile.*`);
//! * samples are a second GGUF file (`general.type` = `ember.predictor_samples`): per layer
//!   `blk.N.resid` (F16 or F32, GGUF shape `{n_embd, n}`), `blk.N.mask` (I32, shape
//!   `{ceil(n_ff/32), n}`: bit `i % 32` of word `i / 32`, least significant bit first, is set
//!   when neuron `i` fired) and `blk.N.token` (I32, shape `{n}`: the token's position in the
//!   profiled stream, ascending). Every layer holds the same tokens.

use super::FfnObserver;
use crate::gguf::{GgmlType, GgufError, GgufFile, GgufWriter, Value, ValueType};
use crate::model::Activation;
use half::f16;
use std::collections::BinaryHeap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use thiserror::Error;

/// `general.type` of a profile file.
pub const PROFILE_TYPE: &str = "ember.activation_profile";
/// `general.type` of a samples file.
pub const SAMPLES_TYPE: &str = "ember.predictor_samples";

/// Everything that can go wrong reading or writing profiles and samples.
#[derive(Debug, Error)]
pub enum ProfileError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("{path}: not an {want} file (general.type is {got:?}); {hint}")]
    WrongKind { path: String, want: &'static str, got: Option<String>, hint: &'static str },
    #[error("tensor {name:?}: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("metadata key {key:?}: {reason}")]
    BadMetadata { key: String, reason: String },
    #[error("profiles do not match: {0}")]
    Mismatch(String),
    #[error("no samples: {0}")]
    Empty(String),
    #[error("{0} does not fit in the file format's 32-bit fields")]
    TooLarge(String),
}

pub type Result<T> = std::result::Result<T, ProfileError>;

/// A neuron somewhere in the model: layer and index inside that layer's FFN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NeuronId {
    pub layer: u32,
    pub index: u32,
}

/// Per layer and neuron, on how many tokens the neuron fired.
#[derive(Clone, Debug, PartialEq)]
pub struct ActivationProfile {
    /// `general.name` of the profiled model.
    pub model_name: String,
    /// Per layer, per neuron: firing counts.
    pub counts: Vec<Vec<u32>>,
    /// Per layer: tokens seen (the same in every layer when profiling with `Logits::All`).
    pub layer_tokens: Vec<u64>,
    /// What was profiled (text file names), for the record.
    pub source: String,
}

/// One layer's shape of firing (see [`ActivationProfile::summary`]).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerSummary {
    pub layer: usize,
    pub tokens: u64,
    /// Mean fraction of neurons that stay silent per token.
    pub sparsity: f64,
    /// Mean number of neurons firing per token.
    pub active_per_token: f64,
    /// Fewest neurons (most-firing first) that account for 50%, 80% and 95% of the layer's
    /// firings.
    pub cover50: usize,
    pub cover80: usize,
    pub cover95: usize,
    /// Neurons that never fired.
    pub never: usize,
    /// Median over neurons of the firing rate (fraction of tokens).
    pub median_rate: f64,
}

impl ActivationProfile {
    pub fn new(model_name: &str, n_layer: usize, n_ff: usize) -> Self {
        ActivationProfile { model_name: model_name.into(), counts: vec![vec![0; n_ff]; n_layer], layer_tokens: vec![0; n_layer], source: String::new() }
    }

    pub fn n_layer(&self) -> usize {
        self.counts.len()
    }

    pub fn n_ff(&self) -> usize {
        self.counts.first().map_or(0, Vec::len)
    }

    /// Tokens profiled: those seen by the first layer.
    pub fn n_tokens(&self) -> u64 {
        self.layer_tokens.first().copied().unwrap_or(0)
    }

    /// Counts one token of `layer` whose neurons fired where [`fires`] says so.
    pub fn record(&mut self, layer: usize, act: Activation, gate_pre: &[f32], up_pre: &[f32]) {
        let counts = &mut self.counts[layer];
        debug_assert_eq!(counts.len(), gate_pre.len());
        debug_assert_eq!(up_pre.len(), gate_pre.len());
        for ((c, &g), &u) in counts.iter_mut().zip(gate_pre).zip(up_pre) {
            *c += fires(act, g, u) as u32;
        }
        self.layer_tokens[layer] += 1;
    }

    /// Adds another profile of the same model shape (e.g. a second text).
    pub fn merge(&mut self, other: &ActivationProfile) -> Result<()> {
        if other.n_layer() != self.n_layer() || other.n_ff() != self.n_ff() {
            return Err(ProfileError::Mismatch(format!(
                "{} layers x {} neurons vs {} x {}",
                self.n_layer(),
                self.n_ff(),
                other.n_layer(),
                other.n_ff()
            )));
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            for (x, y) in a.iter_mut().zip(b) {
                *x = x.checked_add(*y).ok_or_else(|| ProfileError::TooLarge("a merged firing count".into()))?;
            }
        }
        for (a, b) in self.layer_tokens.iter_mut().zip(&other.layer_tokens) {
            *a += b;
        }
        if !other.source.is_empty() {
            self.source = if self.source.is_empty() { other.source.clone() } else { format!("{}, {}", self.source, other.source) };
        }
        Ok(())
    }

    /// Mean fraction of silent neurons per token in `layer` (0 when it saw no tokens).
    pub fn sparsity(&self, layer: usize) -> f64 {
        let (t, c) = (self.layer_tokens[layer], &self.counts[layer]);
        if t == 0 || c.is_empty() {
            return 0.0;
        }
        let fired: u64 = c.iter().map(|&v| v as u64).sum();
        1.0 - fired as f64 / (t as f64 * c.len() as f64)
    }

    /// Per layer: sparsity, how concentrated the firings are, silent neurons.
    pub fn summary(&self) -> Vec<LayerSummary> {
        (0..self.n_layer())
            .map(|l| {
                let c = &self.counts[l];
                let tokens = self.layer_tokens[l];
                let mut sorted: Vec<u32> = c.clone();
                sorted.sort_unstable_by(|a, b| b.cmp(a));
                let total: u64 = sorted.iter().map(|&v| v as u64).sum();
                let cover = |frac: f64| -> usize {
                    if total == 0 {
                        return 0;
                    }
                    // Integer comparison: the smallest n with sum(top n) >= frac * total.
                    let need = (frac * total as f64).ceil() as u64;
                    let mut acc = 0u64;
                    for (i, &v) in sorted.iter().enumerate() {
                        acc += v as u64;
                        if acc >= need {
                            return i + 1;
                        }
                    }
                    sorted.len()
                };
                let median = if sorted.is_empty() || tokens == 0 {
                    0.0
                } else {
                    let n = sorted.len();
                    // `sorted` is descending; the median of an even count is the mean of the middle two.
                    let mid = if n % 2 == 1 { sorted[n / 2] as f64 } else { (sorted[n / 2 - 1] as f64 + sorted[n / 2] as f64) / 2.0 };
                    mid / tokens as f64
                };
                LayerSummary {
                    layer: l,
                    tokens,
                    sparsity: self.sparsity(l),
                    active_per_token: if tokens == 0 { 0.0 } else { total as f64 / tokens as f64 },
                    cover50: cover(0.5),
                    cover80: cover(0.8),
                    cover95: cover(0.95),
                    never: c.iter().filter(|&&v| v == 0).count(),
                    median_rate: median,
                }
            })
            .collect()
    }

    /// The `k` most-firing neurons over all layers, most firings first; equal counts are
    /// ordered by (layer, index), so the set is exact and the same on every run. What a
    /// placement with the same cost per neuron in every layer puts on the GPU.
    pub fn top_k(&self, k: usize) -> Vec<NeuronId> {
        let mut all: Vec<(u32, NeuronId)> = self
            .counts
            .iter()
            .enumerate()
            .flat_map(|(l, c)| c.iter().enumerate().map(move |(i, &v)| (v, NeuronId { layer: l as u32, index: i as u32 })))
            .collect();
        // A strict total order (count descending, then id ascending): selection is exact.
        let order = |a: &(u32, NeuronId), b: &(u32, NeuronId)| b.0.cmp(&a.0).then(a.1.cmp(&b.1));
        let k = k.min(all.len());
        if k == 0 {
            return Vec::new();
        }
        if k < all.len() {
            all.select_nth_unstable_by(k - 1, order);
            all.truncate(k);
        }
        all.sort_unstable_by(order);
        all.into_iter().map(|(_, id)| id).collect()
    }

    /// [`top_k`](Self::top_k) as per-layer lists of ascending neuron indices.
    pub fn top_k_per_layer(&self, k: usize) -> Vec<Vec<u32>> {
        let mut out = vec![Vec::new(); self.n_layer()];
        for id in self.top_k(k) {
            out[id.layer as usize].push(id.index);
        }
        for v in &mut out {
            v.sort_unstable();
        }
        out
    }

    /// Share of all firings that the `k` most-firing neurons account for.
    pub fn top_k_coverage(&self, k: usize) -> f64 {
        let total: u64 = self.counts.iter().flatten().map(|&v| v as u64).sum();
        if total == 0 {
            return 0.0;
        }
        let on: u64 = self.top_k(k).iter().map(|id| self.counts[id.layer as usize][id.index as usize] as u64).sum();
        on as f64 / total as f64
    }

    /// The profile as a GGUF image.
    pub fn to_gguf(&self) -> Result<GgufWriter> {
        let mut w = GgufWriter::new();
        w.set("general.type", Value::String(PROFILE_TYPE.into()));
        w.set("general.name", Value::String(format!("{} activation profile", self.model_name)));
        w.set("ember.profile.model", Value::String(self.model_name.clone()));
        w.set("ember.profile.n_layer", Value::U32(self.n_layer() as u32));
        w.set("ember.profile.n_ff", Value::U32(self.n_ff() as u32));
        w.set("ember.profile.n_tokens", Value::U64(self.n_tokens()));
        w.set("ember.profile.layer_tokens", Value::Array(ValueType::U64, self.layer_tokens.iter().map(|&t| Value::U64(t)).collect()));
        w.set("ember.profile.source", Value::String(self.source.clone()));
        for (l, c) in self.counts.iter().enumerate() {
            // I32 as in PowerInfer's activation files; counts above 2^31 do not fit.
            if c.iter().any(|&v| v > i32::MAX as u32) {
                return Err(ProfileError::TooLarge(format!("a firing count of layer {l}")));
            }
            let bytes: Vec<u8> = c.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect();
            w.add_tensor(&format!("blk.{l}.act_count"), &[c.len() as u64], GgmlType::I32, bytes);
        }
        Ok(w)
    }

    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.to_gguf()?.write_file(path).map_err(|source| ProfileError::Write { path: path.display().to_string(), source })
    }

    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let f = GgufFile::open(path)?;
        Self::from_gguf(&f).map_err(|e| match e {
            ProfileError::WrongKind { got, want, hint, .. } => ProfileError::WrongKind { path: path.display().to_string(), want, got, hint },
            e => e,
        })
    }

    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        check_kind(f, PROFILE_TYPE, "activation profile", "make one with `ember profile`")?;
        let n_layer = meta_usize(f, "ember.profile.n_layer", 1 << 16)?;
        let n_ff = meta_usize(f, "ember.profile.n_ff", 1 << 24)?;
        let layer_tokens: Vec<u64> = match f.get("ember.profile.layer_tokens").and_then(|v| v.as_array()) {
            Some(a) if a.len() == n_layer => a
                .iter()
                .map(|v| v.as_u64().ok_or_else(|| bad_meta("ember.profile.layer_tokens", "expected unsigned integers")))
                .collect::<Result<_>>()?,
            Some(a) => return Err(bad_meta("ember.profile.layer_tokens", &format!("{} entries for {n_layer} layers", a.len()))),
            None => vec![f.get_u64("ember.profile.n_tokens")?; n_layer],
        };
        let mut counts = Vec::with_capacity(n_layer);
        for (l, &tokens) in layer_tokens.iter().enumerate() {
            let name = format!("blk.{l}.act_count");
            let v = i32_tensor(f, &name, &[n_ff as u64])?;
            let mut c = Vec::with_capacity(n_ff);
            for x in v {
                if x < 0 || x as u64 > tokens {
                    return Err(ProfileError::BadTensor { name, reason: format!("count {x} outside 0..={tokens} (the layer's tokens)") });
                }
                c.push(x as u32);
            }
            counts.push(c);
        }
        let text = |k: &str| f.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
        Ok(ActivationProfile { model_name: text("ember.profile.model"), counts, layer_tokens, source: text("ember.profile.source") })
    }
}

/// Whether a neuron with gate and up pre-activations `g` and `u` contributes (its hidden
/// value is not forced to zero by the activation).
#[inline]
pub fn fires(act: Activation, g: f32, u: f32) -> bool {
    match act {
        // The dense path's ReLU keeps exactly the positive gates.
        Activation::Relu => g > 0.0,
        // dReLU: both branches pass a ReLU, so both must be positive (TurboSparse's count).
        Activation::Drelu => g > 0.0 && u > 0.0,
        Activation::Silu | Activation::GeluTanh => crate::cpu::ops::activate(act, g) != 0.0,
    }
}

/// How sampled residuals are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleType {
    F32,
    /// Half the size; residual values stay far inside f16's range and a predictor does not
    /// need more than its 11 bits.
    F16,
}

impl SampleType {
    fn ggml(self) -> GgmlType {
        match self {
            SampleType::F32 => GgmlType::F32,
            SampleType::F16 => GgmlType::F16,
        }
    }
}

/// splitmix64: seeds and per-token keys (the module must not depend on `engine`'s sampler).
#[derive(Clone, Debug)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// What the state advances by per draw.
    pub const STEP: u64 = 0x9E37_79B9_7F4A_7C15;

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(Self::STEP);
        mix64(self.0)
    }

    /// Skips `n` draws. The k-th draw from here is `mix64(state + k * STEP)`, so loops can
    /// compute a run of draws from a counter (which vectorises) and then skip past them.
    pub fn skip(&mut self, n: u64) {
        self.0 = self.0.wrapping_add(Self::STEP.wrapping_mul(n));
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n), n > 0 (the slight modulo bias is irrelevant at these sizes).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

#[inline(always)]
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One layer's kept samples while collecting: a max-heap of (key, slot) over fixed slots.
struct Reservoir {
    heap: BinaryHeap<(u64, usize)>,
    tokens: Vec<u64>,
    resid32: Vec<f32>,
    resid16: Vec<f16>,
    masks: Vec<u32>,
    seen: u64,
}

/// Keeps a uniform sample of at most `capacity` tokens per layer. Each token gets a random key
/// from (seed, position in the stream) and the tokens with the smallest keys are kept
/// (bottom-k sampling): uniform without knowing the stream's length, the same tokens in every
/// layer, and the same sample for the same seed.
pub struct SampleCollector {
    capacity: usize,
    seed: u64,
    ty: SampleType,
    n_embd: usize,
    n_ff: usize,
    layers: Vec<Reservoir>,
}

impl SampleCollector {
    pub fn new(n_layer: usize, n_embd: usize, n_ff: usize, capacity: usize, ty: SampleType, seed: u64) -> Self {
        let layers = (0..n_layer)
            .map(|_| Reservoir { heap: BinaryHeap::new(), tokens: Vec::new(), resid32: Vec::new(), resid16: Vec::new(), masks: Vec::new(), seen: 0 })
            .collect();
        SampleCollector { capacity, seed, ty, n_embd, n_ff, layers }
    }

    fn words(&self) -> usize {
        self.n_ff.div_ceil(32)
    }

    /// Offers token number `layer.seen` of `layer`.
    pub fn offer(&mut self, layer: usize, act: Activation, resid: &[f32], gate_pre: &[f32], up_pre: &[f32]) {
        let (e, words, cap, ty) = (self.n_embd, self.words(), self.capacity, self.ty);
        let key = mix64(self.seed ^ mix64(self.layers[layer].seen.wrapping_add(0x5851_F42D_4C95_7F2D)));
        let r = &mut self.layers[layer];
        let pos = r.seen;
        r.seen += 1;
        if cap == 0 {
            return;
        }
        let slot = if r.heap.len() < cap {
            let s = r.heap.len();
            r.tokens.push(0);
            match ty {
                SampleType::F32 => r.resid32.resize((s + 1) * e, 0.0),
                SampleType::F16 => r.resid16.resize((s + 1) * e, f16::ZERO),
            }
            r.masks.resize((s + 1) * words, 0);
            s
        } else if key < r.heap.peek().map_or(0, |t| t.0) {
            r.heap.pop().map_or(0, |t| t.1)
        } else {
            return;
        };
        r.heap.push((key, slot));
        r.tokens[slot] = pos;
        match ty {
            SampleType::F32 => r.resid32[slot * e..(slot + 1) * e].copy_from_slice(resid),
            SampleType::F16 => {
                for (o, &v) in r.resid16[slot * e..(slot + 1) * e].iter_mut().zip(resid) {
                    *o = f16::from_f32(v);
                }
            }
        }
        let m = &mut r.masks[slot * words..(slot + 1) * words];
        m.fill(0);
        for (i, (&g, &u)) in gate_pre.iter().zip(up_pre).enumerate() {
            if fires(act, g, u) {
                m[i / 32] |= 1 << (i % 32);
            }
        }
    }

    /// The samples, tokens in stream order.
    pub fn finish(&self) -> Vec<LayerSamples> {
        let (e, words) = (self.n_embd, self.words());
        self.layers
            .iter()
            .map(|r| {
                let mut order: Vec<usize> = (0..r.tokens.len()).collect();
                order.sort_unstable_by_key(|&s| r.tokens[s]);
                let mut out = LayerSamples { n: order.len(), n_embd: e, n_ff: self.n_ff, resid: Vec::with_capacity(order.len() * e), masks: Vec::with_capacity(order.len() * words), tokens: Vec::new() };
                for &s in &order {
                    match self.ty {
                        SampleType::F32 => out.resid.extend_from_slice(&r.resid32[s * e..(s + 1) * e]),
                        SampleType::F16 => out.resid.extend(r.resid16[s * e..(s + 1) * e].iter().map(|v| v.to_f32())),
                    }
                    out.masks.extend_from_slice(&r.masks[s * words..(s + 1) * words]);
                    out.tokens.push(r.tokens[s]);
                }
                out
            })
            .collect()
    }

    /// Writes the samples file (see the module documentation for its layout).
    pub fn save(&self, path: impl AsRef<Path>, model_name: &str) -> Result<()> {
        let path = path.as_ref();
        let (e, words) = (self.n_embd, self.words());
        let n = self.layers.first().map_or(0, |r| r.tokens.len());
        let mut w = samples_header(self.layers.len(), n, e, self.n_ff, model_name, self.seed, self.layers.first().map_or(0, |r| r.seen))?;
        // Straight from the reservoirs in their stored type: no f32 copy of every layer.
        for (l, r) in self.layers.iter().enumerate() {
            let mut order: Vec<usize> = (0..r.tokens.len()).collect();
            order.sort_unstable_by_key(|&s| r.tokens[s]);
            let resid: Vec<u8> = match self.ty {
                SampleType::F32 => order.iter().flat_map(|&s| bytemuck::cast_slice::<f32, u8>(&r.resid32[s * e..(s + 1) * e]).iter().copied()).collect(),
                SampleType::F16 => order.iter().flat_map(|&s| bytemuck::cast_slice::<f16, u8>(&r.resid16[s * e..(s + 1) * e]).iter().copied()).collect(),
            };
            let masks: Vec<u32> = order.iter().flat_map(|&s| r.masks[s * words..(s + 1) * words].iter().copied()).collect();
            let tokens: Vec<u64> = order.iter().map(|&s| r.tokens[s]).collect();
            add_sample_layer(&mut w, l, (order.len(), e, self.n_ff), self.ty, resid, &masks, &tokens)?;
        }
        w.write_file(path).map_err(|source| ProfileError::Write { path: path.display().to_string(), source })
    }
}

/// The samples of one layer: `n` tokens' predictor inputs and which neurons fired.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerSamples {
    pub n: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    /// `n` rows of `n_embd`: the residual stream entering the FFN block.
    pub resid: Vec<f32>,
    /// `n` rows of `ceil(n_ff / 32)` words; bit `i % 32` of word `i / 32` = neuron i fired.
    pub masks: Vec<u32>,
    /// Position of each token in the profiled stream, ascending.
    pub tokens: Vec<u64>,
}

impl LayerSamples {
    pub fn words(&self) -> usize {
        self.n_ff.div_ceil(32)
    }

    pub fn resid_row(&self, t: usize) -> &[f32] {
        &self.resid[t * self.n_embd..(t + 1) * self.n_embd]
    }

    pub fn mask(&self, t: usize) -> &[u32] {
        let w = self.words();
        &self.masks[t * w..(t + 1) * w]
    }

    pub fn fired(&self, t: usize, neuron: usize) -> bool {
        self.mask(t)[neuron / 32] >> (neuron % 32) & 1 == 1
    }

    /// Fraction of (token, neuron) pairs that fired.
    pub fn active_fraction(&self) -> f64 {
        if self.n == 0 || self.n_ff == 0 {
            return 0.0;
        }
        let ones: u64 = self.masks.iter().map(|w| w.count_ones() as u64).sum();
        ones as f64 / (self.n as f64 * self.n_ff as f64)
    }
}

/// Builds a samples file image from samples held in memory.
pub fn samples_gguf(layers: &[LayerSamples], ty: SampleType, model_name: &str, seed: u64, n_tokens_seen: u64) -> Result<GgufWriter> {
    let first = layers.first().ok_or_else(|| ProfileError::Empty("the model has no layers".into()))?;
    let shape = (first.n, first.n_embd, first.n_ff);
    let mut w = samples_header(layers.len(), shape.0, shape.1, shape.2, model_name, seed, n_tokens_seen)?;
    for (l, s) in layers.iter().enumerate() {
        let resid: Vec<u8> = match ty {
            SampleType::F32 => bytemuck::cast_slice(&s.resid).to_vec(),
            SampleType::F16 => s.resid.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
        };
        if (s.n, s.n_embd, s.n_ff) != shape {
            return Err(ProfileError::Mismatch(format!("layer {l} has {} samples of {}x{}, layer 0 {:?}", s.n, s.n_embd, s.n_ff, shape)));
        }
        add_sample_layer(&mut w, l, (s.n, s.n_embd, s.n_ff), ty, resid, &s.masks, &s.tokens)?;
    }
    Ok(w)
}

fn samples_header(n_layer: usize, n: usize, e: usize, ff: usize, model_name: &str, seed: u64, n_tokens_seen: u64) -> Result<GgufWriter> {
    if n_layer == 0 {
        return Err(ProfileError::Empty("the model has no layers".into()));
    }
    if n == 0 {
        return Err(ProfileError::Empty("no token was sampled (profile more text or raise --samples)".into()));
    }
    if n > i32::MAX as usize {
        return Err(ProfileError::TooLarge(format!("{n} samples")));
    }
    let mut w = GgufWriter::new();
    w.set("general.type", Value::String(SAMPLES_TYPE.into()));
    w.set("general.name", Value::String(format!("{model_name} predictor samples")));
    w.set("ember.samples.model", Value::String(model_name.into()));
    w.set("ember.samples.n_layer", Value::U32(n_layer as u32));
    w.set("ember.samples.n_embd", Value::U32(e as u32));
    w.set("ember.samples.n_ff", Value::U32(ff as u32));
    w.set("ember.samples.count", Value::U32(n as u32));
    w.set("ember.samples.seed", Value::U64(seed));
    w.set("ember.samples.n_tokens_seen", Value::U64(n_tokens_seen));
    w.set("ember.samples.input", Value::String("residual stream entering the FFN block (before ffn_norm)".into()));
    Ok(w)
}

#[allow(clippy::too_many_arguments)]
fn add_sample_layer(w: &mut GgufWriter, l: usize, (n, e, ff): (usize, usize, usize), ty: SampleType, resid: Vec<u8>, masks: &[u32], tokens: &[u64]) -> Result<()> {
    if tokens.iter().any(|&t| t > i32::MAX as u64) {
        return Err(ProfileError::TooLarge("a sampled token position".into()));
    }
    let words = ff.div_ceil(32);
    if resid.len() != n * e * ty.ggml().block_bytes() || masks.len() != n * words || tokens.len() != n {
        return Err(ProfileError::Mismatch(format!("layer {l}: {} resid bytes, {} mask words, {} tokens for {n} samples", resid.len(), masks.len(), tokens.len())));
    }
    w.add_tensor(&format!("blk.{l}.resid"), &[e as u64, n as u64], ty.ggml(), resid);
    w.add_tensor(&format!("blk.{l}.mask"), &[words as u64, n as u64], GgmlType::I32, bytemuck::cast_slice(masks).to_vec());
    let tokens: Vec<u8> = tokens.iter().flat_map(|&t| (t as i32).to_le_bytes()).collect();
    w.add_tensor(&format!("blk.{l}.token"), &[n as u64], GgmlType::I32, tokens);
    Ok(())
}

/// A samples file, mapped; layers are read one at a time.
pub struct SampleSet {
    file: GgufFile,
    pub model_name: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    /// Samples per layer.
    pub n: usize,
    /// Tokens the profiler saw (the population the samples were drawn from).
    pub n_tokens_seen: u64,
}

impl SampleSet {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_gguf(GgufFile::open(path)?).map_err(|e| match e {
            ProfileError::WrongKind { got, want, hint, .. } => ProfileError::WrongKind { path: path.display().to_string(), want, got, hint },
            e => e,
        })
    }

    pub fn from_gguf(file: GgufFile) -> Result<Self> {
        check_kind(&file, SAMPLES_TYPE, "predictor samples", "make one with `ember profile --samples-out FILE`")?;
        let n_layer = meta_usize(&file, "ember.samples.n_layer", 1 << 16)?;
        let n_embd = meta_usize(&file, "ember.samples.n_embd", 1 << 20)?;
        let n_ff = meta_usize(&file, "ember.samples.n_ff", 1 << 24)?;
        let n = meta_usize(&file, "ember.samples.count", 1 << 30)?;
        let text = |k: &str| file.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
        let model_name = text("ember.samples.model");
        let n_tokens_seen = file.get("ember.samples.n_tokens_seen").and_then(|v| v.as_u64()).unwrap_or(0);
        let set = SampleSet { file, model_name, n_layer, n_embd, n_ff, n, n_tokens_seen };
        // Shapes of every layer are checked now, so that `layer` fails only on values.
        for l in 0..n_layer {
            set.tensor(&format!("blk.{l}.resid"), &[n_embd as u64, n as u64], &[GgmlType::F32, GgmlType::F16])?;
            set.tensor(&format!("blk.{l}.mask"), &[n_ff.div_ceil(32) as u64, n as u64], &[GgmlType::I32])?;
            set.tensor(&format!("blk.{l}.token"), &[n as u64], &[GgmlType::I32])?;
        }
        Ok(set)
    }

    fn tensor(&self, name: &str, dims: &[u64], types: &[GgmlType]) -> Result<&crate::gguf::TensorInfo> {
        let t = self.file.tensor(name).ok_or_else(|| ProfileError::BadTensor { name: name.into(), reason: "missing".into() })?;
        if t.dims != dims {
            return Err(ProfileError::BadTensor { name: name.into(), reason: format!("shape {:?}, expected {dims:?}", t.dims) });
        }
        if !types.contains(&t.ty) {
            return Err(ProfileError::BadTensor { name: name.into(), reason: format!("type {}, expected one of {types:?}", t.ty) });
        }
        Ok(t)
    }

    /// Layer `l`'s samples, residuals converted to f32.
    pub fn layer(&self, l: usize) -> Result<LayerSamples> {
        if l >= self.n_layer {
            return Err(ProfileError::BadTensor { name: format!("blk.{l}.resid"), reason: format!("the file has {} layers", self.n_layer) });
        }
        let (n, e) = (self.n, self.n_embd);
        let t = self.tensor(&format!("blk.{l}.resid"), &[e as u64, n as u64], &[GgmlType::F32, GgmlType::F16])?;
        let mut resid = vec![0.0f32; n * e];
        crate::quant::dequantize(t.ty, self.file.tensor_data(t), &mut resid)
            .map_err(|err| ProfileError::BadTensor { name: t.name.clone(), reason: format!("{err:?}") })?;
        if let Some(i) = resid.iter().position(|v| !v.is_finite()) {
            return Err(ProfileError::BadTensor { name: t.name.clone(), reason: format!("value {} at {i} is not finite", resid[i]) });
        }
        let masks: Vec<u32> = i32_tensor(&self.file, &format!("blk.{l}.mask"), &[n_words(self.n_ff), n as u64])?.into_iter().map(|v| v as u32).collect();
        // Bits past n_ff in the last word would be neurons that do not exist.
        let words = self.n_ff.div_ceil(32);
        if !self.n_ff.is_multiple_of(32) {
            let spare = !((1u32 << (self.n_ff % 32)) - 1);
            if masks.chunks_exact(words).any(|m| m[words - 1] & spare != 0) {
                return Err(ProfileError::BadTensor { name: format!("blk.{l}.mask"), reason: format!("bits set past neuron {}", self.n_ff) });
            }
        }
        let tokens = i32_tensor(&self.file, &format!("blk.{l}.token"), &[n as u64])?;
        if tokens.iter().any(|&t| t < 0) || tokens.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ProfileError::BadTensor { name: format!("blk.{l}.token"), reason: "positions must be non-negative and ascending".into() });
        }
        Ok(LayerSamples { n, n_embd: e, n_ff: self.n_ff, resid, masks, tokens: tokens.into_iter().map(|t| t as u64).collect() })
    }
}

fn n_words(n_ff: usize) -> u64 {
    n_ff.div_ceil(32) as u64
}

fn check_kind(f: &GgufFile, want: &str, what: &'static str, hint: &'static str) -> Result<()> {
    let got = f.get("general.type").and_then(|v| v.as_str());
    if got != Some(want) {
        return Err(ProfileError::WrongKind { path: String::new(), want: what, got: got.map(str::to_string), hint });
    }
    Ok(())
}

fn bad_meta(key: &str, reason: &str) -> ProfileError {
    ProfileError::BadMetadata { key: key.into(), reason: reason.into() }
}

fn meta_usize(f: &GgufFile, key: &str, max: u64) -> Result<usize> {
    let v = f.get_u64(key)?;
    if v == 0 || v > max {
        return Err(bad_meta(key, &format!("{v} is outside 1..={max}")));
    }
    Ok(v as usize)
}

fn i32_tensor(f: &GgufFile, name: &str, dims: &[u64]) -> Result<Vec<i32>> {
    let t = f.tensor(name).ok_or_else(|| ProfileError::BadTensor { name: name.into(), reason: "missing".into() })?;
    if t.ty != GgmlType::I32 || t.dims != dims {
        return Err(ProfileError::BadTensor { name: name.into(), reason: format!("{} {:?}, expected I32 {dims:?}", t.ty, t.dims) });
    }
    Ok(f.tensor_data(t).chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// Counts firings and, optionally, keeps samples: hand it to a session as
/// `Box::new(shared.clone())` (an `Arc<Mutex<Profiler>>` is an observer) and read it back
/// through the `Arc` when done.
pub struct Profiler {
    act: Activation,
    pub profile: ActivationProfile,
    pub samples: Option<SampleCollector>,
}

impl Profiler {
    pub fn new(model_name: &str, act: Activation, n_layer: usize, n_ff: usize) -> Self {
        Profiler { act, profile: ActivationProfile::new(model_name, n_layer, n_ff), samples: None }
    }

    /// Also keeps a uniform sample of at most `capacity` tokens per layer.
    pub fn with_samples(mut self, n_embd: usize, capacity: usize, ty: SampleType, seed: u64) -> Self {
        let (n_layer, n_ff) = (self.profile.n_layer(), self.profile.n_ff());
        self.samples = Some(SampleCollector::new(n_layer, n_embd, n_ff, capacity, ty, seed));
        self
    }

    /// A profiler for `model`'s shape and activation.
    pub fn for_model(model: &crate::model::Model) -> Self {
        let hp = &model.hp;
        let name = model.file.get("general.name").and_then(|v| v.as_str()).unwrap_or("unnamed model");
        Profiler::new(name, hp.activation, hp.n_layer, hp.n_ff)
    }

    pub fn shared(self) -> Arc<Mutex<Profiler>> {
        Arc::new(Mutex::new(self))
    }
}

impl FfnObserver for Profiler {
    fn observe(&mut self, layer: usize, resid: &[f32], gate_pre: &[f32], up_pre: &[f32]) {
        if layer >= self.profile.n_layer() || gate_pre.len() != self.profile.n_ff() || up_pre.len() != gate_pre.len() {
            // A session of another model: counting it would corrupt the profile.
            return;
        }
        self.profile.record(layer, self.act, gate_pre, up_pre);
        if let Some(s) = self.samples.as_mut() {
            if resid.len() == s.n_embd {
                s.offer(layer, self.act, resid, gate_pre, up_pre);
            }
        }
    }
}

/// Lets the caller keep the profiler after handing it to a session as a boxed observer.
impl FfnObserver for Arc<Mutex<Profiler>> {
    fn observe(&mut self, layer: usize, resid: &[f32], gate_pre: &[f32], up_pre: &[f32]) {
        // A poisoned lock means another observer call panicked; its counts are still usable.
        let mut p = self.lock().unwrap_or_else(|e| e.into_inner());
        p.observe(layer, resid, gate_pre, up_pre)
    }
}
