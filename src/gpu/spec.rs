//! A kernel as it is compiled: one typed value from which both the WGSL text and the pipeline
//! cache key are derived, so that the two cannot disagree.
//!
//! A [`ShaderSpec`] names a base source (a `compose!`d kernel), the entry point, and the
//! constants rewritten in it: each `const NAME: u32 = ...;` line given a value (the files keep
//! valid defaults so that naga validates them as they are). [`ShaderSpec::text`] applies the
//! rewrites; [`ShaderSpec::key`] lists the same fields: the base's name and a fingerprint of
//! its text, the entry point, and every constant with its value. Two specs with equal keys
//! have the same text and entry point; [`GpuContext::pipeline`](super::GpuContext::pipeline)
//! compiles each key once.

use std::fmt::Write;

/// One kernel: a base source, its entry point and the constants rewritten in it (see the
/// module's documentation).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ShaderSpec {
    /// What the base is, for keys and labels (e.g. `ops/attention_decode`, `matmul/q4_0/dec_sg`).
    name: String,
    base: &'static str,
    entry: String,
    /// (constant, value) in the order first set; one entry per constant.
    consts: Vec<(&'static str, u32)>,
}

impl ShaderSpec {
    /// `entry` of `base` as it is, named `name`.
    pub fn new(name: impl Into<String>, base: &'static str, entry: impl Into<String>) -> ShaderSpec {
        ShaderSpec { name: name.into(), base, entry: entry.into(), consts: Vec::new() }
    }

    /// The spec with the line `const NAME: u32 = ...;` of the base giving `value` (a constant
    /// set again takes the new value in its first place).
    pub fn with(mut self, name: &'static str, value: u32) -> ShaderSpec {
        self.set(name, value);
        self
    }

    /// [`with`](Self::with) for several constants, in order.
    pub fn with_all(mut self, consts: &[(&'static str, u32)]) -> ShaderSpec {
        for &(name, value) in consts {
            self.set(name, value);
        }
        self
    }

    /// Sets constant `name` to `value` (see [`with`](Self::with)).
    pub fn set(&mut self, name: &'static str, value: u32) {
        match self.consts.iter_mut().find(|(n, _)| *n == name) {
            Some(c) => c.1 = value,
            None => self.consts.push((name, value)),
        }
    }

    /// The entry point.
    pub fn entry(&self) -> &str {
        &self.entry
    }

    /// The base's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The WGSL text: the base with each constant's line `const NAME: u32 = ...;` (at the start
    /// of a line) replaced by `const NAME: u32 = VALUEu;`, every other byte as it is. Panics
    /// when a constant has no such line.
    pub fn text(&self) -> String {
        let mut text = self.base.to_string();
        for &(name, value) in &self.consts {
            let head = format!("const {name}: u32 = ");
            let start = line_start(&text, &head).unwrap_or_else(|| panic!("shader {}: no line `{head}...;` to set to {value}", self.name));
            let end = text[start..].find('\n').map_or(text.len(), |i| start + i);
            text.replace_range(start..end, &format!("{head}{value}u;"));
        }
        text
    }

    /// The pipeline cache key: the base's name and a fingerprint of its text, the entry point,
    /// then `/NAME=VALUE` for each constant in order.
    pub fn key(&self) -> String {
        let mut key = format!("{}#{:016x}:{}", self.name, fingerprint(self.base), self.entry);
        for (name, value) in &self.consts {
            let _ = write!(key, "/{name}={value}");
        }
        key
    }
}

/// Where the first line of `text` that starts with `head` starts.
fn line_start(text: &str, head: &str) -> Option<usize> {
    if text.starts_with(head) {
        return Some(0);
    }
    text.match_indices(head).map(|(i, _)| i).find(|&i| text.as_bytes()[i - 1] == b'\n')
}

/// FNV-1a over `text`, eight bytes at a time (a base named twice with different texts gets
/// different keys).
fn fingerprint(text: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut words = text.as_bytes().chunks_exact(8);
    for w in &mut words {
        h = (h ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(0x0000_0100_0000_01b3);
    }
    for &b in words.remainder() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ text.len() as u64
}

#[cfg(test)]
mod tests {
    use super::ShaderSpec;

    const BASE: &str = "// const A: u32 = 1u; in a comment\nconst A: u32 = 1u;\nconst B: u32 = 2u;\nconst AB: u32 = 3u;\nfn main() {}\n";

    fn spec() -> ShaderSpec {
        ShaderSpec::new("test/base", BASE, "main").with("A", 1).with("B", 2)
    }

    #[test]
    fn equal_specs_have_equal_keys_and_text() {
        assert_eq!(spec().key(), spec().key());
        assert_eq!(spec().text(), spec().text());
        assert_eq!(spec(), spec());
        // Setting a constant again keeps one entry.
        assert_eq!(spec().with("A", 5).with("A", 1).key(), spec().key());
    }

    #[test]
    fn one_constant_changes_key_and_text() {
        let base = spec();
        for changed in [spec().with("A", 7), spec().with("B", 7), spec().with("AB", 3 + 4)] {
            assert_ne!(changed.key(), base.key(), "{changed:?}");
            assert_ne!(changed.text(), base.text(), "{changed:?}");
        }
        // Another entry point or base: another key.
        assert_ne!(ShaderSpec::new("test/base", BASE, "other").with("A", 1).with("B", 2).key(), base.key());
        let other: &'static str = "const A: u32 = 1u;\nconst B: u32 = 2u;\n";
        assert_ne!(ShaderSpec::new("test/base", other, "main").with("A", 1).with("B", 2).key(), base.key());
    }

    #[test]
    fn text_rewrites_only_the_named_lines() {
        let t = ShaderSpec::new("t", BASE, "main").with("A", 9).with("AB", 10).text();
        assert_eq!(t, "// const A: u32 = 1u; in a comment\nconst A: u32 = 9u;\nconst B: u32 = 2u;\nconst AB: u32 = 10u;\nfn main() {}\n");
        assert_eq!(ShaderSpec::new("t", BASE, "main").text(), BASE);
    }

    #[test]
    #[should_panic(expected = "no line")]
    fn a_missing_constant_panics() {
        ShaderSpec::new("t", BASE, "main").with("C", 1).text();
    }
}
