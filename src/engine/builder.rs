//! Opening a session: the backend (CPU, GPU, dense offload, hot/cold hybrid), placement,
//! predictors and thresholds chosen from [`SessionOptions`], values the caller passes in
//! (the library reads no environment and no command line). The CLI, and any other front-end,
//! open their sessions through [`open`], so they all run a model the same way.

use super::{AttentionPlace, FfnMode, Forward, ForwardError, GpuSession, GpuWeights, HybridPlan, HybridSession, OffloadSession, Session, SparseFfn};
use super::ffn::FfnError;
use super::HybridError;
use crate::cpu::Precision;
use crate::gguf::{GgufFile, Value};
use crate::sparse::placement::{counts_fingerprint, AttnSite, Placement};
use crate::sparse::powerinfer::{read_attention, read_split, set_attention, split_file};
use crate::sparse::profile::ActivationProfile;
use crate::sparse::simulate::{stretched_counts, PredictorSim, SimulatedActivity};
use crate::sparse::predictor::{Predictor, Predictors};
use crate::gguf::GgmlType;
use crate::sparse::threshold::ThresholdCalibrator;
use std::path::{Path, PathBuf};
use crate::gpu::{DeviceChoice, GpuContext, GpuError, GpuTuning};
use crate::model::Model;
use std::sync::Arc;
use thiserror::Error;

/// Why a session could not be opened. `Setup` messages name the option at fault and what to do.
#[derive(Debug, Error)]
pub enum BuildError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Hybrid(#[from] HybridError),
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error(transparent)]
    Ffn(#[from] FfnError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
}

impl From<String> for BuildError {
    fn from(s: String) -> Self {
        BuildError::Setup(s)
    }
}

impl From<&str> for BuildError {
    fn from(s: &str) -> Self {
        BuildError::Setup(s.to_string())
    }
}

type Result<T> = std::result::Result<T, BuildError>;

/// Where the computation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// A hardware GPU when there is one, else the CPU (software adapters only when asked for).
    Auto,
    Cpu,
    /// The GPU through wgpu, software adapters included.
    Gpu,
}

/// Where the files derived from a model (profile, predictors, placements) are looked for and
/// written: `<stem><suffix>`, e.g. `dir/model.profile.gguf` for the stem `dir/model`.
#[derive(Clone, Debug)]
pub struct DerivedFiles {
    stem: PathBuf,
}

impl DerivedFiles {
    /// Beside the model: `dir/name.gguf` -> `dir/name<suffix>`.
    pub fn beside(model: &Path) -> Self {
        DerivedFiles { stem: crate::files::beside(model, "") }
    }

    /// In a folder of its own: `dir/<name><suffix>`.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        DerivedFiles { stem: dir.join(name) }
    }

    /// The file with this suffix (".profile.gguf", ".predictors.gguf", ...).
    pub fn path(&self, suffix: &str) -> PathBuf {
        let mut s = self.stem.clone().into_os_string();
        s.push(suffix);
        PathBuf::from(s)
    }
}

/// How to open a session: everything `ember run`'s backend and sparse flags say, as values.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// The model's file, named in messages.
    pub model_path: PathBuf,
    /// Where the profile, predictors and placements made for this model live.
    pub derived: DerivedFiles,
    pub backend: BackendChoice,
    /// The GPU adapter [default: the best].
    pub device: Option<DeviceChoice>,
    /// Arithmetic of quantised products on the CPU.
    pub precision: Precision,
    /// The GPU kernels' choices (`--gpu-precision` and benchmark overrides).
    pub gpu_tuning: GpuTuning,
    /// How the CPU's products stream their weights (benchmark overrides).
    pub cpu_tuning: crate::cpu::matmul::CpuTuning,
    /// The hybrid decode's choices (benchmark overrides).
    pub hybrid_tuning: crate::engine::HybridTuning,
    pub ffn: FfnMode,
    /// Predictors for `FfnMode::Predict` [default: the derived `.predictors.gguf`, else the model's own].
    pub predictor: Option<PathBuf>,
    /// `FfnMode::Threshold`: the fraction of each layer's neurons to skip.
    pub ffn_sparsity: f64,
    /// `FfnMode::Threshold`: the text that calibrates the thresholds.
    pub calibration: Option<PathBuf>,
    /// GPU memory ember may use, in bytes (hybrid or dense offload).
    pub vram_budget: Option<u64>,
    /// Hybrid: prompt tokens per prefill batch (1: token by token); the batch's GPU buffers
    /// come out of the budget.
    pub prefill_batch: usize,
    /// Hybrid under a budget: prefill batches of at least this many tokens stream their cold
    /// neurons to the GPU (`StreamConfig`); 0: never (no streaming area).
    pub stream_min_batch: usize,
    /// The activation profile ranking neurons [default: the derived `.profile.gguf`].
    pub act_profile: Option<PathBuf>,
    /// Hot neurons from this placement file instead of placing them.
    pub placement: Option<PathBuf>,
    /// Dense layer offload: the first N layers on the GPU.
    pub n_gpu_layers: Option<usize>,
    /// BENCHMARK ONLY: draw active neurons from this profile's rates.
    pub simulate_activity: Option<PathBuf>,
    /// BENCHMARK ONLY: the simulated predictor.
    pub simulate_predictor: PredictorSim,
    /// Hybrid under a budget: the positions a decode token attends over on average, which
    /// values a layer's KV cache against hot neurons when choosing where its attention runs
    /// [default: half the context, as a chat or a server that fills it]. `run` and `bench`
    /// know their prompt and length and pass them.
    pub kv_depth: Option<usize>,
    /// Sequences the session holds, each with its own KV cache of the context, decoded
    /// together by `Forward::decode_batch` (`ember serve --parallel`). The CPU and the dense
    /// GPU session hold them; the hybrid and the dense offload hold one whatever this says.
    pub n_seqs: usize,
}

impl SessionOptions {
    /// A dense session on `backend` with every other choice at its default.
    pub fn new(model_path: &Path, backend: BackendChoice) -> Self {
        SessionOptions {
            model_path: model_path.to_path_buf(),
            derived: DerivedFiles::beside(model_path),
            backend,
            device: None,
            precision: Precision::Llama,
            gpu_tuning: GpuTuning::default(),
            cpu_tuning: Default::default(),
            hybrid_tuning: Default::default(),
            ffn: FfnMode::Dense,
            predictor: None,
            ffn_sparsity: 0.5,
            calibration: None,
            vram_budget: None,
            prefill_batch: 512,
            stream_min_batch: crate::engine::hybrid::StreamConfig::DEFAULT_MIN_ROWS,
            act_profile: None,
            placement: None,
            n_gpu_layers: None,
            simulate_activity: None,
            simulate_predictor: PredictorSim::default(),
            kv_depth: None,
            n_seqs: 1,
        }
    }
}

/// An opened session, the GPU context it runs on (None on the CPU), whose memory the caller
/// can check after running batches.
pub struct Opened {
    pub session: Box<dyn Forward>,
    pub gpu: Option<Arc<GpuContext>>,
}

/// Opens the session the options ask for, with the model loaded onto it; `log` receives the
/// lines a front-end shows the user (what runs where, what was reused or cached).
pub fn open(args: &SessionOptions, model: Arc<Model>, n_ctx: usize, log: &dyn Fn(&str)) -> Result<Opened> {
    // A model that only the dense single-sequence GPU session runs (Gemma), with options that
    // need another: --backend gpu fails, auto takes the CPU.
    let beyond_dense = args.n_seqs > 1 || args.n_gpu_layers.is_some() || args.vram_budget.is_some() || args.ffn != FfnMode::Dense || args.simulate_activity.is_some();
    let gpu_unsupported = model.hp.gpu_dense_only().filter(|_| beyond_dense);
    let choice = match (args.backend, args.device.clone()) {
        (BackendChoice::Cpu, _) => None,
        (BackendChoice::Gpu, _) if gpu_unsupported.is_some() => return Err(BuildError::Gpu(GpuError::Unsupported(gpu_unsupported.unwrap_or_default()))),
        (BackendChoice::Auto, _) if gpu_unsupported.is_some() => {
            log(&format!("running on the CPU ({})", gpu_unsupported.unwrap_or_default()));
            None
        }
        (BackendChoice::Gpu, choice) => Some(choice.unwrap_or(DeviceChoice::BestOrSoftware)),
        (BackendChoice::Auto, Some(choice)) => Some(choice),
        (BackendChoice::Auto, None) => match GpuContext::new(&DeviceChoice::Best) {
            // Probing opened a device; the real one is opened again (cheap) below.
            Ok(_) => Some(DeviceChoice::Best),
            Err(GpuError::OnlySoftware(name)) => {
                log(&format!("running on the CPU ({name} is a software adapter; --backend gpu would use it)"));
                None
            }
            Err(e) => {
                log(&format!("running on the CPU (no usable GPU: {e})"));
                None
            }
        },
    };
    match choice {
        None => Ok(Opened { session: open_cpu(args, model, n_ctx, log)?, gpu: None }),
        Some(choice) => match open_gpu(args, model.clone(), n_ctx, &choice, log) {
            Ok((s, ctx)) => Ok(Opened { session: s, gpu: Some(ctx) }),
            // The user left the backend to ember: a GPU that opened but then failed (an upload
            // out of memory, a kernel its driver rejects, a model shape the GPU kernels lack, a
            // lost device) leaves the work to the CPU, when the CPU can take these options.
            Err(e) if args.backend == BackendChoice::Auto && e.is_gpu_failure() => match open_cpu(args, model, n_ctx, log) {
                Ok(session) => {
                    log(&format!("warning: the GPU failed while loading the model ({}); running on the CPU instead", e.to_string().replace('\n', " ")));
                    Ok(Opened { session, gpu: None })
                }
                Err(_) => Err(e),
            },
            Err(e) => Err(e),
        },
    }
}

impl BuildError {
    /// Whether the GPU itself failed (as opposed to options that do not fit together).
    pub fn is_gpu_failure(&self) -> bool {
        matches!(self, BuildError::Gpu(_) | BuildError::Forward(ForwardError::Gpu(_)) | BuildError::Hybrid(HybridError::Gpu(_)))
    }
}

/// Checks the GPU memory of `ctx` against the budget after `when` (setup, the largest
/// batch) and logs it; an error when over.
pub fn check_gpu_memory(budget: Option<u64>, ctx: &GpuContext, when: &str, log: &dyn Fn(&str)) -> Result<()> {
    ctx.flush_uploads();
    let mem = ctx.memory();
    log(&format!("GPU memory after {when}: {mem}{}", budget.map_or(String::new(), |b| format!(", budget {:.1} MiB", mib(b)))));
    match budget {
        Some(b) if mem.peak() > b => Err(format!("GPU memory after {when}: {:.1} MiB, over --vram-budget {:.1} MiB: a bug in ember's accounting; please report it, and use a smaller --vram-budget meanwhile", mib(mem.peak()), mib(b)).into()),
        _ => Ok(()),
    }
}

fn open_cpu(args: &SessionOptions, model: Arc<Model>, n_ctx: usize, log: &dyn Fn(&str)) -> Result<Box<dyn Forward>> {
    if args.simulate_activity.is_some() || args.n_gpu_layers.is_some() || args.vram_budget.is_some() {
        return Err("--simulate-activity, --n-gpu-layers and --vram-budget need a GPU (--backend gpu)".into());
    }
    let mut s = Session::new(model.clone(), n_ctx).with_seqs(args.n_seqs);
    s.precision = args.precision;
    s.tuning = args.cpu_tuning;
    if let Some(f) = sparse_ffn(args, &model, true, log)? {
        s = s.with_ffn(f);
    } else {
        // Dense: every matrix is read only through its packed copy, so the file's pages under
        // it can go (the sparse FFN reads rows from the file).
        s.tuning.pack.release_source = true;
    }
    Ok(Box::new(s))
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn open_gpu(args: &SessionOptions, model: Arc<Model>, n_ctx: usize, choice: &DeviceChoice, log: &dyn Fn(&str)) -> Result<(Box<dyn Forward>, Arc<GpuContext>)> {
    let mode = args.ffn;
    let budget = args.vram_budget;
    // The tuning goes in before any weight is uploaded: --gpu-precision fixes the layout too.
    let tuning = args.gpu_tuning.clone();
    let mut ctx = Arc::new(GpuContext::new(choice)?.with_tuning(tuning.clone())?);
    let start = std::time::Instant::now();
    let gpu_name = format!("{} ({:?})", ctx.adapter.name, ctx.adapter.backend);

    // Dense layer offload: asked for, or a dense FFN under a budget.
    if args.n_gpu_layers.is_some() || (mode == FfnMode::Dense && budget.is_some()) {
        if mode != FfnMode::Dense {
            return Err("--n-gpu-layers offloads whole dense layers; it does not combine with --ffn (use --vram-budget for the hybrid)".into());
        }
        let n = match (args.n_gpu_layers, budget) {
            (Some(n), _) => n,
            (None, Some(b)) => layers_fitting(&model, b.saturating_sub(ctx.headroom_bytes()), n_ctx),
            _ => unreachable!(),
        };
        let mut s = OffloadSession::new(model.clone(), ctx.clone(), n, n_ctx, 64, true)?;
        s.cpu_mut().precision = args.precision;
        s.cpu_mut().tuning = args.cpu_tuning;
        // Dense layers only (checked above): the host's matrices are read through their packed
        // copies alone.
        s.cpu_mut().tuning.pack.release_source = true;
        ctx.flush_uploads();
        let mem = ctx.memory();
        if let Some(b) = budget {
            if mem.peak() > b {
                return Err(format!("dense offload of {n} layers allocated {:.1} MiB, over --vram-budget {:.1} MiB; pass a smaller --n-gpu-layers", mib(mem.peak()), mib(b)).into());
            }
        }
        log(&format!("GPU {gpu_name}: dense layer offload, {n} of {} layers on the GPU ({:.1} MiB), the rest and the output on the CPU; {:.2} s", model.hp.n_layer, mib(mem.peak()), start.elapsed().as_secs_f64()));
        return Ok((Box::new(s), ctx));
    }

    if mode == FfnMode::Dense && args.simulate_activity.is_none() {
        let weights = Arc::new(GpuWeights::upload(&ctx, &model, true)?);
        // Several sequences: each its own cache, position and prefill, decoded together
        // (`GpuBatch`: one step's products over all rows).
        let (session, state): (Box<dyn Forward>, u64) = if args.n_seqs > 1 {
            let b = super::GpuBatch::open(model.clone(), ctx.clone(), weights.clone(), n_ctx, args.n_seqs)?;
            let state = b.state_bytes();
            (Box::new(b), state)
        } else {
            let s = GpuSession::new(model.clone(), ctx.clone(), weights.clone(), n_ctx)?;
            let state = s.state_bytes();
            (Box::new(s), state)
        };
        log(&format!(
            "GPU {gpu_name}: weights {:.1} MiB + KV cache {:.1} MiB uploaded in {:.2} s",
            mib(weights.bytes),
            mib(state),
            start.elapsed().as_secs_f64()
        ));
        return Ok((session, ctx));
    }
    if mode == FfnMode::Threshold {
        return Err("--ffn threshold runs on the CPU only for now (add --backend cpu)".into());
    }

    // Neuron-aware FFN on the GPU, hybrid when the budget leaves neurons to the CPU.
    // The counts and the tokens they are over (a simulation's are per million).
    let (ffn, (counts, profile_tokens), simulate, sim_predictors, sim_note) = match &args.simulate_activity {
        Some(path) => {
            let s = simulation(args, &model, path, log)?;
            let ffn = Arc::new(SparseFfn::simulated(&model, args.precision, true)?);
            (ffn, (s.counts, 1_000_000), Some(s.activity), s.predictors, Some(s.note))
        }
        None => {
            let ffn = sparse_ffn(args, &model, false, log)?.expect("a sparse mode");
            (ffn, load_counts(args, &model, budget.is_some())?, None, None, None)
        }
    };
    // The depth at which KV caches are valued: it chooses host attention, so it keys the cache.
    let kv_depth = super::host_attention::kv_depth_for(args.kv_depth, n_ctx);
    // A placement from --placement, else the one cached among the derived files for this budget and
    // profile, else a new one (then cached).
    let cache = match (budget, &args.placement) {
        (Some(b), None) => {
            // A simulated predictor's rows and lists take VRAM per hot neuron: a placement
            // made without them must not be reused with them, nor the other way round.
            let salt = match (&simulate, &sim_predictors) {
                (Some(s), p) => 1 + (!s.is_perfect()) as u64 + 2 * p.as_ref().map_or(0, |p| p.layers[0].rank() as u64 * 97 + p.layers[0].fc2.ty as u64),
                (None, _) => 0,
            };
            // Host attention depends on the context too (its KV cache's size) and on the
            // depth it is valued at; since session 11 neurons are valued by what the host reads
            // of them (placements from before are made anew).
            Some(PlacementCache::new(&args.derived, b, &counts, salt ^ (n_ctx as u64) << 24 ^ (kv_depth as u64) << 44 ^ 0x51c1_0000_0000))
        }
        _ => None,
    };
    // Attention placed with the neurons, unless a placement file says where it goes (one
    // without ember's attention record, e.g. PowerInfer's, keeps every layer's on the GPU).
    let placed = AttentionPlace::Placed { slack: 0, kv_depth };
    let (hot, attention) = match (&args.placement, &cache) {
        (Some(path), _) => {
            let (hot, attention) = read_placement(path, &model)?;
            (Some(hot), attention.map_or(AttentionPlace::AllGpu, AttentionPlace::Given))
        }
        (None, Some(c)) => match c.load(&model) {
            Some((hot, attention)) => (Some(hot), AttentionPlace::Given(attention)),
            None => (None, placed.clone()),
        },
        (None, None) => (None, placed.clone()),
    };
    let cpu_precision = args.precision;
    let plan = |hot, attention, reserve| HybridPlan { ffn: ffn.clone(), budget, counts: counts.clone(), counts_tokens: profile_tokens, cpu_precision, simulate: simulate.clone(), sim_predictors: sim_predictors.clone(), hot, note: sim_note.clone(), attention, reserve };
    let mut from_cache = cache.is_some() && hot.is_some();
    let (mut hot, mut attention, mut retries, mut reserve) = (hot, attention, 0, 0u64);
    let session = loop {
        let e = match HybridSession::with_prefill(model.clone(), ctx.clone(), n_ctx, plan(hot.clone(), attention.clone(), reserve), prefill_config(args.prefill_batch, args.stream_min_batch, budget), true) {
            Ok(s) => break s.with_tuning(args.hybrid_tuning),
            Err(e) => e,
        };
        if from_cache && matches!(e, HybridError::Placement(_)) {
            let c = cache.as_ref().expect("from the cache");
            log(&format!("the placement cached in {} does not fit here ({e}); placing anew", c.path.display()));
            from_cache = false;
            (hot, attention) = (None, placed.clone());
        } else if let (Some(more), true, None) = (e.more_reserve(reserve), retries < 2, &args.placement) {
            // The allocator wasted more on the hot neurons' buffers than the estimate kept
            // free: placed anew with the measured overshoot (and 2% more) kept free.
            log(&format!("{e}; placing the hot neurons again with {:.1} MiB more kept free", (more - reserve) as f64 / (1u64 << 20) as f64));
            retries += 1;
            reserve = more;
            from_cache = false;
            hot = None;
            if let AttentionPlace::Given(_) = attention {
                attention = placed.clone();
            }
        } else if let (Some(more), true) = (attention.with_more_slack(&e), retries < 2) {
            // Host attention chosen from estimates whose fixed part measured over the
            // budget: chosen again keeping the shortfall free (twice at most).
            log(&format!("{e}; choosing the host-attention layers again with more room"));
            retries += 1;
            attention = more;
        } else {
            return Err(e.into());
        }
        // On a fresh device: the failed session's buffers are gone with the old one, and
        // its count does not add to the new one's (it did: 3.9 GiB "allocated" under a
        // 2.2 GiB budget, and the driver held both until the old buffers were freed).
        drop(ctx);
        ctx = Arc::new(GpuContext::new(choice)?.with_tuning(tuning.clone())?);
    };
    if let Some(c) = &cache {
        match from_cache {
            true => log(&format!("placement reused from {}", c.path.display())),
            false => c.store(session.placement(), session.attention_sites(), model.hp.n_ff, log),
        }
    }
    let p = session.placement();
    let total = model.hp.n_layer * model.hp.n_ff;
    let n_host = session.attention_sites().iter().filter(|&&s| s != AttnSite::Gpu).count();
    let n_qkv = session.attention_sites().iter().filter(|&&s| s == AttnSite::Qkv).count();
    log(&format!(
        "GPU {gpu_name}: --ffn {}: {} of {total} FFN neurons hot on the GPU ({:.1}% of profiled firings), attention and KV cache of {n_host} of {} layers on the host (CPU; the q/k/v product of {n_qkv} of them on the GPU), {:.1} MiB allocated{}; {:.2} s",
        mode.name(),
        p.n_hot(),
        100.0 * p.covered,
        model.hp.n_layer,
        mib(ctx.memory().peak()),
        budget.map_or(String::new(), |b| format!(" of a {:.1} MiB budget", mib(b))),
        start.elapsed().as_secs_f64()
    ));
    Ok((Box::new(session), ctx))
}

/// What `--simulate-activity` and `--simulate-predictor` set up.
struct Simulation {
    activity: SimulatedActivity,
    /// Firing counts that place the neurons.
    counts: Vec<Vec<u32>>,
    /// The predictor matrices run and charged (None: a free predictor).
    predictors: Option<Arc<Predictors>>,
    /// The lines that say what was simulated, for logs and the bench header.
    note: String,
}

fn load_profile(path: &Path) -> Result<ActivationProfile> {
    Ok(ActivationProfile::load(path).map_err(|e| format!("{}: {e}", path.display()))?)
}

fn simulation(args: &SessionOptions, model: &Arc<Model>, path: &Path, log: &dyn Fn(&str)) -> Result<Simulation> {
    let hp = &model.hp;
    let opts: &PredictorSim = &args.simulate_predictor;
    let profile = load_profile(path)?;
    let activity = SimulatedActivity::from_profile(&profile, hp.n_layer, hp.n_ff, opts.seed)?.with_predictor(opts)?;
    // Placement by another profile (other text windows) where given.
    let (counts, placed_by) = match &args.act_profile {
        Some(p) => {
            let place = load_profile(p)?;
            let same = if place.source == profile.source { "; THE SAME TEXT AND WINDOWS as the draws: optimistic" } else { "" };
            (stretched_counts(&place, hp.n_layer, hp.n_ff)?, format!("{} ({}{same})", p.display(), place.source))
        }
        None => (activity.counts(), "the same profile as the draws (optimistic: give --act-profile a profile of other text windows)".to_string()),
    };
    // The predictor file, when there is one: its matrices if they fit, else its rank and type.
    let beside = args.derived.path(".predictors.gguf");
    let file = args.predictor.clone().or_else(|| beside.exists().then_some(beside));
    let trained = match &file {
        Some(f) => Some(Predictors::load(f).map_err(|e| format!("{}: {e}", f.display()))?),
        None => None,
    };
    let rank = opts.rank_or(trained.as_ref().and_then(|t| t.layers.first()).map(|l| l.rank()));
    let (predictors, what) = match (rank, trained) {
        (0, _) => (None, "none run (free)".to_string()),
        (r, Some(t)) if t.check_model(hp).is_ok() && t.layers.iter().all(|l| l.rank() == r) => {
            let what = format!("the trained ones of {} (rank {r}, {}, {:.1} MiB)", file.as_ref().expect("loaded from a file").display(), t.layers[0].fc1.ty, t.n_bytes() as f64 / (1u64 << 20) as f64);
            (Some(Arc::new(t)), what)
        }
        (r, t) => {
            let ty = t.as_ref().and_then(|t| t.layers.first()).map_or(GgmlType::Q8_0, |l| l.fc1.ty);
            let p = random_predictors(hp.n_layer, hp.n_embd, hp.n_ff, r, ty, opts.seed)?;
            let what = format!("random matrices of rank {r}, {} ({:.1} MiB), as a trained predictor's{}", p.layers[0].fc1.ty, p.n_bytes() as f64 / (1u64 << 20) as f64, match &file {
                Some(f) => format!(" (rank and type of {})", f.display()),
                None => " (rank and type that ember's training chose for SmolLM2-135M-ReLU)".to_string(),
            });
            (Some(Arc::new(p)), what)
        }
    };
    let (recall, precision, named) = activity.expected_quality();
    let asked = match (recall - opts.recall).abs() > 1e-3 || (precision - opts.precision).abs() > 1e-3 {
        true => format!(" (asked {} / {}: the profile's rates cannot give more false positives)", opts.recall, opts.precision),
        false => String::new(),
    };
    let label = if opts.is_perfect() && predictors.is_none() { "PERFECT PREDICTOR: an UPPER BOUND, no real predictor names exactly the firing neurons for free" } else { "simulated predictor" };
    let note = format!(
        "SIMULATED ACTIVITY, the text is meaningless: draws from {} ({}){}, mean firing rate {:.1}%, seed {}\n\
         {label}: recall {recall:.3}, precision {precision:.3}{asked} ({:.1}% of neurons named per token; gate rows for every named neuron, up and down rows for the firing ones)\n\
         predictor matrices: {what}\n\
         hot neurons placed by: {placed_by}",
        path.display(),
        profile.source,
        opts.rate.map_or(String::new(), |r| format!(" scaled to a mean rate of {:.1}%", 100.0 * r)),
        100.0 * activity.mean_rate(),
        opts.seed,
        100.0 * named,
    );
    for line in note.lines() {
        log(line);
    }
    Ok(Simulation { activity, counts, predictors, note })
}

/// Predictors of random values (zero mean, the spread of a trained predictor's is irrelevant:
/// their output is set aside) of the given rank and type, seeded.
fn random_predictors(n_layer: usize, n_embd: usize, n_ff: usize, rank: usize, ty: GgmlType, seed: u64) -> Result<Predictors> {
    let ty = match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::Q8_0 => ty,
        _ => GgmlType::Q8_0,
    };
    let mut rng = crate::sparse::profile::SplitMix(seed ^ 0x9e37);
    let mut vals = |n: usize| (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) as f32 * 0.05).collect::<Vec<f32>>();
    let layers = (0..n_layer)
        .map(|_| {
            let (fc1, fc2) = (vals(rank * n_embd), vals(n_ff * rank));
            Predictor::from_f32(&fc1, &fc2, rank, n_embd, n_ff, 0.0, ty)
        })
        .collect::<std::result::Result<Vec<_>, String>>()?;
    Ok(Predictors { layers, model_name: "simulated".into() })
}

/// How many whole layers (weights and KV cache) fit in `budget` after the embedding and
/// activation buffers, for a dense layer offload.
pub fn layers_fitting(model: &Model, budget: u64, n_ctx: usize) -> usize {
    let hp = &model.hp;
    let kv = 2 * 2 * (n_ctx * hp.kv_dim()) as u64;
    // Scratch for 64-token batches and alignment slack.
    let fixed = model.token_embd.n_bytes() as u64 + 64 * 4 * (4 * hp.n_embd + 2 * hp.n_ff + 3 * hp.q_dim()) as u64 + (1 << 20);
    let mut used = fixed;
    let mut n = 0;
    for l in &model.layers {
        // 3% for the GPU layouts' scales and the allocator's blocks (1% left a 7B's 19 layers
        // 13 MiB over 2.2 GiB on an H100, by the allocator's count).
        let bytes: u64 = [&l.wq, &l.wk, &l.wv, &l.wo, &l.ffn_gate, &l.ffn_up, &l.ffn_down].iter().map(|m| m.n_bytes() as u64 * 103 / 100 + 4096).sum::<u64>() + kv * 103 / 100 + 8 * hp.n_embd as u64;
        if used + bytes > budget {
            break;
        }
        used += bytes;
        n += 1;
    }
    n
}

/// Firing counts for placement and the tokens they are over: `--act-profile`, else
/// the derived `.profile.gguf` (the user cache, for the CLI). Without a budget every neuron is hot and the counts
/// do not matter.
fn load_counts(args: &SessionOptions, model: &Model, needed: bool) -> Result<(Vec<Vec<u32>>, u64)> {
    let model_path = &args.model_path;
    let beside = args.derived.path(".profile.gguf");
    let path = args.act_profile.clone().or_else(|| beside.exists().then_some(beside.clone()));
    match path {
        Some(p) => {
            let profile = ActivationProfile::load(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            if profile.n_layer() != model.hp.n_layer || profile.n_ff() != model.hp.n_ff {
                return Err(format!("{}: a profile of {} layers x {} neurons, the model has {} x {}; profile this model (`ember profile`)", p.display(), profile.n_layer(), profile.n_ff(), model.hp.n_layer, model.hp.n_ff).into());
            }
            let tokens = profile.n_tokens();
            Ok((profile.counts, tokens))
        }
        None if needed => Err(format!("--vram-budget places the most-firing neurons on the GPU, which needs an activation profile: run `ember profile -m {} -f TEXT` (writes {}) or pass --act-profile FILE", model_path.display(), beside.display()).into()),
        None => Ok((vec![vec![1; model.hp.n_ff]; model.hp.n_layer], 1)),
    }
}

/// The neuron-aware FFN the flags ask for (None for `--ffn dense`); `for_cpu` adds the neuron
/// bundles a CPU session reads.
pub fn sparse_ffn(args: &SessionOptions, model: &Arc<Model>, for_cpu: bool, log: &dyn Fn(&str)) -> Result<Option<Arc<SparseFfn>>> {
    let mode = args.ffn;
    if mode == FfnMode::Dense {
        return Ok(None);
    }
    let predictors = match mode {
        FfnMode::Predict => Some(Arc::new(load_predictors(args, model, log)?)),
        _ => None,
    };
    let thresholds = match mode {
        FfnMode::Threshold => calibrate_thresholds(args, model, log)?,
        _ => Vec::new(),
    };
    let mut ffn = SparseFfn::new(model, mode, predictors, thresholds, args.precision, true)?;
    if for_cpu {
        ffn = ffn.with_bundles(model);
    }
    Ok(Some(Arc::new(ffn)))
}

/// `--predictor FILE`, else the derived `.predictors.gguf`, else the model's own.
fn load_predictors(args: &SessionOptions, model: &Arc<Model>, log: &dyn Fn(&str)) -> Result<Predictors> {
    let model_path = &args.model_path;
    let beside = args.derived.path(".predictors.gguf");
    let path = args.predictor.clone().or_else(|| beside.exists().then_some(beside));
    let p = match path {
        Some(p) => Predictors::load(&p).map_err(|e| format!("{}: {e}", p.display()))?,
        None => Predictors::from_gguf(model.file.clone()).map_err(|e| format!("{}: {e}; train predictors with `ember profile` and `ember train-predictor`, then pass --predictor FILE", model_path.display()))?,
    };
    // Shapes are checked where the predictors meet the model (`SparseFfn::new`).
    // Same shapes but another model's name: most likely predictors of a sibling model (another
    // fine-tune of one base), which predict the wrong neurons without failing.
    let name = model.file.get("general.name").and_then(|v| v.as_str()).unwrap_or("");
    if !p.model_name.is_empty() && !name.is_empty() && p.model_name != name {
        log(&format!("warning: the predictors were trained for {:?}, and this model is {name:?}", p.model_name));
    }
    log(&format!("predictors: {} layers, {:.1} MiB", p.layers.len(), p.n_bytes() as f64 / (1u64 << 20) as f64));
    Ok(p)
}

/// Runs the first 512 tokens of `--calibration` densely and derives per-layer thresholds.
fn calibrate_thresholds(args: &SessionOptions, model: &Arc<Model>, log: &dyn Fn(&str)) -> Result<Vec<f32>> {
    let Some(path) = &args.calibration else {
        return Err("--ffn threshold needs --calibration FILE: a text whose activations set the per-layer thresholds".into());
    };
    if !(0.0..1.0).contains(&args.ffn_sparsity) {
        return Err(format!("--ffn-sparsity {}: use a fraction in [0, 1)", args.ffn_sparsity).into());
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let tok = crate::tokenizer::Tokenizer::from_gguf(&model.file)?;
    let mut ids = tok.encode(&text, true, false)?;
    ids.truncate(512);
    if ids.len() < 16 {
        return Err(format!("{}: too short to calibrate on ({} tokens; at least 16)", path.display(), ids.len()).into());
    }
    let calib = Arc::new(std::sync::Mutex::new(ThresholdCalibrator::new(model.hp.activation, model.hp.n_layer)));
    let mut s = Session::new(model.clone(), ids.len());
    s.precision = args.precision;
    s.observer = Some(Box::new(calib.clone()));
    s.forward(&ids, crate::engine::Logits::All)?;
    let t = calib.lock().unwrap().thresholds(args.ffn_sparsity);
    log(&format!("thresholds for sparsity {} calibrated on {} tokens of {}", args.ffn_sparsity, ids.len(), path.display()));
    Ok(t)
}

/// Hot neurons from a placement file (ember's or PowerInfer's split format), and where each
/// layer's attention lives when the file says (`ember plan -o` writes it).
fn read_placement(path: &Path, model: &Model) -> Result<(Vec<Vec<u32>>, Option<Vec<AttnSite>>)> {
    let f = GgufFile::open(path).map_err(|e| format!("--placement {}: {e}", path.display()))?;
    let hot = read_split(&f, model.hp.n_layer, model.hp.n_ff).map_err(|e| format!("--placement {}: {e}", path.display()))?;
    let attention = read_attention(&f, model.hp.n_layer).map_err(|e| format!("--placement {}: {e}", path.display()))?;
    Ok((hot, attention))
}

/// The placement cached among the derived files, `NAME.placement-<MiB>.gguf` (MODEL without `.gguf`): a PowerInfer split file
/// that also records the budget and a fingerprint of the firing counts it was made from, so
/// that it is reused only for the same budget and profile. Placing is fast (a sort of the
/// model's neurons); the cache makes a run's GPU contents inspectable and repeatable, and
/// PowerInfer's tools can read it.
struct PlacementCache {
    path: PathBuf,
    budget: u64,
    fingerprint: u64,
}

const KEY_CACHE_BUDGET: &str = "ember.placement.budget";
const KEY_CACHE_COUNTS: &str = "ember.placement.counts_fingerprint";

impl PlacementCache {
    /// `salt` tells apart setups whose neurons cost different bytes for the same counts.
    fn new(derived: &DerivedFiles, budget: u64, counts: &[Vec<u32>], salt: u64) -> PlacementCache {
        let path = derived.path(&format!(".placement-{}MiB.gguf", budget.div_ceil(1 << 20)));
        PlacementCache { path, budget, fingerprint: counts_fingerprint(counts) ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) }
    }

    /// The cached hot neurons and attention placement, when the file exists and was made for
    /// this budget and profile (one from before host attention, without the attention record,
    /// is placed anew).
    fn load(&self, model: &Model) -> Option<(Vec<Vec<u32>>, Vec<AttnSite>)> {
        let f = GgufFile::open(&self.path).ok()?;
        let matches = f.get_u64(KEY_CACHE_BUDGET).ok() == Some(self.budget) && f.get_u64(KEY_CACHE_COUNTS).ok() == Some(self.fingerprint);
        if !matches {
            return None;
        }
        let hot = read_split(&f, model.hp.n_layer, model.hp.n_ff).ok()?;
        let attention = read_attention(&f, model.hp.n_layer).ok()??;
        Some((hot, attention))
    }

    /// Writes the placement; a directory that cannot be written costs only the cache.
    fn store(&self, p: &Placement, sites: &[AttnSite], n_ff: usize, log: &dyn Fn(&str)) {
        let mut w = split_file(&p.hot, n_ff, self.budget);
        set_attention(&mut w, sites);
        w.set(KEY_CACHE_BUDGET, Value::U64(self.budget));
        w.set(KEY_CACHE_COUNTS, Value::U64(self.fingerprint));
        // The derived-files folder (the user cache's, keyed by the model) may not exist yet.
        let made = self.path.parent().map_or(Ok(()), std::fs::create_dir_all);
        match made.and_then(|()| w.write_file(&self.path).map_err(std::io::Error::other)) {
            Ok(()) => log(&format!("placement cached in {}", self.path.display())),
            Err(e) => log(&format!("note: could not cache the placement in {}: {e}", self.path.display())),
        }
    }
}

/// Prefill batches of `batch` tokens, those of `stream_min_batch` or more (0: none) streaming
/// their cold neurons to the GPU under `budget` (the default area: `StreamConfig::for_budget`).
/// What `ember plan` keeps free for the area too.
pub fn prefill_config(batch: usize, stream_min_batch: usize, budget: Option<u64>) -> crate::engine::hybrid::PrefillConfig {
    let stream = crate::engine::hybrid::StreamConfig::for_budget(budget).filter(|_| stream_min_batch > 0).map(|c| crate::engine::hybrid::StreamConfig { min_rows: stream_min_batch, ..c });
    crate::engine::hybrid::PrefillConfig { batch, stream }
}
