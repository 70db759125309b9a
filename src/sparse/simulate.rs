//! Simulated activity, for speed tests of models too large to download: random weights do not
//! fire like a trained ReLU model, so each token's active neurons are drawn from per-neuron
//! firing rates profiled on a real one, stretched to the synthetic shape. Every output made
//! this way must say "simulated activity".
//!
//! A simulated run also models the predictor that a real run would need ([`PredictorSim`]):
//! each token draws which neurons fire, then which of them a predictor of the given recall
//! names, and which non-firing neurons it names as well (its false positives, enough for the
//! given precision). The kernels get the named neurons (candidates) and, among them, the ones
//! that fire: a candidate costs its gate row, a firing candidate its up and down rows too.
//! A firing neuron the predictor misses is not computed, as in a real run. False positives
//! fall on neurons in proportion to their firing rate, capped at certainty: a predictor
//! mistakes neurons that often fire rather than ones that never do.

use super::profile::{mix64, ActivationProfile, SplitMix};

/// How a simulated predictor errs, and what it costs: `--simulate-predictor`.
#[derive(Clone, Debug, PartialEq)]
pub struct PredictorSim {
    /// Share of the firing neurons the predictor names.
    pub recall: f64,
    /// Share of the named neurons that fire.
    pub precision: f64,
    /// Rank of the predictor matrices run (and charged) per token and layer; 0 runs none (a
    /// free predictor); None: the trained predictors' rank where a file gives one, else
    /// [`PredictorSim::DEFAULT_RANK`] (a perfect predictor defaults to free).
    pub rank: Option<usize>,
    /// Seed of the draws.
    pub seed: u64,
    /// Mean firing rate to scale the profile's rates to (over every neuron of every layer);
    /// None keeps the profile's.
    pub rate: Option<f64>,
}

impl PredictorSim {
    /// What ember's predictors for SmolLM2-135M-ReLU reached at held-out recall >= 0.99 (rank
    /// 32, Q8_0; recall 0.99-0.998, precision 0.29-0.33: BENCHMARKS.md, "Predictors,
    /// held-out protocol").
    pub const DEFAULT_RECALL: f64 = 0.99;
    pub const DEFAULT_PRECISION: f64 = 0.3;
    pub const DEFAULT_RANK: usize = 32;
    pub const DEFAULT_SEED: u64 = 0x5eed;

    /// recall = precision = 1: every firing neuron and nothing else, an upper bound.
    pub fn is_perfect(&self) -> bool {
        self.recall >= 1.0 && self.precision >= 1.0
    }

    /// The rank that runs: `rank`, else 0 for a perfect predictor, else `trained` (the rank
    /// of a predictor file) or the default.
    pub fn rank_or(&self, trained: Option<usize>) -> usize {
        match self.rank {
            Some(r) => r,
            None if self.is_perfect() => 0,
            None => trained.unwrap_or(Self::DEFAULT_RANK),
        }
    }
}

impl Default for PredictorSim {
    fn default() -> Self {
        PredictorSim { recall: Self::DEFAULT_RECALL, precision: Self::DEFAULT_PRECISION, rank: None, seed: Self::DEFAULT_SEED, rate: None }
    }
}

impl std::str::FromStr for PredictorSim {
    type Err = String;

    /// `key=value` pairs separated by commas, each optional: `recall`, `precision` (in (0, 1]),
    /// `rank` (0 = no predictor run), `seed`, `rate` (mean firing rate in (0, 1), e.g. 0.1 or
    /// 10%); `perfect` for recall=1,precision=1.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut p = PredictorSim::default();
        for part in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if part == "perfect" {
                (p.recall, p.precision) = (1.0, 1.0);
                continue;
            }
            let Some((key, value)) = part.split_once('=') else {
                return Err(format!("{part:?}: give key=value (recall, precision, rank, seed, rate) or `perfect`"));
            };
            let fraction = |v: &str| -> Result<f64, String> {
                let (num, scale) = match v.strip_suffix('%') {
                    Some(n) => (n, 0.01),
                    None => (v, 1.0),
                };
                let f = num.trim().parse::<f64>().map_err(|_| format!("{key}={v}: not a number"))? * scale;
                if f > 0.0 && f <= 1.0 {
                    Ok(f)
                } else {
                    Err(format!("{key}={v}: give a fraction in (0, 1]"))
                }
            };
            match key.trim() {
                "recall" => p.recall = fraction(value)?,
                "precision" => p.precision = fraction(value)?,
                "rank" => p.rank = Some(value.trim().parse().map_err(|_| format!("rank={value}: give a whole number (0 = no predictor)"))?),
                "seed" => p.seed = value.trim().parse().map_err(|_| format!("seed={value}: give a whole number"))?,
                "rate" => {
                    let r = fraction(value)?;
                    if r >= 1.0 {
                        return Err(format!("rate={value}: a mean firing rate below 1"));
                    }
                    p.rate = Some(r)
                }
                other => return Err(format!("{other:?}: unknown key (recall, precision, rank, seed, rate)")),
            }
        }
        Ok(p)
    }
}

/// One token's draw for one layer.
#[derive(Clone, Debug, Default)]
pub struct Drawn {
    /// Neurons the predictor names, ascending: their gate rows are read.
    pub candidates: Vec<u32>,
    /// Per candidate: whether it fires (then its up and down rows are read).
    pub fires: Vec<bool>,
    /// Neurons that fired, named or not (for measuring recall).
    pub n_fired: usize,
}

impl Drawn {
    /// The candidates that fire, ascending.
    pub fn firing(&self) -> impl Iterator<Item = u32> + '_ {
        self.candidates.iter().zip(&self.fires).filter(|(_, &f)| f).map(|(&i, _)| i)
    }
}

/// Per layer and neuron firing probabilities, how a predictor errs on them, and the random
/// stream that draws from them.
#[derive(Clone, Debug)]
pub struct SimulatedActivity {
    rates: Vec<Vec<f32>>,
    /// `rate * 2^32`, saturated: a neuron fires when a uniform u32 falls below it.
    thresholds: Vec<Vec<u32>>,
    /// A firing neuron is named when a second uniform u32 falls below this (recall * 2^32).
    keep: u32,
    /// Per layer and neuron: a non-firing neuron is named when the second u32 falls below it.
    false_pos: Vec<Vec<u32>>,
    perfect: bool,
    /// The recall and precision asked for (`with_predictor`).
    asked: (f64, f64),
    rng: SplitMix,
}

fn thresholds(rates: &[Vec<f32>]) -> Vec<Vec<u32>> {
    rates.iter().map(|r| r.iter().map(|&p| prob_u32(p as f64)).collect()).collect()
}

/// `p * 2^32` saturated: a uniform u32 is below it with probability p (1 - 2^-32 for p = 1).
fn prob_u32(p: f64) -> u32 {
    (p.clamp(0.0, 1.0) * 4294967296.0).min(u32::MAX as f64) as u32
}

/// Rates scaled by one factor (capped at 1) so that their mean over all neurons is `mean`;
/// the factor is found by bisection since the cap bends the relation.
fn scale_rates(rates: &mut [Vec<f32>], mean: f64) -> Result<(), String> {
    let n: usize = rates.iter().map(Vec::len).sum();
    let mean_at = |s: f64| rates.iter().flatten().map(|&r| (r as f64 * s).min(1.0)).sum::<f64>() / n.max(1) as f64;
    let nonzero = rates.iter().flatten().filter(|&&r| r > 0.0).count() as f64 / n.max(1) as f64;
    if mean > nonzero {
        return Err(format!("rate={mean}: the profile has only {:.1}% of neurons that ever fire, so its mean cannot reach that", 100.0 * nonzero));
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while mean_at(hi) < mean {
        hi *= 2.0;
    }
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if mean_at(mid) < mean {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    for r in rates.iter_mut().flatten() {
        *r = (*r as f64 * hi).min(1.0) as f32;
    }
    Ok(())
}

/// Per-neuron probabilities that a non-firing neuron is named, `min(1, c * rate)`, with `c`
/// from [`false_positive_scale`].
fn false_positive_probs(rates: &[f32], recall: f64, precision: f64) -> Vec<f64> {
    let c = false_positive_scale(rates, recall, precision);
    rates.iter().map(|&q| (c * q as f64).min(1.0)).collect()
}

/// The `c` of a predictor that names a non-firing neuron of rate q with probability
/// `min(1, c * q)`, such that the expected named neurons that do not fire give `precision` at
/// `recall` (0 when nothing fires or the precision is perfect). Where even c -> infinity
/// cannot name enough, a `c` that names every neuron with a non-zero rate.
pub fn false_positive_scale(rates: &[f32], recall: f64, precision: f64) -> f64 {
    let fired: f64 = rates.iter().map(|&q| q as f64).sum();
    let want = recall * fired * (1.0 / precision - 1.0);
    let expected = |c: f64| rates.iter().map(|&q| (1.0 - q as f64) * (c * q as f64).min(1.0)).sum::<f64>();
    if want <= 0.0 || fired <= 0.0 || !want.is_finite() {
        return 0.0;
    }
    let min_rate = rates.iter().copied().filter(|&q| q > 0.0).fold(1.0f32, f32::min) as f64;
    let mut hi = 1.0f64;
    // Past 1 / min_rate every neuron that ever fires is certain: the most there is.
    while expected(hi) < want && hi < 2.0 / min_rate {
        hi *= 2.0;
    }
    let mut lo = 0.0f64;
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if expected(mid) < want {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

impl SimulatedActivity {
    /// Rates of `profile` stretched to `n_layer` x `n_ff`: synthetic neuron j of layer l takes
    /// the rate of profiled neuron `j * n_ff0 / n_ff` of layer `l * n_layer0 / n_layer`.
    /// Drawn with a perfect predictor until [`Self::with_predictor`].
    pub fn from_profile(profile: &ActivationProfile, n_layer: usize, n_ff: usize, seed: u64) -> Result<Self, String> {
        Ok(Self::from_rates(stretched_rates(profile, n_layer, n_ff)?, seed))
    }

    fn from_rates(rates: Vec<Vec<f32>>, seed: u64) -> Self {
        let false_pos = rates.iter().map(|r| vec![0; r.len()]).collect();
        SimulatedActivity { thresholds: thresholds(&rates), rates, keep: u32::MAX, false_pos, perfect: true, asked: (1.0, 1.0), rng: SplitMix(seed) }
    }

    /// Uniform rates (tests).
    pub fn uniform(n_layer: usize, n_ff: usize, rate: f32, seed: u64) -> Self {
        Self::from_rates(vec![vec![rate; n_ff]; n_layer], seed)
    }

    /// Rates scaled to `p.rate` (when given), draws seeded with `p.seed`, and the predictor's
    /// errors: recall `p.recall`, precision `p.precision` (per layer, in expectation).
    pub fn with_predictor(mut self, p: &PredictorSim) -> Result<Self, String> {
        if let Some(mean) = p.rate {
            scale_rates(&mut self.rates, mean)?;
            self.thresholds = thresholds(&self.rates);
        }
        self.rng = SplitMix(p.seed);
        self.perfect = p.is_perfect();
        self.asked = (p.recall, p.precision);
        self.keep = prob_u32(p.recall);
        self.false_pos = match self.perfect {
            true => self.rates.iter().map(|r| vec![0; r.len()]).collect(),
            false => self.rates.iter().map(|r| false_positive_probs(r, p.recall, p.precision).into_iter().map(prob_u32).collect()).collect(),
        };
        Ok(self)
    }

    /// Whether the predictor is perfect (the candidates are the firing neurons).
    pub fn is_perfect(&self) -> bool {
        self.perfect
    }

    /// The predictor's recall and precision as asked (`--simulate-predictor`; the draws reach
    /// less where the rates cannot give enough false positives), None when perfect: what a
    /// placement values cold neurons by, as `ember plan` does from the same flags.
    pub fn asked_quality(&self) -> Option<(f64, f64)> {
        (!self.perfect).then_some(self.asked)
    }

    pub fn rates(&self, layer: usize) -> &[f32] {
        &self.rates[layer]
    }

    /// Mean fraction of neurons active per token, per layer.
    pub fn density(&self) -> Vec<f64> {
        self.rates.iter().map(|r| r.iter().map(|&v| v as f64).sum::<f64>() / r.len().max(1) as f64).collect()
    }

    /// Mean fraction of neurons firing per token over all layers.
    pub fn mean_rate(&self) -> f64 {
        let d = self.density();
        d.iter().sum::<f64>() / d.len().max(1) as f64
    }

    /// Expected (recall, precision, share of neurons named) over all layers, from the rates:
    /// what the draws reach on average.
    pub fn expected_quality(&self) -> (f64, f64, f64) {
        let keep = self.keep as f64 / 4294967296.0;
        let (mut fired, mut hit, mut named, mut n) = (0.0, 0.0, 0.0, 0usize);
        for (r, fp) in self.rates.iter().zip(&self.false_pos) {
            for (&q, &f) in r.iter().zip(fp) {
                let (q, f) = (q as f64, f as f64 / 4294967296.0);
                fired += q;
                hit += q * keep;
                named += q * keep + (1.0 - q) * f;
                n += 1;
            }
        }
        if self.perfect {
            return (1.0, 1.0, fired / n.max(1) as f64);
        }
        (hit / fired.max(1e-300), hit / named.max(1e-300), named / n.max(1) as f64)
    }

    /// Expected firing counts per million tokens: what placement ranks neurons by.
    pub fn counts(&self) -> Vec<Vec<u32>> {
        per_million(&self.rates)
    }

    /// One token's active neurons of `layer`, ascending, each drawn with its rate: a perfect
    /// predictor's candidates. Two neurons per 64-bit draw, compared in integers: a 7B model
    /// draws 350k neurons a token, and this stands in for a predictor, so it must cost about
    /// as little.
    pub fn draw(&mut self, layer: usize, out: &mut Vec<u32>) {
        let thresholds = &self.thresholds[layer];
        out.clear();
        let state = self.rng.0;
        // 64 neurons (32 draws) at a time: their flags as a bit mask, from draws computed
        // from a counter (no branch, no data-dependent store: the loop vectorises), then the
        // set bits listed.
        for (c, th) in thresholds.chunks(64).enumerate() {
            let mut z = state.wrapping_add(SplitMix::STEP.wrapping_mul(32 * c as u64));
            let mut bits = 0u64;
            for (j, pair) in th.chunks(2).enumerate() {
                z = z.wrapping_add(SplitMix::STEP);
                let r = mix64(z);
                bits |= (((r as u32) < pair[0]) as u64) << (2 * j);
                if let Some(&t) = pair.get(1) {
                    bits |= ((((r >> 32) as u32) < t) as u64) << (2 * j + 1);
                }
            }
            list_bits(bits, 64 * c as u32, |i| out.push(i));
        }
        self.rng.skip(thresholds.len().div_ceil(2) as u64);
    }

    /// One token's draw for `layer` with the predictor's errors: which neurons fire, which of
    /// them the predictor names (recall), and which others it names (false positives). With a
    /// perfect predictor, [`Self::draw`]'s stream (the candidates are the firing neurons).
    /// `marks`, if given, gets one value per neuron for the GPU's hot neurons, which read it
    /// in place of a predictor's logits: 1 for a candidate that fires, 0 for one that does
    /// not, -1 for the rest.
    pub fn draw_predicted(&mut self, layer: usize, out: &mut Drawn, mut marks: Option<&mut Vec<f32>>) {
        out.candidates.clear();
        out.fires.clear();
        if let Some(m) = marks.as_deref_mut() {
            m.clear();
            m.resize(self.thresholds[layer].len(), -1.0);
        }
        if self.perfect {
            self.draw(layer, &mut out.candidates);
            out.fires.resize(out.candidates.len(), true);
            out.n_fired = out.candidates.len();
            if let Some(m) = marks {
                for &i in &out.candidates {
                    m[i as usize] = 1.0;
                }
            }
            return;
        }
        let (thresholds, false_pos, keep) = (&self.thresholds[layer], &self.false_pos[layer], self.keep);
        let state = self.rng.0;
        let mut fired = 0;
        // One 64-bit draw per neuron: the low half says whether it fires, the high half
        // whether the predictor names it. 64 neurons at a time, as in `draw`.
        let wide = wide_lanes();
        for (c, (th, fp)) in thresholds.chunks(64).zip(false_pos.chunks(64)).enumerate() {
            let z = state.wrapping_add(SplitMix::STEP.wrapping_mul(64 * c as u64));
            let (fire_bits, named_bits) = predicted_bits(wide, z, th, fp, keep);
            fired += fire_bits.count_ones() as usize;
            if let Some(m) = marks.as_deref_mut() {
                // Branch-free: named and firing 1, named 0, else -1.
                for (j, v) in m[64 * c..64 * c + th.len()].iter_mut().enumerate() {
                    *v = (named_bits >> j & 1) as f32 * (1.0 + (fire_bits >> j & 1) as f32) - 1.0;
                }
            }
            list_bits(named_bits, 64 * c as u32, |i| {
                out.candidates.push(i);
                out.fires.push(fire_bits >> (i % 64) & 1 != 0);
            });
        }
        self.rng.skip(thresholds.len() as u64);
        out.n_fired = fired;
    }
}

/// Up to 64 neurons' (firing, named) flags as bit masks, from the draws after state `z` (one
/// per neuron): `draw_predicted`'s inner loop, compiled for 8 lanes of 64-bit multiplies
/// where the CPU has them (`wide`, AVX-512DQ; plain x86-64 has no vector 64-bit multiply,
/// so the loop stays scalar: 1.4 against 0.8-1.0 ms a 7B token on an AVX-512 EPYC core,
/// `examples/simulate_bench`).
#[inline(always)]
fn predicted_bits(wide: bool, z: u64, th: &[u32], fp: &[u32], keep: u32) -> (u64, u64) {
    #[inline(always)]
    fn body(mut z: u64, th: &[u32], fp: &[u32], keep: u32) -> (u64, u64) {
        let (mut fire_bits, mut named_bits) = (0u64, 0u64);
        for (j, (&t, &f)) in th.iter().zip(fp).enumerate() {
            z = z.wrapping_add(SplitMix::STEP);
            let r = mix64(z);
            let fires = (r as u32) < t;
            let named = ((r >> 32) as u32) < if fires { keep } else { f };
            fire_bits |= (fires as u64) << j;
            named_bits |= (named as u64) << j;
        }
        (fire_bits, named_bits)
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx512bw")]
        unsafe fn body_avx512(z: u64, th: &[u32], fp: &[u32], keep: u32) -> (u64, u64) {
            body(z, th, fp, keep)
        }
        if wide {
            // SAFETY: `wide` says the CPU has these features (`wide_lanes`).
            return unsafe { body_avx512(z, th, fp, keep) };
        }
    }
    let _ = wide;
    body(z, th, fp, keep)
}

/// Whether this CPU has AVX-512DQ's 64-bit vector multiply (with F, VL and BW).
fn wide_lanes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq") && is_x86_feature_detected!("avx512vl") && is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Calls `f(base + j)` for each set bit j of `bits`, ascending.
#[inline(always)]
fn list_bits(mut bits: u64, base: u32, mut f: impl FnMut(u32)) {
    while bits != 0 {
        f(base + bits.trailing_zeros());
        bits &= bits - 1;
    }
}

/// The rates of `profile` stretched to `n_layer` x `n_ff` (see [`SimulatedActivity::from_profile`]).
fn stretched_rates(profile: &ActivationProfile, n_layer: usize, n_ff: usize) -> Result<Vec<Vec<f32>>, String> {
    let (l0, f0) = (profile.n_layer(), profile.n_ff());
    if l0 == 0 || f0 == 0 || profile.n_tokens() == 0 {
        return Err("the activation profile is empty: profile a ReLU model over some text first (`ember profile`)".into());
    }
    Ok((0..n_layer)
        .map(|l| {
            let src = l * l0 / n_layer;
            let tokens = profile.layer_tokens[src].max(1) as f32;
            (0..n_ff).map(|j| profile.counts[src][j * f0 / n_ff] as f32 / tokens).collect()
        })
        .collect())
}

/// A profile's firing counts stretched to `n_layer` x `n_ff` as the simulation stretches its
/// rates (per million tokens): for placing a synthetic model's neurons by a profile other than
/// the one the draws use.
pub fn stretched_counts(profile: &ActivationProfile, n_layer: usize, n_ff: usize) -> Result<Vec<Vec<u32>>, String> {
    Ok(per_million(&stretched_rates(profile, n_layer, n_ff)?))
}

/// Expected firing counts per million tokens of per-neuron rates: what placement ranks by.
fn per_million(rates: &[Vec<f32>]) -> Vec<Vec<u32>> {
    rates.iter().map(|r| r.iter().map(|&v| (v as f64 * 1e6).round() as u32).collect()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stretched_rates_and_draws() {
        let mut p = ActivationProfile::new("m", 2, 4);
        p.counts = vec![vec![10, 0, 5, 10], vec![1, 1, 1, 1]];
        p.layer_tokens = vec![10, 10];
        let mut s = SimulatedActivity::from_profile(&p, 4, 8, 7).unwrap();
        assert_eq!(s.rates(0), &[1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 1.0, 1.0]);
        assert_eq!(s.rates(3), &[0.1; 8]);
        let mut out = Vec::new();
        s.draw(0, &mut out);
        assert!(out.starts_with(&[0, 1]) && !out.contains(&2) && !out.contains(&3) && out.ends_with(&[6, 7]));
        assert!(SimulatedActivity::from_profile(&ActivationProfile::new("m", 1, 4), 1, 4, 0).is_err());
    }

    #[test]
    fn draws_follow_the_generator_one_draw_at_a_time() {
        // The definition the bit-mask loops must reproduce: the generator's draws in order,
        // two neurons per draw for `draw`, one per neuron for `draw_predicted`.
        for n_ff in [1, 2, 63, 64, 65, 129, 1000] {
            let mut s = SimulatedActivity::uniform(2, n_ff, 0.3, 11).with_predictor(&PredictorSim { precision: 0.5, ..Default::default() }).unwrap();
            let mut perfect = SimulatedActivity::uniform(2, n_ff, 0.3, 11);
            let (mut rng_p, mut rng) = (SplitMix(11), SplitMix(PredictorSim::DEFAULT_SEED));
            for round in 0..3 {
                let l = round % 2;
                let mut want = Vec::new();
                for pair in 0..n_ff.div_ceil(2) {
                    let r = rng_p.next_u64();
                    for (i, u) in [(2 * pair, r as u32), (2 * pair + 1, (r >> 32) as u32)] {
                        if i < n_ff && u < perfect.thresholds[l][i] {
                            want.push(i as u32);
                        }
                    }
                }
                let mut got = Vec::new();
                perfect.draw(l, &mut got);
                assert_eq!(got, want, "n_ff {n_ff}, round {round}: perfect draw");
                let (mut cands, mut fires, mut fired) = (Vec::new(), Vec::new(), 0);
                for i in 0..n_ff {
                    let r = rng.next_u64();
                    let f = (r as u32) < s.thresholds[l][i];
                    fired += f as usize;
                    if ((r >> 32) as u32) < if f { s.keep } else { s.false_pos[l][i] } {
                        cands.push(i as u32);
                        fires.push(f);
                    }
                }
                let (mut d, mut marks) = (Drawn::default(), Vec::new());
                s.draw_predicted(l, &mut d, Some(&mut marks));
                let mut want_marks = vec![-1.0f32; n_ff];
                for (&i, &f) in cands.iter().zip(&fires) {
                    want_marks[i as usize] = if f { 1.0 } else { 0.0 };
                }
                assert_eq!(marks, want_marks, "n_ff {n_ff}, round {round}: marks");
                assert_eq!((d.candidates, d.fires, d.n_fired), (cands, fires, fired), "n_ff {n_ff}, round {round}: predicted draw");
            }
        }
    }

    #[test]
    fn predictor_options_parse() {
        let p: PredictorSim = "recall=0.99,precision=0.3".parse().unwrap();
        assert_eq!((p.recall, p.precision, p.rank, p.rate), (0.99, 0.3, None, None));
        assert_eq!(p.rank_or(None), 32);
        assert_eq!(p.rank_or(Some(64)), 64);
        let p: PredictorSim = "perfect,rate=10%,rank=32,seed=3".parse().unwrap();
        assert!(p.is_perfect());
        assert_eq!((p.rank, p.seed), (Some(32), 3));
        assert!((p.rate.unwrap() - 0.1).abs() < 1e-12);
        assert_eq!("recall=1,precision=1".parse::<PredictorSim>().unwrap().rank_or(Some(32)), 0);
        for bad in ["recall=0", "precision=1.5", "rate=1", "rank=x", "foo=1", "recall"] {
            assert!(bad.parse::<PredictorSim>().is_err(), "{bad}");
        }
    }

    /// Recall and precision of the draws within sampling error of what was asked, the mean
    /// rate scaled as asked, the same stream for the same seed.
    #[test]
    fn draws_reach_the_requested_recall_and_precision() {
        let mut p = ActivationProfile::new("m", 2, 500);
        // Skewed rates: a few neurons fire often, most rarely, some never.
        p.counts = (0..2).map(|l| (0..500u32).map(|j| if j % 7 == 0 { 0 } else { 1000 / (1 + (j + l) % 50) }).collect()).collect();
        p.layer_tokens = vec![1000, 1000];
        for (recall, precision, rate) in [(0.99, 0.3, None), (0.9, 0.5, Some(0.05)), (0.998, 0.33, Some(0.25))] {
            let opts = PredictorSim { recall, precision, rate, ..Default::default() };
            let mut s = SimulatedActivity::from_profile(&p, 2, 500, 0).unwrap().with_predictor(&opts).unwrap();
            if let Some(r) = rate {
                assert!((s.mean_rate() - r).abs() < 1e-6, "mean rate {} for {r}", s.mean_rate());
            }
            let (er, ep, _) = s.expected_quality();
            assert!((er - recall).abs() < 1e-6 && (ep - precision).abs() < 1e-3, "expected {er} {ep}");
            let (mut fired, mut hit, mut named) = (0usize, 0usize, 0usize);
            let mut d = Drawn::default();
            for _ in 0..400 {
                for l in 0..2 {
                    s.draw_predicted(l, &mut d, None);
                    assert!(d.candidates.windows(2).all(|w| w[0] < w[1]));
                    fired += d.n_fired;
                    hit += d.firing().count();
                    named += d.candidates.len();
                }
            }
            let (r, pr) = (hit as f64 / fired as f64, hit as f64 / named as f64);
            // Binomial standard errors, 5 of them.
            let sr = 5.0 * (recall * (1.0 - recall) / fired as f64).sqrt() + 1e-3;
            let sp = 5.0 * (precision * (1.0 - precision) / named as f64).sqrt() + 1e-3;
            assert!((r - recall).abs() < sr, "recall {r} for {recall} ({fired} fired)");
            assert!((pr - precision).abs() < sp, "precision {pr} for {precision} ({named} named)");
            // Same seed, same draws.
            let mut a = SimulatedActivity::from_profile(&p, 2, 500, 0).unwrap().with_predictor(&opts).unwrap();
            let mut b = a.clone();
            let (mut da, mut db) = (Drawn::default(), Drawn::default());
            a.draw_predicted(1, &mut da, None);
            b.draw_predicted(1, &mut db, None);
            assert_eq!((da.candidates, da.fires), (db.candidates, db.fires));
        }
        // A perfect predictor draws what `draw` draws.
        let perfect = PredictorSim { recall: 1.0, precision: 1.0, seed: 9, ..Default::default() };
        let mut a = SimulatedActivity::from_profile(&p, 2, 500, 9).unwrap();
        let mut b = SimulatedActivity::from_profile(&p, 2, 500, 1).unwrap().with_predictor(&perfect).unwrap();
        let (mut va, mut db) = (Vec::new(), Drawn::default());
        a.draw(0, &mut va);
        b.draw_predicted(0, &mut db, None);
        assert_eq!(va, db.candidates);
        assert!(db.fires.iter().all(|&f| f));
    }
}
