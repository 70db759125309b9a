//! Token sampling: greedy, or llama.cpp's default chain (repetition penalty -> top-k -> top-p
//! -> min-p -> temperature -> draw) with a seeded generator, so a seed reproduces a run.

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

/// xoshiro256** seeded through splitmix64: small, fast and the same on every platform.
#[derive(Clone, Debug)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    pub config: SamplerConfig,
    rng: Rng,
    recent: Vec<u32>,
}

impl Sampler {
    pub fn new(config: SamplerConfig) -> Self {
        let rng = Rng::new(config.seed);
        Sampler { config, rng, recent: Vec::new() }
    }

    /// Whether every choice is the argmax of the raw logits (greedy, no penalty).
    pub fn is_greedy(&self) -> bool {
        let c = &self.config;
        c.temperature <= 0.0 && ((c.repeat_penalty == 1.0 && c.presence_penalty == 0.0 && c.frequency_penalty == 0.0) || c.repeat_last_n == 0)
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
        // Sort by logit, ties by id, so the order (and so the draw) is reproducible.
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if c.top_k > 0 && c.top_k < cand.len() {
            cand.select_nth_unstable_by(c.top_k - 1, by_logit);
            cand.truncate(c.top_k);
        }
        cand.sort_by(by_logit);
        if c.top_p < 1.0 {
            let p = softmax(&cand);
            let mut cum = 0.0;
            let keep = p.iter().position(|&pi| {
                cum += pi;
                cum >= c.top_p as f64
            });
            cand.truncate(keep.map_or(cand.len(), |i| i + 1));
        }
        if c.min_p > 0.0 {
            let floor = cand[0].1 + c.min_p.ln();
            let keep = cand.iter().take_while(|x| x.1 >= floor).count().max(1);
            cand.truncate(keep);
        }
        for x in cand.iter_mut() {
            x.1 /= c.temperature;
        }
        let p = softmax(&cand);
        let r = self.rng.uniform();
        let mut cum = 0.0;
        for (i, &pi) in p.iter().enumerate() {
            cum += pi;
            if r < cum {
                return cand[i].0;
            }
        }
        cand[cand.len() - 1].0
    }
}

/// Probabilities of candidates sorted by descending logit.
fn softmax(cand: &[(u32, f32)]) -> Vec<f64> {
    let max = cand[0].1 as f64;
    let e: Vec<f64> = cand.iter().map(|x| (x.1 as f64 - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
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
}
