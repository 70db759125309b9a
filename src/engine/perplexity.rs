//! Perplexity by llama-perplexity's protocol: the text is cut into non-overlapping windows of
//! `n_ctx` tokens; each window is evaluated alone and only its second half is scored, so every
//! scored token sees at least n_ctx/2 tokens of context.

use super::forward::{Forward, ForwardError, Logits};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PerplexityError {
    #[error("the text has {tokens} tokens, fewer than one window of {n_ctx}")]
    TooShort { tokens: usize, n_ctx: usize },
    #[error(transparent)]
    Forward(#[from] ForwardError),
}

/// Result of a perplexity run.
pub struct Perplexity {
    pub ppl: f64,
    pub err: f64,
    pub running: Vec<f64>,
}

/// Scores `tokens` in windows of `n_ctx`; `progress` sees each running estimate.
pub fn score(session: &mut dyn Forward, tokens: &[u32], n_ctx: usize, max_chunks: usize, mut progress: impl FnMut(usize, f64)) -> Result<Perplexity, PerplexityError> {
    let n_vocab = session.model().hp.n_vocab;
    let mut n_chunks = tokens.len() / n_ctx;
    if max_chunks > 0 {
        n_chunks = n_chunks.min(max_chunks);
    }
    if n_chunks == 0 {
        return Err(PerplexityError::TooShort { tokens: tokens.len(), n_ctx });
    }
    let first = n_ctx / 2;
    let (mut nll, mut nll2, mut count) = (0.0f64, 0.0f64, 0usize);
    let mut running = Vec::new();
    for c in 0..n_chunks {
        let window = &tokens[c * n_ctx..(c + 1) * n_ctx];
        session.reset();
        let logits = session.forward(window, Logits::All)?;
        for j in first..n_ctx - 1 {
            let row = &logits[j * n_vocab..(j + 1) * n_vocab];
            let v = -log_softmax(row, window[j + 1] as usize);
            nll += v;
            nll2 += v * v;
            count += 1;
        }
        let ppl = (nll / count as f64).exp();
        running.push(ppl);
        progress(c, ppl);
    }
    let mean = nll / count as f64;
    let var = nll2 / count as f64 - mean * mean;
    let ppl = mean.exp();
    let err = if var > 0.0 && count > 1 { (var / (count - 1) as f64).sqrt() * ppl } else { 0.0 };
    Ok(Perplexity { ppl, err, running })
}

fn log_softmax(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    (logits[target] - max) as f64 - sum.ln()
}

