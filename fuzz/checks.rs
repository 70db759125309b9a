//! What each fuzz target does with one input, shared by the targets (`fuzz_targets/`) and by the
//! regression tests (`tests/fuzz_regressions.rs`, which include this file with `#[path]`), so
//! that a kept crash input replays through exactly the code that found it.
//!
//! Every function must return normally for every input; a panic is a finding.

#![allow(dead_code)] // each includer uses some of the functions

use ember::gguf::GgufFile;
use ember::sparse::predictor::Predictors;
use ember::sparse::profile::{ActivationProfile, SampleSet};
use ember::tokenizer::{render_chat_template, ChatMessage, Tokenizer};
use std::sync::Arc;

/// The GGUF reader: any input parses or is an error, and a parsed file lets every tensor's data
/// and every metadata value be read.
pub fn gguf_parse(data: &[u8]) {
    let Ok(f) = GgufFile::from_bytes(data.to_vec()) else { return };
    let len = f.bytes().len() as u64;
    let mut sum = 0u64;
    for t in f.tensors() {
        let d = f.tensor_data(t);
        assert_eq!(d.len() as u64, t.n_bytes);
        assert!(t.offset >= f.data_offset && t.offset + t.n_bytes <= len);
        assert!(t.offset % f.alignment == 0);
        assert_eq!(t.ty.bytes_for(t.n_elements()), Some(t.n_bytes));
        let _ = t.rows_cols();
        sum = sum.wrapping_add(d.first().copied().unwrap_or(0) as u64);
        assert!(std::ptr::eq(f.tensor(&t.name).unwrap(), t));
    }
    for (k, v) in f.metadata() {
        sum = sum.wrapping_add(v.summary().len() as u64);
        let _ = (v.as_u64(), v.as_i64(), v.as_f64(), v.as_str(), v.as_bool(), v.as_array());
        assert!(f.get(k).is_some());
        let _ = (f.get_u64(k), f.get_f32(k), f.get_str(k));
    }
    std::hint::black_box(sum);
}

/// Loading a model from a GGUF image (hyper-parameter validation, tensor shapes and types,
/// load-time conversions) and the tokenizer built from its metadata, which then encodes and
/// decodes the input's own first bytes.
pub fn model_load(data: &[u8]) {
    let Ok(f) = GgufFile::from_bytes(data.to_vec()) else { return };
    let f = Arc::new(f);
    if let Ok(tok) = Tokenizer::from_gguf(&f) {
        // Bounded, so that a large input stays a fast execution.
        let text = String::from_utf8_lossy(&data[..data.len().min(512)]);
        for (add_special, parse_special) in [(true, true), (false, false)] {
            if let Ok(ids) = tok.encode(&text, add_special, parse_special) {
                let _ = tok.decode(&ids, true);
                for &id in ids.iter().take(64) {
                    let _ = (tok.token_bytes(id, false), tok.is_eog(id), tok.token_text(id));
                }
            }
        }
        let _ = tok.decode(&[0, 1, 2, u32::MAX], false);
        let _ = tok.apply_chat_template(&[ChatMessage::new("user", "hi")], true);
    }
    if let Ok(m) = ember::model::Model::from_gguf(f) {
        let hp = &m.hp;
        assert!(hp.n_layer > 0 && hp.n_embd > 0 && hp.n_ff > 0 && hp.rope_freq_scale.is_finite());
        let _ = m.weight_bytes();
        let _ = m.token_embd.row_f32(0);
    }
}

/// Chat-template rendering: the input is a template, then (after a NUL byte) message texts
/// separated by NUL bytes. Any template renders or is an error within the renderer's limits.
pub fn chat_template(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let template = parts.next().unwrap_or("");
    let roles = ["system", "user", "assistant"];
    let messages: Vec<ChatMessage> = parts.take(8).enumerate().map(|(i, c)| ChatMessage::new(roles[i % 3], c)).collect();
    for add_generation_prompt in [false, true] {
        let _ = render_chat_template(template, &messages, add_generation_prompt, "<s>", "</s>");
    }
}

/// The readers of ember's and PowerInfer's sparsity files from a GGUF image: activation
/// profiles, predictor samples, predictors (stand-alone or inside a PowerInfer model) and
/// PowerInfer split (placement) files.
pub fn sparse_files(data: &[u8]) {
    let Ok(f) = GgufFile::from_bytes(data.to_vec()) else { return };
    if let Ok(p) = ActivationProfile::from_gguf(&f) {
        let _ = p.summary();
        let _ = p.top_k_coverage(p.n_layer() * p.n_ff() / 2);
        let _ = p.top_k_per_layer(8);
    }
    if let Ok(p) = Predictors::from_gguf(Arc::new(GgufFile::from_bytes(data.to_vec()).unwrap())) {
        for l in p.layers.iter().take(2) {
            let mut logits = vec![0.0; l.n_ff()];
            l.predict(&vec![0.5; l.n_embd()], &mut logits);
        }
    }
    // The model shape the split file is read against: half the time the file's own (so that a
    // mutated valid file gets past the shape checks), else a small one from the input's bytes.
    let own = || {
        let n_layer = f.tensors().iter().filter(|t| t.name.ends_with(".gpu_idx")).count();
        let n_ff = f.tensor("blk.0.gpu_idx").map_or(32, |t| t.n_elements());
        (n_layer.clamp(1, 64), n_ff.clamp(1, 1 << 16) as usize)
    };
    let (n_layer, n_ff) = match data.last() {
        Some(b) if b & 1 == 0 => own(),
        _ => (1 + data.get(8).copied().unwrap_or(0) as usize % 8, 32 * (1 + data.get(9).copied().unwrap_or(0) as usize % 64)),
    };
    let _ = ember::sparse::powerinfer::read_split(&f, n_layer, n_ff);
    if let Ok(s) = SampleSet::from_gguf(f) {
        for l in 0..s.n_layer.min(2) {
            let _ = s.layer(l);
        }
    }
}

/// A tokenizer under test, with the bytes its byte-level vocabulary cannot spell (SmolLM2's lacks
/// 21 of the 256, e.g. 0x13: such bytes are dropped on encoding, by llama.cpp as well).
pub struct FuzzTokenizer {
    pub tok: Tokenizer,
    missing_bytes: [bool; 256],
}

/// GPT-2's byte-to-character map of byte-level BPE: printable Latin-1 bytes stand for
/// themselves, the others for U+0100 onwards in byte order.
fn byte_level_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
    if printable(b) {
        return b as char;
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(0x100 + rank).unwrap()
}

impl FuzzTokenizer {
    pub fn new(tok: Tokenizer) -> Self {
        let singles: std::collections::HashSet<&str> = (0..tok.vocab_size() as u32).filter_map(|id| tok.token_text(id)).filter(|t| t.chars().count() == 1).collect();
        let mut missing_bytes = [false; 256];
        for (b, m) in missing_bytes.iter_mut().enumerate() {
            *m = !singles.contains(byte_level_char(b as u8).to_string().as_str());
        }
        FuzzTokenizer { tok, missing_bytes }
    }

    /// What encode/decode gives back for `text`: its bytes without those the vocabulary cannot
    /// spell (the encoder drops them one by one, as llama.cpp's does), read as UTF-8 with
    /// replacement characters, as decode reads token bytes. Dropping only a character's lead
    /// byte leaves its continuation bytes behind: the fuzzer's first campaign found that a
    /// whole-character filter expected too little.
    fn spellable(&self, text: &str) -> String {
        let kept: Vec<u8> = text.bytes().filter(|&b| !self.missing_bytes[b as usize]).collect();
        String::from_utf8_lossy(&kept).into_owned()
    }
}

/// A loaded tokenizer on arbitrary bytes: the first byte picks the tokenizer (high nibble) and
/// the mode; the rest is text to encode or, read as little-endian u32s, token ids to decode.
/// Plain text (no special-token parsing, no BOS/EOS) must survive encode/decode exactly, less
/// the bytes the vocabulary cannot spell.
pub fn tokenizer(toks: &[FuzzTokenizer], data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else { return };
    let ft = &toks[(flags >> 4) as usize % toks.len()];
    let tok = &ft.tok;
    if flags & 1 == 0 {
        let text = String::from_utf8_lossy(rest);
        let parse_special = flags & 2 != 0;
        let add_special = flags & 4 != 0;
        let ids = tok.encode(&text, add_special, parse_special).expect("encoding text cannot fail for a loaded tokenizer");
        assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()), "an encoded id is outside the vocabulary");
        let back = tok.decode(&ids, true);
        if !parse_special && !add_special {
            assert_eq!(back, ft.spellable(&text), "plain text did not survive encode/decode");
        }
        let streamed: Vec<u8> = ids.iter().flat_map(|&id| tok.token_bytes(id, true)).collect();
        assert_eq!(String::from_utf8_lossy(&streamed), back, "token_bytes and decode disagree");
    } else {
        let ids: Vec<u32> = rest.chunks_exact(4).take(4096).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) % (tok.vocab_size() as u32 + 16)).collect();
        for render_special in [false, true] {
            std::hint::black_box(tok.decode(&ids, render_special));
        }
        for &id in ids.iter().take(256) {
            let _ = (tok.token_text(id), tok.is_eog(id), tok.is_control(id));
        }
    }
}

/// The tokenizers of the GGUF files at `paths` (fuzz and test setup; panics name the file).
pub fn load_tokenizers(paths: &[std::path::PathBuf]) -> Vec<FuzzTokenizer> {
    paths
        .iter()
        .map(|p| {
            let f = GgufFile::open(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
            FuzzTokenizer::new(Tokenizer::from_gguf(&f).unwrap_or_else(|e| panic!("no tokenizer in {}: {e}", p.display())))
        })
        .collect()
}
