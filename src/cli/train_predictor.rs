//! `ember train-predictor`: per-layer activation predictors from `ember profile`'s samples.

use super::Result;
use crate::gguf::GgmlType;
use crate::sparse::predictor::Predictors;
use crate::sparse::profile::SampleSet;
use crate::sparse::train::{self, Init, LayerReport, TrainOptions};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(after_long_help = "\
What it trains:
  Per layer, a predictor fc2 · relu(fc1 · x) (PowerInfer's format: blk.N.fc1 {n_embd, r},
  blk.N.fc2 {r, n_ff}) that guesses from the residual stream x entering the FFN block which
  neurons will fire, so the sparse FFN (--ffn predict) can skip the others without computing
  their gate. Training starts from the best rank-r copy of the layer's own gate (read from -m;
  exact for ReLU up to the rank), then runs Adam on the samples' firing masks.

How recall and rank are chosen:
  Hidden unit 0 follows the residual stream's common direction, so its fc2 column works as
  per-neuron biases. All biases move by one amount, set on a validation split (15% of the
  tokens), until --recall of the firing neurons are predicted; the stored threshold stays 0.
  More recall always costs more predicted-active neurons, so the rank kept per layer is the one
  whose predictor plus predicted-active neurons cost the fewest multiply-adds (FFN work: a
  predicted neuron costs its gate row; up and down rows only when the gate lets it through).
  The table reports a held-out test split (another 15%): recall, precision, predicted vs truly
  active neurons, and the FFN work relative to the dense FFN.

Examples:
  ember profile -m relu.gguf -f text.txt --samples 8192 --samples-out models/relu.samples.gguf
  ember train-predictor -m relu.gguf --samples models/relu.samples.gguf -o models/relu.predictors.gguf
  ember train-predictor -m relu.gguf --samples a.samples.gguf --samples b.samples.gguf --eval c.samples.gguf
  ember train-predictor -m relu.gguf --samples S.gguf --rank 128 --recall 0.95")]
pub struct TrainPredictorArgs {
    /// The model the samples came from (its gates start the training; shapes are checked)
    #[arg(short = 'm', long = "model", env = "EMBER_MODEL")]
    pub model: Option<PathBuf>,
    /// Samples file written by `ember profile --samples-out` (repeat to pool several texts)
    #[arg(long, required = true)]
    pub samples: Vec<PathBuf>,
    /// Share of truly active neurons that must be predicted active (held-out tokens)
    #[arg(long, default_value_t = 0.99)]
    pub recall: f64,
    /// Output [default: beside the samples, *.predictors.gguf]
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
    /// Ranks (hidden sizes) to try, ascending, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "32,64,96,128")]
    pub ranks: Vec<usize>,
    /// Also measure the trained predictors on every token of these samples (e.g. another text)
    #[arg(long = "eval")]
    pub eval: Vec<PathBuf>,
    /// Use this one rank for every layer instead of trying --ranks
    #[arg(long, conflicts_with = "ranks")]
    pub rank: Option<usize>,
    /// Passes over the training tokens per rank
    #[arg(long, default_value_t = 8)]
    pub epochs: usize,
    /// Adam's peak learning rate, relative to each hidden unit's starting size (cosine decay)
    #[arg(long, default_value_t = 2e-2)]
    pub lr: f32,
    /// Tokens per training step
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Weight of firing neurons in the loss (above 1 trades precision for recall)
    #[arg(long = "pos-weight", default_value_t = 6.0)]
    pub pos_weight: f32,
    /// Storage type of the predictor matrices
    #[arg(long = "type", value_enum, default_value = "q8_0")]
    pub ty: PredictorType,
    /// Start from the model's gates, or from random weights (-m then only checks shapes)
    #[arg(long, value_enum, default_value = "gate")]
    pub init: InitArg,
    /// Seed of the train/validation/test split, the shuffling and random starts
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// CPU threads (layers train in parallel) [default: all cores]
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PredictorType {
    F32,
    F16,
    #[value(name = "q8_0")]
    Q8_0,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum InitArg {
    Gate,
    Random,
}

pub fn train_predictor(a: TrainPredictorArgs) -> Result<()> {
    let output = a.output.clone().unwrap_or_else(|| {
        let first = &a.samples[0];
        let name = first.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let stem = name.strip_suffix(".gguf").unwrap_or(&name);
        let stem = stem.strip_suffix(".samples").unwrap_or(stem);
        first.with_file_name(format!("{stem}.predictors.gguf"))
    });
    // Every input, the model included, is checked before anything is read or trained.
    crate::files::check_output(&output, a.samples.iter().chain(&a.eval).chain(&a.model).map(PathBuf::as_path))?;
    let evals: Vec<(PathBuf, SampleSet)> = a.eval.iter().map(|p| SampleSet::open(p).map(|s| (p.clone(), s)).map_err(|e| format!("{}: {e}", p.display()))).collect::<std::result::Result<_, _>>()?;
    let samples: Vec<SampleSet> = a.samples.iter().map(|p| SampleSet::open(p).map_err(|e| format!("{}: {e}", p.display()))).collect::<std::result::Result<_, _>>()?;
    let s0 = &samples[0];
    for (p, s) in a.samples.iter().zip(&samples).chain(evals.iter().map(|(p, s)| (p, s))) {
        if (s.n_layer, s.n_embd, s.n_ff) != (s0.n_layer, s0.n_embd, s0.n_ff) {
            return Err(format!(
                "{}: samples of {} layers, {} -> {}, but {} has {} layers, {} -> {}; every --samples and --eval file must come from the same model",
                p.display(), s.n_layer, s.n_embd, s.n_ff, a.samples[0].display(), s0.n_layer, s0.n_embd, s0.n_ff
            ).into());
        }
    }
    let opts = TrainOptions {
        recall: a.recall,
        ranks: a.rank.map(|r| vec![r]).unwrap_or_else(|| a.ranks.clone()),
        epochs: a.epochs,
        lr: a.lr,
        batch: a.batch,
        pos_weight: a.pos_weight,
        seed: a.seed,
        ty: match a.ty {
            PredictorType::F32 => GgmlType::F32,
            PredictorType::F16 => GgmlType::F16,
            PredictorType::Q8_0 => GgmlType::Q8_0,
        },
        init: match a.init {
            InitArg::Gate => Init::Gate,
            InitArg::Random => Init::Random,
        },
        ..TrainOptions::default()
    };
    let (path, pool) = super::profile::model_and_pool(&a.model, a.threads)?;
    pool.install(|| -> Result<()> {
        let (model, _) = super::load(&path)?;
        let s0 = &samples[0];
        eprintln!(
            "ember: {} samples per layer of {} ({} layers, {} -> {}), drawn from {} tokens; ranks {:?}, recall target {}",
            samples.iter().map(|s| s.n).sum::<usize>(),
            if s0.model_name.is_empty() { "an unnamed model" } else { &s0.model_name },
            s0.n_layer,
            s0.n_embd,
            s0.n_ff,
            samples.iter().map(|s| s.n_tokens_seen).sum::<u64>(),
            opts.ranks,
            opts.recall
        );
        let bar = indicatif::ProgressBar::new(s0.n_layer as u64);
        bar.set_style(indicatif::ProgressStyle::with_template("ember: training {bar:30} {pos}/{len} layers, {elapsed} ({msg})").unwrap());
        bar.enable_steady_tick(std::time::Duration::from_millis(500));
        let start = std::time::Instant::now();
        let (preds, reports) = train::train(&samples, Some(&model), &opts, &|r: &LayerReport| {
            bar.set_message(format!("layer {} rank {} recall {:.4}", r.layer, r.rank, r.recall));
            bar.inc(1);
        })?;
        bar.finish_and_clear();
        let secs = start.elapsed().as_secs_f64();
        print_reports(&reports, &preds);
        eprintln!("ember: trained {} layers in {secs:.1} s", reports.len());
        for (p, set) in &evals {
            let m = train::evaluate(&preds, set)?;
            println!("on {} ({} tokens per layer, all of them):", p.display(), set.n);
            println!("layer  recall  precision  predicted  true active");
            for (l, m) in m.iter().enumerate() {
                println!("{l:>5}  {:>6.4}  {:>9.3}  {:>9.3}  {:>11.3}", m.recall, m.precision, m.predicted, m.truth);
            }
            let n = m.len().max(1) as f64;
            let mean = |f: &dyn Fn(&train::Measured) -> f64| m.iter().map(f).sum::<f64>() / n;
            println!(
                "mean recall {:.4} (min {:.4}), precision {:.3}; predicted active {:.3} vs true {:.3}",
                mean(&|m| m.recall),
                m.iter().map(|m| m.recall).fold(1.0, f64::min),
                mean(&|m| m.precision),
                mean(&|m| m.predicted),
                mean(&|m| m.truth)
            );
        }
        preds.save(&output).map_err(|e| format!("{}: {e} (choose another place with -o)", output.display()))?;
        eprintln!("ember: wrote {}", output.display());
        Ok(())
    })
}

/// The per-layer table (held-out test tokens) and the totals.
pub fn print_reports(reports: &[LayerReport], preds: &Predictors) {
    println!("layer  rank  threshold  recall  precision  predicted  true active  work vs dense  bytes    ranks tried (rank: val active)");
    for r in reports {
        let tried: Vec<String> = r.trials.iter().map(|t| format!("{}: {:.3}", t.rank, t.active)).collect();
        println!(
            "{:>5}  {:>4}  {:>9.3}  {:>6.4}  {:>9.3}  {:>9.3}  {:>11.3}  {:>13.3}  {:>7}  {}",
            r.layer,
            r.rank,
            r.threshold,
            r.recall,
            r.precision,
            r.predicted_active,
            r.true_active,
            r.work,
            r.bytes,
            tried.join(", ")
        );
    }
    if reports.is_empty() {
        return;
    }
    let n = reports.len() as f64;
    let mean = |f: &dyn Fn(&LayerReport) -> f64| reports.iter().map(f).sum::<f64>() / n;
    println!(
        "total: {} predictor bytes ({:.2} MiB); mean recall {:.4}, precision {:.3}; predicted active {:.3} vs true {:.3} (predicted sparsity {:.3}, true {:.3}); FFN work {:.3} of dense",
        preds.n_bytes(),
        preds.n_bytes() as f64 / (1 << 20) as f64,
        mean(&|r| r.recall),
        mean(&|r| r.precision),
        mean(&|r| r.predicted_active),
        mean(&|r| r.true_active),
        1.0 - mean(&|r| r.predicted_active),
        1.0 - mean(&|r| r.true_active),
        mean(&|r| r.work)
    );
}
