//! Token sampling: greedy, or llama.cpp's default chain (repetition penalty -> top-k -> top-p
//! -> min-p -> temperature -> draw) with a seeded counter-based generator, so a seed reproduces
//! a run, and the GPU, which runs the chain after the penalties (`SampleRule`,
//! shaders/sample.wgsl), draws the same numbers.

/// Sampling settings; `temperature <= 0` means greedy.
#[derive(Clone, Debug)]
pub struct SamplerConfig {
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = all).
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one (0 = none).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recent tokens by this (1 = off).
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub repeat_last_n: usize,
    /// Subtracted from the logit of every token seen in the recent tokens (OpenAI's
    /// presence_penalty; 0 = off).
    pub presence_penalty: f32,
    /// Subtracted from a recent token's logit once per occurrence (OpenAI's
    /// frequency_penalty; 0 = off).
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig { temperature: 0.8, top_k: 40, top_p: 0.95, min_p: 0.05, repeat_penalty: 1.0, repeat_last_n: 64, presence_penalty: 0.0, frequency_penalty: 0.0, seed: 0 }
    }
}

/// One round of a 32-bit integer hash with full avalanche (xorshift-multiply, with the
/// constants of Wellons' low-bias search).
const fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// Draw number `draw` of `seed`: uniform in [0, 1) on a grid of 2^-24 (exact in f32). A
/// counter-based generator: each draw is a pure function of (seed, draw), so the GPU's sampling
/// kernel (shaders/sample.wgsl, the same three rounds) draws token n without the host's state,
/// and the CPU and GPU draw the same numbers.
pub fn uniform(seed: u64, draw: u32) -> f32 {
    let h = mix32(seed as u32 ^ mix32((seed >> 32) as u32 ^ mix32(draw ^ 0x9e37_79b9)));
    (h >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Largest top-k the GPU samples from (the top-k kernel's limit, shaders/topk.wgsl).
pub const DEVICE_TOP_K_MAX: usize = 64;

/// The chain after the penalties: top-k -> top-p -> min-p -> temperature -> draw, with every
/// quantity a device needs fixed on the host (ln min_p, 1 / temperature) so that the GPU's
/// kernel (shaders/sample.wgsl) and [`SampleRule::pick_sorted`] do the same f32 arithmetic in
/// the same order. They pick the same token except where a draw or the top-p mass lands within
/// the rounding of `exp` (which Vulkan allows a few ulp of) of a boundary.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleRule {
    /// Candidates kept (0 = all).
    pub top_k: u32,
    pub top_p: f32,
    /// ln(min_p); -f32::MAX for no floor (finite: a GPU compiler may assume no infinities).
    pub ln_min_p: f32,
    /// 1 / temperature, at most f32::MAX (so that ties times it stay 0).
    pub inv_temp: f32,
    pub seed: u64,
}

impl SampleRule {
    pub fn new(c: &SamplerConfig) -> Self {
        SampleRule {
            top_k: c.top_k.min(u32::MAX as usize) as u32,
            top_p: c.top_p,
            ln_min_p: if c.min_p > 0.0 { c.min_p.ln() } else { -f32::MAX },
            inv_temp: (1.0 / c.temperature).min(f32::MAX),
            seed: c.seed,
        }
    }

    /// The token for draw `draw` from raw logits (the CPU twin of the GPU's argmax + top-k +
    /// sample kernels). NaN and -inf logits are never chosen; with nothing else, token 0.
    pub fn pick(&self, logits: &[f32], draw: u32) -> u32 {
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        self.pick_from(&mut cand, draw)
    }

    /// [`pick`](Self::pick) over (id, logit) candidates, reordered in place.
    fn pick_from(&self, cand: &mut Vec<(u32, f32)>, draw: u32) -> u32 {
        // As the top-k kernel's keys: NaN and -inf are never candidates.
        cand.retain(|x| x.1 >= f32::MIN);
        if cand.is_empty() {
            return 0;
        }
        // By logit, ties by id, so the order (and so the draw) is reproducible; -0 ties +0, as
        // in the top-k kernel's keys (no NaN is left to compare).
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal).then(a.0.cmp(&b.0));
        let k = self.top_k as usize;
        if k > 0 && k < cand.len() {
            cand.select_nth_unstable_by(k - 1, by_logit);
            cand.truncate(k);
        }
        cand.sort_by(by_logit);
        self.pick_sorted(cand, draw)
    }

    /// The token for draw `draw` from candidates sorted by descending logit, ties by id (at
    /// least one): top-p, min-p, temperature, draw. Sums run in f32 in candidate order, one at
    /// a time, exactly as the GPU's single sampling thread does.
    pub fn pick_sorted(&self, cand: &[(u32, f32)], draw: u32) -> u32 {
        let l0 = cand[0].1;
        let mut n = cand.len();
        if self.top_p < 1.0 {
            // The smallest prefix whose mass at temperature 1 reaches top_p (at least one).
            let total: f32 = cand.iter().fold(0.0, |s, x| s + (x.1 - l0).exp());
            let target = self.top_p * total;
            let mut cum = 0.0f32;
            for (i, x) in cand.iter().enumerate() {
                cum += (x.1 - l0).exp();
                if cum >= target {
                    n = i + 1;
                    break;
                }
            }
        }
        // min-p: logits at least ln(min_p) below the best one go (the best always stays).
        let floor = l0 + self.ln_min_p;
        n = cand[..n].iter().take_while(|x| x.1 >= floor).count().max(1);
        // Clamped so that a tiny temperature gives exact zeros, never -inf times anything.
        let weight = |x: &(u32, f32)| ((x.1 - l0) * self.inv_temp).max(-200.0).exp();
        let total: f32 = cand[..n].iter().fold(0.0, |s, x| s + weight(x));
        let target = uniform(self.seed, draw) * total;
        let mut cum = 0.0f32;
        for x in &cand[..n] {
            cum += weight(x);
            if target < cum {
                return x.0;
            }
        }
        cand[n - 1].0
    }
}

pub struct Sampler {
    pub config: SamplerConfig,
    /// Draws made so far: the next draw's counter for [`uniform`].
    draws: u32,
    recent: Vec<u32>,
}

impl Sampler {
    pub fn new(config: SamplerConfig) -> Self {
        Sampler { config, draws: 0, recent: Vec::new() }
    }

    /// Whether every choice is the argmax of the raw logits (greedy, no penalty).
    pub fn is_greedy(&self) -> bool {
        self.config.temperature <= 0.0 && self.no_penalty()
    }

    fn no_penalty(&self) -> bool {
        let c = &self.config;
        (c.repeat_penalty == 1.0 && c.presence_penalty == 0.0 && c.frequency_penalty == 0.0) || c.repeat_last_n == 0
    }

    /// The rule a device can apply to the raw logits on its own, when sampling needs nothing
    /// from the host: a temperature, no penalty (they depend on the tokens so far) and a top-k
    /// of 1 to [`DEVICE_TOP_K_MAX`].
    pub fn device_rule(&self) -> Option<SampleRule> {
        let c = &self.config;
        (c.temperature > 0.0 && self.no_penalty() && (1..=DEVICE_TOP_K_MAX).contains(&c.top_k)).then(|| SampleRule::new(c))
    }

    /// The counter of the next draw (a device sampling for this sampler starts there).
    pub fn next_draw(&self) -> u32 {
        self.draws
    }

    /// Records a token that a device drew with counter [`next_draw`](Self::next_draw).
    pub fn accept_drawn(&mut self, token: u32) {
        self.draws = self.draws.wrapping_add(1);
        self.accept(token);
    }

    /// Tells the sampler about tokens already in the context (for the repetition penalty).
    pub fn accept(&mut self, token: u32) {
        self.recent.push(token);
        let n = self.config.repeat_last_n;
        if self.recent.len() > n {
            self.recent.drain(..self.recent.len() - n);
        }
    }

    /// Picks the next token from `logits` (and records it as accepted).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let token = self.choose(logits);
        self.accept(token);
        token
    }

    fn choose(&mut self, logits: &[f32]) -> u32 {
        let c = &self.config;
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        if c.repeat_penalty != 1.0 && c.repeat_last_n > 0 {
            let mut seen = std::collections::HashSet::new();
            for &t in &self.recent {
                if seen.insert(t) {
                    if let Some(x) = cand.get_mut(t as usize) {
                        x.1 = if x.1 > 0.0 { x.1 / c.repeat_penalty } else { x.1 * c.repeat_penalty };
                    }
                }
            }
        }
        if (c.presence_penalty != 0.0 || c.frequency_penalty != 0.0) && c.repeat_last_n > 0 {
            // Occurrences counted in a sorted map: the order of the updates is fixed.
            let mut counts = std::collections::BTreeMap::new();
            for &t in &self.recent {
                *counts.entry(t).or_insert(0u32) += 1;
            }
            for (t, n) in counts {
                if let Some(x) = cand.get_mut(t as usize) {
                    x.1 -= c.presence_penalty + c.frequency_penalty * n as f32;
                }
            }
        }
        if c.temperature <= 0.0 {
            // Greedy: the first of equal maxima, like an argmax.
            return cand.iter().fold((0u32, f32::NEG_INFINITY), |b, &x| if x.1 > b.1 { x } else { b }).0;
        }
        let draw = self.draws;
        self.draws = self.draws.wrapping_add(1);
        SampleRule::new(c).pick_from(&mut cand, draw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.5, -1.0, 0.5, 2.9]
    }

    #[test]
    fn greedy_picks_the_maximum() {
        let mut s = Sampler::new(SamplerConfig { temperature: 0.0, ..Default::default() });
        assert_eq!(s.sample(&logits()), 1);
    }

    #[test]
    fn repetition_penalty_can_change_the_greedy_choice() {
        let mut s = Sampler::new(SamplerConfig { temperature: 0.0, repeat_penalty: 1.1, ..Default::default() });
        s.accept(1);
        // 3.0 / 1.1 = 2.727 < 2.9
        assert_eq!(s.sample(&logits()), 5);
    }

    #[test]
    fn presence_and_frequency_penalties_subtract_from_seen_tokens() {
        // Token 1 (3.0) seen twice: 3.0 - 0.05 - 2 * 0.1 = 2.75 < 2.9 (token 5).
        let mut s = Sampler::new(SamplerConfig { temperature: 0.0, presence_penalty: 0.05, frequency_penalty: 0.1, ..Default::default() });
        assert!(!s.is_greedy());
        s.accept(1);
        s.accept(1);
        assert_eq!(s.sample(&logits()), 5);
        // Seen once: 3.0 - 0.05 - 0.1 = 2.85 < 2.9 as well; with presence alone, 2.95 > 2.9.
        let mut s = Sampler::new(SamplerConfig { temperature: 0.0, presence_penalty: 0.05, ..Default::default() });
        s.accept(1);
        assert_eq!(s.sample(&logits()), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut s = Sampler::new(SamplerConfig { temperature: 5.0, top_k: 1, seed: 7, ..Default::default() });
        for _ in 0..50 {
            assert_eq!(s.sample(&logits()), 1);
        }
    }

    #[test]
    fn min_p_and_top_p_restrict_the_support() {
        // min_p 0.5: keeps tokens with logit >= 3 + ln 0.5 = 2.307: ids 1, 5, 2.
        let mut s = Sampler::new(SamplerConfig { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.5, seed: 3, ..Default::default() });
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..300 {
            seen.insert(s.sample(&logits()));
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![1, 2, 5]);
        // top_p 0.5: p(1) = 0.36, p(5) = 0.33 -> {1, 5}.
        let mut s = Sampler::new(SamplerConfig { temperature: 1.0, top_k: 0, top_p: 0.5, min_p: 0.0, seed: 3, ..Default::default() });
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..300 {
            seen.insert(s.sample(&logits()));
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![1, 5]);
    }

    #[test]
    fn same_seed_same_draws_other_seed_other_draws() {
        let draw = |seed| {
            let mut s = Sampler::new(SamplerConfig { temperature: 1.5, top_k: 0, top_p: 1.0, min_p: 0.0, seed, ..Default::default() });
            (0..64).map(|_| s.sample(&logits())).collect::<Vec<_>>()
        };
        assert_eq!(draw(11), draw(11));
        assert_ne!(draw(11), draw(12));
    }

    #[test]
    fn draw_frequencies_follow_the_distribution() {
        let l = [0.0f32, (3.0f32).ln()]; // p = 0.25, 0.75
        let mut s = Sampler::new(SamplerConfig { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: 1, ..Default::default() });
        let ones = (0..20000).filter(|_| s.sample(&l) == 1).count();
        assert!((ones as f64 / 20000.0 - 0.75).abs() < 0.02, "{ones}");
    }

    #[test]
    fn uniform_draws_are_uniform_and_seeded() {
        // 64 bins over 200k counters: each within 5 sd of its expectation.
        let n = 200_000u32;
        let mut bins = [0u32; 64];
        for d in 0..n {
            let u = uniform(42, d);
            assert!((0.0..1.0).contains(&u));
            bins[(u * 64.0) as usize] += 1;
        }
        let (e, sd) = (n as f64 / 64.0, (n as f64 / 64.0 * (63.0 / 64.0)).sqrt());
        assert!(bins.iter().all(|&b| (b as f64 - e).abs() < 5.0 * sd), "{bins:?}");
        // Neighbouring counters and seeds (high word too) give unrelated draws.
        assert_ne!(uniform(42, 0), uniform(42, 1));
        assert_ne!(uniform(42, 0), uniform(43, 0));
        assert_ne!(uniform(1 << 40, 0), uniform(2 << 40, 0));
    }

    #[test]
    fn sampler_draws_are_the_rule_with_its_counter() {
        let logits: Vec<f32> = (0..300).map(|i| ((i * 37 % 101) as f32) * 0.05).collect();
        let config = SamplerConfig { temperature: 1.3, top_k: 20, top_p: 0.9, min_p: 0.02, seed: 99, ..Default::default() };
        let rule = SampleRule::new(&config);
        let mut s = Sampler::new(config);
        assert_eq!(s.device_rule(), Some(rule));
        let drawn: Vec<u32> = (0..50).map(|_| s.sample(&logits)).collect();
        assert_eq!(s.next_draw(), 50);
        let want: Vec<u32> = (0..50).map(|d| rule.pick(&logits, d)).collect();
        assert_eq!(drawn, want);
        assert!(drawn.iter().collect::<std::collections::BTreeSet<_>>().len() > 3, "{drawn:?}");
        // A device's draws advance the counter as the sampler's own.
        s.accept_drawn(7);
        assert_eq!(s.next_draw(), 51);
    }

    #[test]
    fn only_penalty_free_small_top_k_sampling_goes_to_a_device() {
        let rule = |c: SamplerConfig| Sampler::new(c).device_rule();
        assert!(rule(SamplerConfig::default()).is_some());
        assert!(rule(SamplerConfig { top_k: 64, ..Default::default() }).is_some());
        assert!(rule(SamplerConfig { top_k: 65, ..Default::default() }).is_none());
        assert!(rule(SamplerConfig { top_k: 0, ..Default::default() }).is_none());
        assert!(rule(SamplerConfig { temperature: 0.0, ..Default::default() }).is_none());
        assert!(rule(SamplerConfig { repeat_penalty: 1.1, ..Default::default() }).is_none());
        assert!(rule(SamplerConfig { presence_penalty: 0.5, ..Default::default() }).is_none());
        // A penalty over no recent tokens is no penalty.
        assert!(rule(SamplerConfig { repeat_penalty: 1.1, repeat_last_n: 0, ..Default::default() }).is_some());
    }

    #[test]
    fn rule_edges_ties_and_broken_logits() {
        let rule = |top_k, top_p, min_p| SampleRule::new(&SamplerConfig { temperature: 1.0, top_k, top_p, min_p, seed: 5, ..Default::default() });
        // Four tokens tied for the best: top-p 0.5 keeps exactly the two lowest ids (1 + 1 of
        // 4 equal weights), whatever the draw.
        let mut l = vec![-40.0f32; 50];
        for i in [44, 9, 30, 8] {
            l[i] = 2.0;
        }
        let picks: std::collections::BTreeSet<u32> = (0..200).map(|d| rule(10, 0.5, 0.0).pick(&l, d)).collect();
        assert_eq!(picks.into_iter().collect::<Vec<_>>(), vec![8, 9]);
        // top-p below the best token's mass and top-k 1: the argmax (the lowest tied id).
        assert!((0..50).all(|d| rule(10, 1e-6, 0.0).pick(&l, d) == 8 && rule(1, 1.0, 0.0).pick(&l, d) == 8));
        // -0 ties +0 (ids decide), as in the GPU's keys.
        let z = [-0.0f32, 0.0, -5.0];
        assert_eq!(rule(1, 1.0, 0.0).pick(&z, 0), 0);
        // NaN and -inf are never drawn; nothing finite at all gives token 0, no panic.
        let bad = [f32::NAN, -1.0, f32::NEG_INFINITY, -1.0];
        assert!((0..100).all(|d| matches!(rule(0, 1.0, 0.0).pick(&bad, d), 1 | 3)));
        assert_eq!(rule(0, 1.0, 0.0).pick(&[f32::NAN, f32::NEG_INFINITY], 0), 0);
        assert_eq!(rule(0, 1.0, 0.0).pick(&[], 0), 0);
    }
}
