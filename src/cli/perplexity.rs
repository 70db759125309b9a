//! `ember perplexity`: llama-perplexity's protocol (see `engine::perplexity`).

use super::Result;
use super::ModelArgs;
use crate::engine::perplexity::score_windows;
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
    /// Score only windows A..B (0-based, B excluded; A.. or ..B): a held-out part of a text
    /// whose other windows trained something (`ember profile --windows`)
    #[arg(long, value_parser = super::parse_windows)]
    pub windows: Option<std::ops::Range<usize>>,
}

pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    if a.ctx_size < 8 {
        return Err("--ctx-size must be at least 8".into());
    }
    let text = std::fs::read_to_string(&a.file).map_err(|e| format!("{}: {e}", a.file.display()))?;
    let path = a.model.resolve_model()?;
    a.model.pool()?.install(|| -> Result<()> {
        let (model, tokenizer) = super::load_keeping(&path, a.model.gpu_only_types())?;
        super::check_ctx("--ctx-size", a.ctx_size, &model.hp)?;
        let tokens = tokenizer.encode(&text, true, false)?;
        eprintln!("ember: {} tokens, windows of {}, scoring the second half of each", tokens.len(), a.ctx_size);
        let mut session = super::backend::open(&a.model, model, a.ctx_size)?;
        let start = std::time::Instant::now();
        let mut windows = a.windows.clone().unwrap_or(0..usize::MAX);
        if a.chunks > 0 {
            windows.end = windows.end.min(windows.start.saturating_add(a.chunks));
        }
        let p = score_windows(session.as_mut(), &tokens, a.ctx_size, windows, |c, ppl| {
            print!("[{}]{ppl:.4},", c + 1);
            use std::io::Write;
            let _ = std::io::stdout().flush();
        })?;
        println!();
        eprintln!("ember: {} windows in {:.1} s{}", p.running.len(), start.elapsed().as_secs_f64(), a.windows.as_ref().map_or(String::new(), |w| format!(" (windows from {})", w.start)));
        println!("Final estimate: PPL = {:.4} +/- {:.5}", p.ppl, p.err);
        Ok(())
    })
}
