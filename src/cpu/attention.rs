//! Causal multi-head attention with grouped KV heads over an f16 KV cache.
//!
//! Per query head, keys are visited in order with an online softmax and the weighted sum of
//! values is kept in f16, rounding after every update, as llama.cpp's CPU flash attention
//! does; the query is rounded to f16 for the key dot products. This costs nothing measurable
//! and keeps ember's greedy tokens on llama.cpp's.

use half::f16;
use super::team::Team;
use crate::mem::ZeroedBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use rayon::prelude::*;

/// Keys and values of every layer for up to `n_ctx` positions, in f16, in huge pages where
/// the kernel gives them ([`ZeroedBuf`]): a 7B's rows are 8 KiB apart, and decode attention
/// on 4 KiB pages walked the page tables for nearly every key it read.
pub struct KvCache {
    pub n_ctx: usize,
    pub kv_dim: usize,
    k: Vec<ZeroedBuf<f16>>,
    v: Vec<ZeroedBuf<f16>>,
}

impl KvCache {
    pub fn new(n_layer: usize, n_ctx: usize, kv_dim: usize) -> Self {
        let buf = || ZeroedBuf::new(n_ctx * kv_dim, true);
        KvCache { n_ctx, kv_dim, k: (0..n_layer).map(|_| buf()).collect(), v: (0..n_layer).map(|_| buf()).collect() }
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

    /// Positions `pos0..pos0 + n` of `layer`'s keys and values, for stores split among threads
    /// ([`store_row`] on each position's rows).
    pub fn rows_mut(&mut self, layer: usize, pos0: usize, n: usize) -> (&mut [f16], &mut [f16]) {
        let d = self.kv_dim;
        (&mut self.k[layer][pos0 * d..(pos0 + n) * d], &mut self.v[layer][pos0 * d..(pos0 + n) * d])
    }
}

/// [`KvCache::store`] into one position's rows (`rows_mut`'s slices): the same rounding.
pub fn store_row(k_dst: &mut [f16], v_dst: &mut [f16], k: &[f32], v: &[f32]) {
    for (dst, &x) in k_dst.iter_mut().zip(k) {
        *dst = f16::from_f32(x);
    }
    for (dst, &x) in v_dst.iter_mut().zip(v) {
        *dst = f16::from_f32(x);
    }
}

/// Shape of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
}

/// What an attention call does beyond the plain causal softmax(q k / sqrt(d)) v.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnOpts {
    /// Scores are the f16 dot products times this (1/sqrt(head_dim) by default; 1 where the
    /// model scaled q itself before the f16 rounding, as Gemma does).
    pub scale: f32,
    /// Scores become `cap * tanh(s / cap)` (0: none; Gemma 2: 50). As llama.cpp's flash
    /// attention computes it: the scale divided by the cap, then `cap * tanhf`.
    pub softcap: f32,
    /// A query at position p sees keys `p - window + 1 ..= p` only (0: all of 0..=p).
    pub window: usize,
}

impl AttnOpts {
    /// Plain causal attention for heads of `head_dim`.
    pub fn causal(head_dim: usize) -> AttnOpts {
        AttnOpts { scale: 1.0 / (head_dim as f32).sqrt(), softcap: 0.0, window: 0 }
    }

    /// The first key a query at `pos` sees.
    fn first_key(&self, pos: usize) -> usize {
        if self.window == 0 { 0 } else { (pos + 1).saturating_sub(self.window) }
    }
}

/// Attention for `n_tokens` queries at positions `pos0..pos0 + n_tokens` (each sees keys
/// `0..=its position`). `q` is `[n_tokens][n_head * head_dim]`, `out` likewise. Over rayon.
pub fn attention(q: &[f32], k: &[f16], v: &[f16], pos0: usize, n_tokens: usize, shape: AttnShape, out: &mut [f32]) {
    let head_dim = shape.head_dim;
    assert_eq!(out.len(), n_tokens * shape.n_head * head_dim);
    out.par_chunks_mut(head_dim).enumerate().for_each(|(i, o)| {
        let mut scratch = vec![f16::ZERO; 2 * head_dim];
        one_head(q, k, v, pos0, shape, AttnOpts::causal(head_dim), i, o, &mut scratch)
    });
}

/// [`attention`] on a team: (token, head) pairs dealt round-robin, so that the members share
/// the longer causal rows of a prompt's later tokens evenly.
#[allow(clippy::too_many_arguments)]
pub fn attention_team(team: &mut Team, q: &[f32], k: &[f16], v: &[f16], pos0: usize, n_tokens: usize, shape: AttnShape, out: &mut [f32]) {
    attention_team_opts(team, q, k, v, pos0, n_tokens, shape, AttnOpts::causal(shape.head_dim), out)
}

/// [`attention_team`] with `opts` (Gemma's scale, soft-capping and sliding window).
#[allow(clippy::too_many_arguments)]
pub fn attention_team_opts(team: &mut Team, q: &[f32], k: &[f16], v: &[f16], pos0: usize, n_tokens: usize, shape: AttnShape, opts: AttnOpts, out: &mut [f32]) {
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
            one_head(q, k, v, pos0, shape, opts, i, o, &mut scratch);
        }
    });
}

/// Queries per task of [`attention_tiled_team`]: each run of keys converted to f32 serves this
/// many queries (at 16 the conversions took a third of the time, at 64 a tenth).
const TILE_Q: usize = 64;
/// Keys converted to f32 at a time (with their values): 2 x 64 rows of a 128-wide head, 64 KiB,
/// stay in L2 while the tile's queries use them.
const TILE_K: usize = 64;

/// What [`attention_team`] computes, in f32 arithmetic and by tiles: each task takes one head
/// and up to [`TILE_Q`] consecutive queries, converts each run of [`TILE_K`] keys and values to
/// f32 once for all of them, and keeps an online softmax per query (vectorised dot products
/// and updates). Its sums are f32, not llama.cpp's f16 accumulator, so it is for prompts where
/// the CPU is not the reference path: a hybrid session's streamed prefill, whose host layers'
/// attention ran at about 3.5 GFLOP/s per core one (token, head) at a time.
/// The same result whatever the team's size (each task's arithmetic is fixed).
#[allow(clippy::too_many_arguments)]
pub fn attention_tiled_team(team: &mut Team, q: &[f32], k: &[f16], v: &[f16], pos0: usize, n_tokens: usize, shape: AttnShape, out: &mut [f32]) {
    let q_dim = shape.n_head * shape.head_dim;
    assert_eq!(out.len(), n_tokens * q_dim);
    assert_eq!(q.len(), n_tokens * q_dim);
    let n_tiles = n_tokens.div_ceil(TILE_Q);
    let n_tasks = n_tiles * shape.n_head;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let ptr = SharedOut(out.as_mut_ptr());
    team.run(&|_, _| {
        let mut scratch = TileScratch::new(shape.head_dim);
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i >= n_tasks {
                break;
            }
            // The last tiles (the most keys) first, so that the members finish together.
            let (tile, h) = (n_tiles - 1 - i / shape.n_head, i % shape.n_head);
            #[cfg(target_arch = "x86_64")]
            if crate::quant::has_avx2_fma() {
                // SAFETY: the CPU has the features the clone is compiled for.
                unsafe { tile_task_avx2(q, k, v, pos0, n_tokens, shape, tile, h, ptr, &mut scratch) };
                continue;
            }
            tile_task::<false>(q, k, v, pos0, n_tokens, shape, tile, h, ptr, &mut scratch);
        }
    });
}

/// Keys per task of [`attention_decode_team`], and heads: functions of nothing but the shape,
/// so that the partial sums are the same whatever the team's size. A task reads its keys' rows
/// for its heads, runs of `DECODE_HEADS * head_dim` values: one head's 256 bytes at a time
/// (8 KiB apart in a 7B's cache) ran at 3-4 GB/s per core, paced by a page walk per row.
const DECODE_CHUNK: usize = 32;
const DECODE_HEADS: usize = 8;

/// One decode query per head against keys `0..=pos` in f32 arithmetic (the hybrid's host
/// attention layers; the CPU session keeps llama.cpp's f16 numerics in [`attention_team`]).
/// Work is split by (run of [`DECODE_CHUNK`] keys, group of [`DECODE_HEADS`] heads),
/// flash-decoding style: each task keeps, per head, its own running maximum, sum and output,
/// and each head's parts are merged in key order, so the result does not depend on the team's
/// size. One (token, head) per task left 32 tasks for 14 threads.
///
/// `parts` is scratch kept by the caller (a 7B's at 4096 keys is 2 MiB: allocated per call, its
/// pages were faulted in per layer and token).
#[allow(clippy::too_many_arguments)]
pub fn attention_decode_team(team: &mut Team, q: &[f32], k: &[f16], v: &[f16], pos: usize, shape: AttnShape, parts: &mut Vec<f32>, out: &mut [f32]) {
    let AttnShape { n_head, head_dim: hd, .. } = shape;
    assert_eq!(q.len(), n_head * hd);
    assert_eq!(out.len(), n_head * hd);
    let n_keys = pos + 1;
    let n_chunks = n_keys.div_ceil(DECODE_CHUNK);
    let n_groups = n_head.div_ceil(DECODE_HEADS);
    let n_tasks = n_chunks * n_groups;
    // Per (head, chunk), at [(h * n_chunks + c) * (hd + 2)..]: the maximum and the sum of the
    // chunk's scores, then its unnormalised output.
    parts.resize(n_head * n_chunks * (hd + 2), 0.0);
    let next = AtomicUsize::new(0);
    // Per group of heads: its tasks finished. The member finishing a group's last task
    // merges that group's parts, so the merge is spread over the team rather than left to
    // the caller after the join (32 heads' merges took ~30 µs a layer on one thread).
    let done: Vec<AtomicUsize> = (0..n_groups).map(|_| AtomicUsize::new(0)).collect();
    let ptr = SharedOut(parts.as_mut_ptr());
    let out_ptr = SharedOut(out.as_mut_ptr());
    team.run(&|_, _| {
        let mut row = vec![0.0f32; hd];
        let mut scores = vec![0.0f32; DECODE_CHUNK * DECODE_HEADS];
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n_tasks {
                break;
            }
            let (c, g) = (i / n_groups, i % n_groups);
            let heads = g * DECODE_HEADS..((g + 1) * DECODE_HEADS).min(n_head);
            let task = DecodeTask { q, k, v, n_keys, shape, chunk: c, heads: heads.clone() };
            // SAFETY: the task writes only parts (h, c) of its heads, inside `parts`; no other
            // task has the same (chunk, heads).
            let part = |h: usize| unsafe { std::slice::from_raw_parts_mut(ptr.at((h * n_chunks + c) * (hd + 2)), hd + 2) };
            #[cfg(target_arch = "x86_64")]
            let simd = crate::quant::has_avx2_fma() && hd.is_multiple_of(16);
            #[cfg(not(target_arch = "x86_64"))]
            let simd = false;
            match simd {
                // SAFETY: the CPU has the features the kernel is compiled for; the head size
                // is a multiple of 16 as it requires.
                #[cfg(target_arch = "x86_64")]
                true => unsafe { task.run_f16c(&part, &mut scores) },
                _ => task.run(&part, &mut row, &mut scores),
            }
            // AcqRel: the last of a group's tasks sees every other task's parts.
            if done[g].fetch_add(1, Ordering::AcqRel) + 1 == n_chunks {
                for h in heads {
                    // SAFETY: every task of the group has finished (no more writes to its
                    // parts), and only this member merges the group: head h's output row is
                    // written by nobody else.
                    let (chunks, o) = unsafe {
                        (
                            std::slice::from_raw_parts(ptr.at(h * n_chunks * (hd + 2)).cast_const(), n_chunks * (hd + 2)),
                            std::slice::from_raw_parts_mut(out_ptr.at(h * hd), hd),
                        )
                    };
                    merge_decode_parts(chunks, hd, o);
                }
            }
        }
    });
}

/// One head's output from its parts per run of keys (maximum, sum, unnormalised output each),
/// merged in key order.
fn merge_decode_parts(chunks: &[f32], hd: usize, o: &mut [f32]) {
    let m = chunks.chunks_exact(hd + 2).map(|p| p[0]).fold(f32::NEG_INFINITY, f32::max);
    o.fill(0.0);
    let mut l = 0.0f32;
    for p in chunks.chunks_exact(hd + 2) {
        let c = exp_neg(p[0] - m);
        l += p[1] * c;
        for (a, &x) in o.iter_mut().zip(&p[2..]) {
            *a += x * c;
        }
    }
    let inv = if l == 0.0 { 0.0 } else { 1.0 / l };
    o.iter_mut().for_each(|a| *a *= inv);
}

/// One task of [`attention_decode_team`]: keys `chunk * DECODE_CHUNK..` (at most
/// [`DECODE_CHUNK`]) for the query heads `heads`. Each head's part gets the scores' maximum,
/// the sum of their exponentials and the output weighted by them, unnormalised.
struct DecodeTask<'a> {
    q: &'a [f32],
    k: &'a [f16],
    v: &'a [f16],
    n_keys: usize,
    shape: AttnShape,
    chunk: usize,
    heads: std::ops::Range<usize>,
}

impl DecodeTask<'_> {
    fn keys(&self) -> (usize, usize) {
        let j0 = self.chunk * DECODE_CHUNK;
        (j0, DECODE_CHUNK.min(self.n_keys - j0))
    }

    /// Head `h`'s row of key or value `j` in the cache `m`.
    fn row<'m>(&self, m: &'m [f16], j: usize, h: usize) -> &'m [f16] {
        let AttnShape { n_head, n_head_kv, head_dim: hd } = self.shape;
        let kvh = h / (n_head / n_head_kv);
        &m[j * n_head_kv * hd + kvh * hd..][..hd]
    }

    /// The softmax part of head `h`'s scores `s` (exponentials in place): its maximum and sum.
    fn softmax(s: &mut [f32]) -> (f32, f32) {
        let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for x in s.iter_mut() {
            *x = exp_neg(*x - m);
        }
        (m, s.iter().sum())
    }

    /// Portable: rows converted to f32 one at a time.
    fn run<'p>(&self, part: &dyn Fn(usize) -> &'p mut [f32], row: &mut [f32], scores: &mut [f32]) {
        let hd = self.shape.head_dim;
        let (j0, nk) = self.keys();
        let scale = 1.0 / (hd as f32).sqrt();
        for (gh, h) in self.heads.clone().enumerate() {
            let qh = &self.q[h * hd..(h + 1) * hd];
            let s = &mut scores[gh * DECODE_CHUNK..][..nk];
            for (j, sc) in s.iter_mut().enumerate() {
                for (r, x) in row.iter_mut().zip(self.row(self.k, j0 + j, h)) {
                    *r = x.to_f32();
                }
                *sc = qh.iter().zip(row.iter()).map(|(a, b)| a * b).sum::<f32>() * scale;
            }
            let (m, l) = Self::softmax(s);
            let p = part(h);
            (p[0], p[1]) = (m, l);
            let o = &mut p[2..];
            o.fill(0.0);
            for (j, &w) in s.iter().enumerate() {
                for (a, x) in o.iter_mut().zip(self.row(self.v, j0 + j, h)) {
                    *a += w * x.to_f32();
                }
            }
        }
    }

    /// With F16C conversions in registers, for head sizes that are multiples of 16: a key is
    /// four 8-wide products into four sums per head; values are added into the output 64
    /// dimensions at a time (eight registers).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_f16c<'p>(&self, part: &dyn Fn(usize) -> &'p mut [f32], scores: &mut [f32]) {
        use std::arch::x86_64::*;
        let hd = self.shape.head_dim;
        let (j0, nk) = self.keys();
        let scale = 1.0 / (hd as f32).sqrt();
        // The group's stretch of a key row is 8 KiB from the next key's in a 7B's cache, so
        // the hardware's prefetchers (which stay within a 4 KiB page) do not run ahead of
        // it: each key's stretch two keys on is asked for here, and its value stretch for
        // the loop below, while this key's scores are computed.
        let span = self.heads.len() * hd;
        let h0 = self.heads.start;
        let fetch = |m: &[f16], j: usize, hint: bool| {
            if j < self.n_keys {
                let p = self.row(m, j, h0).as_ptr().cast::<i8>();
                for line in (0..span * 2).step_by(64) {
                    match hint {
                        true => _mm_prefetch::<_MM_HINT_T0>(p.add(line)),
                        false => _mm_prefetch::<_MM_HINT_T1>(p.add(line)),
                    }
                }
            }
        };
        fetch(self.k, j0, true);
        fetch(self.k, j0 + 1, true);
        for j in 0..nk {
            fetch(self.k, j0 + j + 2, true);
            fetch(self.v, j0 + j, false);
            for (gh, h) in self.heads.clone().enumerate() {
                let kr = self.row(self.k, j0 + j, h).as_ptr().cast::<__m128i>();
                let qh = self.q[h * hd..].as_ptr();
                let mut acc = [_mm256_setzero_ps(); 4];
                for d in 0..hd / 8 {
                    let kf = _mm256_cvtph_ps(_mm_loadu_si128(kr.add(d)));
                    acc[d % 4] = _mm256_fmadd_ps(_mm256_loadu_ps(qh.add(8 * d)), kf, acc[d % 4]);
                }
                let a = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
                scores[gh * DECODE_CHUNK + j] = crate::quant::hsum8(a) * scale;
            }
        }
        for (gh, h) in self.heads.clone().enumerate() {
            let s = &mut scores[gh * DECODE_CHUNK..][..nk];
            let (m, l) = Self::softmax(s);
            let p = part(h);
            (p[0], p[1]) = (m, l);
            let o = &mut p[2..];
            for d0 in (0..hd).step_by(64) {
                let w = ((hd - d0) / 8).min(8);
                let mut acc = [_mm256_setzero_ps(); 8];
                for (j, &pw) in s.iter().enumerate() {
                    let vr = self.row(self.v, j0 + j, h)[d0..].as_ptr().cast::<__m128i>();
                    let pv = _mm256_set1_ps(pw);
                    for (c, a) in acc.iter_mut().enumerate().take(w) {
                        *a = _mm256_fmadd_ps(pv, _mm256_cvtph_ps(_mm_loadu_si128(vr.add(c))), *a);
                    }
                }
                for (c, a) in acc.iter().enumerate().take(w) {
                    _mm256_storeu_ps(o.as_mut_ptr().add(d0 + 8 * c), *a);
                }
            }
        }
    }
}

/// One member's buffers for [`tile_task`].
struct TileScratch {
    /// The tile's queries, scaled, rows padded to a multiple of 4 with zeros.
    q: Vec<f32>,
    /// The key tile transposed (`k[d * TILE_K + j]`).
    k: Vec<f32>,
    /// The value tile (`v[j * hd + d]`), rows past the tile's keys zero.
    v: Vec<f32>,
    o: Vec<f32>,
    /// Scores, then probabilities, of the tile's queries against the key tile (`TILE_Q` x
    /// `TILE_K`).
    s: Vec<f32>,
    m: [f32; TILE_Q],
    l: [f32; TILE_Q],
}

impl TileScratch {
    fn new(hd: usize) -> TileScratch {
        TileScratch { q: vec![0.0; TILE_Q * hd], k: vec![0.0; TILE_K * hd], v: vec![0.0; TILE_K * hd], o: vec![0.0; TILE_Q * hd], s: vec![0.0; TILE_Q * TILE_K], m: [f32::NEG_INFINITY; TILE_Q], l: [0.0; TILE_Q] }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_task_avx2(q: &[f32], k: &[f16], v: &[f16], pos0: usize, n_tokens: usize, shape: AttnShape, tile: usize, h: usize, out: SharedOut, sc: &mut TileScratch) {
    tile_task::<true>(q, k, v, pos0, n_tokens, shape, tile, h, out, sc)
}

/// a * b + c, fused where the caller is compiled with FMA (`f32::mul_add` is a call into the
/// C library otherwise); Rust never fuses `a * b + c` itself, and unfused the products ran at
/// half the rate.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Rows of a register block of [`tile_task`]'s two products, and columns (keys of the scores,
/// head dimensions of the output): 4 x 16 sums, 8 AVX2 registers.
const BLOCK_R: usize = 4;
const BLOCK_C: usize = 16;

/// Head `h`, queries `tile * TILE_Q..` (at most TILE_Q of them): see [`attention_tiled_team`].
/// Per key tile: the scores as a product of the query tile and the transposed key tile, by
/// register blocks of 4 queries x 16 keys (each key vector loaded once for 4 queries); the
/// online softmax per query over them (exponentials as one vector loop, [`exp_neg`]), masked
/// keys given probability 0; then the output as a product of the probabilities and the value
/// tile, by blocks of 4 queries x 16 dimensions (each value vector loaded once for 4 queries).
/// One query at a time, the output row was loaded and stored around every value row (three
/// memory operations per multiply-add).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile_task<const FMA: bool>(q: &[f32], k: &[f16], v: &[f16], pos0: usize, n_tokens: usize, shape: AttnShape, tile: usize, h: usize, out: SharedOut, sc: &mut TileScratch) {
    use half::slice::HalfFloatSliceExt;
    let AttnShape { n_head, n_head_kv, head_dim: hd } = shape;
    let (q_dim, kv_dim) = (n_head * hd, n_head_kv * hd);
    let kvh = h / (n_head / n_head_kv);
    let scale = 1.0 / (hd as f32).sqrt();
    let t0 = tile * TILE_Q;
    let tq = TILE_Q.min(n_tokens - t0);
    let tq4 = tq.next_multiple_of(BLOCK_R);
    for i in 0..tq {
        let src = &q[(t0 + i) * q_dim + h * hd..][..hd];
        for (d, &x) in sc.q[i * hd..(i + 1) * hd].iter_mut().zip(src) {
            *d = x * scale;
        }
    }
    sc.q[tq * hd..tq4 * hd].fill(0.0);
    sc.o[..tq4 * hd].fill(0.0);
    sc.m = [f32::NEG_INFINITY; TILE_Q];
    sc.l = [0.0; TILE_Q];
    let n_keys = pos0 + t0 + tq;
    let hd16 = hd - hd % BLOCK_C;
    let mut row = [0.0f32; 256];
    for j0 in (0..n_keys).step_by(TILE_K) {
        let nk = TILE_K.min(n_keys - j0);
        let nk16 = nk.next_multiple_of(BLOCK_C);
        for j in 0..nk {
            let at = (j0 + j) * kv_dim + kvh * hd;
            v[at..at + hd].convert_to_f32_slice(&mut sc.v[j * hd..(j + 1) * hd]);
            for d0 in (0..hd).step_by(256) {
                let w = (hd - d0).min(256);
                k[at + d0..at + d0 + w].convert_to_f32_slice(&mut row[..w]);
                for (d, &x) in row[..w].iter().enumerate() {
                    sc.k[(d0 + d) * TILE_K + j] = x;
                }
            }
        }
        // Keys past the tile's end: their scores are masked, their values must add nothing.
        sc.v[nk * hd..nk16 * hd].fill(0.0);
        // Scores S = Q K^T for the tile's queries (rows padded to 4) and keys (padded to 16).
        for ib in (0..tq4).step_by(BLOCK_R) {
            for jb in (0..nk16).step_by(BLOCK_C) {
                let mut acc = [[0.0f32; BLOCK_C]; BLOCK_R];
                for d in 0..hd {
                    let kr: &[f32; BLOCK_C] = sc.k[d * TILE_K + jb..][..BLOCK_C].try_into().unwrap();
                    for (r, a) in acc.iter_mut().enumerate() {
                        let qv = sc.q[(ib + r) * hd + d];
                        for c in 0..BLOCK_C {
                            a[c] = madd::<FMA>(qv, kr[c], a[c]);
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    sc.s[(ib + r) * TILE_K + jb..][..BLOCK_C].copy_from_slice(a);
                }
            }
        }
        // The online softmax per query: probabilities in place of the scores, 0 where masked.
        for i in 0..tq4 {
            let p = &mut sc.s[i * TILE_K..i * TILE_K + nk16];
            // Query i sees keys 0..=pos0 + t0 + i.
            let seen = (pos0 + t0 + i + 1).min(j0 + nk);
            if i >= tq || seen <= j0 {
                p.fill(0.0);
                continue;
            }
            let cnt = seen - j0;
            let mx = p[..cnt].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let m_new = sc.m[i].max(mx);
            if sc.m[i] != f32::NEG_INFINITY && sc.m[i] < m_new {
                let c = (sc.m[i] - m_new).exp();
                sc.l[i] *= c;
                sc.o[i * hd..(i + 1) * hd].iter_mut().for_each(|x| *x *= c);
            }
            sc.m[i] = m_new;
            for x in p[..cnt].iter_mut() {
                *x = exp_neg(*x - m_new);
            }
            p[cnt..].fill(0.0);
            sc.l[i] += p[..cnt].iter().sum::<f32>();
        }
        // O += P V.
        for ib in (0..tq4).step_by(BLOCK_R) {
            for db in (0..hd16).step_by(BLOCK_C) {
                let mut acc = [[0.0f32; BLOCK_C]; BLOCK_R];
                for (r, a) in acc.iter_mut().enumerate() {
                    a.copy_from_slice(&sc.o[(ib + r) * hd + db..][..BLOCK_C]);
                }
                for j in 0..nk16 {
                    let vr: &[f32; BLOCK_C] = sc.v[j * hd + db..][..BLOCK_C].try_into().unwrap();
                    for (r, a) in acc.iter_mut().enumerate() {
                        let pv = sc.s[(ib + r) * TILE_K + j];
                        for c in 0..BLOCK_C {
                            a[c] = madd::<FMA>(pv, vr[c], a[c]);
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    sc.o[(ib + r) * hd + db..][..BLOCK_C].copy_from_slice(a);
                }
            }
            // A head size not a multiple of 16: its last dimensions one query at a time.
            for r in 0..BLOCK_R {
                let i = ib + r;
                for j in 0..nk16 {
                    let pv = sc.s[i * TILE_K + j];
                    for d in hd16..hd {
                        sc.o[i * hd + d] += pv * sc.v[j * hd + d];
                    }
                }
            }
        }
    }
    for i in 0..tq {
        let inv = if sc.l[i] == 0.0 { 0.0 } else { 1.0 / sc.l[i] };
        // SAFETY: (query t0 + i, head h) belongs to this task alone, inside `out`.
        let dst = unsafe { std::slice::from_raw_parts_mut(out.at((t0 + i) * q_dim + h * hd), hd) };
        for (d, &x) in dst.iter_mut().zip(&sc.o[i * hd..(i + 1) * hd]) {
            *d = x * inv;
        }
    }
}

/// e^x for x <= 0 (a softmax's shifted scores), branch-free so that a loop over scores
/// vectorises (`ops::exp_poly`, llama.cpp's SiLU exponential, keeps a branch for far
/// arguments and is bit-matched to it; this one serves no reference): x = n ln 2 + r with |r| <= ln 2 / 2, e^r by its degree-6 Taylor polynomial
/// (relative error under 2e-7 there), 2^n built in the exponent bits; below -87 it is 0.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * std::f32::consts::LN_2;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
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
    attention_rows_team_opts(team, q, rows, shape, AttnOpts::causal(shape.head_dim), out)
}

/// [`attention_rows_team`] with `opts`.
pub fn attention_rows_team_opts(team: &mut Team, q: &[f32], rows: &[RowKv], shape: AttnShape, opts: AttnOpts, out: &mut [f32]) {
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
            one_head(&q[t * q_dim..(t + 1) * q_dim], r.k, r.v, r.pos, shape, opts, h, o, &mut scratch);
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
fn one_head(q: &[f32], k: &[f16], v: &[f16], pos0: usize, shape: AttnShape, opts: AttnOpts, i: usize, o: &mut [f32], scratch: &mut [f16]) {
    let AttnShape { n_head, n_head_kv, head_dim } = shape;
    let q_dim = n_head * head_dim;
    let kv_dim = n_head_kv * head_dim;
    let group = n_head / n_head_kv;
    let cap = opts.softcap;
    let scale = if cap != 0.0 { opts.scale / cap } else { opts.scale };
    let (t, h) = (i / n_head, i % n_head);
    let kvh = h / group;
    let (qh, acc) = scratch.split_at_mut(head_dim);
    acc.fill(f16::ZERO);
    crate::quant::f32_to_f16_row(&q[t * q_dim + h * head_dim..][..head_dim], qh);
    let (mut m, mut s) = (f32::NEG_INFINITY, 0.0f32);
    for p in opts.first_key(pos0 + t)..=pos0 + t {
        let kr = &k[p * kv_dim + kvh * head_dim..][..head_dim];
        let mut score = crate::quant::vec_dot_f16_f16(kr, qh) * scale;
        if cap != 0.0 {
            score = cap * score.tanh();
        }
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
