//! Fuzz target `tokenizer`: see `tokenizer` in `../checks.rs`, which the regression tests share.
//!
//! The tokenizers are loaded once, from the GGUF files named in `EMBER_FUZZ_TOKENIZER_MODELS`
//! (separated by `:`), else from every `*.gguf` in `models/` or `../models/` (the fuzz target's
//! own setup; the library itself takes no configuration from the environment).
#![no_main]

#[path = "../checks.rs"]
mod checks;

use std::path::PathBuf;
use std::sync::OnceLock;

fn model_paths() -> Vec<PathBuf> {
    if let Ok(list) = std::env::var("EMBER_FUZZ_TOKENIZER_MODELS") {
        return list.split(':').filter(|s| !s.is_empty()).map(PathBuf::from).collect();
    }
    for dir in ["models", "../models"] {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        let mut found: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "gguf")).collect();
        found.sort();
        if !found.is_empty() {
            return found;
        }
    }
    panic!("fuzz setup: no model found; set EMBER_FUZZ_TOKENIZER_MODELS=path.gguf")
}

fn tokenizers() -> &'static [checks::FuzzTokenizer] {
    static TOKS: OnceLock<Vec<checks::FuzzTokenizer>> = OnceLock::new();
    TOKS.get_or_init(|| checks::load_tokenizers(&model_paths()))
}

// Loaded before the first input (LLVMFuzzerInitialize): loading the vocabularies takes about a
// second, which on a starved core passed the 10 s time-out of a fork job's first input (the
// three time-outs of the first campaign; FUZZING.md).
libfuzzer_sys::fuzz_target!(init: { tokenizers(); }, |data: &[u8]| checks::tokenizer(tokenizers(), data));
