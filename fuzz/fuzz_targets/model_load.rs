//! Fuzz target `model_load`: see `model_load` in `../checks.rs`, which the regression tests share.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::model_load(data));
