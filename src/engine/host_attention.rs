//! The attention half of a layer on the host, for a GPU session that leaves it there: the
//! hybrid's host-attention layers, whose attention weights and KV cache take no VRAM.
//!
//! A long context's KV cache is what outgrows a small budget first (a 7B-shaped model's f16
//! cache at 4096 positions is 2 GiB), so the placement may leave some layers' attention on
//! the host, chosen together with the hot neurons ([`choose_attention`]). For such a layer
//! the CPU computes RMSNorm, q/k/v, RoPE, the f16 KV write, attention, the output product and
//! its residual add, then the FFN norm, with the kernels and numerics of the CPU [`Session`]
//! (`super::forward::Session`), on the team that computes the cold neurons. It takes a batch
//! of tokens as the CPU session does, so a batched prefill can use it as well as decode.

use super::forward::ForwardError;
use crate::cpu::attention::{attention_decode_team, attention_team, attention_tiled_team, store_row, AttnShape};
use crate::cpu::matmul::{matmuls_tuned, Activations, CpuTuning, Precision};
use crate::cpu::ops::{self, Rope};
use crate::cpu::team::Team;
use crate::cpu::KvCache;
use crate::model::{Model, Matrix};
use crate::sparse::placement::{place_with_attention, AttentionCost, AttnSite, Candidates, ColdReads, FixedPart, Placement, PlacementError, PlacementInput};
use crate::sparse::simulate::PredictorSim;
use crate::gguf::GgmlType;
use super::ffn::FfnMode;

/// The host's share of the attention layers: their KV caches and the scratch of one call.
pub struct HostAttention {
    /// Per model layer: its slot in `kv`, None where its attention runs on the GPU.
    slots: Vec<Option<usize>>,
    kv: KvCache,
    rope: Rope,
    shape: AttnShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    /// A decoded token's attention parts per head and run of keys (`attention_decode_team`).
    decode_parts: Vec<f32>,
    /// Seconds spent in [`run`](Self::run) and [`run_from_qkv`](Self::run_from_qkv) on RoPE,
    /// the KV write and attention over the cache, summed (for the hybrid's timing line).
    pub core_secs: f64,
    /// Seconds spent there on the o product, its residual add and the FFN norm, summed.
    pub proj_secs: f64,
    /// How the team splits the products.
    pub tuning: CpuTuning,
}

impl HostAttention {
    /// Caches for `n_ctx` positions of the layers whose `on_host` entry is true.
    pub fn new(model: &Model, on_host: &[bool], n_ctx: usize) -> HostAttention {
        let hp = &model.hp;
        let slots: Vec<Option<usize>> = on_host.iter().scan(0, |n, &h| Some(h.then(|| {
            *n += 1;
            *n - 1
        }))).collect();
        let n_host = slots.iter().flatten().count();
        HostAttention {
            slots,
            kv: KvCache::new(n_host, n_ctx, hp.kv_dim()),
            rope: Rope::new(hp.rope_dim, hp.rope_base, hp.rope_freq_scale, hp.rope_style),
            shape: AttnShape { n_head: hp.n_head, n_head_kv: hp.n_head_kv, head_dim: hp.head_dim },
            q: Vec::new(),
            k: Vec::new(),
            v: Vec::new(),
            attn: Vec::new(),
            proj: Vec::new(),
            decode_parts: Vec::new(),
            core_secs: 0.0,
            proj_secs: 0.0,
            tuning: CpuTuning::default(),
        }
    }

    /// The same with products split as `tuning` says.
    pub fn with_tuning(mut self, tuning: CpuTuning) -> HostAttention {
        self.tuning = tuning;
        self
    }

    /// Whether layer `il`'s attention runs here.
    pub fn on_host(&self, il: usize) -> bool {
        self.slots.get(il).is_some_and(Option::is_some)
    }

    /// How many layers' attention run here.
    pub fn n_layers(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    /// Host bytes of the KV caches.
    pub fn cache_bytes(&self) -> u64 {
        KvCache::bytes(self.n_layers(), self.kv.n_ctx, self.kv.kv_dim)
    }

    /// Layer `il`'s attention half for the `n` tokens at positions `pos0..pos0 + n`: `x` holds
    /// their residual stream entering the layer (n rows of n_embd) and leaves holding it after
    /// the attention block (x + Wo · attention); `xn` (n rows) receives the FFN norm of that.
    /// The numbers are those of the CPU [`Session`](super::forward::Session) at the same
    /// precision. Fails when the positions leave the cache or the layer is not on the host.
    #[allow(clippy::too_many_arguments)]
    pub fn run(&mut self, team: &mut Team, model: &Model, il: usize, pos0: usize, x: &mut [f32], xn: &mut [f32], precision: Precision) -> Result<(), ForwardError> {
        let hp = &model.hp;
        let (e, qd, kvd) = (hp.n_embd, hp.q_dim(), hp.kv_dim());
        let n = x.len() / e;
        let Some(slot) = self.slots.get(il).copied().flatten() else {
            return Err(ForwardError::Gpu(crate::gpu::GpuError::Unsupported(format!("layer {il}'s attention is not on the host"))));
        };
        if n == 0 || x.len() != n * e || xn.len() != n * e {
            return Err(ForwardError::Empty);
        }
        if pos0 + n > self.kv.n_ctx {
            return Err(ForwardError::ContextFull { needed: pos0 + n, n_ctx: self.kv.n_ctx, n_ctx_train: hp.n_ctx_train });
        }
        let layer = &model.layers[il];
        self.q.resize(n * qd, 0.0);
        self.k.resize(n * kvd, 0.0);
        self.v.resize(n * kvd, 0.0);
        // The CPU session's recipe (`Session::run_layers`), step for step.
        ops::rms_norm(x, &layer.attn_norm, hp.rms_eps, xn);
        let acts = Activations::new(xn, n).with_precision(precision);
        matmuls_tuned(team, &self.tuning, &acts, [(&layer.wq, &mut self.q[..]), (&layer.wk, &mut self.k[..]), (&layer.wv, &mut self.v[..])]);
        self.timed_core(team, model, il, slot, pos0, n, false);
        self.project(team, model, il, x, xn, precision);
        Ok(())
    }

    /// [`run`](Self::run) for a layer whose q/k/v product ran on the GPU ([`AttnSite::Qkv`]):
    /// `qkv` holds the `n` tokens' rows of q | k | v (before biases and RoPE), `x` their
    /// residual stream entering the layer; the rest as `run` (KV write, attention, o, the
    /// residual add, the FFN norm into `xn`), with the CPU session's attention kernel for one
    /// token and the tiled one for several.
    #[allow(clippy::too_many_arguments)]
    pub fn run_from_qkv(&mut self, team: &mut Team, model: &Model, il: usize, pos0: usize, qkv: &[f32], x: &mut [f32], xn: &mut [f32], precision: Precision) -> Result<(), ForwardError> {
        let hp = &model.hp;
        let e = hp.n_embd;
        let n = x.len() / e;
        if n == 0 || x.len() != n * e || xn.len() != n * e || qkv.len() != n * (hp.q_dim() + 2 * hp.kv_dim()) {
            return Err(ForwardError::Empty);
        }
        self.split_qkv(model, il, pos0, qkv)?;
        let slot = self.slots[il].expect("checked by split_qkv");
        self.timed_core(team, model, il, slot, pos0, n, n > 1);
        self.project(team, model, il, x, xn, precision);
        Ok(())
    }

    /// [`core`](Self::core), its time added to `core_secs`.
    #[allow(clippy::too_many_arguments)]
    fn timed_core(&mut self, team: &mut Team, model: &Model, il: usize, slot: usize, pos0: usize, n: usize, tiled: bool) {
        let t = std::time::Instant::now();
        self.core(team, model, il, slot, pos0, n, tiled);
        self.core_secs += t.elapsed().as_secs_f64();
    }

    /// The end of the attention block after a core: x += Wo · attention, then the FFN norm of
    /// x into xn (the rows of x), its time added to `proj_secs`.
    fn project(&mut self, team: &mut Team, model: &Model, il: usize, x: &mut [f32], xn: &mut [f32], precision: Precision) {
        let t = std::time::Instant::now();
        let (layer, hp) = (&model.layers[il], &model.hp);
        let n = x.len() / hp.n_embd;
        self.proj.resize(x.len(), 0.0);
        let HostAttention { attn, proj, tuning, .. } = self;
        matmuls_tuned(team, tuning, &Activations::new(&attn[..n * hp.q_dim()], n).with_precision(precision), [(&layer.wo, &mut proj[..])]);
        ops::add_assign(x, proj);
        ops::rms_norm(x, &layer.ffn_norm, hp.rms_eps, xn);
        self.proj_secs += t.elapsed().as_secs_f64();
    }

    /// Checks a q | k | v batch for layer `il` at `pos0` and copies it into q, k and v.
    fn split_qkv(&mut self, model: &Model, il: usize, pos0: usize, qkv: &[f32]) -> Result<usize, ForwardError> {
        let hp = &model.hp;
        let (qd, kvd) = (hp.q_dim(), hp.kv_dim());
        let w = qd + 2 * kvd;
        let n = qkv.len() / w;
        if self.slots.get(il).copied().flatten().is_none() {
            return Err(ForwardError::Gpu(crate::gpu::GpuError::Unsupported(format!("layer {il}'s attention is not on the host"))));
        }
        if n == 0 || qkv.len() != n * w {
            return Err(ForwardError::Empty);
        }
        if pos0 + n > self.kv.n_ctx {
            return Err(ForwardError::ContextFull { needed: pos0 + n, n_ctx: self.kv.n_ctx, n_ctx_train: hp.n_ctx_train });
        }
        self.q.resize(n * qd, 0.0);
        self.k.resize(n * kvd, 0.0);
        self.v.resize(n * kvd, 0.0);
        for (t, row) in qkv.chunks_exact(w).enumerate() {
            self.q[t * qd..(t + 1) * qd].copy_from_slice(&row[..qd]);
            self.k[t * kvd..(t + 1) * kvd].copy_from_slice(&row[qd..qd + kvd]);
            self.v[t * kvd..(t + 1) * kvd].copy_from_slice(&row[qd + kvd..]);
        }
        Ok(n)
    }

    /// The middle of [`run`](Self::run) for q, k and v computed elsewhere (a streamed
    /// prefill's GPU products, before biases and RoPE): `qkv` holds the `n` tokens' rows of
    /// q | k | v (q_dim + 2 kv_dim values each) at positions `pos0..pos0 + n`. Adds the biases,
    /// applies RoPE, writes the KV cache and runs attention; returns its output, n rows of
    /// q_dim (the o product's input). The KV cache ends as [`run`](Self::run) leaves it (up to
    /// the products' rounding), so decode afterwards reads the same. Attention runs in f32 by
    /// tiles ([`attention_tiled_team`]): the products came from the GPU, so llama.cpp's
    /// rounding is not at stake, and the tiles make a 512-token prompt's attention several
    /// times faster.
    pub fn run_core(&mut self, team: &mut Team, model: &Model, il: usize, pos0: usize, qkv: &[f32]) -> Result<&[f32], ForwardError> {
        let n = self.split_qkv(model, il, pos0, qkv)?;
        let slot = self.slots[il].expect("checked by split_qkv");
        self.core(team, model, il, slot, pos0, n, true);
        Ok(&self.attn[..n * model.hp.q_dim()])
    }

    /// Layer `il`'s keys and values of `k.len() / kv_dim` tokens from `pos0` on, in f16 as
    /// the cache holds them (RoPE applied): what a batch whose attention ran elsewhere leaves.
    pub fn store_kv(&mut self, model: &Model, il: usize, pos0: usize, k: &[half::f16], v: &[half::f16]) -> Result<(), ForwardError> {
        let kvd = self.kv.kv_dim;
        let Some(slot) = self.slots.get(il).copied().flatten() else {
            return Err(ForwardError::Gpu(crate::gpu::GpuError::Unsupported(format!("layer {il}'s attention is not on the host"))));
        };
        let n = k.len() / kvd;
        if k.len() != n * kvd || v.len() != k.len() || n == 0 {
            return Err(ForwardError::Empty);
        }
        if pos0 + n > self.kv.n_ctx {
            return Err(ForwardError::ContextFull { needed: pos0 + n, n_ctx: self.kv.n_ctx, n_ctx_train: model.hp.n_ctx_train });
        }
        let (kc, vc) = self.kv.rows_mut(slot, pos0, n);
        kc.copy_from_slice(k);
        vc.copy_from_slice(v);
        Ok(())
    }

    /// From q, k and v of `n` tokens (before biases and RoPE) to the attention's output in
    /// `attn`: biases, RoPE, the KV write at `pos0..`, attention (`tiled`: in f32 by tiles,
    /// else the CPU session's kernel and rounding).
    #[allow(clippy::too_many_arguments)]
    fn core(&mut self, team: &mut Team, model: &Model, il: usize, slot: usize, pos0: usize, n: usize, tiled: bool) {
        let hp = &model.hp;
        let (qd, kvd) = (hp.q_dim(), hp.kv_dim());
        let layer = &model.layers[il];
        let HostAttention { kv, rope, shape, q, k, v, attn, decode_parts, .. } = self;
        attn.resize(n * qd, 0.0);
        for (buf, bias, d) in [(&mut *q, &layer.bq, qd), (&mut *k, &layer.bk, kvd), (&mut *v, &layer.bv, kvd)] {
            if let Some(b) = bias {
                buf.chunks_exact_mut(d).for_each(|row| ops::add_assign(row, b));
            }
        }
        // qwen3: every head of q and k normalised on its own, before RoPE.
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            ops::rms_norm_in_place(&mut q[..n * qd], qn, hp.rms_eps);
            ops::rms_norm_in_place(&mut k[..n * kvd], kn, hp.rms_eps);
        }
        // RoPE and the f16 KV write, per token: split among the team for a batch (a 512-token
        // batch's took longer than its attention when serial), each token's the same.
        let hd = hp.head_dim;
        let (kc, vc) = kv.rows_mut(slot, pos0, n);
        let parts = if n >= 16 { team.size() } else { 1 };
        let per = n.div_ceil(parts);
        let jobs: Vec<std::sync::Mutex<_>> = q[..n * qd]
            .chunks_mut(per * qd)
            .zip(k[..n * kvd].chunks_mut(per * kvd))
            .zip(v[..n * kvd].chunks(per * kvd))
            .zip(kc.chunks_mut(per * kvd).zip(vc.chunks_mut(per * kvd)))
            .enumerate()
            .map(|(c, (((q, k), v), (kc, vc)))| std::sync::Mutex::new((pos0 + c * per, q, k, v, kc, vc)))
            .collect();
        let rope = &*rope;
        let job = |part: usize| {
            let Some(j) = jobs.get(part) else { return };
            let mut guard = j.lock().unwrap_or_else(|e| e.into_inner());
            let (p0, q, k, v, kc, vc) = &mut *guard;
            for (t, (((q, k), v), (kc, vc))) in q.chunks_mut(qd).zip(k.chunks_mut(kvd)).zip(v.chunks(kvd)).zip(kc.chunks_mut(kvd).zip(vc.chunks_mut(kvd))).enumerate() {
                let angles = rope.angles(*p0 + t);
                rope.apply(q, hd, &angles);
                rope.apply(k, hd, &angles);
                store_row(kc, vc, k, v);
            }
        };
        match parts {
            1 => job(0),
            _ => team.run(&|member, _| job(member)),
        }
        let (kc, vc) = kv.layer(slot);
        match (tiled, n) {
            (true, _) => attention_tiled_team(team, q, kc, vc, pos0, n, *shape, attn),
            // One token: split over keys as well as heads, in f32 (the GPU's attention layers
            // are f32 too).
            (false, 1) => attention_decode_team(team, &q[..qd], kc, vc, pos0, *shape, decode_parts, &mut attn[..qd]),
            (false, _) => attention_team(team, q, kc, vc, pos0, n, *shape, attn),
        }
    }
}

/// GPU bytes of a matrix in the GPU's layouts, an upper bound (the layouts add scales'
/// alignment and the allocator rounds: 3% and a page cover both).
fn gpu_matrix_bound(m: &Matrix) -> u64 {
    m.n_bytes() as u64 * 103 / 100 + 4096
}

/// Per layer: what its attention block costs on the GPU, as two parts (upper bounds): the
/// q/k/v weights with the attention norm, and the rest (o weights, the FFN norm, the f16 KV
/// cache for `n_ctx` positions and the attention ops' small buffers), with the share of the
/// rest the host reads per token when it runs there instead: o whole, and the cache up to
/// `kv_depth`, the positions a decode token attends over on average (half the context for a
/// chat or server that fills it; a known prompt and length for `run` and `bench`).
pub fn attention_costs(model: &Model, n_ctx: usize, kv_depth: usize) -> Vec<AttentionCost> {
    let hp = &model.hp;
    let kv = hp.kv_bytes_per_layer(n_ctx);
    model
        .layers
        .iter()
        .map(|l| {
            let qkv = [&l.wq, &l.wk, &l.wv].iter().map(|m| gpu_matrix_bound(m)).sum::<u64>() + 4 * hp.n_embd as u64;
            let wo = gpu_matrix_bound(&l.wo) + 4 * hp.n_embd as u64;
            // The attention's split-sequence partial sums and the ops' uniforms.
            let buffers = 64 * 1024;
            // And the allocator's waste on them (an H100 showed 5.5% on the hot neurons'
            // buffers, lavapipe a fifth): an estimate too low would leave the measured fixed
            // part over the budget, one too high only moves that room to hot neurons.
            let rest_bytes = (wo + kv + buffers) * 110 / 100;
            let read = l.wo.n_bytes() as f64 + kv as f64 * (kv_depth as f64 / n_ctx.max(1) as f64).min(1.0);
            AttentionCost { qkv_bytes: qkv * 110 / 100, rest_bytes, rest_read_share: (read / rest_bytes.max(1) as f64).min(1.0) }
        })
        .collect()
}

/// The GPU parts that do not depend on the placement, estimated from the model alone (what
/// `ember plan` shows and what the hybrid decides its host-attention layers by, before it
/// uploads anything): embeddings and output, activation and per-layer sparse buffers,
/// `predictor_bytes`, and `margin` for what the allocator holds beyond ember's buffers.
pub fn estimated_fixed(model: &Model, predictor_bytes: u64, margin: u64) -> Vec<FixedPart> {
    let hp = &model.hp;
    let mut head = gpu_matrix_bound(&model.token_embd) + 4 * hp.n_embd as u64;
    if !model.tied_embeddings {
        head += gpu_matrix_bound(&model.output);
    }
    vec![
        FixedPart { name: "embeddings, output".into(), bytes: head },
        FixedPart { name: "predictors".into(), bytes: predictor_bytes },
        // Activations and per-layer sparse buffers (the AXPY's partial sums dominate).
        FixedPart { name: "activations and sparse buffers".into(), bytes: hp.n_layer as u64 * (64 * 4 * hp.n_embd as u64 + 4096) + 16 * hp.n_ff as u64 + 4 * hp.n_vocab as u64 },
        FixedPart { name: "allocator blocks, upload staging".into(), bytes: margin },
    ]
}

/// Where each layer's attention goes under `budget` ([`AttnSite`]), ranked together with
/// the neurons (`place_with_attention`), from estimates alone: `ember plan --host-attention`
/// and the hybrid session call this with the same arguments and so agree. `counts` are the
/// neurons' firings over `profile_tokens` tokens, read on the host as `reads` says,
/// `neuron_bytes` a hot neuron's GPU bytes per layer; `kv_depth` as [`attention_costs`]. The
/// neurons of the returned placement are an estimate too: the session places them again in
/// what is left once its uploads are measured.
#[allow(clippy::too_many_arguments)]
pub fn choose_attention(model: &Model, n_ctx: usize, kv_depth: usize, budget: u64, counts: &[Vec<u32>], profile_tokens: u64, reads: ColdReads, neuron_bytes: Vec<u64>, predictor_bytes: u64, margin: u64) -> Result<(Placement, Vec<AttnSite>), PlacementError> {
    let input = PlacementInput { fixed: estimated_fixed(model, predictor_bytes, margin), neuron_bytes, counts: counts.to_vec(), tokens: profile_tokens, reads };
    place_with_attention(&input, &attention_costs(model, n_ctx, kv_depth), budget, model.hp.n_ff)
}

/// The depth a placement values KV caches at (`AttentionPlace::Placed`): `asked` (default half
/// of `n_ctx`) rounded to the nearest sixteenth of the context, at least one. `ember run`
/// asks for its own prompt's depth, so without the rounding every prompt length would make
/// (and cache) a placement of its own; a sixteenth changes a cache's value by little.
pub fn kv_depth_for(asked: Option<usize>, n_ctx: usize) -> usize {
    let step = (n_ctx / 16).max(1);
    let d = asked.unwrap_or(n_ctx / 2).min(n_ctx);
    ((d + step / 2) / step * step).clamp(1.min(n_ctx), n_ctx.max(1))
}

/// What the host reads of a cold neuron in a hybrid of `mode` (the placement ranks neurons by
/// it): `--ffn relu` reads every cold neuron's gate row and the firing ones' up and down
/// rows; `--ffn predict` the gate rows of the predictor's candidates, at the recall and
/// precision of `simulated` (a simulated predictor; None: ember's trained predictors'); a
/// perfect simulated predictor only the firing neurons' rows. `down_t`: the type of the
/// transposed down rows the host reads.
pub fn cold_reads(model: &Model, down_t: GgmlType, mode: FfnMode, simulated: Option<(f64, f64)>, perfect: bool) -> ColdReads {
    let Some(l) = model.layers.first() else { return ColdReads::WhenFiring };
    let cols = l.ffn_up.cols as u64;
    let (g, u) = (l.ffn_gate.row_bytes() as f64, l.ffn_up.row_bytes() as f64);
    let d = down_t.bytes_for(cols).unwrap_or(l.ffn_up.row_bytes() as u64) as f64;
    let gate_share = g / (g + u + d).max(1.0);
    match (mode, simulated, perfect) {
        (FfnMode::Relu, ..) => ColdReads::GateOfCandidates { gate_share, candidates: Candidates::All },
        (FfnMode::Predict, _, true) => ColdReads::WhenFiring,
        (FfnMode::Predict, Some((recall, precision)), false) => ColdReads::GateOfCandidates { gate_share, candidates: Candidates::Predicted { recall, precision } },
        (FfnMode::Predict, None, false) => ColdReads::GateOfCandidates {
            gate_share,
            candidates: Candidates::Predicted { recall: PredictorSim::DEFAULT_RECALL, precision: PredictorSim::DEFAULT_PRECISION },
        },
        (FfnMode::Dense | FfnMode::Threshold, ..) => ColdReads::WhenFiring,
    }
}

#[cfg(test)]
mod tests {
    use super::kv_depth_for;

    #[test]
    fn kv_depths_round_to_a_sixteenth_of_the_context() {
        // 4096 positions: sixteenths of 256.
        assert_eq!(kv_depth_for(None, 4096), 2048);
        assert_eq!(kv_depth_for(Some(544), 4096), 512);
        assert_eq!(kv_depth_for(Some(640), 4096), 768);
        assert_eq!(kv_depth_for(Some(10), 4096), 1);
        assert_eq!(kv_depth_for(Some(9999), 4096), 4096);
        // Contexts below 16 positions: every depth its own.
        assert_eq!(kv_depth_for(Some(5), 8), 5);
        assert_eq!(kv_depth_for(None, 1), 1);
    }
}
