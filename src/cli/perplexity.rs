//! `ember perplexity`: llama-perplexity's protocol. The text is cut into non-overlapping
//! windows of `ctx` tokens; each window is evaluated alone and only its second half is scored
//! (so every scored token sees at least ctx/2 tokens of context).

use super::anyhow_like::Result;
use super::ModelArgs;
use crate::engine::{Logits, Session};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text file to score
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Window size in tokens
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512)]
    pub ctx_size: usize,
    /// Score at most this many windows (0 = all)
    #[arg(long, default_value_t = 0)]
    pub chunks: usize,
}

/// Result of a perplexity run.
pub struct Perplexity {
    pub ppl: f64,
    pub err: f64,
    pub running: Vec<f64>,
}

/// Scores `tokens` in windows of `n_ctx`; `progress` sees each running estimate.
pub fn score(session: &mut Session, tokens: &[u32], n_ctx: usize, max_chunks: usize, mut progress: impl FnMut(usize, f64)) -> Result<Perplexity> {
    let n_vocab = session.model.hp.n_vocab;
    let mut n_chunks = tokens.len() / n_ctx;
    if max_chunks > 0 {
        n_chunks = n_chunks.min(max_chunks);
    }
    if n_chunks == 0 {
        return Err(format!("the text has {} tokens, fewer than one window of {n_ctx}", tokens.len()).into());
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

pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    if a.ctx_size < 8 {
        return Err("--ctx-size must be at least 8".into());
    }
    let text = std::fs::read_to_string(&a.file).map_err(|e| format!("{}: {e}", a.file.display()))?;
    let path = a.model.resolve_model()?;
    a.model.pool()?.install(|| -> Result<()> {
        let (model, tokenizer) = super::load(&path)?;
        let tokens = tokenizer.encode(&text, true, false)?;
        eprintln!("ember: {} tokens, windows of {}, scoring the second half of each", tokens.len(), a.ctx_size);
        let mut session = Session::new(model, a.ctx_size);
        session.precision = a.model.precision.into();
        let start = std::time::Instant::now();
        let p = score(&mut session, &tokens, a.ctx_size, a.chunks, |c, ppl| {
            print!("[{}]{ppl:.4},", c + 1);
            use std::io::Write;
            let _ = std::io::stdout().flush();
        })?;
        println!();
        eprintln!("ember: {} windows in {:.1} s", p.running.len(), start.elapsed().as_secs_f64());
        println!("Final estimate: PPL = {:.4} +/- {:.5}", p.ppl, p.err);
        Ok(())
    })
}
