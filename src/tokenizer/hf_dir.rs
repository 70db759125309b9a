//! Building a [`Tokenizer`] from a Hugging Face model directory.
//!
//! tokenizer.json defines the subword pipeline (normalizer, pre-tokenizer, model), which is used
//! as is. Added tokens become llama.cpp-style special tokens (special ones CONTROL, the others
//! USER_DEFINED) so that partitioning, rendering and end-of-generation behave as for a GGUF
//! converted from the same directory.

use super::vocab::{self, attr, PieceStyle, SpecialIds};
use super::{Pipeline, Result, Tokenizer, TokenizerError};
use std::path::Path;

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    match std::fs::read_to_string(path) {
        Ok(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| TokenizerError::HfFile { path: path.display().to_string(), reason: format!("invalid JSON: {e}") }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io { path: path.display().to_string(), source }),
    }
}

/// A token given as a string or as an AddedToken object (`{"content": ...}`).
fn token_content(v: &serde_json::Value) -> Option<&str> {
    v.as_str().or_else(|| v.get("content").and_then(|c| c.as_str()))
}

/// The JSON `type` of a serialized component, and of the components of a `Sequence`.
fn component_types(v: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(t) = v.get("type").and_then(|t| t.as_str()) {
        out.push(t.to_string());
    }
    for key in ["decoders", "pretokenizers", "normalizers"] {
        if let Some(items) = v.get(key).and_then(|d| d.as_array()) {
            for it in items {
                out.extend(component_types(it));
            }
        }
    }
    out
}

pub(super) fn load(dir: &Path) -> Result<Tokenizer> {
    let tok_path = dir.join("tokenizer.json");
    let raw = std::fs::read(&tok_path).map_err(|source| TokenizerError::Io { path: tok_path.display().to_string(), source })?;
    let mut hf = tokenizers::Tokenizer::from_bytes(&raw)
        .map_err(|e| TokenizerError::HfFile { path: tok_path.display().to_string(), reason: e.to_string() })?;
    // Special tokens are cut out before the text reaches `tokenizers` (when parse_special asks
    // for it); inside plain-text fragments they must stay text.
    hf.set_encode_special_tokens(true);
    let json: serde_json::Value = serde_json::from_slice(&raw)
        .map_err(|e| TokenizerError::HfFile { path: tok_path.display().to_string(), reason: e.to_string() })?;

    // Token table: the model's vocabulary plus added tokens.
    let full = hf.get_vocab(true);
    let n = full.values().map(|&id| id as usize + 1).max().ok_or(TokenizerError::EmptyVocab)?;
    let mut texts: Vec<String> = (0..n).map(|i| format!("[EMPTY_{i}]")).collect();
    let mut attrs = vec![attr::UNDEFINED; n];
    for (t, &id) in &full {
        texts[id as usize] = t.clone();
        attrs[id as usize] = attr::NORMAL;
    }

    let types = json.get("decoder").map(component_types).unwrap_or_default();
    let pre_types = json.get("pre_tokenizer").map(component_types).unwrap_or_default();
    let norm_types = json.get("normalizer").map(component_types).unwrap_or_default();
    let model = json.get("model").cloned().unwrap_or_default();
    let style = if types.iter().chain(&pre_types).any(|t| t == "ByteLevel") {
        PieceStyle::ByteLevel
    } else if types.iter().chain(&pre_types).chain(&norm_types).any(|t| t == "Metaspace" || t == "Replace" || t == "Prepend")
        || texts.iter().any(|t| t.contains('\u{2581}'))
    {
        PieceStyle::Spm
    } else {
        PieceStyle::Raw
    };
    if model.get("byte_fallback").and_then(|b| b.as_bool()).unwrap_or(false) || style == PieceStyle::Spm {
        for (t, a) in texts.iter().zip(attrs.iter_mut()) {
            if *a == attr::NORMAL && vocab::parse_byte_token(t).is_some() {
                *a = attr::BYTE;
            }
        }
    }
    if let Some(unk) = model.get("unk_token").and_then(|u| u.as_str()) {
        if let Some(&id) = full.get(unk) {
            attrs[id as usize] = attr::UNKNOWN;
        }
    }
    for (id, tok) in hf.get_added_tokens_decoder() {
        let a = &mut attrs[id as usize];
        *a = if tok.special { attr::CONTROL } else { attr::USER_DEFINED };
        if tok.lstrip {
            *a |= attr::LSTRIP;
        }
        if tok.rstrip {
            *a |= attr::RSTRIP;
        }
    }

    let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
    let id_of = |key: &str| config.get(key).and_then(token_content).and_then(|t| full.get(t).copied());
    let bos = id_of("bos_token");
    let eos = id_of("eos_token");
    let unk = id_of("unk_token");
    if let Some(u) = unk {
        attrs[u as usize] |= attr::UNKNOWN;
    }

    // add_bos/add_eos: explicit in tokenizer_config.json, else what the post-processor does.
    let probe = |special: bool| hf.encode_fast("a", special).map(|e| e.get_ids().to_vec()).unwrap_or_default();
    let (with, without) = (probe(true), probe(false));
    let added = with.len() > without.len();
    let add_bos = config
        .get("add_bos_token")
        .and_then(|b| b.as_bool())
        .unwrap_or_else(|| added && bos.is_some() && with.first() == bos.as_ref());
    let add_eos = config
        .get("add_eos_token")
        .and_then(|b| b.as_bool())
        .unwrap_or_else(|| added && eos.is_some() && with.last() == eos.as_ref());
    if add_bos && bos.is_none() {
        return Err(TokenizerError::MissingSpecial { flag: "add_bos_token", token: "bos_token" });
    }
    if add_eos && eos.is_none() {
        return Err(TokenizerError::MissingSpecial { flag: "add_eos_token", token: "eos_token" });
    }

    let mut chat_template = match config.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(list)) => {
            let pick = |name: &str| list.iter().find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name));
            pick("default").or(list.first()).and_then(|t| t.get("template")).and_then(|t| t.as_str()).map(str::to_string)
        }
        _ => None,
    };
    if chat_template.is_none() {
        let jinja = dir.join("chat_template.jinja");
        match std::fs::read_to_string(&jinja) {
            Ok(s) => chat_template = Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(TokenizerError::Io { path: jinja.display().to_string(), source }),
        }
    }

    let mut extra_eog = Vec::new();
    if let Some(gen) = read_json(&dir.join("generation_config.json"))? {
        match gen.get("eos_token_id") {
            Some(serde_json::Value::Number(x)) => extra_eog.extend(x.as_u64().map(|v| v as u32)),
            Some(serde_json::Value::Array(xs)) => extra_eog.extend(xs.iter().filter_map(|x| x.as_u64()).map(|v| v as u32)),
            _ => {}
        }
    }

    let ids = SpecialIds { eos, extra_eog, ..Default::default() };
    let name = config.get("name_or_path").and_then(|v| v.as_str()).unwrap_or("");
    let vocab = vocab::finish(texts, attrs, ids, style, name)?;
    Ok(Tokenizer { hf, pipeline: Pipeline::Direct, vocab, bos, eos, add_bos, add_eos, chat_template })
}
