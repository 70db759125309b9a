//! The tokenizer against llama.cpp's reference ids, plus synthetic SentencePiece vocabularies
//! whose ids are computed by hand or by an independent re-implementation of llama.cpp's SPM
//! merge loop.

mod common;

use ember::gguf::{GgufFile, GgufWriter, Value, ValueType};
use ember::tokenizer::{ChatMessage, Tokenizer, TokenizerError};
use std::path::Path;
use std::time::Instant;

fn load(path: &Path) -> Tokenizer {
    let f = GgufFile::open(path).unwrap();
    Tokenizer::from_gguf(&f).unwrap()
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn real_models() -> Vec<std::path::PathBuf> {
    common::default_model().into_iter().chain(common::relu_model()).collect()
}

#[test]
fn roundtrips_match_llama_cpp() {
    let Some(refs) = common::refs_dir() else { return };
    let cases = common::read_jsonl(&refs.join("tokenizer-roundtrips.jsonl"));
    assert!(!cases.is_empty());
    for model in real_models() {
        let tok = load(&model);
        for c in &cases {
            let text = c["text"].as_str().unwrap();
            let want = ids_of(&c["ids"]);
            assert_eq!(tok.encode(text, true, false).unwrap(), want, "{}: ids of {text:?}", model.display());
            assert_eq!(tok.encode(text, false, false).unwrap(), ids_of(&c["ids_no_bos"]), "{text:?} without specials");
            assert_eq!(tok.encode(text, true, true).unwrap(), want, "{text:?} with parse_special");
            assert_eq!(tok.decode(&want, false), c["detokenized"].as_str().unwrap());
            assert_eq!(tok.decode(&want, false), text);
        }
    }
}

#[test]
fn greedy_prompts_and_generations_match_llama_cpp() {
    let Some(refs) = common::refs_dir() else { return };
    let Some(model) = common::default_model() else { return };
    let tok = load(&model);
    let cases = common::read_jsonl(&refs.join("greedy-generations.jsonl"));
    assert!(!cases.is_empty());
    for c in &cases {
        let prompt = c["prompt"].as_str().unwrap();
        assert_eq!(tok.encode(prompt, true, false).unwrap(), ids_of(&c["prompt_ids"]), "prompt {prompt:?}");
        let generated = ids_of(&c["generated_ids"]);
        assert_eq!(tok.decode(&generated, false), c["text"].as_str().unwrap(), "generation after {prompt:?}");
        // Streaming: the per-token bytes concatenate to the same text, and end where llama.cpp
        // says each piece ends.
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for &id in &generated {
            bytes.extend(tok.token_bytes(id, false));
            ends.push(String::from_utf8_lossy(&bytes).chars().count() as u64);
        }
        assert_eq!(String::from_utf8(bytes).unwrap(), c["text"].as_str().unwrap());
        if let Some(want) = c.get("piece_end_chars").and_then(|v| v.as_array()) {
            let want: Vec<u64> = want.iter().map(|x| x.as_u64().unwrap()).collect();
            assert_eq!(ends, want, "piece ends after {prompt:?}");
        }
        // The whole prompt + generation re-encodes to something that decodes back.
        let all = format!("{prompt}{}", c["text"].as_str().unwrap());
        assert_eq!(tok.decode(&tok.encode(&all, true, false).unwrap(), false), all);
    }
}

#[test]
fn smollm_metadata_special_tokens_and_eog() {
    let Some(model) = common::default_model() else { return };
    let tok = load(&model);
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert!(!tok.add_bos());
    // <|endoftext|>, <|im_end|> and <reponame> (a FIM repository marker) end generation.
    for id in [0, 2, 4] {
        assert!(tok.is_eog(id), "{id} should be EOG");
    }
    for id in [1, 3, 5, 17, 198] {
        assert!(!tok.is_eog(id), "{id} should not be EOG");
    }
    // Control tokens render only on request; parse_special decides whether their text is one token.
    assert_eq!(tok.decode(&[1, 9690, 2], false), "system");
    assert_eq!(tok.decode(&[1, 9690, 2], true), "<|im_start|>system<|im_end|>");
    assert!(tok.token_bytes(2, false).is_empty());
    assert_eq!(tok.token_bytes(2, true), b"<|im_end|>");
    assert_eq!(tok.encode("<|im_start|>", false, true).unwrap(), vec![1]);
    let plain = tok.encode("<|im_start|>", false, false).unwrap();
    assert!(plain.len() > 1 && !plain.contains(&1), "{plain:?}");
    assert_eq!(tok.decode(&plain, false), "<|im_start|>");
    assert_eq!(tok.encode("a<|im_end|>b<|endoftext|>", false, true).unwrap()[1], 2);
    // A byte-level token that is half of a UTF-8 character gives exactly that byte.
    let emoji = tok.encode("😀", false, false).unwrap();
    let bytes: Vec<u8> = emoji.iter().flat_map(|&id| tok.token_bytes(id, false)).collect();
    assert_eq!(bytes, "😀".as_bytes());
    assert!(tok.encode("", true, true).unwrap().is_empty());
}

#[test]
fn smollm_chat_template() {
    let Some(model) = common::default_model() else { return };
    let tok = load(&model);
    assert!(tok.chat_template().unwrap().contains("<|im_start|>"));
    let msgs = [ChatMessage { role: "user".into(), content: "Hi".into() }];
    let text = tok.apply_chat_template(&msgs, true).unwrap();
    let want = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
                <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(text, want);
    assert_eq!(
        tok.apply_chat_template(&msgs, false).unwrap(),
        want.strip_suffix("<|im_start|>assistant\n").unwrap()
    );
    // A conversation that brings its own system prompt replaces the default one.
    let sys = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")];
    assert_eq!(
        tok.apply_chat_template(&sys, true).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );

    let ids = tok.encode(&text, true, true).unwrap();
    assert_eq!(ids[0], 1, "<|im_start|> is one token (id 1)");
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 3);
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 2);
    // Same as tokenizing the text between the special tokens on its own.
    let mut want_ids = Vec::new();
    for (i, part) in text.split("<|im_start|>").enumerate() {
        if i > 0 {
            want_ids.push(1);
        }
        for (j, sub) in part.split("<|im_end|>").enumerate() {
            if j > 0 {
                want_ids.push(2);
            }
            want_ids.extend(tok.encode(sub, false, false).unwrap());
        }
    }
    assert_eq!(ids, want_ids);
    assert_eq!(tok.decode(&ids, true), text);
}

#[test]
fn from_gguf_is_fast() {
    let Some(model) = common::default_model() else { return };
    let f = GgufFile::open(&model).unwrap();
    let _ = Tokenizer::from_gguf(&f).unwrap(); // warm the page cache
    let t = Instant::now();
    let n = 3;
    for _ in 0..n {
        std::hint::black_box(Tokenizer::from_gguf(&f).unwrap());
    }
    let per = t.elapsed().as_secs_f64() / n as f64;
    eprintln!("from_gguf on {}: {:.1} ms", model.display(), per * 1e3);
    assert!(per < 2.0, "from_gguf took {per:.2} s");
}

// ---------------------------------------------------------------------------------------------
// Synthetic SentencePiece ("llama") vocabularies.

const UNK: u32 = 0;
const BOS: u32 = 1;
const EOS: u32 = 2;
/// Id of byte token <0xAB>.
fn byte_id(b: u8) -> u32 {
    3 + b as u32
}
const FIRST_PIECE: u32 = 259;

/// <unk>, <s>, </s>, the 256 byte tokens, then `pieces` (text, score, token type).
fn spm_vocab(pieces: &[(&str, f32, i32)]) -> Vec<(String, f32, i32)> {
    let mut v = vec![("<unk>".to_string(), 0.0, 2), ("<s>".to_string(), 0.0, 3), ("</s>".to_string(), 0.0, 3)];
    v.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0, 6)));
    v.extend(pieces.iter().map(|&(t, s, ty)| (t.to_string(), s, ty)));
    v
}

fn spm_writer(vocab: &[(String, f32, i32)]) -> GgufWriter {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("tokenizer.ggml.model", Value::String("llama".into()));
    w.set("tokenizer.ggml.tokens", Value::Array(ValueType::String, vocab.iter().map(|t| Value::String(t.0.clone())).collect()));
    w.set("tokenizer.ggml.scores", Value::Array(ValueType::F32, vocab.iter().map(|t| Value::F32(t.1)).collect()));
    w.set("tokenizer.ggml.token_type", Value::Array(ValueType::I32, vocab.iter().map(|t| Value::I32(t.2)).collect()));
    w.set("tokenizer.ggml.bos_token_id", Value::U32(BOS));
    w.set("tokenizer.ggml.eos_token_id", Value::U32(EOS));
    w.set("tokenizer.ggml.unknown_token_id", Value::U32(UNK));
    w
}

fn build(w: &GgufWriter) -> Result<Tokenizer, TokenizerError> {
    Tokenizer::from_gguf(&GgufFile::from_bytes(w.to_bytes()).unwrap())
}

const HELLO_PIECES: &[(&str, f32, i32)] = &[
    ("▁", -10.0, 1),       // 259
    ("h", -10.0, 1),       // 260
    ("e", -10.0, 1),       // 261
    ("l", -10.0, 1),       // 262
    ("o", -10.0, 1),       // 263
    ("w", -10.0, 1),       // 264
    ("r", -10.0, 1),       // 265
    ("d", -10.0, 1),       // 266
    ("ll", -1.0, 1),       // 267
    ("he", -2.0, 1),       // 268
    ("hell", -3.0, 1),     // 269
    ("hello", -4.0, 1),    // 270
    ("▁hello", -5.0, 1),   // 271
    ("or", -6.0, 1),       // 272
    ("▁w", -7.0, 1),       // 273
    ("▁wor", -8.0, 1),     // 274
    ("<tool>", 0.0, 4),    // 275: user-defined
    ("<|turn|>", 0.0, 3),  // 276: control
];

#[test]
fn spm_hand_computed_ids() {
    let vocab = spm_vocab(HELLO_PIECES);
    let tok = build(&spm_writer(&vocab)).unwrap();
    let p = |i: u32| FIRST_PIECE + i;
    assert_eq!(tok.vocab_size(), 259 + HELLO_PIECES.len());
    assert!(tok.add_bos(), "SPM vocabularies add BOS by default");
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(BOS), Some(EOS)));
    assert!(tok.is_eog(EOS) && !tok.is_eog(BOS));

    // "▁hello▁world": ll(-1), he(-2) -> hell(-3) -> hello(-4) -> ▁hello(-5); then "or" (-6)
    // beats the leftmost "▁w" (-7); ▁w + or -> ▁wor (-8); "l", "d" stay single.
    let hw = vec![p(12), p(15), p(3), p(7)];
    assert_eq!(tok.encode("hello world", false, false).unwrap(), hw);
    let mut with_bos = vec![BOS];
    with_bos.extend(&hw);
    assert_eq!(tok.encode("hello world", true, false).unwrap(), with_bos);
    // Detokenizing concatenates pieces: the prefix space stays (as common_token_to_piece does).
    assert_eq!(tok.decode(&hw, false), " hello world");
    assert_eq!(tok.decode(&with_bos, false), " hello world");
    assert_eq!(tok.decode(&with_bos, true), "<s> hello world");

    // No "▁"-prefixed piece is needed for a word that is not at the start.
    assert_eq!(tok.encode("ho", false, false).unwrap(), vec![p(0), p(1), p(4)]);

    // Byte fallback: "é" is not in the vocabulary, so its two UTF-8 bytes are emitted.
    let ids = tok.encode("hello é", false, false).unwrap();
    assert_eq!(ids, vec![p(12), p(0), byte_id(0xC3), byte_id(0xA9)]);
    assert_eq!(tok.decode(&ids, false), " hello é");
    assert_eq!(tok.token_bytes(byte_id(0xC3), false), vec![0xC3]);
    assert_eq!(tok.token_bytes(p(0), false), b" ");
    // An incomplete character decodes lossily.
    assert_eq!(tok.decode(&[byte_id(0xC3)], false), "\u{FFFD}");

    // Several spaces: each one is a "▁".
    assert_eq!(tok.encode("he  ll", false, false).unwrap(), vec![p(0), p(9), p(0), p(0), p(8)]);

    // A user-defined token is matched whole even without parse_special, and the text after it
    // gets the space prefix again.
    assert_eq!(tok.encode("hello<tool>hello", false, false).unwrap(), vec![p(12), p(16), p(12)]);
    // Control tokens need parse_special; otherwise their text is bytes.
    assert_eq!(tok.encode("<s>hello", false, true).unwrap(), vec![BOS, p(12)]);
    assert_eq!(
        tok.encode("<s>hello", false, false).unwrap(),
        vec![p(0), byte_id(b'<'), byte_id(b's'), byte_id(b'>'), p(11)]
    );
    assert_eq!(tok.encode("hello<|turn|>world", false, true).unwrap(), vec![p(12), p(17), p(15), p(3), p(7)]);
    assert_eq!(tok.decode(&[p(16), p(17)], false), "<tool>");
    assert_eq!(tok.decode(&[p(16), p(17)], true), "<tool><|turn|>");

    // add_space_prefix = false: no leading "▁", so "hello" is not "▁hello".
    let mut w = spm_writer(&vocab);
    w.set("tokenizer.ggml.add_space_prefix", Value::Bool(false));
    w.set("tokenizer.ggml.add_bos_token", Value::Bool(false));
    let tok = build(&w).unwrap();
    assert_eq!(tok.encode("hello world", true, false).unwrap(), vec![p(11), p(15), p(3), p(7)]);
}

#[test]
fn spm_without_byte_tokens_uses_unk() {
    let mut vocab: Vec<(String, f32, i32)> = vec![("<unk>".into(), 0.0, 2), ("<s>".into(), 0.0, 3), ("</s>".into(), 0.0, 3)];
    vocab.extend([("▁".into(), -1.0, 1), ("a".into(), -1.0, 1), ("▁a".into(), -0.5, 1)]);
    let tok = build(&spm_writer(&vocab)).unwrap();
    assert_eq!(tok.encode("a", false, false).unwrap(), vec![5]);
    assert_eq!(tok.encode("a z", false, false).unwrap(), vec![5, 3, UNK]);
    assert_eq!(tok.decode(&[5, 3, UNK], false), " a ");
}

/// llama.cpp's SPM tokenizer, written independently from its description: start from characters,
/// repeatedly merge the adjacent pair whose concatenation is a token with the highest score
/// (leftmost on ties), emit unknown characters as byte tokens.
fn reference_spm(vocab: &[(String, f32, i32)], text: &str) -> Vec<u32> {
    use std::collections::{BinaryHeap, HashMap};
    let index: HashMap<&str, u32> = vocab.iter().enumerate().map(|(i, t)| (t.0.as_str(), i as u32)).collect();
    let mut syms: Vec<String> = text.chars().map(String::from).collect();
    let n = syms.len();
    let mut next: Vec<isize> = (1..=n as isize).map(|i| if i as usize == n { -1 } else { i }).collect();
    let mut prev: Vec<isize> = (0..n as isize).map(|i| i - 1).collect();
    // (score bits ordered, -left, left, right, len)
    #[derive(PartialEq)]
    struct Cand(f32, usize, usize, usize);
    impl Eq for Cand {}
    impl PartialOrd for Cand {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }
    impl Ord for Cand {
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            self.0.total_cmp(&o.0).then(o.1.cmp(&self.1))
        }
    }
    let mut heap = BinaryHeap::new();
    let push = |heap: &mut BinaryHeap<Cand>, syms: &[String], l: isize, r: isize| {
        if l < 0 || r < 0 {
            return;
        }
        let s = format!("{}{}", syms[l as usize], syms[r as usize]);
        if let Some(&id) = index.get(s.as_str()) {
            heap.push(Cand(vocab[id as usize].1, l as usize, r as usize, s.len()));
        }
    };
    for i in 1..n {
        push(&mut heap, &syms, i as isize - 1, i as isize);
    }
    while let Some(Cand(_, l, r, len)) = heap.pop() {
        if syms[l].is_empty() || syms[r].is_empty() || syms[l].len() + syms[r].len() != len {
            continue;
        }
        let right = std::mem::take(&mut syms[r]);
        syms[l].push_str(&right);
        next[l] = next[r];
        if next[r] >= 0 {
            prev[next[r] as usize] = l as isize;
        }
        push(&mut heap, &syms, prev[l], l as isize);
        push(&mut heap, &syms, l as isize, next[l]);
    }
    let mut out = Vec::new();
    let mut i = if n == 0 { -1 } else { 0 };
    while i >= 0 {
        let s = &syms[i as usize];
        match index.get(s.as_str()) {
            Some(&id) => out.push(id),
            None => out.extend(s.bytes().map(byte_id)),
        }
        i = next[i as usize];
    }
    out
}

fn random_spm_vocab(rng: &mut common::Rng, distinct_scores: bool) -> Vec<(String, f32, i32)> {
    let alphabet = ["a", "b", "c", "d", "▁"];
    let mut pieces: Vec<String> = alphabet.iter().map(|s| s.to_string()).collect();
    while pieces.len() < 60 {
        let len = 2 + (rng.next_u64() % 4) as usize;
        let p: String = (0..len).map(|_| alphabet[(rng.next_u64() % alphabet.len() as u64) as usize]).collect();
        if !pieces.contains(&p) {
            pieces.push(p);
        }
    }
    let mut vocab = spm_vocab(&[]);
    for (i, p) in pieces.into_iter().enumerate() {
        let score = if distinct_scores { -(i as f32) - rng.signed().abs() * 0.5 } else { -((rng.next_u64() % 3) as f32) };
        vocab.push((p, score, 1));
    }
    vocab
}

fn random_text(rng: &mut common::Rng) -> String {
    let chars = ['a', 'b', 'c', 'd', ' ', ' ', 'é', 'a', 'b'];
    let len = (rng.next_u64() % 40) as usize;
    (0..len).map(|_| chars[(rng.next_u64() % chars.len() as u64) as usize]).collect()
}

#[test]
fn spm_matches_reference_merge_loop() {
    let mut rng = common::Rng(7);
    let mut checked = 0;
    for _ in 0..20 {
        let vocab = random_spm_vocab(&mut rng, true);
        let tok = build(&spm_writer(&vocab)).unwrap();
        for _ in 0..200 {
            let text = random_text(&mut rng);
            let escaped = format!(" {text}").replace(' ', "▁");
            let want = if text.is_empty() { vec![] } else { reference_spm(&vocab, &escaped) };
            assert_eq!(tok.encode(&text, false, false).unwrap(), want, "{text:?} with vocab {vocab:?}");
            assert_eq!(tok.decode(&want, false), if text.is_empty() { String::new() } else { format!(" {text}") });
            checked += 1;
        }
    }
    assert_eq!(checked, 4000);
}

/// With tied scores llama.cpp merges the leftmost candidate, while BPE ranks are a fixed order;
/// the two rarely disagree. This measures how rarely (it does not fail).
#[test]
fn spm_tied_scores_agreement() {
    let mut rng = common::Rng(11);
    let (mut same, mut total) = (0, 0);
    for _ in 0..20 {
        let vocab = random_spm_vocab(&mut rng, false);
        let tok = build(&spm_writer(&vocab)).unwrap();
        for _ in 0..200 {
            let text = random_text(&mut rng);
            if text.is_empty() {
                continue;
            }
            let want = reference_spm(&vocab, &format!(" {text}").replace(' ', "▁"));
            let got = tok.encode(&text, false, false).unwrap();
            same += usize::from(got == want);
            total += 1;
            assert_eq!(tok.decode(&got, false), format!(" {text}"), "tokenization must stay lossless");
        }
    }
    eprintln!("SPM with tied scores: {same}/{total} identical to llama.cpp's leftmost rule");
}

// ---------------------------------------------------------------------------------------------
// Errors.

#[test]
fn unsupported_model_is_named() {
    let mut w = spm_writer(&spm_vocab(HELLO_PIECES));
    w.set("tokenizer.ggml.model", Value::String("t5-unigram-x".into()));
    let err = build(&w).unwrap_err();
    assert!(matches!(err, TokenizerError::UnsupportedModel(ref m) if m == "t5-unigram-x"), "{err:?}");
    assert!(err.to_string().contains("t5-unigram-x"), "{err}");
}

#[test]
fn missing_tokens_is_an_error() {
    let mut w = GgufWriter::new();
    w.set("tokenizer.ggml.model", Value::String("llama".into()));
    let err = build(&w).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.tokens"), "{err}");

    let w = GgufWriter::new();
    let err = build(&w).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.model"), "{err}");
}

fn tiny_bpe_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    let tokens = ["<|endoftext|>", "a", "b", "ab", "Ġ", "Ġab"];
    w.set("tokenizer.ggml.model", Value::String("gpt2".into()));
    w.set("tokenizer.ggml.pre", Value::String("gpt-2".into()));
    w.set("tokenizer.ggml.tokens", Value::Array(ValueType::String, tokens.iter().map(|t| Value::String(t.to_string())).collect()));
    w.set("tokenizer.ggml.token_type", Value::Array(ValueType::I32, [3, 1, 1, 1, 1, 1].iter().map(|&t| Value::I32(t)).collect()));
    w.set(
        "tokenizer.ggml.merges",
        Value::Array(ValueType::String, ["a b", "Ġ ab"].iter().map(|t| Value::String(t.to_string())).collect()),
    );
    w.set("tokenizer.ggml.eos_token_id", Value::U32(0));
    w.set("tokenizer.ggml.bos_token_id", Value::U32(0));
    w
}

#[test]
fn tiny_bpe_and_its_errors() {
    let tok = build(&tiny_bpe_writer()).unwrap();
    assert_eq!(tok.encode("ab ab", true, false).unwrap(), vec![3, 5]);
    assert_eq!(tok.encode("ab<|endoftext|>", false, true).unwrap(), vec![3, 0]);
    assert!(tok.is_eog(0));
    assert_eq!(tok.decode(&[3, 5, 0], false), "ab ab");

    let mut w = tiny_bpe_writer();
    w.set("tokenizer.ggml.merges", Value::Array(ValueType::String, vec![Value::String("ab".into())]));
    let err = build(&w).unwrap_err();
    assert!(matches!(err, TokenizerError::BadMerge { index: 0, .. }), "{err:?}");
    assert!(err.to_string().contains("merge"), "{err}");

    let mut w = tiny_bpe_writer();
    w.set("tokenizer.ggml.pre", Value::String("no-such-pre".into()));
    let err = build(&w).unwrap_err();
    assert!(err.to_string().contains("no-such-pre"), "{err}");

    let mut w = tiny_bpe_writer();
    w.set("tokenizer.ggml.token_type", Value::Array(ValueType::I32, vec![Value::I32(1)]));
    let err = build(&w).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.token_type"), "{err}");

    let mut w = tiny_bpe_writer();
    w.set("tokenizer.ggml.tokens", Value::Array(ValueType::String, ["a", "b", "a"].iter().map(|t| Value::String(t.to_string())).collect()));
    w.set("tokenizer.ggml.token_type", Value::Array(ValueType::I32, vec![Value::I32(1); 3]));
    let err = build(&w).unwrap_err();
    assert!(matches!(err, TokenizerError::DuplicateToken { .. }), "{err:?}");

    let tok = build(&tiny_bpe_writer()).unwrap();
    assert!(matches!(tok.apply_chat_template(&[], true), Err(TokenizerError::NoChatTemplate)));
}

// ---------------------------------------------------------------------------------------------
// Chat template idioms and HF directories.

fn with_template(template: &str) -> Tokenizer {
    let mut w = tiny_bpe_writer();
    w.set("tokenizer.chat_template", Value::String(template.into()));
    build(&w).unwrap()
}

#[test]
fn chat_template_python_idioms() {
    let msgs = [ChatMessage::new("system", "  Be brief.  "), ChatMessage::new("user", "Hi there")];
    let tok = with_template(
        "{{ bos_token }}{% for m in messages %}{% if loop.first %}[first]{% endif %}\
         {{ m['role'].upper() }}:{{ m.content.strip() }}|{{ m.content.lstrip() }}|\
         {{ m.content.startswith('Hi') }}{{ m.content.endswith(('x', 'ere')) }}\
         {{ m.content.split(' ')|length }}{{ m.content.replace('Hi', 'Yo') }};{% endfor %}\
         {{ {'a': 1, 'b': [1, 'x']}|tojson }}{% for k, v in {'k': 'v'}.items() %}{{ k }}={{ v }}{% endfor %}\
         {{ {'q': 1}.get('q') }}{{ {'q': 1}.get('z', 'dflt') }}{{ eos_token }}",
    );
    let out = tok.apply_chat_template(&msgs, false).unwrap();
    assert_eq!(
        out,
        "<|endoftext|>[first]SYSTEM:Be brief.|Be brief.  |FalseFalse6  Be brief.  ;\
         USER:Hi there|Hi there|TrueTrue2Yo there;{\"a\": 1, \"b\": [1, \"x\"]}k=v1dflt<|endoftext|>"
    );

    let tok = with_template(
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('Conversations must start with a system message') }}{% endif %}ok",
    );
    let err = tok.apply_chat_template(&[ChatMessage::new("user", "x")], true).unwrap_err();
    assert!(err.to_string().contains("Conversations must start with a system message"), "{err}");
    assert_eq!(tok.apply_chat_template(&[ChatMessage::new("system", "x")], true).unwrap(), "ok");

    // Block tags leave no stray newlines or indentation (trim_blocks + lstrip_blocks).
    let tok = with_template("{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}");
    assert_eq!(tok.apply_chat_template(&msgs[1..], false).unwrap(), "Hi there\n");

    let tok = with_template("{{ strftime_now('%Y-%m-%d') }}");
    let date = tok.apply_chat_template(&[], false).unwrap();
    assert_eq!(date.len(), 10, "{date}");

    let tok = with_template("{% for m in messages %}");
    assert!(matches!(tok.apply_chat_template(&msgs, false), Err(TokenizerError::Template(_))));
}

#[test]
fn hf_dir_tokenizer() {
    let dir = std::env::temp_dir().join(format!("ember-tok-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tokenizer_json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 7, "content": "<|im_start|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 8, "content": "<|im_end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": {"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3, "Ġ": 4, "Ġab": 5, "Ċ": 6, "<|im_start|>": 7, "<|im_end|>": 8},
            "merges": ["a b", "Ġ ab"]
        }
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json.to_string()).unwrap();
    let config = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>"},
        "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();

    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!(tok.vocab_size(), 9);
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.add_bos()), (Some(7), Some(8), false));
    assert!(tok.is_eog(8) && tok.is_eog(0) && !tok.is_eog(7));
    let text = tok.apply_chat_template(&[ChatMessage::new("ab", "ab ab")], true).unwrap();
    assert_eq!(text, "<|im_start|>ab\nab ab<|im_end|>\n<|im_start|>assistant\n");
    let ids = tok.encode("<|im_start|>ab\nab ab<|im_end|>", true, true).unwrap();
    assert_eq!(ids, vec![7, 3, 6, 3, 5, 8]);
    assert_eq!(tok.decode(&ids, false), "ab\nab ab");
    assert_eq!(tok.decode(&ids, true), "<|im_start|>ab\nab ab<|im_end|>");
    let plain = tok.encode("<|im_start|>", false, false).unwrap();
    assert!(!plain.contains(&7), "{plain:?}");
    std::fs::remove_dir_all(&dir).ok();

    let err = Tokenizer::from_hf_dir(Path::new("/nonexistent/ember")).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

/// llama-perplexity split ppl-text.txt into 38 chunks of 256 tokens, so llama.cpp found between
/// 38*256 and 39*256-1 tokens in it.
#[test]
fn perplexity_text_token_count() {
    let Some(refs) = common::refs_dir() else { return };
    let Some(model) = common::default_model() else { return };
    let tok = load(&model);
    let text = std::fs::read_to_string(refs.join("ppl-text.txt")).unwrap();
    let ppl = &serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(refs.join("perplexity.json")).unwrap()).unwrap()[0];
    let (chunks, ctx) = (ppl["n_chunks"].as_u64().unwrap() as usize, ppl["n_ctx"].as_u64().unwrap() as usize);
    let t = Instant::now();
    let ids = tok.encode(&text, true, false).unwrap();
    let dt = t.elapsed().as_secs_f64();
    eprintln!("ppl-text.txt: {} bytes -> {} tokens in {:.1} ms", text.len(), ids.len(), dt * 1e3);
    assert!((chunks * ctx..(chunks + 1) * ctx).contains(&ids.len()), "{} tokens", ids.len());
    assert_eq!(tok.decode(&ids, false), text);
}

#[test]
fn tokenizer_is_send_sync_clone() {
    fn check<T: Send + Sync + Clone + std::fmt::Debug>() {}
    check::<Tokenizer>();
    check::<ChatMessage>();
}
