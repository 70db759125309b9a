//! Pre-tokenizer settings per `tokenizer.ggml.pre` value, as llama.cpp defines them.
//!
//! Each entry lists regexes applied one after the other: every regex splits each piece the
//! previous one produced into matches and the text between them (both kept). llama.cpp writes
//! the GPT-2 regex without its final `|\s+` alternative but runs it through a hand-written
//! matcher that behaves as if it were there; the full regex is used here so that oniguruma gives
//! the same pieces.

/// GPT-2: contractions, letters, numbers, other symbols, whitespace.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3 (tiktoken cl100k-style): numbers in groups of up to three.
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2: as Llama 3 but single digits.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const SEED_CODER: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const BLOOM: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";

/// What a pre-tokenizer type means for tokenizing.
pub(crate) struct PreConfig {
    pub regexes: &'static [&'static str],
    /// A whole pre-tokenized word that is itself a token is emitted without merging.
    pub ignore_merges: bool,
    /// llama.cpp's default for add_bos before `tokenizer.ggml.add_bos_token` is read.
    pub add_bos: bool,
}

const fn cfg(regexes: &'static [&'static str]) -> PreConfig {
    PreConfig { regexes, ignore_merges: false, add_bos: false }
}

/// The names accepted, for error messages.
pub(crate) const KNOWN: &str = "default, llama3/llama-v3/llama-bpe/falcon3/falcon-h1/pixtral/midm-2.0/lfm2, dbrx, smaug-bpe, \
chatglm-bpe/glm4, gpt-2/phi-2/jina-es/jina-de/gigachat/jina-v2-es/jina-v2-de/a.x-4.0/mellum/modern-bert/jina-v1-en/jina-v2-code/roberta-bpe/exaone4, \
mpt, olmo, jais, trillion, granite-docling, starcoder, refact, command-r, smollm, codeshell, exaone, minerva-7b, mellum2, \
qwen2/deepseek-r1-qwen/kormo/f2llmv2/megrez, stablelm2, hunyuan, solar-open, qwen35, falcon, tekken, gpt-4o/llama4/kanana2, \
poro-chat, bloom, gpt3-finnish, viking, seed-coder, grok-2";

/// The configuration for a `tokenizer.ggml.pre` value (absent means "default").
pub(crate) fn config(pre: Option<&str>) -> Option<PreConfig> {
    let pre = match pre {
        None | Some("") => "default",
        Some(p) => p,
    };
    Some(match pre {
        "default" => cfg(&[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" | "jina-v5-nano" => {
            PreConfig { regexes: &[LLAMA3], ignore_merges: true, add_bos: true }
        }
        "dbrx" | "smaug-bpe" | "chatglm-bpe" | "glm4" => cfg(&[LLAMA3]),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de" | "a.x-4.0" | "mellum"
        | "modern-bert" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe" | "exaone4" | "mpt" | "olmo" | "jais"
        | "trillion" | "granite-docling" => cfg(&[GPT2]),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
            cfg(&[r"\p{N}", GPT2])
        }
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan" | "solar-open" => {
            cfg(&[QWEN2])
        }
        "qwen35" => cfg(&[QWEN35]),
        "grok-2" => cfg(&[QWEN2]),
        "seed-coder" => cfg(&[SEED_CODER]),
        "falcon" => cfg(&[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"]),
        "tekken" => PreConfig { regexes: &[TEKKEN], ignore_merges: true, add_bos: true },
        "gpt-4o" | "llama4" | "kanana2" => cfg(&[GPT4O]),
        "poro-chat" | "bloom" | "gpt3-finnish" => cfg(&[BLOOM]),
        "viking" => cfg(&[BLOOM, r"\p{N}"]),
        _ => return None,
    })
}
