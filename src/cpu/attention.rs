//! Causal multi-head attention with grouped KV heads over an f16 KV cache.
//!
//! Per query head, keys are visited in order with an online softmax and the weighted sum of
//! values is kept in f16, rounding after every update, as llama.cpp's CPU flash attention
//! does; the query is rounded to f16 for the key dot products. This costs nothing measurable
//! and keeps ember's greedy tokens on llama.cpp's.

use half::f16;
use super::team::Team;
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
/// `0..=its position`). `q` is `[n_tokens][n_head * head_dim]`, `out` likewise. Over rayon.
pub fn attention(q: &[f32], k: &[f16], v: &[f16], pos0: usize, n_tokens: usize, shape: AttnShape, out: &mut [f32]) {
    let head_dim = shape.head_dim;
    assert_eq!(out.len(), n_tokens * shape.n_head * head_dim);
    out.par_chunks_mut(head_dim).enumerate().for_each(|(i, o)| {
        let mut scratch = vec![f16::ZERO; 2 * head_dim];
        one_head(q, k, v, pos0, shape, i, o, &mut scratch)
    });
}

/// [`attention`] on a team: (token, head) pairs dealt round-robin, so that the members share
/// the longer causal rows of a prompt's later tokens evenly.
#[allow(clippy::too_many_arguments)]
pub fn attention_team(team: &mut Team, q: &[f32], k: &[f16], v: &[f16], pos0: usize, n_tokens: usize, shape: AttnShape, out: &mut [f32]) {
    let head_dim = shape.head_dim;
    let n = n_tokens * shape.n_head;
    assert_eq!(out.len(), n * head_dim);
    let ptr = SharedOut(out.as_mut_ptr());
    team.run(&|member, size| {
        let mut scratch = vec![f16::ZERO; 2 * head_dim];
        for i in (member..n).step_by(size) {
            // SAFETY: task i owns out[i * head_dim..][..head_dim], inside `out`; each task
            // belongs to one member.
            let o = unsafe { std::slice::from_raw_parts_mut(ptr.at(i * head_dim), head_dim) };
            one_head(q, k, v, pos0, shape, i, o, &mut scratch);
        }
    });
}

/// One query row's cache and position: the row sees keys `0..=pos` of `k` and `v`.
#[derive(Clone, Copy)]
pub struct RowKv<'a> {
    pub k: &'a [f16],
    pub v: &'a [f16],
    pub pos: usize,
}

/// Attention for query rows of different sequences (a decode batch): row t of `q`
/// (`[rows.len()][n_head * head_dim]`) attends to its own `rows[t]`. Each (row, head) is the
/// same computation as [`attention_team`]'s for that row alone, dealt round-robin.
pub fn attention_rows_team(team: &mut Team, q: &[f32], rows: &[RowKv], shape: AttnShape, out: &mut [f32]) {
    let head_dim = shape.head_dim;
    let q_dim = shape.n_head * head_dim;
    let n = rows.len() * shape.n_head;
    assert_eq!(out.len(), n * head_dim);
    assert_eq!(q.len(), rows.len() * q_dim);
    let ptr = SharedOut(out.as_mut_ptr());
    team.run(&|member, size| {
        let mut scratch = vec![f16::ZERO; 2 * head_dim];
        for i in (member..n).step_by(size) {
            let (t, h) = (i / shape.n_head, i % shape.n_head);
            let r = rows[t];
            // SAFETY: as in `attention_team`.
            let o = unsafe { std::slice::from_raw_parts_mut(ptr.at(i * head_dim), head_dim) };
            one_head(&q[t * q_dim..(t + 1) * q_dim], r.k, r.v, r.pos, shape, h, o, &mut scratch);
        }
    });
}

/// Raw pointer to the output, shared by members that write disjoint heads.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// A method, so that closures capture the whole (Sync) wrapper.
    fn at(self, i: usize) -> *mut f32 {
        // SAFETY: callers stay inside the slice the pointer came from.
        unsafe { self.0.add(i) }
    }
}

/// Task `i` = (token `i / n_head`, head `i % n_head`): online softmax over its keys, the
/// weighted values summed in f16. `scratch` holds `2 * head_dim` halves.
#[allow(clippy::too_many_arguments)]
fn one_head(q: &[f32], k: &[f16], v: &[f16], pos0: usize, shape: AttnShape, i: usize, o: &mut [f32], scratch: &mut [f16]) {
    let AttnShape { n_head, n_head_kv, head_dim } = shape;
    let q_dim = n_head * head_dim;
    let kv_dim = n_head_kv * head_dim;
    let group = n_head / n_head_kv;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let (t, h) = (i / n_head, i % n_head);
    let kvh = h / group;
    let (qh, acc) = scratch.split_at_mut(head_dim);
    acc.fill(f16::ZERO);
    crate::quant::f32_to_f16_row(&q[t * q_dim + h * head_dim..][..head_dim], qh);
    let (mut m, mut s) = (f32::NEG_INFINITY, 0.0f32);
    for p in 0..=pos0 + t {
        let kr = &k[p * kv_dim + kvh * head_dim..][..head_dim];
        let score = crate::quant::vec_dot_f16_f16(kr, qh) * scale;
        let (mut ms, mut vs) = (1.0f32, 1.0f32);
        if score > m {
            ms = (m - score).exp();
            m = score;
            crate::quant::vec_scale_f16(acc, ms);
        } else {
            vs = (score - m).exp();
        }
        let vr = &v[p * kv_dim + kvh * head_dim..][..head_dim];
        crate::quant::vec_mad_f16(acc, vr, vs);
        s = s.mul_add(ms, vs);
    }
    let inv = if s == 0.0 { 0.0 } else { 1.0 / s };
    for (o, a) in o.iter_mut().zip(acc.iter()) {
        *o = a.to_f32() * inv;
    }
}
