//! `ember synth`: a model of real shape with random weights, for speed tests of shapes we cannot
//! download (llama-7B by default). Random weights are fine for speed, never for accuracy claims.

use super::Result;
use crate::gguf::{GgmlType, GgufFile, GgufWriter, Value};
use clap::{Args, ValueEnum};
use rayon::prelude::*;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[allow(non_camel_case_types)]
pub enum SynthType {
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "q5_0")]
    Q5_0,
    #[value(name = "q5_1")]
    Q5_1,
    #[value(name = "q2_k")]
    Q2_K,
    #[value(name = "q3_k")]
    Q3_K,
    #[value(name = "q4_k")]
    Q4_K,
    #[value(name = "q5_k")]
    Q5_K,
    #[value(name = "q6_k")]
    Q6_K,
    /// llama.cpp's Q4_K_M mix for a llama model: Q4_K, with Q6_K for the output matrix and for
    /// attn_v and ffn_down in the first and last eighth of the layers and every third between
    /// (llama-quantize's `use_more_bits`).
    #[value(name = "q4_k_m")]
    Q4_K_M,
}

impl SynthType {
    /// The base type (Q4_K for the Q4_K_M mix).
    fn ggml(self) -> GgmlType {
        match self {
            SynthType::F16 => GgmlType::F16,
            SynthType::Q8_0 => GgmlType::Q8_0,
            SynthType::Q4_0 => GgmlType::Q4_0,
            SynthType::Q4_1 => GgmlType::Q4_1,
            SynthType::Q5_0 => GgmlType::Q5_0,
            SynthType::Q5_1 => GgmlType::Q5_1,
            SynthType::Q2_K => GgmlType::Q2_K,
            SynthType::Q3_K => GgmlType::Q3_K,
            SynthType::Q4_K | SynthType::Q4_K_M => GgmlType::Q4_K,
            SynthType::Q5_K => GgmlType::Q5_K,
            SynthType::Q6_K => GgmlType::Q6_K,
        }
    }

    /// The type of tensor `role` (`output`, `token_embd`, or a layer tensor's name after
    /// `blk.N.`) of layer `layer` of `n_layer`.
    fn of(self, role: &str, layer: u64, n_layer: u64) -> GgmlType {
        if self != SynthType::Q4_K_M {
            return self.ggml();
        }
        // llama-quantize (src/llama-quant.cpp, llama_tensor_get_type) for a llama model
        // without grouped-query attention.
        let more_bits = layer < n_layer / 8 || layer >= 7 * n_layer / 8 || (layer as i64 - (n_layer / 8) as i64) % 3 == 2;
        match role {
            "output" => GgmlType::Q6_K,
            "attn_v.weight" | "ffn_down.weight" if more_bits => GgmlType::Q6_K,
            _ => GgmlType::Q4_K,
        }
    }
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Output GGUF file
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Type of every 2D weight (token embedding and output included); norms are F32
    #[arg(long = "type", value_enum, default_value = "q4_0")]
    pub ty: SynthType,
    /// FFN activation (drelu: relu(gate) * relu(up), written as `ember.ffn_activation`)
    #[arg(long, default_value = "silu", value_parser = ["silu", "relu", "drelu"])]
    pub act: String,
    /// Model family, with its tensor names, shapes and metadata keys as llama.cpp's converter
    /// writes them: llama; qwen3 (per-head q/k norms, NeoX RoPE, `qwen3.attention.key_length`);
    /// bamboo (PowerInfer's dReLU llama, which implies --act drelu); phi3 (fused attn_qkv, and
    /// gate and up fused in ffn_up); gemma2 (GeGLU, four norms per layer, soft-capping,
    /// sliding window on even layers, tied output); gemma3 (gemma2 with q/k norms, no attention
    /// soft-capping, 5 of 6 layers local with RoPE base 10000, global layers at 1e6 with linear
    /// scaling 8)
    #[arg(long, default_value = "llama", value_parser = ["llama", "qwen3", "phi3", "bamboo", "gemma2", "gemma3"])]
    pub arch: String,
    /// Size of an attention head [default: n_embd / n_head]; qwen3, gemma2 and gemma3 only,
    /// where it may differ
    #[arg(long)]
    pub head_dim: Option<u64>,
    /// gemma2/gemma3: the local layers' window (`attention.sliding_window`) [default: 4096
    /// for gemma2, 1024 for gemma3, as the real models]
    #[arg(long)]
    pub sliding_window: Option<u64>,
    /// gemma2 only: `attn_logit_softcapping` [default: 50, the real models'; it barely bends
    /// random weights' scores, so the tests pass a small cap]
    #[arg(long)]
    pub attn_softcap: Option<f32>,
    /// gemma2 only: `final_logit_softcapping` [default: 30, the real models']
    #[arg(long)]
    pub final_softcap: Option<f32>,
    #[arg(long, default_value_t = 4096)]
    pub n_embd: u64,
    #[arg(long, default_value_t = 11008)]
    pub n_ff: u64,
    #[arg(long, default_value_t = 32)]
    pub n_layer: u64,
    #[arg(long, default_value_t = 32)]
    pub n_head: u64,
    #[arg(long, default_value_t = 32)]
    pub n_head_kv: u64,
    /// GGUF whose tokenizer (and so vocabulary size) the model gets [default: the default model]
    #[arg(long)]
    pub tokenizer_from: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// With --act relu: an activation profile (`ember profile` of a real ReLU model) whose
    /// per-neuron firing rates the model imitates, stretched to its shape: each gate row gets a
    /// bias, carried by residual dimension 0 (held constant), calibrated on a few CPU tokens, so
    /// that `--ffn relu` on it is as sparse as the profiled model. Without it a relu model fires
    /// on about half of its neurons (zero-mean weights)
    #[arg(long, value_name = "PROFILE")]
    pub profile: Option<PathBuf>,
}

/// splitmix64: a fast, seedable stream for filling gigabytes.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` with a random tensor of `cols`-long rows whose values have a standard deviation of
/// about 1/sqrt(cols), so activations keep their scale through the layers.
pub(crate) fn fill(buf: &mut [u8], ty: GgmlType, cols: u64, seed: u64) {
    let std = 1.0 / (cols as f32).sqrt();
    let bb = ty.block_bytes();
    let chunk = bb * 4096;
    buf.par_chunks_mut(chunk).enumerate().for_each(|(ci, part)| {
        let mut s = seed ^ mix(ci as u64);
        for word in part.chunks_mut(8) {
            s = mix(s);
            word.copy_from_slice(&s.to_le_bytes()[..word.len()]);
        }
        let half = |v: f32| half::f16::from_f32(v).to_le_bytes();
        match ty {
            GgmlType::F16 => {
                for v in part.chunks_exact_mut(2) {
                    // Uniform in [-sqrt(3) std, sqrt(3) std] from the random bits.
                    let u = u16::from_le_bytes([v[0], v[1]]) as f32 / 65535.0 * 2.0 - 1.0;
                    v.copy_from_slice(&half(u * std * 1.732));
                }
            }
            GgmlType::F32 => {
                for v in part.chunks_exact_mut(4) {
                    let u = u32::from_le_bytes([v[0], v[1], v[2], v[3]]) as f32 / u32::MAX as f32;
                    v.copy_from_slice(&(0.9 + 0.2 * u).to_le_bytes());
                }
            }
            // Random quants with a scale giving the wanted spread: 4-bit codes spread about 4.6
            // steps, 8-bit ones about 74.
            GgmlType::Q4_0 => part.chunks_exact_mut(bb).for_each(|b| b[..2].copy_from_slice(&half(std / 4.6))),
            GgmlType::Q8_0 => part.chunks_exact_mut(bb).for_each(|b| b[..2].copy_from_slice(&half(std / 74.0))),
            GgmlType::Q4_1 => part.chunks_exact_mut(bb).for_each(|b| {
                b[..2].copy_from_slice(&half(std / 4.6));
                b[2..4].copy_from_slice(&half(-7.5 * std / 4.6));
            }),
            // Q5 codes spread about 9.2 steps (centred by the offset 16, or by m).
            GgmlType::Q5_0 => part.chunks_exact_mut(bb).for_each(|b| b[..2].copy_from_slice(&half(std / 9.2))),
            GgmlType::Q5_1 => part.chunks_exact_mut(bb).for_each(|b| {
                b[..2].copy_from_slice(&half(std / 9.2));
                b[2..4].copy_from_slice(&half(-15.5 * std / 9.2));
            }),
            // K-quants: every sub-block's 6-bit scale and min 32 (bytes 0..8 hold 32 in their
            // low six bits and the top bits of the other four, 2; bytes 8..12 the other four's
            // low nibbles, 0), d and dmin centring the codes.
            GgmlType::Q4_K | GgmlType::Q5_K => part.chunks_exact_mut(bb).for_each(|b| {
                let (spread, mid) = if ty == GgmlType::Q4_K { (4.6, 7.5) } else { (9.2, 15.5) };
                let d = std / spread / 32.0;
                b[..2].copy_from_slice(&half(d));
                b[2..4].copy_from_slice(&half(d * mid));
                b[4..12].fill(0xA0);
                b[12..16].fill(0);
            }),
            // Q6_K: 16 scales of 16, codes (offset 32) spreading about 18.5 steps.
            GgmlType::Q6_K => part.chunks_exact_mut(bb).for_each(|b| {
                b[192..208].fill(16);
                b[208..210].copy_from_slice(&half(std / 18.5 / 16.0));
            }),
            // Q2_K: every sub-block's 4-bit scale and min 8 (0x88); codes 0..=3 spread about
            // 1.12 steps, centred by dmin = 1.5 d.
            GgmlType::Q2_K => part.chunks_exact_mut(bb).for_each(|b| {
                let d = std / 1.12 / 8.0;
                b[..16].fill(0x88);
                b[80..82].copy_from_slice(&half(d));
                b[82..84].copy_from_slice(&half(1.5 * d));
            }),
            // Q3_K: signed codes -4..=3 spread about 2.3 steps but average -0.5, which every
            // row would share; so each sub-block's 6-bit scale is 40 or 24 at random (+8 or -8
            // once the offset of 32 is taken off: low nibbles 8, top bits 2 or 1), and the
            // offsets cancel along a row.
            GgmlType::Q3_K => part.chunks_exact_mut(bb).for_each(|b| {
                b[96..104].fill(0x88);
                for byte in &mut b[104..108] {
                    *byte = (0..4).map(|k| if (*byte >> (2 * k)) & 1 == 1 { 1u8 << (2 * k) } else { 2u8 << (2 * k) }).sum();
                }
                b[108..110].copy_from_slice(&half(std / 2.3 / 8.0));
            }),
            _ => unreachable!("synth writes F32, F16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K"),
        }
    });
}

/// The value residual dimension 0 holds in a relu model (see [`SynthArgs::profile`]).
const CONST_DIM: f32 = 1.0;

/// Writes a block of `ty` whose element 0 is `v0` and whose other elements are 0.
fn set_block0(block: &mut [u8], ty: GgmlType, v0: f32) {
    let half = |v: f32| half::f16::from_f32(v).to_le_bytes();
    match ty {
        GgmlType::F16 => {
            block[..64].fill(0);
            block[..2].copy_from_slice(&half(v0));
        }
        GgmlType::Q8_0 => {
            block[..2].copy_from_slice(&half(v0 / 127.0));
            block[2..34].fill(0);
            block[2] = 127;
        }
        GgmlType::Q4_0 => {
            // value = d (q - 8): all codes 8 but element 0's (low nibble of byte 0) 15.
            block[..2].copy_from_slice(&half(v0 / 7.0));
            block[2..18].fill(0x88);
            block[2] = 0x8f;
        }
        GgmlType::Q4_1 => {
            // value = d q + m with m = 0.
            block[..2].copy_from_slice(&half(v0 / 15.0));
            block[2..4].copy_from_slice(&half(0.0));
            block[4..20].fill(0);
            block[4] = 0x0f;
        }
        _ => unreachable!("synth writes F16, Q8_0, Q4_0 and Q4_1 matrices"),
    }
}

/// Bytes of one row's first 32 values (a block, or 32 halves).
fn block0_bytes(ty: GgmlType) -> usize {
    if ty == GgmlType::F16 {
        64
    } else {
        ty.block_bytes()
    }
}

/// A relu model's structure on top of random weights: zero-mean Q4_0 codes (code 0, value -8,
/// becomes 8, value 0: without it every gate row has a negative mean and relu fires on every
/// neuron); residual dimension 0 held at [`CONST_DIM`] (the embedding's column 0 set, the rows
/// of attention and FFN outputs writing dimension 0 zeroed); gate rows' first block reserved for
/// their bias (zero until calibrated).
fn relu_structure(name: &str, buf: &mut [u8], ty: GgmlType, cols: u64) {
    if ty == GgmlType::Q4_0 {
        for b in buf.chunks_exact_mut(ty.block_bytes()) {
            for q in &mut b[2..] {
                let (lo, hi) = (*q & 0x0f, *q >> 4);
                *q = if lo == 0 { 8 } else { lo } | if hi == 0 { 8 } else { hi } << 4;
            }
        }
    }
    let row = cols as usize / ty.block_len() * ty.block_bytes();
    let b0 = block0_bytes(ty);
    if name == "token_embd.weight" || name.ends_with("ffn_gate.weight") {
        let v0 = if name == "token_embd.weight" { CONST_DIM } else { 0.0 };
        for r in buf.chunks_exact_mut(row) {
            set_block0(&mut r[..b0], ty, v0);
        }
    }
    if name.ends_with("attn_output.weight") || name.ends_with("ffn_down.weight") {
        // Row 0 computes output dimension 0: all zero.
        for b in buf[..row].chunks_exact_mut(b0) {
            set_block0(b, ty, 0.0);
        }
    }
}

/// Standard normal CDF (Abramowitz and Stegun 7.1.26 for erf, error under 1.5e-7).
fn normal_cdf(z: f64) -> f64 {
    let x = z.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.3275911 * x);
    let erf = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * (-x * x).exp();
    if z >= 0.0 { 0.5 * (1.0 + erf) } else { 0.5 * (1.0 - erf) }
}

/// z with normal_cdf(z) = p, by bisection (p clamped away from 0 and 1).
fn probit(p: f64) -> f64 {
    let p = p.clamp(1e-5, 1.0 - 1e-5);
    let (mut lo, mut hi) = (-8.0f64, 8.0f64);
    for _ in 0..80 {
        let mid = 0.5 * (lo + hi);
        if normal_cdf(mid) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// What the calibration measures per layer over a few tokens: residual dimension 0 after the
/// FFN norm, the gate without its bias (per neuron: its sum and sum of squares over tokens: a
/// neuron's random weights meet the residual's mean direction, which gives it an offset of its
/// own), and firings.
#[derive(Default, Clone)]
struct LayerStats {
    tokens: u64,
    xn0: f64,
    sum: Vec<f64>,
    sum2: Vec<f64>,
    fired: u64,
}

struct Calibrator {
    stats: Vec<LayerStats>,
    /// Per layer: the FFN norm's weight of dimension 0, and the bias weights in place.
    norm0: Vec<f32>,
    eps: f32,
    w0: Vec<Vec<f32>>,
}

impl crate::sparse::FfnObserver for std::sync::Arc<std::sync::Mutex<Calibrator>> {
    fn observe(&mut self, layer: usize, resid: &[f32], gate_pre: &[f32], _up_pre: &[f32]) {
        let mut c = self.lock().unwrap_or_else(|e| e.into_inner());
        let ms = resid.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / resid.len() as f64;
        let xn0 = resid[0] as f64 * c.norm0[layer] as f64 / (ms + c.eps as f64).sqrt();
        let Calibrator { stats, w0, .. } = &mut *c;
        let st = &mut stats[layer];
        st.sum.resize(gate_pre.len(), 0.0);
        st.sum2.resize(gate_pre.len(), 0.0);
        for (i, (g, &w)) in gate_pre.iter().zip(&w0[layer]).enumerate() {
            let e = *g as f64 - w as f64 * xn0;
            st.sum[i] += e;
            st.sum2[i] += e * e;
            st.fired += (*g > 0.0) as u64;
        }
        st.tokens += 1;
        st.xn0 += xn0;
    }
}

/// Sets each gate row's bias so that neuron i fires at about the profile's rate q_i: the gate
/// is bias_i + an offset m_i of its own + a part varying from token to token with spread sigma
/// (per layer), all measured, so bias_i = sigma probit(q_i) - m_i.
/// The bias is w_i0 xn_0, xn_0 being residual dimension 0 after the FFN norm (measured: it
/// depends on the residual's scale at that layer). Firing changes the residual that later
/// layers see, so a few rounds. Returns (target, reached) mean firing rates.
fn calibrate(path: &std::path::Path, profile: &crate::sparse::profile::ActivationProfile, seed: u64) -> Result<(f64, f64)> {
    use crate::engine::{Forward, Logits, Session};
    const ROUNDS: usize = 8;
    const TOKENS: usize = 64;
    let probe = crate::model::Model::load(path)?;
    let (n_layer, n_ff) = (probe.hp.n_layer, probe.hp.n_ff);
    let sim = crate::sparse::simulate::SimulatedActivity::from_profile(profile, n_layer, n_ff, 0)?;
    let target = sim.mean_rate();
    let ty = probe.layers[0].ffn_gate.ty;
    let row = probe.layers[0].ffn_gate.row_bytes();
    let offsets: Vec<u64> = (0..n_layer).map(|l| probe.file.tensor(&format!("blk.{l}.ffn_gate.weight")).map(|t| t.offset).ok_or("no gate tensor")).collect::<std::result::Result<_, _>>()?;
    let vocab = probe.hp.n_vocab as u64;
    let tokens: Vec<u32> = (0..TOKENS as u64).map(|i| (mix(seed ^ (i + 7)) % vocab) as u32).collect();
    drop(probe);
    let mut w0 = vec![vec![0.0f32; n_ff]; n_layer];
    // Per layer, in units of sigma: what the Gaussian model misses of the layer's mean rate,
    // corrected round by round from the rate reached.
    let mut shift = vec![0.0f64; n_layer];
    let density = sim.density();
    let mut reached = 0.0;
    for round in 0..=ROUNDS {
        let model = std::sync::Arc::new(crate::model::Model::load(path)?);
        let norm0 = model.layers.iter().map(|l| l.ffn_norm[0]).collect();
        let cal = std::sync::Arc::new(std::sync::Mutex::new(Calibrator { stats: vec![LayerStats::default(); n_layer], norm0, eps: model.hp.rms_eps, w0: w0.clone() }));
        let mut s = Session::new(model.clone(), TOKENS);
        s.observer = Some(Box::new(cal.clone()));
        // Every row through every layer (Last would drop all but one row in the last layer).
        s.forward(&tokens, Logits::All)?;
        drop(s);
        drop(model);
        let c = cal.lock().unwrap_or_else(|e| e.into_inner());
        reached = c.stats.iter().map(|st| st.fired as f64 / (st.tokens.max(1) * n_ff as u64) as f64).sum::<f64>() / n_layer as f64;
        if round == ROUNDS {
            break;
        }
        let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
        for (l, st) in c.stats.iter().enumerate() {
            let t = st.tokens.max(1) as f64;
            let means: Vec<f64> = st.sum.iter().map(|s| s / t).collect();
            // The spread around each neuron's own mean, pooled over the layer's neurons.
            let var = st.sum2.iter().zip(&means).map(|(s2, m)| s2 / t - m * m).sum::<f64>() / n_ff as f64;
            let sigma = var.max(0.0).sqrt();
            let xn0 = st.xn0 / t;
            if round > 0 {
                let rate = st.fired as f64 / (t * n_ff as f64);
                shift[l] += probit(density[l]) - probit(rate);
            }
            let mut block = vec![0u8; block0_bytes(ty)];
            for (i, &q) in sim.rates(l).iter().enumerate() {
                let w = if xn0.abs() > 1e-12 { ((sigma * (probit(q as f64) + shift[l]) - means[i]) / xn0) as f32 } else { 0.0 };
                w0[l][i] = half::f16::from_f32(w).to_f32();
                set_block0(&mut block, ty, w);
                use std::io::{Seek, Write};
                f.seek(std::io::SeekFrom::Start(offsets[l] + (i * row) as u64))?;
                f.write_all(&block)?;
            }
        }
        f.sync_all()?;
        eprintln!("ember: calibrating firing rates, round {}: mean rate {:.1}% (target {:.1}%)", round + 1, 100.0 * reached, 100.0 * target);
    }
    Ok((target, reached))
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

pub fn synth(a: SynthArgs) -> Result<()> {
    let divides = |n: u64, d: u64| d != 0 && n.is_multiple_of(d);
    if !(divides(a.n_embd, 32) && divides(a.n_ff, 32) && divides(a.n_embd, a.n_head) && divides(a.n_head, a.n_head_kv)) {
        return Err("shape: n_embd and n_ff must be multiples of 32, n_head must divide n_embd and be a multiple of n_head_kv".into());
    }
    // The loader's own limits: a model ember could not load is not worth hours of writing.
    for (flag, v, max) in [("--n-layer", a.n_layer, 1024), ("--n-embd", a.n_embd, 1 << 16), ("--n-ff", a.n_ff, 1 << 20), ("--n-head", a.n_head, 1024), ("--n-head-kv", a.n_head_kv, 1024)] {
        if v == 0 || v > max {
            return Err(format!("{flag} {v}: use 1 to {max}").into());
        }
    }
    // A path or a cached model's name, as -m takes; without it the default model, found (or
    // fetched) where every command finds it, from any folder.
    let tok_path = super::resolve_model(a.tokenizer_from.as_deref())?;
    crate::files::check_output(&a.output, [tok_path.as_path()])?;
    let tok = GgufFile::open(&tok_path).map_err(|e| format!("--tokenizer-from {}: {e}", tok_path.display()))?;
    let vocab = tok.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).map(|t| t.len() as u64).ok_or("the tokenizer source has no tokenizer.ggml.tokens")?;

    let ty = a.ty.ggml();
    if a.act == "relu" && !matches!(ty, GgmlType::F16 | GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1) {
        return Err("--act relu: synth writes relu models as f16, q8_0, q4_0 or q4_1".into());
    }
    if ty.block_len() == 256 && !(divides(a.n_embd, 256) && divides(a.n_ff, 256)) {
        return Err(format!("--type {:?}: K-quant rows are whole super-blocks: n_embd and n_ff must be multiples of 256", a.ty).into());
    }
    let arch = a.arch.as_str();
    if arch == "bamboo" && a.act != "drelu" {
        return Err("--arch bamboo is PowerInfer's dReLU architecture: add --act drelu".into());
    }
    let hd = a.head_dim.unwrap_or(a.n_embd / a.n_head);
    let gemma = arch.starts_with("gemma");
    if a.head_dim.is_some() && !(arch == "qwen3" || gemma) {
        return Err("--head-dim: only qwen3 and gemma heads may differ from n_embd / n_head".into());
    }
    if gemma && a.act != "silu" {
        return Err(format!("--act {}: gemma models have their own GeGLU FFN (gelu(gate) * up); leave --act out", a.act).into());
    }
    // What the FFN computes, for the messages.
    let act_name = if gemma { "gelu" } else { a.act.as_str() };
    if a.sliding_window.is_some() && !gemma {
        return Err("--sliding-window: only gemma2 and gemma3 have sliding-window layers".into());
    }
    for (flag, v) in [("--attn-softcap", a.attn_softcap), ("--final-softcap", a.final_softcap)] {
        match v {
            Some(_) if arch != "gemma2" => return Err(format!("{flag}: only gemma2 soft-caps (gemma3 has no attention cap, and no final cap in its released configs)").into()),
            Some(v) if !(v.is_finite() && v > 0.0) => return Err(format!("{flag} {v}: use a positive number").into()),
            _ => {}
        }
    }
    if hd == 0 || hd > 1024 || !hd.is_multiple_of(2) || !(a.n_head * hd).is_multiple_of(ty.block_len() as u64) {
        return Err(format!("--head-dim {hd}: use an even size up to 1024 with n_head x head_dim a multiple of {}", ty.block_len()).into());
    }
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String(arch.into()));
    w.set("general.name", Value::String(format!("ember-synth {}x{} {} {} (random weights)", a.n_layer, a.n_embd, act_name, format!("{:?}", a.ty).to_uppercase())));
    let mut keys = vec![("block_count", a.n_layer), ("embedding_length", a.n_embd), ("feed_forward_length", a.n_ff), ("attention.head_count", a.n_head), ("attention.head_count_kv", a.n_head_kv), ("context_length", 4096)];
    match arch {
        // convert_hf_to_gguf.py's Qwen3: the head size as key and value length, RoPE over whole
        // heads (no dimension count), no vocabulary size key.
        "qwen3" => keys.extend([("attention.key_length", hd), ("attention.value_length", hd)]),
        // Phi3MiniModel: the RoPE dimension and the original context, no vocabulary size.
        "phi3" => keys.extend([("rope.dimension_count", hd), ("rope.scaling.original_context_length", 4096)]),
        // Gemma2Model/Gemma3Model: the head size as key and value length, the window, no
        // vocabulary size or RoPE dimension count.
        "gemma2" => keys.extend([("attention.key_length", hd), ("attention.value_length", hd), ("attention.sliding_window", a.sliding_window.unwrap_or(4096))]),
        "gemma3" => keys.extend([("attention.key_length", hd), ("attention.value_length", hd), ("attention.sliding_window", a.sliding_window.unwrap_or(1024))]),
        _ => keys.extend([("vocab_size", vocab), ("rope.dimension_count", hd)]),
    }
    for (k, v) in keys {
        w.set(&format!("{arch}.{k}"), Value::U32(v as u32));
    }
    match arch {
        // Gemma2Model writes no RoPE base (llama.cpp's default 10000 applies) but the caps.
        "gemma2" => {
            w.set("gemma2.attn_logit_softcapping", Value::F32(a.attn_softcap.unwrap_or(50.0)));
            w.set("gemma2.final_logit_softcapping", Value::F32(a.final_softcap.unwrap_or(30.0)));
        }
        // Gemma3Model: the global layers' base; 4B and larger scale their RoPE linearly by 8.
        "gemma3" => {
            w.set("gemma3.rope.freq_base", Value::F32(1_000_000.0));
            w.set("gemma3.rope.scaling.type", Value::String("linear".into()));
            w.set("gemma3.rope.scaling.factor", Value::F32(8.0));
        }
        _ => {
            w.set(&format!("{arch}.rope.freq_base"), Value::F32(if arch == "qwen3" { 1_000_000.0 } else { 10000.0 }));
        }
    }
    w.set(&format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(if arch == "qwen3" || gemma { 1e-6 } else { 1e-5 }));
    // Bamboo's dReLU is its architecture's; elsewhere ember's own key says it.
    if a.act != "silu" && arch != "bamboo" {
        w.set("ember.ffn_activation", Value::String(a.act.clone()));
    }
    for (k, v) in tok.metadata() {
        if k.starts_with("tokenizer.") {
            w.set(k, v.clone());
        }
    }
    let (e, ff, q, kv) = (a.n_embd, a.n_ff, hd * a.n_head, hd * a.n_head_kv);
    let nl = a.n_layer;
    w.add_generated("token_embd.weight", &[e, vocab], a.ty.of("token_embd", 0, nl));
    w.add_generated("output_norm.weight", &[e], GgmlType::F32);
    // Gemma ties the output to the embedding: the converter writes no output tensor.
    if !gemma {
        w.add_generated("output.weight", &[e, vocab], a.ty.of("output", 0, nl));
    }
    for l in 0..a.n_layer {
        let n = |s: &str| format!("blk.{l}.{s}");
        let t = |s: &str| a.ty.of(s, l, nl);
        w.add_generated(&n("attn_norm.weight"), &[e], GgmlType::F32);
        if arch == "phi3" {
            w.add_generated(&n("attn_qkv.weight"), &[e, q + 2 * kv], t("attn_qkv.weight"));
        } else {
            w.add_generated(&n("attn_q.weight"), &[e, q], t("attn_q.weight"));
            w.add_generated(&n("attn_k.weight"), &[e, kv], t("attn_k.weight"));
            w.add_generated(&n("attn_v.weight"), &[e, kv], t("attn_v.weight"));
        }
        w.add_generated(&n("attn_output.weight"), &[q, e], t("attn_output.weight"));
        if gemma {
            w.add_generated(&n("post_attention_norm.weight"), &[e], GgmlType::F32);
        }
        if arch == "qwen3" || arch == "gemma3" {
            w.add_generated(&n("attn_q_norm.weight"), &[hd], GgmlType::F32);
            w.add_generated(&n("attn_k_norm.weight"), &[hd], GgmlType::F32);
        }
        w.add_generated(&n("ffn_norm.weight"), &[e], GgmlType::F32);
        if arch == "phi3" {
            // Gate rows, then up rows.
            w.add_generated(&n("ffn_up.weight"), &[e, 2 * ff], t("ffn_up.weight"));
        } else {
            w.add_generated(&n("ffn_gate.weight"), &[e, ff], t("ffn_gate.weight"));
            w.add_generated(&n("ffn_up.weight"), &[e, ff], t("ffn_up.weight"));
        }
        w.add_generated(&n("ffn_down.weight"), &[ff, e], t("ffn_down.weight"));
        if gemma {
            w.add_generated(&n("post_ffw_norm.weight"), &[e], GgmlType::F32);
        }
    }
    if a.profile.is_some() && a.act != "relu" {
        return Err("--profile sets firing rates of a relu model: add --act relu".into());
    }
    let profile = match &a.profile {
        Some(p) => Some(crate::sparse::profile::ActivationProfile::load(p).map_err(|e| format!("--profile {}: {e}", p.display()))?),
        None => None,
    };
    let relu = a.act == "relu";
    // Each tensor is generated in memory, then written: the largest must fit in memory, the
    // whole file on disk (sizes within the limits above cannot overflow a u64).
    let (tensor_max, total) = w.tensor_sizes();
    if let Some(avail) = super::available_memory() {
        if tensor_max > avail / 2 {
            return Err(format!("the largest tensor takes {:.1} GiB, more than half the {:.1} GiB of memory available; choose a smaller --n-embd, --n-ff or --type", gib(tensor_max), gib(avail)).into());
        }
    }
    if let Some(free) = crate::files::free_space(&a.output) {
        if total > free {
            return Err(format!("{}: the model takes {:.1} GiB, more than the {:.1} GiB free there", a.output.display(), gib(total), gib(free)).into());
        }
    }
    let n_tensors = if gemma { 2 } else { 3 } + match arch {
        "qwen3" => 11,
        "phi3" => 6,
        "gemma2" => 11,
        "gemma3" => 13,
        _ => 9,
    } * a.n_layer;
    let bar = indicatif::ProgressBar::new(n_tensors);
    bar.set_style(indicatif::ProgressStyle::with_template("ember: writing {msg} {bar:30} {pos}/{len} tensors").unwrap());
    bar.set_message(a.output.display().to_string());
    let mut index = 0u64;
    crate::files::write_atomic(&a.output, |out| {
        w.write_generated(out, &mut |name, t, buf| {
            let cols = if name.ends_with("ffn_down.weight") { ff } else if name.ends_with("attn_output.weight") { q } else { e };
            fill(buf, t, cols, mix(a.seed ^ mix(index)));
            if gemma && (name.ends_with("post_attention_norm.weight") || name.ends_with("post_ffw_norm.weight")) {
                // Post-norm gains of about 4, so that the layers' outputs outweigh the scaled
                // embedding in the residual: with the output tied to random embeddings a
                // model would otherwise predict its last token again and again.
                for v in buf.chunks_exact_mut(4) {
                    let g = f32::from_le_bytes([v[0], v[1], v[2], v[3]]) * 4.0;
                    v.copy_from_slice(&g.to_le_bytes());
                }
            }
            if relu && t != GgmlType::F32 {
                relu_structure(name, buf, t, cols);
            }
            index += 1;
            bar.inc(1);
        })
    })
    .map_err(|e| format!("{}: {e}", a.output.display()))?;
    bar.finish_and_clear();
    let rates = match &profile {
        Some(p) => Some(calibrate(&a.output, p, a.seed)?),
        None => None,
    };
    let size = std::fs::metadata(&a.output)?.len();
    if let (Some((target, reached)), Some(p)) = (rates, &a.profile) {
        eprintln!("ember: firing rates of {} imitated: mean {:.1}% on {} calibration tokens (the profile's {:.1}%)", p.display(), 100.0 * reached, 64, 100.0 * target);
    }
    eprintln!("ember: wrote {} ({:.2} GiB, {} layers, {} weights, {} FFN, random weights: for speed tests only)", a.output.display(), size as f64 / (1u64 << 30) as f64, a.n_layer, format!("{:?}", a.ty).to_uppercase(), act_name);
    Ok(())
}
