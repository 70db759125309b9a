//! `ember run`: generate text, streamed to stdout; diagnostics and speed to stderr.

use super::Result;
use super::ModelArgs;
use crate::engine::{generate, Sampler, SamplerConfig, StopReason};
use crate::tokenizer::ChatMessage;
use clap::Args;
use std::io::Write;

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt (raw text completion unless --chat)
    #[arg(short = 'p', long = "prompt", conflicts_with = "file")]
    pub prompt: Option<String>,
    /// Read the prompt from a file
    #[arg(short = 'f', long = "file")]
    pub file: Option<std::path::PathBuf>,
    /// Tokens to generate at most
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    pub n_predict: usize,
    /// Treat the prompt as a user message and apply the model's chat template
    #[arg(long)]
    pub chat: bool,
    /// Optional system message for --chat (the template's default otherwise)
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Sampling temperature; 0 = greedy (always the most likely token)
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = all)
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Keep the most likely tokens whose probabilities add up to p (1 = all)
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than min-p times the most likely (0 = off)
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalise tokens seen in the last --repeat-last-n tokens (1 = off)
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed; the same seed and prompt give the same text [default: random, printed]
    #[arg(short = 's', long)]
    pub seed: Option<u64>,
    /// Stop when this string appears (repeatable); it is not printed
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Context size in tokens (prompt + generation) [default: model's, at most 4096]
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<usize>,
}

pub fn run(a: RunArgs) -> Result<()> {
    if !(a.temperature >= 0.0 && a.top_p > 0.0 && a.top_p <= 1.0 && (0.0..=1.0).contains(&a.min_p) && a.repeat_penalty > 0.0) {
        return Err("sampling options out of range: --temp >= 0, 0 < --top-p <= 1, 0 <= --min-p <= 1, --repeat-penalty > 0".into());
    }
    if a.stop.iter().any(String::is_empty) {
        return Err("--stop \"\": an empty stop string would end generation before its first token; give a non-empty string".into());
    }
    let prompt = match (&a.prompt, &a.file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?,
        (None, None) => return Err("give a prompt with -p TEXT or -f FILE".into()),
    };
    let path = a.model.resolve_model()?;
    let pool = a.model.pool()?;
    pool.install(|| -> Result<()> {
        let (model, tokenizer) = super::load_keeping(&path, a.model.gpu_only_types())?;
        let text = if a.chat {
            let mut messages = Vec::new();
            if let Some(s) = &a.system {
                messages.push(ChatMessage { role: "system".into(), content: s.clone() });
            }
            messages.push(ChatMessage { role: "user".into(), content: prompt.clone() });
            tokenizer.apply_chat_template(&messages, true)?
        } else {
            prompt.clone()
        };
        let ids = tokenizer.encode(&text, true, true)?;
        if ids.is_empty() {
            return Err("the prompt is empty after tokenization".into());
        }
        let n_ctx = a.ctx_size.unwrap_or_else(|| model.hp.n_ctx_train.min(4096));
        super::check_ctx("--ctx-size", n_ctx, &model.hp)?;
        if ids.len() >= n_ctx {
            let how = if ids.len() > n_ctx { "more than" } else { "leaving no room to generate in" };
            return Err(format!("the prompt has {}, {how} the context of {} (raise --ctx-size, up to {})", super::tokens(ids.len()), super::tokens(n_ctx), model.hp.n_ctx_train).into());
        }
        let seed = a.seed.unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64));
        eprintln!("ember: {} prompt tokens, seed {seed}, temp {}, {} threads", ids.len(), a.temperature, rayon::current_num_threads());
        let mut sampler = Sampler::new(SamplerConfig {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repeat_penalty: a.repeat_penalty,
            repeat_last_n: a.repeat_last_n,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed,
        });
        // The prompt and the tokens to generate are known: a hybrid values its KV caches at
        // the depth this run reaches on average.
        let depth = (ids.len() + a.n_predict.min(n_ctx) / 2).min(n_ctx);
        let mut session = super::backend::open_for_depth(&a.model, model, n_ctx, depth)?;
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let g = generate(session.as_mut(), &tokenizer, &mut sampler, &ids, a.n_predict, &a.stop, |piece| {
            // A closed pipe (e.g. `| head`) ends the output, not the program with a panic.
            let _ = out.write_all(piece.as_bytes()).and_then(|_| out.flush());
        })?;
        let _ = writeln!(out);
        let why = match &g.stop {
            StopReason::Length => "length".to_string(),
            StopReason::EndOfGeneration => "end of generation".to_string(),
            StopReason::StopString(s) => format!("stop string {s:?}"),
            StopReason::ContextFull => "context full".to_string(),
            StopReason::Cancelled => "cancelled".to_string(),
        };
        let t = &g.timings;
        eprintln!(
            "ember: prompt {} tokens at {:.1} t/s | generation {} tokens at {:.1} t/s | stopped: {why}",
            t.n_prompt,
            t.prompt_tps(),
            t.n_generated,
            t.gen_tps()
        );
        Ok(())
    })
}
