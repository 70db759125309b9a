//! ember: run LLMs fast on any GPU by exploiting activation sparsity.
//!
//! Layers, each depending only on those above it (`files`, safe reading and atomic writing,
//! and `mem`, zeroed buffers in huge pages, depend on nothing and serve them all):
//! `gguf` (file format) -> `quant` (block formats, dot kernels) -> `tokenizer` -> `model`
//! (architectures) -> `cpu` (kernels) -> `gpu` (wgpu kernels) -> `sparse` (profiles,
//! predictors, placement) -> `engine` (forward pass, sampling, generation) -> `cli`.

pub mod files;
pub mod mem;
pub mod gguf;
pub mod quant;
pub mod tokenizer;
pub mod model;
pub mod cpu;
pub mod sparse;
pub mod gpu;
pub mod engine;
pub mod cli;
