//! CPU kernels: matrix products over quantised weights, norms, RoPE, attention.
//!
//! Numerics follow llama.cpp's CPU backend where that is cheap to do (activations quantised
//! to 8 bits per weight type, f16 KV cache, double-precision RMSNorm sums), so that greedy
//! decoding reproduces its tokens.

pub mod attention;
pub mod matmul;
pub mod ops;
pub mod sparse;
pub mod team;

pub use attention::{attention, KvCache};
pub use matmul::{matmul, Activations, Precision};
