//! `ember chat`: a multi-turn chat in the terminal. The conversation goes through the model's
//! chat template each turn, and the slot's KV cache is kept between turns, so a turn prefills
//! only its new tokens. When stdin is not a terminal, each line is one user turn (scripts,
//! tests); answers go to stdout, everything else to stderr.

use super::{ModelArgs, Result};
use crate::engine::slots::Slot;
use crate::engine::{Sampler, SamplerConfig, StopReason};
use crate::tokenizer::ChatMessage;
use clap::Args;
use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Args, Debug)]
#[command(after_help = "In the chat: /reset starts a new conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops the answer being written.\n\n\
    Examples:\n  ember chat --system \"You are a terse assistant.\"\n  printf 'Hi\\nWhat did I say?\\n' | ember chat --temp 0     # one turn per line")]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A system message that opens every conversation (the template's default otherwise)
    #[arg(long)]
    pub system: Option<String>,
    /// Tokens per answer at most
    #[arg(short = 'n', long = "n-predict", default_value_t = 512)]
    pub n_predict: usize,
    /// Context size in tokens for the whole conversation [default: model's, at most 4096]
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<usize>,
    /// Sampling temperature; 0 = greedy
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temperature: f32,
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Random seed of the first answer (each next answer uses the next number)
    /// [default: random, printed]
    #[arg(short = 's', long)]
    pub seed: Option<u64>,
}

/// Set by Ctrl-C while an answer is being written: the answer stops, the chat goes on.
static STOP: AtomicBool = AtomicBool::new(false);
/// Whether an answer is being written (else Ctrl-C ends the program, as usual).
static ANSWERING: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    if ANSWERING.load(Ordering::SeqCst) {
        STOP.store(true, Ordering::SeqCst);
    } else {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
}

pub fn chat(a: ChatArgs) -> Result<()> {
    if !(a.temperature >= 0.0 && a.top_p > 0.0 && a.top_p <= 1.0 && (0.0..=1.0).contains(&a.min_p)) {
        return Err("sampling options out of range: --temp >= 0, 0 < --top-p <= 1, 0 <= --min-p <= 1".into());
    }
    let path = a.model.resolve_model()?;
    let pool = a.model.pool()?;
    pool.install(|| -> Result<()> {
        let (model, tokenizer) = super::load_keeping(&path, a.model.gpu_only_types())?;
        if tokenizer.chat_template().is_none() {
            eprintln!("ember: note: {} has no chat template; using ember's default (ChatML)", path.display());
        }
        let n_ctx = a.ctx_size.unwrap_or_else(|| model.hp.n_ctx_train.min(4096));
        super::check_ctx("--ctx-size", n_ctx, &model.hp)?;
        let mut slot = Slot::new(super::backend::open(&a.model, model, n_ctx)?);
        let mut seed = a.seed.unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64));
        eprintln!("ember: chat with a context of {n_ctx} tokens, seed {seed}; /reset starts over, /exit leaves");
        #[cfg(unix)]
        // SAFETY: the handler only touches atomics and calls _exit, both async-signal-safe.
        unsafe {
            libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
        }
        let interactive = std::io::stdin().is_terminal();
        let mut lines = Lines::new(interactive)?;
        let mut messages: Vec<ChatMessage> = Vec::new();
        let reset = |messages: &mut Vec<ChatMessage>| {
            messages.clear();
            if let Some(s) = &a.system {
                messages.push(ChatMessage { role: "system".into(), content: s.clone() });
            }
        };
        reset(&mut messages);
        while let Some(line) = lines.next()? {
            let line = line.trim();
            match line {
                "" => continue,
                "/exit" | "/quit" => break,
                "/reset" => {
                    reset(&mut messages);
                    slot.reset();
                    eprintln!("ember: a new conversation");
                    continue;
                }
                _ => {}
            }
            messages.push(ChatMessage { role: "user".into(), content: line.to_string() });
            let text = tokenizer.apply_chat_template(&messages, true)?;
            let prompt = tokenizer.encode(&text, true, true)?;
            if prompt.len() >= n_ctx {
                messages.pop();
                eprintln!("ember: the conversation ({} tokens with this message) fills the context of {n_ctx}; /reset starts a new one (or use a larger --ctx-size)", prompt.len());
                continue;
            }
            let mut sampler = Sampler::new(SamplerConfig { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, min_p: a.min_p, seed, ..Default::default() });
            seed = seed.wrapping_add(1);
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            STOP.store(false, Ordering::SeqCst);
            ANSWERING.store(true, Ordering::SeqCst);
            let result = slot.generate(
                &tokenizer,
                &mut sampler,
                &prompt,
                a.n_predict.min(n_ctx - prompt.len()),
                &[],
                |piece| {
                    let _ = out.write_all(piece.as_bytes()).and_then(|_| out.flush());
                },
                &|| STOP.load(Ordering::SeqCst),
            );
            ANSWERING.store(false, Ordering::SeqCst);
            let _ = writeln!(out);
            let g = result?;
            let t = &g.generation.timings;
            eprintln!(
                "ember: prompt {} tokens ({} reused from the cache, {} prefilled at {:.1} t/s) | answer {} tokens at {:.1} t/s{}",
                prompt.len(),
                g.n_reused,
                t.n_prompt,
                t.prompt_tps(),
                t.n_generated,
                t.gen_tps(),
                match g.generation.stop {
                    StopReason::Cancelled => " | stopped by Ctrl-C",
                    StopReason::Length | StopReason::ContextFull => " | cut at the length limit",
                    _ => "",
                }
            );
            messages.push(ChatMessage { role: "assistant".into(), content: g.generation.text });
        }
        lines.finish();
        Ok(())
    })
}

/// User turns: from a line editor with history on a terminal, else one per line of stdin.
enum Lines {
    Editor(Box<rustyline::DefaultEditor>),
    Plain(std::io::StdinLock<'static>),
}

impl Lines {
    fn new(interactive: bool) -> Result<Lines> {
        Ok(match interactive {
            true => Lines::Editor(Box::new(rustyline::DefaultEditor::new().map_err(|e| format!("cannot set up line editing: {e}"))?)),
            false => Lines::Plain(std::io::stdin().lock()),
        })
    }

    /// The next line; None at the end (Ctrl-D, end of input).
    fn next(&mut self) -> Result<Option<String>> {
        match self {
            Lines::Editor(ed) => loop {
                match ed.readline("> ") {
                    Ok(l) => {
                        let _ = ed.add_history_entry(l.as_str());
                        return Ok(Some(l));
                    }
                    // Ctrl-C at the prompt clears the line, as in a shell.
                    Err(rustyline::error::ReadlineError::Interrupted) => continue,
                    Err(rustyline::error::ReadlineError::Eof) => return Ok(None),
                    Err(e) => return Err(format!("reading the terminal: {e}").into()),
                }
            },
            Lines::Plain(stdin) => {
                let mut l = String::new();
                match stdin.read_line(&mut l)? {
                    0 => Ok(None),
                    _ => Ok(Some(l)),
                }
            }
        }
    }

    fn finish(&self) {
        if let Lines::Editor(_) = self {
            eprintln!();
        }
    }
}
