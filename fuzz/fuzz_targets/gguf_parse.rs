//! Fuzz target `gguf_parse`: see `gguf_parse` in `../checks.rs`, which the regression tests share.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::gguf_parse(data));
