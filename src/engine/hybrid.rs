//! The neuron-aware FFN on the GPU, alone or split with the CPU (PowerInfer's hybrid).
//!
//! Placement ([`crate::sparse::placement`]) decides which neurons of each layer are hot. Hot
//! neurons live on the GPU in compact rows ([`HotFfn`]); the CPU computes the active cold ones
//! from the mapped model file. Per token and layer:
//!
//! ```text
//! GPU, submission A: ... attention, + residual, FFN norm -> copy (xn, x) to a mapped buffer
//! GPU, submission B: hot neurons: [predictor] -> select active -> gather up/gate -> AXPY into x
//! CPU, meanwhile:    wait for A only, read (xn, x), cold active neurons -> y_cpu -> write to GPU
//! GPU, next layer:   x += y_cpu, then its attention ...
//! ```
//!
//! So each layer with cold neurons costs one GPU->CPU synchronisation (waiting for A) and one
//! host write (y_cpu, n_embd floats, ordered before the next submission); only activation
//! vectors cross the bus. While the CPU works on the cold neurons the GPU works on the hot
//! ones. Layers whose neurons are all hot need no synchronisation at all: a model that fits
//! runs as a few submissions per token (one per 8 layers), like the dense GPU path.
//!
//! Two things keep the host off the critical path:
//! - The command buffers of a token depend on no data, so a recorder thread records them
//!   (and draws simulated activity) ahead of time and hands them over in order; the main
//!   thread only submits, waits and computes.
//! - The cold neurons run on a [`Team`](crate::cpu::team::Team) of threads that spin between
//!   layers ([`super::cold`]), so each layer's CPU work starts on every core at once instead
//!   of waking a sleeping rayon pool.

use crate::gpu::upload::UploadSlot;
use super::cold::{ColdFfn, ColdRows};
use super::ffn::{FfnMode, SparseFfn};
use super::forward::{Forward, ForwardError, Logits};
use super::gpu_forward::{FfnOps, GpuSession, GpuWeights, Profile};
use super::gpu_ops::{NamedOp, Op};
use super::host_attention::{choose_attention, cold_reads, HostAttention};
use crate::cpu::Precision;
use crate::cpu::matmul::CpuTuning;
use crate::cpu::team::Aside;
use crate::gpu::matrix::{GpuMatrix, MatmulOp};
use crate::gpu::ops::{AddOp, GatedActOp};
use crate::gpu::sparse::{ActiveList, BatchFfnOp, Criterion, DenseGateOp, HotFfn, MatvecMode, SelectOp, SparseAxpyOp, SparseConfig, SparseMatvecOp};
use crate::gpu::{GpuContext, GpuError, Step};
use crate::gguf::GgmlType;
use crate::model::{Activation, Matrix, Model};
use crate::sparse::placement::{given, place, AttnSite, Bytes, FixedPart, Placement, PlacementInput};
use crate::sparse::predictor::Predictors;
use crate::sparse::simulate::{Drawn, SimulatedActivity};
use std::sync::{Arc, Mutex};

mod prefill;
mod stream;
use prefill::PrefillBuffers;
pub use prefill::PrefillTiming;
pub use stream::{PrefillConfig, StreamConfig, StreamTiming};
use stream::StreamArea;

impl AttentionPlace {
    /// After a session that failed with `err`: where a placed choice's measured fixed part
    /// came out over the budget (an allocator that wastes more than the estimate allows, e.g.
    /// lavapipe's fifth), the same choice keeping the shortfall and 2% of the budget more
    /// free, to try again on a fresh context. None for other errors and other variants.
    pub fn with_more_slack(&self, err: &HybridError) -> Option<AttentionPlace> {
        match (self, err) {
            (AttentionPlace::Placed { slack, kv_depth }, HybridError::Placement(crate::sparse::placement::PlacementError::TooSmall { budget, need, .. })) => {
                Some(AttentionPlace::Placed { slack: slack + need.0.saturating_sub(budget.0) + budget.0 / 50, kv_depth: *kv_depth })
            }
            _ => None,
        }
    }
}

/// What a neuron-aware GPU session needs besides the model.
pub struct HybridPlan {
    /// Mode (relu or predict), transposed down matrices, predictors.
    pub ffn: Arc<SparseFfn>,
    /// GPU bytes ember may allocate; None = everything hot (GPU-resident sparse).
    pub budget: Option<u64>,
    /// Per layer, per neuron firing counts (the profile) that rank neurons for the GPU, over
    /// `counts_tokens` tokens.
    pub counts: Vec<Vec<u32>>,
    pub counts_tokens: u64,
    /// Arithmetic of the CPU's cold neurons.
    pub cpu_precision: Precision,
    /// Benchmark only: each token's active neurons drawn from firing rates, not computed
    /// (with a perfect predictor, or with a simulated one's recall and precision).
    pub simulate: Option<SimulatedActivity>,
    /// Benchmark only, with `simulate`: predictor matrices run every token and layer and
    /// charged (their output set aside: the draw decides): fc1 and the hot neurons' rows of
    /// fc2 on the GPU (inside the budget), fc1 and the cold neurons' rows on the CPU. None: a
    /// free predictor.
    pub sim_predictors: Option<Arc<Predictors>>,
    /// What was simulated, in words (for the bench header); None when nothing is.
    pub note: Option<String>,
    /// A placement made earlier (per layer ascending hot neuron ids), used instead of placing
    /// anew when it fits the budget.
    pub hot: Option<Vec<Vec<u32>>>,
    /// Which layers' attention and KV cache live on the GPU (the others' run on the CPU).
    pub attention: AttentionPlace,
    /// Bytes of the budget the hot neurons must leave free, beyond the estimated allocator
    /// waste: 0 at first; after an attempt that measured over the budget
    /// ([`HybridError::OverBudget`]), its overshoot and a margin (see
    /// [`HybridError::more_reserve`]).
    pub reserve: u64,
}

/// Where each layer's attention and KV cache go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttentionPlace {
    /// Every layer's on the GPU.
    AllGpu,
    /// Under a budget, chosen together with the hot neurons (`host_attention::choose_attention`:
    /// what `ember plan --host-attention` shows); without a budget every layer's on the GPU.
    /// An attention block ranks like a neuron read at the share of its bytes the host would
    /// read per token. The choice is made from estimates before anything is uploaded, keeping `slack` bytes more free than
    /// `ember plan` does (0 at first; see [`AttentionPlace::with_more_slack`]). `kv_depth`: the
    /// positions a decode token attends over on average, which values a layer's KV cache
    /// (`host_attention::attention_costs`).
    Placed { slack: u64, kv_depth: usize },
    /// Given per layer (a placement file that records it, tests).
    Given(Vec<AttnSite>),
}

/// The predictor's GPU dispatches: logits = fc2 · relu(fc1 · x) (a simulated predictor's fc2
/// holds the hot neurons' rows only, and is absent without hot neurons).
struct PredictorOps {
    fc1: MatmulOp,
    relu: GatedActOp,
    fc2: Option<MatmulOp>,
    _weights: Vec<GpuMatrix>,
}

/// A simulated predictor's first stage on the GPU: the list of hot candidates and their gate
/// rows (the ops after it then take the candidates that fire).
struct CandidateOps {
    select: SelectOp,
    gate: SparseMatvecOp,
    _list: ActiveList,
}

/// One layer's neuron-aware FFN: the GPU's hot part and what the CPU needs for the cold part.
struct SparseLayerOps {
    predictor: Option<PredictorOps>,
    candidates: Option<CandidateOps>,
    gate: Option<DenseGateOp>,
    select: SelectOp,
    matvec: SparseMatvecOp,
    axpy: SparseAxpyOp,
    _hot: HotFfn,
    _list: ActiveList,
    /// A prefill batch's FFN over every hot neuron, densely, added into x.
    batch: BatchFfnOp,
    /// The neurons the CPU owns (ids ascending; may be none), with their gate rows packed.
    cold: ColdRows,
    /// The layer's attention runs on the CPU ([`HostAttention`]): the GPU hands over x and
    /// gets back (x after attention, its FFN norm) before the hot neurons.
    host_attention: bool,
    /// Of a host-attention layer: its q/k/v product runs on the GPU ([`AttnSite::Qkv`]), and
    /// the GPU hands over q, k and v with x.
    qkv_on_gpu: bool,
    /// (xn, x) of the token, mapped by the CPU (x alone for host attention); None where the
    /// layer needs no CPU work.
    staging: Option<wgpu::Buffer>,
    /// The CPU's partial output and the op adding it to x.
    y_cpu: wgpu::Buffer,
    add_cpu: AddOp,
    /// Simulated activity: the layer's ±1 "logits" written per token.
    sim_logits: Option<wgpu::Buffer>,
    /// Upload slots, used instead of `queue.write_buffer` unless turned off
    /// ([`HybridTuning::upload_slots`]): x | xn after a host attention, copied into x and
    /// xn by the hot neurons' command buffer; the CPU's part, copied into `y_cpu` by the next
    /// segment; the simulated logits, copied before the hot neurons.
    up_attn: Option<UploadSlot>,
    up_y: Option<UploadSlot>,
    up_sim: Option<UploadSlot>,
}

impl SparseLayerOps {
    /// Its upload slots, each mapped again if a use unmapped it.
    fn remap_slots(&self) {
        for slot in [&self.up_attn, &self.up_y, &self.up_sim].into_iter().flatten() {
            slot.remap();
        }
    }
}

impl HybridState {
    /// For tables: the FFN mode, the hot share, and the simulation label when simulated.
    fn describe(&self, n_neurons: usize) -> String {
        let hot = self.placement.n_hot();
        let split = if hot == n_neurons { "all neurons hot".to_string() } else { format!("+ CPU, {:.0}% neurons hot", 100.0 * hot as f64 / n_neurons as f64) };
        let n_qkv = self.sites.iter().filter(|&&s| s == AttnSite::Qkv).count();
        let split = match (self.host.n_layers(), n_qkv) {
            (0, _) => split,
            (n, 0) => format!("{split}, attention of {n} layers on the CPU"),
            (n, q) => format!("{split}, attention of {n} layers on the CPU, the q/k/v of {q} of them on the GPU"),
        };
        let sim = match &self.simulate {
            // A free, perfect predictor: no real run reaches it.
            Some(_) if !self.charged && self.sim_predictors.is_none() => ", SIMULATED ACTIVITY, perfect predictor: UPPER BOUND",
            Some(_) => ", SIMULATED ACTIVITY",
            None => "",
        };
        format!("sparse {} ({split}{sim})", self.ffn.mode.name())
    }
}

/// Lost-device and mapping failures of the hybrid step.
fn lost(err: impl std::fmt::Display) -> ForwardError {
    ForwardError::Gpu(GpuError::Lost(err.to_string()))
}

/// Spins on non-blocking polls until a `map_async` reports through `rx`: a blocking wait on the
/// fence costs ~100 µs of wake-up latency per exchange, more than a layer's GPU half takes.
fn spin_until_mapped(device: &wgpu::Device, rx: &std::sync::mpsc::Receiver<Result<(), wgpu::BufferAsyncError>>) -> Result<(), ForwardError> {
    loop {
        device.poll(wgpu::PollType::Poll).map_err(lost)?;
        match rx.try_recv() {
            Ok(r) => return r.map_err(lost),
            Err(std::sync::mpsc::TryRecvError::Empty) => std::hint::spin_loop(),
            Err(err) => return Err(lost(err)),
        }
    }
}

/// x and xn after a host attention to the GPU, ordered before the hot neurons' submission
/// (which reads them): through the layer's upload slot, copied at the start of that
/// submission, or `queue.write_buffer`.
fn upload_attention(gpu: &GpuSession, sp: &SparseLayerOps, slots: bool, x: &[f32], xn: &[f32]) -> Result<(), GpuError> {
    match (slots, &sp.up_attn) {
        (true, Some(slot)) => slot.write(&gpu.ctx.device, &[bytemuck::cast_slice(x), bytemuck::cast_slice(xn)]),
        _ => {
            gpu.ctx.queue.write_buffer(&gpu.s.x, 0, bytemuck::cast_slice(x));
            gpu.ctx.queue.write_buffer(&gpu.s.xn, 0, bytemuck::cast_slice(xn));
            Ok(())
        }
    }
}

/// After a host attention: x and xn back to the GPU, then the hot neurons' commands (which
/// read them) submitted. Returns the seconds of the two parts.
fn upload_and_submit(gpu: &GpuSession, sp: &SparseLayerOps, slots: bool, x: &[f32], xn: &[f32], hot: Option<wgpu::CommandBuffer>) -> Result<(f64, f64), GpuError> {
    let t_write = std::time::Instant::now();
    upload_attention(gpu, sp, slots, x, xn)?;
    let t_hot = std::time::Instant::now();
    gpu.ctx.queue.submit(hot);
    Ok(((t_hot - t_write).as_secs_f64(), t_hot.elapsed().as_secs_f64()))
}

/// The CPU's part of a layer's FFN to the GPU, ordered before the next submission (whose first
/// dispatch adds it into x): through the layer's upload slot, copied by that submission, or
/// `queue.write_buffer`.
fn upload_y(gpu: &GpuSession, sp: &SparseLayerOps, slots: bool, y: &[f32]) -> Result<(), ForwardError> {
    match (slots, &sp.up_y) {
        (true, Some(slot)) => slot.write(&gpu.ctx.device, &[bytemuck::cast_slice(y)]).map_err(ForwardError::Gpu),
        _ => {
            gpu.ctx.queue.write_buffer(&sp.y_cpu, 0, bytemuck::cast_slice(y));
            Ok(())
        }
    }
}

impl SparseLayerOps {
    /// The GPU's hot-neuron dispatches, in order.
    fn gpu_sequence(&self) -> Vec<NamedOp<'_>> {
        let mut v: Vec<NamedOp<'_>> = Vec::new();
        if let Some(p) = &self.predictor {
            v.extend([("predictor fc1", &p.fc1 as &dyn Op), ("predictor relu", &p.relu)]);
            if let Some(fc2) = &p.fc2 {
                v.push(("predictor fc2", fc2));
            }
        }
        if let Some(c) = &self.candidates {
            v.extend([("sparse select candidates", &c.select as &dyn Op), ("sparse gate candidates", &c.gate)]);
        }
        if let Some(g) = &self.gate {
            v.push(("sparse gate", g));
        }
        v.extend([("sparse select", &self.select as &dyn Op), ("sparse matvec", &self.matvec), ("sparse axpy", &self.axpy)]);
        v
    }
}

/// A GPU session whose FFN is neuron-aware: the wrapped [`GpuSession`] holds everything but
/// the FFN (its layers' FFN is [`FfnOps::External`]); this session adds each layer's hot
/// neurons on the GPU and computes the cold ones on the CPU.
pub struct HybridSession {
    gpu: GpuSession,
    /// Per layer: the hot neurons' dispatches and the cold neurons' exchange buffers.
    layers: Vec<SparseLayerOps>,
    state: HybridState,
    /// Batched prefill's exchange buffers (None: prompts run token by token).
    prefill: Option<PrefillBuffers>,
}

/// The CPU side of a hybrid session.
struct HybridState {
    ffn: Arc<SparseFfn>,
    precision: Precision,
    /// The CPU's cold neurons, on a team of spinning threads.
    cold: ColdFfn,
    y: Vec<f32>,
    /// Host-attention layers (their KV caches), run on the cold neurons' team.
    host: HostAttention,
    /// Where each layer's attention runs.
    sites: Vec<AttnSite>,
    /// A host-attention layer's q | k | v of the token, where the GPU computed them.
    host_qkv: Vec<f32>,
    /// A host-attention layer's x and FFN-normed xn of the token.
    host_x: Vec<f32>,
    host_xn: Vec<f32>,
    simulate: Option<Mutex<SimulatedActivity>>,
    /// Simulated with a predictor's errors or costs: candidates and firing neurons apart.
    charged: bool,
    sim_predictors: Option<Arc<Predictors>>,
    note: Option<String>,
    placement: Placement,
    /// CPU<->GPU synchronisations in the last decoded token.
    syncs_per_token: usize,
    /// Where decode time went, summed over tokens since the last reset of the counters.
    timing: HybridTiming,
    /// Where batched prefill time went, since the last reset.
    prefill_timing: PrefillTiming,
    /// Decode's choices (upload slots, who submits the hot neurons).
    tuning: HybridTuning,
}

/// The hybrid decode's choices that benchmarks compare (the binary's `--tune hybrid-upload`
/// and `hybrid-submit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HybridTuning {
    /// Who writes x and xn back and submits the hot neurons after a host attention.
    pub hot_submit: HotSubmit,
    /// The per-token uploads through the layers' upload slots ([`UploadSlot`]) rather than
    /// `queue.write_buffer`.
    pub upload_slots: bool,
}

impl Default for HybridTuning {
    fn default() -> Self {
        HybridTuning { hot_submit: HotSubmit::Team, upload_slots: true }
    }
}

/// Who, after a host attention, writes x and xn back to the GPU and submits the hot neurons
/// (which read them), while the cold ones are computed on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HotSubmit {
    /// A member of the cold-neuron team, as the first cold product starts ([`Aside`]): the
    /// members are spinning, so it starts within a microsecond, and the others take its share.
    Team,
    /// A third thread, woken through a channel: session 13 measured the main thread waiting
    /// 1.6-4.9 ms a token for it on a 16-core host with every core busy.
    Thread,
    /// The main thread itself, before the cold neurons (~60-80 µs a layer on the critical path).
    Main,
}

/// Host-side time of hybrid decode steps, in seconds, summed over `tokens`.
#[derive(Clone, Copy, Debug, Default)]
pub struct HybridTiming {
    pub tokens: u64,
    /// Whole token, from the first write to the last submission.
    pub total: f64,
    /// Blocked waiting for the GPU's attention half (submission A) of split layers.
    pub wait_gpu: f64,
    /// Blocked waiting for the recorder thread's next command buffer.
    pub wait_recorder: f64,
    /// Inside `queue.submit`, `map_async`, `unmap` and `write_buffer` (wgpu's own host work per
    /// exchange, part of "other").
    pub submit: f64,
    /// Computing cold neurons on the CPU (a charged predictor's CPU part included).
    pub cpu_ffn: f64,
    /// Of `cpu_ffn`: a simulated predictor's CPU part (fc1 and the cold rows of fc2; beside a
    /// dense cold gate only fc1, as fc2's rows run inside that product's parts).
    pub cpu_predictor: f64,
    /// Host-attention layers' attention half on the CPU (the GPU waits for it).
    pub cpu_attention: f64,
    /// Of `cpu_attention`: RoPE, the KV write and attention over the cache.
    pub cpu_attention_core: f64,
    /// Of `cpu_attention`: the o product, its residual add and the FFN norm.
    pub cpu_attention_proj: f64,
    /// Of `cpu_attention`: reading the mapped x and q/k/v and unmapping.
    pub cpu_attention_read: f64,
    /// Submitting thread (overlapped with the cold neurons; without one, the main thread's,
    /// part of `cpu_attention`): writing x and xn back after a host attention (into the upload
    /// slot, or two `write_buffer` calls).
    pub attention_write: f64,
    /// The same thread: submitting the hot neurons' command buffer after those writes.
    pub attention_submit: f64,
    /// Waiting for the submitting thread before the next queue call (part of "other").
    pub wait_submitter: f64,
    /// Recorder thread (overlapped with the above): recording command buffers, drawing included.
    pub record: f64,
    /// Recorder thread: drawing simulated activity and uploading it.
    pub simulate: f64,
}

impl HybridTiming {
    /// One line for logs: milliseconds per token of each part.
    pub fn summary(&self, syncs: usize) -> String {
        let per = |v: f64| 1e3 * v / self.tokens.max(1) as f64;
        let rest = self.total - self.wait_gpu - self.wait_recorder - self.cpu_ffn - self.cpu_attention;
        format!(
            "{:.2} ms per token: {:.2} waiting for the GPU, {:.2} CPU attention ({:.2} of it RoPE, KV write and attention over the cache, {:.2} the o product and norm, {:.2} reading the mapped q/k/v and unmapping), {:.2} CPU cold neurons ({:.2} of it the predictor), {:.2} waiting for recorded commands, {:.2} other ({:.2} of it in wgpu's submit/map/unmap/write calls, {:.2} waiting for the submitting thread); \
             overlapped on the recorder thread: {:.2} recording commands, {:.2} of it drawing simulated activity; on the submitting thread (or inside CPU attention without it): {:.2} writing x and xn after host attention, {:.2} submitting the hot neurons; {syncs} CPU<->GPU syncs per token",
            per(self.total),
            per(self.wait_gpu),
            per(self.cpu_attention),
            per(self.cpu_attention_core),
            per(self.cpu_attention_proj),
            per(self.cpu_attention_read),
            per(self.cpu_ffn),
            per(self.cpu_predictor),
            per(self.wait_recorder),
            per(rest),
            per(self.submit),
            per(self.wait_submitter),
            per(self.record),
            per(self.simulate),
            per(self.attention_write),
            per(self.attention_submit),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HybridError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Placement(#[from] crate::sparse::placement::PlacementError),
    #[error("--ffn {0} cannot run neuron-aware on the GPU (relu or predict)")]
    Mode(&'static str),
    #[error("ember allocated {used} of GPU memory, over the budget of {budget}: a bug in its accounting; please report it, and use a smaller --vram-budget meanwhile")]
    OverBudget { used: Bytes, budget: Bytes },
}

impl HybridError {
    /// After an attempt whose measured allocation came out over the budget (the allocator
    /// wasted more on the hot neurons' buffers than estimated): the reserve that keeps its
    /// overshoot and 2% of the budget more free. None for other errors.
    pub fn more_reserve(&self, reserve: u64) -> Option<u64> {
        match self {
            HybridError::OverBudget { used, budget } => Some(reserve + used.0.saturating_sub(budget.0) + budget.0 / 50),
            _ => None,
        }
    }
}

impl HybridSession {
    /// Everything but the FFN on the GPU, then as many hot neurons as `plan.budget` leaves
    /// room for (all of them without a budget); the rest run on the CPU. Prompts run in
    /// batches of up to [`DEFAULT_PREFILL_BATCH`] tokens.
    pub fn new(model: Arc<Model>, ctx: Arc<GpuContext>, n_ctx: usize, plan: HybridPlan, progress: bool) -> Result<HybridSession, HybridError> {
        Self::with_prefill(model, ctx, n_ctx, plan, DEFAULT_PREFILL_BATCH, progress)
    }

    /// [`new`](Self::new) with prompts run in batches of up to `prefill.batch` tokens (1: token
    /// by token, as decode; a plain number is such a batch size, nothing streamed), whose cold
    /// neurons stream to the GPU where `prefill.stream` says (under a budget, for batches of
    /// its `min_rows` tokens or more). The batch's GPU buffers (activations of every row, the
    /// CPU exchange, the streaming area) are allocated before the neurons are placed, so they
    /// come out of the budget.
    pub fn with_prefill(model: Arc<Model>, ctx: Arc<GpuContext>, n_ctx: usize, plan: HybridPlan, prefill: impl Into<PrefillConfig>, progress: bool) -> Result<HybridSession, HybridError> {
        let prefill: PrefillConfig = prefill.into();
        let prefill_batch = prefill.batch;
        // The streaming area, where one would be used: a budget leaves cold neurons, and
        // batches can be long enough.
        let stream_cfg = prefill.stream_for(n_ctx, plan.budget);
        let hp = model.hp.clone();
        let (e, ff) = (hp.n_embd, hp.n_ff);
        let mode = plan.ffn.mode;
        if !matches!(mode, FfnMode::Relu | FfnMode::Predict) {
            return Err(HybridError::Mode(mode.name()));
        }
        // Layers whose attention must be on the GPU whatever the budget; None: chosen below.
        let forced: Option<Vec<AttnSite>> = match (&plan.attention, plan.budget) {
            (AttentionPlace::Given(v), _) if v.len() != hp.n_layer => {
                return Err(crate::sparse::placement::PlacementError::GivenMismatch { got: v.len(), want: hp.n_layer }.into());
            }
            (AttentionPlace::Given(v), _) => Some(v.clone()),
            (AttentionPlace::Placed { .. }, Some(_)) => None,
            (AttentionPlace::AllGpu, _) | (AttentionPlace::Placed { .. }, None) => Some(vec![AttnSite::Gpu; hp.n_layer]),
        };
        // A budget that cannot hold the fixed part is refused before anything is uploaded: a
        // lower bound of what the uploads below allocate (the tensors' own bytes, the f16 KV
        // cache of the layers whose attention must be on the GPU), so a budget too small never
        // fills the card first (at -c 4096 a 7B held 3.5 GiB in the driver for a moment
        // before the measured check refused it). Where the placement chooses, any layer's
        // attention may go to the host: only the embeddings and output count.
        if let Some(b) = plan.budget {
            let head = model.token_embd.n_bytes() as u64 + if model.tied_embeddings { 0 } else { model.output.n_bytes() as u64 };
            let on_gpu: Vec<usize> = forced.as_ref().map_or_else(Vec::new, |f| (0..hp.n_layer).filter(|&l| f[l] == AttnSite::Gpu).collect());
            let qkv: u64 = forced.as_ref().map_or(0, |f| (0..hp.n_layer).filter(|&l| f[l] == AttnSite::Qkv).map(|l| model.layers[l].qkv_bytes()).sum());
            let attention = head + qkv + on_gpu.iter().map(|&l| model.layers[l].attention_bytes()).sum::<u64>();
            let kv = on_gpu.len() as u64 * hp.kv_bytes_per_layer(n_ctx);
            if attention + kv > b {
                let parts = match forced {
                    Some(_) => format!("attention of {} layers, embeddings and output at least {}, KV cache for {n_ctx} positions {}", on_gpu.len(), Bytes(attention), Bytes(kv)),
                    None => format!("embeddings and output at least {} (every layer's attention and KV cache could stay on the host)", Bytes(attention)),
                };
                return Err(crate::sparse::placement::PlacementError::TooSmall { budget: Bytes(b), need: Bytes(attention + kv), parts }.into());
            }
        }
        // What a cold neuron costs the host, by which the neurons are ranked.
        let sim_quality = plan.simulate.as_ref().and_then(|s| s.asked_quality());
        let sim_perfect = plan.simulate.as_ref().is_some_and(|s| s.is_perfect());
        let reads = cold_reads(&model, plan.ffn.down_t.first().map_or(GgmlType::F32, |m| m.ty), mode, sim_quality, sim_perfect);
        // A simulated predictor: fc1 whole on the GPU (fc2's hot rows come with the neurons).
        let charged = plan.simulate.as_ref().is_some_and(|s| !s.is_perfect()) || (plan.simulate.is_some() && plan.sim_predictors.is_some());
        let sim_padded: Option<Vec<(Matrix, Matrix)>> = match (&plan.simulate, &plan.sim_predictors) {
            (Some(_), Some(p)) => Some(p.layers.iter().map(|l| pad_rank(&l.fc1, &l.fc2)).collect()),
            _ => None,
        };
        // A hot neuron's GPU bytes per layer; a simulated predictor's hot neuron also takes its
        // entry in the candidates' list and its row of fc2.
        let per_neuron: Vec<u64> = (0..hp.n_layer)
            .map(|il| {
                let sim = match (&sim_padded, charged) {
                    (Some(v), _) => 4 + v[il].1.row_bytes() as u64,
                    (None, true) => 4,
                    (None, false) => 0,
                };
                hot_neuron_bytes(&model.layers[il], plan.ffn.down_t[il].ty, e) + sim
            })
            .collect();
        // Which layers' attention the GPU holds: chosen from estimates before anything is
        // uploaded, as `ember plan --host-attention` does (same function, same arguments), so
        // that both agree; the neurons are then placed in what the measured uploads leave.
        let sites = match (forced, &plan.attention, plan.budget) {
            (Some(f), _, _) => f,
            (None, AttentionPlace::Placed { slack, kv_depth }, Some(b)) => {
                let predictor_bytes = match (&sim_padded, &plan.ffn.predictors, mode) {
                    (Some(v), _, _) => v.iter().map(|(fc1, _)| fc1.n_bytes() as u64).sum(),
                    (None, Some(p), FfnMode::Predict) if plan.simulate.is_none() => p.n_bytes() as u64,
                    _ => 0,
                };
                let area = prefill.area_bytes(&model, n_ctx, plan.budget);
                choose_attention(&model, n_ctx, *kv_depth, b, &plan.counts, plan.counts_tokens, reads, per_neuron.clone(), predictor_bytes, crate::gpu::PLANNING_MARGIN + area + slack)?.1
            }
            (None, ..) => vec![AttnSite::Gpu; hp.n_layer],
        };
        let on_host: Vec<bool> = sites.iter().map(|&s| s != AttnSite::Gpu).collect();
        let start = ctx.allocated_bytes();
        let mut fixed = Vec::new();
        // What each stage really allocated, measured, so the neurons get exactly what is left.
        let mark = |fixed: &mut Vec<FixedPart>, name: &str, since: &mut u64| {
            let now = ctx.allocated_bytes();
            fixed.push(FixedPart { name: name.into(), bytes: now - *since });
            *since = now;
        };
        let mut since = start;
        let n_gpu_attn = sites.iter().filter(|&&s| s == AttnSite::Gpu).count();
        let n_qkv = sites.iter().filter(|&&s| s == AttnSite::Qkv).count();
        let weights = Arc::new(GpuWeights::upload_parts(&ctx, &model, &sites, false, progress)?);
        mark(&mut fixed, &format!("attention of {n_gpu_attn} of {} layers (q/k/v of {n_qkv} more), norms, embeddings, output", hp.n_layer), &mut since);
        // A batch reads only its last row's logits: no all-logits buffer.
        // No batch is longer than the context.
        let session = GpuSession::with_batch_logits(model.clone(), ctx.clone(), weights, n_ctx, prefill_batch.min(n_ctx).max(1), false)?;
        let mut prefill = match session.max_tokens() > 1 {
            true => Some(PrefillBuffers::new(&ctx, &session)?),
            false => None,
        };
        mark(&mut fixed, &format!("KV cache of {n_gpu_attn} layers and activations (prefill batches included)"), &mut since);
        let types: Vec<[GgmlType; 3]> = (0..hp.n_layer).map(|il| [model.layers[il].ffn_gate.ty, model.layers[il].ffn_up.ty, plan.ffn.down_t[il].ty]).collect();
        // Rows of the grouped types are not laid out row by row: their batches stay on the CPU.
        let packable = types.iter().flatten().all(|&t| crate::gpu::sparse::packable(t));
        if let (Some(pf), Some(cfg), true) = (prefill.as_mut(), stream_cfg, packable) {
            let s = &session.s;
            // The chunks' hidden rows live in the session's gate buffer (max_tokens x n_ff), as
            // the hot part's do; both run one after the other.
            let attn = stream::AttnParts { model: &model, on_host: &on_host, x: &s.x, qkv: &s.qkv, attn: &s.attn, y: pf.y_cpu() };
            let area = StreamArea::new(&ctx, cfg, &types, e, ff, hp.activation, &s.xn, &s.gate, &s.x, session.max_tokens(), &s.step, Some(attn))?;
            pf.stream = Some(area);
            mark(&mut fixed, "prefill streaming area (cold neurons of large batches)", &mut since);
        }

        // Predictors on the GPU (predict mode without simulation).
        let predictor_weights: Vec<Option<[GpuMatrix; 2]>> = match (&plan.ffn.predictors, mode, &plan.simulate) {
            (Some(p), FfnMode::Predict, None) => p
                .layers
                .iter()
                .map(|l| {
                    let (fc1, fc2) = pad_rank(&l.fc1, &l.fc2);
                    Ok(Some([GpuMatrix::upload(&ctx, &fc1)?, GpuMatrix::upload(&ctx, &fc2)?]))
                })
                .collect::<Result<_, GpuError>>()?,
            _ => (0..hp.n_layer).map(|_| None).collect(),
        };
        let mut sim_fc1: Vec<Option<GpuMatrix>> = match &sim_padded {
            Some(v) => v.iter().map(|(fc1, _)| GpuMatrix::upload(&ctx, fc1).map(Some)).collect::<Result<_, GpuError>>()?,
            None => (0..hp.n_layer).map(|_| None).collect(),
        };
        let ranks = plan.ffn.predictors.iter().chain(&plan.sim_predictors).flat_map(|p| p.layers.iter().map(|l| l.fc1.rows.next_multiple_of(32)));
        let max_rank = ranks.max().unwrap_or(1);
        // Buffers shared by every layer's sparse ops (layers run one after another).
        let g = ctx.zeros("sparse g", 4 * ff as u64);
        let h = ctx.zeros("sparse h", 4 * ff as u64);
        let logits = ctx.zeros("predictor logits", 4 * ff as u64);
        let p1 = ctx.zeros("predictor hidden", 4 * max_rank as u64);
        let ones = ctx.upload("ones", bytemuck::cast_slice(&vec![1.0f32; max_rank]));
        let sim_logits: Vec<Option<wgpu::Buffer>> = (0..hp.n_layer).map(|l| plan.simulate.as_ref().map(|_| ctx.zeros(&format!("simulated logits {l}"), 4 * ff as u64))).collect();
        mark(&mut fixed, "predictors and sparse buffers", &mut since);

        // Per layer costs that do not scale with the hot neurons: the active list's header,
        // dispatch arguments, the AXPY's partial sums, uniforms, the CPU exchange buffers.
        let cfg = SparseConfig::for_context(&ctx);
        // A simulated predictor adds the candidates' list (its header and arguments, the ops'
        // uniforms) and its fc2 matrix's alignment.
        let layer_overhead = cfg.max_chunks as u64 * e as u64 * 4 + 3 * 4 * e as u64 + 4096 + if charged { 8192 } else { 0 };
        fixed.push(FixedPart { name: "per-layer sparse buffers".into(), bytes: layer_overhead * hp.n_layer as u64 });
        // What the allocator holds beyond ember's buffers so far, room for the staging of the
        // uploads to come, and the same share of waste for the hot neurons' buffers as the
        // allocator has shown so far (the final check measures it all).
        let budget = plan.budget.unwrap_or(u64::MAX);
        let (excess, measured) = ctx.allocator_excess().unwrap_or((0, 0.0));
        // The hot neurons' buffers (a few MiB each, in 4-8 MiB blocks) waste more than the
        // fixed parts did: on an H100 a 7B at --vram-budget 2.2 ended 10 MiB over with the
        // measured share alone (5.5% there). Twice that, at least 5%.
        let waste = (2.0 * measured).max(0.05);
        fixed.push(FixedPart { name: "allocator blocks beyond ember's buffers".into(), bytes: excess });
        fixed.push(FixedPart { name: "upload staging".into(), bytes: ctx.upload_margin() });
        if plan.reserve > 0 {
            fixed.push(FixedPart { name: "kept free after an attempt measured over the budget".into(), bytes: plan.reserve });
        }
        let left = budget.saturating_sub(fixed.iter().map(|p| p.bytes).sum());
        fixed.push(FixedPart { name: format!("allocator waste on hot neurons ({:.1}%)", 100.0 * waste), bytes: (left as f64 * waste / (1.0 + waste)) as u64 });
        let input = PlacementInput { fixed, neuron_bytes: per_neuron, counts: plan.counts.clone(), tokens: plan.counts_tokens, reads };
        let placement = match (plan.budget, plan.hot) {
            (Some(_), Some(hot)) => given(&input, budget, ff, hot)?,
            (Some(_), None) => place(&input, budget, ff)?,
            (None, _) => Placement {
                budget,
                fixed: input.fixed.clone(),
                hot: vec![(0..ff as u32).collect(); hp.n_layer],
                neuron_bytes: input.neuron_bytes.clone(),
                covered_per_layer: vec![1.0; hp.n_layer],
                covered: 1.0,
            },
        };

        let bar = if progress { indicatif::ProgressBar::new(hp.n_layer as u64) } else { indicatif::ProgressBar::hidden() };
        bar.set_style(indicatif::ProgressStyle::with_template("ember: uploading hot neurons {bar:30} {pos}/{len} layers").unwrap());
        let mut layers = Vec::with_capacity(hp.n_layer);
        for (il, pw) in predictor_weights.into_iter().enumerate() {
            debug_assert!(matches!(session.layers[il].ffn, FfnOps::External), "the GPU session leaves the FFN to the hybrid");
            let l = &model.layers[il];
            let hot_ids = &placement.hot[il];
            let hot = HotFfn::upload(&ctx, &l.ffn_gate, &l.ffn_up, &plan.ffn.down_t[il], hot_ids)?;
            let list = ActiveList::new(&ctx, &hot);
            let s = &session.s;
            let mut predictor = pw.map(|[fc1, fc2]| {
                let rank = fc1.rows as u32;
                PredictorOps {
                    fc1: fc1.bind_matmul(&ctx, &s.x, &p1, &s.step),
                    relu: GatedActOp::new(&ctx, &p1, &ones, rank, Activation::Relu, &s.step),
                    fc2: Some(fc2.bind_matmul(&ctx, &p1, &logits, &s.step)),
                    _weights: vec![fc1, fc2],
                }
            });
            if let (Some(fc1), Some(padded)) = (sim_fc1[il].take(), &sim_padded) {
                // fc2's rows of the hot neurons, in hot order: their logits land in `logits`
                // and are set aside (the draw decides which neurons are candidates).
                let fc2 = &padded[il].1;
                let rb = fc2.row_bytes();
                let bytes: Vec<u8> = hot_ids.iter().flat_map(|&i| fc2.bytes()[i as usize * rb..(i as usize + 1) * rb].iter().copied()).collect();
                let fc2_hot = match hot_ids.is_empty() {
                    true => None,
                    false => Some(GpuMatrix::upload(&ctx, &Matrix::from_raw(&format!("blk.{il}.fc2 hot rows"), hot_ids.len(), fc2.cols, fc2.ty, &bytes))?),
                };
                let rank = fc1.rows as u32;
                let fc2_op = fc2_hot.as_ref().map(|m| m.bind_matmul(&ctx, &p1, &logits, &s.step));
                predictor = Some(PredictorOps {
                    fc1: fc1.bind_matmul(&ctx, &s.x, &p1, &s.step),
                    relu: GatedActOp::new(&ctx, &p1, &ones, rank, Activation::Relu, &s.step),
                    fc2: fc2_op,
                    _weights: std::iter::once(fc1).chain(fc2_hot).collect(),
                });
            }
            let mut candidates = None;
            let (gate, select, matvec) = match mode {
                FfnMode::Relu => {
                    let gate = DenseGateOp::new(&ctx, &hot, &s.xn, &g)?;
                    let select = SelectOp::new(&ctx, &hot, &list, Criterion::Relu { values: &g })?;
                    // dReLU also zeroes a negative up value: the act-up kernel applies the
                    // whole activation to the gate computed above.
                    let matvec = match hp.activation {
                        Activation::Drelu => SparseMatvecOp::new(&ctx, &hot, &list, &s.xn, &h, MatvecMode::ActUp { g: &g, act: Activation::Drelu })?,
                        _ => SparseMatvecOp::new(&ctx, &hot, &list, &s.xn, &h, MatvecMode::Relu { g: &g })?,
                    };
                    (Some(gate), select, matvec)
                }
                _ if charged => {
                    // Simulated values per neuron: -1 not named, 0 named and silent, 1 named
                    // and firing. Candidates (>= 0) get their gate row; firing ones (>= 1) up
                    // and down.
                    let sim = sim_logits[il].as_ref().expect("simulated");
                    let list_c = ActiveList::new(&ctx, &hot);
                    let select_c = SelectOp::new(&ctx, &hot, &list_c, Criterion::Predictor { logits: sim, threshold: 0.0 })?;
                    let gate_c = SparseMatvecOp::new(&ctx, &hot, &list_c, &s.xn, &g, MatvecMode::Gate)?;
                    candidates = Some(CandidateOps { select: select_c, gate: gate_c, _list: list_c });
                    let select = SelectOp::new(&ctx, &hot, &list, Criterion::Predictor { logits: sim, threshold: 1.0 })?;
                    let matvec = SparseMatvecOp::new(&ctx, &hot, &list, &s.xn, &h, MatvecMode::ActUp { g: &g, act: hp.activation })?;
                    (None, select, matvec)
                }
                _ => {
                    let (source, threshold) = match &sim_logits[il] {
                        Some(b) => (b, 0.0),
                        None => (&logits, plan.ffn.predictors.as_ref().map_or(0.0, |p| p.layers[il].threshold)),
                    };
                    let select = SelectOp::new(&ctx, &hot, &list, Criterion::Predictor { logits: source, threshold })?;
                    let matvec = SparseMatvecOp::new(&ctx, &hot, &list, &s.xn, &h, MatvecMode::Gated { act: hp.activation })?;
                    (None, select, matvec)
                }
            };
            let axpy = SparseAxpyOp::new(&ctx, &hot, &list, &h, &s.x, true)?;
            // The batch's hidden rows live in the session's gate buffer (max_tokens x n_ff).
            let batch = BatchFfnOp::new(&ctx, &hot, &s.xn, &s.gate, &s.x, hp.activation, session.max_tokens(), &s.step)?;
            let cold = ColdRows::new(&model.layers[il].ffn_gate, complement(hot_ids, ff));
            let host_attention = on_host[il];
            let qkv_on_gpu = sites[il] == AttnSite::Qkv;
            // (xn, x), or x and with q/k/v from the GPU, q | k | v after it.
            let staging_bytes = 4 * (2 * e).max(e + hp.q_dim() + 2 * hp.kv_dim()) as u64;
            let staging = (!cold.ids.is_empty() || host_attention).then(|| ctx.readback_buffer("hybrid staging", staging_bytes));
            let y_cpu = ctx.zeros("cpu ffn part", 4 * e as u64);
            let add_cpu = AddOp::new(&ctx, &s.x, &y_cpu, e as u32, &s.step);
            let up_attn = host_attention.then(|| UploadSlot::new(&ctx, "x | xn upload", 8 * e as u64));
            let up_y = (!cold.ids.is_empty()).then(|| UploadSlot::new(&ctx, "cpu ffn part upload", 4 * e as u64));
            let up_sim = sim_logits[il].as_ref().map(|_| UploadSlot::new(&ctx, "simulated logits upload", 4 * ff as u64));
            layers.push(SparseLayerOps {
                predictor,
                candidates,
                gate,
                select,
                matvec,
                axpy,
                _hot: hot,
                _list: list,
                batch,
                cold,
                host_attention,
                qkv_on_gpu,
                staging,
                y_cpu,
                add_cpu,
                sim_logits: sim_logits[il].clone(),
                up_attn,
                up_y,
                up_sim,
            });
            bar.inc(1);
        }
        bar.finish_and_clear();
        // The last uploads' staging freed, then what ember counted and what the allocator
        // holds (its blocks and the staging peak included), each at its peak.
        ctx.flush_uploads();
        let mem = ctx.memory();
        let used = (mem.counted - start).max(mem.reserved_peak.unwrap_or(0));
        if let Some(b) = plan.budget {
            if used > b {
                return Err(HybridError::OverBudget { used: Bytes(used), budget: Bytes(b) });
            }
        }
        let state = HybridState {
            ffn: plan.ffn.clone(),
            precision: plan.cpu_precision,
            cold: ColdFfn::new(cold_team_size(rayon::current_num_threads())).with_tuning(HYBRID_CPU_TUNING),
            y: vec![0.0; e],
            host: HostAttention::new(&model, &on_host, n_ctx).with_tuning(HYBRID_CPU_TUNING),
            sites,
            host_qkv: vec![0.0; hp.q_dim() + 2 * hp.kv_dim()],
            host_x: vec![0.0; e],
            host_xn: vec![0.0; e],
            simulate: plan.simulate.map(Mutex::new),
            charged,
            sim_predictors: plan.sim_predictors.clone(),
            note: plan.note.clone(),
            placement,
            syncs_per_token: 0,
            timing: HybridTiming::default(),
            prefill_timing: PrefillTiming::default(),
            tuning: HybridTuning::default(),
        };
        Ok(HybridSession { gpu: session, layers, state, prefill })
    }

    /// The session with decode's choices set as `tuning` says.
    pub fn with_tuning(mut self, tuning: HybridTuning) -> HybridSession {
        self.state.tuning = tuning;
        self
    }

    /// Where decode time went, and the CPU<->GPU synchronisations of the last token; `reset`
    /// zeroes the sums.
    pub fn timing(&mut self, reset: bool) -> (HybridTiming, usize) {
        let out = (self.state.timing, self.state.syncs_per_token);
        if reset {
            self.state.timing = HybridTiming::default();
        }
        out
    }

    /// Neurons per chunk of the prefill streaming area; None without one.
    pub fn stream_chunk_rows(&self) -> Option<usize> {
        self.prefill.as_ref()?.stream.as_ref().map(|s| s.chunk_rows())
    }

    /// Which neurons are hot.
    pub fn placement(&self) -> &Placement {
        &self.state.placement
    }

    /// Per layer, whether its attention and KV cache are on the GPU (else on the host).
    pub fn attention_sites(&self) -> &[AttnSite] {
        &self.state.sites
    }

    /// GPU bytes this session's context has allocated (weights, caches, buffers).
    pub fn allocated_bytes(&self) -> u64 {
        self.gpu.ctx.allocated_bytes()
    }

    /// What was simulated, in words (None for a real run).
    pub fn simulation_note(&self) -> Option<&str> {
        self.state.note.as_deref()
    }

    /// Rows of a simulated predictor that the CPU has computed (fc1 rows and cold fc2 rows),
    /// and the names of one layer's GPU dispatches: evidence that the charged work runs.
    pub fn charged_work(&self, layer: usize) -> (u64, Vec<&'static str>) {
        (self.state.cold.predictor_rows, self.layers[layer].gpu_sequence().into_iter().map(|(n, _)| n).collect())
    }

    /// The GPU session underneath (attention, KV cache, head).
    pub fn gpu(&self) -> &GpuSession {
        &self.gpu
    }

    /// [`GpuSession::profile_decode`] with the hot neurons' dispatches as each layer's FFN (the
    /// CPU's cold neurons are not in the GPU's profile); the host-clock figure is a real hybrid
    /// token. The position is not consumed.
    pub fn profile_decode(&mut self, token: u32) -> Result<Option<Profile>, ForwardError> {
        let (layers, gpu) = (&self.layers, &self.gpu);
        let external = |il: usize| -> Vec<NamedOp<'_>> { gpu.layers[il].qkv_sequence().into_iter().chain(layers[il].gpu_sequence()).collect() };
        let Some((alone, in_pass)) = self.gpu.profile_passes(token, &external)? else { return Ok(None) };
        let start = std::time::Instant::now();
        self.run_token(token)?;
        let wall_ns = start.elapsed().as_secs_f64() * 1e9;
        self.gpu.n_past -= 1;
        Ok(Some(Profile { alone, in_pass, wall_ns }))
    }

    /// Neuron-aware decode of one token: the GPU pass is cut after each split layer's FFN norm,
    /// the CPU computes that layer's cold neurons while the GPU computes the hot ones.
    fn run_token(&mut self, token: u32) -> Result<(), ForwardError> {
        let t_token = std::time::Instant::now();
        let HybridSession { gpu, layers, state, .. } = self;
        let e = gpu.model.hp.n_embd;
        let pos0 = gpu.n_past as u32;
        let step = Step { n_tokens: 1, pos0, n_kv: pos0 + 1, _pad: 0 };
        gpu.set_n_kv(step.n_kv);
        let q = &gpu.ctx.queue;
        q.write_buffer(&gpu.s.step, 0, bytemuck::bytes_of(&step));
        q.write_buffer(&gpu.s.step_last, 0, bytemuck::bytes_of(&step));
        q.write_buffer(&gpu.s.ids, 0, bytemuck::bytes_of(&token));
        let HybridState { ffn, precision, cold, y, simulate, timing, syncs_per_token, charged, sim_predictors, host, host_x, host_xn, host_qkv, tuning, .. } = state;
        let (slots, hot_submit) = (tuning.upload_slots, tuning.hot_submit);
        let predictor_secs = cold.predictor_secs;
        let (core_secs, proj_secs) = (host.core_secs, host.proj_secs);
        let this = &*gpu;
        let layers = &*layers;
        let mut t = TokenTiming::default();
        // Everything the GPU will run is known before the token starts, so a second thread
        // records the command buffers (and draws simulated activity) while this one waits for
        // the GPU and computes cold neurons: neither is on the critical path.
        std::thread::scope(|scope| -> Result<(), ForwardError> {
            let (tx, rx) = std::sync::mpsc::channel::<Segment>();
            let sim = simulate.as_ref();
            let recorder = scope.spawn(move || record_split_token(this, layers, sim, slots, tx));
            // After a host attention, x and xn go back to the GPU and the hot neurons'
            // buffer is submitted while the CPU computes the cold neurons ([`HotSubmit`]): on
            // the H100 those two writes and that submission took ~220 µs a layer on the
            // critical path (session 12, call C), the cold part ~420 µs. With a third thread
            // this one's next queue call waits for it (`hot_done`), so the queue sees the same
            // order; a team member is done before the cold part returns.
            let (tx_hot, rx_hot) = std::sync::mpsc::channel::<(usize, Vec<f32>, Vec<f32>, Option<wgpu::CommandBuffer>)>();
            let (tx_done, rx_done) = std::sync::mpsc::channel::<Result<(f64, f64), GpuError>>();
            if hot_submit == HotSubmit::Thread {
                scope.spawn(move || {
                    for (il, x, xn, hot) in rx_hot {
                        let outcome = upload_and_submit(this, &layers[il], slots, &x, &xn, hot);
                        if tx_done.send(outcome).is_err() {
                            return;
                        }
                    }
                });
            }
            let mut hot_pending = false;
            let mut remapped = 0;
            let hot_done = |t: &mut TokenTiming, pending: &mut bool| -> Result<(), ForwardError> {
                if std::mem::take(pending) {
                    let t_wait = std::time::Instant::now();
                    let (write, submit) = rx_done.recv().map_err(|_| lost("the submitting thread stopped"))??;
                    t.wait_submitter += t_wait.elapsed().as_secs_f64();
                    t.attn_write += write;
                    t.attn_submit += submit;
                }
                Ok(())
            };
            loop {
                let t_recv = std::time::Instant::now();
                let Ok(segment) = rx.recv() else { break };
                t.wait_recorder += t_recv.elapsed().as_secs_f64();
                hot_done(&mut t, &mut hot_pending)?;
                // Submission A: up to the split layer's FFN norm and the copy of (xn, x); or
                // the token's tail.
                let t_submit = std::time::Instant::now();
                this.ctx.queue.submit([segment.commands]);
                // Every copy out of the slots of the layers before the split (or of all, at the
                // tail) is submitted now: they are mapped again in the background, ready for
                // the next token, while this thread would wait for the GPU anyway.
                if slots {
                    let upto = segment.split.as_ref().map_or(if segment.last { layers.len() } else { remapped }, |s| s.layer);
                    layers[remapped..upto].iter().for_each(SparseLayerOps::remap_slots);
                    remapped = remapped.max(upto);
                }
                t.submit += t_submit.elapsed().as_secs_f64();
                let Some(split) = segment.split else {
                    match segment.last {
                        true => break,
                        false => continue,
                    }
                };
                let sp = &layers[split.layer];
                let staging = sp.staging.as_ref().expect("split layers have staging");
                let slice = staging.slice(..);
                let t_submit = std::time::Instant::now();
                let (tx_map, rx_map) = std::sync::mpsc::channel();
                slice.map_async(wgpu::MapMode::Read, move |r| {
                    let _ = tx_map.send(r);
                });
                // Submission B: the hot neurons, added into x on the GPU; after a host
                // attention it waits for the CPU's x and xn.
                let mut hot = split.hot;
                if !sp.host_attention {
                    if let Some(h) = hot.take() {
                        this.ctx.queue.submit([h]);
                    }
                }
                t.submit += t_submit.elapsed().as_secs_f64();
                let t_wait = std::time::Instant::now();
                spin_until_mapped(&this.ctx.device, &rx_map)?;
                t.syncs += 1;
                t.wait_gpu += t_wait.elapsed().as_secs_f64();
                let drawn = split.drawn.as_ref();
                if sp.host_attention {
                    // The attention half on the CPU, then (x, xn) back to the GPU, ordered
                    // before the hot neurons' submission that reads them.
                    let t_attn = std::time::Instant::now();
                    {
                        let view = slice.get_mapped_range().map_err(lost)?;
                        let v: &[f32] = bytemuck::cast_slice(&view);
                        host_x.copy_from_slice(&v[..e]);
                        if sp.qkv_on_gpu {
                            let n = host_qkv.len();
                            host_qkv.copy_from_slice(&v[e..e + n]);
                        }
                    }
                    staging.unmap();
                    t.attn_read += t_attn.elapsed().as_secs_f64();
                    match sp.qkv_on_gpu {
                        true => host.run_from_qkv(cold.team(), &this.model, split.layer, pos0 as usize, host_qkv, host_x, host_xn, *precision)?,
                        false => host.run(cold.team(), &this.model, split.layer, pos0 as usize, host_x, host_xn, *precision)?,
                    }
                    let (x, xn): (&[f32], &[f32]) = (host_x, host_xn);
                    let mut hot = hot.take();
                    // With no cold neurons there is nothing to overlap: as on the main thread.
                    let by_team = hot_submit == HotSubmit::Team && !sp.cold.ids.is_empty();
                    match hot_submit {
                        HotSubmit::Thread => {
                            tx_hot.send((split.layer, x.to_vec(), xn.to_vec(), hot.take())).map_err(|_| lost("the submitting thread stopped"))?;
                            hot_pending = true;
                        }
                        _ if by_team => {}
                        HotSubmit::Main | HotSubmit::Team => {
                            let (write, submit) = upload_and_submit(this, sp, slots, x, xn, hot.take()).map_err(ForwardError::Gpu)?;
                            t.attn_write += write;
                            t.attn_submit += submit;
                        }
                    }
                    t.cpu_attention += t_attn.elapsed().as_secs_f64();
                    if !sp.cold.ids.is_empty() {
                        let t_cpu = std::time::Instant::now();
                        // Team: the first member to reach it, as the first product starts.
                        let outcome = Mutex::new(None);
                        let aside = match by_team {
                            true => {
                                let (outcome, hot) = (&outcome, hot.take());
                                Aside::new(move || *outcome.lock().unwrap() = Some(upload_and_submit(this, sp, slots, x, xn, hot)))
                            }
                            false => Aside::none(),
                        };
                        cold_token(cold, ffn, &this.model, split.layer, x, xn, &sp.cold, drawn, *charged, sim_predictors.as_deref(), *precision, y, &aside);
                        aside.run();
                        drop(aside);
                        t.cpu_ffn += t_cpu.elapsed().as_secs_f64();
                        if let Some(done) = outcome.into_inner().unwrap() {
                            let (write, submit) = done.map_err(ForwardError::Gpu)?;
                            t.attn_write += write;
                            t.attn_submit += submit;
                        }
                        hot_done(&mut t, &mut hot_pending)?;
                        upload_y(this, sp, slots, y)?;
                    }
                    continue;
                }
                let t_cpu = std::time::Instant::now();
                {
                    let view = slice.get_mapped_range().map_err(lost)?;
                    let v: &[f32] = bytemuck::cast_slice(&view);
                    // (The staging may be longer: room for a q/k/v exchange.)
                    let (xn, x) = v[..2 * e].split_at(e);
                    cold_token(cold, ffn, &this.model, split.layer, x, xn, &sp.cold, drawn, *charged, sim_predictors.as_deref(), *precision, y, &Aside::none());
                }
                t.cpu_ffn += t_cpu.elapsed().as_secs_f64();
                let t_submit = std::time::Instant::now();
                staging.unmap();
                // Ordered before the next submission, whose first dispatch adds it into x.
                upload_y(this, sp, slots, y)?;
                t.submit += t_submit.elapsed().as_secs_f64();
            }
            hot_done(&mut t, &mut hot_pending)?;
            drop(tx_hot);
            let (record, draw) = recorder.join().expect("the command recorder thread panicked");
            t.record = record;
            t.simulate = draw;
            Ok(())
        })?;
        *syncs_per_token = t.syncs;
        timing.tokens += 1;
        timing.total += t_token.elapsed().as_secs_f64();
        timing.wait_gpu += t.wait_gpu;
        timing.wait_recorder += t.wait_recorder;
        timing.submit += t.submit;
        timing.cpu_ffn += t.cpu_ffn;
        timing.cpu_attention += t.cpu_attention;
        timing.cpu_predictor += cold.predictor_secs - predictor_secs;
        timing.cpu_attention_core += host.core_secs - core_secs;
        timing.cpu_attention_proj += host.proj_secs - proj_secs;
        timing.cpu_attention_read += t.attn_read;
        timing.attention_write += t.attn_write;
        timing.attention_submit += t.attn_submit;
        timing.wait_submitter += t.wait_submitter;
        timing.record += t.record;
        timing.simulate += t.simulate;
        gpu.n_past += 1;
        Ok(())
    }
}

impl Forward for HybridSession {
    /// Several tokens for the last row's logits in batches ([`Self::prefill`]); otherwise token
    /// by token, each with its own active neurons.
    fn forward(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>, ForwardError> {
        self.gpu.check(tokens)?;
        let nv = self.gpu.model.hp.n_vocab;
        if want == Logits::Last && self.batched(tokens.len()) {
            self.prefill(tokens)?;
            return self.gpu.ctx.read::<f32>(&self.gpu.s.logits_last, nv).map_err(ForwardError::Gpu);
        }
        let mut all = Vec::new();
        for &t in tokens {
            self.run_token(t)?;
            if want == Logits::All {
                all.extend(self.gpu.ctx.read::<f32>(&self.gpu.s.logits_last, nv).map_err(ForwardError::Gpu)?);
            }
        }
        match want {
            Logits::All => Ok(all),
            Logits::Last => self.gpu.ctx.read::<f32>(&self.gpu.s.logits_last, nv).map_err(ForwardError::Gpu),
        }
    }

    fn forward_argmax(&mut self, tokens: &[u32]) -> Result<u32, ForwardError> {
        self.gpu.check(tokens)?;
        if self.batched(tokens.len()) {
            self.prefill(tokens)?;
        } else {
            for &t in tokens {
                self.run_token(t)?;
            }
        }
        let out: Vec<u32> = self.gpu.ctx.read(&self.gpu.s.argmax, 3).map_err(ForwardError::Gpu)?;
        super::gpu_forward::argmax_id([out[0], out[1], out[2]])
    }

    fn n_past(&self) -> usize {
        self.gpu.n_past()
    }

    fn n_ctx(&self) -> usize {
        self.gpu.n_ctx()
    }

    fn reset(&mut self) {
        self.gpu.reset();
    }

    fn model(&self) -> &Arc<Model> {
        self.gpu.model()
    }

    fn backend_name(&self) -> String {
        let hp = &self.gpu.model.hp;
        format!("{} {}", self.gpu.backend_name(), self.state.describe(hp.n_layer * hp.n_ff))
    }

    fn as_hybrid(&mut self) -> Option<&mut HybridSession> {
        Some(self)
    }
}

/// The recorder thread of a hybrid token: records its command buffers in submission order
/// and sends them, one [`Segment`] per split layer and one for the tail; with simulated
/// activity, draws each layer's active set first and writes the GPU's copy of it. Returns the
/// seconds spent recording and drawing. Stops early when the receiver is gone.
fn record_split_token(gpu: &GpuSession, sparse: &[SparseLayerOps], simulate: Option<&Mutex<SimulatedActivity>>, slots: bool, tx: std::sync::mpsc::Sender<Segment>) -> (f64, f64) {
    let t_start = std::time::Instant::now();
    let mut draw_time = 0.0;
    let e = gpu.model.hp.n_embd as u64;
    let mut sim = simulate.map(|m| m.lock().unwrap());
    let mut sim_values = Vec::new();
    let new_encoder = || gpu.ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("hybrid") });
    let mut enc = new_encoder();
    let mut pass = enc.begin_compute_pass(&Default::default()).forget_lifetime();
    gpu.embed.encode(&mut pass, 1);
    let mut layers_recorded = 0;
    for (il, (layer, sp)) in gpu.layers.iter().zip(sparse).enumerate() {
        let mut drawn = None;
        // The slot the simulated logits went through, whose copy the hot neurons' commands
        // begin with (None: queued with write_buffer, or nothing simulated).
        let mut sim_slot = None;
        if let Some(sim) = sim.as_mut() {
            let t = std::time::Instant::now();
            let mut active = Drawn::default();
            sim.draw_predicted(il, &mut active, sp.sim_logits.is_some().then_some(&mut sim_values));
            if let Some(buf) = &sp.sim_logits {
                // Before the segment that reads it is sent, so before its submission: through
                // the slot (copied below, before the hot neurons), else queued.
                let bytes: &[u8] = bytemuck::cast_slice(&sim_values);
                sim_slot = sp.up_sim.as_ref().filter(|slot| slots && slot.write(&gpu.ctx.device, &[bytes]).is_ok());
                if sim_slot.is_none() {
                    gpu.ctx.queue.write_buffer(buf, 0, bytes);
                }
            }
            drawn = Some(active);
            draw_time += t.elapsed().as_secs_f64();
        }
        for (_, op) in layer.attention_sequence(1).into_iter().chain(layer.qkv_sequence()) {
            op.record(&mut pass, 1);
        }
        layers_recorded += 1;
        let Some(staging) = &sp.staging else {
            if let (Some(slot), Some(buf)) = (sim_slot, &sp.sim_logits) {
                drop(pass);
                enc.copy_buffer_to_buffer(slot.buffer(), 0, buf, 0, buf.size());
                pass = enc.begin_compute_pass(&Default::default()).forget_lifetime();
            }
            for (_, op) in sp.gpu_sequence() {
                op.record(&mut pass, 1);
            }
            // Runs of layers without a split go out in pieces, so that the GPU starts on them
            // while the rest is recorded.
            if layers_recorded >= LAYERS_PER_SUBMISSION && il + 1 < gpu.layers.len() {
                drop(pass);
                if tx.send(Segment { commands: enc.finish(), split: None, last: false }).is_err() {
                    return (t_start.elapsed().as_secs_f64(), draw_time);
                }
                layers_recorded = 0;
                enc = new_encoder();
                pass = enc.begin_compute_pass(&Default::default()).forget_lifetime();
            }
            continue;
        };
        drop(pass);
        match sp.host_attention {
            // The CPU runs the attention half from x, and q, k, v where the GPU made them.
            true => {
                enc.copy_buffer_to_buffer(&gpu.s.x, 0, staging, 0, 4 * e);
                if sp.qkv_on_gpu {
                    gpu.copy_qkv_sections(&mut enc, 1, staging, 4 * e);
                }
            }
            false => {
                enc.copy_buffer_to_buffer(&gpu.s.xn, 0, staging, 0, 4 * e);
                enc.copy_buffer_to_buffer(&gpu.s.x, 0, staging, 4 * e, 4 * e);
            }
        }
        // The hot neurons go in a submission of their own, made right after the CPU asks for
        // the mapping: recorded into the attention half's, they put their ~170 µs on the CPU's
        // wait (measured slower on an H200, BENCHMARKS.md, session 7).
        let mut enc_hot = new_encoder();
        if let (Some(slot), Some(buf)) = (sim_slot, &sp.sim_logits) {
            enc_hot.copy_buffer_to_buffer(slot.buffer(), 0, buf, 0, buf.size());
        }
        if let (true, Some(slot)) = (slots, &sp.up_attn) {
            enc_hot.copy_buffer_to_buffer(slot.buffer(), 0, &gpu.s.x, 0, 4 * e);
            enc_hot.copy_buffer_to_buffer(slot.buffer(), 4 * e, &gpu.s.xn, 0, 4 * e);
        }
        {
            let mut p = enc_hot.begin_compute_pass(&Default::default());
            for (_, op) in sp.gpu_sequence() {
                op.record(&mut p, 1);
            }
        }
        let hot = Some(enc_hot.finish());
        let split = SplitPart { layer: il, hot, drawn };
        layers_recorded = 0;
        if tx.send(Segment { commands: enc.finish(), split: Some(split), last: false }).is_err() {
            return (t_start.elapsed().as_secs_f64(), draw_time);
        }
        enc = new_encoder();
        if let (true, Some(slot)) = (slots, &sp.up_y) {
            enc.copy_buffer_to_buffer(slot.buffer(), 0, &sp.y_cpu, 0, 4 * e);
        }
        pass = enc.begin_compute_pass(&Default::default()).forget_lifetime();
        if !sp.cold.ids.is_empty() {
            sp.add_cpu.encode(&mut pass, 1);
        }
    }
    drop(pass);
    if gpu.head.is_some() {
        gpu.copy_last_row(&mut enc, 1);
        let mut p = enc.begin_compute_pass(&Default::default());
        for (_, op) in gpu.output_sequence() {
            op.record(&mut p, 1);
        }
    }
    let _ = tx.send(Segment { commands: enc.finish(), split: None, last: true });
    (t_start.elapsed().as_secs_f64(), draw_time)
}

/// A hybrid token's commands up to one split layer's FFN norm (or up to its end), recorded
/// ahead of time by the recorder thread.
struct Segment {
    commands: wgpu::CommandBuffer,
    /// What follows at a split layer; None for a run of layers without one.
    split: Option<SplitPart>,
    /// The token's tail (its last segment).
    last: bool,
}

/// Prompt tokens per batch of [`HybridSession::new`]: the batch's activation buffers come out of
/// the budget (~0.16 MiB per token for a 7B, ~20 KiB for SmolLM2), so the default is moderate;
/// the CLI passes its own (`--prefill-batch`).
pub const DEFAULT_PREFILL_BATCH: usize = 64;

/// Layers per submission in runs of layers without a split.
const LAYERS_PER_SUBMISSION: usize = 8;

/// What follows a segment at a split layer: the GPU's hot neurons, and the CPU's active set
/// when activity is simulated.
struct SplitPart {
    layer: usize,
    /// Taken when submitted.
    hot: Option<wgpu::CommandBuffer>,
    drawn: Option<Drawn>,
}

/// One token's parts of [`HybridTiming`].
#[derive(Default)]
struct TokenTiming {
    syncs: usize,
    attn_read: f64,
    attn_write: f64,
    attn_submit: f64,
    wait_submitter: f64,
    wait_gpu: f64,
    wait_recorder: f64,
    submit: f64,
    cpu_ffn: f64,
    cpu_attention: f64,
    record: f64,
    simulate: f64,
}

/// Layer `il`'s active cold neurons for one token into `y`, from the residual `x` entering the
/// FFN and its norm `xn`: the predictor's or the ReLU's choice, or the draw of a simulation
/// (`drawn`; with a charged predictor, its candidates and firing flags apart).
#[allow(clippy::too_many_arguments)]
fn cold_token(cold: &mut ColdFfn, ffn: &SparseFfn, model: &Model, il: usize, x: &[f32], xn: &[f32], cold_ids: &ColdRows, drawn: Option<&Drawn>, charged: bool, sim_predictors: Option<&Predictors>, precision: Precision, y: &mut [f32], aside: &Aside) {
    match (drawn, charged) {
        (Some(d), true) => {
            let p = sim_predictors.map(|p| &p.layers[il]);
            cold.token_charged(ffn, model, il, x, xn, cold_ids, &d.candidates, &d.fires, p, precision, y, aside);
        }
        (d, _) => {
            cold.token(ffn, model, il, x, xn, cold_ids, d.map(|d| d.candidates.as_slice()), precision, y, aside);
        }
    }
}

/// A predictor's matrices with the rank padded to a multiple of 32 (the GPU matvec's block):
/// zero rows of fc1 give relu(0) = 0 in the hidden layer, whose zero columns of fc2 add
/// nothing, so the logits are unchanged.
fn pad_rank(fc1: &Matrix, fc2: &Matrix) -> (Matrix, Matrix) {
    let r = fc1.rows;
    let padded = r.next_multiple_of(32);
    if padded == r {
        return (fc1.clone(), fc2.clone());
    }
    let ty = if fc1.ty == GgmlType::F16 && fc2.ty == GgmlType::F16 { GgmlType::F16 } else { GgmlType::F32 };
    let mut w1: Vec<f32> = (0..r).flat_map(|i| fc1.row_f32(i)).collect();
    w1.resize(padded * fc1.cols, 0.0);
    let w2: Vec<f32> = (0..fc2.rows).flat_map(|i| {
        let mut row = fc2.row_f32(i);
        row.resize(padded, 0.0);
        row
    }).collect();
    (Matrix::from_f32(&fc1.name, padded, fc1.cols, &w1, ty), Matrix::from_f32(&fc2.name, fc2.rows, padded, &w2, ty))
}

/// GPU bytes one hot neuron of `layer` costs: its gate, up and `down_t` rows and id in the
/// hot layout, plus its entry in the active list. What placement charges per neuron.
pub fn hot_neuron_bytes(layer: &crate::model::Layer, down_t: GgmlType, n_embd: usize) -> u64 {
    HotFfn::bytes_per_neuron(layer.ffn_gate.ty, layer.ffn_up.ty, down_t, n_embd) + 4
}

/// How the hybrid's CPU half splits its products: four parts per member, taken from a shared
/// counter. Its team runs beside the command recorder and the GPU driver's threads, and with
/// an equal share per member every product waits for whichever member the OS preempted
/// (session 12, call C: host attention alone 11.89 -> 10.10 ms a token, the hybrid's tg
/// 1.04-1.09x).
const HYBRID_CPU_TUNING: CpuTuning = CpuTuning { prefetch: crate::quant::packed::DEFAULT_PREFETCH, parts_per_member: 4, pack: crate::quant::packed::PackOptions { huge_pages: true, release_source: false } };

/// Members of the cold-neuron team for `threads` CPU threads: one core is left to the thread
/// that records command buffers and, from 8 threads on, one to the GPU driver's own threads
/// (measured on a 16-core host: a team of 14 decoded 87 t/s, 15 only 80, 13 80).
fn cold_team_size(threads: usize) -> usize {
    threads.saturating_sub(if threads >= 8 { 2 } else { 1 }).max(1)
}

/// The ids in `0..n` that are not in ascending `ids`.
fn complement(ids: &[u32], n: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(n - ids.len());
    let mut j = 0;
    for i in 0..n as u32 {
        if j < ids.len() && ids[j] == i {
            j += 1;
        } else {
            out.push(i);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparse::placement::Bytes;

    #[test]
    fn an_attempt_over_the_budget_keeps_its_overshoot_and_two_percent_free() {
        let over = HybridError::OverBudget { used: Bytes(1_100), budget: Bytes(1_000) };
        // 100 over, 2% of 1000 = 20, on top of what was already kept free.
        assert_eq!(over.more_reserve(0), Some(120));
        assert_eq!(over.more_reserve(50), Some(170));
        assert_eq!(HybridError::Mode("dense").more_reserve(0), None);
    }
}
