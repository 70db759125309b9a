//! PowerInfer's files: a model exported with transposed down matrices and predictors inside
//! loads back and computes the same thing; placement (split) files round-trip and bad ones are
//! refused with a reason.

mod common;

use ember::cpu::Precision;
use ember::engine::ffn::transposed_downs;
use ember::engine::{FfnMode, Forward, Logits, Session, SparseFfn};
use ember::gguf::{GgmlType, GgufFile, GgufWriter, Magic, Value, ValueType};
use ember::sparse::placement::AttnSite;
use ember::model::Model;
use ember::sparse::powerinfer::{export_model, read_attention, read_split, set_attention, split_file};
use ember::sparse::predictor::Predictors;
use std::process::Command;
use std::sync::Arc;

fn synth(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("tiny.gguf");
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["synth", "-o", path.to_str().unwrap(), "--type", "f16", "--act", "relu", "--n-embd", "64", "--n-ff", "96", "--n-layer", "2", "--n-head", "4", "--n-head-kv", "2", "--seed", "7"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    path
}

fn logits(model: &Arc<Model>, ffn: Option<Arc<SparseFfn>>) -> Vec<f32> {
    let mut s = Session::new(model.clone(), 16);
    s.precision = Precision::F32;
    if let Some(f) = ffn {
        s = s.with_ffn(f);
    }
    s.forward(&[1, 5, 9, 2, 7], Logits::All).unwrap()
}

#[test]
fn exported_powerinfer_model_loads_and_matches() {
    let dir = std::env::temp_dir().join(format!("ember-pwri-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = Arc::new(Model::load(synth(&dir)).unwrap());
    let hp = model.hp.clone();
    let down_t = transposed_downs(&model, Precision::F32, false).unwrap();
    let predictors = Predictors::always_on(hp.n_layer, hp.n_embd, hp.n_ff);
    let pwri = dir.join("tiny.pwri.gguf");
    export_model(&model, &down_t, Some(&predictors)).unwrap().write_file(&pwri).unwrap();

    let file = Arc::new(GgufFile::open(&pwri).unwrap());
    assert_eq!(file.magic, Magic::PowerInfer);
    assert!(file.tensor("blk.0.ffn_down.weight").is_none() && file.tensor("blk.1.ffn_down_t.weight").is_some());
    let loaded = Arc::new(Model::from_gguf(file.clone()).unwrap());
    assert!(loaded.layers.iter().all(|l| l.ffn_down_t.is_some()));
    // F16 weights survive two transpositions exactly, so the dense paths agree bit for bit.
    let a = logits(&model, None);
    let b = logits(&loaded, None);
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    // The file's own predictors and down_t drive the sparse modes.
    let from_file = Arc::new(Predictors::from_gguf(file).unwrap());
    assert_eq!(from_file.layers.len(), hp.n_layer);
    let predict = Arc::new(SparseFfn::new(&loaded, FfnMode::Predict, Some(from_file), Vec::new(), Precision::F32, false).unwrap());
    let relu = Arc::new(SparseFfn::new(&loaded, FfnMode::Relu, None, Vec::new(), Precision::F32, false).unwrap());
    for sparse in [logits(&loaded, Some(predict)), logits(&loaded, Some(relu))] {
        let err = sparse.iter().zip(&a).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(err < 1e-4, "max logit difference {err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn split_files_round_trip_and_bad_ones_are_refused() {
    let hot = vec![vec![0u32, 3, 4, 9], vec![], (0..10).collect()];
    let bytes = split_file(&hot, 10, 1 << 30).to_bytes();
    let f = GgufFile::from_bytes(bytes).unwrap();
    assert_eq!(f.magic, Magic::PowerInfer);
    assert_eq!(f.get_u64("split.vram_capacity").unwrap(), 1 << 30);
    assert_eq!(read_split(&f, 3, 10).unwrap(), hot);
    // Shape mismatches and disagreeing index/bucket tensors name the problem.
    assert!(read_split(&f, 4, 10).unwrap_err().to_string().contains("blk.3.gpu_idx"));
    assert!(read_split(&f, 3, 12).unwrap_err().to_string().contains("12 neurons"));
    let mut w = GgufWriter::new().with_magic(Magic::PowerInfer);
    let idx: Vec<i32> = vec![1, 0, 1];
    w.add_tensor("blk.0.gpu_idx", &[3], GgmlType::I32, bytemuck::cast_slice(&idx).to_vec());
    w.add_tensor("blk.0.gpu_bucket", &[1], GgmlType::I32, bytemuck::cast_slice(&[0i32]).to_vec());
    let f = GgufFile::from_bytes(w.to_bytes()).unwrap();
    assert!(read_split(&f, 1, 3).unwrap_err().to_string().contains("disagree"));
}

#[test]
fn placement_files_record_where_attention_lives() {
    let hot = vec![vec![1u32], vec![0, 2], vec![]];
    // PowerInfer's files (and ember's before host attention) say nothing: None.
    let plain = GgufFile::from_bytes(split_file(&hot, 3, 1 << 20).to_bytes()).unwrap();
    assert_eq!(read_attention(&plain, 3).unwrap(), None);
    let mut w = split_file(&hot, 3, 1 << 20);
    set_attention(&mut w, &[AttnSite::Gpu, AttnSite::Host, AttnSite::Qkv]);
    let f = GgufFile::from_bytes(w.to_bytes()).unwrap();
    assert_eq!(read_attention(&f, 3).unwrap(), Some(vec![AttnSite::Gpu, AttnSite::Host, AttnSite::Qkv]));
    assert_eq!(read_split(&f, 3, 3).unwrap(), hot);
    // A record for another layer count is refused, naming the key.
    assert!(read_attention(&f, 4).unwrap_err().to_string().contains("ember.placement.attention_on_gpu"));
    // A file from before the q/k/v record keeps every host layer's q/k/v on the host.
    let mut w = split_file(&hot, 3, 1 << 20);
    w.set("ember.placement.attention_on_gpu", Value::Array(ValueType::Bool, vec![Value::Bool(true), Value::Bool(false), Value::Bool(false)]));
    let f = GgufFile::from_bytes(w.to_bytes()).unwrap();
    assert_eq!(read_attention(&f, 3).unwrap(), Some(vec![AttnSite::Gpu, AttnSite::Host, AttnSite::Host]));
    // Both records claiming one layer are refused.
    w.set("ember.placement.qkv_on_gpu", Value::Array(ValueType::Bool, vec![Value::Bool(true), Value::Bool(false), Value::Bool(false)]));
    let f = GgufFile::from_bytes(w.to_bytes()).unwrap();
    assert!(read_attention(&f, 3).is_err());
}
