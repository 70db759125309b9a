//! Tokenizers that reproduce llama.cpp's token ids.
//!
//! A [`Tokenizer`] is built from a GGUF file's `tokenizer.*` metadata ([`Tokenizer::from_gguf`]) or
//! from a Hugging Face model directory ([`Tokenizer::from_hf_dir`]). The subword model itself runs
//! on the `tokenizers` crate; everything around it follows llama.cpp (`src/llama-vocab.cpp`):
//!
//! * **Special tokens.** Control, user-defined and unknown tokens are cut out of the text first,
//!   longest token text first, exactly as llama.cpp's `tokenizer_st_partition` does. Control and
//!   unknown tokens are only recognised when `parse_special` is true; user-defined tokens always
//!   are. The remaining plain-text fragments go to the subword model one at a time.
//! * **`gpt2` (byte-level BPE).** The pre-tokenizer is the list of regexes llama.cpp uses for the
//!   file's `tokenizer.ggml.pre` value, applied one after the other (each splits the pieces the
//!   previous one produced), then the GPT-2 byte-to-unicode map, then BPE with the file's merges
//!   ranked in file order (`ignore_merges` for the llama3 family).
//! * **`llama` (SentencePiece).** llama.cpp's SPM tokenizer repeatedly merges the adjacent pair
//!   whose concatenation is a vocabulary entry with the highest score (leftmost on ties), and
//!   falls back to `<0xAB>` byte tokens for characters outside the vocabulary. That is a BPE
//!   whose merges are every split `(a, b)` of a token `a+b` into two tokens, ranked by the score
//!   of `a+b`; the tokenizers crate's BPE with `byte_fallback` runs exactly that algorithm (same
//!   stale-entry rule, same leftmost tie-break between equal ranks). Unigram would not do: it
//!   is a Viterbi search over the scores and gives different ids whenever greedy merging and the
//!   best-scoring segmentation disagree. One gap remains: BPE ranks are a total order, so when
//!   two *different* tokens with *equal* scores compete for overlapping positions, the one with
//!   the lower id wins rather than the leftmost (real SentencePiece vocabularies give distinct
//!   scores to their pieces, so this does not arise there). Spaces are escaped to `▁` and, with `add_space_prefix`,
//!   a space is put before every text fragment that starts the text or follows a special token.
//! * **Detokenizing** concatenates llama.cpp's `token_to_piece` for each token: byte-level tokens
//!   map back to bytes, `▁` becomes a space, `<0xAB>` becomes the byte, control tokens render as
//!   their text only when asked to.

mod bytelevel;
mod chat;
mod chat_guard;
mod gguf_load;
mod hf_dir;
mod pretok;
mod vocab;

use std::path::Path;

pub use chat::ChatMessage;

/// Everything that can go wrong building or using a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF metadata key {key:?} is missing (needed for the tokenizer)")]
    MissingKey { key: String },
    #[error("GGUF metadata key {key:?}: expected {expected}, found {found}")]
    BadKey { key: String, expected: String, found: String },
    #[error("unsupported tokenizer.ggml.model {0:?} (ember supports \"gpt2\" (byte-level BPE) and \"llama\" (SentencePiece))")]
    UnsupportedModel(String),
    #[error("unsupported tokenizer.ggml.pre {pre:?} (pre-tokenizer types ember knows: {known})")]
    UnsupportedPre { pre: String, known: String },
    #[error("bad BPE merge #{index} {merge:?} in tokenizer.ggml.merges: {reason}")]
    BadMerge { index: usize, merge: String, reason: String },
    #[error("duplicate token {text:?} in the vocabulary (ids {first} and {second})")]
    DuplicateToken { text: String, first: u32, second: u32 },
    #[error("{what} is {id}, outside the vocabulary of {n_vocab} tokens")]
    BadTokenId { what: String, id: u64, n_vocab: usize },
    #[error("{flag} is true, but the model has no {token} token")]
    MissingSpecial { flag: &'static str, token: &'static str },
    #[error("empty vocabulary")]
    EmptyVocab,
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: {reason}")]
    HfFile { path: String, reason: String },
    #[error("tokenizers crate: {0}")]
    Backend(String),
    #[error("the model has no chat template (no tokenizer.chat_template / chat_template)")]
    NoChatTemplate,
    #[error("chat template: {0}")]
    Template(String),
}

type Result<T> = std::result::Result<T, TokenizerError>;

/// How a plain-text fragment is prepared before the `tokenizers` pipeline sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pipeline {
    /// llama.cpp SPM: an optional leading space, then every space escaped to `▁`.
    Spm { add_space_prefix: bool },
    /// The fragment goes to the `tokenizers` pipeline unchanged (byte-level BPE from GGUF, or
    /// whatever normalizer/pre-tokenizer a tokenizer.json defines).
    Direct,
}

/// A text tokenizer; see the module documentation. Cheap to share across threads (`Send + Sync`).
#[derive(Clone)]
pub struct Tokenizer {
    hf: tokenizers::Tokenizer,
    pipeline: Pipeline,
    vocab: vocab::Vocab,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab.len())
            .field("pipeline", &self.pipeline)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("eog", &self.vocab.eog)
            .finish()
    }
}

/// One piece of the input after special tokens were cut out.
enum Fragment {
    /// A byte range of the input holding plain text.
    Text(usize, usize),
    Token(u32),
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(f: &crate::gguf::GgufFile) -> Result<Self> {
        gguf_load::load(f)
    }

    /// An HF model directory's tokenizer.json (+ tokenizer_config.json for bos/eos/chat_template
    /// when present, and generation_config.json for extra end-of-generation ids).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        hf_dir::load(dir)
    }

    /// add_special: add BOS/EOS as the model's add_bos/add_eos say. parse_special: text like
    /// "<|im_start|>" becomes the special token (as llama.cpp with parse_special=true); otherwise
    /// it is tokenized as plain text. User-defined tokens are matched whole either way.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.push(self.bos.ok_or(TokenizerError::MissingSpecial { flag: "add_bos", token: "BOS" })?);
        }
        let mut prev_special = true; // SPM: a fragment at the start gets the space prefix
        for frag in self.partition(text, parse_special) {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(a, b) => {
                    self.encode_fragment(&text[a..b], prev_special, &mut out)?;
                    prev_special = false;
                }
            }
        }
        if add_special && self.add_eos {
            out.push(self.eos.ok_or(TokenizerError::MissingSpecial { flag: "add_eos", token: "EOS" })?);
        }
        Ok(out)
    }

    fn encode_fragment(&self, s: &str, prev_special: bool, out: &mut Vec<u32>) -> Result<()> {
        let enc = match self.pipeline {
            Pipeline::Direct => self.hf.encode_fast(s, false),
            Pipeline::Spm { add_space_prefix } => {
                let mut t = String::with_capacity(s.len() + 4);
                if add_space_prefix && prev_special {
                    t.push(' ');
                }
                t.push_str(s);
                self.hf.encode_fast(t.replace(' ', "\u{2581}").as_str(), false)
            }
        }
        .map_err(|e| TokenizerError::Backend(e.to_string()))?;
        out.extend_from_slice(enc.get_ids());
        Ok(())
    }

    /// Cuts special tokens out of `text` the way llama.cpp's `tokenizer_st_partition` does: for
    /// each special token, longest text first, every occurrence in every remaining text fragment.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let mut frags = Vec::new();
        if text.is_empty() {
            return frags;
        }
        frags.push(Fragment::Text(0, text.len()));
        let bytes = text.as_bytes();
        for &id in &self.vocab.special_cache {
            let attr = self.vocab.attrs[id as usize];
            if !parse_special && attr & (vocab::attr::CONTROL | vocab::attr::UNKNOWN) != 0 {
                continue;
            }
            let pat = self.vocab.texts[id as usize].as_str();
            if pat.is_empty() || pat.len() > text.len() {
                continue;
            }
            if !frags.iter().any(|f| matches!(f, Fragment::Text(a, b) if text[*a..*b].contains(pat))) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for frag in frags {
                let (mut start, end) = match frag {
                    Fragment::Text(a, b) => (a, b),
                    tok => {
                        next.push(tok);
                        continue;
                    }
                };
                loop {
                    let Some(rel) = text[start..end].find(pat) else {
                        next.push(Fragment::Text(start, end));
                        break;
                    };
                    let m = start + rel;
                    let mut left_end = m;
                    if attr & vocab::attr::LSTRIP != 0 {
                        while left_end > start && is_c_space(bytes[left_end - 1]) {
                            left_end -= 1;
                        }
                    }
                    if left_end > start {
                        next.push(Fragment::Text(start, left_end));
                    }
                    next.push(Fragment::Token(id));
                    start = m + pat.len();
                    if attr & vocab::attr::RSTRIP != 0 {
                        while start < end && is_c_space(bytes[start]) {
                            start += 1;
                        }
                    }
                    if start >= end {
                        break;
                    }
                }
            }
            frags = next;
        }
        frags
    }

    /// Detokenize like llama.cpp's common_token_to_piece concatenation; render_special: whether
    /// control tokens such as <|im_end|> appear in the text. Invalid UTF-8 (a sequence cut short)
    /// becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], render_special: bool) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(self.piece(id, render_special));
        }
        match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }

    /// The raw bytes of one token's text (byte-level BPE maps back to bytes; SPM "▁" to space;
    /// <0xAB> byte tokens to the byte), so a streaming printer can buffer incomplete UTF-8.
    /// Special/control tokens: their text when render_special, else empty. Unknown ids: empty.
    pub fn token_bytes(&self, id: u32, render_special: bool) -> Vec<u8> {
        self.piece(id, render_special).to_vec()
    }

    fn piece(&self, id: u32, render_special: bool) -> &[u8] {
        let i = id as usize;
        if i >= self.vocab.len() {
            return &[];
        }
        if !render_special && self.vocab.attrs[i] & (vocab::attr::CONTROL | vocab::attr::UNKNOWN) != 0 {
            return &[];
        }
        &self.vocab.pieces[i]
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// End-of-generation: eos, eot, and tokens llama.cpp treats as EOG (e.g. <|im_end|>,
    /// <|endoftext|>, <|eot_id|>, <end_of_turn>).
    pub fn is_eog(&self, id: u32) -> bool {
        self.vocab.eog.binary_search(&id).is_ok()
    }

    /// All end-of-generation ids, ascending.
    pub fn eog_ids(&self) -> &[u32] {
        &self.vocab.eog
    }

    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// The text of token `id` as stored in the vocabulary (e.g. "Ġthe", "▁the", "<0x0A>").
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.texts.get(id as usize).map(String::as_str)
    }

    /// Whether `id` is a control (or unknown) token, which decodes to nothing unless rendered.
    pub fn is_control(&self, id: u32) -> bool {
        self.vocab.attrs.get(id as usize).is_some_and(|a| a & (vocab::attr::CONTROL | vocab::attr::UNKNOWN) != 0)
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Renders the template with minijinja (messages, add_generation_prompt, bos_token,
    /// eos_token); a clear error when the model has no template.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or(TokenizerError::NoChatTemplate)?;
        let text_of = |id: Option<u32>| id.and_then(|i| self.token_text(i)).unwrap_or("").to_string();
        chat::render(template, messages, add_generation_prompt, &text_of(self.bos), &text_of(self.eos))
    }
}

/// Renders a chat template outside a tokenizer (fuzzing, tools): what
/// [`Tokenizer::apply_chat_template`] does with the model's template and its bos/eos texts.
pub fn render_chat_template(template: &str, messages: &[ChatMessage], add_generation_prompt: bool, bos: &str, eos: &str) -> Result<String> {
    chat::render(template, messages, add_generation_prompt, bos, eos)
}

/// C's `isspace` in the "C" locale, which llama.cpp uses for lstrip/rstrip.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}
