//! Simulated activity, for speed tests of models too large to download: random weights do not
//! fire like a trained ReLU model, so each token's active neurons are drawn from per-neuron
//! firing rates profiled on a real one, stretched to the synthetic shape. Every output made
//! this way must say "simulated activity".

use super::profile::{ActivationProfile, SplitMix};

/// Per layer and neuron firing probabilities, and the random stream that draws from them.
#[derive(Clone, Debug)]
pub struct SimulatedActivity {
    rates: Vec<Vec<f32>>,
    /// `rate * 2^32`, saturated: a neuron fires when a uniform u32 falls below it.
    thresholds: Vec<Vec<u32>>,
    rng: SplitMix,
}

fn thresholds(rates: &[Vec<f32>]) -> Vec<Vec<u32>> {
    rates.iter().map(|r| r.iter().map(|&p| (p.clamp(0.0, 1.0) as f64 * 4294967296.0).min(u32::MAX as f64) as u32).collect()).collect()
}

impl SimulatedActivity {
    /// Rates of `profile` stretched to `n_layer` x `n_ff`: synthetic neuron j of layer l takes
    /// the rate of profiled neuron `j * n_ff0 / n_ff` of layer `l * n_layer0 / n_layer`.
    pub fn from_profile(profile: &ActivationProfile, n_layer: usize, n_ff: usize, seed: u64) -> Result<Self, String> {
        let (l0, f0) = (profile.n_layer(), profile.n_ff());
        if l0 == 0 || f0 == 0 || profile.n_tokens() == 0 {
            return Err("the activation profile is empty: profile a ReLU model over some text first (`ember profile`)".into());
        }
        let rates = (0..n_layer)
            .map(|l| {
                let src = l * l0 / n_layer;
                let tokens = profile.layer_tokens[src].max(1) as f32;
                (0..n_ff).map(|j| profile.counts[src][j * f0 / n_ff] as f32 / tokens).collect()
            })
            .collect();
        let rates: Vec<Vec<f32>> = rates;
        Ok(SimulatedActivity { thresholds: thresholds(&rates), rates, rng: SplitMix(seed) })
    }

    /// Uniform rates (tests).
    pub fn uniform(n_layer: usize, n_ff: usize, rate: f32, seed: u64) -> Self {
        let rates = vec![vec![rate; n_ff]; n_layer];
        SimulatedActivity { thresholds: thresholds(&rates), rates, rng: SplitMix(seed) }
    }

    pub fn rates(&self, layer: usize) -> &[f32] {
        &self.rates[layer]
    }

    /// Mean fraction of neurons active per token, per layer.
    pub fn density(&self) -> Vec<f64> {
        self.rates.iter().map(|r| r.iter().map(|&v| v as f64).sum::<f64>() / r.len().max(1) as f64).collect()
    }

    /// Expected firing counts per million tokens: what placement ranks neurons by.
    pub fn counts(&self) -> Vec<Vec<u32>> {
        self.rates.iter().map(|r| r.iter().map(|&v| (v as f64 * 1e6).round() as u32).collect()).collect()
    }

    /// One token's active neurons of `layer`, ascending, each drawn with its rate. Two
    /// neurons per 64-bit draw, compared in integers: a 7B model draws 350k neurons a token,
    /// and this stands in for a predictor, so it must cost about as little.
    pub fn draw(&mut self, layer: usize, out: &mut Vec<u32>) {
        let thresholds = &self.thresholds[layer];
        // Branch-free: every index is written and the length advances past the drawn ones
        // (a branch per neuron mispredicts at these rates, which tripled the cost).
        out.clear();
        out.resize(thresholds.len() + 1, 0);
        let mut n = 0;
        for (pair, th) in thresholds.chunks(2).enumerate() {
            let r = self.rng.next_u64();
            let i = 2 * pair as u32;
            out[n] = i;
            n += ((r as u32) < th[0]) as usize;
            if th.len() > 1 {
                out[n] = i + 1;
                n += (((r >> 32) as u32) < th[1]) as usize;
            }
        }
        out.truncate(n);
    }
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
}
