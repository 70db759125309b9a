//! The GGUF file format: a header, typed metadata, tensor descriptions and aligned tensor data.
//!
//! [`GgufFile`] reads a file zero-copy over a memory map. Every size in the header is untrusted:
//! counts are checked against the bytes that remain before anything is allocated, and tensor data
//! ranges are checked to lie inside the file. PowerInfer's files are GGUF with the magic `PWRI`.

mod reader;
mod types;
mod value;
mod writer;

pub use reader::{GgufFile, Magic, TensorInfo};
pub use types::GgmlType;
pub use value::{Value, ValueType};
pub use writer::GgufWriter;

use thiserror::Error;

/// Everything that can be wrong with a GGUF file.
#[derive(Debug, Error)]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("not a GGUF file: magic bytes are {0:02x?} (expected \"GGUF\" or PowerInfer's \"PWRI\")")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (ember reads versions 2 and 3)")]
    BadVersion(u32),
    #[error("file is truncated: {what} needs bytes up to offset {needed}, but the file has {len}")]
    Truncated { what: String, needed: u64, len: u64 },
    #[error("absurd {what}: {value} (limit {limit}); the file is corrupt")]
    Absurd { what: String, value: u64, limit: u64 },
    #[error("metadata key at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { offset: u64 },
    #[error("unknown metadata value type {ty} for key {key:?}")]
    UnknownValueType { key: String, ty: u32 },
    #[error("tensor {name:?} has unknown type number {ty}")]
    UnknownTensorType { name: String, ty: u32 },
    #[error("tensor {name:?}: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("tensor {name:?} data [{start}, {end}) lies outside the file's {len} bytes")]
    TensorOutOfBounds { name: String, start: u64, end: u64, len: u64 },
    #[error("tensors {a:?} and {b:?} overlap in the file")]
    TensorOverlap { a: String, b: String },
    #[error("duplicate {what} {name:?}")]
    Duplicate { what: &'static str, name: String },
    #[error("metadata key {key:?}: {reason}")]
    BadMetadata { key: String, reason: String },
}

pub type Result<T> = std::result::Result<T, GgufError>;
