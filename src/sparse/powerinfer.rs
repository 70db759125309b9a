//! PowerInfer's files, read and written, so that models, predictors and placements made for
//! PowerInfer run on any GPU through ember (and the other way round).
//!
//! - A PowerInfer model is a GGUF with the magic `PWRI` whose down projections are stored
//!   transposed (`blk.N.ffn_down_t.weight`, GGUF shape `{n_embd, n_ff}`) and which may carry
//!   predictors (`blk.N.fc1.weight` `{n_embd, r}`, `blk.N.fc2.weight` `{r, n_ff}`). The model
//!   loader reads both forms; [`export_model`] writes one.
//! - A placement ("split") file is a `PWRI` GGUF with `split.vram_capacity` and per layer
//!   `blk.N.gpu_idx` (I32 x n_ff: 1 = the neuron is on the GPU) and `blk.N.gpu_bucket` (I32,
//!   the ascending ids of the GPU neurons).

use crate::gguf::{GgmlType, GgufFile, GgufWriter, Magic, Value};
use crate::model::{Matrix, Model};
use crate::sparse::predictor::Predictors;
use crate::sparse::placement::AttnSite;

#[derive(Debug, thiserror::Error)]
pub enum PowerInferError {
    #[error("placement file: {0}")]
    Split(String),
    #[error("export: {0}")]
    Export(String),
}

/// The placement file of per-layer hot neuron lists (ascending ids below `n_ff`).
pub fn split_file(hot: &[Vec<u32>], n_ff: usize, vram_capacity: u64) -> GgufWriter {
    let mut w = GgufWriter::new().with_magic(Magic::PowerInfer);
    w.set("split.vram_capacity", Value::U64(vram_capacity));
    for (l, ids) in hot.iter().enumerate() {
        let mut idx = vec![0i32; n_ff];
        for &i in ids {
            idx[i as usize] = 1;
        }
        let bucket: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        w.add_tensor(&format!("blk.{l}.gpu_idx"), &[n_ff as u64], GgmlType::I32, bytemuck::cast_slice(&idx).to_vec());
        // GGUF tensors cannot be empty: a layer without GPU neurons stores one -1.
        let bucket = if bucket.is_empty() { vec![-1] } else { bucket };
        w.add_tensor(&format!("blk.{l}.gpu_bucket"), &[bucket.len() as u64], GgmlType::I32, bytemuck::cast_slice(&bucket).to_vec());
    }
    w
}

/// ember's key in a placement file for where each layer's attention and KV cache live (an
/// array of bools, true = GPU); PowerInfer's files have none (every layer's on the GPU).
pub const ATTENTION_KEY: &str = "ember.placement.attention_on_gpu";

/// Per layer, whether the q/k/v product of a layer whose attention is on the host runs on the
/// GPU ([`AttnSite::Qkv`]); absent in files from before that site existed.
pub const QKV_KEY: &str = "ember.placement.qkv_on_gpu";

/// Records in a placement file where each layer's attention lives.
pub fn set_attention(w: &mut GgufWriter, sites: &[AttnSite]) {
    let flags = |on: &dyn Fn(AttnSite) -> bool| Value::Array(crate::gguf::ValueType::Bool, sites.iter().map(|&s| Value::Bool(on(s))).collect());
    w.set(ATTENTION_KEY, flags(&|s| s == AttnSite::Gpu));
    w.set(QKV_KEY, flags(&|s| s == AttnSite::Qkv));
}

/// Where each layer's attention lives according to a placement file; None when the file does
/// not say (PowerInfer's, or ember's from before host attention). A file without the q/k/v
/// record keeps every host layer's q/k/v on the host.
pub fn read_attention(f: &GgufFile, n_layer: usize) -> Result<Option<Vec<AttnSite>>, PowerInferError> {
    let flags = |key: &str| -> Result<Option<Vec<bool>>, PowerInferError> {
        let Some(v) = f.get(key) else { return Ok(None) };
        let bad = || PowerInferError::Split(format!("{key} must be an array of {n_layer} bools, one per layer"));
        let items = v.as_array().ok_or_else(bad)?;
        if items.len() != n_layer {
            return Err(bad());
        }
        items.iter().map(|b| b.as_bool().ok_or_else(bad)).collect::<Result<Vec<bool>, _>>().map(Some)
    };
    let Some(on_gpu) = flags(ATTENTION_KEY)? else { return Ok(None) };
    let qkv = flags(QKV_KEY)?.unwrap_or_else(|| vec![false; n_layer]);
    if on_gpu.iter().zip(&qkv).any(|(&g, &q)| g && q) {
        return Err(PowerInferError::Split(format!("{ATTENTION_KEY} and {QKV_KEY} both claim a layer: a layer's attention is whole on the GPU or its q/k/v alone")));
    }
    Ok(Some(on_gpu.iter().zip(&qkv).map(|(&g, &q)| if g { AttnSite::Gpu } else if q { AttnSite::Qkv } else { AttnSite::Host }).collect()))
}

/// Per layer hot neuron lists from a placement file, checked against the model's shape: every
/// index in range, `gpu_idx` and `gpu_bucket` describing the same set.
pub fn read_split(f: &GgufFile, n_layer: usize, n_ff: usize) -> Result<Vec<Vec<u32>>, PowerInferError> {
    let bad = |m: String| PowerInferError::Split(m);
    let ints = |name: &str| -> Result<Vec<i32>, PowerInferError> {
        let t = f.tensor(name).ok_or_else(|| bad(format!("missing tensor {name} (the file holds placements for fewer layers than the model's {n_layer}?)")))?;
        if t.ty != GgmlType::I32 || t.dims.len() != 1 {
            return Err(bad(format!("{name} is {} {:?}, expected a vector of I32", t.ty, t.dims)));
        }
        Ok(bytemuck::pod_collect_to_vec(f.tensor_data(t)))
    };
    let mut hot = Vec::with_capacity(n_layer);
    for l in 0..n_layer {
        let idx = ints(&format!("blk.{l}.gpu_idx"))?;
        if idx.len() != n_ff {
            return Err(bad(format!("blk.{l}.gpu_idx has {} entries, the model {n_ff} neurons per layer", idx.len())));
        }
        let from_idx: Vec<u32> = (0..n_ff as u32).filter(|&i| idx[i as usize] != 0).collect();
        let bucket: Vec<i32> = ints(&format!("blk.{l}.gpu_bucket"))?.into_iter().filter(|&b| b >= 0).collect();
        let mut from_bucket: Vec<u32> = bucket.iter().map(|&b| b as u32).collect();
        from_bucket.sort_unstable();
        if from_bucket != from_idx {
            return Err(bad(format!("layer {l}: gpu_bucket ({} neurons) and gpu_idx ({} neurons) disagree", from_bucket.len(), from_idx.len())));
        }
        hot.push(from_idx);
    }
    Ok(hot)
}

/// Writes `model` as a PowerInfer model: magic `PWRI`, every tensor as in the source except
/// each `ffn_down` stored transposed as `ffn_down_t` (in `down_t`'s type), and the predictors
/// (if any) as `blk.N.fc1/fc2`. All metadata is kept.
pub fn export_model(model: &Model, down_t: &[Matrix], predictors: Option<&Predictors>) -> Result<GgufWriter, PowerInferError> {
    let f = &model.file;
    let mut w = GgufWriter::new().with_magic(Magic::PowerInfer);
    for (k, v) in f.metadata() {
        if k != "general.alignment" {
            w.set(k, v.clone());
        }
    }
    for t in f.tensors() {
        let Some(layer) = t.name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|n| n.parse::<usize>().ok()) else {
            w.add_tensor(&t.name, &t.dims, t.ty, f.tensor_data(t).to_vec());
            continue;
        };
        if t.name == format!("blk.{layer}.ffn_down.weight") {
            let d = down_t.get(layer).ok_or_else(|| PowerInferError::Export(format!("no transposed down matrix for layer {layer}")))?;
            w.add_tensor(&format!("blk.{layer}.ffn_down_t.weight"), &[d.cols as u64, d.rows as u64], d.ty, d.bytes().to_vec());
        } else if !t.name.contains(".fc1") && !t.name.contains(".fc2") {
            w.add_tensor(&t.name, &t.dims, t.ty, f.tensor_data(t).to_vec());
        }
    }
    if let Some(p) = predictors {
        // Per-layer thresholds (ember's key) and PowerInfer's single one when they agree.
        let th: Vec<f32> = p.layers.iter().map(|l| l.threshold).collect();
        w.set(crate::sparse::predictor::KEY_THRESHOLDS, Value::Array(crate::gguf::ValueType::F32, th.iter().map(|&t| Value::F32(t)).collect()));
        if th.windows(2).all(|t| t[0] == t[1]) {
            w.set(crate::sparse::predictor::KEY_POWERINFER_THRESHOLD, Value::F32(th.first().copied().unwrap_or(0.0)));
        }
        // PowerInfer's loader names them with ".weight".
        for (l, pl) in p.layers.iter().enumerate() {
            for (name, m) in [("fc1", &pl.fc1), ("fc2", &pl.fc2)] {
                w.add_tensor(&format!("blk.{l}.{name}.weight"), &[m.cols as u64, m.rows as u64], m.ty, m.bytes().to_vec());
            }
        }
    }
    Ok(w)
}
