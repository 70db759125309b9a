//! `ember profile`: run text through the model on the CPU and count, per layer and neuron, the
//! tokens on which each FFN neuron fires; optionally keep token samples for predictor training.

use super::{PrecisionArg, Result};
use crate::engine::{Forward, Logits, Session};
use crate::sparse::profile::{Profiler, SampleType};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
#[command(after_long_help = "\
What it measures:
  A neuron i of the FFN `down(act(gate·x) * (up·x))` fires on a token when act(gate_i·x) != 0;
  with ReLU most neurons are exactly zero per token. The profile counts firings per neuron over
  the text; the hybrid GPU/CPU path places the most-firing (hot) neurons on the GPU from it
  (--act-profile), across all layers at once (global top-K). The samples (the
  residual stream entering each FFN block, plus which neurons fired) train predictors with
  `ember train-predictor`.

Examples:
  ember profile -m relu.gguf -f eval.txt -o models/relu.profile.gguf
  ember profile -m relu.gguf -f a.txt -f b.txt --samples 4096 --samples-out models/relu.samples.gguf
  ember train-predictor -m relu.gguf --samples models/relu.samples.gguf -o models/relu.predictors.gguf

The text is cut into windows of --ctx-size tokens, each run from an empty cache (like
`ember perplexity`); every token of every window is counted.")]
pub struct ProfileArgs {
    /// GGUF model file [default: models/SmolLM2-135M-Instruct.Q4_1.gguf]
    #[arg(short = 'm', long = "model", env = "EMBER_MODEL")]
    pub model: Option<PathBuf>,
    /// Text file(s) to run through the model (repeat -f for several)
    #[arg(short = 'f', long = "file", required = true)]
    pub files: Vec<PathBuf>,
    /// Window size in tokens
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512)]
    pub ctx_size: usize,
    /// Profile at most this many windows per file (0 = all)
    #[arg(long, default_value_t = 0)]
    pub chunks: usize,
    /// Profile only windows A..B of each file (0-based, B excluded; A.. or ..B), e.g. the first
    /// half of a text whose second half then measures predictors (`ember perplexity --windows`)
    #[arg(long, value_parser = super::parse_windows)]
    pub windows: Option<std::ops::Range<usize>>,
    /// Parse special tokens written in the text (e.g. ChatML's <|im_start|>) as tokens
    #[arg(long)]
    pub parse_special: bool,
    /// Profile output [default: MODEL.profile.gguf in the user cache, where --vram-budget and
    /// `ember plan` look for it]
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
    /// Keep a uniform sample of this many tokens per layer for predictor training
    /// [default: 4096 when --samples-out is given]
    #[arg(long)]
    pub samples: Option<usize>,
    /// Samples output [default: beside the profile, *.samples.gguf, when --samples is given]
    #[arg(long = "samples-out")]
    pub samples_out: Option<PathBuf>,
    /// How sampled residuals are stored
    #[arg(long = "samples-type", value_enum, default_value = "f16")]
    pub samples_type: SampleTypeArg,
    /// Seed of the token sampling (the same seed keeps the same tokens)
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// CPU threads [default: all cores]
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Arithmetic of quantised matrix products
    #[arg(long, value_enum, default_value = "llama")]
    pub precision: PrecisionArg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SampleTypeArg {
    F16,
    F32,
}

/// The model path (the default model, fetched when missing, as every command does) and a
/// pool of `threads` (all cores by default). Profiling and training always run on the CPU.
pub(super) fn model_and_pool(model: &Option<PathBuf>, threads: Option<usize>) -> Result<(PathBuf, rayon::ThreadPool)> {
    let path = super::resolve_model(model.as_deref())?;
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if n == 0 || n > 1024 {
        return Err(format!("--threads {n}: use 1 to 1024").into());
    }
    let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build().map_err(|e| e.to_string())?;
    Ok((path, pool))
}

/// `dir/name.gguf` -> `dir/name<suffix>` (`crate::files::beside`).
pub(super) fn beside(path: &Path, suffix: &str) -> PathBuf {
    crate::files::beside(path, suffix)
}

pub fn profile(a: ProfileArgs) -> Result<()> {
    if a.ctx_size < 2 {
        return Err("--ctx-size must be at least 2".into());
    }
    if a.samples == Some(0) {
        return Err("--samples 0 keeps nothing; leave --samples out to skip sampling".into());
    }
    let (path, pool) = model_and_pool(&a.model, a.threads)?;
    let output = match &a.output {
        Some(o) => o.clone(),
        None => super::cache::derived_output(&path, ".profile.gguf")?,
    };
    let samples_out = match (&a.samples_out, a.samples) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(_)) => Some(beside(&output, ".samples.gguf")),
        (None, None) => None,
    };
    // Fail now, not after minutes of profiling, when an output cannot be written or would
    // overwrite an input.
    if samples_out.as_ref().is_some_and(|s| *s == output || crate::files::same_file(s, &output)) {
        return Err(format!("-o and --samples-out both name {}; give them different paths", output.display()).into());
    }
    for p in std::iter::once(&output).chain(samples_out.as_ref()) {
        crate::files::check_output(p, std::iter::once(path.as_path()).chain(a.files.iter().map(PathBuf::as_path)))?;
        check_writable(p)?;
    }
    let texts: Vec<(PathBuf, String)> =
        a.files.iter().map(|f| std::fs::read_to_string(f).map(|t| (f.clone(), t)).map_err(|e| format!("{}: {e}", f.display()))).collect::<std::result::Result<_, _>>()?;

    pool.install(|| -> Result<()> {
        let (model, tokenizer) = super::load(&path)?;
        let hp = model.hp.clone();
        super::check_ctx("--ctx-size", a.ctx_size, &hp)?;
        if !hp.activation.gate_is_relu() {
            eprintln!("ember: warning: the model's FFN activation is {}; almost every neuron is nonzero on every token, so the counts say little (sparsity comes from ReLU or dReLU)", hp.activation.name());
        }
        let mut profiler = Profiler::for_model(&model);
        if let Some(out) = &samples_out {
            let ty = match a.samples_type {
                SampleTypeArg::F16 => SampleType::F16,
                SampleTypeArg::F32 => SampleType::F32,
            };
            let n = a.samples.unwrap_or(4096);
            profiler = profiler.with_samples(hp.n_embd, n, ty, a.seed);
            eprintln!("ember: keeping {n} sampled tokens per layer for {}", out.display());
        }
        profiler.profile.source = a.files.iter().map(|f| f.file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned())).collect::<Vec<_>>().join(", ");
        // The windows too: a simulation places by one profile and draws from another, and
        // says from which text each came.
        let end = |e: usize| if e == usize::MAX { String::new() } else { e.to_string() };
        profiler.profile.source += &match &a.windows {
            Some(w) => format!(", windows {}..{} of {} tokens", w.start, end(w.end), a.ctx_size),
            None => format!(", all windows of {} tokens", a.ctx_size),
        };
        let shared = profiler.shared();

        // All windows of all files, in order.
        let mut windows: Vec<Vec<u32>> = Vec::new();
        for (file, text) in &texts {
            let tokens = tokenizer.encode(text, true, a.parse_special)?;
            let range = a.windows.clone().unwrap_or(0..usize::MAX);
            let first = range.start;
            let mut w: Vec<Vec<u32>> = tokens.chunks(a.ctx_size).filter(|c| c.len() >= 2).map(<[u32]>::to_vec).take(range.end).skip(first).collect();
            if a.chunks > 0 {
                w.truncate(a.chunks);
            }
            eprintln!("ember: {}: {} tokens, {} windows of up to {} (from window {first})", file.display(), tokens.len(), w.len(), a.ctx_size);
            windows.extend(w);
        }
        let total: usize = windows.iter().map(Vec::len).sum();
        if total == 0 {
            return Err("the text has no windows of at least 2 tokens".into());
        }

        let mut session = Session::new(model.clone(), a.ctx_size);
        session.precision = a.precision.into();
        session.observer = Some(Box::new(shared.clone()));
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(indicatif::ProgressStyle::with_template("ember: profiling {bar:30} {pos}/{len} tokens, {per_sec}, eta {eta}").unwrap());
        let start = std::time::Instant::now();
        for w in &windows {
            session.reset();
            // Every row of the last layer is needed: `Logits::Last` would skip its FFN for all
            // but the last token.
            session.forward(w, Logits::All)?;
            bar.inc(w.len() as u64);
        }
        bar.finish_and_clear();
        let secs = start.elapsed().as_secs_f64();
        session.observer = None;
        let p = shared.lock().map_err(|_| "profiler lock poisoned")?;
        eprintln!("ember: profiled {total} tokens in {secs:.1} s ({:.0} tokens/s)", total as f64 / secs);

        print_summary(&p.profile);
        let counts = crate::sparse::accounting::ParamCounts::of(&model.file, hp.n_layer, hp.n_ff);
        println!("activated (firing neurons as TurboSparse counts them: gate row, up row, down column): {}", counts.activated_by(&p.profile).summary());
        p.profile.save(&output).map_err(|e| format!("{}: {e} (choose another place with -o)", output.display()))?;
        eprintln!("ember: wrote {}", output.display());
        if let (Some(out), Some(s)) = (&samples_out, &p.samples) {
            s.save(out, &p.profile.model_name).map_err(|e| format!("{}: {e}", out.display()))?;
            let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
            eprintln!("ember: wrote {} ({:.1} MiB)", out.display(), bytes as f64 / (1 << 20) as f64);
        }
        Ok(())
    })
}

fn check_writable(p: &Path) -> Result<()> {
    let existed = p.exists();
    std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(p).map_err(|e| format!("{}: {e} (choose another place with -o or --samples-out)", p.display()))?;
    if !existed {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// The per-layer table and the global hot-neuron coverage.
pub fn print_summary(p: &crate::sparse::profile::ActivationProfile) {
    let n_ff = p.n_ff();
    let pct = |n: usize| 100.0 * n as f64 / n_ff.max(1) as f64;
    println!("model {}, {} tokens ({}), {} layers x {} neurons", p.model_name, p.n_tokens(), p.source, p.n_layer(), n_ff);
    println!("layer  sparsity  active/token  neurons for 50% / 80% / 95% of firings   never  median rate");
    let s = p.summary();
    for l in &s {
        println!(
            "{:>5}  {:>8.3}  {:>12.1}  {:>5} ({:>4.1}%) / {:>5} ({:>4.1}%) / {:>5} ({:>4.1}%)  {:>5}  {:>11.3}",
            l.layer,
            l.sparsity,
            l.active_per_token,
            l.cover50,
            pct(l.cover50),
            l.cover80,
            pct(l.cover80),
            l.cover95,
            pct(l.cover95),
            l.never,
            l.median_rate
        );
    }
    if s.is_empty() {
        return;
    }
    let mean = s.iter().map(|l| l.sparsity).sum::<f64>() / s.len() as f64;
    let (lo, hi) = s.iter().fold((f64::MAX, f64::MIN), |(a, b), l| (a.min(l.sparsity), b.max(l.sparsity)));
    let mean80 = s.iter().map(|l| l.cover80 as f64).sum::<f64>() / s.len() as f64;
    println!("mean sparsity {mean:.3} (layers {lo:.3} to {hi:.3}); mean neurons for 80% of firings {mean80:.0} of {n_ff}");
    let all = p.n_layer() * n_ff;
    let line: Vec<String> = [0.1, 0.25, 0.5, 0.75].iter().map(|f| format!("{:.0}% -> {:.1}%", f * 100.0, 100.0 * p.top_k_coverage((all as f64 * f) as usize))).collect();
    println!("global top-K (hottest share of all {all} neurons -> share of all firings): {}", line.join(", "));
}
