//! `ember bench`: llama-bench's protocol and table. `ppN`: N prompt tokens evaluated as one
//! batch; `tgN`: N tokens generated one at a time; both from an empty context, or with `-d D`
//! after D tokens already in the KV cache (`ppN @ dD`, filled by an untimed prefill before each
//! run, as llama-bench's `-d`). Each test runs once to warm up, then `--repetitions` times; t/s
//! is mean ± sample sd.

use super::Result;
use super::ModelArgs;
use crate::engine::Logits;
use clap::Args;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens of the pp test (0 = skip)
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    pub n_prompt: usize,
    /// Generated tokens of the tg test (0 = skip)
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    pub n_gen: usize,
    /// Depth: tokens already in the KV cache when each pp and tg run starts (an untimed
    /// prefill of D tokens before every run), as llama-bench's -d
    #[arg(short = 'd', long = "n-depth", value_name = "D", default_value_t = 0)]
    pub n_depth: usize,
    /// Context size the session is made for (KV cache and, in a hybrid, what the budget must
    /// hold) [default: -d plus the larger of -p and -n, plus 1]
    #[arg(short = 'c', long = "ctx-size", value_name = "N")]
    pub ctx_size: Option<usize>,
    /// tg: draw each token at this temperature with llama.cpp's default chain (top-k 40, top-p
    /// 0.95, min-p 0.05; seed 0) instead of greedy; on the GPU the draw runs there, queued as
    /// greedy decoding is
    #[arg(long = "temp", value_name = "T", default_value_t = 0.0)]
    pub temperature: f32,
    /// A tuning knob, KEY=VALUE (repeatable; overrides its EMBER_<KEY> variable). GPU kernels:
    /// decode-ahead, attn-single-max, attn-wg, mv-dec, no-fold, mv-xw, no-coop, coop (the prefill
    /// tile), mv-batch, mv-batch-kernel, mv-batch-kq, mv-batch-nt, mv-batch-pf (the batched
    /// decode); CPU products: cpu-prefetch, cpu-parts, cpu-huge, cpu-times; the hybrid's decode:
    /// hybrid-upload, hybrid-submit. An unknown key's error lists each with what it sets.
    /// E.g. --tune no-coop=1 --tune mv-dec=q4_0=kq:8:4:0:1 --tune coop=128:2:4
    #[arg(long = "tune", value_name = "KEY=VALUE", value_parser = super::parse_tune)]
    pub tune: Vec<(String, String)>,
    /// Timed repetitions of each test
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub repetitions: usize,
    /// GPU: also print per-kernel times of one decode token (timestamp queries) and the share
    /// of the token spent outside kernels
    #[arg(long)]
    pub profile: bool,
    /// Also a tg test of this many sequences decoding together (`ember serve --parallel`):
    /// each generates -n tokens, one token per sequence per step; its t/s is the aggregate
    /// (all sequences' tokens per second). On the CPU the sequences' products run as one batch
    #[arg(long, value_name = "N")]
    pub parallel: Option<usize>,
    /// GPU: measure the device's copy bandwidth (the ceiling for memory-bound kernels)
    #[arg(long)]
    pub copy_bandwidth: bool,
    /// GPU: measure the matrix-vector kernels' bandwidth on 11008x4096 and 4096x11008 matrices
    /// of each type, rotating over more matrices than the L2 cache holds; implies --copy-bandwidth
    #[arg(long)]
    pub kernels: bool,
    /// GPU: time the prefill (batched) products of a llama-7B layer at -p tokens for each
    /// weight type, portable and cooperative-matrix kernels (also part of --kernels)
    #[arg(long)]
    pub prefill_kernels: bool,
    /// GPU: time the few-token products (a batched decode's, `--parallel`) of a llama-7B layer
    /// at 1, 2, 4, 8 and 16 tokens for each weight type, checked against the tiled kernel
    #[arg(long)]
    pub batch_kernels: bool,
}

const MAX_REPETITIONS: usize = 1000;

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 { v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

pub fn bench(a: BenchArgs) -> Result<()> {
    if a.repetitions == 0 {
        return Err("--repetitions must be at least 1".into());
    }
    // Bounded so that a mistyped count ends with a message, not hours of timing.
    if a.repetitions > MAX_REPETITIONS {
        return Err(format!("--repetitions {}: at most {MAX_REPETITIONS}", a.repetitions).into());
    }
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        return Err(format!("--temp {}: use a temperature of 0 (greedy) or more", a.temperature).into());
    }
    if a.kernels || a.copy_bandwidth || a.prefill_kernels || a.batch_kernels {
        if a.model.backend == super::Backend::Cpu {
            return Err("--kernels, --prefill-kernels, --batch-kernels and --copy-bandwidth measure the GPU; they do not combine with --backend cpu".into());
        }
        return device_bench(&a);
    }
    let path = a.model.resolve_model()?;
    a.model.pool()?.install(|| -> Result<()> {
        let (model, _tokenizer) = super::load_keeping(&path, a.model.gpu_only_types())?;
        // pp and tg each start at depth -d; both must fit the trained context.
        let depth = a.n_depth;
        for (flag, n) in [("-p", a.n_prompt), ("-n", a.n_gen)] {
            if depth + n > model.hp.n_ctx_train {
                let what = if depth > 0 { format!("-d {depth} plus {flag} {n}") } else { format!("{flag} {n}") };
                return Err(format!("{what}: more than the {} the model was trained for; use at most {} in all", super::tokens(model.hp.n_ctx_train), model.hp.n_ctx_train).into());
            }
        }
        let needed = depth + a.n_prompt.max(a.n_gen) + 1;
        let n_ctx = match a.ctx_size {
            Some(c) if c < needed => return Err(format!("--ctx-size {c} cannot hold the {needed} positions that -d {depth} / -p {} / -n {} use; use --ctx-size {needed} or more", a.n_prompt, a.n_gen).into()),
            Some(c) => {
                super::check_ctx("--ctx-size", c, &model.hp)?;
                c
            }
            None => {
                let n = needed.max(16);
                super::check_ctx("-p/-n", n.min(model.hp.n_ctx_train), &model.hp)?;
                n
            }
        };
        let vocab = model.hp.n_vocab as u32;
        // Deterministic pseudo-random tokens, as llama-bench uses random ones.
        let tokens: Vec<u32> = (0..a.n_prompt.max(1) as u32).map(|i| (i.wrapping_mul(2654435761) >> 7) % vocab).collect();
        // The depth's tokens: another such sequence.
        let depth_tokens: Vec<u32> = (0..depth as u32).map(|i| (i.wrapping_add(0x5bd1).wrapping_mul(2246822519) >> 9) % vocab).collect();
        // Each run starts from an empty cache holding the depth's tokens (not timed).
        let fill = |session: &mut dyn crate::engine::Forward| -> Result<()> {
            session.reset();
            if depth > 0 {
                crate::engine::generate::prefill(session, &depth_tokens)?;
            }
            Ok(())
        };
        let at_depth = |test: String| if depth > 0 { format!("{test} @ d{depth}") } else { test };
        let n_par = a.parallel.unwrap_or(1);
        if n_par == 0 || n_par > 256 {
            return Err(format!("--parallel {n_par}: use 1 to 256 sequences").into());
        }
        let mut opts = super::backend::session_options(&a.model)?;
        opts.n_seqs = n_par;
        // A hybrid values its KV caches at the depth the timed decode reaches on average (the
        // prompt test's when there is no decode test).
        opts.kv_depth = opts.kv_depth.or(Some((depth + if a.n_gen > 0 { a.n_gen / 2 } else { a.n_prompt / 2 }).min(n_ctx)));
        opts.gpu_tuning = super::gpu_tuning(a.model.gpu_precision, &a.tune)?;
        opts.cpu_tuning = super::cpu_tuning(&a.tune)?;
        opts.hybrid_tuning = super::hybrid_tuning(&a.tune)?;
        let o = crate::engine::builder::open(&opts, model.clone(), n_ctx, &super::backend::log)?;
        let (mut session, gpu) = (o.session, o.gpu);
        // The budget covers every batch: checked after setup and after each test.
        let check = |when: &str| gpu.as_ref().map_or(Ok(()), |ctx| super::backend::check_gpu_memory(&a.model, ctx, when));
        check("setup")?;
        let size = model.file.bytes().len() as u64;
        let params: u64 = model.file.tensors().iter().map(|t| t.n_elements()).sum();
        let types: std::collections::BTreeSet<&str> = model.layers.iter().flat_map(|l| [l.wq.ty.name(), l.ffn_down.ty.name()]).collect();
        let label = format!("{} {:.0}M {}", model.hp.arch, params as f64 / 1e6, types.into_iter().collect::<Vec<_>>().join("/"));

        let mut rows = Vec::new();
        if a.n_prompt > 0 {
            let mut run = || -> Result<f64> {
                fill(session.as_mut())?;
                let t = Instant::now();
                session.forward(&tokens[..a.n_prompt], Logits::Last)?;
                Ok(a.n_prompt as f64 / t.elapsed().as_secs_f64())
            };
            run()?;
            let v = (0..a.repetitions).map(|_| run()).collect::<Result<Vec<_>>>()?;
            rows.push((at_depth(format!("pp{}", a.n_prompt)), mean_sd(&v)));
            if let Some(h) = session.as_hybrid() {
                let t = h.prefill_timing(true);
                if t.batches > 0 {
                    eprintln!("ember: hybrid prefill (batched, warm-up included), {}", t.summary());
                }
            }
            check(&format!("pp{}", a.n_prompt))?;
        }
        let rule = (a.temperature > 0.0).then(|| crate::engine::sampler::SampleRule::new(&crate::engine::SamplerConfig { temperature: a.temperature, seed: 0, ..Default::default() }));
        if a.n_gen > 0 {
            let run = |session: &mut Box<dyn crate::engine::Forward>| -> Result<f64> {
                fill(session.as_mut())?;
                let t = Instant::now();
                // Greedy or sampled decoding, each token fed back (on the GPU without a round trip).
                match &rule {
                    Some(rule) => session.decode_sampled(tokens[0], a.n_gen, rule, 0, &mut |_| true)?,
                    None => session.decode_greedy(tokens[0], a.n_gen, &mut |_| true)?,
                };
                Ok(a.n_gen as f64 / t.elapsed().as_secs_f64())
            };
            run(&mut session)?;
            // Step timers over the timed runs, when asked for (--tune cpu-times=1).
            let timed = super::tune_value(&a.tune, "cpu-times").as_deref() == Some("1");
            if let Some(s) = session.as_cpu().filter(|_| timed) {
                s.times = Some(Default::default());
            }
            let v = (0..a.repetitions).map(|_| run(&mut session)).collect::<Result<Vec<_>>>()?;
            if let Some(t) = session.as_cpu().and_then(|s| s.times.take()) {
                let per = (a.repetitions * a.n_gen) as f64;
                let t = crate::engine::forward::CpuTimes { products: t.products / per, product_bytes: (t.product_bytes as f64 / per) as u64, attention: t.attention / per, total: t.total / per };
                eprintln!("ember: CPU decode per token: {}", t.summary());
            }
            rows.push((at_depth(format!("tg{}", a.n_gen)), mean_sd(&v)));
            check(&format!("tg{}", a.n_gen))?;
            // Covers the warm-up run too (and prompts of a single token).
            if let Some(h) = session.as_hybrid() {
                let (t, syncs) = h.timing(false);
                eprintln!("ember: hybrid decode, {}", t.summary(syncs));
            }
        }
        if a.n_gen > 0 && a.parallel.is_some() {
            // Every sequence starts from an empty context with its own token and decodes -n
            // tokens, each step one batch of all of them (greedy on the host, as the server).
            let nv = model.hp.n_vocab;
            let mut run = || -> Result<f64> {
                for s in 0..n_par {
                    session.select_seq(s)?;
                    session.reset();
                }
                let mut rows: Vec<(usize, u32)> = (0..n_par).map(|s| (s, tokens[s % tokens.len()])).collect();
                let t = Instant::now();
                for _ in 0..a.n_gen {
                    let logits = session.decode_batch(&rows)?;
                    for (r, row) in rows.iter_mut().enumerate() {
                        row.1 = crate::cpu::ops::argmax(&logits[r * nv..(r + 1) * nv]).0 as u32;
                    }
                }
                Ok((n_par * a.n_gen) as f64 / t.elapsed().as_secs_f64())
            };
            run()?;
            let v = (0..a.repetitions).map(|_| run()).collect::<Result<Vec<_>>>()?;
            rows.push((format!("tg{} x{n_par}", a.n_gen), mean_sd(&v)));
            check(&format!("tg{} x{n_par}", a.n_gen))?;
            // The batched step's own kernels, at the positions the run ended on.
            if a.profile && n_par > 1 {
                if let Some(batch) = session.as_gpu_batch() {
                    let step: Vec<(usize, u32)> = (0..n_par).map(|s| (s, tokens[s % tokens.len()])).collect();
                    let pos = a.n_gen;
                    let weights = batch.weights().clone();
                    let p = batch.profile_step(&step)?;
                    println!("\nthe batched step of {n_par} sequences (`--parallel {n_par}`) at position {pos}:");
                    super::gpu_bench::print_profile(p, &weights, pos);
                }
            }
            session.select_seq(0)?;
        }
        if a.profile {
            fill(session.as_mut())?;
            // Profile a token late in the tg run's context.
            for _ in 0..a.n_gen.max(1) - 1 {
                session.forward_argmax(&tokens[..1])?;
            }
        }
        if let Some(note) = session.as_hybrid().and_then(|h| h.simulation_note().map(str::to_string)) {
            for line in note.lines() {
                println!("{line}");
            }
            println!();
        }
        println!("context {n_ctx}");
        if depth > 0 {
            println!("depth {depth}: pp and tg run after {depth} tokens already in the KV cache (an untimed prefill before each run; --parallel starts empty)");
        }
        if let Some(r) = &rule {
            println!("sampling: tg draws at temperature {} (top-k {}, top-p {}, min-p 0.05, seed {}); --parallel stays greedy", a.temperature, r.top_k, r.top_p, r.seed);
        }
        println!();
        println!("| model | size | params | backend | threads | test | t/s |");
        println!("| --- | ---: | ---: | --- | ---: | ---: | ---: |");
        for (test, (mean, sd)) in rows {
            println!(
                "| {label} | {:.2} MiB | {:.2} M | {} | {} | {test} | {mean:.2} ± {sd:.2} |",
                size as f64 / (1u64 << 20) as f64,
                params as f64 / 1e6,
                session.backend_name(),
                rayon::current_num_threads()
            );
        }
        // A CPU session with a sparse FFN counted the neurons it computed, over every run's
        // tokens (warm-ups included): the parameters they activated, as TurboSparse counts them.
        if let Some(stats) = session.as_cpu().map(|s| &s.ffn_stats).filter(|st| st.tokens.iter().any(|&t| t > 0)) {
            let active: Vec<f64> = stats.active.iter().zip(&stats.tokens).map(|(&a, &t)| a as f64 / t.max(1) as f64).collect();
            let counts = crate::sparse::accounting::ParamCounts::of(&model.file, model.hp.n_layer, model.hp.n_ff);
            println!();
            // Predict mode counts the predicted neurons; one that then does not fire costs its
            // gate row only, so charging it whole makes the figure an upper bound.
            let what = match a.model.ffn {
                super::FfnArg::Predict => "the predicted neurons, each charged a gate row, an up row and a down column (an upper bound: a mispredicted one reads its gate row only)",
                _ => "the neurons computed, each a gate row, an up row and a down column",
            };
            println!("activated (--ffn {}: {what}): {}", crate::engine::FfnMode::from(a.model.ffn).name(), counts.activated(&active).summary());
        }
        if a.profile {
            let pos = session.n_past();
            let profile = match (session.as_hybrid().is_some(), session.as_gpu().is_some()) {
                (true, _) => session.as_hybrid().map(|h| h.profile_decode(tokens[0]).map(|p| (p, h.gpu().weights.clone()))),
                (false, true) => session.as_gpu().map(|g| g.profile_decode(tokens[0]).map(|p| (p, g.weights.clone()))),
                _ => None,
            };
            match profile {
                Some(p) => {
                    let (p, weights) = p?;
                    super::gpu_bench::print_profile(p, &weights, pos);
                }
                None => eprintln!("ember: --profile needs the GPU backend (--backend gpu)"),
            }
        }
        Ok(())
    })
}

fn device_bench(a: &BenchArgs) -> Result<()> {
    let choice = a.model.device.as_deref().map(|d| d.parse().unwrap()).unwrap_or(crate::gpu::DeviceChoice::BestOrSoftware);
    let ctx = crate::gpu::GpuContext::new(&choice)?.with_tuning(super::gpu_tuning(a.model.gpu_precision, &a.tune)?)?;
    println!("device: {} ({:?}, {:?}), driver {}", ctx.adapter.name, ctx.adapter.backend, ctx.adapter.device_type, ctx.adapter.driver);
    let (engine, shader) = super::gpu_bench::copy_bandwidth(&ctx)?;
    let copy = engine.max(shader);
    println!("copy bandwidth: {copy:.0} GB/s (bytes read + written per second over 1 GiB: copy engine {engine:.0}, shader copy {shader:.0})");
    if a.kernels {
        println!("\nmedian µs per dispatch: back to back with a barrier between dispatches (as in a forward pass), and streaming (no barrier: the kernel's own rate)\n");
        println!("| kernel | shape (rows x cols) | weight MiB | back to back µs | GB/s | of copy bandwidth | streaming µs | GB/s | of copy bandwidth |");
        println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for r in super::gpu_bench::kernel_bandwidth(&ctx)? {
            let stream_gbps = r.bytes as f64 / r.stream_us / 1e3;
            println!(
                "| matvec {}{} | {} x {} | {:.1} | {:.1} | {:.0} | {:.0}% | {:.1} | {:.0} | {:.0}% |",
                r.ty,
                r.what,
                r.rows,
                r.cols,
                r.bytes as f64 / (1u64 << 20) as f64,
                r.median_us,
                r.gbps,
                100.0 * r.gbps / copy,
                r.stream_us,
                stream_gbps,
                100.0 * stream_gbps / copy
            );
        }
    }
    if a.kernels || a.prefill_kernels {
        super::gpu_bench::prefill_products(&ctx, a.n_prompt)?;
    }
    if a.batch_kernels {
        super::gpu_bench::batch_products(&ctx)?;
    }
    Ok(())
}
