//! A sequence slot: a session (its own KV cache) and the tokens that cache holds, so that a
//! request whose prompt extends them (the next turn of a chat) prefills only its new tokens.
//! `ember serve` keeps `--parallel` slots, `ember chat` one.

use super::forward::{Forward, ForwardError};
use super::generate::{generate_cancellable, Generation};
use super::sampler::Sampler;
use crate::tokenizer::Tokenizer;

pub struct Slot {
    session: Box<dyn Forward>,
    /// The tokens whose keys and values are in the session's cache, in order.
    cached: Vec<u32>,
}

/// A generation in a slot, and how much of its prompt the cache already held.
pub struct SlotGeneration {
    pub generation: Generation,
    /// Prompt tokens reused from the cache (not prefilled again).
    pub n_reused: usize,
}

impl Slot {
    pub fn new(mut session: Box<dyn Forward>) -> Self {
        session.reset();
        Slot { session, cached: Vec::new() }
    }

    /// How many of `prompt`'s tokens the cache holds: all of the cached tokens when the prompt
    /// starts with them and goes on (at least one token must be evaluated for its logits),
    /// else none.
    pub fn reusable(&self, prompt: &[u32]) -> usize {
        match !self.cached.is_empty() && prompt.len() > self.cached.len() && prompt.starts_with(&self.cached) {
            true => self.cached.len(),
            false => 0,
        }
    }

    /// The tokens the cache holds.
    pub fn cached(&self) -> &[u32] {
        &self.cached
    }

    pub fn n_ctx(&self) -> usize {
        self.session.n_ctx()
    }

    /// Forgets the cached tokens.
    pub fn reset(&mut self) {
        self.session.reset();
        self.cached.clear();
    }

    /// Generates after `prompt` (the whole text so far, not only its new part), prefilling
    /// only what the cache does not hold. `cancelled` is asked before each new token.
    #[allow(clippy::too_many_arguments)]
    pub fn generate(
        &mut self,
        tokenizer: &Tokenizer,
        sampler: &mut Sampler,
        prompt: &[u32],
        n_predict: usize,
        stops: &[String],
        emit: impl FnMut(&str),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<SlotGeneration, ForwardError> {
        let n_reused = self.reusable(prompt);
        if n_reused == 0 {
            self.reset();
        }
        // The penalties see the whole context, reused or not.
        for &t in &prompt[..n_reused] {
            sampler.accept(t);
        }
        let result = generate_cancellable(self.session.as_mut(), tokenizer, sampler, &prompt[n_reused..], n_predict, stops, emit, cancelled);
        let generation = match result {
            Ok(g) => g,
            Err(e) => {
                // The cache may hold part of a batch: start the next request afresh.
                self.reset();
                return Err(e);
            }
        };
        // The session's position says which tokens were fed: the prompt and every generated
        // token but the last one predicted (never fed), whatever ended the generation.
        let n_past = self.session.n_past();
        let total = prompt.len() + generation.tokens.len();
        if n_past > total {
            self.reset();
        } else {
            self.cached.clear();
            self.cached.extend_from_slice(prompt);
            self.cached.extend_from_slice(&generation.tokens);
            self.cached.truncate(n_past);
        }
        Ok(SlotGeneration { generation, n_reused })
    }
}
