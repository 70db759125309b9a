//! Several sequences generating together: `ember serve`'s scheduler.
//!
//! A [`Batcher`] holds sessions (engines) and slots: slot i is sequence `seq` of engine
//! `engine` (a session opened with several sequences holds many slots; a session of one
//! sequence, the hybrid's or the dense offload's, holds one). A request starts in a free slot:
//! its prompt is prefilled there (only the part the slot's cache does not hold already) and its
//! first token sampled. Then each [`Batcher::step`] feeds every active sequence its last token,
//! all of an engine's rows in one [`Forward::decode_batch`] (the weights read once for all), and
//! samples each row with its request's own sampler. A request joins at the next step and leaves
//! when it ends or is cancelled, freeing its slot.
//!
//! A sequence's tokens do not depend on what else runs: `decode_batch` computes each row as
//! that sequence alone would, and each request has its own sampler and seed. The text equals
//! [`super::generate()`]'s for the same prompt, sampler and limit.

use super::forward::{check_finite, Forward, ForwardError, Logits};
use super::generate::{StopReason, TextStream, PREFILL_BATCH};
use super::sampler::Sampler;
use crate::tokenizer::Tokenizer;
use std::time::Instant;

/// What a request asks for.
pub struct Request {
    /// The whole context (a chat's next turn starts with the previous one: the slot holding it
    /// prefills only the new tokens).
    pub prompt: Vec<u32>,
    pub sampler: Sampler,
    /// At most this many tokens are generated.
    pub n_predict: usize,
    pub stops: Vec<String>,
}

/// How a request ended.
#[derive(Debug)]
pub struct Finished {
    pub stop: StopReason,
    /// The generated tokens (an end-of-generation token not included) and their text.
    pub tokens: Vec<u32>,
    pub text: String,
    pub n_prompt: usize,
    /// Prompt tokens the slot's cache held already.
    pub n_reused: usize,
    /// Seconds prefilling (up to the first token) and generating after it.
    pub prompt_secs: f64,
    pub gen_secs: f64,
}

impl Finished {
    pub fn gen_tps(&self) -> f64 {
        self.tokens.len() as f64 / self.gen_secs.max(1e-9)
    }
    pub fn prompt_tps(&self) -> f64 {
        (self.n_prompt - self.n_reused) as f64 / self.prompt_secs.max(1e-9)
    }
}

/// A request being generated in a slot.
struct Active {
    sampler: Sampler,
    stream: TextStream<'static>,
    tokens: Vec<u32>,
    n_predict: usize,
    /// The token to feed next (sampled, not yet in the cache).
    next: u32,
    n_prompt: usize,
    n_reused: usize,
    prompt_secs: f64,
    started: Instant,
}

struct Slot {
    engine: usize,
    seq: usize,
    /// The tokens whose keys and values the sequence's cache holds, in order.
    cached: Vec<u32>,
    last_used: u64,
    active: Option<Active>,
}

pub struct Batcher {
    engines: Vec<Box<dyn Forward>>,
    slots: Vec<Slot>,
    clock: u64,
}

/// What [`Batcher::step`] and [`Batcher::start`] report of each request that ended.
pub type Ended = Vec<(usize, Result<Finished, ForwardError>)>;

impl Batcher {
    /// Slots over the engines' sequences, engine after engine, at most `n_slots` of them.
    pub fn new(engines: Vec<Box<dyn Forward>>, n_slots: usize) -> Self {
        let mut slots = Vec::new();
        for (engine, e) in engines.iter().enumerate() {
            for seq in 0..e.n_seqs() {
                if slots.len() < n_slots {
                    slots.push(Slot { engine, seq, cached: Vec::new(), last_used: 0, active: None });
                }
            }
        }
        Batcher { engines, slots, clock: 0 }
    }

    pub fn n_slots(&self) -> usize {
        self.slots.len()
    }

    /// Requests being generated.
    pub fn n_active(&self) -> usize {
        self.slots.iter().filter(|s| s.active.is_some()).count()
    }

    pub fn n_ctx(&self) -> usize {
        self.engines.first().map_or(0, |e| e.n_ctx())
    }

    /// The tokens slot `slot`'s cache holds.
    pub fn cached(&self, slot: usize) -> &[u32] {
        &self.slots[slot].cached
    }

    /// How many of `prompt`'s tokens slot `slot` holds: all of its cached tokens when the
    /// prompt starts with them and goes on (one token at least is evaluated for its logits).
    pub fn reusable(&self, slot: usize, prompt: &[u32]) -> usize {
        let c = &self.slots[slot].cached;
        if !c.is_empty() && prompt.len() > c.len() && prompt.starts_with(c) { c.len() } else { 0 }
    }

    /// The free slot for `prompt`: the one holding the longest prefix of it, else the least
    /// recently used. None when every slot is busy.
    pub fn free_slot(&self, prompt: &[u32]) -> Option<usize> {
        (0..self.slots.len()).filter(|&i| self.slots[i].active.is_none()).max_by_key(|&i| (self.reusable(i, prompt), u64::MAX - self.slots[i].last_used))
    }

    /// Starts `req` in free slot `slot`: prefills what its cache does not hold and samples the
    /// first token, emitting its text. Returns the request's end when it ends at once (an
    /// end-of-generation token, a stop string, one token asked for, an error).
    pub fn start(&mut self, slot: usize, req: Request, tokenizer: &Tokenizer, emit: &mut dyn FnMut(&str)) -> Option<Result<Finished, ForwardError>> {
        assert!(self.slots[slot].active.is_none(), "slot {slot} is busy");
        self.clock += 1;
        let n_reused = self.reusable(slot, &req.prompt);
        let s = &mut self.slots[slot];
        s.last_used = self.clock;
        let engine = self.engines[s.engine].as_mut();
        let Request { prompt, mut sampler, n_predict, stops } = req;
        let started = Instant::now();
        let first = (|| -> Result<u32, ForwardError> {
            engine.select_seq(s.seq)?;
            if n_reused == 0 {
                engine.reset();
                s.cached.clear();
            }
            debug_assert_eq!(engine.n_past(), n_reused);
            // The penalties see the whole context, reused or not.
            for &t in &prompt {
                sampler.accept(t);
            }
            let mut logits = Vec::new();
            for chunk in prompt[n_reused..].chunks(PREFILL_BATCH) {
                logits = engine.forward(chunk, Logits::Last)?;
                s.cached.extend_from_slice(chunk);
            }
            check_finite(&logits)?;
            Ok(pick(&mut sampler, &logits))
        })();
        let first = match first {
            Ok(t) => t,
            Err(e) => {
                self.forget(slot);
                return Some(Err(e));
            }
        };
        let prompt_secs = started.elapsed().as_secs_f64();
        let s = &mut self.slots[slot];
        let mut a = Active { sampler, stream: TextStream::owned(stops), tokens: Vec::new(), n_predict, next: first, n_prompt: prompt.len(), n_reused, prompt_secs, started: Instant::now() };
        if n_predict == 0 {
            return Some(Ok(finish(a, StopReason::Length, emit)));
        }
        match take(&mut a, first, tokenizer, s.cached.len(), self.engines[s.engine].n_ctx(), emit) {
            Some(stop) => Some(Ok(finish(a, stop, emit))),
            None => {
                s.active = Some(a);
                None
            }
        }
    }

    /// One token for every active request: cancelled ones (`cancelled(slot)`) end first; the
    /// others' last tokens are fed, one batch per engine, and each row sampled. Text goes to
    /// `emit(slot, piece)`; the requests that ended are returned (their slots are free again).
    ///
    /// A request running alone whose next tokens the backend can pick itself (greedy, or a
    /// [`Sampler::device_rule`]) decodes as `generate` does instead: on the GPU the token is
    /// picked there and the next one queued before the host reads it, where a batch of one
    /// would read all the logits back every token. It goes on until the request ends, is
    /// cancelled, or `others_waiting()` says another request could join (then the next step
    /// batches). The tokens are those of a batch of one: the same rule on the same logits.
    pub fn step(&mut self, tokenizer: &Tokenizer, cancelled: &dyn Fn(usize) -> bool, others_waiting: &dyn Fn() -> bool, emit: &mut dyn FnMut(usize, &str)) -> Ended {
        let mut ended = Vec::new();
        for i in 0..self.slots.len() {
            if self.slots[i].active.is_some() && cancelled(i) {
                let a = self.slots[i].active.take().expect("active");
                ended.push((i, Ok(finish(a, StopReason::Cancelled, &mut |p| emit(i, p)))));
            }
        }
        let mut active = (0..self.slots.len()).filter(|&i| self.slots[i].active.is_some());
        if let (Some(i), None) = (active.next(), active.next()) {
            if self.solo(i, tokenizer, &|| cancelled(i) || others_waiting(), &mut |p| emit(i, p), &mut ended) {
                return ended;
            }
        }
        for engine in 0..self.engines.len() {
            let members: Vec<usize> = (0..self.slots.len()).filter(|&i| self.slots[i].engine == engine && self.slots[i].active.is_some()).collect();
            if members.is_empty() {
                continue;
            }
            let rows: Vec<(usize, u32)> = members.iter().map(|&i| (self.slots[i].seq, self.slots[i].active.as_ref().expect("active").next)).collect();
            let logits = match self.engines[engine].decode_batch(&rows) {
                Ok(l) => l,
                Err(e) => {
                    // The caches may hold part of the step: every member starts afresh.
                    for &i in &members {
                        self.fail(i, ForwardError::BadSequence(format!("the batch failed: {e}")), &mut ended);
                    }
                    continue;
                }
            };
            let nv = logits.len() / rows.len();
            let n_ctx = self.engines[engine].n_ctx();
            for (r, &i) in members.iter().enumerate() {
                let s = &mut self.slots[i];
                let a = s.active.as_mut().expect("active");
                s.cached.push(a.next);
                let row = &logits[r * nv..(r + 1) * nv];
                if let Err(e) = check_finite(row) {
                    self.fail(i, e, &mut ended);
                    continue;
                }
                let t = pick(&mut a.sampler, row);
                a.next = t;
                if let Some(stop) = take(a, t, tokenizer, s.cached.len(), n_ctx, &mut |p| emit(i, p)) {
                    let a = s.active.take().expect("active");
                    ended.push((i, Ok(finish(a, stop, &mut |p| emit(i, p)))));
                }
            }
        }
        ended
    }

    /// The request in slot `i`, alone, decoded by the backend's own loop until it ends or
    /// `pause()`; false (nothing done) when its sampler needs the logits on the host.
    fn solo(&mut self, i: usize, tokenizer: &Tokenizer, pause: &dyn Fn() -> bool, emit: &mut dyn FnMut(&str), ended: &mut Ended) -> bool {
        let Batcher { engines, slots, .. } = self;
        let s = &mut slots[i];
        let a = s.active.as_mut().expect("active");
        let rule = if a.sampler.is_greedy() {
            None
        } else {
            match a.sampler.device_rule() {
                Some(r) => Some(r),
                None => return false,
            }
        };
        let engine = engines[s.engine].as_mut();
        let n_ctx = engine.n_ctx();
        let room = n_ctx.saturating_sub(s.cached.len());
        let n = a.n_predict.saturating_sub(a.tokens.len()).min(room);
        let mut stop = None;
        let cached = &mut s.cached;
        let mut each = |t: u32, a: &mut Active| {
            // The token fed before this prediction is in the cache now.
            cached.push(a.next);
            a.next = t;
            stop = take(a, t, tokenizer, cached.len(), n_ctx, emit);
            stop.is_none() && !pause()
        };
        let result = engine.select_seq(s.seq).and_then(|()| match &rule {
            None => engine.decode_greedy(a.next, n, &mut |t| {
                a.sampler.accept(t);
                each(t, a)
            }),
            Some(rule) => {
                let draw0 = a.sampler.next_draw();
                engine.decode_sampled(a.next, n, rule, draw0, &mut |t| {
                    a.sampler.accept_drawn(t);
                    each(t, a)
                })
            }
        });
        match result {
            Err(e) => self.fail(i, ForwardError::BadSequence(format!("the batch failed: {e}")), ended),
            Ok(_) => {
                if let Some(stop) = stop {
                    let a = s.active.take().expect("active");
                    ended.push((i, Ok(finish(a, stop, emit))));
                }
            }
        }
        true
    }

    /// Ends slot `i`'s request with `err` and forgets its cache, which may hold part of a step.
    fn fail(&mut self, i: usize, err: ForwardError, ended: &mut Ended) {
        self.slots[i].active = None;
        self.forget(i);
        ended.push((i, Err(err)));
    }

    /// Forgets slot `slot`'s cache (after an error: it may hold part of a batch).
    fn forget(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        s.cached.clear();
        let e = self.engines[s.engine].as_mut();
        if e.select_seq(s.seq).is_ok() {
            e.reset();
        }
    }
}

/// The next token from a row's logits: the argmax where the sampler is greedy (as
/// `generate`'s greedy path takes it, without the sampler's candidate list), else a draw.
fn pick(sampler: &mut Sampler, logits: &[f32]) -> u32 {
    if sampler.is_greedy() {
        let t = crate::cpu::ops::argmax(logits).0 as u32;
        sampler.accept(t);
        t
    } else {
        sampler.sample(logits)
    }
}

/// Takes a predicted token: the reason generation ends with it, if it does (end of
/// generation, a stop string, `n_predict` tokens, as [`super::generate()`] decides; or a cache
/// of `n_cached` tokens that holds `n_ctx`, with no room to feed it).
fn take(a: &mut Active, token: u32, tokenizer: &Tokenizer, n_cached: usize, n_ctx: usize, emit: &mut dyn FnMut(&str)) -> Option<StopReason> {
    if tokenizer.is_eog(token) {
        return Some(StopReason::EndOfGeneration);
    }
    a.tokens.push(token);
    if let Some(s) = a.stream.push(&tokenizer.token_bytes(token, false), &mut |p: &str| emit(p)) {
        return Some(StopReason::StopString(s));
    }
    if a.tokens.len() >= a.n_predict {
        return Some(StopReason::Length);
    }
    (n_cached >= n_ctx).then_some(StopReason::ContextFull)
}

fn finish(mut a: Active, stop: StopReason, emit: &mut dyn FnMut(&str)) -> Finished {
    if !matches!(stop, StopReason::StopString(_)) {
        a.stream.finish(&mut |p: &str| emit(p));
    }
    Finished { stop, tokens: a.tokens, text: a.stream.text, n_prompt: a.n_prompt, n_reused: a.n_reused, prompt_secs: a.prompt_secs, gen_secs: a.started.elapsed().as_secs_f64() }
}
