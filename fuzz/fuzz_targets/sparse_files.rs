//! Fuzz target `sparse_files`: see `sparse_files` in `../checks.rs`, which the regression tests share.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::sparse_files(data));
