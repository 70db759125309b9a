//! Building a [`Tokenizer`] from GGUF `tokenizer.*` metadata, following llama.cpp's
//! `llama_vocab::impl::load`.

use super::vocab::{self, attr, PieceStyle, SpecialIds};
use super::{pretok, Pipeline, Result, Tokenizer, TokenizerError};
use crate::gguf::{GgufFile, Value};
use tokenizers::models::bpe::{Vocab as HfVocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior};

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TYPES: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";

fn bad_key(key: &str, expected: &str, v: &Value) -> TokenizerError {
    TokenizerError::BadKey { key: key.into(), expected: expected.into(), found: v.summary() }
}

fn required<'a>(f: &'a GgufFile, key: &str) -> Result<&'a Value> {
    f.get(key).ok_or_else(|| TokenizerError::MissingKey { key: key.into() })
}

fn opt_str<'a>(f: &'a GgufFile, key: &str) -> Result<Option<&'a str>> {
    match f.get(key) {
        None => Ok(None),
        Some(v) => v.as_str().map(Some).ok_or_else(|| bad_key(key, "a string", v)),
    }
}

fn opt_bool(f: &GgufFile, key: &str) -> Result<Option<bool>> {
    match f.get(key) {
        None => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| bad_key(key, "a bool", v)),
    }
}

fn array<'a>(key: &str, v: &'a Value) -> Result<&'a [Value]> {
    v.as_array().ok_or_else(|| bad_key(key, "an array", v))
}

/// A per-token numeric array (scores, types) that must cover the whole vocabulary.
fn per_token<'a>(f: &'a GgufFile, key: &str, n: usize) -> Result<Option<&'a [Value]>> {
    let Some(v) = f.get(key) else { return Ok(None) };
    let a = array(key, v)?;
    if a.len() < n {
        return Err(TokenizerError::BadKey {
            key: key.into(),
            expected: format!("at least {n} entries (one per token)"),
            found: format!("{} entries", a.len()),
        });
    }
    Ok(Some(a))
}

/// A special token id: `Ok(None)` when absent or negative (the "unset" sentinel); an id past the
/// vocabulary keeps llama.cpp's default, as llama.cpp does.
fn special_id(f: &GgufFile, key: &str, n: usize, default: Option<u32>) -> Result<Option<u32>> {
    let Some(v) = f.get(key) else { return Ok(default) };
    let id = v.as_i64().ok_or_else(|| bad_key(key, "an integer token id", v))?;
    if id < 0 {
        return Ok(None);
    }
    Ok(if (id as u64) < n as u64 { Some(id as u32) } else { default })
}

pub(super) fn load(f: &GgufFile) -> Result<Tokenizer> {
    let model = required(f, KEY_MODEL)?;
    let model = model.as_str().ok_or_else(|| bad_key(KEY_MODEL, "a string", model))?;
    let is_spm = match model {
        "gpt2" => false,
        "llama" => true,
        other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
    };
    let pre = opt_str(f, KEY_PRE)?;
    let pre_cfg = if is_spm {
        None
    } else {
        Some(pretok::config(pre).ok_or_else(|| TokenizerError::UnsupportedPre {
            pre: pre.unwrap_or_default().to_string(),
            known: pretok::KNOWN.to_string(),
        })?)
    };

    let tokens = array(KEY_TOKENS, required(f, KEY_TOKENS)?)?;
    if tokens.is_empty() {
        return Err(TokenizerError::EmptyVocab);
    }
    let n = tokens.len();
    let mut texts = Vec::with_capacity(n);
    for (i, t) in tokens.iter().enumerate() {
        let s = t.as_str().ok_or_else(|| bad_key(&format!("{KEY_TOKENS}[{i}]"), "a string", t))?;
        // llama.cpp renames empty tokens so that they can still be looked up.
        texts.push(if s.is_empty() { format!("[EMPTY_{i}]") } else { s.to_string() });
    }
    let scores: Vec<f32> = match per_token(f, KEY_SCORES, n)? {
        None => vec![0.0; n],
        Some(a) => a[..n]
            .iter()
            .enumerate()
            .map(|(i, v)| v.as_f64().map(|x| x as f32).ok_or_else(|| bad_key(&format!("{KEY_SCORES}[{i}]"), "a number", v)))
            .collect::<Result<_>>()?,
    };
    let attrs: Vec<u8> = match per_token(f, KEY_TYPES, n)? {
        None => vec![attr::NORMAL; n],
        Some(a) => a[..n]
            .iter()
            .enumerate()
            .map(|(i, v)| v.as_i64().map(attr::from_gguf_type).ok_or_else(|| bad_key(&format!("{KEY_TYPES}[{i}]"), "an integer", v)))
            .collect::<Result<_>>()?,
    };

    // Defaults llama.cpp assumes before reading the id keys (dropped when outside the vocabulary).
    let in_vocab = |id: u32| ((id as usize) < n).then_some(id);
    let (def_bos, def_eos, def_unk) = if is_spm { (in_vocab(1), in_vocab(2), in_vocab(0)) } else { (in_vocab(11), in_vocab(11), None) };
    let bos = special_id(f, "tokenizer.ggml.bos_token_id", n, def_bos)?;
    let eos = special_id(f, "tokenizer.ggml.eos_token_id", n, def_eos)?;
    let unk = special_id(f, "tokenizer.ggml.unknown_token_id", n, def_unk)?;
    let ids = SpecialIds {
        eos,
        eot: special_id(f, "tokenizer.ggml.eot_token_id", n, None)?,
        eom: special_id(f, "tokenizer.ggml.eom_token_id", n, None)?,
        fim_pad: special_id(f, "tokenizer.ggml.fim_pad_token_id", n, None)?,
        fim_rep: special_id(f, "tokenizer.ggml.fim_rep_token_id", n, None)?,
        fim_sep: special_id(f, "tokenizer.ggml.fim_sep_token_id", n, None)?,
        extra_eog: Vec::new(),
    };

    let add_bos = opt_bool(f, "tokenizer.ggml.add_bos_token")?
        .unwrap_or(if is_spm { true } else { pre_cfg.as_ref().is_some_and(|c| c.add_bos) });
    let add_eos = opt_bool(f, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let add_space_prefix = opt_bool(f, "tokenizer.ggml.add_space_prefix")?.unwrap_or(is_spm);
    if add_bos && bos.is_none() {
        return Err(TokenizerError::MissingSpecial { flag: "tokenizer.ggml.add_bos_token", token: "BOS (tokenizer.ggml.bos_token_id)" });
    }
    if add_eos && eos.is_none() {
        return Err(TokenizerError::MissingSpecial { flag: "tokenizer.ggml.add_eos_token", token: "EOS (tokenizer.ggml.eos_token_id)" });
    }

    let (hf, pipeline, style) = if is_spm {
        let unk_text = unk.map(|i| texts[i as usize].clone());
        (build_spm(&texts, &scores, unk_text)?, Pipeline::Spm { add_space_prefix }, PieceStyle::Spm)
    } else {
        let cfg = pre_cfg.expect("BPE has a pre-tokenizer config");
        (build_bpe(f, &texts, &cfg)?, Pipeline::Direct, PieceStyle::ByteLevel)
    };

    let model_name = opt_str(f, "general.name").ok().flatten().unwrap_or("");
    let vocab = vocab::finish(texts, attrs, ids, style, model_name)?;
    let chat_template = opt_str(f, "tokenizer.chat_template")?.map(str::to_string);
    Ok(Tokenizer { hf, pipeline, vocab, bos, eos, add_bos, add_eos, chat_template })
}

fn hf_vocab(texts: &[String]) -> HfVocab {
    texts.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect()
}

fn backend(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Backend(e.to_string())
}

/// Byte-level BPE: the pre-type's regexes, the GPT-2 byte map, merges ranked in file order.
fn build_bpe(f: &GgufFile, texts: &[String], cfg: &pretok::PreConfig) -> Result<tokenizers::Tokenizer> {
    let index = vocab::index_texts(texts)?;
    let merges_v = array(KEY_MERGES, required(f, KEY_MERGES)?)?;
    let mut merges = Vec::with_capacity(merges_v.len());
    for (i, m) in merges_v.iter().enumerate() {
        let bad = |reason: &str| TokenizerError::BadMerge { index: i, merge: m.summary(), reason: reason.into() };
        let s = m.as_str().ok_or_else(|| bad("not a string"))?;
        // llama.cpp splits at the first space after the first byte.
        let sp = s.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1).ok_or_else(|| bad("no space between the two parts"))?;
        let (a, b) = (&s[..sp], &s[sp + 1..]);
        if a.is_empty() || b.is_empty() {
            return Err(bad("empty part"));
        }
        // A merge of (or into) something outside the vocabulary can never yield a token id;
        // llama.cpp would carry such a symbol along and finally drop it, so it is skipped.
        if index.contains_key(a) && index.contains_key(b) && index.contains_key(format!("{a}{b}").as_str()) {
            merges.push((a.to_string(), b.to_string()));
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(hf_vocab(texts), merges)
        .ignore_merges(cfg.ignore_merges)
        .build()
        .map_err(backend)?;
    let mut steps = Vec::with_capacity(cfg.regexes.len() + 1);
    for r in cfg.regexes {
        let split = Split::new(SplitPattern::Regex(r.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| TokenizerError::Backend(format!("pre-tokenizer regex {r:?}: {e}")))?;
        steps.push(PreTokenizerWrapper::Split(split));
    }
    steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)));
    let mut hf = tokenizers::Tokenizer::new(bpe);
    hf.with_pre_tokenizer(Some(Sequence::new(steps)));
    Ok(hf)
}

/// SentencePiece as llama.cpp runs it: merges are every split of a token into two tokens, ranked
/// by the token's score (highest first; equal scores by token id), with `<0xAB>` byte fallback.
fn build_spm(texts: &[String], scores: &[f32], unk: Option<String>) -> Result<tokenizers::Tokenizer> {
    let index = vocab::index_texts(texts)?;
    let mut cands: Vec<(f32, u32, usize)> = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        for (k, _) in t.char_indices().skip(1) {
            if index.contains_key(&t[..k]) && index.contains_key(&t[k..]) {
                cands.push((scores[i], i as u32, k));
            }
        }
    }
    cands.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let merges = cands
        .iter()
        .map(|&(_, i, k)| {
            let t = &texts[i as usize];
            (t[..k].to_string(), t[k..].to_string())
        })
        .collect();
    let mut builder = BPE::builder().vocab_and_merges(hf_vocab(texts), merges).byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    Ok(tokenizers::Tokenizer::new(builder.build().map_err(backend)?))
}
