//! The whole forward pass on the GPU: weights uploaded once, the KV cache on the GPU, one token's
//! forward encoded into one command buffer with bind groups built once per model, and nothing
//! read back but the sampled token (or the logits when the sampler needs them).

use super::forward::{Forward, ForwardError, Logits};
use crate::gpu::matrix::{GpuMatrix, MatmulOp};
use crate::gpu::ops::{AddOp, ArgmaxOp, BiasOp, AttentionOp, GatedActOp, GpuKvCache, RmsNormOp, RopeKvOp, RopeShape};
use crate::gpu::{GpuContext, GpuError, Step};
use crate::model::{Model, RopeStyle};
use std::sync::Arc;

/// One decode token's per-dispatch GPU times (name, ns) and its one-pass host time (ns).
pub type Profile = (Vec<(&'static str, f64)>, f64);

/// A model's weights on the GPU.
pub struct GpuWeights {
    pub token_embd: Arc<GpuMatrix>,
    /// The output norm and projection; None when a dense layer offload leaves them to the CPU.
    pub head: Option<(wgpu::Buffer, Arc<GpuMatrix>)>,
    /// The first `layers.len()` layers of the model (all of them unless offloading).
    pub layers: Vec<GpuLayerWeights>,
    /// Bytes of GPU memory the weights take.
    pub bytes: u64,
}

pub struct GpuLayerWeights {
    attn_norm: wgpu::Buffer,
    wq: GpuMatrix,
    wk: GpuMatrix,
    wv: GpuMatrix,
    wo: GpuMatrix,
    biases: Option<[wgpu::Buffer; 3]>,
    ffn_norm: wgpu::Buffer,
    gate: GpuMatrix,
    up: GpuMatrix,
    down: GpuMatrix,
}

fn f32_buffer(ctx: &GpuContext, label: &str, v: &[f32]) -> wgpu::Buffer {
    ctx.upload(label, bytemuck::cast_slice(v))
}

impl GpuWeights {
    /// GPU bytes of the matrices a profile entry named `name` reads, summed over layers.
    pub fn matmul_bytes(&self, name: &str) -> u64 {
        let per_layer = |f: fn(&GpuLayerWeights) -> &GpuMatrix| self.layers.iter().map(|l| f(l).gpu_bytes()).sum::<u64>();
        match name {
            "matmul q" => per_layer(|l| &l.wq),
            "matmul k" => per_layer(|l| &l.wk),
            "matmul v" => per_layer(|l| &l.wv),
            "matmul o" => per_layer(|l| &l.wo),
            "matmul gate" => per_layer(|l| &l.gate),
            "matmul up" => per_layer(|l| &l.up),
            "matmul down" => per_layer(|l| &l.down),
            "matmul output" => self.head.as_ref().map_or(0, |h| h.1.gpu_bytes()),
            _ => 0,
        }
    }

    /// Uploads every weight, with a progress bar on stderr.
    pub fn upload(ctx: &GpuContext, model: &Model, progress: bool) -> Result<GpuWeights, GpuError> {
        Self::upload_layers(ctx, model, model.layers.len(), progress)
    }

    /// Uploads the embedding and the first `n_layers` layers, and the output head when that
    /// is every layer: llama.cpp's `-ngl` dense offload.
    pub fn upload_layers(ctx: &GpuContext, model: &Model, n_layers: usize, progress: bool) -> Result<GpuWeights, GpuError> {
        let n_layers = n_layers.min(model.layers.len());
        let with_head = n_layers == model.layers.len();
        let bar = if progress { indicatif::ProgressBar::new(n_layers as u64 + 1) } else { indicatif::ProgressBar::hidden() };
        bar.set_style(indicatif::ProgressStyle::with_template("ember: uploading weights {bar:30} {pos}/{len} layers").unwrap());
        let token_embd = Arc::new(GpuMatrix::upload(ctx, &model.token_embd)?);
        let mut bytes = token_embd.gpu_bytes();
        let head = if with_head {
            let output = if model.tied_embeddings { token_embd.clone() } else { Arc::new(GpuMatrix::upload(ctx, &model.output)?) };
            bytes += if model.tied_embeddings { 0 } else { output.gpu_bytes() } + 4 * model.output_norm.len() as u64;
            Some((f32_buffer(ctx, "output_norm", &model.output_norm), output))
        } else {
            None
        };
        bar.inc(1);
        let mut layers = Vec::with_capacity(n_layers);
        for (i, l) in model.layers.iter().enumerate().take(n_layers) {
            let biases = match (&l.bq, &l.bk, &l.bv) {
                (Some(q), Some(k), Some(v)) => Some([f32_buffer(ctx, "bq", q), f32_buffer(ctx, "bk", k), f32_buffer(ctx, "bv", v)]),
                _ => None,
            };
            let lw = GpuLayerWeights {
                attn_norm: f32_buffer(ctx, &format!("blk.{i}.attn_norm"), &l.attn_norm),
                wq: GpuMatrix::upload(ctx, &l.wq)?,
                wk: GpuMatrix::upload(ctx, &l.wk)?,
                wv: GpuMatrix::upload(ctx, &l.wv)?,
                wo: GpuMatrix::upload(ctx, &l.wo)?,
                biases,
                ffn_norm: f32_buffer(ctx, &format!("blk.{i}.ffn_norm"), &l.ffn_norm),
                gate: GpuMatrix::upload(ctx, &l.ffn_gate)?,
                up: GpuMatrix::upload(ctx, &l.ffn_up)?,
                down: GpuMatrix::upload(ctx, &l.ffn_down)?,
            };
            bytes += [&lw.wq, &lw.wk, &lw.wv, &lw.wo, &lw.gate, &lw.up, &lw.down].iter().map(|m| m.gpu_bytes()).sum::<u64>();
            bytes += 4 * (l.attn_norm.len() + l.ffn_norm.len()) as u64;
            layers.push(lw);
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(GpuWeights { token_embd, head, layers, bytes })
    }
}

/// Anything that records its dispatches into a compute pass.
trait Op {
    fn record(&self, pass: &mut wgpu::ComputePass<'_>, n_tokens: u32);
}

macro_rules! impl_op {
    ($($t:ty),*) => {$(
        impl Op for $t {
            fn record(&self, pass: &mut wgpu::ComputePass<'_>, n_tokens: u32) {
                self.encode(pass, n_tokens)
            }
        }
    )*};
}
impl_op!(RmsNormOp, MatmulOp, BiasOp, RopeKvOp, AttentionOp, AddOp, GatedActOp, ArgmaxOp, crate::gpu::matrix::GetRowsOp);

struct LayerOps {
    attn_norm: RmsNormOp,
    q: MatmulOp,
    k: MatmulOp,
    v: MatmulOp,
    biases: Option<[BiasOp; 3]>,
    rope_kv: RopeKvOp,
    attention: AttentionOp,
    o: MatmulOp,
    add_attn: AddOp,
    ffn_norm: RmsNormOp,
    gate: MatmulOp,
    up: MatmulOp,
    act: GatedActOp,
    down: MatmulOp,
    add_ffn: AddOp,
}

impl LayerOps {
    /// The layer's dispatches in order, each with a name for profiles.
    fn sequence(&self) -> Vec<(&'static str, &dyn Op)> {
        let mut v: Vec<(&'static str, &dyn Op)> = vec![("attn_norm", &self.attn_norm), ("matmul q", &self.q), ("matmul k", &self.k), ("matmul v", &self.v)];
        if let Some(b) = &self.biases {
            v.extend(b.iter().map(|op| ("bias", op as &dyn Op)));
        }
        v.extend([
            ("rope_kv", &self.rope_kv as &dyn Op),
            ("attention", &self.attention),
            ("matmul o", &self.o),
            ("add", &self.add_attn),
            ("ffn_norm", &self.ffn_norm),
            ("matmul gate", &self.gate),
            ("matmul up", &self.up),
            ("gated_act", &self.act),
            ("matmul down", &self.down),
            ("add", &self.add_ffn),
        ]);
        v
    }
}

/// Activation buffers sized for `max_tokens` tokens.
struct Scratch {
    ids: wgpu::Buffer,
    x: wgpu::Buffer,
    xn: wgpu::Buffer,
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    attn: wgpu::Buffer,
    proj: wgpu::Buffer,
    gate: wgpu::Buffer,
    up: wgpu::Buffer,
    x_last: wgpu::Buffer,
    xn_last: wgpu::Buffer,
    logits_last: wgpu::Buffer,
    logits_all: wgpu::Buffer,
    argmax: wgpu::Buffer,
    step: wgpu::Buffer,
    step_last: wgpu::Buffer,
}

/// The output head: final norm and logits of the last row (and argmax), or of every row.
struct HeadOps {
    final_norm_last: RmsNormOp,
    output_last: MatmulOp,
    final_norm_all: RmsNormOp,
    output_all: MatmulOp,
    argmax: ArgmaxOp,
}

/// A model on the GPU plus one sequence's state.
pub struct GpuSession {
    pub model: Arc<Model>,
    pub ctx: Arc<GpuContext>,
    pub weights: Arc<GpuWeights>,
    kv: GpuKvCache,
    s: Scratch,
    embed: crate::gpu::matrix::GetRowsOp,
    layers: Vec<LayerOps>,
    /// Final norm, logits and argmax; None when the CPU computes them (dense layer offload).
    head: Option<HeadOps>,
    n_ctx: usize,
    /// Most tokens one forward call takes (larger batches are split).
    max_tokens: usize,
    n_past: usize,
}

impl GpuSession {
    pub fn new(model: Arc<Model>, ctx: Arc<GpuContext>, weights: Arc<GpuWeights>, n_ctx: usize) -> Result<GpuSession, GpuError> {
        Self::with_batch(model, ctx, weights, n_ctx, 512)
    }

    /// A session whose forward calls take at most `max_batch` tokens at once (longer inputs
    /// are split): the activation buffers, the all-logits one above all, scale with it.
    pub fn with_batch(model: Arc<Model>, ctx: Arc<GpuContext>, weights: Arc<GpuWeights>, n_ctx: usize, max_batch: usize) -> Result<GpuSession, GpuError> {
        let hp = &model.hp;
        let (e, qd, kvd, ff) = (hp.n_embd as u64, hp.q_dim() as u64, hp.kv_dim() as u64, hp.n_ff as u64);
        let with_head = weights.head.is_some();
        // Without the head there are no logits to hold.
        let nv = if with_head { hp.n_vocab as u64 } else { 1 };
        // The all-logits buffer bounds the batch: it must fit in one binding.
        let max_tokens = (ctx.max_binding() / (4 * nv)).clamp(1, max_batch.max(1) as u64) as usize;
        let mt = max_tokens as u64;
        let f = |label: &str, n: u64| ctx.zeros(label, 4 * n);
        let s = Scratch {
            ids: f("ids", mt),
            x: f("x", mt * e),
            xn: f("xn", mt * e),
            q: f("q", mt * qd),
            k: f("k", mt * kvd),
            v: f("v", mt * kvd),
            attn: f("attn", mt * qd),
            proj: f("proj", mt * e),
            gate: f("gate", mt * ff),
            up: f("up", mt * ff),
            x_last: f("x_last", e),
            xn_last: f("xn_last", e),
            logits_last: f("logits_last", nv),
            logits_all: f("logits_all", mt * nv),
            argmax: f("argmax", 2),
            step: ctx.uniform("step", bytemuck::bytes_of(&Step::default())),
            step_last: ctx.uniform("step_last", bytemuck::bytes_of(&Step::default())),
        };
        let kv = GpuKvCache::new(&ctx, weights.layers.len(), n_ctx, hp.kv_dim())?;
        let rope = RopeShape {
            n_head: hp.n_head as u32,
            n_head_kv: hp.n_head_kv as u32,
            head_dim: hp.head_dim as u32,
            rope_dim: hp.rope_dim as u32,
            base: hp.rope_base,
            freq_scale: hp.rope_freq_scale,
            neox: hp.rope_style == RopeStyle::Halves,
        };
        let attn_shape = crate::gpu::ops::AttnShape { n_head: hp.n_head as u32, n_head_kv: hp.n_head_kv as u32, head_dim: hp.head_dim as u32 };
        let relu = hp.activation == crate::model::Activation::Relu;
        let mut layers = Vec::with_capacity(hp.n_layer);
        for (il, w) in weights.layers.iter().enumerate() {
            layers.push(LayerOps {
                attn_norm: RmsNormOp::new(&ctx, &s.x, &w.attn_norm, &s.xn, e as u32, hp.rms_eps, &s.step),
                q: w.wq.bind_matmul(&ctx, &s.xn, &s.q, &s.step),
                k: w.wk.bind_matmul(&ctx, &s.xn, &s.k, &s.step),
                v: w.wv.bind_matmul(&ctx, &s.xn, &s.v, &s.step),
                biases: w.biases.as_ref().map(|[bq, bk, bv]| {
                    [BiasOp::new(&ctx, &s.q, bq, qd as u32, &s.step), BiasOp::new(&ctx, &s.k, bk, kvd as u32, &s.step), BiasOp::new(&ctx, &s.v, bv, kvd as u32, &s.step)]
                }),
                rope_kv: RopeKvOp::new(&ctx, &s.q, &s.k, &s.v, kv.k(il), kv.v(il), rope, &s.step),
                attention: AttentionOp::new(&ctx, &s.q, kv.k(il), kv.v(il), &s.attn, attn_shape, n_ctx as u32, max_tokens as u32, &s.step)?,
                o: w.wo.bind_matmul(&ctx, &s.attn, &s.proj, &s.step),
                add_attn: AddOp::new(&ctx, &s.x, &s.proj, e as u32, &s.step),
                ffn_norm: RmsNormOp::new(&ctx, &s.x, &w.ffn_norm, &s.xn, e as u32, hp.rms_eps, &s.step),
                gate: w.gate.bind_matmul(&ctx, &s.xn, &s.gate, &s.step),
                up: w.up.bind_matmul(&ctx, &s.xn, &s.up, &s.step),
                act: GatedActOp::new(&ctx, &s.gate, &s.up, ff as u32, relu, &s.step),
                down: w.down.bind_matmul(&ctx, &s.gate, &s.proj, &s.step),
                add_ffn: AddOp::new(&ctx, &s.x, &s.proj, e as u32, &s.step),
            });
        }
        let embed = weights.token_embd.bind_get_rows(&ctx, &s.ids, &s.x, &s.step);
        let head = weights.head.as_ref().map(|(output_norm, output)| HeadOps {
            final_norm_last: RmsNormOp::new(&ctx, &s.x_last, output_norm, &s.xn_last, e as u32, hp.rms_eps, &s.step_last),
            output_last: output.bind_matmul(&ctx, &s.xn_last, &s.logits_last, &s.step_last),
            final_norm_all: RmsNormOp::new(&ctx, &s.x, output_norm, &s.xn, e as u32, hp.rms_eps, &s.step),
            output_all: output.bind_matmul(&ctx, &s.xn, &s.logits_all, &s.step),
            argmax: ArgmaxOp::new(&ctx, &s.logits_last, nv as u32, &s.argmax, &s.step_last),
        });
        Ok(GpuSession { model, ctx, weights, kv, s, embed, layers, head, n_ctx, max_tokens, n_past: 0 })
    }

    /// GPU bytes of the KV cache and scratch buffers (weights not included).
    pub fn state_bytes(&self) -> u64 {
        self.kv.gpu_bytes()
    }

    /// Encodes and submits one batch (at most max_tokens). Returns after submission; the caller
    /// reads what it needs.
    fn run_batch(&mut self, tokens: &[u32], want: Logits) -> Result<(), ForwardError> {
        let n = tokens.len() as u32;
        let pos0 = self.n_past as u32;
        let step = Step { n_tokens: n, pos0, n_kv: pos0 + n, _pad: 0 };
        let step_last = Step { n_tokens: 1, ..step };
        let q = &self.ctx.queue;
        q.write_buffer(&self.s.step, 0, bytemuck::bytes_of(&step));
        q.write_buffer(&self.s.step_last, 0, bytemuck::bytes_of(&step_last));
        q.write_buffer(&self.s.ids, 0, bytemuck::cast_slice(tokens));
        let mut enc = self.ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("forward") });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("layers"), timestamp_writes: None });
            for (_, op) in self.layer_sequence(want) {
                op.record(&mut pass, n);
            }
        }
        if want == Logits::Last && self.head.is_some() {
            self.copy_last_row(&mut enc, n);
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("output"), timestamp_writes: None });
            for (_, op) in self.output_sequence() {
                op.record(&mut pass, 1);
            }
        }
        self.ctx.queue.submit([enc.finish()]);
        self.n_past += tokens.len();
        Ok(())
    }

    /// Embedding, every layer, and for [`Logits::All`] the final norm and output product.
    fn layer_sequence(&self, want: Logits) -> Vec<(&'static str, &dyn Op)> {
        let mut v: Vec<(&'static str, &dyn Op)> = vec![("embed", &self.embed)];
        for l in &self.layers {
            v.extend(l.sequence());
        }
        if let (Logits::All, Some(h)) = (want, &self.head) {
            v.push(("output_norm", &h.final_norm_all));
            v.push(("matmul output", &h.output_all));
        }
        v
    }

    /// After `copy_last_row`: the last token's final norm, logits and argmax.
    fn output_sequence(&self) -> Vec<(&'static str, &dyn Op)> {
        match &self.head {
            Some(h) => vec![("output_norm", &h.final_norm_last), ("matmul output", &h.output_last), ("argmax", &h.argmax)],
            None => Vec::new(),
        }
    }

    fn copy_last_row(&self, enc: &mut wgpu::CommandEncoder, n: u32) {
        let e = self.model.hp.n_embd as u64 * 4;
        enc.copy_buffer_to_buffer(&self.s.x, (n as u64 - 1) * e, &self.s.x_last, 0, e);
    }

    /// Decodes `token` at the next position with every dispatch in its own timestamped pass
    /// and returns (name, nanoseconds) per dispatch, plus the host wall time of the same token
    /// run normally (one pass, one submission, argmax read back). The position is not
    /// consumed. None without timestamp queries.
    pub fn profile_decode(&mut self, token: u32) -> Result<Option<Profile>, ForwardError> {
        let n_ops = self.layer_sequence(Logits::Last).len() + self.output_sequence().len();
        let Some(mut timer) = crate::gpu::timer::PassTimer::new(&self.ctx, n_ops as u32) else { return Ok(None) };
        self.check(&[token])?;
        let pos0 = self.n_past as u32;
        let step = Step { n_tokens: 1, pos0, n_kv: pos0 + 1, _pad: 0 };
        self.ctx.queue.write_buffer(&self.s.step, 0, bytemuck::bytes_of(&step));
        self.ctx.queue.write_buffer(&self.s.step_last, 0, bytemuck::bytes_of(&step));
        self.ctx.queue.write_buffer(&self.s.ids, 0, bytemuck::bytes_of(&token));
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        let mut names = Vec::with_capacity(n_ops);
        for (name, op) in self.layer_sequence(Logits::Last) {
            op.record(&mut timer.pass(&mut enc, name), 1);
            names.push(name);
        }
        self.copy_last_row(&mut enc, 1);
        for (name, op) in self.output_sequence() {
            op.record(&mut timer.pass(&mut enc, name), 1);
            names.push(name);
        }
        let times = timer.finish(&self.ctx, enc).map_err(ForwardError::Gpu)?;
        // The same token again, as one pass, timed on the host.
        let start = std::time::Instant::now();
        self.forward_argmax(&[token])?;
        let wall = start.elapsed().as_secs_f64() * 1e9;
        self.n_past -= 1;
        Ok(Some((names.into_iter().zip(times).collect(), wall)))
    }

    /// Runs `tokens` through the layers this session holds and reads back their hidden states
    /// (`tokens.len()` rows of n_embd): the GPU half of a dense layer offload.
    pub fn forward_hidden(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ForwardError> {
        self.check(tokens)?;
        let e = self.model.hp.n_embd;
        let mut out = Vec::with_capacity(tokens.len() * e);
        for chunk in tokens.chunks(self.max_tokens) {
            self.run_batch(chunk, Logits::All)?;
            out.extend(self.ctx.read::<f32>(&self.s.x, chunk.len() * e).map_err(ForwardError::Gpu)?);
        }
        Ok(out)
    }

    /// Most tokens one batch takes.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    fn check(&self, tokens: &[u32]) -> Result<(), ForwardError> {
        super::forward::check_batch(&self.model.hp, self.n_past, self.n_ctx, tokens)
    }
}

impl Forward for GpuSession {
    fn forward(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>, ForwardError> {
        self.check(tokens)?;
        let nv = self.model.hp.n_vocab;
        let mut all = Vec::new();
        for chunk in tokens.chunks(self.max_tokens) {
            self.run_batch(chunk, want)?;
            if want == Logits::All {
                all.extend(self.ctx.read::<f32>(&self.s.logits_all, chunk.len() * nv).map_err(ForwardError::Gpu)?);
            }
        }
        match want {
            Logits::All => Ok(all),
            Logits::Last => self.ctx.read::<f32>(&self.s.logits_last, nv).map_err(ForwardError::Gpu),
        }
    }

    fn forward_argmax(&mut self, tokens: &[u32]) -> Result<u32, ForwardError> {
        self.check(tokens)?;
        for chunk in tokens.chunks(self.max_tokens) {
            self.run_batch(chunk, Logits::Last)?;
        }
        let out: Vec<u32> = self.ctx.read(&self.s.argmax, 1).map_err(ForwardError::Gpu)?;
        Ok(out[0])
    }

    fn n_past(&self) -> usize {
        self.n_past
    }

    fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    fn reset(&mut self) {
        self.n_past = 0;
    }

    fn model(&self) -> &Arc<Model> {
        &self.model
    }

    fn backend_name(&self) -> String {
        format!("GPU {:?}", self.ctx.adapter.backend)
    }

    fn as_gpu(&mut self) -> Option<&mut GpuSession> {
        Some(self)
    }
}
