//! What simulated activity costs the hybrid's recorder thread per token: a 7B's 32 layers x
//! 11008 neurons drawn with a predictor's errors (recall 0.99, precision 0.3) at a 24.2% mean
//! rate, with the marks the GPU reads. `cargo run --release --example simulate_bench`
use ember::sparse::simulate::{Drawn, PredictorSim, SimulatedActivity};

fn main() {
    // (layers, neurons) of a 7B; uniform rates stand in for the profile's.
    let (n_layer, n_ff, tokens) = (32, 11008, 20);
    let mut s = SimulatedActivity::uniform(n_layer, n_ff, 0.242, 1).with_predictor(&PredictorSim::default()).unwrap();
    let (mut drawn, mut marks) = (Drawn::default(), Vec::new());
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let mut candidates = 0;
        for _ in 0..tokens {
            for l in 0..n_layer {
                s.draw_predicted(l, &mut drawn, Some(&mut marks));
                candidates += drawn.candidates.len();
                std::hint::black_box(&marks);
            }
        }
        let per_token = t.elapsed().as_secs_f64() * 1e3 / tokens as f64;
        println!("{per_token:.3} ms a token, {:.0} candidates a layer", candidates as f64 / (tokens * n_layer) as f64);
    }
}
