//! Weight matrices: views into the mapped file, or copies converted at load time.

use super::{ModelError, Result};
use crate::gguf::{GgmlType, GgufFile, TensorInfo};
use crate::quant::packed::{self, PackedMatrix};
use half::f16;
use std::sync::{Arc, OnceLock};

#[derive(Clone)]
enum Data {
    /// Borrowed from the file map (`start..start+len`).
    Mapped { file: Arc<GgufFile>, start: usize, len: usize },
    /// Owned bytes (`len` of them), kept in u32 words so every block type is aligned.
    Owned { words: Arc<Vec<u32>>, len: usize },
}

/// A row-major weight matrix: `rows` rows of `cols` values each, in one of the types the
/// CPU kernels compute with directly ([`Matrix::NATIVE`]). A GPU backend without kernels for
/// some of them converts at upload, on its side.
#[derive(Clone)]
pub struct Matrix {
    pub name: String,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    data: Data,
    /// The CPU kernels' interleaved copy ([`PackedMatrix`]), made on first use by
    /// [`Matrix::packed`]: only matrices a CPU product reads pay for it (not those a GPU holds).
    packed: Arc<OnceLock<Option<PackedMatrix>>>,
}

impl Matrix {
    /// Types the CPU kernels use without conversion: they stay as the file's mapped bytes.
    pub const NATIVE: [GgmlType; 12] = [
        GgmlType::F32, GgmlType::F16, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0,
        GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K,
        GgmlType::Q5_K, GgmlType::Q6_K,
    ];

    /// This matrix as F16 values (a copy), for a backend without kernels for its type.
    pub fn to_f16(&self) -> Matrix {
        let mut values = vec![0.0f32; self.rows * self.cols];
        crate::quant::dequantize(self.ty, self.bytes(), &mut values).expect("native matrix types dequantise");
        Matrix::from_f32(&self.name, self.rows, self.cols, &values, GgmlType::F16)
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            Data::Mapped { file, start, len } => &file.bytes()[*start..*start + *len],
            Data::Owned { words, len } => &bytemuck::cast_slice(words.as_slice())[..*len],
        }
    }

    pub fn n_bytes(&self) -> usize {
        self.bytes().len()
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_len() * self.ty.block_bytes()
    }

    /// A matrix from values, stored as `ty` (F32 or F16; for tests and conversions).
    pub fn from_f32(name: &str, rows: usize, cols: usize, values: &[f32], ty: GgmlType) -> Matrix {
        assert_eq!(values.len(), rows * cols);
        match ty {
            GgmlType::F32 => Self::from_raw(name, rows, cols, ty, bytemuck::cast_slice(values)),
            GgmlType::F16 => {
                let halves: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
                Self::from_raw(name, rows, cols, ty, bytemuck::cast_slice(&halves))
            }
            _ => panic!("Matrix::from_f32 stores F32 or F16, not {ty}"),
        }
    }

    /// A matrix over a copy of raw bytes of any native type.
    pub fn from_raw(name: &str, rows: usize, cols: usize, ty: GgmlType, bytes: &[u8]) -> Matrix {
        assert_eq!(ty.bytes_for((rows * cols) as u64), Some(bytes.len() as u64), "{name}: size does not match {rows}x{cols} {ty}");
        let mut words = vec![0u32; bytes.len().div_ceil(4)];
        bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Matrix { name: name.into(), ty, rows, cols, data: Data::Owned { words: Arc::new(words), len: bytes.len() }, packed: Arc::default() }
    }

    /// The type a transposed copy is stored in: the source's own float type; Q8_0 for
    /// quantised sources (re-quantising along the other axis at 8 bits adds far less error
    /// than the source's own 4- or 8-bit rounding), F16 when the new rows are not whole blocks.
    pub fn transpose_type(&self) -> GgmlType {
        match self.ty {
            GgmlType::F32 => GgmlType::F32,
            GgmlType::F16 => GgmlType::F16,
            _ if self.rows.is_multiple_of(32) => GgmlType::Q8_0,
            _ => GgmlType::F16,
        }
    }

    /// This matrix transposed (`cols` rows of `rows` values), stored as `ty` (F32, F16 or
    /// Q8_0): how `ffn_down` becomes PowerInfer's `ffn_down_t`, whose row i is neuron i's
    /// output column. Rows are dequantised, transposed in cache-sized tiles, re-encoded.
    pub fn transposed(&self, ty: GgmlType) -> std::result::Result<Matrix, String> {
        use rayon::prelude::*;
        let (rows, cols) = (self.rows, self.cols);
        if ty == GgmlType::Q8_0 && rows % 32 != 0 {
            return Err(format!("Q8_0 rows need a multiple of 32 values, and {rows} is not"));
        }
        let dense: Vec<Vec<f32>> = (0..rows).into_par_iter().map(|r| self.row_f32(r)).collect();
        // Output row c holds column c of the source.
        let out_rows: Vec<Vec<f32>> = (0..cols).into_par_iter().map(|c| dense.iter().map(|row| row[c]).collect()).collect();
        let name = format!("{}_t", self.name);
        let bytes: Vec<u8> = match ty {
            GgmlType::F32 => out_rows.iter().flat_map(|r| bytemuck::cast_slice::<f32, u8>(r).to_vec()).collect(),
            GgmlType::F16 => out_rows.iter().flat_map(|r| r.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes())).collect(),
            GgmlType::Q8_0 => out_rows.par_iter().flat_map_iter(|r| bytemuck::cast_slice::<_, u8>(&crate::quant::quantize_q8_0(r)).to_vec()).collect(),
            other => return Err(format!("cannot store a transposed matrix as {other} (F32, F16 or Q8_0)")),
        };
        Ok(Matrix::from_raw(&name, cols, rows, ty, &bytes))
    }

    /// The matrix repacked into 16-row interleaved groups for the CPU's packed kernels, made
    /// once (and shared by clones); `None` for types that are not packed.
    pub fn packed(&self) -> Option<&PackedMatrix> {
        self.packed_with(packed::PackOptions::default())
    }

    /// [`Matrix::packed`], packed with `opts` if this is the first call (the copy, once made,
    /// is kept as it is).
    pub fn packed_with(&self, opts: packed::PackOptions) -> Option<&PackedMatrix> {
        self.packed
            .get_or_init(|| {
                let p = packed::packs(self.ty).then(|| PackedMatrix::with_options(self.ty, self.rows, self.cols, self.bytes(), opts).expect("a matrix's bytes match its shape"))?;
                if let (true, Data::Mapped { file, start, len }) = (opts.release_source, &self.data) {
                    file.release(*start, *len);
                }
                Some(p)
            })
            .as_ref()
    }

    /// Rows `r0..r1` as a matrix of their own named `name`: a view of the same mapped bytes
    /// (a copy for owned ones). How a fused tensor (phi3's `attn_qkv`, its gate-and-up
    /// `ffn_up`) becomes the separate matrices the rest of ember multiplies with: rows are
    /// whole blocks, so any row range is a valid matrix of the same type.
    pub fn row_range(&self, name: &str, r0: usize, r1: usize) -> Matrix {
        assert!(r0 <= r1 && r1 <= self.rows, "{}: rows {r0}..{r1} of {}", self.name, self.rows);
        let rb = self.row_bytes();
        let data = match &self.data {
            Data::Mapped { file, start, .. } => Data::Mapped { file: file.clone(), start: start + r0 * rb, len: (r1 - r0) * rb },
            Data::Owned { .. } => return Matrix::from_raw(name, r1 - r0, self.cols, self.ty, &self.bytes()[r0 * rb..r1 * rb]),
        };
        Matrix { name: name.into(), ty: self.ty, rows: r1 - r0, cols: self.cols, data, packed: Arc::default() }
    }

    /// Row `r` dequantised to f32.
    pub fn row_f32(&self, r: usize) -> Vec<f32> {
        let rb = self.row_bytes();
        let mut out = vec![0.0; self.cols];
        crate::quant::dequantize(self.ty, &self.bytes()[r * rb..(r + 1) * rb], &mut out)
            .expect("native matrix types dequantise");
        out
    }
}

/// Hands out a model's tensors by name, checking shapes and converting types the kernels do
/// not compute with.
pub struct TensorStore {
    file: Arc<GgufFile>,
    arch: String,
    pub conversions: Vec<(String, GgmlType, GgmlType)>,
    /// Types kept as the file has them besides [`Matrix::NATIVE`]: those a GPU-only session
    /// computes with although the CPU kernels do not (see [`crate::model::Model::from_gguf_keeping`]).
    pub keep: Vec<GgmlType>,
}

impl TensorStore {
    pub fn new(file: Arc<GgufFile>, arch: &str) -> Self {
        TensorStore { file, arch: arch.to_string(), conversions: Vec::new(), keep: Vec::new() }
    }

    pub fn has(&self, name: &str) -> bool {
        self.file.tensor(name).is_some()
    }

    fn info(&self, name: &str, dims: &[u64]) -> Result<TensorInfo> {
        let t = self.file.tensor(name).ok_or_else(|| ModelError::MissingTensor(name.into(), self.arch.clone()))?;
        // A trailing dimension of 1 is the same shape.
        let mut got = t.dims.clone();
        while got.len() > dims.len() && got.last() == Some(&1) {
            got.pop();
        }
        if got != dims {
            return Err(ModelError::BadShape { name: name.into(), got: t.dims.clone(), want: dims.to_vec() });
        }
        Ok(t.clone())
    }

    /// A vector of f32 (norm weights, biases), dequantised whatever its stored type.
    pub fn vector(&mut self, name: &str, len: u64) -> Result<Vec<f32>> {
        let t = self.info(name, &[len])?;
        let mut out = vec![0.0f32; len as usize];
        crate::quant::dequantize(t.ty, self.file.tensor_data(&t), &mut out)
            .map_err(|_| ModelError::UnsupportedType { name: name.into(), ty: t.ty, role: "a vector" })?;
        Ok(out)
    }

    /// A matrix with GGUF dims `[cols, rows]`.
    pub fn matrix(&mut self, name: &str, dims: &[u64; 2]) -> Result<Matrix> {
        let t = self.info(name, dims)?;
        let (cols, rows) = (dims[0] as usize, dims[1] as usize);
        if Matrix::NATIVE.contains(&t.ty) || self.keep.contains(&t.ty) {
            let bytes = self.file.tensor_data(&t);
            // The kernels view weights as slices of f32, f16 or blocks (alignment up to 4). A
            // file with `general.alignment` = 1 may place a tensor at any byte: such a tensor
            // is copied once into aligned memory instead of being viewed in the map.
            if !(bytes.as_ptr() as usize).is_multiple_of(4) {
                return Ok(Matrix::from_raw(name, rows, cols, t.ty, bytes));
            }
            let data = Data::Mapped { file: self.file.clone(), start: t.offset as usize, len: t.n_bytes as usize };
            return Ok(Matrix { name: name.into(), ty: t.ty, rows, cols, data, packed: Arc::default() });
        }
        // Other types (BF16, and those without a CPU kernel) are dequantised once: BF16 to F32,
        // whose range it needs; the rest to F16, compact and computed with the fast F16 kernel.
        let mut values = vec![0.0f32; rows * cols];
        crate::quant::dequantize(t.ty, self.file.tensor_data(&t), &mut values)
            .map_err(|_| ModelError::UnsupportedType { name: name.into(), ty: t.ty, role: "a weight matrix" })?;
        let to = if t.ty == GgmlType::BF16 { GgmlType::F32 } else { GgmlType::F16 };
        self.conversions.push((name.to_string(), t.ty, to));
        Ok(Matrix::from_f32(name, rows, cols, &values, to))
    }
}
