//! GGUF writer: used by `ember synth`, PowerInfer export and by tests that build small models.

use super::reader::{align_up, MAX_ALIGNMENT};
use super::{GgmlType, Magic, Value};
use std::io::{self, Write};

struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    /// The bytes, or None for a tensor whose bytes a generator produces while writing.
    data: Option<Vec<u8>>,
    len: u64,
}

/// Collects metadata and tensors, then writes a complete file in one pass.
pub struct GgufWriter {
    magic: Magic,
    alignment: u64,
    metadata: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        GgufWriter { magic: Magic::Gguf, alignment: 32, metadata: Vec::new(), tensors: Vec::new() }
    }

    /// Writes a PowerInfer (`PWRI`) file instead of plain GGUF.
    pub fn with_magic(mut self, magic: Magic) -> Self {
        self.magic = magic;
        self
    }

    /// Adds or replaces a metadata key.
    pub fn set(&mut self, key: &str, value: Value) -> &mut Self {
        if key == "general.alignment" {
            // Only alignments that the reader accepts change the layout (a huge power of two
            // would overflow it); any other value is written as given, and the reader rejects it.
            if let Some(a) = value.as_u64().filter(|a| a.is_power_of_two() && *a <= MAX_ALIGNMENT) {
                self.alignment = a;
            }
        }
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
        self
    }

    /// Adds a tensor; `dims` in GGUF order (innermost first). `data` must hold exactly the
    /// tensor's bytes.
    pub fn add_tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> &mut Self {
        let n: u64 = dims.iter().product();
        assert_eq!(ty.bytes_for(n), Some(data.len() as u64), "tensor {name}: data size does not match {dims:?} of {ty}");
        let len = data.len() as u64;
        self.tensors.push(PendingTensor { name: name.to_string(), dims: dims.to_vec(), ty, data: Some(data), len });
        self
    }

    /// Adds a tensor whose bytes are produced at write time by [`GgufWriter::write_generated`]
    /// (models larger than memory, e.g. `ember synth`).
    pub fn add_generated(&mut self, name: &str, dims: &[u64], ty: GgmlType) -> &mut Self {
        let n: u64 = dims.iter().product();
        let len = ty.bytes_for(n).unwrap_or_else(|| panic!("tensor {name}: {dims:?} is not a whole number of {ty} blocks"));
        self.tensors.push(PendingTensor { name: name.to_string(), dims: dims.to_vec(), ty, data: None, len });
        self
    }

    pub fn add_f32(&mut self, name: &str, dims: &[u64], values: &[f32]) -> &mut Self {
        self.add_tensor(name, dims, GgmlType::F32, bytemuck::cast_slice(values).to_vec())
    }

    /// The largest tensor's bytes and all tensors' bytes (padding left out).
    pub fn tensor_sizes(&self) -> (u64, u64) {
        self.tensors.iter().fold((0, 0), |(max, sum), t| (max.max(t.len), sum.saturating_add(t.len)))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out).expect("writing to a Vec cannot fail");
        out
    }

    /// Writes the file atomically (a temporary file beside it, then a rename): a failed or
    /// killed write leaves any previous file at `path` as it was.
    pub fn write_file(&self, path: impl AsRef<std::path::Path>) -> io::Result<()> {
        crate::files::write_atomic(path.as_ref(), |f| self.write(f))
    }

    pub fn write(&self, w: &mut impl Write) -> io::Result<()> {
        self.write_generated(w, &mut |name, _, _| panic!("tensor {name} was added with add_generated: use write_generated"))
    }

    /// Writes the file, calling `generate(name, type, buffer)` to fill each tensor added with
    /// [`GgufWriter::add_generated`] (the buffer has the tensor's exact size).
    pub fn write_generated(&self, w: &mut impl Write, generate: &mut dyn FnMut(&str, GgmlType, &mut [u8])) -> io::Result<()> {
        let mut header = Vec::new();
        header.extend_from_slice(self.magic.bytes());
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            header.extend_from_slice(&encode_string(k));
            header.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            header.extend_from_slice(&encode_value(v));
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            header.extend_from_slice(&encode_string(&t.name));
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&(t.ty as u32).to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offset = align_up(offset + t.len, self.alignment);
        }
        let data_start = align_up(header.len() as u64, self.alignment);
        header.resize(data_start as usize, 0);
        w.write_all(&header)?;
        for t in &self.tensors {
            match &t.data {
                Some(d) => w.write_all(d)?,
                None => {
                    let mut buf = vec![0u8; t.len as usize];
                    generate(&t.name, t.ty, &mut buf);
                    w.write_all(&buf)?;
                }
            }
            let pad = align_up(t.len, self.alignment) - t.len;
            w.write_all(&vec![0u8; pad as usize])?;
        }
        Ok(())
    }
}

fn encode_string(s: &str) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(s.as_bytes());
    b
}

fn encode_value(v: &Value) -> Vec<u8> {
    match v {
        Value::U8(x) => vec![*x],
        Value::I8(x) => vec![*x as u8],
        Value::U16(x) => x.to_le_bytes().to_vec(),
        Value::I16(x) => x.to_le_bytes().to_vec(),
        Value::U32(x) => x.to_le_bytes().to_vec(),
        Value::I32(x) => x.to_le_bytes().to_vec(),
        Value::F32(x) => x.to_le_bytes().to_vec(),
        Value::Bool(x) => vec![*x as u8],
        Value::String(s) => encode_string(s),
        Value::U64(x) => x.to_le_bytes().to_vec(),
        Value::I64(x) => x.to_le_bytes().to_vec(),
        Value::F64(x) => x.to_le_bytes().to_vec(),
        Value::Array(ty, items) => {
            let mut b = (*ty as u32).to_le_bytes().to_vec();
            b.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                b.extend_from_slice(&encode_value(it));
            }
            b
        }
    }
}
