//! Activation predictors: per layer, a small MLP `fc2 · relu(fc1 · x)` guessing from the
//! residual stream `x` entering the FFN block which neurons will fire, before the gate is
//! computed. A neuron is predicted active when its logit is at least the layer's threshold.
//!
//! Stored as PowerInfer stores them, in a GGUF file (its own, or inside a model): per layer
//! `blk.N.fc1` (GGUF shape `{n_embd, r}`: r rows of n_embd values) and `blk.N.fc2` (`{r, n_ff}`:
//! n_ff rows of r values); the rank r may differ per layer. Thresholds: ember writes one per layer
//! in `ember.predictor.thresholds` (F32 array); PowerInfer's single `powerinfer.sparse_threshold`
//! is written too when all layers share one, and read when the per-layer array is absent
//! (default 0).
//!
//! Numerics follow the CPU matmul at its default precision: the input of each product is
//! rounded to the weights' activation format (f16 for F16 weights, Q8_0 for Q8_0/Q4_0), as a
//! PowerInfer or llama.cpp CPU run would, so trained thresholds hold at inference.

use crate::gguf::{GgmlType, GgufError, GgufFile, GgufWriter, Value, ValueType};
use crate::model::{Matrix, TensorStore};
use crate::quant::{self, f16, BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1};
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;

/// `general.type` of a stand-alone predictor file.
pub const PREDICTORS_TYPE: &str = "ember.predictors";
/// Per-layer thresholds (F32 array).
pub const KEY_THRESHOLDS: &str = "ember.predictor.thresholds";
/// PowerInfer's one threshold for all layers.
pub const KEY_POWERINFER_THRESHOLD: &str = "powerinfer.sparse_threshold";

#[derive(Debug, Error)]
pub enum PredictorError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("{0} holds no predictor tensors (blk.N.fc1 and blk.N.fc2)")]
    NoPredictors(String),
    #[error("predictor of layer {layer}: {reason}")]
    BadLayer { layer: usize, reason: String },
    #[error("metadata key {key:?}: {reason}")]
    BadMetadata { key: String, reason: String },
    #[error("predictors do not fit the model: {0}")]
    ModelMismatch(String),
    #[error("cannot store predictors as {0} (F32, F16 or Q8_0)")]
    BadType(GgmlType),
}

pub type Result<T> = std::result::Result<T, PredictorError>;

/// One layer's predictor.
#[derive(Clone)]
pub struct Predictor {
    /// r rows x n_embd columns.
    pub fc1: Matrix,
    /// n_ff rows x r columns.
    pub fc2: Matrix,
    /// `fc2` transposed (r rows of n_ff), which the CPU evaluates: the logits are the sum of
    /// the rows of the non-zero hidden units, so a hidden unit that the ReLU silences (about
    /// half of them) costs nothing, and each row is a long, vectorised AXPY instead of n_ff
    /// short dot products. Stored as [`Matrix::transpose_type`] of fc2's type (Q8_0 for Q8_0).
    fc2_t: Matrix,
    /// A neuron is predicted active when its logit is >= this.
    pub threshold: f32,
}

impl std::fmt::Debug for Predictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Predictor {{ rank {}, {} -> {}, {} / {}, threshold {} }}", self.rank(), self.n_embd(), self.n_ff(), self.fc1.ty, self.fc2.ty, self.threshold)
    }
}

/// The weight types a predictor computes with (those the CPU dot kernels take).
const TYPES: [GgmlType; 5] = [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1];

impl Predictor {
    /// Checks that the shapes chain (`fc2.cols == fc1.rows`), the types are ones the kernels
    /// take, and the threshold is a number.
    pub fn new(fc1: Matrix, fc2: Matrix, threshold: f32) -> std::result::Result<Self, String> {
        if fc1.rows == 0 || fc1.cols == 0 || fc2.rows == 0 {
            return Err(format!("empty matrices: fc1 {}x{}, fc2 {}x{}", fc1.rows, fc1.cols, fc2.rows, fc2.cols));
        }
        if fc2.cols != fc1.rows {
            return Err(format!("fc1 has {} rows (the rank) but fc2 has {} columns", fc1.rows, fc2.cols));
        }
        for m in [&fc1, &fc2] {
            if !TYPES.contains(&m.ty) {
                return Err(format!("{} is {}; predictors compute with F32, F16, Q8_0, Q4_0 or Q4_1", m.name, m.ty));
            }
            if !m.cols.is_multiple_of(m.ty.block_len()) {
                return Err(format!("{} is {} with rows of {} values, not whole blocks of {}", m.name, m.ty, m.cols, m.ty.block_len()));
            }
        }
        if threshold.is_nan() {
            return Err("threshold is NaN".into());
        }
        let fc2_t = crate::cpu::sparse::transpose_matrix(&fc2, fc2.transpose_type()).map_err(|e| e.to_string())?;
        Ok(Predictor { fc1, fc2, fc2_t, threshold })
    }

    /// A predictor from row-major values: `fc1` r x n_embd, `fc2` n_ff x r, stored as `ty`
    /// (F32, F16, or Q8_0 for matrices whose rows are whole 32-value blocks, F16 otherwise).
    pub fn from_f32(fc1: &[f32], fc2: &[f32], rank: usize, n_embd: usize, n_ff: usize, threshold: f32, ty: GgmlType) -> std::result::Result<Self, String> {
        if fc1.len() != rank * n_embd || fc2.len() != n_ff * rank {
            return Err(format!("{} and {} values do not make a rank-{rank} predictor from {n_embd} to {n_ff}", fc1.len(), fc2.len()));
        }
        let store = |name: &str, rows: usize, cols: usize, v: &[f32]| -> std::result::Result<Matrix, String> {
            Ok(match ty {
                GgmlType::F32 | GgmlType::F16 => Matrix::from_f32(name, rows, cols, v, ty),
                GgmlType::Q8_0 if cols.is_multiple_of(32) => {
                    let blocks = quant::quantize_q8_0(v);
                    Matrix::from_raw(name, rows, cols, ty, bytemuck::cast_slice(&blocks))
                }
                // Q8_0 needs whole blocks per row; the other matrix still gets Q8_0.
                GgmlType::Q8_0 => Matrix::from_f32(name, rows, cols, v, GgmlType::F16),
                other => return Err(format!("cannot store predictors as {other} (F32, F16 or Q8_0)")),
            })
        };
        Self::new(store("fc1", rank, n_embd, fc1)?, store("fc2", n_ff, rank, fc2)?, threshold)
    }

    /// Every neuron active, whatever the input: zero weights of rank 1 give logit 0, and the
    /// threshold 0 accepts it. The reference for a sparse path that must equal the dense one.
    pub fn always_on(n_embd: usize, n_ff: usize) -> Self {
        Self::from_f32(&vec![0.0; n_embd], &vec![0.0; n_ff], 1, n_embd, n_ff, 0.0, GgmlType::F32).expect("valid shapes")
    }

    pub fn rank(&self) -> usize {
        self.fc1.rows
    }

    pub fn n_embd(&self) -> usize {
        self.fc1.cols
    }

    pub fn n_ff(&self) -> usize {
        self.fc2.rows
    }

    /// Bytes of both matrices as stored.
    pub fn n_bytes(&self) -> usize {
        self.fc1.n_bytes() + self.fc2.n_bytes()
    }

    /// Bytes the CPU reads per token at most: fc1, and the transposed fc2 (of which only the
    /// rows of non-zero hidden units are read).
    pub fn cpu_bytes(&self) -> usize {
        self.fc1.n_bytes() + self.fc2_t.n_bytes()
    }

    /// Multiply-adds per token.
    pub fn macs(&self) -> usize {
        self.rank() * (self.n_embd() + self.n_ff())
    }

    /// The logits `fc2 · relu(fc1 · resid)`, `n_ff` of them: `fc1`'s products as the CPU
    /// matmul computes them (input rounded to the weights' activation format), then the rows
    /// of `fc2`'s transpose for the non-zero hidden units summed in order
    /// ([`crate::cpu::sparse::axpy_rows`]). Training measures predictors with this very
    /// function, so thresholds hold at inference.
    ///
    /// # Panics
    /// If `resid` is not `n_embd` long or `logits` not `n_ff` long.
    pub fn predict(&self, resid: &[f32], logits: &mut [f32]) {
        assert_eq!(logits.len(), self.n_ff(), "predictor output length");
        let hidden = self.hidden(resid);
        let firing: Vec<u32> = (0..hidden.len() as u32).filter(|&u| hidden[u as usize] != 0.0).collect();
        crate::cpu::sparse::axpy_rows(&self.fc2_t, &hidden, &firing, logits);
    }

    /// `relu(fc1 · resid)`, the hidden units (rank of them).
    ///
    /// # Panics
    /// If `resid` is not `n_embd` long.
    pub fn hidden(&self, resid: &[f32]) -> Vec<f32> {
        assert_eq!(resid.len(), self.n_embd(), "predictor input length");
        let mut h = vec![0.0f32; self.rank()];
        matvec(&self.fc1, resid, &mut h);
        for v in &mut h {
            *v = v.max(0.0);
        }
        h
    }

    /// Ascending ids of the neurons predicted active for `resid` (`out` is cleared first).
    pub fn active(&self, resid: &[f32], out: &mut Vec<u32>) {
        let mut logits = vec![0.0f32; self.n_ff()];
        self.predict(resid, &mut logits);
        out.clear();
        out.extend(logits.iter().enumerate().filter(|(_, &l)| l >= self.threshold).map(|(i, _)| i as u32));
    }

    /// [`predict`](Self::predict) for `n` rows of `resid` at once, rows spread over rayon
    /// threads; bit-identical to calling `predict` per row.
    pub fn predict_batch(&self, resid: &[f32], logits: &mut [f32]) {
        use rayon::prelude::*;
        let (e, ff) = (self.n_embd(), self.n_ff());
        assert_eq!(resid.len() % e, 0, "predictor batch input length");
        assert_eq!(logits.len(), resid.len() / e * ff, "predictor batch output length");
        logits.par_chunks_mut(ff).zip(resid.par_chunks(e)).for_each(|(l, x)| self.predict(x, l));
    }
}

/// `out[r] = W row r · x` with the activation rounded as the CPU matmul does for `w.ty`.
fn matvec(w: &Matrix, x: &[f32], out: &mut [f32]) {
    let rb = w.row_bytes();
    let bytes = w.bytes();
    let rows = (0..w.rows).map(|r| &bytes[r * rb..(r + 1) * rb]);
    match w.ty {
        GgmlType::F32 => {
            for (o, row) in out.iter_mut().zip(rows) {
                *o = quant::vec_dot_f32(bytemuck::cast_slice(row), x);
            }
        }
        GgmlType::F16 => {
            let mut xh = vec![f16::ZERO; x.len()];
            quant::f32_to_f16_row(x, &mut xh);
            for (o, row) in out.iter_mut().zip(rows) {
                *o = quant::vec_dot_f16_f16(bytemuck::cast_slice(row), &xh);
            }
        }
        GgmlType::Q8_0 | GgmlType::Q4_0 => {
            let mut xq = vec![BlockQ8_0 { d: f16::ZERO, qs: [0; 32] }; x.len() / 32];
            quant::quantize_row_q8_0(x, &mut xq);
            for (o, row) in out.iter_mut().zip(rows) {
                *o = if w.ty == GgmlType::Q8_0 {
                    quant::vec_dot_q8_0_q8_0(bytemuck::cast_slice::<u8, BlockQ8_0>(row), &xq)
                } else {
                    quant::vec_dot_q4_0_q8_0(bytemuck::cast_slice::<u8, BlockQ4_0>(row), &xq)
                };
            }
        }
        GgmlType::Q4_1 => {
            let mut xq = vec![BlockQ8_1 { d: f16::ZERO, s: f16::ZERO, qs: [0; 32] }; x.len() / 32];
            quant::quantize_row_q8_1(x, &mut xq);
            for (o, row) in out.iter_mut().zip(rows) {
                *o = quant::vec_dot_q4_1_q8_1(bytemuck::cast_slice::<u8, BlockQ4_1>(row), &xq);
            }
        }
        // `Predictor::new` admits only the types above.
        other => unreachable!("predictor matrix of type {other}"),
    }
}

/// The predictors of every layer of a model.
#[derive(Clone, Debug)]
pub struct Predictors {
    pub layers: Vec<Predictor>,
    /// `general.name` of the model they were trained for ("" when unknown).
    pub model_name: String,
}

impl Predictors {
    /// Every neuron of every layer active (tests, and a sparse path run as a dense one).
    pub fn always_on(n_layer: usize, n_embd: usize, n_ff: usize) -> Self {
        Predictors { layers: (0..n_layer).map(|_| Predictor::always_on(n_embd, n_ff)).collect(), model_name: String::new() }
    }

    pub fn n_bytes(&self) -> usize {
        self.layers.iter().map(Predictor::n_bytes).sum()
    }

    /// Checks the predictors against a model's shape.
    pub fn check_model(&self, hp: &crate::model::HParams) -> Result<()> {
        if self.layers.len() != hp.n_layer {
            return Err(PredictorError::ModelMismatch(format!("{} predictor layers, the model has {}", self.layers.len(), hp.n_layer)));
        }
        for (l, p) in self.layers.iter().enumerate() {
            if p.n_embd() != hp.n_embd || p.n_ff() != hp.n_ff {
                return Err(PredictorError::ModelMismatch(format!(
                    "layer {l} maps {} -> {}, the model's FFN is {} -> {}",
                    p.n_embd(),
                    p.n_ff(),
                    hp.n_embd,
                    hp.n_ff
                )));
            }
        }
        Ok(())
    }

    /// Reads the predictors of a GGUF file: a stand-alone one, or a PowerInfer model that
    /// carries them. Quantised types other than the kernels' own (e.g. PowerInfer's Q5_0) are
    /// converted to F16.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = Arc::new(GgufFile::open(path)?);
        Self::from_gguf(file).map_err(|e| match e {
            PredictorError::NoPredictors(_) => PredictorError::NoPredictors(path.display().to_string()),
            e => e,
        })
    }

    pub fn from_gguf(file: Arc<GgufFile>) -> Result<Self> {
        // Layers are those with an fc1 tensor; both spellings occur (with and without ".weight").
        let mut n_layer = 0usize;
        for t in file.tensors() {
            if let Some(l) = layer_of(&t.name) {
                n_layer = n_layer.max(l + 1);
            }
        }
        if n_layer == 0 {
            return Err(PredictorError::NoPredictors("the file".into()));
        }
        let thresholds = thresholds(&file, n_layer)?;
        let mut store = TensorStore::new(file.clone(), "predictor");
        let mut layers = Vec::with_capacity(n_layer);
        for (l, &threshold) in thresholds.iter().enumerate() {
            let bad = |reason: String| PredictorError::BadLayer { layer: l, reason };
            let find = |base: &str| [format!("blk.{l}.{base}"), format!("blk.{l}.{base}.weight")].into_iter().find(|n| file.tensor(n).is_some());
            let (Some(n1), Some(n2)) = (find("fc1"), find("fc2")) else {
                return Err(bad("missing blk.N.fc1 or blk.N.fc2 (every layer up to the last needs both)".into()));
            };
            let dims = |n: &str| -> Result<[u64; 2]> {
                let t = file.tensor(n).expect("found above");
                match t.dims.as_slice() {
                    [c, r] | [c, r, 1] => Ok([*c, *r]),
                    d => Err(bad(format!("{n} has shape {d:?}, expected a matrix"))),
                }
            };
            let (d1, d2) = (dims(&n1)?, dims(&n2)?);
            let fc1 = store.matrix(&n1, &d1)?;
            let fc2 = store.matrix(&n2, &d2)?;
            layers.push(Predictor::new(fc1, fc2, threshold).map_err(bad)?);
        }
        let model_name = file.get("ember.predictor.model").or_else(|| file.get("general.name")).and_then(|v| v.as_str()).unwrap_or("").to_string();
        Ok(Predictors { layers, model_name })
    }

    /// Adds the tensors and threshold keys to `w` (a stand-alone file or a model being
    /// exported).
    pub fn add_to(&self, w: &mut GgufWriter) {
        let th: Vec<f32> = self.layers.iter().map(|p| p.threshold).collect();
        w.set(KEY_THRESHOLDS, Value::Array(ValueType::F32, th.iter().map(|&t| Value::F32(t)).collect()));
        if th.windows(2).all(|p| p[0] == p[1]) {
            w.set(KEY_POWERINFER_THRESHOLD, Value::F32(th.first().copied().unwrap_or(0.0)));
        }
        for (l, p) in self.layers.iter().enumerate() {
            w.add_tensor(&format!("blk.{l}.fc1"), &[p.n_embd() as u64, p.rank() as u64], p.fc1.ty, p.fc1.bytes().to_vec());
            w.add_tensor(&format!("blk.{l}.fc2"), &[p.rank() as u64, p.n_ff() as u64], p.fc2.ty, p.fc2.bytes().to_vec());
        }
    }

    /// A stand-alone predictor file.
    pub fn to_gguf(&self) -> GgufWriter {
        let mut w = GgufWriter::new();
        w.set("general.type", Value::String(PREDICTORS_TYPE.into()));
        w.set("general.name", Value::String(format!("{} predictors", self.model_name)));
        w.set("ember.predictor.model", Value::String(self.model_name.clone()));
        w.set("ember.predictor.ranks", Value::Array(ValueType::U32, self.layers.iter().map(|p| Value::U32(p.rank() as u32)).collect()));
        self.add_to(&mut w);
        w
    }

    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.to_gguf().write_file(path).map_err(|source| PredictorError::Write { path: path.display().to_string(), source })
    }
}

/// `blk.N.fc1[.weight]` -> N.
fn layer_of(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("blk.")?;
    let (n, tail) = rest.split_once('.')?;
    if tail == "fc1" || tail == "fc1.weight" {
        n.parse().ok().filter(|&l: &usize| l < 1 << 16)
    } else {
        None
    }
}

fn thresholds(file: &GgufFile, n_layer: usize) -> Result<Vec<f32>> {
    let bad = |key: &str, reason: String| PredictorError::BadMetadata { key: key.into(), reason };
    if let Some(v) = file.get(KEY_THRESHOLDS) {
        let a = v.as_array().ok_or_else(|| bad(KEY_THRESHOLDS, format!("expected an array, found {}", v.summary())))?;
        if a.len() != n_layer {
            return Err(bad(KEY_THRESHOLDS, format!("{} entries for {n_layer} layers", a.len())));
        }
        return a
            .iter()
            .map(|x| x.as_f64().map(|f| f as f32).filter(|f| !f.is_nan()).ok_or_else(|| bad(KEY_THRESHOLDS, format!("{} is not a number", x.summary()))))
            .collect();
    }
    let t = match file.get(KEY_POWERINFER_THRESHOLD) {
        None => 0.0,
        Some(v) => v.as_f64().map(|f| f as f32).filter(|f| !f.is_nan()).ok_or_else(|| bad(KEY_POWERINFER_THRESHOLD, format!("{} is not a number", v.summary())))?,
    };
    Ok(vec![t; n_layer])
}
