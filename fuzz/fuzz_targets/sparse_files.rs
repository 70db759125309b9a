//! Fuzzes the readers of ember's and PowerInfer's sparsity files from a GGUF image: activation
//! profiles, predictor samples, predictors (stand-alone or inside a PowerInfer model) and
//! PowerInfer split (placement) files. Any input must load or return an error.
#![no_main]

use ember::gguf::GgufFile;
use ember::sparse::predictor::Predictors;
use ember::sparse::profile::{ActivationProfile, SampleSet};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::from_bytes(data.to_vec()) else { return };
    if let Ok(p) = ActivationProfile::from_gguf(&f) {
        let _ = p.summary();
        let _ = p.top_k_coverage(p.n_layer() * p.n_ff() / 2);
    }
    if let Ok(p) = Predictors::from_gguf(Arc::new(GgufFile::from_bytes(data.to_vec()).unwrap())) {
        for l in p.layers.iter().take(2) {
            let mut logits = vec![0.0; l.n_ff()];
            l.predict(&vec![0.5; l.n_embd()], &mut logits);
        }
    }
    // Shapes a real split file would be read with: small, and from the input itself.
    let n_layer = 1 + data.first().copied().unwrap_or(0) as usize % 8;
    let n_ff = 32 * (1 + data.get(1).copied().unwrap_or(0) as usize % 64);
    let _ = ember::sparse::powerinfer::read_split(&f, n_layer, n_ff);
    if let Ok(s) = SampleSet::from_gguf(f) {
        for l in 0..s.n_layer.min(2) {
            let _ = s.layer(l);
        }
    }
});
