//! Where one decode token's time goes on the CPU, op class by op class, on a real model and
//! real FFN inputs (residual streams from a samples file made by `ember profile`).
//!
//! Each class is timed on its own over the model's 30-odd layers, for many tokens, with the
//! pool's thread count: attention projections (q, k, v, o), the dense FFN, the gate alone, the
//! sparse FFN modes (`--ffn relu`, and `--ffn predict` when predictors are given), the output
//! matrix. Attention itself (the KV cache) is left out: at short contexts it is small.
//!
//!     cargo run --release --example decode_breakdown -- MODEL SAMPLES [PREDICTORS] [THREADS]

use ember::cpu::{matmul, ops, Activations, Precision};
use ember::engine::{FfnMode, SparseFfn};
use ember::model::Model;
use ember::sparse::predictor::Predictors;
use ember::sparse::profile::SampleSet;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = Arc::new(Model::load(&args[0]).expect("model"));
    let samples = SampleSet::open(&args[1]).expect("samples");
    let predictors = args.get(2).filter(|p| !p.is_empty()).map(|p| Arc::new(Predictors::load(p).expect("predictors")));
    let threads: usize = args.get(3).map_or(2, |t| t.parse().expect("threads"));
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let hp = model.hp.clone();
    let (e, n_layer) = (hp.n_embd, hp.n_layer);
    // Per layer, the first `n_tok` sampled residuals and their FFN-normalised form.
    let n_tok = 48.min(samples.n);
    let mut resid = Vec::new();
    let mut xn = Vec::new();
    for l in 0..n_layer {
        let s = samples.layer(l).expect("layer");
        let r = s.resid[..n_tok * e].to_vec();
        let mut x = vec![0.0; r.len()];
        ops::rms_norm(&r, &model.layers[l].ffn_norm, hp.rms_eps, &mut x);
        resid.push(r);
        xn.push(x);
    }
    let relu_unbundled = Arc::new(SparseFfn::new(&model, FfnMode::Relu, None, Vec::new(), Precision::Llama, false).unwrap());
    let relu = Arc::new(SparseFfn::new(&model, FfnMode::Relu, None, Vec::new(), Precision::Llama, false).unwrap().with_bundles(&model));
    let predict = predictors.map(|p| Arc::new(SparseFfn::new(&model, FfnMode::Predict, Some(p), Vec::new(), Precision::Llama, false).unwrap().with_bundles(&model)));

    // Milliseconds per token of `op(token, layer)` run over every layer, best of 3 passes.
    // BREAKDOWN_REPEAT=N repeats each timing N times (long runs for `perf record`).
    let passes: usize = std::env::var("BREAKDOWN_REPEAT").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    // BREAKDOWN_ONLY=relu times only that class (the others report 0), for `perf record`.
    let only = std::env::var("BREAKDOWN_ONLY").ok();
    let time = |name: &str, op: &mut dyn FnMut(usize, usize)| -> f64 {
        if only.as_deref().is_some_and(|o| o != name) {
            return 0.0;
        }
        let mut best = f64::INFINITY;
        for _ in 0..passes {
            let t0 = Instant::now();
            for t in 0..n_tok {
                for l in 0..n_layer {
                    op(t, l);
                }
            }
            best = best.min(t0.elapsed().as_secs_f64() * 1e3 / n_tok as f64);
        }
        best
    };
    pool.install(|| {
        let row = |v: &Vec<f32>, t: usize| v[t * e..(t + 1) * e].to_vec();
        let (qd, kvd, ff) = (hp.q_dim(), hp.kv_dim(), hp.n_ff);
        let (mut q, mut k, mut v, mut o) = (vec![0.0; qd], vec![0.0; kvd], vec![0.0; kvd], vec![0.0; e]);
        let attn = time("attn", &mut |t, l| {
            let x = row(&xn[l], t);
            let a = Activations::new(&x, 1);
            let w = &model.layers[l];
            matmul(&w.wq, &a, &mut q);
            matmul(&w.wk, &a, &mut k);
            matmul(&w.wv, &a, &mut v);
            matmul(&w.wo, &Activations::new(&q, 1), &mut o);
            black_box(&o);
        });
        let (mut g, mut u, mut out) = (vec![0.0; ff], vec![0.0; ff], vec![0.0; e]);
        let dense = time("dense", &mut |t, l| {
            let x = row(&xn[l], t);
            let a = Activations::new(&x, 1);
            let w = &model.layers[l];
            matmul(&w.ffn_gate, &a, &mut g);
            matmul(&w.ffn_up, &a, &mut u);
            ops::gated_activation(hp.activation, &mut g, &u);
            matmul(&w.ffn_down, &Activations::new(&g, 1), &mut out);
            black_box(&out);
        });
        let gate = time("gate", &mut |t, l| {
            let x = row(&xn[l], t);
            matmul(&model.layers[l].ffn_gate, &Activations::new(&x, 1), &mut g);
            black_box(&g);
        });
        let mut scratch = Default::default();
        let mut active = 0usize;
        let relu_ms = time("relu", &mut |t, l| {
            active += relu.token(&model, l, &row(&resid[l], t), &row(&xn[l], t), None, Precision::Llama, &mut scratch, &mut out);
        });
        let relu_matrices = time("relu-matrices", &mut |t, l| {
            relu_unbundled.token(&model, l, &row(&resid[l], t), &row(&xn[l], t), None, Precision::Llama, &mut scratch, &mut out);
        });
        let mut pred_active = 0usize;
        let predict_ms = predict.as_ref().map(|p| {
            time("predict", &mut |t, l| {
                pred_active += p.token(&model, l, &row(&resid[l], t), &row(&xn[l], t), None, Precision::Llama, &mut scratch, &mut out);
            })
        });
        let mut logits = vec![0.0; hp.n_vocab];
        let output = time("output", &mut |t, l| {
            if l == 0 {
                let x = row(&xn[n_layer - 1], t);
                matmul(&model.output, &Activations::new(&x, 1), &mut logits);
                black_box(&logits);
            }
        });
        let density = active as f64 / (passes * n_tok * n_layer * ff) as f64;
        println!("{threads} threads, {n_tok} tokens x {n_layer} layers, ms per token:");
        println!("  attention projections  {attn:.3}");
        println!("  output matrix          {output:.3}");
        println!("  FFN dense              {dense:.3}");
        println!("  FFN gate alone         {gate:.3}");
        println!("  FFN relu               {relu_ms:.3}   (active {:.1}%)", 100.0 * density);
        println!("  FFN relu, no bundles   {relu_matrices:.3}");
        if let Some(p) = predict_ms {
            println!("  FFN predict            {p:.3}   (predicted {:.1}%)", 100.0 * pred_active as f64 / (passes * n_tok * n_layer * ff) as f64);
        }
        let common = attn + output;
        println!("  dense token (no attention core) {:.3}, relu {:.3}: ratio {:.2}", common + dense, common + relu_ms, (common + dense) / (common + relu_ms));
        if let Some(p) = predict_ms {
            println!("  predict {:.3}: ratio {:.2}", common + p, (common + dense) / (common + p));
        }
    });
}
