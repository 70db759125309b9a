//! CATS-style thresholds for models without ReLU: per layer, the |act(gate)| below which a
//! neuron is treated as silent, chosen so that a target fraction of a calibration text's
//! activations fall below it.

use super::FfnObserver;
use crate::model::Activation;

/// Collects |act(gate)| of every neuron of every token, per layer.
pub struct ThresholdCalibrator {
    act: Activation,
    magnitudes: Vec<Vec<f32>>,
}

impl ThresholdCalibrator {
    pub fn new(act: Activation, n_layer: usize) -> Self {
        ThresholdCalibrator { act, magnitudes: vec![Vec::new(); n_layer] }
    }

    /// Per layer, the smallest magnitude such that `sparsity` of the observed activations are
    /// at or below it (0 for an empty layer).
    pub fn thresholds(&self, sparsity: f64) -> Vec<f32> {
        self.magnitudes
            .iter()
            .map(|m| {
                if m.is_empty() {
                    return 0.0;
                }
                let mut v = m.clone();
                let k = ((sparsity.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
                let (_, kth, _) = v.select_nth_unstable_by(k, |a, b| a.total_cmp(b));
                *kth
            })
            .collect()
    }
}

impl FfnObserver for ThresholdCalibrator {
    fn observe(&mut self, layer: usize, _resid: &[f32], gate_pre: &[f32], _up_pre: &[f32]) {
        let act = self.act;
        self.magnitudes[layer].extend(gate_pre.iter().map(|&g| crate::cpu::ops::activate(act, g).abs()));
    }
}

/// Lets the caller keep the calibrator after handing it to a session as a boxed observer.
impl FfnObserver for std::sync::Arc<std::sync::Mutex<ThresholdCalibrator>> {
    fn observe(&mut self, layer: usize, resid: &[f32], gate_pre: &[f32], up_pre: &[f32]) {
        self.lock().unwrap().observe(layer, resid, gate_pre, up_pre)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_per_layer() {
        let mut c = ThresholdCalibrator::new(Activation::Relu, 2);
        let gate: Vec<f32> = (1..=100).map(|i| i as f32).collect();
        c.observe(0, &[], &gate, &gate);
        c.observe(1, &[], &gate.iter().map(|g| -g).collect::<Vec<_>>(), &gate);
        let t = c.thresholds(0.3);
        assert_eq!(t[0], 30.0);
        // ReLU of negative gates is zero everywhere.
        assert_eq!(t[1], 0.0);
    }
}
