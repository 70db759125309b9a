//! The hybrid's CPU half alone: one token's cold neurons per layer, as a charged predictor's
//! simulation hands them over (candidates get their gate row, the firing ones their up row and
//! `down_t` row), against a dense product of the same gate matrix on the same threads.
//!
//! Give it a PowerInfer-converted `ember synth --act relu` model with a few layers (cycling
//! through them keeps the weights out of the last-level cache, as a whole model does):
//!
//!     ember synth --act relu --n-layer 4 -o s4.gguf && ember convert -m s4.gguf --powerinfer --down-t-type q4_0 -o s4-pi.gguf
//!     cargo run --release --example cold_ffn_bench -- s4-pi.gguf THREADS [HOT% CANDIDATE% FIRING%]

use ember::cpu::matmul::{matmuls, Activations, Precision};
use ember::cpu::sparse::row_dots_serial;
use ember::cpu::team::{Aside, Team};
use ember::engine::cold::{ColdFfn, ColdRows};
use ember::engine::SparseFfn;
use ember::model::Model;
use ember::sparse::predictor::Predictor;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("model path");
    let threads: usize = args.get(2).map_or(2, |s| s.parse().unwrap());
    let pct = |i: usize, d: f64| args.get(i).map_or(d, |s| s.parse::<f64>().unwrap()) / 100.0;
    let (hot, cand, fire) = (pct(3, 9.0), pct(4, 77.4), pct(5, 24.2));
    let model = Model::load(std::path::Path::new(path)).unwrap();
    let ffn = SparseFfn::simulated(&model, Precision::Llama, false).unwrap();
    let (e, ff, nl) = (model.hp.n_embd, model.hp.n_ff, model.hp.n_layer);
    // Deterministic pseudo-random draws.
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    let cold: Vec<u32> = (0..ff as u32).filter(|_| rnd() >= hot).collect();
    let x: Vec<f32> = (0..e).map(|i| ((i * 7919) % 113) as f32 / 113.0 - 0.5).collect();
    let mut cold_ffn = ColdFfn::new(threads);
    let mut y = vec![0.0f32; e];
    let draws: Vec<(Vec<u32>, Vec<bool>)> = (0..nl * 4)
        .map(|_| {
            let mut c = Vec::new();
            let mut f = Vec::new();
            for i in 0..ff as u32 {
                if rnd() < cand {
                    c.push(i);
                    f.push(rnd() < fire / cand);
                }
            }
            (c, f)
        })
        .collect();
    let (grb, urb, drb) = (model.layers[0].ffn_gate.row_bytes(), model.layers[0].ffn_up.row_bytes(), ffn.down_t[0].row_bytes());
    let iters = 40;
    // Each layer's cold neurons as the hybrid holds them (their gate rows packed densely, used
    // past ColdRows::DENSE_SHARE of them listed), and gathered row by row as before.
    let packed: Vec<ColdRows> = (0..nl).map(|il| ColdRows::new(&model.layers[il].ffn_gate, cold.clone())).collect();
    let gathered: Vec<ColdRows> = (0..nl).map(|_| ColdRows::gathered(cold.clone())).collect();
    for (name, rows) in [("gathered gate rows", &gathered), ("dense cold gate past 40% listed", &packed)] {
        let mut bytes = 0u64;
        let t = Instant::now();
        for it in 0..iters {
            for il in 0..nl {
                let (c, f) = &draws[(it * nl + il) % draws.len()];
                cold_ffn.token_charged(&ffn, &model, il, &x, &x, &rows[il], c, f, None, Precision::Llama, &mut y, &Aside::none());
                // Bytes of cold candidates' gate rows and cold firing neurons' up and down rows.
                let mut j = 0;
                for (&n, &fi) in c.iter().zip(f) {
                    while j < cold.len() && cold[j] < n {
                        j += 1;
                    }
                    if j < cold.len() && cold[j] == n {
                        bytes += grb as u64 + if fi { (urb + drb) as u64 } else { 0 };
                    }
                }
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let per = secs / (iters * nl) as f64;
        println!(
            "cold FFN ({name}), {threads} threads, hot {:.0}% candidates {:.0}% firing {:.0}%: {:.3} ms per layer, {:.1} MB per layer of listed rows, {:.1} GB/s of them",
            hot * 100.0,
            cand * 100.0,
            fire * 100.0,
            per * 1e3,
            bytes as f64 / (iters * nl) as f64 / 1e6,
            bytes as f64 / secs / 1e9
        );
    }
    // A charged predictor (random rank-32 Q8_0 matrices, as the hybrid's simulation makes):
    // the cold FFN with it inside the dense gate product, and the predictor alone on
    // one thread, as `Predictor::predict` (fc2ᵀ AXPYs over every neuron) against row dots of
    // fc2 over the cold rows (session 13's first version).
    let rank = 32;
    let preds: Vec<Predictor> = (0..nl)
        .map(|il| {
            let v = |n: usize, k: usize| (0..n).map(|i| (((i * 7919 + k * 104729 + il) % 1013) as f32 / 1013.0 - 0.5) * 0.1).collect::<Vec<f32>>();
            Predictor::from_f32(&v(rank * e, 1), &v(ff * rank, 2), rank, e, ff, 0.0, ember::gguf::GgmlType::Q8_0).unwrap()
        })
        .collect();
    cold_ffn.predictor_secs = 0.0;
    let t = Instant::now();
    for it in 0..iters {
        for il in 0..nl {
            let (c, f) = &draws[(it * nl + il) % draws.len()];
            cold_ffn.token_charged(&ffn, &model, il, &x, &x, &packed[il], c, f, Some(&preds[il]), Precision::Llama, &mut y, &Aside::none());
        }
    }
    let n = (iters * nl) as f64;
    println!("cold FFN (dense cold gate) with the charged predictor (fc1 on the caller, fc2 in the gate product's parts), {threads} threads: {:.3} ms per layer, of it fc1 {:.3}", t.elapsed().as_secs_f64() / n * 1e3, cold_ffn.predictor_secs / n * 1e3);
    let acts_x = Activations::new(&x, 1).with_precision(Precision::Llama);
    let all: Vec<u32> = (0..rank as u32).collect();
    let (mut hidden, mut logits) = (vec![0.0f32; rank], vec![0.0f32; ff]);
    let t = Instant::now();
    for _ in 0..iters {
        for p in &preds {
            p.predict(&x, &mut logits);
        }
    }
    let predict_ms = t.elapsed().as_secs_f64() / n * 1e3;
    let t = Instant::now();
    for _ in 0..iters {
        for p in &preds {
            row_dots_serial(&p.fc1, &acts_x, &all, &mut hidden);
            hidden.iter_mut().for_each(|h| *h = h.max(0.0));
            row_dots_serial(&p.fc2, &Activations::new(&hidden, 1).with_precision(Precision::Llama), &cold, &mut logits[..cold.len()]);
        }
    }
    println!("predictor alone, one thread: Predictor::predict {predict_ms:.3} ms per layer, row dots over the {} cold rows {:.3}", cold.len(), t.elapsed().as_secs_f64() / n * 1e3);
    std::hint::black_box((&hidden, &logits));
    // Dense gate product over the whole matrix on a team of the same size.
    let mut team = Team::new(threads);
    let mut out = vec![0.0f32; ff];
    let acts = Activations::new(&x, 1).with_precision(Precision::Llama);
    for il in 0..nl {
        matmuls(&mut team, &acts, [(&model.layers[il].ffn_gate, &mut out[..])]);
    }
    let t = Instant::now();
    for _ in 0..iters {
        for il in 0..nl {
            matmuls(&mut team, &acts, [(&model.layers[il].ffn_gate, &mut out[..])]);
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let gb = (iters * nl * ff * grb) as f64;
    println!("dense gate product (packed), {threads} threads: {:.3} ms per layer, {:.1} GB/s", secs / (iters * nl) as f64 * 1e3, gb / secs / 1e9);
}
