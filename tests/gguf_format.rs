//! GGUF format round trips: everything `GgufWriter` can write, `GgufFile` must read back exactly,
//! and the real model must read with the layout llama.cpp gave it.
//!
//! Setting `EMBER_FUZZ_CORPUS=DIR` makes `write_fuzz_seed_corpus` write the fuzzer's seed files
//! into DIR (see fuzz/README.md).

mod common;

use ember::gguf::{GgmlType, GgufError, GgufFile, GgufWriter, Magic, Value, ValueType};

fn random_bytes(rng: &mut common::Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

/// Compares values, treating floats bit for bit (so NaN payloads and -0.0 must survive).
fn assert_same_value(key: &str, got: &Value, want: &Value) {
    match (got, want) {
        (Value::F32(a), Value::F32(b)) => assert_eq!(a.to_bits(), b.to_bits(), "{key}"),
        (Value::F64(a), Value::F64(b)) => assert_eq!(a.to_bits(), b.to_bits(), "{key}"),
        (Value::Array(ta, a), Value::Array(tb, b)) => {
            assert_eq!(ta, tb, "{key}: array element type");
            assert_eq!(a.len(), b.len(), "{key}: array length");
            for (x, y) in a.iter().zip(b) {
                assert_same_value(key, x, y);
            }
        }
        _ => assert_eq!(got, want, "{key}"),
    }
}

/// Every value type, with edge cases: extremes, NaN, -0.0, empty and unicode strings, empty arrays
/// of every element type, nested and empty nested arrays. Keys include unicode and the empty key.
fn every_value() -> Vec<(String, Value)> {
    use Value::*;
    let mut kv: Vec<(std::string::String, Value)> = vec![
        ("t.u8.max".into(), U8(u8::MAX)),
        ("t.u8.zero".into(), U8(0)),
        ("t.i8.min".into(), I8(i8::MIN)),
        ("t.i8.max".into(), I8(i8::MAX)),
        ("t.u16".into(), U16(u16::MAX)),
        ("t.i16".into(), I16(i16::MIN)),
        ("t.u32".into(), U32(u32::MAX)),
        ("t.i32".into(), I32(i32::MIN)),
        ("t.f32".into(), F32(1.0e-5)),
        ("t.f32.neg_zero".into(), F32(-0.0)),
        ("t.f32.nan".into(), F32(f32::from_bits(0x7fc0_1234))),
        ("t.f32.inf".into(), F32(f32::NEG_INFINITY)),
        ("t.f32.subnormal".into(), F32(f32::from_bits(1))),
        ("t.bool.true".into(), Bool(true)),
        ("t.bool.false".into(), Bool(false)),
        ("t.string".into(), String("hello".into())),
        ("t.string.empty".into(), String(std::string::String::new())),
        ("t.string.unicode".into(), String("héllo wörld 你好 🦀 \u{0}\u{7f}\u{10ffff}".into())),
        ("t.string.long".into(), String("x".repeat(10_000))),
        ("t.u64".into(), U64(u64::MAX)),
        ("t.i64".into(), I64(i64::MIN)),
        ("t.f64".into(), F64(std::f64::consts::PI)),
        ("t.f64.nan".into(), F64(f64::from_bits(0xfff8_0000_0000_0001))),
        ("clé.unicode.名前.🦀".into(), U32(7)),
        ("".into(), String("the empty key".into())),
    ];
    // Arrays of every scalar type, each with two distinct elements.
    let pairs: Vec<(ValueType, Vec<Value>)> = vec![
        (ValueType::U8, vec![U8(0), U8(255)]),
        (ValueType::I8, vec![I8(-128), I8(127)]),
        (ValueType::U16, vec![U16(1), U16(65535)]),
        (ValueType::I16, vec![I16(-1), I16(32767)]),
        (ValueType::U32, vec![U32(1), U32(u32::MAX)]),
        (ValueType::I32, vec![I32(-5), I32(i32::MAX)]),
        (ValueType::F32, vec![F32(0.5), F32(-1e30)]),
        (ValueType::Bool, vec![Bool(true), Bool(false)]),
        (ValueType::String, vec![String("a".into()), String(std::string::String::new()), String("ü".into())]),
        (ValueType::U64, vec![U64(0), U64(u64::MAX)]),
        (ValueType::I64, vec![I64(i64::MIN), I64(-1)]),
        (ValueType::F64, vec![F64(1e300), F64(-0.0)]),
    ];
    for (ty, items) in pairs {
        kv.push((format!("t.array.{ty:?}"), Array(ty, items)));
        kv.push((format!("t.array.empty.{ty:?}"), Array(ty, vec![])));
    }
    kv.push(("t.array.empty.Array".into(), Array(ValueType::Array, vec![])));
    // Nested arrays: [[1, 2], [], [3]] of u32, arrays of strings, and three levels deep.
    kv.push((
        "t.array.nested".into(),
        Array(
            ValueType::Array,
            vec![
                Array(ValueType::U32, vec![U32(1), U32(2)]),
                Array(ValueType::U32, vec![]),
                Array(ValueType::U32, vec![U32(3)]),
            ],
        ),
    ));
    kv.push((
        "t.array.nested.strings".into(),
        Array(ValueType::Array, vec![Array(ValueType::String, vec![String("x".into()), String("".into())]), Array(ValueType::String, vec![])]),
    ));
    kv.push((
        "t.array.nested.deep".into(),
        Array(
            ValueType::Array,
            vec![Array(ValueType::Array, vec![Array(ValueType::I8, vec![I8(-1)]), Array(ValueType::F64, vec![])]), Array(ValueType::Bool, vec![])],
        ),
    ));
    // A large array, like a tokenizer's.
    kv.push(("t.array.big".into(), Array(ValueType::I32, (0..5000).map(I32).collect())));
    kv
}

fn writer_with(kv: &[(String, Value)]) -> GgufWriter {
    let mut w = GgufWriter::new();
    for (k, v) in kv {
        w.set(k, v.clone());
    }
    w
}

#[test]
fn every_metadata_type_round_trips() {
    let kv = every_value();
    let bytes = writer_with(&kv).to_bytes();
    let f = GgufFile::from_bytes(bytes.clone()).expect("parse");
    assert_eq!(f.magic, Magic::Gguf);
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 32);
    assert!(f.tensors().is_empty());
    // Order is preserved, and every key is found by get().
    assert_eq!(f.metadata().len(), kv.len());
    for ((k, v), (gk, gv)) in kv.iter().zip(f.metadata()) {
        assert_eq!(k, gk);
        assert_same_value(k, gv, v);
        assert_same_value(k, f.get(k).unwrap_or_else(|| panic!("get({k:?})")), v);
        assert_eq!(gv.value_type(), v.value_type(), "{k}");
        assert!(!gv.summary().is_empty() || matches!(gv, Value::String(_)), "{k}");
    }
    assert!(f.get("t.missing").is_none());
    assert!(f.get("t.u8").is_none(), "no prefix matching");
    // The typed getters.
    assert_eq!(f.get_u64("t.u64").unwrap(), u64::MAX);
    assert_eq!(f.get_u64("t.u8.max").unwrap(), 255);
    assert_eq!(f.get_u64("clé.unicode.名前.🦀").unwrap(), 7);
    assert_eq!(f.get_f32("t.f32").unwrap(), 1.0e-5);
    assert_eq!(f.get_f32("t.u16").unwrap(), 65535.0);
    assert_eq!(f.get_str("t.string").unwrap(), "hello");
    assert_eq!(f.get_str("t.string.empty").unwrap(), "");
    assert_eq!(f.get_str("t.string.unicode").unwrap(), "héllo wörld 你好 🦀 \u{0}\u{7f}\u{10ffff}");
    assert_eq!(f.get_str("").unwrap(), "the empty key");
    // Getter errors name the key.
    for (key, err) in [
        ("t.i8.min", f.get_u64("t.i8.min").unwrap_err()),
        ("t.string", f.get_u64("t.string").unwrap_err()),
        ("t.u32", f.get_str("t.u32").unwrap_err()),
        ("t.array.U8", f.get_f32("t.array.U8").unwrap_err()),
        ("no.such.key", f.get_str("no.such.key").unwrap_err()),
    ] {
        assert!(matches!(&err, GgufError::BadMetadata { key: k, .. } if k == key), "{err:?}");
        assert!(err.to_string().contains(key), "{err}");
    }

    // Writing what was read gives the same bytes.
    let again: Vec<(String, Value)> = f.metadata().to_vec();
    assert_eq!(writer_with(&again).to_bytes(), bytes);
}

#[test]
fn writer_set_replaces_a_key_in_place() {
    let mut w = GgufWriter::new();
    w.set("a", Value::U32(1)).set("b", Value::U32(2)).set("a", Value::String("again".into()));
    let f = GgufFile::from_bytes(w.to_bytes()).unwrap();
    let keys: Vec<&str> = f.metadata().iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["a", "b"]);
    assert_eq!(f.get_str("a").unwrap(), "again");
}

/// One tensor of every type, of several shapes; data must come back byte-exact.
#[test]
fn tensors_of_every_type_round_trip() {
    let mut rng = common::Rng(1);
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("test".into()));
    let mut want = Vec::new();
    for (i, ty) in GgmlType::ALL.iter().copied().enumerate() {
        let bl = ty.block_len() as u64;
        let shapes: Vec<Vec<u64>> = vec![vec![bl], vec![bl * 2, 3], vec![bl, 2, 3], vec![bl * 3, 1, 2, 2]];
        for (j, dims) in shapes.into_iter().enumerate() {
            let n: u64 = dims.iter().product();
            let n_bytes = ty.bytes_for(n).unwrap();
            let data = random_bytes(&mut rng, n_bytes as usize);
            let name = format!("t{i}.{}.{j}", ty.name());
            w.add_tensor(&name, &dims, ty, data.clone());
            want.push((name, dims, ty, data));
        }
    }
    w.add_f32("plain.f32", &[3, 2], &[1.0, -2.0, 3.5, f32::MAX, f32::MIN_POSITIVE, -0.0]);
    let bytes = w.to_bytes();
    let f = GgufFile::from_bytes(bytes.clone()).unwrap();
    assert_eq!(f.tensors().len(), want.len() + 1);
    assert_eq!(f.data_offset % 32, 0);
    let mut prev_end = f.data_offset;
    for (t, (name, dims, ty, data)) in f.tensors().iter().zip(&want) {
        assert_eq!(&t.name, name);
        assert_eq!(&t.dims, dims, "{name}");
        assert_eq!(t.ty, *ty, "{name}");
        assert_eq!(t.n_elements(), dims.iter().product::<u64>());
        assert_eq!(t.n_bytes, data.len() as u64, "{name}");
        assert_eq!(t.offset % 32, 0, "{name}");
        assert!(t.offset >= prev_end, "{name} follows the previous tensor");
        assert!(t.offset - prev_end < 32, "{name}: no gap beyond alignment padding");
        prev_end = t.offset + t.n_bytes;
        assert_eq!(f.tensor_data(t), &data[..], "{name}");
        let (rows, cols) = t.rows_cols();
        assert_eq!(cols as u64, dims[0]);
        assert_eq!((rows * cols) as u64, t.n_elements());
        assert!(std::ptr::eq(f.tensor(name).unwrap(), t));
    }
    let p = f.tensor("plain.f32").unwrap();
    assert_eq!(p.ty, GgmlType::F32);
    let vals: Vec<f32> = f.tensor_data(p).chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(vals, [1.0, -2.0, 3.5, f32::MAX, f32::MIN_POSITIVE, -0.0]);
    assert!(f.tensor("missing").is_none());
    // The writer pads the last tensor too, so the file ends on an aligned boundary.
    assert_eq!(bytes.len() % 32, 0);
    let last = f.tensors().last().unwrap();
    assert_eq!(bytes.len() as u64, (last.offset + last.n_bytes).div_ceil(32) * 32);
}

#[test]
fn alignments_other_than_32() {
    let mut rng = common::Rng(2);
    for a in [1u64, 2, 8, 64, 256, 4096] {
        for as_u64 in [false, true] {
            let mut w = GgufWriter::new();
            w.set("general.architecture", Value::String("test".into()));
            w.set("general.alignment", if as_u64 { Value::U64(a) } else { Value::U32(a as u32) });
            // Odd sizes so that padding is needed between tensors.
            let specs: [(&str, &[u64], GgmlType); 4] = [
                ("a", &[3], GgmlType::F32),
                ("b", &[5], GgmlType::F16),
                ("c", &[7, 1], GgmlType::I8),
                ("d", &[32, 3], GgmlType::Q4_0),
            ];
            let mut datas = Vec::new();
            for (name, dims, ty) in specs {
                let n = ty.bytes_for(dims.iter().product()).unwrap() as usize;
                let d = random_bytes(&mut rng, n);
                w.add_tensor(name, dims, ty, d.clone());
                datas.push(d);
            }
            let bytes = w.to_bytes();
            let f = GgufFile::from_bytes(bytes.clone()).unwrap_or_else(|e| panic!("alignment {a}: {e}"));
            assert_eq!(f.alignment, a);
            assert_eq!(f.data_offset % a, 0);
            assert_eq!(f.get_u64("general.alignment").unwrap(), a);
            for (t, d) in f.tensors().iter().zip(&datas) {
                assert_eq!(t.offset % a, 0, "alignment {a}: {}", t.name);
                assert_eq!(f.tensor_data(t), &d[..], "alignment {a}: {}", t.name);
            }
            if a == 1 {
                // No padding at all: the data follows the header and the tensors follow each other.
                let total: usize = datas.iter().map(Vec::len).sum();
                assert_eq!(bytes.len() as u64, f.data_offset + total as u64);
                let ts = f.tensors();
                for w in ts.windows(2) {
                    assert_eq!(w[0].offset + w[0].n_bytes, w[1].offset);
                }
            }
        }
    }
}

#[test]
fn powerinfer_magic_round_trips() {
    let build = |magic| {
        let mut w = GgufWriter::new().with_magic(magic);
        w.set("general.architecture", Value::String("llama".into()));
        w.set("powerinfer.sparse_threshold", Value::F32(0.0));
        w.add_f32("x", &[4], &[1.0, 2.0, 3.0, 4.0]);
        w.to_bytes()
    };
    let pwri = build(Magic::PowerInfer);
    let gguf = build(Magic::Gguf);
    assert_eq!(&pwri[..4], b"PWRI");
    assert_eq!(&gguf[..4], b"GGUF");
    assert_eq!(pwri[4..], gguf[4..], "only the magic differs");
    assert_eq!(Magic::PowerInfer.bytes(), b"PWRI");
    let f = GgufFile::from_bytes(pwri).unwrap();
    assert_eq!(f.magic, Magic::PowerInfer);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    let t = f.tensor("x").unwrap();
    assert_eq!(f.tensor_data(t), bytemuck::cast_slice::<f32, u8>(&[1.0, 2.0, 3.0, 4.0]));
}

/// Version 2 has the same layout as version 3 (64-bit counts); it must read identically.
#[test]
fn version_2_reads_the_same() {
    let mut rng = common::Rng(3);
    let mut w = writer_with(&every_value());
    w.add_tensor("q", &[64, 2], GgmlType::Q8_0, random_bytes(&mut rng, 4 * 34));
    w.add_f32("v", &[2], &[0.25, 0.5]);
    let v3 = w.to_bytes();
    let mut v2 = v3.clone();
    v2[4..8].copy_from_slice(&2u32.to_le_bytes());
    let a = GgufFile::from_bytes(v3).unwrap();
    let b = GgufFile::from_bytes(v2).unwrap();
    assert_eq!((a.version, b.version), (3, 2));
    assert_eq!(a.metadata().len(), b.metadata().len());
    for ((ka, va), (kb, vb)) in a.metadata().iter().zip(b.metadata()) {
        assert_eq!(ka, kb);
        assert_same_value(ka, vb, va);
    }
    assert_eq!(a.tensors(), b.tensors());
    assert_eq!(a.data_offset, b.data_offset);
    for t in a.tensors() {
        assert_eq!(a.tensor_data(t), b.tensor_data(t));
    }
}

/// `open` (memory map) and `from_bytes` read a file on disk identically.
#[test]
fn open_matches_from_bytes() {
    let mut w = writer_with(&every_value());
    w.add_f32("w", &[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let path = std::env::temp_dir().join(format!("ember-gguf-format-{}.gguf", std::process::id()));
    w.write_file(&path).unwrap();
    let disk = std::fs::read(&path).unwrap();
    assert_eq!(disk, w.to_bytes());
    let a = GgufFile::open(&path).unwrap();
    let b = GgufFile::from_bytes(disk).unwrap();
    assert_eq!(a.bytes(), b.bytes());
    assert_eq!(a.tensors(), b.tensors());
    assert_eq!(a.metadata().len(), b.metadata().len());
    std::fs::remove_file(&path).unwrap();
    let missing = GgufFile::open(&path).unwrap_err();
    assert!(matches!(missing, GgufError::Io { .. }), "{missing:?}");
    assert!(missing.to_string().contains(&path.display().to_string()), "{missing}");
}

#[test]
fn real_model_layout() {
    let Some(path) = common::default_model() else { return };
    let f = GgufFile::open(&path).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(f.bytes().len() as u64, len);
    assert_eq!(f.magic, Magic::Gguf);
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 32);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_u64("llama.block_count").unwrap(), 30);
    assert_eq!(f.get_u64("llama.embedding_length").unwrap(), 576);
    assert_eq!(f.get_u64("llama.attention.head_count").unwrap(), 9);
    assert_eq!(f.get_u64("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(f.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
    let tokens = f.get("tokenizer.ggml.tokens").unwrap();
    assert!(matches!(tokens, Value::Array(ValueType::String, v) if v.len() == 49152));
    assert!(matches!(f.get("tokenizer.ggml.merges"), Some(Value::Array(ValueType::String, v)) if v.len() == 48900));
    assert!(f.get_str("tokenizer.chat_template").unwrap().contains("message"));

    let ts = f.tensors();
    assert_eq!(ts.len(), 272);
    let emb = f.tensor("token_embd.weight").unwrap();
    assert_eq!(emb.ty, GgmlType::Q8_0);
    assert_eq!(emb.dims, [576, 49152]);
    assert_eq!(emb.n_bytes, 576 * 49152 / 32 * 34);
    assert_eq!(emb.rows_cols(), (49152, 576));
    assert_eq!(f.tensor_data(emb).len() as u64, emb.n_bytes);
    for l in 0..30 {
        for (name, ty) in [("attn_q", GgmlType::Q4_1), ("ffn_down", GgmlType::Q4_1), ("attn_norm", GgmlType::F32)] {
            let t = f.tensor(&format!("blk.{l}.{name}.weight")).unwrap_or_else(|| panic!("blk.{l}.{name}"));
            assert_eq!(t.ty, ty);
        }
    }
    // Every tensor's data is inside the file, sized by its type, aligned, and the tensors lie in
    // file order, packed, from the start of the data section to the end of the file.
    assert_eq!(f.data_offset % 32, 0);
    assert!(f.data_offset > 1_700_000 && f.data_offset < 1_900_000, "data at {}", f.data_offset);
    assert_eq!(ts[0].offset, f.data_offset);
    let mut end = f.data_offset;
    for t in ts {
        assert!(matches!(t.ty, GgmlType::F32 | GgmlType::Q4_1 | GgmlType::Q8_0), "{}: {}", t.name, t.ty);
        assert_eq!(t.ty.bytes_for(t.n_elements()), Some(t.n_bytes), "{}", t.name);
        assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes, "{}", t.name);
        assert_eq!(t.offset % 32, 0, "{}", t.name);
        assert!(t.offset >= end && t.offset - end < 32, "{} at {} after {end}", t.name, t.offset);
        end = t.offset + t.n_bytes;
    }
    assert!(end <= len && len - end < 32, "last tensor ends at {end}, file has {len} bytes");
}

/// The writer reproduces llama.cpp's layout exactly: rewriting the real model's metadata and
/// tensors gives the original file byte for byte.
#[test]
fn real_model_rewrites_byte_identical() {
    let Some(path) = common::default_model() else { return };
    let f = GgufFile::open(&path).unwrap();
    let mut w = writer_with(f.metadata());
    for t in f.tensors() {
        w.add_tensor(&t.name, &t.dims, t.ty, f.tensor_data(t).to_vec());
    }
    let out = w.to_bytes();
    assert_eq!(out.len(), f.bytes().len());
    let first_diff = out.iter().zip(f.bytes()).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "rewritten file differs from the original");
}

/// Small valid files for the fuzzer's seed corpus (written only when EMBER_FUZZ_CORPUS is set).
#[test]
fn write_fuzz_seed_corpus() {
    let Some(dir) = std::env::var_os("EMBER_FUZZ_CORPUS") else { return };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = common::Rng(4);
    let mut seeds: Vec<(&str, Vec<u8>)> = Vec::new();

    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.add_f32("a", &[4], &[1.0, 2.0, 3.0, 4.0]);
    seeds.push(("tiny-f32", w.to_bytes()));

    let small: Vec<(String, Value)> = every_value().into_iter().filter(|(k, _)| k != "t.string.long" && k != "t.array.big").collect();
    seeds.push(("every-value", writer_with(&small).to_bytes()));

    let mut w = writer_with(&small[..6]);
    w.set("general.alignment", Value::U32(8));
    for (i, ty) in [GgmlType::F16, GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K].into_iter().enumerate() {
        let bl = ty.block_len() as u64;
        let n = ty.bytes_for(bl * 2).unwrap() as usize;
        w.add_tensor(&format!("blk.{i}.weight"), &[bl, 2], ty, random_bytes(&mut rng, n));
    }
    seeds.push(("types-align8", w.to_bytes()));

    let mut w = GgufWriter::new().with_magic(Magic::PowerInfer);
    w.set("general.alignment", Value::U64(1));
    w.set("x", Value::Array(ValueType::Array, vec![Value::Array(ValueType::U8, vec![Value::U8(1)])]));
    w.add_tensor("i", &[3, 1, 1, 2], GgmlType::I8, vec![1, 2, 3, 4, 5, 6]);
    let mut v2 = w.to_bytes();
    v2[4..8].copy_from_slice(&2u32.to_le_bytes());
    seeds.push(("pwri-v2-align1", v2));

    seeds.push(("empty-gguf", GgufWriter::new().to_bytes()));

    if let Some(model) = common::default_model() {
        let mut head = std::fs::read(model).unwrap();
        head.truncate(64 * 1024);
        seeds.push(("smollm2-head-64k", head));
    }
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
