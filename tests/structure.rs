//! Rules about the source tree itself that no compiler checks.
//!
//! The library takes its configuration as values passed in (`gpu::GpuTuning`,
//! `cpu::matmul::CpuTuning`, builder options): only the command line (src/cli, and the binary's
//! src/main.rs, which calls into it) may read or change the process environment. A library
//! reading variables behaves differently under a server, a test harness or another program than
//! the caller asked for, and the reads hide in hot paths.

use std::path::{Path, PathBuf};

/// What marks an environment access. `std::env` covers `use std::env;` followed by bare
/// `env::var(..)` calls and any fully qualified one.
const ENV_ACCESS: [&str; 4] = ["std::env", "env::var", "env::set_var", "env::remove_var"];

/// (path, line number, line) of every environment access in the .rs files under `dir`, minus
/// those under `allowed` folders (relative to `dir`) and the `allowed_files`.
fn env_accesses(dir: &Path, allowed: &[&str], allowed_files: &[&str]) -> (usize, Vec<(PathBuf, usize, String)>) {
    let mut stack = vec![dir.to_path_buf()];
    let (mut files, mut hits) = (0, Vec::new());
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(dir).unwrap().to_string_lossy().replace('\\', "/");
            if path.is_dir() {
                if !allowed.contains(&rel.as_str()) {
                    stack.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || allowed_files.contains(&rel.as_str()) {
                continue;
            }
            files += 1;
            let text = std::fs::read_to_string(&path).unwrap();
            for (i, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                if ENV_ACCESS.iter().any(|p| code.contains(p)) {
                    hits.push((path.clone(), i + 1, line.trim().to_string()));
                }
            }
        }
    }
    (files, hits)
}

#[test]
fn the_library_reads_no_environment_variables() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (files, hits) = env_accesses(&src, &["cli"], &["main.rs"]);
    // The walk really covered the library (a wrong root would pass vacuously).
    assert!(files > 50, "only {files} source files found under {}", src.display());
    let list: Vec<String> = hits.iter().map(|(p, n, l)| format!("{}:{n}: {l}", p.display())).collect();
    assert!(list.is_empty(), "environment read outside src/cli (pass the setting in as a value, e.g. a GpuTuning or CpuTuning field filled by the CLI):\n{}", list.join("\n"));
}

#[test]
fn the_scan_finds_an_environment_read() {
    // The same scan over a scratch tree with one access in the library part and one in its CLI.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("structure-scan");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("gpu")).unwrap();
    std::fs::create_dir_all(dir.join("cli")).unwrap();
    std::fs::write(dir.join("gpu/ops.rs"), "fn f() {\n    // std::env::var in a comment is fine\n    let w = std::env::var(\"EMBER_ATTN_WG\");\n}\n").unwrap();
    std::fs::write(dir.join("cli/mod.rs"), "fn g() { let _ = std::env::var_os(\"HOME\"); }\n").unwrap();
    std::fs::write(dir.join("lib.rs"), "use std::env;\nfn h() { env::set_var(\"A\", \"1\"); }\n").unwrap();
    let (files, mut hits) = env_accesses(&dir, &["cli"], &[]);
    hits.sort();
    assert_eq!(files, 2);
    let found: Vec<(String, usize)> = hits.iter().map(|(p, n, _)| (p.strip_prefix(&dir).unwrap().to_string_lossy().into_owned(), *n)).collect();
    assert_eq!(found, vec![("gpu/ops.rs".to_string(), 3), ("lib.rs".to_string(), 1), ("lib.rs".to_string(), 2)]);
    std::fs::remove_dir_all(&dir).unwrap();
}
