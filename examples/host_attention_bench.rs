//! The hybrid's host-attention half of a decoded token on its own: for every layer of a
//! model, from a q | k | v row (as the GPU hands it over) through RoPE, the KV write,
//! attention over `DEPTH` cached positions, the o product, the residual add and the FFN norm
//! (`HostAttention::run_from_qkv`), on a team of THREADS. Prints the time per layer, its
//! split (attention core / the rest) and the read rate over the o matrix and the cache.
//!
//! `parts=N` splits the products into N parts per member taken from a counter (the hybrid's
//! choice) rather than an equal share each. With `busy`, one more thread alternates 300 µs of spinning with 1 ms of
//! sleep, as the hybrid's command-recording thread does beside the team: on a machine with
//! no spare core, a team member it displaces holds up every step.
//!
//!     cargo run --release --example host_attention_bench -- MODEL THREADS [DEPTH] [busy] [parts=N]
//!
//! Give it a 7B-shaped `ember synth` model of all its layers: cycling through 32 layers keeps
//! the o matrices and caches (~590 MB at depth 544) out of the last-level cache, as decode does.

use ember::cpu::matmul::{CpuTuning, Precision};
use ember::cpu::team::Team;
use ember::engine::host_attention::HostAttention;
use ember::model::Model;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("usage: host_attention_bench MODEL THREADS [DEPTH] [busy]");
    let threads: usize = args.get(2).map_or(2, |s| s.parse().expect("THREADS: a number"));
    let depth: usize = args.get(3).map_or(544, |s| s.parse().expect("DEPTH: a number"));
    let busy = args.iter().skip(4).any(|s| s == "busy");
    let parts: usize = args.iter().skip(4).find_map(|s| s.strip_prefix("parts=")).map_or(0, |v| v.parse().expect("parts=N"));
    let model = Model::load(std::path::Path::new(path)).expect("a model");
    let hp = &model.hp;
    let (e, qd, kvd, nl) = (hp.n_embd, hp.q_dim(), hp.kv_dim(), hp.n_layer);
    let n_ctx = (depth + 64).max(hp.n_ctx_train.min(4096));
    let tuning = CpuTuning { parts_per_member: parts, ..CpuTuning::default() };
    let mut host = HostAttention::new(&model, &vec![true; nl], n_ctx).with_tuning(tuning);
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    };
    // The cache up to DEPTH, every layer, written as a prefill would.
    let k: Vec<half::f16> = (0..depth * kvd).map(|_| half::f16::from_f32(rnd())).collect();
    let v: Vec<half::f16> = (0..depth * kvd).map(|_| half::f16::from_f32(rnd())).collect();
    for il in 0..nl {
        host.store_kv(&model, il, 0, &k, &v).expect("the cache holds DEPTH positions");
    }
    let qkv: Vec<f32> = (0..qd + 2 * kvd).map(|_| rnd()).collect();
    let x0: Vec<f32> = (0..e).map(|_| rnd()).collect();
    let (mut x, mut xn) = (x0.clone(), vec![0.0f32; e]);
    let mut team = Team::new(threads);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        if busy {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    while t.elapsed() < Duration::from_micros(300) {
                        std::hint::spin_loop();
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
        }
        let o_bytes: u64 = model.layers.iter().map(|l| l.wo.bytes().len() as u64).sum();
        let kv_bytes = (nl * 2 * (depth + 1) * kvd * 2) as u64;
        for round in 0..4 {
            let core0 = host.core_secs;
            let t = Instant::now();
            let tokens = 8;
            for _ in 0..tokens {
                for il in 0..nl {
                    x.copy_from_slice(&x0);
                    host.run_from_qkv(&mut team, &model, il, depth, &qkv, &mut x, &mut xn, Precision::Llama).expect("a layer");
                }
            }
            let secs = t.elapsed().as_secs_f64() / tokens as f64;
            let core = (host.core_secs - core0) / tokens as f64;
            if round > 0 {
                println!(
                    "host attention, {threads} threads{}, {parts} parts per member, depth {depth}, {nl} layers: {:.3} ms per token ({:.3} per layer): core {:.3}, o product and the rest {:.3}; {:.1} GB/s over {:.0} MB (o {:.0} MB, cache {:.0} MB)",
                    if busy { " + a busy thread" } else { "" },
                    secs * 1e3,
                    secs * 1e3 / nl as f64,
                    core * 1e3,
                    (secs - core) * 1e3,
                    (o_bytes + kv_bytes) as f64 / secs / 1e9,
                    (o_bytes + kv_bytes) as f64 / 1e6,
                    o_bytes as f64 / 1e6,
                    kv_bytes as f64 / 1e6,
                );
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
}
