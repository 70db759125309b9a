//! The generation loop: prefill the prompt in batches, then sample token by token, streaming
//! text as soon as it is valid UTF-8 and cannot be the start of a stop string.

use super::forward::{check_finite, Forward, ForwardError, Logits};
use super::sampler::Sampler;
use crate::tokenizer::Tokenizer;
use std::time::Instant;

/// Why generation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// `n_predict` tokens were generated.
    Length,
    /// The model produced an end-of-generation token.
    EndOfGeneration,
    /// A stop string appeared in the text.
    StopString(String),
    /// The context is full.
    ContextFull,
    /// The caller asked to stop (a client went away, Ctrl-C).
    Cancelled,
}

#[derive(Clone, Debug, Default)]
pub struct Timings {
    pub n_prompt: usize,
    pub prompt_secs: f64,
    pub n_generated: usize,
    pub gen_secs: f64,
}

impl Timings {
    pub fn prompt_tps(&self) -> f64 {
        self.n_prompt as f64 / self.prompt_secs.max(1e-9)
    }
    pub fn gen_tps(&self) -> f64 {
        self.n_generated as f64 / self.gen_secs.max(1e-9)
    }
}

pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    pub timings: Timings,
}

enum Next {
    Token(u32),
    Logits(Vec<f32>),
}

/// Prompt tokens evaluated per forward call: bounds the activation memory of prefill.
pub const PREFILL_BATCH: usize = 512;

/// Evaluates the prompt and returns the last position's logits.
pub fn prefill(session: &mut dyn Forward, prompt: &[u32]) -> Result<Vec<f32>, ForwardError> {
    let mut logits = Vec::new();
    for chunk in prompt.chunks(PREFILL_BATCH) {
        logits = session.forward(chunk, Logits::Last)?;
    }
    Ok(logits)
}

/// Generates up to `n_predict` tokens after `prompt`, calling `emit` with each piece of text
/// as it becomes final.
pub fn generate(
    session: &mut dyn Forward,
    tokenizer: &Tokenizer,
    sampler: &mut Sampler,
    prompt: &[u32],
    n_predict: usize,
    stop_strings: &[String],
    emit: impl FnMut(&str),
) -> Result<Generation, ForwardError> {
    generate_cancellable(session, tokenizer, sampler, prompt, n_predict, stop_strings, emit, &|| false)
}

/// [`generate`], asking `cancelled` before taking each new token: when it says yes,
/// generation ends with [`StopReason::Cancelled`] (the text so far stays emitted).
#[allow(clippy::too_many_arguments)]
pub fn generate_cancellable(
    session: &mut dyn Forward,
    tokenizer: &Tokenizer,
    sampler: &mut Sampler,
    prompt: &[u32],
    n_predict: usize,
    stop_strings: &[String],
    mut emit: impl FnMut(&str),
    cancelled: &dyn Fn() -> bool,
) -> Result<Generation, ForwardError> {
    for &t in prompt {
        sampler.accept(t);
    }
    let mut timings = Timings { n_prompt: prompt.len(), ..Default::default() };
    // Greedy decoding needs only the best token: the backend picks it (on the GPU, nothing but
    // its id crosses the bus, and the next token is queued before it is read).
    let greedy = sampler.is_greedy();
    let start = Instant::now();
    let next = if greedy {
        Next::Token(session.forward_argmax(prompt)?)
    } else {
        Next::Logits(prefill(session, prompt)?)
    };
    timings.prompt_secs = start.elapsed().as_secs_f64();

    let mut out = Output { stream: TextStream::new(stop_strings), tokens: Vec::new(), stop: None, n_predict, cancelled };
    let start = Instant::now();
    if n_predict > 0 {
        match next {
            Next::Token(first) => {
                sampler.accept(first);
                if out.take(first, tokenizer, &mut emit) {
                    let room = session.n_ctx().saturating_sub(session.n_past());
                    let n = (n_predict - out.tokens.len()).min(room);
                    session.decode_greedy(first, n, &mut |t| {
                        sampler.accept(t);
                        out.take(t, tokenizer, &mut emit)
                    })?;
                    if out.stop.is_none() && out.tokens.len() < n_predict {
                        out.stop = Some(StopReason::ContextFull);
                    }
                }
            }
            Next::Logits(logits) if sampler.device_rule().is_some() => {
                // Sampling that needs nothing from the host past the first token: the backend
                // draws (on the GPU, queued like greedy decoding), with this sampler's counter.
                check_finite(&logits)?;
                let first = sampler.sample(&logits);
                let rule = sampler.device_rule().expect("checked above");
                if out.take(first, tokenizer, &mut emit) {
                    let room = session.n_ctx().saturating_sub(session.n_past());
                    let n = (n_predict - out.tokens.len()).min(room);
                    let draw0 = sampler.next_draw();
                    session.decode_sampled(first, n, &rule, draw0, &mut |t| {
                        sampler.accept_drawn(t);
                        out.take(t, tokenizer, &mut emit)
                    })?;
                    if out.stop.is_none() && out.tokens.len() < n_predict {
                        out.stop = Some(StopReason::ContextFull);
                    }
                }
            }
            Next::Logits(mut logits) => loop {
                check_finite(&logits)?;
                let token = sampler.sample(&logits);
                if !out.take(token, tokenizer, &mut emit) {
                    break;
                }
                if session.n_past() >= session.n_ctx() {
                    out.stop = Some(StopReason::ContextFull);
                    break;
                }
                logits = session.forward(&[token], Logits::Last)?;
            },
        }
    }
    timings.n_generated = out.tokens.len();
    timings.gen_secs = start.elapsed().as_secs_f64();
    let stop = out.stop.unwrap_or(StopReason::Length);
    let mut stream = out.stream;
    if !matches!(stop, StopReason::StopString(_)) {
        stream.finish(&mut emit);
    }
    Ok(Generation { tokens: out.tokens, text: stream.text, stop, timings })
}

/// The tokens generated so far, their text, and why generation ended (once it has).
struct Output<'a> {
    stream: TextStream<'a>,
    tokens: Vec<u32>,
    stop: Option<StopReason>,
    n_predict: usize,
    cancelled: &'a dyn Fn() -> bool,
}

impl Output<'_> {
    /// Takes a predicted token; false when generation ends with it (end of generation, a stop
    /// string, or `n_predict` tokens).
    fn take(&mut self, token: u32, tokenizer: &Tokenizer, emit: &mut impl FnMut(&str)) -> bool {
        if (self.cancelled)() {
            self.stop = Some(StopReason::Cancelled);
            return false;
        }
        if tokenizer.is_eog(token) {
            self.stop = Some(StopReason::EndOfGeneration);
            return false;
        }
        self.tokens.push(token);
        if let Some(s) = self.stream.push(&tokenizer.token_bytes(token, false), emit) {
            self.stop = Some(StopReason::StopString(s));
            return false;
        }
        self.tokens.len() < self.n_predict
    }
}

/// Turns token bytes into text pieces: holds back incomplete UTF-8 sequences and any tail
/// that could still grow into a stop string.
pub struct TextStream<'a> {
    bytes: Vec<u8>,
    held: String,
    stops: std::borrow::Cow<'a, [String]>,
    /// Everything emitted so far.
    pub text: String,
}

impl<'a> TextStream<'a> {
    pub fn new(stops: &'a [String]) -> Self {
        TextStream { bytes: Vec::new(), held: String::new(), stops: stops.into(), text: String::new() }
    }

    /// A stream that owns its stop strings (one of several sequences kept side by side).
    pub fn owned(stops: Vec<String>) -> TextStream<'static> {
        TextStream { bytes: Vec::new(), held: String::new(), stops: stops.into(), text: String::new() }
    }

    /// Adds bytes; returns the stop string if one is now complete (text before it is emitted).
    pub fn push(&mut self, bytes: &[u8], emit: &mut impl FnMut(&str)) -> Option<String> {
        self.bytes.extend_from_slice(bytes);
        loop {
            match std::str::from_utf8(&self.bytes) {
                Ok(s) => {
                    self.held.push_str(s);
                    self.bytes.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    self.held.push_str(std::str::from_utf8(&self.bytes[..valid]).unwrap());
                    match e.error_len() {
                        // Invalid bytes will never become valid: show a replacement character.
                        Some(bad) => {
                            self.held.push('\u{FFFD}');
                            self.bytes.drain(..valid + bad);
                        }
                        None => {
                            self.bytes.drain(..valid);
                            break;
                        }
                    }
                }
            }
        }
        if let Some((at, s)) = self.stops.iter().filter_map(|s| self.held.find(s.as_str()).map(|i| (i, s.clone()))).min() {
            let before = self.held[..at].to_string();
            self.out(&before, emit);
            self.held.clear();
            return Some(s);
        }
        // Emit all but the longest tail that is a prefix of a stop string.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).rev().filter(move |&n| s.is_char_boundary(n)).map(move |n| &s[..n]))
            .filter(|p| self.held.ends_with(p))
            .map(|p| p.len())
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let ready = self.held[..cut].to_string();
        self.held.drain(..cut);
        self.out(&ready, emit);
        None
    }

    /// Emits whatever is held (an unfinished UTF-8 sequence becomes a replacement character).
    pub fn finish(&mut self, emit: &mut impl FnMut(&str)) {
        let mut rest = std::mem::take(&mut self.held);
        if !self.bytes.is_empty() {
            rest.push_str(&String::from_utf8_lossy(&self.bytes));
            self.bytes.clear();
        }
        self.out(&rest, emit);
    }

    fn out(&mut self, s: &str, emit: &mut impl FnMut(&str)) {
        if !s.is_empty() {
            self.text.push_str(s);
            emit(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pieces: &[&[u8]], stops: &[&str]) -> (Vec<String>, Option<String>, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut st = TextStream::new(&stops);
        let mut out = Vec::new();
        for p in pieces {
            if let Some(s) = st.push(p, &mut |t: &str| out.push(t.to_string())) {
                return (out, Some(s), st.text);
            }
        }
        st.finish(&mut |t: &str| out.push(t.to_string()));
        (out, None, st.text)
    }

    #[test]
    fn split_utf8_is_held_until_complete() {
        let e = "é".as_bytes();
        let (out, _, text) = run(&[b"caf", &e[..1], &e[1..], b"!"], &[]);
        assert_eq!(out, vec!["caf", "é", "!"]);
        assert_eq!(text, "café!");
    }

    #[test]
    fn stop_string_across_tokens_is_cut_and_never_shown() {
        let (out, stop, text) = run(&[b"Hello", b" wor", b"ld\nUs", b"er: hi"], &["\nUser:"]);
        assert_eq!(stop.as_deref(), Some("\nUser:"));
        assert_eq!(text, "Hello world");
        assert!(out.iter().all(|p| !p.contains('\n')));
    }

    #[test]
    fn near_miss_of_a_stop_string_is_released() {
        let (_, stop, text) = run(&[b"a\nUse", b"ful"], &["\nUser:"]);
        assert_eq!(stop, None);
        assert_eq!(text, "a\nUseful");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let (_, _, text) = run(&[b"x\xff", b"y"], &[]);
        assert_eq!(text, "x\u{FFFD}y");
    }
}
