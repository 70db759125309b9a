//! The token table shared by both loaders: texts, llama.cpp token attributes, decoded pieces,
//! the special-token list used for partitioning and the end-of-generation set.

use super::{bytelevel, Result, TokenizerError};
use std::collections::HashMap;

/// llama.cpp's token attributes (a subset: the ones that change tokenizing or detokenizing).
pub(crate) mod attr {
    pub const UNDEFINED: u8 = 0;
    pub const UNKNOWN: u8 = 1 << 0;
    pub const UNUSED: u8 = 1 << 1;
    pub const NORMAL: u8 = 1 << 2;
    pub const CONTROL: u8 = 1 << 3;
    pub const USER_DEFINED: u8 = 1 << 4;
    pub const BYTE: u8 = 1 << 5;
    pub const LSTRIP: u8 = 1 << 6;
    pub const RSTRIP: u8 = 1 << 7;

    /// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
    pub fn from_gguf_type(t: i64) -> u8 {
        match t {
            1 => NORMAL,
            2 => UNKNOWN,
            3 => CONTROL,
            4 => USER_DEFINED,
            5 => UNUSED,
            6 => BYTE,
            _ => UNDEFINED,
        }
    }
}

/// How a NORMAL token's text turns into bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PieceStyle {
    /// GPT-2 byte-to-unicode characters map back to bytes.
    ByteLevel,
    /// SentencePiece: `▁` is a space.
    Spm,
    /// The text as is.
    Raw,
}

#[derive(Clone)]
pub(crate) struct Vocab {
    pub texts: Vec<String>,
    pub attrs: Vec<u8>,
    /// What each token detokenizes to when special tokens are rendered.
    pub pieces: Vec<Box<[u8]>>,
    /// Control, user-defined and unknown tokens, longest text first.
    pub special_cache: Vec<u32>,
    /// End-of-generation ids, ascending.
    pub eog: Vec<u32>,
}

impl Vocab {
    pub fn len(&self) -> usize {
        self.texts.len()
    }
}

/// Special ids known before the text-based detection (from metadata keys or config files).
#[derive(Default, Clone, Debug)]
pub(crate) struct SpecialIds {
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub fim_pad: Option<u32>,
    pub fim_rep: Option<u32>,
    pub fim_sep: Option<u32>,
    /// Further end-of-generation ids (HF generation_config.json).
    pub extra_eog: Vec<u32>,
}

/// Maps token text to id, failing on duplicates as llama.cpp does.
pub(crate) fn index_texts(texts: &[String]) -> Result<HashMap<&str, u32>> {
    let mut map = HashMap::with_capacity(texts.len());
    for (i, t) in texts.iter().enumerate() {
        if let Some(first) = map.insert(t.as_str(), i as u32) {
            return Err(TokenizerError::DuplicateToken { text: t.clone(), first, second: i as u32 });
        }
    }
    Ok(map)
}

const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>", "_<EOT>",
    "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
/// Tokens llama.cpp treats as end-of-generation by their text.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
];

/// Completes a vocabulary the way llama.cpp's loader does after reading the token list: detects
/// EOT/EOM/FIM tokens by text, forces them to CONTROL, marks "unused" control tokens, builds the
/// end-of-generation set and the special-token cache, and renders every token's piece.
pub(crate) fn finish(
    texts: Vec<String>,
    mut attrs: Vec<u8>,
    mut ids: SpecialIds,
    style: PieceStyle,
    model_name: &str,
) -> Result<Vocab> {
    let n = texts.len();
    // Text detection in id order (llama.cpp walks a hash map, so when several candidates exist
    // its choice is arbitrary; lowest id is a deterministic stand-in).
    let find = |list: &[&str]| texts.iter().position(|t| list.contains(&t.as_str())).map(|i| i as u32);
    let detected: [(&mut Option<u32>, &[&str]); 5] = [
        (&mut ids.eot, EOT_TEXTS),
        (&mut ids.eom, EOM_TEXTS),
        (&mut ids.fim_pad, FIM_PAD_TEXTS),
        (&mut ids.fim_rep, FIM_REP_TEXTS),
        (&mut ids.fim_sep, FIM_SEP_TEXTS),
    ];
    for (slot, list) in detected {
        if slot.is_none() {
            if let Some(id) = find(list) {
                *slot = Some(id);
                attrs[id as usize] |= attr::CONTROL;
            }
        }
    }

    // Control tokens whose text says "unused" are unused.
    for (t, a) in texts.iter().zip(attrs.iter_mut()) {
        if *a & attr::CONTROL != 0 && t.contains("unused") {
            *a |= attr::UNUSED;
        }
    }

    let mut eog: Vec<u32> = [ids.fim_pad, ids.fim_rep, ids.fim_sep].into_iter().flatten().collect();
    for (i, t) in texts.iter().enumerate() {
        if EOG_TEXTS.contains(&t.as_str()) {
            eog.push(i as u32);
            attrs[i] |= attr::CONTROL;
        }
    }
    // gpt-oss: these always render.
    for (i, t) in texts.iter().enumerate() {
        if matches!(t.as_str(), "<|channel|>" | "<|message|>" | "<|start|>" | "<|constrain|>") {
            attrs[i] = attr::USER_DEFINED;
        }
    }
    eog.extend([ids.eos, ids.eot, ids.eom].into_iter().flatten());
    eog.extend(ids.extra_eog.iter().copied().filter(|&i| (i as usize) < n));
    eog.sort_unstable();
    eog.dedup();

    // o200k_harmony / solar-open: "<|end|>" ends a message, not the generation.
    let find_eog = |eog: &[u32], s: &str| eog.iter().position(|&i| texts[i as usize] == s);
    let has = |eog: &[u32], s: &str| find_eog(eog, s).is_some();
    if (has(&eog, "<|return|>") && has(&eog, "<|call|>") || has(&eog, "<|calls|>") && has(&eog, "<|flush|>"))
        && has(&eog, "<|end|>")
    {
        if let Some(pos) = find_eog(&eog, "<|end|>") {
            attrs[eog[pos] as usize] = attr::USER_DEFINED;
            eog.remove(pos);
        }
    }
    // gemma4 / paddleocr: "</s>" is not end-of-generation when "<|tool_response>" is.
    if has(&eog, "<|tool_response>") {
        if let Some(pos) = find_eog(&eog, "</s>") {
            attrs[eog[pos] as usize] = attr::NORMAL;
            eog.remove(pos);
        }
    }

    let mut special_cache: Vec<u32> = (0..n as u32)
        .filter(|&i| attrs[i as usize] & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0)
        .collect();
    special_cache.sort_by(|&a, &b| texts[b as usize].len().cmp(&texts[a as usize].len()));

    // Per-model attributes llama.cpp sets by name.
    let name = model_name.to_lowercase();
    if name.contains("phi-3") || name.contains("phi3") {
        for &i in &special_cache {
            attrs[i as usize] |= attr::RSTRIP;
        }
        for (i, t) in texts.iter().enumerate() {
            match t.as_str() {
                "</s>" => attrs[i] |= attr::RSTRIP,
                "<unk>" | "<s>" | "<|endoftext|>" => attrs[i] &= !attr::RSTRIP,
                _ => {}
            }
        }
    }

    let pieces = texts.iter().zip(&attrs).map(|(t, &a)| render_piece(t, a, style)).collect();
    Ok(Vocab { texts, attrs, pieces, special_cache, eog })
}

/// llama.cpp's `token_to_piece` with special tokens rendered.
fn render_piece(text: &str, a: u8, style: PieceStyle) -> Box<[u8]> {
    if a & (attr::UNKNOWN | attr::CONTROL | attr::USER_DEFINED) != 0 {
        return text.as_bytes().into();
    }
    if a & attr::NORMAL != 0 {
        return match style {
            PieceStyle::Raw => text.as_bytes().into(),
            PieceStyle::Spm => text.replace('\u{2581}', " ").into_bytes().into(),
            PieceStyle::ByteLevel => bytelevel::decode_text(text).into(),
        };
    }
    if a & attr::BYTE != 0 {
        return parse_byte_token(text).map(|b| vec![b]).unwrap_or_default().into();
    }
    Box::default()
}

/// The byte of a `<0xAB>` token.
pub(crate) fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}
