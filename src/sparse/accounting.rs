//! Parameters activated per token, counted as TurboSparse counts them ("2.5 B of 7.2 B"): a
//! neuron that fires costs its gate row, its up row and its down column (and any per-neuron
//! bias); everything outside the FFN is always active: attention, norms, and the embedding
//! table and output matrix **whole**, as active-parameter counts of sparse models do (Mixtral's
//! "12.9 B active of 46.7 B", on which TurboSparse-Mixtral's count builds, includes both
//! tables in full; every logit reads the whole output matrix). A tied table is one tensor,
//! counted once. Predictors (`fc1`/`fc2`) and the transposed copy of down (`ffn_down_t`, where
//! the file also holds `ffn_down`) are not model parameters and are left out.

use super::profile::ActivationProfile;
use crate::gguf::GgufFile;

/// A model's parameters split as the count needs them.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamCounts {
    /// Parameters every token uses: attention, norms, biases, the embedding table and the
    /// output matrix.
    pub always: u64,
    /// Per layer: the FFN's parameters (gate, up and down, with their biases).
    pub ffn: Vec<u64>,
    /// Neurons per layer's FFN.
    pub n_ff: u64,
}

/// What one run or profile activated per token.
#[derive(Clone, Debug, PartialEq)]
pub struct ActivatedParams {
    /// Mean parameters activated per token.
    pub per_token: f64,
    /// All parameters of the model.
    pub total: u64,
    /// Of `per_token`, those active on every token.
    pub always: u64,
    /// Per layer: the mean fraction of its FFN's neurons active per token.
    pub ffn_fraction: Vec<f64>,
}

impl ParamCounts {
    /// The split of a model file's tensors (`n_layer` layers of `n_ff` neurons).
    pub fn of(file: &GgufFile, n_layer: usize, n_ff: usize) -> ParamCounts {
        Self::from_tensors(file.tensors().iter().map(|t| (t.name.as_str(), t.n_elements())), n_layer, n_ff)
    }

    /// The split of tensors given by name and element count.
    pub fn from_tensors<'a>(tensors: impl Iterator<Item = (&'a str, u64)> + Clone, n_layer: usize, n_ff: usize) -> ParamCounts {
        // A layer's down projection is `ffn_down`, or `ffn_down_t` in a file that has only that.
        let has_down = |layer: &str| tensors.clone().any(|(n, _)| n.strip_prefix(layer).is_some_and(|r| r.starts_with("ffn_down.")));
        let mut counts = ParamCounts { always: 0, ffn: vec![0; n_layer], n_ff: n_ff as u64 };
        for (name, n) in tensors.clone() {
            let layer = name.strip_prefix("blk.").and_then(|r| r.split_once('.')).and_then(|(i, rest)| Some((i.parse::<usize>().ok()?, rest)));
            let Some((il, rest)) = layer.filter(|&(il, _)| il < n_layer) else {
                counts.always += n;
                continue;
            };
            let part = rest.split('.').next().unwrap_or("");
            match part {
                "fc1" | "fc2" => {}
                "ffn_down_t" if has_down(&format!("blk.{il}.")) => {}
                "ffn_gate" | "ffn_up" | "ffn_down" | "ffn_down_t" => counts.ffn[il] += n,
                _ => counts.always += n,
            }
        }
        counts
    }

    /// All parameters counted.
    pub fn total(&self) -> u64 {
        self.always + self.ffn.iter().sum::<u64>()
    }

    /// Parameters activated per token with `active[l]` neurons of layer l active on average.
    ///
    /// # Panics
    /// If `active` does not have one value per layer.
    pub fn activated(&self, active: &[f64]) -> ActivatedParams {
        assert_eq!(active.len(), self.ffn.len(), "one active count per layer");
        let n_ff = self.n_ff.max(1) as f64;
        let ffn: f64 = self.ffn.iter().zip(active).map(|(&p, &a)| a * p as f64 / n_ff).sum();
        ActivatedParams { per_token: self.always as f64 + ffn, total: self.total(), always: self.always, ffn_fraction: active.iter().map(|&a| a / n_ff).collect() }
    }

    /// [`Self::activated`] with a profile's mean firing neurons per token.
    pub fn activated_by(&self, profile: &ActivationProfile) -> ActivatedParams {
        let active: Vec<f64> = profile.summary().iter().map(|s| s.active_per_token).collect();
        self.activated(&active)
    }
}

/// `1234567` as "1.23 M", `7.2e9` as "7.20 B".
pub fn human(n: f64) -> String {
    if n >= 1e9 {
        format!("{:.2} B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2} M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.2} K", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

impl ActivatedParams {
    /// One line: "52.30 M of 134.52 M parameters per token (38.9%; per layer 8-41% of the FFN,
    /// mean 12.3%; always active 40.10 M: attention, norms, the embedding and output tables whole, a tied one once)".
    pub fn summary(&self) -> String {
        let (lo, hi) = self.ffn_fraction.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &f| (lo.min(f), hi.max(f)));
        let mean = self.ffn_fraction.iter().sum::<f64>() / self.ffn_fraction.len().max(1) as f64;
        let lo = if lo.is_finite() { lo } else { 0.0 };
        format!(
            "{} of {} parameters per token ({:.1}%; per layer {:.0}-{:.0}% of the FFN, mean {:.1}%; always active {}: attention, norms, the embedding and output tables whole, a tied one once)",
            human(self.per_token),
            human(self.total as f64),
            100.0 * self.per_token / self.total.max(1) as f64,
            100.0 * lo,
            100.0 * hi,
            100.0 * mean,
            human(self.always as f64)
        )
    }
}
