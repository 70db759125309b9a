//! Corrupt GGUF files: every defect must come back as the right `GgufError`, with a message that
//! names the key or tensor concerned, quickly and without a large allocation; truncations and
//! random bit flips must give an error or a valid file, never a panic.

mod common;

use ember::gguf::{GgmlType, GgufError, GgufFile, GgufWriter, Value, ValueType};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// The largest single allocation made by this thread, so that tests can show that an absurd count
// is rejected before anything is allocated from it. Tests run on parallel threads, so the
// tracking is per thread.

struct Tracker;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|m| {
        if size > m.get() {
            m.set(size)
        }
    });
}

unsafe impl GlobalAlloc for Tracker {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(p, l, new_size) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Tracker = Tracker;

/// Parses `bytes`, returning the result, the largest single allocation the parse made and how
/// long it took.
fn parse_measured(bytes: Vec<u8>) -> (Result<GgufFile, GgufError>, usize, Duration) {
    LARGEST.with(|m| m.set(0));
    let t = Instant::now();
    let r = GgufFile::from_bytes(bytes);
    let dt = t.elapsed();
    (r, LARGEST.with(|m| m.get()), dt)
}

/// Parses a corrupt file that must be rejected cheaply: at most 64 KiB in one allocation and
/// well under a second (the files here are tiny, so a legitimate parse takes microseconds).
fn reject(bytes: Vec<u8>) -> GgufError {
    let (r, largest, dt) = parse_measured(bytes);
    let e = r.expect_err("corrupt file parsed");
    assert!(largest <= 64 << 10, "{e}: parse allocated {largest} bytes at once");
    assert!(dt < Duration::from_secs(1), "{e}: parse took {dt:?}");
    e
}

// ---------------------------------------------------------------------------------------------
// Hand-crafted files.

const GGUF_F32: u32 = 0;
const GGUF_Q8_0: u32 = 8;

/// Builds GGUF bytes field by field, so that any field can hold anything.
struct Raw(Vec<u8>);

impl Raw {
    fn new(n_tensors: u64, n_kv: u64) -> Self {
        let mut r = Raw(b"GGUF".to_vec());
        r.u32(3).u64(n_tensors).u64(n_kv);
        r
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn str(&mut self, s: &[u8]) -> &mut Self {
        self.u64(s.len() as u64).raw(s)
    }
    fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.str(key.as_bytes()).u32(ValueType::U32 as u32).u32(v)
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name.as_bytes()).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    /// Pads to 32 and appends `n` data bytes.
    fn data(&mut self, n: usize) -> Vec<u8> {
        let mut b = std::mem::take(&mut self.0);
        b.resize(b.len().div_ceil(32) * 32, 0);
        b.resize(b.len() + n, 0x55);
        b
    }
}

/// A file with one F32 tensor "x" of dims `dims` and `n_data` data bytes.
fn one_tensor(dims: &[u64], ty: u32, offset: u64, n_data: usize) -> Vec<u8> {
    let mut r = Raw::new(1, 1);
    r.kv_u32("general.x", 1).tensor("x", dims, ty, offset);
    r.data(n_data)
}

/// A synthetic model with all kinds of metadata and three tensors, the last of which ends
/// exactly at the end of the file (no trailing padding, so that every truncation loses data).
fn synthetic() -> Vec<u8> {
    let mut rng = common::Rng(7);
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("general.name", Value::String("tést 模型".into()));
    w.set("general.alignment", Value::U32(32));
    w.set("llama.block_count", Value::U32(1));
    w.set("llama.rope.freq_base", Value::F32(10000.0));
    w.set("llama.flag", Value::Bool(true));
    w.set("llama.i64", Value::I64(-3));
    w.set("llama.f64", Value::F64(0.5));
    w.set("llama.u8", Value::U8(3));
    w.set("llama.i16", Value::I16(-3));
    w.set(
        "tokenizer.ggml.tokens",
        Value::Array(ValueType::String, ["<s>", "</s>", "a", "b", "", "ü"].iter().map(|s| Value::String(s.to_string())).collect()),
    );
    w.set("tokenizer.ggml.scores", Value::Array(ValueType::F32, (0..6).map(|i| Value::F32(i as f32)).collect()));
    w.set("tokenizer.ggml.token_type", Value::Array(ValueType::I32, (0..6).map(Value::I32).collect()));
    w.set(
        "nested",
        Value::Array(ValueType::Array, vec![Value::Array(ValueType::U16, vec![Value::U16(1)]), Value::Array(ValueType::Bool, vec![])]),
    );
    w.set("empty", Value::Array(ValueType::U64, vec![]));
    let bytes = |n: usize, rng: &mut common::Rng| (0..n).map(|_| rng.next_u64() as u8).collect::<Vec<u8>>();
    w.add_tensor("token_embd.weight", &[64, 4], GgmlType::Q8_0, bytes(8 * 34, &mut rng));
    w.add_f32("output_norm.weight", &[8], &rng.vec(8));
    w.add_tensor("blk.0.ffn_down.weight", &[256, 2], GgmlType::Q4_K, bytes(2 * 144, &mut rng));
    let b = w.to_bytes();
    let f = GgufFile::from_bytes(b.clone()).unwrap();
    let last = f.tensors().last().unwrap();
    assert_eq!(last.offset + last.n_bytes, b.len() as u64, "the synthetic file must have no trailing padding");
    b
}

/// Everything a caller might touch on a file that parsed (what the fuzz target does too).
fn touch(f: &GgufFile) {
    for t in f.tensors() {
        assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes);
        assert_eq!(t.ty.bytes_for(t.n_elements()), Some(t.n_bytes));
        assert_eq!(t.offset % f.alignment, 0);
        let _ = t.rows_cols();
    }
    for (k, v) in f.metadata() {
        let _ = v.summary();
        assert!(f.get(k).is_some());
    }
}

fn real_model_bytes() -> Option<Vec<u8>> {
    common::default_model().map(|p| std::fs::read(p).unwrap())
}

// ---------------------------------------------------------------------------------------------
// Header fields.

#[test]
fn bad_magic() {
    for magic in [*b"GGUG", *b"gguf", *b"GGML", *b"GGJT", [0; 4], [0xff; 4], *b"PWRJ"] {
        let mut b = synthetic();
        b[..4].copy_from_slice(&magic);
        let e = reject(b);
        assert!(matches!(e, GgufError::BadMagic(m) if m == magic), "{e:?}");
        assert!(e.to_string().contains("not a GGUF file"), "{e}");
    }
}

#[test]
fn bad_version() {
    for v in [0u32, 1, 4, 5, 0x0300_0000, u32::MAX] {
        let mut b = synthetic();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        let e = reject(b);
        assert!(matches!(e, GgufError::BadVersion(x) if x == v), "{e:?}");
        assert!(e.to_string().contains(&v.to_string()), "{e}");
    }
}

#[test]
fn too_short_for_the_fixed_header() {
    for (len, what) in [(0, "magic"), (3, "magic"), (4, "version"), (7, "version"), (8, "tensor count"), (16, "metadata count"), (23, "metadata count")] {
        let e = reject(synthetic()[..len].to_vec());
        match &e {
            GgufError::Truncated { what: w, len: l, needed } => {
                assert_eq!(w, what);
                assert_eq!(*l, len as u64);
                assert!(*needed > *l);
            }
            _ => panic!("{len} bytes: {e:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Truncation.

#[test]
fn truncation_at_every_offset_of_a_synthetic_file() {
    let full = synthetic();
    let f = GgufFile::from_bytes(full.clone()).unwrap();
    let data_offset = f.data_offset as usize;
    let tensors = f.tensors().to_vec();
    for cut in 0..full.len() {
        let r = catch_unwind(|| GgufFile::from_bytes(full[..cut].to_vec()));
        let e = match r {
            Err(_) => panic!("truncation at {cut} of {} panicked", full.len()),
            Ok(Ok(_)) => panic!("truncation at {cut} of {} parsed", full.len()),
            Ok(Err(e)) => e,
        };
        match &e {
            GgufError::Truncated { len, needed, .. } => {
                assert!(cut < data_offset, "{cut}: {e}");
                assert_eq!(*len, cut as u64);
                assert!(*needed > *len, "{e}");
            }
            // A count that the remaining bytes cannot hold.
            GgufError::Absurd { .. } => assert!(cut < data_offset, "{cut}: {e}"),
            GgufError::TensorOutOfBounds { name, end, len, .. } => {
                assert_eq!(*len, cut as u64);
                assert!(*end > *len);
                let t = tensors.iter().find(|t| &t.name == name).unwrap();
                assert!(t.offset + t.n_bytes > cut as u64, "{e}");
                assert!(e.to_string().contains(name.as_str()));
            }
            _ => panic!("truncation at {cut}: unexpected {e:?}"),
        }
    }
}

#[test]
fn truncation_of_the_real_model() {
    let Some(path) = common::default_model() else { return };
    let f = GgufFile::open(&path).unwrap();
    let full = f.bytes();
    let len = full.len();
    let header = f.data_offset as usize;
    let mut cuts: Vec<usize> = Vec::new();
    // 100 cuts spread over the header, plus its first and last bytes.
    cuts.extend((0..100).map(|i| i * header / 100 + 7 * i));
    cuts.extend([1, 24, 25, header - 1, header]);
    // 100 cuts over the data, including at the start and one byte short of the end of tensors.
    cuts.extend((0..100).map(|i| header + i * (len - header) / 100 + 13 * i));
    for t in f.tensors().iter().take(5) {
        cuts.push((t.offset + t.n_bytes - 1) as usize);
    }
    cuts.push(len - 1);
    assert!(cuts.len() >= 200);
    for &cut in &cuts {
        assert!(cut < len);
        // Only the header's bytes matter to the parser; the rest can be zeros, which costs nothing.
        let mut b = vec![0u8; cut];
        let n = cut.min(header);
        b[..n].copy_from_slice(&full[..n]);
        let e = match catch_unwind(AssertUnwindSafe(|| GgufFile::from_bytes(b))) {
            Err(_) => panic!("truncating the real model at {cut} panicked"),
            Ok(Ok(_)) => panic!("the real model truncated at {cut} parsed"),
            Ok(Err(e)) => e,
        };
        if cut >= header {
            assert!(matches!(&e, GgufError::TensorOutOfBounds { len, .. } if *len == cut as u64), "{cut}: {e:?}");
        } else {
            assert!(matches!(e, GgufError::Truncated { .. } | GgufError::Absurd { .. } | GgufError::TensorOutOfBounds { .. }), "{cut}: {e:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor descriptions.

#[test]
fn tensor_data_out_of_bounds() {
    // 4 F32 = 16 bytes; the data has 16 bytes but the offsets say otherwise.
    for (offset, n_data) in [(0u64, 15usize), (32, 16), (1 << 40, 16), (1 << 63, 16), (u64::MAX - 31, 16)] {
        let e = reject(one_tensor(&[4], GGUF_F32, offset, n_data));
        assert!(matches!(&e, GgufError::TensorOutOfBounds { name, end, len, .. } if name == "x" && end > len), "{offset}: {e:?}");
        assert!(e.to_string().contains("\"x\""), "{e}");
    }
    // The data offset must be aligned.
    let e = reject(one_tensor(&[4], GGUF_F32, 8, 64));
    assert!(matches!(&e, GgufError::BadTensor { name, reason } if name == "x" && reason.contains("aligned")), "{e:?}");
    // In bounds is fine.
    GgufFile::from_bytes(one_tensor(&[4], GGUF_F32, 0, 16)).unwrap();
    GgufFile::from_bytes(one_tensor(&[4], GGUF_F32, 32, 48)).unwrap();
}

#[test]
fn overlapping_tensors() {
    // (name, n_f32, offset): "a" is 64 bytes at 0.
    type Tensors<'a> = &'a [(&'a str, u64, u64)];
    let cases: [(Tensors, Option<(&str, &str)>); 5] = [
        (&[("a", 16, 0), ("b", 8, 32)], Some(("a", "b"))),
        (&[("a", 16, 0), ("b", 8, 0)], None), // same offset: either order of names
        (&[("b", 8, 32), ("a", 16, 0)], Some(("a", "b"))), // reported in file-offset order
        (&[("a", 16, 0), ("b", 8, 64), ("c", 8, 64)], None),
        (&[("a", 16, 0), ("b", 8, 96), ("c", 16, 64)], Some(("c", "b"))),
    ];
    for (tensors, want) in cases {
        let mut r = Raw::new(tensors.len() as u64, 0);
        for &(name, n, off) in tensors {
            r.tensor(name, &[n], GGUF_F32, off);
        }
        let e = reject(r.data(256));
        let GgufError::TensorOverlap { a, b } = &e else { panic!("{tensors:?}: {e:?}") };
        if let Some((wa, wb)) = want {
            assert_eq!((a.as_str(), b.as_str()), (wa, wb));
        }
        assert!(e.to_string().contains(a.as_str()) && e.to_string().contains(b.as_str()), "{e}");
    }
    // Touching but not overlapping, in any order, with gaps: fine.
    let mut r = Raw::new(3, 0);
    r.tensor("c", &[8], GGUF_F32, 96).tensor("a", &[16], GGUF_F32, 0).tensor("b", &[8], GGUF_F32, 64);
    let f = GgufFile::from_bytes(r.data(128)).unwrap();
    assert_eq!(f.tensors().len(), 3);
}

#[test]
fn unknown_tensor_type() {
    // 4 and 5 were Q4_2/Q4_3, 16..=23 and 29 are IQ types, 31..=33 removed, 34+ newer.
    for ty in [4u32, 5, 16, 19, 23, 29, 31, 34, 39, 1000, u32::MAX] {
        let e = reject(one_tensor(&[256], ty, 0, 1024));
        assert!(matches!(&e, GgufError::UnknownTensorType { name, ty: t } if name == "x" && *t == ty), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("\"x\"") && msg.contains(&ty.to_string()), "{msg}");
    }
    for ty in GgmlType::ALL {
        assert_eq!(GgmlType::from_u32(ty as u32), Some(ty));
    }
}

#[test]
fn bad_dimensions() {
    let cases: [(&[u64], u32, &str); 6] = [
        (&[], GGUF_F32, "dimensions"),
        (&[1, 1, 1, 1, 1], GGUF_F32, "dimensions"),
        (&[4, 0], GGUF_F32, "zero"),
        (&[0], GGUF_F32, "zero"),
        (&[33], GGUF_Q8_0, "multiple"),
        (&[16, 32], GGUF_Q8_0, "multiple"),
    ];
    for (dims, ty, word) in cases {
        let e = reject(one_tensor(dims, ty, 0, 4096));
        assert!(matches!(&e, GgufError::BadTensor { name, reason } if name == "x" && reason.contains(word)), "{dims:?}: {e:?}");
        assert!(e.to_string().contains("\"x\""), "{e}");
    }
    // A dimension count of u32::MAX is refused before anything is read or allocated.
    let mut r = Raw::new(1, 0);
    r.str(b"huge").u32(u32::MAX).raw(&[0; 64]);
    let e = reject(r.0);
    assert!(matches!(&e, GgufError::BadTensor { name, .. } if name == "huge"), "{e:?}");
}

#[test]
fn absurd_counts_are_rejected_without_allocating() {
    // Tensor and metadata counts.
    for (n_tensors, n_kv, what) in [(1u64 << 60, 0u64, "tensor count"), (u64::MAX, 0, "tensor count"), (0, 1 << 60, "metadata count"), (0, u64::MAX, "metadata count")] {
        let mut r = Raw::new(n_tensors, n_kv);
        r.raw(&[0; 256]);
        let e = reject(r.0);
        assert!(matches!(&e, GgufError::Absurd { what: w, value, .. } if w == what && *value == n_tensors.max(n_kv)), "{e:?}");
    }
    // Array lengths, of scalars, strings and arrays.
    for (ety, len) in [(ValueType::U8, 1u64 << 62), (ValueType::U64, 1 << 62), (ValueType::String, 1 << 62), (ValueType::Array, 1 << 62), (ValueType::U8, u64::MAX), (ValueType::U8, 1000)] {
        let mut r = Raw::new(0, 1);
        r.str(b"big.array").u32(ValueType::Array as u32).u32(ety as u32).u64(len).raw(&[0; 100]);
        let e = reject(r.0);
        assert!(matches!(&e, GgufError::Absurd { what, value, .. } if what.contains("big.array") && *value == len), "{ety:?}: {e:?}");
    }
    // Nested: the inner array's length is checked too.
    let mut r = Raw::new(0, 1);
    r.str(b"nest").u32(ValueType::Array as u32).u32(ValueType::Array as u32).u64(1).u32(ValueType::I32 as u32).u64(1 << 62).raw(&[0; 64]);
    let e = reject(r.0);
    assert!(matches!(&e, GgufError::Absurd { what, .. } if what.contains("nest")), "{e:?}");

    // String lengths: key, string value, string in an array, tensor name. u64::MAX used to
    // overflow the offset arithmetic of the error (found by the fuzzer).
    for len in [1u64 << 63, u64::MAX, u64::MAX - 8, 1000] {
        let mut r = Raw::new(0, 1);
        r.u64(len).raw(&[b'k'; 32]);
        let e = reject(r.0);
        assert!(matches!(&e, GgufError::Truncated { what, .. } if what.contains("key of metadata entry 0")), "{e:?}");

        let mut r = Raw::new(0, 1);
        r.str(b"my.key").u32(ValueType::String as u32).u64(len).raw(b"value");
        let e = reject(r.0);
        assert!(matches!(&e, GgufError::Truncated { what, needed, .. } if what.contains("my.key") && *needed == 32 + 6 + 4 + 8 + len.min(u64::MAX - 50)), "{e:?}");

        let mut r = Raw::new(0, 1);
        r.str(b"arr").u32(ValueType::Array as u32).u32(ValueType::String as u32).u64(2).str(b"ok").u64(len).raw(b"xx");
        let e = reject(r.0);
        assert!(matches!(&e, GgufError::Truncated { what, .. } if what.contains("arr")), "{e:?}");

        let mut r = Raw::new(1, 0);
        r.u64(len).raw(&[b'n'; 40]);
        let e = reject(r.0);
        assert!(matches!(&e, GgufError::Truncated { what, .. } if what.contains("name of tensor 0")), "{e:?}");
    }
    // Dimensions whose product overflows u64, or is beyond any real tensor.
    for dims in [&[1u64 << 32, 1 << 32, 1 << 32][..], &[u64::MAX, 2], &[u64::MAX], &[1 << 41], &[1 << 20, 1 << 20, 1 << 20, 1 << 20]] {
        let e = reject(one_tensor(dims, GGUF_F32, 0, 64));
        assert!(matches!(&e, GgufError::Absurd { what, .. } if what.contains("\"x\"")), "{dims:?}: {e:?}");
    }
    // Deeply nested arrays.
    let mut r = Raw::new(0, 1);
    r.str(b"deep").u32(ValueType::Array as u32);
    for _ in 0..64 {
        r.u32(ValueType::Array as u32).u64(1);
    }
    r.raw(&[0; 64]);
    let e = reject(r.0);
    assert!(matches!(&e, GgufError::Absurd { what, .. } if what.contains("deep")), "{e:?}");
}

/// Regression (found by fuzz/ gguf_parse within seconds): a metadata key whose length field is
/// u64::MAX, after valid entries, made the Truncated error's `needed` offset overflow, a panic in
/// builds with overflow checks. The crash input was the seed "every-value" with a run of 0xff
/// bytes inserted right after the value of "t.f32.subnormal".
#[test]
fn regression_key_length_u64_max_after_valid_entries() {
    let mut r = Raw::new(0, 3);
    r.kv_u32("t.u32", 1).str(b"t.f32.subnormal").u32(ValueType::F32 as u32).u32(1);
    let pos = r.0.len() as u64;
    r.u64(u64::MAX).raw(&[0xff; 64]);
    let e = reject(r.0);
    match e {
        GgufError::Truncated { what, needed, len } => {
            assert_eq!(what, "key of metadata entry 2");
            assert_eq!(needed, u64::MAX, "saturates");
            assert_eq!(len, pos + 8 + 64);
        }
        _ => panic!("{e:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata.

#[test]
fn unknown_metadata_value_type() {
    for ty in [13u32, 14, 99, 0x8000_0000, u32::MAX] {
        let mut r = Raw::new(0, 2);
        r.kv_u32("ok", 1).str(b"weird.key").u32(ty).raw(&[0; 16]);
        let e = reject(r.0);
        assert!(matches!(&e, GgufError::UnknownValueType { key, ty: t } if key == "weird.key" && *t == ty), "{e:?}");
        assert!(e.to_string().contains("weird.key") && e.to_string().contains(&ty.to_string()), "{e}");
        // As an array's element type.
        let mut r = Raw::new(0, 1);
        r.str(b"weird.array").u32(ValueType::Array as u32).u32(ty).u64(1).raw(&[0; 16]);
        let e = reject(r.0);
        assert!(matches!(&e, GgufError::UnknownValueType { key, ty: t } if key == "weird.array" && *t == ty), "{e:?}");
    }
}

#[test]
fn invalid_utf8() {
    for bad in [&b"\xff"[..], b"abc\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"ok\xf4\x90\x80\x80"] {
        // A key: reported with its offset (24 bytes of header, 8 of length).
        let mut r = Raw::new(0, 1);
        r.str(bad).u32(ValueType::U8 as u32).raw(&[0]);
        let e = reject(r.0);
        assert!(matches!(e, GgufError::InvalidUtf8 { offset: 32 }), "{bad:?}: {e:?}");
        assert!(e.to_string().contains("32"), "{e}");
        // A string value names its key.
        let mut r = Raw::new(0, 2);
        r.kv_u32("first", 1).str(b"general.name").u32(ValueType::String as u32).str(bad);
        let e = reject(r.0);
        assert!(matches!(&e, GgufError::BadMetadata { key, reason } if key == "general.name" && reason.contains("UTF-8")), "{e:?}");
        // So does a string inside an array.
        let mut r = Raw::new(0, 1);
        r.str(b"tokens").u32(ValueType::Array as u32).u32(ValueType::String as u32).u64(2).str(b"a").str(bad);
        let e = reject(r.0);
        assert!(matches!(&e, GgufError::BadMetadata { key, .. } if key == "tokens"), "{e:?}");
        // A tensor name.
        let mut r = Raw::new(1, 0);
        let mut name = b"blk.0.".to_vec();
        name.extend_from_slice(bad);
        r.str(&name).u32(1).u64(4).u32(GGUF_F32).u64(0);
        let e = reject(r.data(16));
        assert!(matches!(&e, GgufError::BadTensor { name, reason } if name.starts_with("blk.0.") && reason.contains("UTF-8")), "{e:?}");
    }
}

#[test]
fn duplicates() {
    // Keys: the writer replaces, so patch the second key into the first.
    let mut w = GgufWriter::new();
    w.set("dup.kex", Value::U32(1)).set("dup.key", Value::U32(2));
    let mut b = w.to_bytes();
    let at = b.windows(7).position(|w| w == b"dup.kex").unwrap();
    b[at + 6] = b'y';
    let e = reject(b);
    assert!(matches!(&e, GgufError::Duplicate { what: "metadata key", name } if name == "dup.key"), "{e:?}");
    assert!(e.to_string().contains("dup.key"), "{e}");
    // Tensors: the writer does not check.
    let mut w = GgufWriter::new();
    w.add_f32("w", &[2], &[1.0, 2.0]).add_f32("v", &[2], &[1.0, 2.0]).add_f32("w", &[2], &[3.0, 4.0]);
    let e = reject(w.to_bytes());
    assert!(matches!(&e, GgufError::Duplicate { what: "tensor", name } if name == "w"), "{e:?}");
    assert!(e.to_string().contains("\"w\""), "{e}");
}

#[test]
fn bad_alignment() {
    let bad = [Value::U32(0), Value::U32(3), Value::U64(48), Value::U32(1 << 21), Value::U64(1 << 63), Value::I32(-32), Value::String("32".into()), Value::F32(32.0), Value::Array(ValueType::U32, vec![Value::U32(32)])];
    for v in bad {
        let mut w = GgufWriter::new();
        w.set("general.alignment", v.clone());
        w.add_f32("x", &[2], &[1.0, 2.0]);
        let e = reject(w.to_bytes());
        assert!(matches!(&e, GgufError::BadMetadata { key, .. } if key == "general.alignment"), "{v:?}: {e:?}");
        assert!(e.to_string().contains("general.alignment"), "{e}");
    }
    // Powers of two of any integer type are fine.
    for v in [Value::U8(16), Value::I32(64), Value::U64(1 << 20), Value::U16(1)] {
        let mut w = GgufWriter::new();
        w.set("general.alignment", v.clone());
        w.add_f32("x", &[2], &[1.0, 2.0]);
        let f = GgufFile::from_bytes(w.to_bytes()).unwrap_or_else(|e| panic!("{v:?}: {e}"));
        assert_eq!(f.alignment, v.as_u64().unwrap());
    }
}

#[test]
fn bad_bool() {
    let mut r = Raw::new(0, 1);
    r.str(b"my.flag").u32(ValueType::Bool as u32).raw(&[2]);
    let e = reject(r.0);
    assert!(matches!(&e, GgufError::BadMetadata { key, .. } if key == "my.flag"), "{e:?}");
}

#[test]
fn truncated_tensor_info_names_the_tensor() {
    let mut r = Raw::new(1, 0);
    r.tensor("blk.3.attn_q.weight", &[4, 4], GGUF_F32, 0);
    let full = r.0.clone();
    let name_end = 24 + 8 + "blk.3.attn_q.weight".len();
    for (cut, what) in [(name_end + 2, "dimension count"), (name_end + 4 + 12, "dimensions"), (name_end + 4 + 16 + 2, "type"), (name_end + 4 + 16 + 4 + 7, "data offset")] {
        let e = reject(full[..cut].to_vec());
        let msg = e.to_string();
        assert!(matches!(&e, GgufError::Truncated { what: w, .. } if w.contains(what)), "{cut}: {e:?}");
        assert!(msg.contains("blk.3.attn_q.weight"), "{msg}");
    }
}

// ---------------------------------------------------------------------------------------------
// Random bit flips.

/// Flips 1 to 4 random bits at positions from `pick`, parses, and counts outcomes; panics are
/// collected with their seed and offsets and reported together.
fn bit_flip_trials(base: &[u8], trials: u64, seed0: u64, make: impl Fn(&[u8]) -> Vec<u8>, pick: impl Fn(&mut common::Rng) -> usize) -> (usize, usize) {
    let (mut ok, mut err) = (0, 0);
    let mut panics = Vec::new();
    for trial in 0..trials {
        let seed = seed0 + trial;
        let mut rng = common::Rng(seed);
        let mut b = make(base);
        let n = 1 + rng.next_u64() % 4;
        let mut flips = Vec::new();
        for _ in 0..n {
            let at = pick(&mut rng);
            let bit = rng.next_u64() % 8;
            b[at] ^= 1 << bit;
            flips.push((at, bit));
        }
        match catch_unwind(AssertUnwindSafe(|| GgufFile::from_bytes(b).map(|f| touch(&f)))) {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                assert!(!e.to_string().is_empty());
                err += 1
            }
            Err(_) => panics.push(format!("seed {seed}: flips (offset, bit) {flips:?}")),
        }
    }
    assert!(panics.is_empty(), "{} of {trials} bit-flip trials panicked:\n{}", panics.len(), panics.join("\n"));
    (ok, err)
}

#[test]
fn bit_flips_in_a_synthetic_header() {
    let base = synthetic();
    let header = GgufFile::from_bytes(base.clone()).unwrap().data_offset as usize;
    let (ok, err) = bit_flip_trials(&base, 3000, 1_000_000, |b| b.to_vec(), |rng| (rng.next_u64() % header as u64) as usize);
    eprintln!("synthetic header bit flips: {ok} parsed, {err} rejected");
    assert!(ok > 100 && err > 100, "{ok} parsed, {err} rejected");
}

#[test]
fn bit_flips_in_the_real_models_header() {
    let Some(full) = real_model_bytes() else { return };
    let f = GgufFile::from_bytes(full.clone()).unwrap();
    let header = f.data_offset as usize;
    drop(f);
    // The tensor descriptions start with token_embd.weight's name; the first KiB holds the
    // general and llama keys. Half the flips go to those structured parts, half anywhere in the
    // first 2 MiB (mostly tokenizer strings, and the start of token_embd's data).
    let mut needle = 17u64.to_le_bytes().to_vec();
    needle.extend_from_slice(b"token_embd.weight");
    let infos = full[..header].windows(needle.len()).position(|w| w == needle).unwrap();
    let two_mib = 2 << 20;
    let prefix = full[..two_mib].to_vec();
    let len = full.len();
    drop(full);
    let pick = |rng: &mut common::Rng| {
        let r = rng.next_u64();
        (match r % 4 {
            0 => r >> 8,
            1 => infos as u64 + (r >> 8) % (header - infos) as u64,
            _ => (r >> 8) % two_mib as u64,
        } % two_mib as u64) as usize
    };
    // The copy is zeros beyond the first 2 MiB (tensor data is never read while parsing), so a
    // trial costs a copy of 2 MiB and a parse of ~100k tokenizer strings.
    let make = |p: &[u8]| {
        let mut b = vec![0u8; len];
        b[..p.len()].copy_from_slice(p);
        b
    };
    let (ok, err) = bit_flip_trials(&prefix, 1000, 2_000_000, make, pick);
    eprintln!("real model header bit flips: {ok} parsed, {err} rejected");
    assert!(ok > 50 && err > 50, "{ok} parsed, {err} rejected");
}
