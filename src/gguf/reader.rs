//! Zero-copy GGUF reader.

use super::{GgmlType, GgufError, Result, Value, ValueType};
use std::collections::HashMap;
use std::path::Path;

/// Deepest nesting of arrays accepted (real files use one level; the limit keeps a corrupt file
/// from recursing without bound).
const MAX_ARRAY_DEPTH: usize = 4;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;
/// No real model has tensors of more than 2^40 elements; larger means corruption.
const MAX_ELEMENTS: u64 = 1 << 40;
pub(crate) const MAX_ALIGNMENT: u64 = 1 << 20;
/// ggml names tensors in at most 64 bytes; longer means corruption (and a name is repeated in
/// error messages, which must stay short).
const MAX_TENSOR_NAME: u64 = 256;
/// The GGUF specification's limit on a key's length.
const MAX_KEY: u64 = 65535;
const DEFAULT_ALIGNMENT: u64 = 32;

/// Which magic the file opened with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Magic {
    /// An ordinary GGUF file.
    Gguf,
    /// A PowerInfer file (`PWRI`): GGUF in every other respect.
    PowerInfer,
}

impl Magic {
    pub fn bytes(self) -> &'static [u8; 4] {
        match self {
            Magic::Gguf => b"GGUF",
            Magic::PowerInfer => b"PWRI",
        }
    }
}

/// Where one tensor is and what it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` is the innermost (contiguous) one, so a matrix of
    /// `rows` rows of `cols` values has `dims == [cols, rows]`.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Rows and columns when the tensor is viewed as a matrix (higher dims fold into rows).
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = self.dims.first().copied().unwrap_or(1) as usize;
        (self.n_elements() as usize / cols.max(1), cols)
    }
}

enum Storage {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file; tensor data is borrowed from the map, never copied.
pub struct GgufFile {
    storage: Storage,
    pub magic: Magic,
    pub version: u32,
    pub alignment: u64,
    /// Offset of the tensor data section.
    pub data_offset: u64,
    metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("magic", &self.magic)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Whether `len` bytes take at most half of the memory the system has available (Linux's
/// MemAvailable; false where unknown): only then is pre-faulting a whole file worth it.
fn fits_in_memory(len: u64) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/meminfo") else { return false };
    let available_kib = info.lines().find_map(|l| l.strip_prefix("MemAvailable:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok());
    available_kib.is_some_and(|kib| len <= kib * 1024 / 2)
}

impl GgufFile {
    /// Maps and parses the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io = |source| GgufError::Io { path: path.display().to_string(), source };
        crate::files::check_regular(path).map_err(io)?;
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; like every mmap-based loader we assume the file is not
        // truncated by another process while it is open.
        let len = file.metadata().map_err(io)?.len();
        let mut options = memmap2::MmapOptions::new();
        if fits_in_memory(len) {
            // Map every page up front. Sparse inference reads a few rows of cold neurons per
            // token all over the file, and each first touch of a page was a page fault taken
            // under the process's memory-map lock by many threads at once.
            options.populate();
        }
        let map = unsafe { options.map(&file) }.map_err(io)?;
        Self::parse(Storage::Mapped(map))
    }

    /// Parses a GGUF image held in memory (tests, fuzzing, files written on the fly).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::parse(Storage::Owned(bytes))
    }

    fn parse(storage: Storage) -> Result<Self> {
        let bytes = storage.bytes();
        let mut c = Cursor { bytes, pos: 0 };
        let magic_bytes: [u8; 4] = c.take(4, "magic")?.try_into().unwrap();
        let magic = match &magic_bytes {
            b"GGUF" => Magic::Gguf,
            b"PWRI" => Magic::PowerInfer,
            _ => return Err(GgufError::BadMagic(magic_bytes)),
        };
        let version = c.u32("version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::BadVersion(version));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        // A tensor info takes at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset)
        // bytes, a key/value pair at least 8 + 4 + 1.
        c.check_count(n_tensors, 24, "tensor count")?;
        c.check_count(n_kv, 13, "metadata count")?;

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut meta_index = HashMap::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let key = c.key(i)?;
            let ty = c.u32(&format!("value type of metadata key {key:?}"))?;
            let ty = ValueType::from_u32(ty)
                .ok_or_else(|| GgufError::UnknownValueType { key: key.clone(), ty })?;
            let value = c.value(ty, &key, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::Duplicate { what: "metadata key", name: key });
            }
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => {
                let a = metadata[i].1.as_u64().unwrap_or(0);
                if a == 0 || !a.is_power_of_two() || a > MAX_ALIGNMENT {
                    return Err(GgufError::BadMetadata {
                        key: "general.alignment".into(),
                        reason: format!("{} is not a power of two up to {MAX_ALIGNMENT}", metadata[i].1.summary()),
                    });
                }
                a
            }
        };

        let mut raw = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.tensor_name(i)?;
            let n_dims = c.u32(&format!("dimension count of tensor {name:?}"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::BadTensor { name, reason: format!("{n_dims} dimensions (1 to {MAX_DIMS} allowed)") });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&format!("dimensions of tensor {name:?}"))?);
            }
            let ty_n = c.u32(&format!("type of tensor {name:?}"))?;
            let ty = GgmlType::from_u32(ty_n)
                .ok_or_else(|| GgufError::UnknownTensorType { name: name.clone(), ty: ty_n })?;
            let rel_offset = c.u64(&format!("data offset of tensor {name:?}"))?;
            raw.push((name, dims, ty, rel_offset));
        }

        let len = bytes.len() as u64;
        let data_offset = align_up(c.pos as u64, alignment);
        let mut tensors = Vec::with_capacity(raw.len());
        let mut tensor_index = HashMap::with_capacity(raw.len());
        for (name, dims, ty, rel_offset) in raw {
            let bad = |reason: String| GgufError::BadTensor { name: name.clone(), reason };
            let mut n: u64 = 1;
            for &d in &dims {
                if d == 0 {
                    return Err(bad(format!("zero-sized dimension in {dims:?}")));
                }
                n = n.checked_mul(d).filter(|&n| n <= MAX_ELEMENTS).ok_or_else(|| GgufError::Absurd {
                    what: format!("element count of tensor {name:?} {dims:?}"),
                    value: n.saturating_mul(d),
                    limit: MAX_ELEMENTS,
                })?;
            }
            if dims[0] % ty.block_len() as u64 != 0 {
                return Err(bad(format!("row length {} is not a multiple of {}'s block of {}", dims[0], ty, ty.block_len())));
            }
            let n_bytes = ty.bytes_for(n).ok_or_else(|| bad("size overflows".into()))?;
            if rel_offset % alignment != 0 {
                return Err(bad(format!("data offset {rel_offset} is not aligned to {alignment}")));
            }
            let start = data_offset.checked_add(rel_offset);
            let end = start.and_then(|s| s.checked_add(n_bytes));
            match (start, end) {
                (Some(start), Some(end)) if end <= len => {
                    if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                        return Err(GgufError::Duplicate { what: "tensor", name });
                    }
                    tensors.push(TensorInfo { name, dims, ty, offset: start, n_bytes });
                }
                _ => {
                    return Err(GgufError::TensorOutOfBounds {
                        name,
                        start: start.unwrap_or(u64::MAX),
                        end: end.unwrap_or(u64::MAX),
                        len,
                    })
                }
            }
        }

        let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
        by_offset.sort_by_key(|t| t.offset);
        for w in by_offset.windows(2) {
            if w[0].offset + w[0].n_bytes > w[1].offset {
                return Err(GgufError::TensorOverlap { a: w[0].name.clone(), b: w[1].name.clone() });
            }
        }

        Ok(GgufFile { storage, magic, version, alignment, data_offset, metadata, meta_index, tensors, tensor_index })
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// Tells the OS that bytes `start..start + len` of a mapped file will not be read soon:
    /// the whole pages inside the range leave this process's resident memory (they stay in the
    /// page cache while the OS has room; a later read maps them again, from the cache or the
    /// disk). For data copied elsewhere, such as packed weights. Owned images, and pages shared
    /// with the bytes just outside the range, are kept.
    pub fn release(&self, start: usize, len: usize) {
        let Storage::Mapped(map) = &self.storage else { return };
        #[cfg(unix)]
        {
            // SAFETY: sysconf has no preconditions.
            let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
            let first = start.next_multiple_of(page);
            let end = (start + len).min(map.len()) / page * page;
            if end > first {
                // SAFETY: the map is a read-only view of a file: MADV_DONTNEED drops this
                // process's page-table entries, and the next read sees the file's same bytes
                // again. No reference into the range is invalidated (its contents cannot change).
                // An error only means the advice was not taken.
                let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, end - first) };
            }
        }
        #[cfg(not(unix))]
        let _ = (map, start, len);
    }

    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// A required unsigned integer; errors name the key.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.get(key).ok_or_else(|| missing(key))?;
        v.as_u64().ok_or_else(|| wrong(key, "a non-negative integer", v))
    }

    pub fn get_f32(&self, key: &str) -> Result<f32> {
        let v = self.get(key).ok_or_else(|| missing(key))?;
        v.as_f64().map(|f| f as f32).ok_or_else(|| wrong(key, "a number", v))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.get(key).ok_or_else(|| missing(key))?;
        v.as_str().ok_or_else(|| wrong(key, "a string", v))
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor (bounds were checked when the file was parsed).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        &self.bytes()[t.offset as usize..(t.offset + t.n_bytes) as usize]
    }
}

fn missing(key: &str) -> GgufError {
    GgufError::BadMetadata { key: key.into(), reason: "missing".into() }
}

fn wrong(key: &str, expected: &str, v: &Value) -> GgufError {
    GgufError::BadMetadata { key: key.into(), reason: format!("expected {expected}, found {}", v.summary()) }
}

pub(crate) fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what.to_string(),
                // A corrupt length can be anything up to u64::MAX: saturate rather than overflow.
                needed: (self.pos as u64).saturating_add(n),
                len: self.bytes.len() as u64,
            });
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    /// Rejects a count whose items, at `min_size` bytes each, could not fit in what remains:
    /// nothing is allocated from an untrusted count before this check.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<()> {
        let limit = self.remaining() / min_size;
        if count > limit {
            return Err(GgufError::Absurd { what: what.to_string(), value: count, limit });
        }
        Ok(())
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }

    /// A length-prefixed string's bytes, not yet checked to be UTF-8, and the offset they start at.
    fn raw_string(&mut self, what: &str) -> Result<(&'a [u8], u64)> {
        let n = self.u64(what)?;
        let start = self.pos as u64;
        Ok((self.take(n, what)?, start))
    }

    /// The key of metadata entry `i`.
    fn key(&mut self, i: u64) -> Result<String> {
        let (raw, offset) = self.raw_string(&format!("key of metadata entry {i}"))?;
        if raw.len() as u64 > MAX_KEY {
            return Err(GgufError::Absurd { what: format!("length of the key of metadata entry {i}"), value: raw.len() as u64, limit: MAX_KEY });
        }
        std::str::from_utf8(raw).map(str::to_owned).map_err(|_| GgufError::InvalidUtf8 { offset })
    }

    /// The name of tensor `i`.
    fn tensor_name(&mut self, i: u64) -> Result<String> {
        let (raw, offset) = self.raw_string(&format!("name of tensor {i}"))?;
        if raw.len() as u64 > MAX_TENSOR_NAME {
            return Err(GgufError::Absurd { what: format!("length of the name of tensor {i}"), value: raw.len() as u64, limit: MAX_TENSOR_NAME });
        }
        std::str::from_utf8(raw).map(str::to_owned).map_err(|_| GgufError::BadTensor {
            name: String::from_utf8_lossy(raw).into_owned(),
            reason: format!("name (tensor {i}, at offset {offset}) is not valid UTF-8"),
        })
    }

    /// A string value of metadata key `key`.
    fn string_value(&mut self, key: &str) -> Result<String> {
        let (raw, offset) = self.raw_string(key)?;
        std::str::from_utf8(raw).map(str::to_owned).map_err(|_| GgufError::BadMetadata {
            key: key.into(),
            reason: format!("string value at offset {offset} is not valid UTF-8"),
        })
    }

    fn value(&mut self, ty: ValueType, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.u8(key)?),
            ValueType::I8 => Value::I8(self.u8(key)? as i8),
            ValueType::U16 => Value::U16(self.u16(key)?),
            ValueType::I16 => Value::I16(self.u16(key)? as i16),
            ValueType::U32 => Value::U32(self.u32(key)?),
            ValueType::I32 => Value::I32(self.u32(key)? as i32),
            ValueType::F32 => Value::F32(f32::from_bits(self.u32(key)?)),
            ValueType::U64 => Value::U64(self.u64(key)?),
            ValueType::I64 => Value::I64(self.u64(key)? as i64),
            ValueType::F64 => Value::F64(f64::from_bits(self.u64(key)?)),
            ValueType::Bool => match self.u8(key)? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(GgufError::BadMetadata { key: key.into(), reason: format!("bool byte {b} is neither 0 nor 1") })
                }
            },
            ValueType::String => Value::String(self.string_value(key)?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::Absurd { what: format!("array nesting of {key:?}"), value: depth as u64 + 1, limit: MAX_ARRAY_DEPTH as u64 });
                }
                let ety_n = self.u32(key)?;
                let ety = ValueType::from_u32(ety_n)
                    .ok_or_else(|| GgufError::UnknownValueType { key: key.into(), ty: ety_n })?;
                let n = self.u64(key)?;
                // Strings and arrays take at least 8 bytes (their length), scalars their size.
                let min = ety.scalar_size().unwrap_or(8) as u64;
                self.check_count(n, min, &format!("array length of {key:?}"))?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(ety, key, depth + 1)?);
                }
                Value::Array(ety, items)
            }
        })
    }
}
