//! Malformed model files, absurd arguments and outputs that would destroy inputs (issue 13):
//! each ends quickly with a short, clear error (or runs correctly), and no command, failed or
//! killed, changes an input file.

mod common;

use ember::gguf::{GgmlType, GgufFile, GgufWriter, Value};
use ember::tokenizer::{ChatMessage, Tokenizer};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn ember() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ember"))
}

/// A fresh scratch folder for one test, under target/ (a disk, where a write and its fsync
/// take long enough for the kill tests to catch them; /tmp may be a RAM disk).
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("ember-hardening-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Memory a command may use: the issue's bound for every bad input, enforced as the data limit
/// (heap and other private writable memory; the model's read-only mapping is not counted):
/// going over aborts the command, which then fails the exit-status check. Runs that get as far
/// as generating pass a small `-c`: the KV cache of the default model's whole trained context
/// alone is about 190 MiB.
const ERROR_DATA_BYTES: u64 = 200 << 20;

/// Runs `cmd` within [`ERROR_DATA_BYTES`] of memory and insists that it ends within `limit`
/// (killing it otherwise).
fn run_within(cmd: &mut Command, limit: Duration) -> Output {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: ERROR_DATA_BYTES as libc::rlim_t, rlim_max: ERROR_DATA_BYTES as libc::rlim_t };
            if libc::setrlimit(libc::RLIMIT_DATA, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    run_within_any_memory(cmd, limit)
}

/// [`run_within`] without the memory bound, for GPU runs: the driver (lavapipe: LLVM and its
/// threads) alone takes more.
fn run_within_any_memory(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("still running after {limit:?}; stderr: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The command failed with exit status 1 and a message under 1 KB that contains every `want`.
fn assert_clear_error(out: &Output, want: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "expected exit status 1; stderr: {err}");
    let line = err.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("no error line in {err}"));
    assert!(line.len() < 1024, "error of {} bytes", line.len());
    for w in want {
        assert!(line.contains(w), "missing {w:?} in {line}");
    }
    line.to_string()
}

/// The default model rewritten: `meta` edits its metadata, `tensor` may replace a tensor's bytes.
fn rewrite(src: &Path, dst: &Path, meta: impl FnOnce(&mut GgufWriter), tensor: impl Fn(&str, &[u8]) -> Option<Vec<u8>>) {
    let f = GgufFile::open(src).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata() {
        if k != "general.alignment" {
            w.set(k, v.clone());
        }
    }
    meta(&mut w);
    for t in f.tensors() {
        let data = f.tensor_data(t);
        w.add_tensor(&t.name, &t.dims, t.ty, tensor(&t.name, data).unwrap_or_else(|| data.to_vec()));
    }
    w.write_file(dst).unwrap();
}

fn no_tensor_change(_: &str, _: &[u8]) -> Option<Vec<u8>> {
    None
}

// ---- outputs -----------------------------------------------------------------------------

#[test]
fn an_output_that_is_an_input_is_refused_and_the_input_kept() {
    let Some(model) = common::default_model() else { return };
    let dir = scratch("same-file");
    let input = dir.join("model.gguf");
    std::fs::copy(&model, &input).unwrap();
    // Another name for the same file: compared by device and inode, not by spelling.
    let link = dir.join("link.gguf");
    std::fs::hard_link(&input, &link).unwrap();
    let before = sha256(&input);
    let text = dir.join("text.txt");
    std::fs::write(&text, "The quick brown fox jumps over the lazy dog. ".repeat(20)).unwrap();

    let cases: Vec<Vec<std::ffi::OsString>> = vec![
        vec!["convert".into(), "--powerinfer".into(), "--backend".into(), "cpu".into(), "-m".into(), input.clone().into(), "-o".into(), link.clone().into()],
        vec!["profile".into(), "-m".into(), input.clone().into(), "-f".into(), text.clone().into(), "-o".into(), link.clone().into()],
        vec!["profile".into(), "-m".into(), input.clone().into(), "-f".into(), text.clone().into(), "-o".into(), text.clone().into()],
        vec!["plan".into(), "-m".into(), input.clone().into(), "--vram-budget".into(), "0.1".into(), "-o".into(), link.clone().into()],
    ];
    for args in cases {
        let out = run_within(ember().args(&args), Duration::from_secs(10));
        assert_clear_error(&out, &["refusing to write", "same file as the input"]);
    }
    assert_eq!(sha256(&input), before);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn train_predictor_refuses_to_overwrite_its_samples() {
    let dir = scratch("train-samples");
    let samples = dir.join("s.samples.gguf");
    std::fs::write(&samples, b"not read: the output check comes first").unwrap();
    let before = sha256(&samples);
    let out = run_within(ember().args(["train-predictor", "--samples"]).arg(&samples).arg("-o").arg(&samples), Duration::from_secs(5));
    assert_clear_error(&out, &["refusing to write", "same file as the input"]);
    assert_eq!(sha256(&samples), before);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Files in `dir` whose name starts with `.NAME.ember-tmp-` (write_atomic's temporary files).
fn temp_files(dir: &Path, name: &str) -> Vec<PathBuf> {
    let prefix = format!(".{name}.ember-tmp-");
    std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&prefix)).collect()
}

/// Starts `args`, kills it (SIGKILL) once its temporary output file exists and holds data,
/// and returns whether it was caught mid-write (false: it finished first).
fn kill_mid_write(args: &[std::ffi::OsString], dir: &Path, out_name: &str) -> bool {
    let mut child = ember().args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if temp_files(dir, out_name).iter().any(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0)) {
            child.kill().unwrap();
            child.wait().unwrap();
            return true;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no temporary output after 120 s");
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn convert_killed_mid_write_changes_neither_input_nor_output() {
    let Some(model) = common::default_model() else { return };
    let dir = scratch("kill-convert");
    let input = dir.join("model.gguf");
    std::fs::copy(&model, &input).unwrap();
    let output = dir.join("out.gguf");
    let before = sha256(&input);
    let mut caught = false;
    for _ in 0..5 {
        // A previous output that a killed write must leave whole.
        std::fs::write(&output, b"the previous output").unwrap();
        let args: Vec<std::ffi::OsString> = vec!["convert".into(), "--powerinfer".into(), "--backend".into(), "cpu".into(), "-t".into(), "1".into(), "-m".into(), input.clone().into(), "-o".into(), output.clone().into()];
        if kill_mid_write(&args, &dir, "out.gguf") {
            caught = true;
            break;
        }
    }
    assert!(caught, "convert finished before it could be killed, five times");
    assert_eq!(std::fs::read(&output).unwrap(), b"the previous output", "a killed convert replaced its output");
    assert_eq!(sha256(&input), before, "a killed convert changed its input");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn profile_killed_changes_neither_input_nor_output() {
    let (Some(model), Some(refs)) = (common::default_model(), common::refs_dir()) else { return };
    let dir = scratch("kill-profile");
    let input = dir.join("model.gguf");
    std::fs::copy(&model, &input).unwrap();
    let output = dir.join("out.profile.gguf");
    let before = sha256(&input);
    let mut caught = false;
    for _ in 0..10 {
        std::fs::write(&output, b"the previous profile").unwrap();
        let args: Vec<std::ffi::OsString> =
            vec!["profile".into(), "-m".into(), input.clone().into(), "-f".into(), refs.join("ppl-text.txt").into(), "-c".into(), "32".into(), "--chunks".into(), "4".into(), "-t".into(), "1".into(), "-o".into(), output.clone().into()];
        if kill_mid_write(&args, &dir, "out.profile.gguf") {
            caught = true;
            break;
        }
        // It finished: the output is a whole profile, written by rename.
        ember::sparse::profile::ActivationProfile::load(&output).expect("a complete profile");
    }
    assert!(caught, "profile finished writing before it could be killed, ten times");
    assert_eq!(std::fs::read(&output).unwrap(), b"the previous profile", "a killed profile replaced its output");
    assert_eq!(sha256(&input), before, "a killed profile changed its input");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn write_atomic_leaves_the_old_file_when_the_write_fails() {
    let dir = scratch("atomic");
    let path = dir.join("f.bin");
    std::fs::write(&path, b"old").unwrap();
    let r = ember::files::write_atomic(&path, |w| {
        std::io::Write::write_all(w, b"new, but")?;
        Err(std::io::Error::other("failed halfway"))
    });
    assert!(r.is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"old");
    assert!(temp_files(&dir, "f.bin").is_empty(), "temporary file left behind");
    ember::files::write_atomic(&path, |w| std::io::Write::write_all(w, b"new")).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"new");
    assert!(temp_files(&dir, "f.bin").is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(unix)]
#[test]
fn only_regular_files_are_opened_as_models() {
    let dir = scratch("fifo");
    let fifo = dir.join("model.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let out = run_within(ember().arg("info").arg(&fifo), Duration::from_secs(2));
    assert_clear_error(&out, &["model.fifo", "not a regular file"]);
    let out = run_within(ember().args(["run", "--backend", "cpu", "-p", "hi", "-m"]).arg(&dir), Duration::from_secs(2));
    assert_clear_error(&out, &["a directory"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn fetch_into_an_unwritable_folder_names_it_and_leaves_nothing() {
    // /proc refuses new entries even to root, where permission bits would not.
    let dir = Path::new("/proc");
    if !dir.is_dir() {
        eprintln!("SKIPPED: no /proc");
        return;
    }
    let out = run_within(ember().args(["fetch", "--dir", "/proc"]), Duration::from_secs(5));
    assert_clear_error(&out, &["/proc"]);
    assert!(!dir.join(".fetch-tmp").exists());
}

// ---- malformed model files ---------------------------------------------------------------

#[test]
fn alignment_one_runs_on_the_cpu_like_the_original() {
    let Some(model) = common::default_model() else { return };
    let dir = scratch("align1");
    let odd = dir.join("odd.gguf");
    // A padding string whose length puts the data section at an odd offset.
    for pad in 0..4 {
        rewrite(&model, &odd, |w| {
            w.set("general.alignment", Value::U32(1));
            w.set("test.pad", Value::String("x".repeat(pad)));
        }, no_tensor_change);
        if GgufFile::open(&odd).unwrap().data_offset % 2 == 1 {
            break;
        }
    }
    let f = GgufFile::open(&odd).unwrap();
    assert_eq!(f.alignment, 1);
    assert_eq!(f.data_offset % 2, 1, "the test needs unaligned data");
    drop(f);
    // Unaligned weights are copied once into aligned memory: the whole model, beyond the bound
    // for failing commands.
    let out = run_within_any_memory(ember().args(["run", "--backend", "cpu", "-c", "256", "-p", "The capital of France is", "-n", "8", "--temp", "0", "-t", "2", "-m"]).arg(&odd), Duration::from_secs(30));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The same greedy text as the original file (tests/cli.rs, llama.cpp's continuation).
    assert_eq!(String::from_utf8(out.stdout).unwrap(), " Paris.\n\nThe United States has\n");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_huge_tensor_name_gives_a_short_error() {
    let dir = scratch("long-name");
    let path = dir.join("long.gguf");
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.add_tensor(&"n".repeat(60_000_000), &[4], GgmlType::F32, vec![0; 16]);
    w.write_file(&path).unwrap();
    let out = run_within(ember().arg("info").arg(&path), Duration::from_secs(2));
    assert!(out.stderr.len() < 1024, "{} bytes of error", out.stderr.len());
    assert_clear_error(&out, &["name of tensor 0", "60000000", "limit 256"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_hyper_parameters_are_refused_by_name() {
    let Some(model) = common::default_model() else { return };
    let dir = scratch("hparams");
    let bad = dir.join("bad.gguf");
    type Edit = Box<dyn Fn(&mut GgufWriter)>;
    let cases: Vec<(Edit, &[&str])> = vec![
        (
            Box::new(|w: &mut GgufWriter| {
                w.set("llama.rope.scaling.type", Value::String("linear".into()));
                w.set("llama.rope.scaling.factor", Value::F32(0.0));
            }),
            &["rope.scaling.factor = 0", "0.001 to 1024"],
        ),
        (
            Box::new(|w: &mut GgufWriter| {
                w.set("llama.rope.scaling.type", Value::String("linear".into()));
                w.set("llama.rope.scaling.factor", Value::F32(f32::NAN));
            }),
            &["rope.scaling.factor = NaN"],
        ),
        (Box::new(|w: &mut GgufWriter| { w.set("llama.context_length", Value::String("8192".into())); }), &["llama.context_length", "non-negative integer"]),
        (Box::new(|w: &mut GgufWriter| { w.set("llama.rope.freq_base", Value::String("1e4".into())); }), &["llama.rope.freq_base", "number"]),
        (Box::new(|w: &mut GgufWriter| { w.set("llama.rope.freq_base", Value::F32(f32::INFINITY)); }), &["rope.freq_base = inf"]),
        (Box::new(|w: &mut GgufWriter| { w.set("llama.context_length", Value::U64(1 << 40)); }), &["context_length = 1099511627776"]),
        (Box::new(|w: &mut GgufWriter| { w.set("llama.attention.layer_norm_rms_epsilon", Value::F32(-1.0)); }), &["layer_norm_rms_epsilon = -1"]),
    ];
    for (edit, want) in cases {
        rewrite(&model, &bad, edit, no_tensor_change);
        let out = run_within(ember().args(["run", "--backend", "cpu", "-p", "Hi", "-n", "2", "-m"]).arg(&bad), Duration::from_secs(2));
        assert_clear_error(&out, want);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn nan_logits_are_an_error_not_silence() {
    let (Some(model), Some(refs)) = (common::default_model(), common::refs_dir()) else { return };
    let dir = scratch("nan");
    let nan = dir.join("nan.gguf");
    rewrite(&model, &nan, |_| {}, |name, data| (name == "output_norm.weight").then(|| f32::NAN.to_le_bytes().repeat(data.len() / 4)));
    for temp in ["0", "0.8"] {
        let out = run_within(ember().args(["run", "--backend", "cpu", "-c", "256", "-p", "Hello", "-n", "4", "-t", "2", "--temp", temp, "-m"]).arg(&nan), Duration::from_secs(10));
        assert_clear_error(&out, &["NaN or infinite logits"]);
        assert!(out.stdout.iter().all(|b| b.is_ascii_whitespace()), "printed text from NaN logits");
    }
    let out = run_within(ember().args(["perplexity", "--backend", "cpu", "-c", "64", "--chunks", "1", "-t", "2", "-m"]).arg(&nan).arg("-f").arg(refs.join("ppl-text.txt")), Duration::from_secs(10));
    assert_clear_error(&out, &["NaN or infinite logits"]);
    // On the GPU, greedy decoding reads back only the argmax: its kernel flags the NaN (CI runs
    // this on lavapipe; without a Vulkan driver common::gpu says so and it is skipped).
    if common::gpu().is_some() {
        let out = run_within_any_memory(ember().args(["run", "--backend", "gpu", "-p", "Hello", "-n", "4", "--temp", "0", "-m"]).arg(&nan), Duration::from_secs(120));
        assert_clear_error(&out, &["NaN or infinite logits"]);
        assert!(out.stdout.iter().all(|b| b.is_ascii_whitespace()), "printed text from NaN logits on the GPU");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- sizes from the command line ---------------------------------------------------------

#[test]
fn absurd_sizes_end_with_the_limit_named() {
    let Some(model) = common::default_model() else { return };
    let max = u64::MAX.to_string();
    let m = model.to_str().unwrap();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["run", "--backend", "cpu", "-p", "Hi", "-c", &max], vec!["--ctx-size 18446744073709551615", "at most 8192"]),
        (vec!["run", "--backend", "cpu", "-p", "Hi", "-c", "1000000000"], vec!["--ctx-size 1000000000", "at most 8192"]),
        (vec!["perplexity", "--backend", "cpu", "-f", "Cargo.toml", "-c", "1000000000"], vec!["--ctx-size 1000000000", "at most 8192"]),
        (vec!["bench", "--backend", "cpu", "-p", &max], vec!["-p 18446744073709551615", "at most 8192"]),
        (vec!["bench", "--backend", "cpu", "-n", "100000"], vec!["-n 100000", "at most 8192"]),
        (vec!["bench", "--backend", "cpu", "-r", &max], vec!["--repetitions", "at most 1000"]),
        (vec!["plan", "--vram-budget", "1", "-c", &max], vec!["-c 18446744073709551615", "1 to 8192"]),
        (vec!["run", "--backend", "cpu", "-p", "Hi", "--stop", ""], vec!["empty stop string"]),
        (vec!["bench", "--backend", "cpu", "--kernels"], vec!["--kernels", "--backend cpu"]),
    ];
    for (args, want) in cases {
        let out = run_within(ember().args(&args).args(["-m", m]), Duration::from_secs(2));
        assert_clear_error(&out, &want);
    }
    // One token is one token.
    let out = run_within(ember().args(["run", "--backend", "cpu", "-p", "Hi", "-c", "1", "-m", m]), Duration::from_secs(2));
    let line = assert_clear_error(&out, &["the context of 1 token "]);
    assert!(!line.contains("1 tokens"), "{line}");
}

// ---- chat templates ------------------------------------------------------------------------

/// The default model's tokenizer with `template` as its chat template.
fn tokenizer_with_template(model: &Path, template: &str) -> Tokenizer {
    let f = GgufFile::open(model).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata() {
        w.set(k, v.clone());
    }
    w.set("tokenizer.chat_template", Value::String(template.into()));
    Tokenizer::from_gguf(&GgufFile::from_bytes(w.to_bytes()).unwrap()).unwrap()
}

#[test]
fn chat_templates_run_out_of_fuel_and_output_room() {
    let Some(model) = common::default_model() else { return };
    let msgs = [ChatMessage::new("user", "hello")];
    let cases = [
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "instructions"),
        ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "bytes of text"),
        // Arithmetic until the fuel runs out: each + and * goes through the budget's checks.
        ("{% set ns = namespace(n=0) %}{% for i in range(100000) %}{% for j in range(100) %}{% set ns.n = ns.n + j * 2 %}{% endfor %}{% endfor %}", "instructions"),
    ];
    for (template, want) in cases {
        let tok = tokenizer_with_template(&model, template);
        let start = Instant::now();
        let e = tok.apply_chat_template(&msgs, true).unwrap_err().to_string();
        assert!(start.elapsed() < Duration::from_secs(2), "{template}: {:?}", start.elapsed());
        assert!(e.contains(want) && e.len() < 1024, "{template}: {e}");
    }
    // Real templates still render.
    let tok = tokenizer_with_template(&model, "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}");
    assert_eq!(tok.apply_chat_template(&msgs, true).unwrap(), "<user>hello");
}

/// A printf key with a non-ASCII character made minijinja's `format` panic inside the
/// character (fuzzed, session 9): now an error naming it; ASCII keys and text around still work.
#[test]
fn format_with_a_non_ascii_key_is_an_error_not_a_panic() {
    let Some(model) = common::default_model() else { return };
    let msgs = [ChatMessage::new("user", "hello")];
    for template in ["{{ '%(é)s'|format({'é': 1}) }}", "{{ 'a%%(b) %(kéy' | format }}"] {
        let tok = tokenizer_with_template(&model, template);
        let e = tok.apply_chat_template(&msgs, true).unwrap_err().to_string();
        assert!(e.contains("not ASCII") && e.len() < 1024, "{template}: {e}");
    }
    let tok = tokenizer_with_template(&model, "{{ 'é %(n)s %%'|format({'n': 'x'}) }}|{{ '%%(é) %s'|format(1) }}");
    assert_eq!(tok.apply_chat_template(&msgs, true).unwrap(), "é x %|%(é) 1");
}

/// Repeats of an empty list: minijinja repeats lazily, so `messages * 13022 * 6466` with no
/// messages walked 84 million empty rounds at every use (fuzzed, session 9), and a constant
/// `[] * N` is repeated while compiling, out of the budget's sight. Now a repeat is a list of
/// its own (empty stays empty), and so is a repeated constant (a long one is refused by name).
#[test]
fn repeats_of_empty_lists_cost_nothing_and_long_constant_repeats_are_refused() {
    let Some(model) = common::default_model() else { return };
    let one = [ChatMessage::new("user", "hello")];
    let tok = tokenizer_with_template(&model, "{{ messages * 13022 * 6466 }}|{{ (messages * 3 * 2)|length }}");
    let start = Instant::now();
    assert_eq!(tok.apply_chat_template(&[], true).unwrap(), "[]|0");
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    let tok = tokenizer_with_template(&model, "{{ (messages * 3 * 2)|length }} {% for m in messages * 2 %}{{ m.content }}{% endfor %}");
    assert_eq!(tok.apply_chat_template(&one, true).unwrap(), "6 hellohello");
    // Constants repeated while compiling: an empty repeat is an empty list at once, a short one
    // a list, a long one an error naming the limit.
    let tok = tokenizer_with_template(&model, "{{ [] * 84200252 }}|{{ [[] * 84200252, [1] * 3] }}|{{ ([] * 84200252)|length }}|{{ {'a': [] * 84200252} }}");
    let start = Instant::now();
    assert_eq!(tok.apply_chat_template(&one, true).unwrap(), "[]|[[], [1, 1, 1]]|0|{\"a\": []}");
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    for (template, want) in [("{{ [1] * 84200252 }}", "more than 65536 items")] {
        let tok = tokenizer_with_template(&model, template);
        let start = Instant::now();
        let e = tok.apply_chat_template(&one, true).unwrap_err().to_string();
        assert!(start.elapsed() < Duration::from_secs(2), "{template}: {:?}", start.elapsed());
        assert!(e.contains(want) && e.len() < 1024, "{template}: {e}");
    }
}

/// Templates that build text or structures without printing them: each used to run until memory
/// ran out (doubling a string forty times asks for a terabyte in forty instructions).
#[test]
fn chat_templates_that_build_huge_values_stop_at_the_byte_budget() {
    let unrolled = format!("{{% set s = 'ab' %}}{}{{{{ s|length }}}}", "{% set s = s ~ s %}".repeat(40));
    let cases: Vec<(String, &str)> = [
        // The issue's case: a namespace string doubled in a loop, never printed.
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s * 2 %}{% endfor %}",
        "{% macro d(s, n) %}{% if n > 0 %}{{ d(s ~ s, n - 1) }}{% else %}{{ s|length }}{% endif %}{% endmacro %}{{ d('x', 40) }}",
        // Output captured by a block or a macro instead of printed.
        "{% macro d(n) %}{% if n > 0 %}{{ d(n - 1) }}{{ d(n - 1) }}{% else %}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx{% endif %}{% endmacro %}{% set s = d(22) %}",
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set t %}{{ ns.s }}{{ ns.s }}{% endset %}{% set ns.s = t %}{% endfor %}",
        // Filters and methods that multiply their input.
        "{% set ns = namespace(s='xy') %}{% for i in range(40) %}{% set ns.s = ns.s|replace('x', ns.s) %}{% endfor %}",
        "{% set ns = namespace(s='xy') %}{% for i in range(40) %}{% set ns.s = ns.s.replace('x', ns.s) %}{% endfor %}",
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = [ns.s, ns.s]|join(ns.s) %}{% endfor %}",
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s.join([ns.s, ns.s, ns.s]) %}{% endfor %}",
        "{% set ns = namespace(s='x\nx') %}{% for i in range(40) %}{% set ns.s = ns.s|indent(60000) ~ ns.s|indent(60000, true) %}{% endfor %}",
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = '%s%s'|format(ns.s, ns.s) %}{% endfor %}",
        // Lists that hold themselves: small to build, exponential to print or compare.
        "{% set ns = namespace(l=[1]) %}{% for i in range(60) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}",
        "{% set ns = namespace(l=[1]) %}{% for i in range(60) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|join(',') }}",
        "{% set ns = namespace(l=[1]) %}{% for i in range(60) %}{% set ns.l = ns.l * 2 %}{% endfor %}{{ ns.l|list|length }}",
        "{% set ns = namespace(l=[1]) %}{% for i in range(60) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l|tojson }}",
    ]
    .into_iter()
    .map(|t| (t.to_string(), "bytes of text"))
    .chain([(unrolled, "bytes of text")])
    .collect();
    let msgs = [ChatMessage::new("user", "hello")];
    for (template, want) in &cases {
        let start = Instant::now();
        let e = ember::tokenizer::render_chat_template(template, &msgs, true, "<s>", "</s>").unwrap_err().to_string();
        assert!(start.elapsed() < Duration::from_secs(2), "{template}: {:?}", start.elapsed());
        assert!(e.contains(want) && e.contains("16777216") && e.len() < 1024, "{template}: {e}");
    }
    // The same shapes at a sane size still render, and literal text keeps its exact bytes.
    let t = "{% set ns = namespace(s='ab', l=[]) %}{% for m in messages %}{% set ns.s = ns.s ~ m.content %}{% set ns.l = ns.l + [m.role] %}{% endfor %}<{{ ns.s }}|{{ ns.l|join(',') }}|{{ 'x' * 3 }}|{{ ns.s|replace('b', 'B')|upper }}>\n &amp;";
    let two = [ChatMessage::new("user", "hello"), ChatMessage::new("assistant", "hi")];
    assert_eq!(ember::tokenizer::render_chat_template(t, &two, true, "<s>", "</s>").unwrap(), "<abhellohi|user,assistant|xxx|ABHELLOHI>\n &amp;");
    // Operators keep minijinja's meaning through the guard.
    let t = "{{ 1 + 2 }} {{ 1.5 + 2 }} {{ 2 * 3 }} {{ 9223372036854775807 + 1 }} {{ [1] + [2] }} {{ 'ab' * 2 }} {{ [1] * 2 }} {{ 'a' ~ 1 ~ none }}";
    assert_eq!(ember::tokenizer::render_chat_template(t, &two, true, "", "").unwrap(), "3 3.5 6 9223372036854775808 [1, 2] abab [1, 1] a1None");
    // A long conversation is far inside the budget, which grows with the messages.
    let long: Vec<ChatMessage> = (0..200).map(|i| ChatMessage::new(if i % 2 == 0 { "user" } else { "assistant" }, "word ".repeat(2000))).collect();
    let t = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>' + '\n' }}{% endfor %}";
    assert_eq!(ember::tokenizer::render_chat_template(t, &long, false, "", "").unwrap().len(), 200 * (10000 + 12 + 11 + 1) + 100 * 4 + 100 * 9);
    // tojson: a huge indent is refused before anything is made (it aborted the process on one
    // allocation: a fuzz finding), deep nesting times a large indent is charged to the budget,
    // and an ordinary indent renders as Python's json.dumps does.
    let e = ember::tokenizer::render_chat_template("{{ messages|tojson(indent=222222222222222224) }}", &two, true, "", "").unwrap_err().to_string();
    assert!(e.contains("indent") && e.contains("65536"), "{e}");
    let deep = "{% set ns = namespace(v=[]) %}{% for i in range(2000) %}{% set ns.v = [ns.v] %}{% endfor %}{{ ns.v|tojson(indent=60000) }}";
    let start = Instant::now();
    let e = ember::tokenizer::render_chat_template(deep, &two, true, "", "").unwrap_err().to_string();
    assert!(start.elapsed() < Duration::from_secs(2) && e.contains("16777216"), "{e}");
    assert_eq!(ember::tokenizer::render_chat_template("{{ [1, [2]]|tojson(indent=2) }}", &two, true, "", "").unwrap(), "[\n  1,\n  [\n    2\n  ]\n]");
}

#[test]
fn error_text_is_cut_to_a_readable_length() {
    let long = "é".repeat(5000);
    let s = ember::cli::shorten(&long, 1000);
    assert!(s.len() <= 1000 && s.ends_with("more bytes)"), "{} bytes: {}", s.len(), &s[s.len() - 30..]);
    assert_eq!(ember::cli::shorten("short", 1000), "short");
}

// ---- predictors ----------------------------------------------------------------------------

/// A samples file of `n_layer` layers of `n_embd` -> `n_ff` with 40 random tokens.
fn samples_file(path: &Path, n_layer: usize, n_embd: usize, n_ff: usize) {
    use ember::model::Activation;
    use ember::sparse::profile::{SampleCollector, SampleType};
    let mut rng = common::Rng(7);
    let mut c = SampleCollector::new(n_layer, n_embd, n_ff, 40, SampleType::F32, 1);
    for _ in 0..40 {
        for l in 0..n_layer {
            c.offer(l, Activation::Relu, &rng.vec(n_embd), &rng.vec(n_ff), &rng.vec(n_ff));
        }
    }
    c.save(path, "tiny").unwrap();
}

#[test]
fn train_predictor_checks_eval_samples_before_training() {
    let dir = scratch("eval-shape");
    let (a, b) = (dir.join("a.samples.gguf"), dir.join("b.samples.gguf"));
    samples_file(&a, 2, 32, 64);
    samples_file(&b, 2, 32, 96);
    let out = run_within(ember().args(["train-predictor", "-m", "/nonexistent.gguf", "--samples"]).arg(&a).arg("--eval").arg(&b), Duration::from_secs(2));
    assert_clear_error(&out, &["b.samples.gguf", "32 -> 96", "32 -> 64", "same model"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn predictors_of_another_model_are_refused_or_named() {
    let Some(model) = common::default_model() else { return };
    let dir = scratch("predictor-model");
    let hp = ember::model::Model::load(&model).unwrap().hp;
    let run = |p: &Path| run_within(ember().args(["run", "--backend", "cpu", "-c", "256", "--ffn", "predict", "-p", "Hi", "-n", "2", "--temp", "0", "-t", "2", "-m"]).arg(&model).arg("--predictor").arg(p), Duration::from_secs(20));
    // Another shape: refused.
    let other = dir.join("other.predictors.gguf");
    ember::sparse::predictor::Predictors::always_on(hp.n_layer - 1, hp.n_embd, hp.n_ff).save(&other).unwrap();
    assert_clear_error(&run(&other), &["predictor layers"]);
    // The same shape, trained for a model of another name: runs, and says so.
    let sibling = dir.join("sibling.predictors.gguf");
    let mut p = ember::sparse::predictor::Predictors::always_on(hp.n_layer, hp.n_embd, hp.n_ff);
    p.model_name = "another model".into();
    p.save(&sibling).unwrap();
    let out = run(&sibling);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("warning: the predictors were trained for \"another model\""), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn synth_refuses_models_that_cannot_be_loaded_or_fit() {
    let Some(model) = common::default_model() else { return };
    let dir = scratch("synth");
    let out_path = dir.join("big.gguf");
    let synth = |extra: &[&str]| run_within(ember().args(["synth", "--tokenizer-from"]).arg(&model).arg("-o").arg(&out_path).args(extra), Duration::from_secs(2));
    assert_clear_error(&synth(&["--n-embd", "1048576"]), &["--n-embd 1048576", "1 to 65536"]);
    assert_clear_error(&synth(&["--n-layer", "18446744073709551615"]), &["--n-layer", "1 to 1024"]);
    // 65536 x 1048576 f16 values: 128 GiB in one tensor, more than half the memory of machines
    // under 256 GiB (the others would start writing).
    let avail_gib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemAvailable:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())).map(|kib| kib >> 20);
    if avail_gib.is_some_and(|g| g < 256) {
        assert_clear_error(&synth(&["--n-embd", "65536", "--n-ff", "1048576", "--type", "f16", "--n-head", "64", "--n-head-kv", "64"]), &["largest tensor takes 128.0 GiB"]);
    }
    assert!(std::fs::read_dir(&dir).unwrap().next().is_none(), "synth left a file behind");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- --backend auto ------------------------------------------------------------------------

/// With `--backend auto`, a GPU that opens but cannot take the model falls back to the CPU with a
/// one-line warning. The model here is the default one's tokenizer on 16-wide layers, which the
/// CPU runs and the GPU kernels refuse (they need a multiple of 32 columns). On CI, lavapipe is
/// named with --device (auto alone never picks a software adapter).
#[test]
fn auto_backend_falls_back_to_the_cpu_when_the_gpu_fails_after_opening() {
    let Some(model) = common::default_model() else { return };
    let Some(ctx) = common::gpu() else { return };
    let device = ctx.adapter.name.clone();
    drop(ctx);
    let dir = scratch("auto-fallback");
    let tiny = dir.join("tiny16.gguf");
    let f = GgufFile::open(&model).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata() {
        if !k.starts_with("llama.") {
            w.set(k, v.clone());
        }
    }
    let (e, ff, vocab) = (16u64, 32u64, f.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap().len() as u64);
    for (k, v) in [("block_count", 1), ("embedding_length", e), ("feed_forward_length", ff), ("attention.head_count", 2), ("attention.head_count_kv", 2), ("context_length", 64)] {
        w.set(&format!("llama.{k}"), Value::U32(v as u32));
    }
    w.set("llama.rope.freq_base", Value::F32(10000.0));
    w.set("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
    let mut rng = common::Rng(16);
    let mut add = |name: &str, dims: &[u64]| {
        let v: Vec<f32> = rng.vec(dims.iter().product::<u64>() as usize).iter().map(|x| 0.3 * x).collect();
        w.add_f32(name, dims, &v);
    };
    add("token_embd.weight", &[e, vocab]);
    add("output_norm.weight", &[e]);
    for (t, dims) in [("attn_norm", vec![e]), ("ffn_norm", vec![e]), ("attn_q", vec![e, e]), ("attn_k", vec![e, e]), ("attn_v", vec![e, e]), ("attn_output", vec![e, e]), ("ffn_gate", vec![e, ff]), ("ffn_up", vec![e, ff]), ("ffn_down", vec![ff, e])] {
        add(&format!("blk.0.{t}.weight"), &dims);
    }
    w.write_file(&tiny).unwrap();
    // --backend gpu on the same device fails and says why; auto runs on the CPU and says so.
    let out = run_within_any_memory(ember().args(["run", "--backend", "gpu", "--device", &device, "-p", "Hi", "-n", "2", "--temp", "0", "-m"]).arg(&tiny), Duration::from_secs(60));
    assert_clear_error(&out, &["multiple of 32 columns"]);
    let out = run_within_any_memory(ember().args(["run", "--backend", "auto", "--device", &device, "-p", "Hi", "-n", "2", "--temp", "0", "-m"]).arg(&tiny), Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "auto did not fall back: {stderr}");
    let warning: Vec<&str> = stderr.lines().filter(|l| l.contains("running on the CPU instead")).collect();
    assert_eq!(warning.len(), 1, "{stderr}");
    assert!(warning[0].contains("warning: the GPU failed") && warning[0].contains("multiple of 32 columns") && warning[0].len() < 1024, "{}", warning[0]);
    std::fs::remove_dir_all(&dir).unwrap();
}
