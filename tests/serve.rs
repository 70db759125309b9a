//! `ember serve` over HTTP on loopback, on the CPU with SmolLM2: the OpenAI endpoints, their
//! error objects, streaming, cancellation by a client that goes away, and KV-cache reuse.
//! The client is a few lines over `TcpStream` (HTTP/1.1, `Connection: close`), so the tests
//! see exactly what went over the wire.

mod common;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running server, killed on drop; its stderr collected.
struct Server {
    child: Child,
    port: u16,
    log: Arc<Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(model: &std::path::Path, extra: &[&str]) -> Server {
        Self::start_on(model, "cpu", extra)
    }

    fn start_on(model: &std::path::Path, backend: &str, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
            .args(["serve", "-m"])
            .arg(model)
            .args(["--backend", backend, "--port", "0", "-t", "2", "-c", "512"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if let Some(rest) = line.split("http://127.0.0.1:").nth(1) {
                    let _ = tx.send(rest.split('/').next().unwrap().parse::<u16>().unwrap());
                }
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let port = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("the server did not start: {}", log.lock().unwrap()));
        Server { child, port, log }
    }

    /// Peak resident memory of the server process (VmHWM), in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap()
    }

    /// Waits until the log holds `n` lines containing `what`.
    fn wait_log(&self, what: &str, n: usize, secs: u64) {
        let start = Instant::now();
        while self.log().matches(what).count() < n {
            assert!(start.elapsed() < Duration::from_secs(secs), "waited {secs} s for {n} lines of {what:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Opens a streaming request and reads until `chunks` events have arrived (0: the status
    /// line only); returns the connection, open.
    fn open_stream(&self, body: &Value, chunks: usize) -> (TcpStream, String) {
        let body = body.to_string();
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got);
            if text.contains("\r\n\r\n") && text.matches("data: ").count() >= chunks {
                return (s, text.into_owned());
            }
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends a request; returns the status and the body (chunked encoding undone).
    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n", body.len());
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).unwrap();
        // A body the server refuses early may not be read whole: ignore a reset on writing.
        let _ = s.write_all(body);
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        parse_response(&raw)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value, String) {
        let (status, text) = self.request("POST", path, &[], body.to_string().as_bytes());
        let v = serde_json::from_str(&text).unwrap_or(Value::Null);
        (status, v, text)
    }
}

fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    if !chunked {
        return (status, body.to_string());
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    (status, out)
}

/// The `data:` payloads of a server-sent event stream.
fn events(body: &str) -> Vec<String> {
    body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_string).collect()
}

fn user(text: &str) -> Value {
    json!([{ "role": "user", "content": text }])
}

/// Every endpoint, streaming and not, and every error case, against one server; it keeps
/// serving after each bad request.
#[test]
fn endpoints_answer_and_bad_requests_get_openai_errors() {
    let Some(model) = common::default_model() else { return };
    let server = Server::start(&model, &["--max-body", "4096"]);
    let (status, body) = server.request("GET", "/health", &[], b"");
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    let (status, body) = server.request("GET", "/v1/models", &[], b"");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((status, v["data"][0]["id"].as_str()), (200, Some("SmolLM2-135M-Instruct.Q4_1")), "{body}");

    // A raw completion: llama.cpp's greedy continuation, as `ember run` prints it.
    let (status, v, text) = server.post("/v1/completions", &json!({ "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0 }));
    assert_eq!(status, 200, "{text}");
    assert_eq!(v["choices"][0]["text"], " Paris.\n\nThe United States has");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"], json!({ "prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13 }));

    // Chat, not streamed, then streamed: the same text, the stream ending with [DONE].
    let ask = json!({ "messages": user("What is 2+2?"), "temperature": 0, "max_tokens": 40, "model": "SmolLM2-135M-Instruct.Q4_1" });
    let (status, v, text) = server.post("/v1/chat/completions", &ask);
    assert_eq!(status, 200, "{text}");
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(answer.contains('4'), "{answer:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["object"], "chat.completion");
    let mut streamed = ask.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({ "include_usage": true });
    let (status, body) = server.request("POST", "/v1/chat/completions", &[], streamed.to_string().as_bytes());
    assert_eq!(status, 200, "{body}");
    let ev = events(&body);
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = ev[..ev.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, answer);
    assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"] == "stop"), "{body}");
    assert_eq!(chunks.last().unwrap()["usage"], v["usage"]);

    // Same seed, same text when sampling; the stop string ends it and is not included.
    let sampled = json!({ "prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0, "seed": 5, "presence_penalty": 0.5, "frequency_penalty": 0.3 });
    let a = server.post("/v1/completions", &sampled).1;
    let b = server.post("/v1/completions", &sampled).1;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    let (_, v, text) = server.post("/v1/completions", &json!({ "prompt": "The capital of France is", "max_tokens": 40, "temperature": 0, "stop": ["United"] }));
    assert_eq!((v["choices"][0]["text"].as_str(), v["choices"][0]["finish_reason"].as_str()), (Some(" Paris.\n\nThe "), Some("stop")), "{text}");

    // Bad requests: status, error type and the field at fault.
    let long = "word ".repeat(600);
    let cases: Vec<(&str, Vec<u8>, u16, Option<&str>, Option<&str>)> = vec![
        ("/v1/chat/completions", b"{\"messages\": [".to_vec(), 400, None, None),
        ("/v1/chat/completions", b"[1, 2]".to_vec(), 400, None, None),
        ("/v1/chat/completions", json!({ "temperature": 0 }).to_string().into_bytes(), 400, Some("messages"), None),
        ("/v1/chat/completions", json!({ "messages": "hi" }).to_string().into_bytes(), 400, Some("messages"), None),
        ("/v1/chat/completions", json!({ "messages": user("hi"), "temperature": "hot" }).to_string().into_bytes(), 400, Some("temperature"), None),
        ("/v1/chat/completions", json!({ "messages": user("hi"), "max_tokens": -5 }).to_string().into_bytes(), 400, Some("max_tokens"), None),
        ("/v1/chat/completions", json!({ "messages": user("hi"), "max_tokens": 1.5 }).to_string().into_bytes(), 400, Some("max_tokens"), None),
        ("/v1/chat/completions", json!({ "messages": user("hi"), "stop": 3 }).to_string().into_bytes(), 400, Some("stop"), None),
        ("/v1/chat/completions", json!({ "messages": user("hi"), "model": "gpt-4o" }).to_string().into_bytes(), 404, Some("model"), Some("model_not_found")),
        ("/v1/completions", json!({ "prompt": long }).to_string().into_bytes(), 400, Some("prompt"), Some("context_length_exceeded")),
        ("/v1/completions", json!({ "prompt": "x".repeat(5000) }).to_string().into_bytes(), 413, None, Some("request_too_large")),
        ("/v1/nothing", b"{}".to_vec(), 404, None, Some("unknown_url")),
    ];
    for (path, body, want, param, code) in cases {
        let (status, text) = server.request("POST", path, &[], &body);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path} {}: not JSON: {text}", String::from_utf8_lossy(&body)));
        let what = format!("{path} {}: {text}", String::from_utf8_lossy(&body[..body.len().min(80)]));
        assert_eq!(status, want, "{what}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}");
        assert_eq!(v["error"]["param"].as_str(), param, "{what}");
        assert_eq!(v["error"]["code"].as_str(), code, "{what}");
    }
    // Still serving.
    let (status, _, text) = server.post("/v1/completions", &json!({ "prompt": "Hello", "max_tokens": 2 }));
    assert_eq!(status, 200, "{text}");
}

/// With --api-key every endpoint but /health needs `Authorization: Bearer KEY`: 401 without
/// it or with another key.
#[test]
fn api_key_is_required_when_set() {
    let Some(model) = common::default_model() else { return };
    let server = Server::start(&model, &["--api-key", "s3cret"]);
    assert_eq!(server.request("GET", "/health", &[], b"").0, 200);
    for auth in [None, Some("Bearer wrong"), Some("s3cret")] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", *a)).collect();
        let (status, text) = server.request("GET", "/v1/models", &headers, b"");
        assert_eq!(status, 401, "{auth:?}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
        let (status, _) = server.request("POST", "/v1/completions", &headers, json!({ "prompt": "Hi" }).to_string().as_bytes());
        assert_eq!(status, 401);
    }
    let (status, text) = server.request("POST", "/v1/completions", &[("Authorization", "Bearer s3cret")], json!({ "prompt": "Hi", "max_tokens": 2 }).to_string().as_bytes());
    assert_eq!(status, 200, "{text}");
}

/// A chat's next turn, whose prompt extends the slot's cached tokens, prefills only its new
/// tokens.
#[test]
fn next_turn_reuses_the_cache() {
    let Some(model) = common::default_model() else { return };
    let server = Server::start(&model, &[]);
    let first = json!({ "messages": user("Name a color."), "temperature": 0, "max_tokens": 24 });
    let (status, v, text) = server.post("/v1/chat/completions", &first);
    assert_eq!(status, 200, "{text}");
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let p1 = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let second = json!({ "messages": [
        { "role": "user", "content": "Name a color." },
        { "role": "assistant", "content": answer },
        { "role": "user", "content": "And another one?" },
    ], "temperature": 0, "max_tokens": 8 });
    let (status, v, text) = server.post("/v1/chat/completions", &second);
    assert_eq!(status, 200, "{text}");
    let p2 = v["usage"]["prompt_tokens"].as_u64().unwrap();
    // The worker's line may reach the log reader just after the response.
    let start = Instant::now();
    while server.log().lines().filter(|l| l.contains("reused from the cache")).count() < 2 {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = server.log();
    let line = log.lines().filter(|l| l.contains("reused from the cache")).nth(1).unwrap();
    // Reused: at least the first turn's prompt; prefilled: fewer than the whole second prompt.
    let num = |before: &str| -> u64 { line.split(before).next().unwrap().rsplit(' ').find(|w| !w.is_empty()).unwrap().trim_start_matches('(').parse().unwrap() };
    let (reused, prefilled) = (num(" reused from the cache"), num(" prefilled at"));
    assert!(reused >= p1 && reused + prefilled == p2, "{line} (first prompt {p1}, second {p2})");
}

/// The official `openai` Python client streams a chat completion; its text equals
/// `ember run --chat --temp 0`'s for the same messages.
fn openai_client_equals_ember_run(backend: &str) {
    let Some(model) = common::default_model() else { return };
    if backend == "gpu" && common::gpu().is_none() {
        return;
    }
    let Some(python) = common::python_with_openai() else { return };
    let (system, question, n) = ("You are a concise assistant.", "Name three colors of the rainbow.", "40");
    let run = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["run", "-m"])
        .arg(&model)
        .args(["--backend", backend, "-t", "2", "-c", "512", "--chat", "--system", system, "-p", question, "--temp", "0", "-n", n])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let want = String::from_utf8(run.stdout).unwrap();
    let want = want.strip_suffix('\n').unwrap_or(&want);
    assert!(want.len() > 10, "{want:?}");

    let server = Server::start_on(&model, backend, &[]);
    let script = r#"
import json, sys, openai
port, messages, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
parts, finish = [], None
for chunk in client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=messages, temperature=0, max_tokens=n, stream=True):
    for c in chunk.choices:
        parts.append(c.delta.content or "")
        finish = c.finish_reason or finish
print(json.dumps({"text": "".join(parts), "finish": finish}))
"#;
    let messages = json!([{ "role": "system", "content": system }, { "role": "user", "content": question }]);
    let out = Command::new(&python).args(["-c", script, &server.port.to_string(), &messages.to_string(), n]).output().unwrap();
    assert!(out.status.success(), "the openai client failed: {}\n{}", String::from_utf8_lossy(&out.stderr), server.log());
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["text"].as_str(), Some(want), "{}", server.log());
    assert!(got["finish"] == "stop" || got["finish"] == "length", "{got}");
}

#[test]
fn openai_client_streams_what_ember_run_says_cpu() {
    openai_client_equals_ember_run("cpu");
}

#[test]
fn openai_client_streams_what_ember_run_says_gpu() {
    openai_client_equals_ember_run("gpu");
}

const LOAD_PROMPTS: [&str; 8] = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time", "The best way to learn", "def add(a, b):", "Water is made of", "My favourite food is", "In 1969, the first"];

/// The request of load-test client i: raw completions, greedy, answers of different lengths.
fn load_request(i: usize, stream: bool) -> Value {
    json!({ "prompt": LOAD_PROMPTS[i % 8], "max_tokens": 3 + i % 8, "temperature": 0, "stream": stream })
}

/// The text of a completions event stream, and its finish reason.
fn stream_text(body: &str) -> (String, String) {
    let ev = events(body);
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = ev[..ev.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let text = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    let finish = chunks.iter().filter_map(|c| c["choices"][0]["finish_reason"].as_str()).last().unwrap_or_default().to_string();
    (text, finish)
}

/// Resident memory the load tests' server may reach: SmolLM2 Q4_1's mapped file (~100 MiB)
/// and its repacked copy (~100 MiB), 4 KV caches of 512 tokens (24 MiB), buffers and threads.
const RSS_LIMIT_MIB: u64 = 450;

/// 32 concurrent streaming requests on 4 slots: every one completes with its own sequential
/// greedy answer (nothing lost or mixed up), and resident memory stays under RSS_LIMIT_MIB.
#[test]
fn load_32_streams_on_4_slots_each_get_their_own_answer() {
    let Some(model) = common::default_model() else { return };
    let server = Arc::new(Server::start(&model, &["--parallel", "4", "--queue", "28"]));
    // The sequential answers: one request at a time.
    let want: Vec<String> = (0..8).map(|i| {
        let (status, v, text) = server.post("/v1/completions", &load_request(i, false));
        assert_eq!(status, 200, "{text}");
        v["choices"][0]["text"].as_str().unwrap().to_string()
    }).collect();
    let clients: Vec<_> = (0..32).map(|i| {
        let server = server.clone();
        std::thread::spawn(move || {
            let (status, body) = server.request("POST", "/v1/completions", &[], load_request(i, true).to_string().as_bytes());
            assert_eq!(status, 200, "client {i}: {body}");
            stream_text(&body)
        })
    }).collect();
    for (i, c) in clients.into_iter().enumerate() {
        let (text, finish) = c.join().unwrap();
        assert_eq!(text, want[i % 8], "client {i}");
        assert!(finish == "length" || finish == "stop", "client {i}: {finish:?}");
    }
    // The requests ran together: some slot beyond the first was used.
    assert!(server.log().contains("slot 3:"), "{}", server.log());
    let rss = server.peak_rss_kib() / 1024;
    eprintln!("peak resident memory of the server: {rss} MiB");
    assert!(rss < RSS_LIMIT_MIB, "peak RSS {rss} MiB, over {RSS_LIMIT_MIB} MiB");
}

/// 32 concurrent streams on 4 slots where half the clients read two chunks of a long answer
/// and close the connection: each of those is cancelled (its slot freed), the other half get
/// their sequential answers, and a later request is served.
#[test]
fn half_the_clients_disconnect_and_their_slots_are_freed() {
    let Some(model) = common::default_model() else { return };
    let server = Arc::new(Server::start(&model, &["--parallel", "4", "--queue", "28"]));
    let want: Vec<String> = (0..8).map(|i| server.post("/v1/completions", &load_request(i, false)).1["choices"][0]["text"].as_str().unwrap().to_string()).collect();
    let clients: Vec<_> = (0..32).map(|i| {
        let server = server.clone();
        std::thread::spawn(move || {
            if i % 2 == 0 {
                // A long answer (up to the context) that this client leaves after two chunks.
                let (s, head) = server.open_stream(&json!({ "prompt": "1, 2, 3, 4,", "max_tokens": 2000, "temperature": 0, "stream": true }), 2);
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                let _ = s.shutdown(std::net::Shutdown::Both);
                None
            } else {
                let (status, body) = server.request("POST", "/v1/completions", &[], load_request(i, true).to_string().as_bytes());
                assert_eq!(status, 200, "client {i}: {body}");
                Some(stream_text(&body).0)
            }
        })
    }).collect();
    for (i, c) in clients.into_iter().enumerate() {
        if let Some(text) = c.join().unwrap() {
            assert_eq!(text, want[i % 8], "client {i}");
        }
    }
    // Each leaver's sequence is cancelled; without that the 16 long answers (500 tokens each
    // on 4 slots) would hold the slots for minutes.
    server.wait_log("cancelled: the client went away", 16, 120);
    let (status, v, text) = server.post("/v1/completions", &load_request(1, false));
    assert_eq!((status, v["choices"][0]["text"].as_str()), (200, Some(want[1].as_str())), "{text}");
}

/// Beyond --parallel + --queue requests in flight, 503 with a message that says why; once
/// the running ones go away, requests are served again.
#[test]
fn beyond_the_queue_requests_get_503() {
    let Some(model) = common::default_model() else { return };
    let server = Server::start(&model, &["--parallel", "1", "--queue", "1"]);
    let long = json!({ "prompt": "1, 2, 3, 4,", "max_tokens": 2000, "temperature": 0, "stream": true });
    let (running, head) = server.open_stream(&long, 1);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (queued, head) = server.open_stream(&long, 0);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (status, text) = server.request("POST", "/v1/completions", &[], json!({ "prompt": "Hi", "max_tokens": 2 }).to_string().as_bytes());
    assert_eq!(status, 503, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], "server_busy");
    assert!(v["error"]["message"].as_str().unwrap().contains("busy"), "{text}");
    drop((running, queued));
    // Both leave (the queued one when it starts and its first chunk finds no client).
    let start = Instant::now();
    loop {
        let (status, text) = server.request("POST", "/v1/completions", &[], json!({ "prompt": "Hi", "max_tokens": 2 }).to_string().as_bytes());
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{text}");
        assert!(start.elapsed() < Duration::from_secs(60), "still busy after the clients left:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}
