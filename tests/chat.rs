//! `ember chat` through stdin (not a terminal: one user turn per line).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

/// Two turns: both answered, and the second prefilled only its new tokens (the first turn's
/// prompt and answer came from the KV cache kept between turns); /reset starts over, so the
/// third turn reuses nothing.
#[test]
fn two_turns_and_the_second_prefills_only_its_new_tokens() {
    let Some(model) = common::default_model() else { return };
    let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["chat", "-m"])
        .arg(&model)
        .args(["--backend", "cpu", "--temp", "0", "-n", "48", "-c", "512", "-t", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"What is 2+2?\nAnd what is 3+3?\n/reset\nWhat is 2+2?\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let answers: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(answers.len() >= 3 && answers[0].contains('4'), "{stdout:?}");
    // "ember: prompt P tokens (R reused from the cache, N prefilled at ...) | answer A tokens ..."
    let turns: Vec<(usize, usize, usize, usize)> = err
        .lines()
        .filter_map(|l| l.strip_prefix("ember: prompt "))
        .map(|l| {
            let nums: Vec<usize> = l.split(|c: char| !c.is_ascii_digit() && c != '.').filter_map(|w| w.parse().ok()).collect();
            let answer: usize = l.split("| answer ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
            (nums[0], nums[1], nums[2], answer)
        })
        .collect();
    assert_eq!(turns.len(), 3, "{err}");
    let (p1, r1, n1, a1) = turns[0];
    let (p2, r2, n2, _) = turns[1];
    assert_eq!((r1, n1), (0, p1), "{err}");
    // The second prompt holds the first prompt and answer (a1 tokens, the end-of-turn token
    // not fed; at the length limit its last token is not fed either), then the new message:
    // everything before it came from the cache.
    assert!(r2 + 1 >= p1 + a1 && n2 == p2 - r2 && n2 > 0 && n2 < p2 - p1, "{err}");
    assert_eq!(turns[2], (p1, 0, p1, turns[2].3), "{err}");
    // Greedy: the same question after /reset gets the same answer.
    assert_eq!(answers[0], answers[answers.len() - 1]);
}
