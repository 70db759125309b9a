//! Causal multi-head attention with grouped KV heads over an f16 KV cache.
//!
//! Per query head, keys are visited in order with an online softmax and the weighted sum of
//! values is kept in f16, rounding after every update, as llama.cpp's CPU flash attention
//! does; the query is rounded to f16 for the key dot products. This costs nothing measurable
//! and keeps ember's greedy tokens on llama.cpp's.

use half::f16;
use rayon::prelude::*;

/// Keys and values of every layer for up to `n_ctx` positions, in f16.
pub struct KvCache {
    pub n_ctx: usize,
    pub kv_dim: usize,
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
}

impl KvCache {
    pub fn new(n_layer: usize, n_ctx: usize, kv_dim: usize) -> Self {
        KvCache { n_ctx, kv_dim, k: vec![vec![f16::ZERO; n_ctx * kv_dim]; n_layer], v: vec![vec![f16::ZERO; n_ctx * kv_dim]; n_layer] }
    }

    pub fn bytes(n_layer: usize, n_ctx: usize, kv_dim: usize) -> u64 {
        2 * 2 * (n_layer * n_ctx * kv_dim) as u64
    }

    /// Stores one position's key and value for `layer`.
    pub fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let d = self.kv_dim;
        for (dst, &x) in self.k[layer][pos * d..(pos + 1) * d].iter_mut().zip(k) {
            *dst = f16::from_f32(x);
        }
        for (dst, &x) in self.v[layer][pos * d..(pos + 1) * d].iter_mut().zip(v) {
            *dst = f16::from_f32(x);
        }
    }

    pub fn layer(&self, layer: usize) -> (&[f16], &[f16]) {
        (&self.k[layer], &self.v[layer])
    }
}

/// Shape of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
}

/// Attention for `n_tokens` queries at positions `pos0..pos0 + n_tokens` (each sees keys
/// `0..=its position`). `q` is `[n_tokens][n_head * head_dim]`, `out` likewise.
pub fn attention(q: &[f32], k: &[f16], v: &[f16], pos0: usize, n_tokens: usize, shape: AttnShape, out: &mut [f32]) {
    let AttnShape { n_head, n_head_kv, head_dim } = shape;
    let q_dim = n_head * head_dim;
    let kv_dim = n_head_kv * head_dim;
    let group = n_head / n_head_kv;
    assert_eq!(out.len(), n_tokens * q_dim);
    let scale = 1.0 / (head_dim as f32).sqrt();
    out.par_chunks_mut(head_dim).enumerate().for_each(|(i, o)| {
        let (t, h) = (i / n_head, i % n_head);
        let kvh = h / group;
        let mut qh = vec![f16::ZERO; head_dim];
        crate::quant::f32_to_f16_row(&q[t * q_dim + h * head_dim..][..head_dim], &mut qh);
        let mut acc = vec![f16::ZERO; head_dim];
        let (mut m, mut s) = (f32::NEG_INFINITY, 0.0f32);
        for p in 0..=pos0 + t {
            let kr = &k[p * kv_dim + kvh * head_dim..][..head_dim];
            let score = crate::quant::vec_dot_f16_f16(kr, &qh) * scale;
            let (mut ms, mut vs) = (1.0f32, 1.0f32);
            if score > m {
                ms = (m - score).exp();
                m = score;
                crate::quant::vec_scale_f16(&mut acc, ms);
            } else {
                vs = (score - m).exp();
            }
            let vr = &v[p * kv_dim + kvh * head_dim..][..head_dim];
            crate::quant::vec_mad_f16(&mut acc, vr, vs);
            s = s.mul_add(ms, vs);
        }
        let inv = if s == 0.0 { 0.0 } else { 1.0 / s };
        for (o, a) in o.iter_mut().zip(&acc) {
            *o = a.to_f32() * inv;
        }
    });
}
