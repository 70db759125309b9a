//! The tiled CPU attention of a streamed hybrid prefill on its own: a 7B-shaped head layout
//! (32 heads of 128), a prompt batch of N tokens from an empty cache, one layer, timed. With a
//! fourth argument `decode`: one token at position N - 1 instead, by the hybrid's decode
//! attention (f32, split over heads and runs of keys) and by the CPU session's (llama.cpp's
//! f16 numerics, a head per task), with the cache's read rate.
//!
//!     cargo run --release --example attn_tiled_bench -- [N] [THREADS] [REPS] [decode]
use ember::cpu::attention::{attention_decode_team, attention_team, attention_tiled_team, AttnShape};
use ember::cpu::team::Team;
use ember::cpu::KvCache;
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).take(3).map(|a| a.parse().expect("numbers: N THREADS REPS")).collect();
    let n = *args.first().unwrap_or(&512);
    let threads = *args.get(1).unwrap_or(&1);
    let reps = *args.get(2).unwrap_or(&3);
    let shape = AttnShape { n_head: 32, n_head_kv: 32, head_dim: 128 };
    let (qd, kvd) = (shape.n_head * shape.head_dim, shape.n_head_kv * shape.head_dim);
    // A fixed pseudo-random fill (values in [-1, 1)).
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    };
    let mut cache = KvCache::new(1, n, kvd);
    for p in 0..n {
        let k: Vec<f32> = (0..kvd).map(|_| next()).collect();
        let v: Vec<f32> = (0..kvd).map(|_| next()).collect();
        cache.store(0, p, &k, &v);
    }
    let q: Vec<f32> = (0..n * qd).map(|_| 3.0 * next()).collect();
    let (k, v) = cache.layer(0);
    if std::env::args().nth(4).as_deref() == Some("decode") {
        let mut team = Team::new(threads);
        let mut out = vec![0.0f32; qd];
        let mut parts = Vec::new();
        let bytes = (2 * n * kvd * 2) as f64;
        for (name, f16) in [("f32, heads x key runs", false), ("llama.cpp's f16, a head per task", true)] {
            for r in 0..=reps {
                let t = Instant::now();
                match f16 {
                    false => attention_decode_team(&mut team, &q[..qd], k, v, n - 1, shape, &mut parts, &mut out),
                    true => attention_team(&mut team, &q[..qd], k, v, n - 1, 1, shape, &mut out),
                }
                let s = t.elapsed().as_secs_f64();
                if r > 0 {
                    println!("decode at {n} keys, {threads} threads, {name}: {:.3} ms, {:.1} GB/s of cache", 1e3 * s, bytes / s / 1e9);
                }
            }
        }
        return;
    }
    let mut out = vec![0.0f32; n * qd];
    let mut team = Team::new(threads);
    // Causal: every head's n (n + 1) / 2 scores and as many value rows, 2 flops each.
    let flops = 2.0 * 2.0 * (n * (n + 1) / 2) as f64 * shape.head_dim as f64 * shape.n_head as f64;
    for r in 0..=reps {
        let t = Instant::now();
        attention_tiled_team(&mut team, &q, k, v, 0, n, shape, &mut out);
        let s = t.elapsed().as_secs_f64();
        if r > 0 {
            println!("{n} tokens, {threads} threads: {:.1} ms, {:.1} GFLOP/s (checksum {:.6})", 1e3 * s, flops / s / 1e9, out.iter().map(|&x| x as f64).sum::<f64>());
        }
    }
}
