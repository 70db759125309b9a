//! `ember quantize`: a GGUF model re-encoded in another weight type, choosing each tensor's
//! type as llama.cpp's `llama-quantize` does without an importance matrix (including the
//! Q4_K_M / Q5_K_M mixes and the fallbacks for rows that are not whole 256-element blocks), with
//! its reference quantisers (`quant::quantize_to`), so the same input gives the same tensor
//! bytes as llama-quantize.

use crate::gguf::{GgmlType, GgufFile, GgufWriter, TensorInfo, Value};
use rayon::prelude::*;

/// What to quantise to: one type for every weight matrix, or one of llama.cpp's mixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantTarget {
    /// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, F16 or F32 for every matrix (the
    /// output/tied embedding gets Q6_K, or Q8_0 where its rows are not whole 256-element
    /// blocks, for the K types, as in llama.cpp's mixes).
    Uniform(GgmlType),
    /// llama.cpp's Q4_K_M: Q4_K, with Q6_K for the output and for attn_v and ffn_down of the
    /// layers `use_more_bits` picks (first and last eighth, every third between).
    Q4KM,
    /// llama.cpp's Q5_K_M: as Q4_K_M with Q5_K.
    Q5KM,
}

/// Why quantisation was refused.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error("unknown quantisation type {0:?}: use Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, Q4_K_M, Q5_K_M, F16 or F32")]
    UnknownType(String),
    #[error("{name}: cannot read {ty} values to re-quantise them")]
    Unreadable { name: String, ty: GgmlType },
}

impl std::str::FromStr for QuantTarget {
    type Err = QuantizeError;
    fn from_str(s: &str) -> Result<Self, QuantizeError> {
        use GgmlType::*;
        Ok(match s.to_ascii_uppercase().as_str() {
            "Q4_K_M" => QuantTarget::Q4KM,
            "Q5_K_M" => QuantTarget::Q5KM,
            "Q4_0" => QuantTarget::Uniform(Q4_0),
            "Q4_1" => QuantTarget::Uniform(Q4_1),
            "Q5_0" => QuantTarget::Uniform(Q5_0),
            "Q5_1" => QuantTarget::Uniform(Q5_1),
            "Q8_0" => QuantTarget::Uniform(Q8_0),
            "Q4_K" => QuantTarget::Uniform(Q4_K),
            "Q5_K" => QuantTarget::Uniform(Q5_K),
            "Q6_K" => QuantTarget::Uniform(Q6_K),
            "F16" => QuantTarget::Uniform(F16),
            "F32" => QuantTarget::Uniform(F32),
            _ => return Err(QuantizeError::UnknownType(s.to_string())),
        })
    }
}

impl QuantTarget {
    /// The default type of the weight matrices.
    fn base(self) -> GgmlType {
        match self {
            QuantTarget::Uniform(t) => t,
            QuantTarget::Q4KM => GgmlType::Q4_K,
            QuantTarget::Q5KM => GgmlType::Q5_K,
        }
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`) for the target.
    pub fn file_type(self) -> u32 {
        use GgmlType::*;
        match self {
            QuantTarget::Q4KM => 15,
            QuantTarget::Q5KM => 17,
            QuantTarget::Uniform(t) => match t {
                F32 => 0,
                F16 => 1,
                Q4_0 => 2,
                Q4_1 => 3,
                Q8_0 => 7,
                Q5_0 => 8,
                Q5_1 => 9,
                Q4_K => 14,
                Q5_K => 16,
                _ => 18,
            },
        }
    }

    fn is_mix(self) -> bool {
        matches!(self, QuantTarget::Q4KM | QuantTarget::Q5KM)
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third one
/// between get more bits in the _M mixes.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64).rem_euclid(3) == 2
}

/// Whether llama-quantize quantises a tensor at all (2-D weights that are not norms).
fn is_quantised(t: &TensorInfo) -> bool {
    let dims = t.dims.iter().filter(|&&d| d > 1).count();
    t.name.ends_with("weight") && dims >= 2 && !t.name.contains("_norm.weight") && !t.name.contains("ffn_gate_inp.weight")
}

/// The tensors in the order llama-quantize writes them (and counts layers in): by layer
/// number (`blk.N.`, tensors outside layers first), then by name.
pub fn write_order(file: &GgufFile) -> Vec<&TensorInfo> {
    let layer = |n: &str| n.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|d| d.parse::<i64>().ok()).unwrap_or(-1);
    let mut order: Vec<&TensorInfo> = file.tensors().iter().collect();
    order.sort_by(|a, b| layer(&a.name).cmp(&layer(&b.name)).then_with(|| a.name.cmp(&b.name)));
    order
}

/// The type each of `tensors` (in [`write_order`]) gets; unquantised tensors keep theirs.
pub fn plan(tensors: &[&TensorInfo], target: QuantTarget) -> Vec<GgmlType> {
    let has_output = tensors.iter().any(|t| t.name == "output.weight");
    let n_attn_v = tensors.iter().filter(|t| t.name.contains("attn_v.weight")).count();
    let n_layer = tensors.iter().filter(|t| t.name.contains("ffn_down")).count();
    let (mut i_attn_v, mut i_ffn_down) = (0, 0);
    let k = target.base().block_len() == 256;
    tensors
        .iter()
        .map(|t| {
            if !is_quantised(t) {
                return t.ty;
            }
            let nx = t.dims[0];
            let mut ty = target.base();
            if t.name == "output.weight" || (!has_output && t.name == "token_embd.weight") {
                if k {
                    ty = if nx % 256 != 0 { GgmlType::Q8_0 } else { GgmlType::Q6_K };
                }
            } else if t.name.contains("attn_v.weight") {
                if target.is_mix() && use_more_bits(i_attn_v, n_attn_v) {
                    ty = GgmlType::Q6_K;
                }
                i_attn_v += 1;
            } else if t.name.contains("ffn_down") {
                if target.is_mix() && use_more_bits(i_ffn_down, n_layer) {
                    ty = GgmlType::Q6_K;
                }
                i_ffn_down += 1;
            } else if t.name.contains("attn_qkv.weight") {
                match target {
                    QuantTarget::Q4KM => ty = GgmlType::Q5_K,
                    QuantTarget::Q5KM => ty = GgmlType::Q6_K,
                    _ => {}
                }
            }
            // Rows that are not whole blocks of the chosen type fall back as in llama.cpp.
            if nx % ty.block_len() as u64 != 0 {
                ty = match ty {
                    GgmlType::Q4_K => GgmlType::Q5_0,
                    GgmlType::Q5_K => GgmlType::Q5_1,
                    GgmlType::Q6_K => GgmlType::Q8_0,
                    other => other,
                };
                if nx % ty.block_len() as u64 != 0 {
                    ty = GgmlType::F16;
                }
            }
            ty
        })
        .collect()
}

/// `file` re-encoded for `target`: metadata copied (with `general.file_type` and
/// `general.quantization_version` set as llama-quantize sets them), tensors in [`write_order`],
/// each copied when its type does not change, else dequantised and quantised row block by row
/// block on rayon's threads. `progress(done, total)` is called after each tensor. The output
/// does not depend on the thread count.
pub fn quantize(file: &GgufFile, target: QuantTarget, progress: &(dyn Fn(usize, usize) + Sync)) -> Result<GgufWriter, QuantizeError> {
    let order = write_order(file);
    let types = plan(&order, target);
    let mut w = GgufWriter::new();
    // llama-quantize moves these two keys to the end.
    for (k, v) in file.metadata() {
        if k != "general.quantization_version" && k != "general.file_type" {
            w.set(k, v.clone());
        }
    }
    w.set("general.quantization_version", Value::U32(2));
    w.set("general.file_type", Value::U32(target.file_type()));
    let total = order.len();
    for (i, (t, &ty)) in order.iter().zip(&types).enumerate() {
        let src = file.tensor_data(t);
        let data = if ty == t.ty {
            src.to_vec()
        } else {
            let n = t.n_elements() as usize;
            let mut values = vec![0.0f32; n];
            crate::quant::dequantize(t.ty, src, &mut values).map_err(|_| QuantizeError::Unreadable { name: t.name.clone(), ty: t.ty })?;
            // Whole rows per task: blocks never straddle rows, so the bytes are the same as
            // one call over the whole tensor.
            let cols = t.dims[0] as usize;
            let rows_per = (1 << 16) / cols.max(1) + 1;
            let parts: Vec<Vec<u8>> = values.par_chunks(rows_per * cols).map(|c| crate::quant::quantize_to(ty, c).expect("planned types quantise")).collect();
            parts.concat()
        };
        w.add_tensor(&t.name, &t.dims, ty, data);
        progress(i + 1, total);
    }
    Ok(w)
}
