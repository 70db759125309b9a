//! `ember serve`: an OpenAI-compatible HTTP server (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`, `/health`).
//!
//! HTTP runs on a small tokio runtime (axum); the model runs on one worker thread that owns
//! `--parallel` slots (`engine::slots::Slot`: a session and the tokens its KV cache holds).
//! Requests go to the worker through a queue bounded by `--queue`; beyond it they get 503.
//! The worker steps every running request one token at a time, together (`engine::batch`):
//! on the CPU and the dense GPU session the slots are sequences of one session, decoded as one
//! batch per step (the weights read once for all of them); a new request is prefilled between
//! steps and joins the next one. The slots keep their caches, so a request whose prompt
//! extends a slot's tokens (a chat's next turn) prefills only the new ones. A request whose
//! client goes away (its stream or response dropped) is cancelled before its next token and
//! frees its slot.

use super::{ModelArgs, Result};
use crate::engine::batch::{self, Batcher, Finished};
use crate::engine::{Sampler, SamplerConfig, StopReason};
use crate::tokenizer::{ChatMessage, Tokenizer};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Args;
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  ember serve                                  # the default model on http://127.0.0.1:8080\n  \
    ember serve -m model.gguf --port 9000 --api-key secret --parallel 2\n  \
    curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\\n       \
    -d '{\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}],\"stream\":true}'\n\n\
    Any OpenAI client works: set its base URL to http://HOST:PORT/v1 (and its API key to --api-key's).")]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (0.0.0.0 for every interface: then set --api-key)
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start)
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health
    #[arg(long, env = "EMBER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Sequence slots, each with its own KV cache of --ctx-size tokens (a chat's next turn
    /// reuses its slot's cache); up to this many requests run together, one token each per
    /// step. On the CPU and the dense GPU session they decode as one batch (the weights read
    /// once per step for all); the hybrid and the dense offload decode them one after another
    /// for now (one session per slot)
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// Requests that may wait for the worker beyond those running; more get 503
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// Context size per slot in tokens (prompt + answer) [default: model's, at most 4096]
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<usize>,
    /// Largest request body accepted, in bytes (larger ones get 413)
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
    pub max_body: usize,
    /// The model's name in /v1/models and in requests' "model" [default: the file name
    /// without .gguf]
    #[arg(long)]
    pub alias: Option<String>,
}

/// What the handlers share.
struct Shared {
    model_id: String,
    api_key: Option<String>,
    tokenizer: Arc<Tokenizer>,
    n_ctx: usize,
    jobs: std::sync::mpsc::Sender<Job>,
    /// Requests admitted and not yet finished (running or queued).
    in_flight: Arc<AtomicUsize>,
    /// At most this many in flight.
    limit: usize,
    next_id: AtomicU64,
}

/// One request for the worker.
struct Job {
    prompt: Vec<u32>,
    sampler: SamplerConfig,
    max_tokens: usize,
    stops: Vec<String>,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
    /// Frees the request's place in the queue when the job is done or dropped.
    _admitted: Admitted,
}

/// What the worker reports about a job.
enum Event {
    Piece(String),
    Done { finish: &'static str, prompt_tokens: usize, completion_tokens: usize },
    Failed(String),
}

/// A place among the requests in flight, given back on drop.
struct Admitted(Arc<AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sets the cancel flag when dropped: held by a streaming body or a waiting handler, so a
/// client that goes away (hyper drops both) stops its sequence.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

pub fn serve(a: ServeArgs) -> Result<()> {
    if a.parallel == 0 || a.parallel > 256 {
        return Err(format!("--parallel {}: use 1 to 256 slots", a.parallel).into());
    }
    if a.max_body < 64 {
        return Err(format!("--max-body {}: use at least 64 bytes", a.max_body).into());
    }
    if a.queue > 1 << 20 {
        return Err(format!("--queue {}: use at most {}", a.queue, 1 << 20).into());
    }
    let path = a.model.resolve_model()?;
    let pool = a.model.pool()?;
    let (model, tokenizer) = pool.install(|| super::load(&path))?;
    let n_ctx = a.ctx_size.unwrap_or_else(|| model.hp.n_ctx_train.min(4096));
    super::check_ctx("--ctx-size", n_ctx, &model.hp)?;
    let mut opts = super::backend::session_options(&a.model)?;
    opts.n_seqs = a.parallel;
    let tokenizer = Arc::new(tokenizer);
    let model_id = a.alias.clone().unwrap_or_else(|| {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        name.strip_suffix(".gguf").unwrap_or(&name).to_string()
    });
    let (jobs, rx) = std::sync::mpsc::channel::<Job>();
    let worker_tok = tokenizer.clone();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let worker_in_flight = in_flight.clone();
    let parallel = a.parallel;
    let (opened_tx, opened_rx) = std::sync::mpsc::sync_channel::<std::result::Result<(), String>>(1);
    // The sessions live on the worker thread (they are not Send), opened there before the port
    // is bound, so that a model that cannot run fails the command instead of every request.
    std::thread::Builder::new()
        .name("ember-worker".into())
        .spawn(move || {
            pool.install(|| {
                // One session holding every slot's sequence where the backend batches (CPU, dense
                // GPU); else one session per slot, stepped one after another.
                let mut engines = Vec::new();
                let mut seqs = 0;
                let opened = loop {
                    if seqs >= parallel {
                        break Ok(());
                    }
                    match crate::engine::builder::open(&opts, model.clone(), n_ctx, &super::backend::log) {
                        Ok(o) => {
                            seqs += o.session.n_seqs();
                            engines.push(o.session);
                        }
                        Err(e) => break Err(e.to_string()),
                    }
                };
                if engines.len() > 1 {
                    super::backend::log(&format!("this backend decodes one sequence at a time: {} sessions, stepped in turn", engines.len()));
                }
                match opened {
                    Ok(()) => {
                        let _ = opened_tx.send(Ok(()));
                        worker(Batcher::new(engines, parallel), &worker_tok, rx, &worker_in_flight)
                    }
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                    }
                }
            })
        })
        .map_err(|e| format!("cannot start the worker thread: {e}"))?;
    opened_rx.recv().map_err(|_| "the model worker stopped while opening the sessions".to_string())??;
    let shared = Arc::new(Shared {
        model_id,
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
        tokenizer,
        n_ctx,
        jobs,
        in_flight,
        limit: a.parallel + a.queue,
        next_id: AtomicU64::new(1),
    });
    let app = Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(a.max_body))
        .with_state(shared.clone());
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().map_err(|e| format!("cannot start the HTTP runtime: {e}"))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port)).await.map_err(|e| format!("cannot listen on {}:{}: {e} (choose another --port, or --port 0 for any free one)", a.host, a.port))?;
        let addr = listener.local_addr()?;
        eprintln!("ember: serving {} on http://{addr}/v1 ({} slots of {} tokens{})", shared.model_id, a.parallel, n_ctx, if shared.api_key.is_some() { ", API key required" } else { "" });
        axum::serve(listener, app).await.map_err(|e| format!("server: {e}"))?;
        Ok(())
    })
}

/// The worker: starts waiting jobs in free slots (the slot holding the longest prefix of the
/// prompt, else the least recently used), then steps every active sequence one token, the
/// sequences of one session decoded as one batch; a finished or cancelled job leaves its slot
/// free for the next. Jobs whose client went away while they waited are dropped unrun. A
/// request running alone decodes in the backend's own loop (`Batcher::step`) until another
/// is admitted (`in_flight` counts the admitted requests) and a slot is free for it.
fn worker(mut batcher: Batcher, tokenizer: &Tokenizer, rx: std::sync::mpsc::Receiver<Job>, in_flight: &AtomicUsize) {
    let mut waiting: std::collections::VecDeque<Job> = std::collections::VecDeque::new();
    let mut running: Vec<Option<Job>> = (0..batcher.n_slots()).map(|_| None).collect();
    let n_ctx = batcher.n_ctx();
    loop {
        if batcher.n_active() == 0 && waiting.is_empty() {
            match rx.recv() {
                Ok(job) => waiting.push_back(job),
                Err(_) => return,
            }
        }
        while let Ok(job) = rx.try_recv() {
            waiting.push_back(job);
        }
        waiting.retain(|j| !j.cancel.load(Ordering::SeqCst));
        // New requests join before the next step (each prefilled here, in batches).
        while let Some(slot) = waiting.front().and_then(|j| batcher.free_slot(&j.prompt)) {
            let job = waiting.pop_front().expect("a waiting job");
            let req = batch::Request {
                prompt: job.prompt.clone(),
                sampler: Sampler::new(job.sampler.clone()),
                n_predict: job.max_tokens.min(n_ctx.saturating_sub(job.prompt.len())),
                stops: job.stops.clone(),
            };
            let (events, cancel) = (job.events.clone(), job.cancel.clone());
            let ended = batcher.start(slot, req, tokenizer, &mut |p| send_piece(&events, &cancel, p));
            match ended {
                Some(end) => report(slot, job, end),
                None => running[slot] = Some(job),
            }
        }
        if batcher.n_active() == 0 {
            continue;
        }
        let cancelled = |slot: usize| running[slot].as_ref().is_none_or(|j| j.cancel.load(Ordering::SeqCst));
        let several = batcher.n_slots() > 1;
        let others_waiting = || several && in_flight.load(Ordering::SeqCst) > 1;
        let ended = batcher.step(tokenizer, &cancelled, &others_waiting, &mut |slot, p| {
            if let Some(j) = &running[slot] {
                send_piece(&j.events, &j.cancel, p);
            }
        });
        for (slot, end) in ended {
            if let Some(job) = running[slot].take() {
                report(slot, job, end);
            }
        }
    }
}

/// Sends a piece of text to a job's client; a client gone cancels the job.
fn send_piece(events: &tokio::sync::mpsc::UnboundedSender<Event>, cancel: &AtomicBool, piece: &str) {
    if events.send(Event::Piece(piece.to_string())).is_err() {
        cancel.store(true, Ordering::SeqCst);
    }
}

/// Logs how a job ended and tells its client, after giving its place among the requests in
/// flight back: a client holding its whole answer may send the next request at once, and must
/// not find its own finished request still counted against the limit.
fn report(slot: usize, job: Job, end: std::result::Result<Finished, crate::engine::ForwardError>) {
    let event = match end {
        Ok(f) => {
            eprintln!(
                "ember: slot {slot}: prompt {} tokens ({} reused from the cache, {} prefilled at {:.1} t/s) | generated {} at {:.1} t/s | {}",
                f.n_prompt,
                f.n_reused,
                f.n_prompt - f.n_reused,
                f.prompt_tps(),
                f.tokens.len(),
                f.gen_tps(),
                match &f.stop {
                    StopReason::Cancelled => "cancelled: the client went away",
                    StopReason::EndOfGeneration => "end of generation",
                    StopReason::StopString(_) => "stop string",
                    StopReason::Length | StopReason::ContextFull => "length",
                }
            );
            Event::Done {
                finish: match f.stop {
                    StopReason::EndOfGeneration | StopReason::StopString(_) | StopReason::Cancelled => "stop",
                    StopReason::Length | StopReason::ContextFull => "length",
                },
                prompt_tokens: f.n_prompt,
                completion_tokens: f.tokens.len(),
            }
        }
        Err(e) => Event::Failed(e.to_string()),
    };
    let Job { events, _admitted, .. } = job;
    drop(_admitted);
    let _ = events.send(event);
}

/// An OpenAI-style error response.
fn error(status: StatusCode, kind: &str, code: Option<&str>, param: Option<&str>, message: impl Into<String>) -> Response {
    let body = json!({ "error": { "message": message.into(), "type": kind, "param": param, "code": code } });
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn bad_request(param: Option<&str>, message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", None, param, message)
}

fn json_response(v: Value) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

/// The API key check: None when the request may go on.
fn unauthorized(s: &Shared, headers: &HeaderMap) -> Option<Response> {
    let key = s.api_key.as_ref()?;
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
    match given {
        Some(g) if g == key => None,
        Some(_) => Some(error(StatusCode::UNAUTHORIZED, "invalid_request_error", Some("invalid_api_key"), None, "Incorrect API key provided.")),
        None => Some(error(StatusCode::UNAUTHORIZED, "invalid_request_error", Some("invalid_api_key"), None, "Missing API key: send the header `Authorization: Bearer KEY` with the key given to `ember serve --api-key`.")),
    }
}

async fn health() -> Response {
    json_response(json!({ "status": "ok" }))
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "invalid_request_error", Some("unknown_url"), None, "Unknown endpoint: ember serves POST /v1/chat/completions, POST /v1/completions, GET /v1/models and GET /health.")
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn models(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&s, &headers) {
        return r;
    }
    json_response(json!({ "object": "list", "data": [{ "id": s.model_id, "object": "model", "created": now(), "owned_by": "ember" }] }))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

async fn chat_completions(State(s): State<Arc<Shared>>, headers: HeaderMap, body: std::result::Result<Bytes, BytesRejection>) -> Response {
    complete(s, headers, body, Kind::Chat).await
}

async fn completions(State(s): State<Arc<Shared>>, headers: HeaderMap, body: std::result::Result<Bytes, BytesRejection>) -> Response {
    complete(s, headers, body, Kind::Text).await
}

/// A request's fields, checked.
struct Request {
    prompt: Vec<u32>,
    sampler: SamplerConfig,
    max_tokens: usize,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
}

async fn complete(s: Arc<Shared>, headers: HeaderMap, body: std::result::Result<Bytes, BytesRejection>, kind: Kind) -> Response {
    if let Some(r) = unauthorized(&s, &headers) {
        return r;
    }
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", Some("request_too_large"), None, format!("The request body is over the server's limit ({e}); send a shorter one, or start `ember serve` with a larger --max-body."))
        }
        Err(e) => return error(e.status(), "invalid_request_error", None, None, e.body_text()),
    };
    let req = match parse_request(&s, &body, kind) {
        Ok(r) => r,
        Err(r) => return r,
    };
    // Admission: a place among the requests in flight, else 503 at once.
    let admitted = match s.in_flight.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < s.limit).then_some(n + 1)) {
        Ok(_) => Admitted(s.in_flight.clone()),
        Err(_) => {
            return error(StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("server_busy"), None, format!("The server is busy: {} requests are running or waiting, its limit (--parallel + --queue). Retry later.", s.limit))
        }
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let job = Job { prompt: req.prompt.clone(), sampler: req.sampler.clone(), max_tokens: req.max_tokens, stops: req.stops.clone(), events: tx, cancel: cancel.clone(), _admitted: admitted };
    if s.jobs.send(job).is_err() {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, None, "The model worker has stopped; restart `ember serve`.");
    }
    let guard = CancelOnDrop(cancel);
    let id = format!("{}-{}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, s.next_id.fetch_add(1, Ordering::Relaxed));
    let created = now();
    let model = s.model_id.clone();
    if !req.stream {
        let _guard = guard;
        let mut text = String::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Piece(p) => text.push_str(&p),
                Event::Failed(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, None, e),
                Event::Done { finish, prompt_tokens, completion_tokens } => {
                    let choice = match kind {
                        Kind::Chat => json!({ "index": 0, "message": { "role": "assistant", "content": text }, "logprobs": null, "finish_reason": finish }),
                        Kind::Text => json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }),
                    };
                    return json_response(json!({
                        "id": id, "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
                        "created": created, "model": model, "choices": [choice],
                        "usage": usage(prompt_tokens, completion_tokens),
                    }));
                }
            }
        }
        return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, None, "The model worker stopped mid-request; restart `ember serve`.");
    }
    // Server-sent events: one `data: {...}` chunk per piece of text, `data: [DONE]` last.
    let object = if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
    let chunk = move |delta: Value, finish: Option<&str>| -> Value {
        let choice = match kind {
            Kind::Chat => json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }),
            Kind::Text => json!({ "index": 0, "text": delta.get("content").and_then(Value::as_str).unwrap_or(""), "logprobs": null, "finish_reason": finish }),
        };
        json!({ "id": id, "object": object, "created": created, "model": model, "choices": [choice] })
    };
    let include_usage = req.include_usage;
    // The state: the events, the guard that cancels on drop, the first chunk's role, done.
    let first = (kind == Kind::Chat).then(|| chunk(json!({ "role": "assistant", "content": "" }), None));
    let state = (rx, guard, first, false);
    let stream = futures_util::stream::unfold(state, move |(mut rx, guard, first, done)| {
        let chunk = chunk.clone();
        async move {
            if done {
                return None;
            }
            if let Some(f) = first {
                return Some((Ok::<_, std::convert::Infallible>(sse(&f)), (rx, guard, None, false)));
            }
            let out = match rx.recv().await {
                Some(Event::Piece(p)) => sse(&chunk(json!({ "content": p }), None)),
                Some(Event::Done { finish, prompt_tokens, completion_tokens }) => {
                    let mut last = chunk(json!({}), Some(finish));
                    let mut text = String::from_utf8(sse(&last).to_vec()).unwrap_or_default();
                    if include_usage {
                        last["choices"] = json!([]);
                        last["usage"] = usage(prompt_tokens, completion_tokens);
                        text.push_str(&String::from_utf8(sse(&last).to_vec()).unwrap_or_default());
                    }
                    text.push_str("data: [DONE]\n\n");
                    return Some((Ok(Bytes::from(text)), (rx, guard, None, true)));
                }
                Some(Event::Failed(e)) => {
                    let mut text = String::from_utf8(sse(&json!({ "error": { "message": e, "type": "server_error", "param": null, "code": null } })).to_vec()).unwrap_or_default();
                    text.push_str("data: [DONE]\n\n");
                    return Some((Ok(Bytes::from(text)), (rx, guard, None, true)));
                }
                None => return None,
            };
            Some((Ok(out), (rx, guard, None, false)))
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, None, "could not build the response"))
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion })
}

/// Checks the body's fields and builds the prompt; an error response names the field at fault.
#[allow(clippy::result_large_err)]
fn parse_request(s: &Shared, body: &[u8], kind: Kind) -> std::result::Result<Request, Response> {
    let v: Value = serde_json::from_slice(body).map_err(|e| bad_request(None, format!("The body is not valid JSON: {e}")))?;
    let Value::Object(o) = v else {
        return Err(bad_request(None, "The body must be a JSON object."));
    };
    if let Some(m) = o.get("model") {
        let m = m.as_str().ok_or_else(|| bad_request(Some("model"), "\"model\" must be a string."))?;
        if !m.is_empty() && m != s.model_id {
            return Err(error(StatusCode::NOT_FOUND, "invalid_request_error", Some("model_not_found"), Some("model"), format!("The model {m:?} does not exist here; this server has {:?} (GET /v1/models).", s.model_id)));
        }
    }
    let text = match kind {
        Kind::Chat => {
            let messages = o.get("messages").ok_or_else(|| bad_request(Some("messages"), "\"messages\" is required: an array of {\"role\", \"content\"} objects."))?;
            let list = messages.as_array().filter(|l| !l.is_empty()).ok_or_else(|| bad_request(Some("messages"), "\"messages\" must be a non-empty array of {\"role\", \"content\"} objects."))?;
            let mut msgs = Vec::with_capacity(list.len());
            for (i, m) in list.iter().enumerate() {
                let role = m.get("role").and_then(Value::as_str).ok_or_else(|| bad_request(Some("messages"), format!("messages[{i}].role must be a string (system, user or assistant).")))?;
                let content = match m.get("content") {
                    Some(Value::String(c)) => c.clone(),
                    Some(Value::Null) | None if role == "assistant" => String::new(),
                    // Content parts: the text ones, joined (ember reads no images).
                    Some(Value::Array(parts)) => {
                        let mut c = String::new();
                        for p in parts {
                            match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                                (Some("text"), Some(t)) => c.push_str(t),
                                _ => return Err(bad_request(Some("messages"), format!("messages[{i}].content: only parts of type \"text\" with a string \"text\" are supported."))),
                            }
                        }
                        c
                    }
                    _ => return Err(bad_request(Some("messages"), format!("messages[{i}].content must be a string or an array of text parts."))),
                };
                msgs.push(ChatMessage { role: role.to_string(), content });
            }
            s.tokenizer.apply_chat_template(&msgs, true).map_err(|e| bad_request(Some("messages"), format!("The model's chat template failed on these messages: {e}")))?
        }
        Kind::Text => match o.get("prompt") {
            Some(Value::String(p)) => p.clone(),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or_default().to_string(),
            Some(_) => return Err(bad_request(Some("prompt"), "\"prompt\" must be a string (or an array of one string).")),
            None => return Err(bad_request(Some("prompt"), "\"prompt\" is required.")),
        },
    };
    let prompt = s.tokenizer.encode(&text, true, true).map_err(|e| bad_request(None, format!("The prompt could not be tokenized: {e}")))?;
    if prompt.is_empty() {
        return Err(bad_request(None, "The prompt is empty after tokenization."));
    }
    if prompt.len() >= s.n_ctx {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("context_length_exceeded"),
            Some(if kind == Kind::Chat { "messages" } else { "prompt" }),
            format!("The prompt has {} tokens; this server's context is {} tokens per slot (prompt and answer), so at most {} fit. Shorten the prompt, or start `ember serve` with a larger --ctx-size.", prompt.len(), s.n_ctx, s.n_ctx - 1),
        ));
    }
    let num = |k: &str, lo: f64, hi: f64, default: f64| -> std::result::Result<f64, Response> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Number(n)) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                if x.is_finite() && (lo..=hi).contains(&x) {
                    Ok(x)
                } else {
                    Err(bad_request(Some(k), format!("\"{k}\" must be between {lo} and {hi}; got {n}.")))
                }
            }
            Some(_) => Err(bad_request(Some(k), format!("\"{k}\" must be a number."))),
        }
    };
    let int = |k: &str| -> std::result::Result<Option<i64>, Response> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n.as_i64().or_else(|| n.as_u64().map(|u| u as i64)).map(Some).ok_or_else(|| bad_request(Some(k), format!("\"{k}\" must be an integer; got {n}."))),
            Some(_) => Err(bad_request(Some(k), format!("\"{k}\" must be an integer."))),
        }
    };
    let temperature = num("temperature", 0.0, 2.0, 0.8)?;
    let top_p = num("top_p", 0.0, 1.0, 0.95)?;
    if top_p == 0.0 {
        return Err(bad_request(Some("top_p"), "\"top_p\" must be above 0 (1 keeps every token)."));
    }
    let min_p = num("min_p", 0.0, 1.0, 0.05)?;
    let presence = num("presence_penalty", -2.0, 2.0, 0.0)?;
    let frequency = num("frequency_penalty", -2.0, 2.0, 0.0)?;
    let top_k = match int("top_k")? {
        Some(k) if k < 0 => return Err(bad_request(Some("top_k"), format!("\"top_k\" must be 0 (off) or more; got {k}."))),
        k => k.unwrap_or(40) as usize,
    };
    let max_key = if o.contains_key("max_completion_tokens") { "max_completion_tokens" } else { "max_tokens" };
    let max_tokens = match int(max_key)? {
        Some(n) if n < 1 => return Err(bad_request(Some(max_key), format!("\"{max_key}\" must be at least 1; got {n}."))),
        Some(n) => n as usize,
        None => usize::MAX,
    };
    let seed = match int("seed")? {
        Some(x) => x as u64,
        // Without a seed each request draws differently, as OpenAI's API does.
        None => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
    };
    let stops = match o.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(x)) => vec![x.clone()],
        Some(Value::Array(a)) if a.len() <= 16 && a.iter().all(Value::is_string) => a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
        Some(_) => return Err(bad_request(Some("stop"), "\"stop\" must be a string or an array of at most 16 strings.")),
    };
    if stops.iter().any(String::is_empty) {
        return Err(bad_request(Some("stop"), "\"stop\" strings must not be empty."));
    }
    let stream = match o.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad_request(Some("stream"), "\"stream\" must be true or false.")),
    };
    if let Some(n) = int("n")? {
        if n != 1 {
            return Err(bad_request(Some("n"), format!("\"n\" must be 1: ember returns one choice per request; got {n}.")));
        }
    }
    let include_usage = match o.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(so)) => so.get("include_usage").and_then(Value::as_bool).unwrap_or(false),
        Some(_) => return Err(bad_request(Some("stream_options"), "\"stream_options\" must be an object.")),
    };
    let _: &Map<String, Value> = &o;
    Ok(Request {
        prompt,
        sampler: SamplerConfig {
            temperature: temperature as f32,
            top_k,
            top_p: top_p as f32,
            min_p: min_p as f32,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: presence as f32,
            frequency_penalty: frequency as f32,
            seed,
        },
        max_tokens,
        stops,
        stream,
        include_usage,
    })
}
