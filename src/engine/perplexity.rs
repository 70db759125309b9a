//! Perplexity by llama-perplexity's protocol: the text is cut into non-overlapping windows of
//! `n_ctx` tokens; each window is evaluated alone and only its second half is scored, so every
//! scored token sees at least n_ctx/2 tokens of context.

use super::forward::{Forward, ForwardError, Logits};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PerplexityError {
    #[error("the text has {tokens} tokens: {available} whole windows of {n_ctx}, none from window {first} on")]
    NoWindows { tokens: usize, n_ctx: usize, available: usize, first: usize },
    #[error(transparent)]
    Forward(#[from] ForwardError),
}

/// Result of a perplexity run.
pub struct Perplexity {
    pub ppl: f64,
    pub err: f64,
    pub running: Vec<f64>,
}

/// Scores `tokens` in windows of `n_ctx` (at most `max_chunks` of them, 0 = all); `progress`
/// sees each running estimate.
pub fn score(session: &mut dyn Forward, tokens: &[u32], n_ctx: usize, max_chunks: usize, progress: impl FnMut(usize, f64)) -> Result<Perplexity, PerplexityError> {
    let end = if max_chunks > 0 { max_chunks } else { usize::MAX };
    score_windows(session, tokens, n_ctx, 0..end, progress)
}

/// [`score`] over the windows numbered `windows` (0 is the first; the range is cut to the
/// windows the text has): how a text is split into a part that trains something (e.g.
/// predictors, `ember profile --windows`) and a held-out part that measures it.
pub fn score_windows(session: &mut dyn Forward, tokens: &[u32], n_ctx: usize, windows: std::ops::Range<usize>, mut progress: impl FnMut(usize, f64)) -> Result<Perplexity, PerplexityError> {
    let n_vocab = session.model().hp.n_vocab;
    let available = tokens.len() / n_ctx;
    let asked = windows.start;
    let windows = windows.start.min(available)..windows.end.min(available);
    if windows.is_empty() {
        return Err(PerplexityError::NoWindows { tokens: tokens.len(), n_ctx, available, first: asked });
    }
    let first = n_ctx / 2;
    let (mut nll, mut nll2, mut count) = (0.0f64, 0.0f64, 0usize);
    let mut running = Vec::new();
    for c in windows {
        let window = &tokens[c * n_ctx..(c + 1) * n_ctx];
        session.reset();
        let logits = session.forward(window, Logits::All)?;
        for j in first..n_ctx - 1 {
            let row = &logits[j * n_vocab..(j + 1) * n_vocab];
            let v = -log_softmax(row, window[j + 1] as usize);
            if !v.is_finite() {
                return Err(ForwardError::NonFiniteLogits.into());
            }
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

