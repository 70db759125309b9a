//! Fuzz target `chat_template`: see `chat_template` in `../checks.rs`, which the regression tests share.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::chat_template(data));
