//! What one CPU<->GPU exchange costs through wgpu: the floor under the hybrid's per-layer
//! synchronisation ("waiting for the GPU" and wgpu's own calls in `ember bench`'s hybrid line).
//!
//! Each round writes a token-sized vector (`queue.write_buffer`), submits a command buffer of
//! `k` dependent dispatches of a trivial kernel over it and a copy into a mappable buffer, maps
//! that buffer, waits for the mapping (spinning on non-blocking polls as the hybrid does, or
//! with one blocking poll), reads it and unmaps it. The median and 90th percentile of a round
//! are printed per `k`, and the checked values prove the dispatches ran.
//!
//! Then the host-attention exchange of the hybrid: command buffers of 8 dispatches and the
//! copy recorded ahead by a second thread (which also writes a 44 KB buffer per command
//! buffer, as the hybrid's recorder writes simulated logits), and per round two
//! `write_buffer` calls (x and xn) and the submission of the next recorded buffer, timed apart.
//!
//!     cargo run --release --example sync_latency -- [ROUNDS] [N_EMBD]

use ember::gpu::{DeviceChoice, GpuContext};
use std::time::Instant;

const SHADER: &str = r#"
@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x < arrayLength(&x)) {
        x[id.x] = x[id.x] + 1.0;
    }
}
"#;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args.get(1).map_or(2000, |s| s.parse().expect("rounds"));
    let n: usize = args.get(2).map_or(4096, |s| s.parse().expect("n_embd"));
    let ctx = GpuContext::new(&DeviceChoice::BestOrSoftware).expect("a GPU");
    println!("adapter: {}", ctx.adapter.name);
    let dev = &ctx.device;
    let bytes = 4 * n as u64;
    let x = dev.create_buffer(&wgpu::BufferDescriptor { label: Some("x"), size: bytes, usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC, mapped_at_creation: false });
    let staging = dev.create_buffer(&wgpu::BufferDescriptor { label: Some("staging"), size: bytes, usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST, mapped_at_creation: false });
    let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor { label: Some("add one"), source: wgpu::ShaderSource::Wgsl(SHADER.into()) });
    let pipeline = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor { label: Some("add one"), layout: None, module: &module, entry_point: Some("main"), compilation_options: Default::default(), cache: None });
    let bind = dev.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &pipeline.get_bind_group_layout(0), entries: &[wgpu::BindGroupEntry { binding: 0, resource: x.as_entire_binding() }] });
    let input: Vec<f32> = (0..n).map(|i| i as f32).collect();
    // `k` dependent dispatches over x, then x copied into the mappable buffer.
    let record = |k: usize| {
        let mut enc = dev.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind, &[]);
            for _ in 0..k {
                pass.dispatch_workgroups(n.div_ceil(256) as u32, 1, 1);
            }
        }
        enc.copy_buffer_to_buffer(&x, 0, &staging, 0, bytes);
        enc.finish()
    };
    for spin in [true, false] {
        for k in [0usize, 1, 4, 16] {
            let mut times = Vec::with_capacity(rounds);
            let mut submit_ns = 0u128;
            for r in 0..rounds + 50 {
                let t = Instant::now();
                ctx.queue.write_buffer(&x, 0, bytemuck::cast_slice(&input));
                let cmd = record(k);
                let ts = Instant::now();
                ctx.queue.submit([cmd]);
                let (tx, rx) = std::sync::mpsc::channel();
                staging.slice(..).map_async(wgpu::MapMode::Read, move |res| {
                    let _ = tx.send(res);
                });
                if r >= 50 {
                    submit_ns += ts.elapsed().as_nanos();
                }
                if spin {
                    spin_until_mapped(dev, &rx);
                } else {
                    dev.poll(wgpu::PollType::Wait { submission_index: None, timeout: None }).expect("poll");
                    rx.recv().unwrap().expect("map");
                }
                {
                    let view = staging.slice(..).get_mapped_range().expect("mapped");
                    let v: &[f32] = bytemuck::cast_slice(&view);
                    let (first, last) = (v[0], v[n - 1]);
                    assert_eq!((first, last), (k as f32, (n - 1) as f32 + k as f32), "the dispatches' result");
                }
                staging.unmap();
                if r >= 50 {
                    times.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
            times.sort_by(f64::total_cmp);
            let q = |f: f64| times[((times.len() - 1) as f64 * f) as usize];
            println!(
                "{} wait, {k:>2} dispatches: median {:.1} us, p10 {:.1}, p90 {:.1}; of it submit + map_async {:.1} us",
                if spin { "spin" } else { "blocking" },
                q(0.5),
                q(0.1),
                q(0.9),
                submit_ns as f64 / rounds as f64 / 1e3
            );
        }
    }
    // The hybrid's host-attention exchange, with and without a recorder thread at work.
    let xn = dev.create_buffer(&wgpu::BufferDescriptor { label: Some("xn"), size: bytes, usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST, mapped_at_creation: false });
    let sim = dev.create_buffer(&wgpu::BufferDescriptor { label: Some("sim"), size: 44 * 1024, usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST, mapped_at_creation: false });
    let sim_values = vec![0u8; 44 * 1024];
    // (recorded by: 0 this thread just before, 1 another thread ahead; the other thread's
    // 44 KB writes; at most 4 buffers ahead, else all recorded before the first round)
    for (ahead, sim_writes, concurrent) in [(false, false, false), (true, false, false), (true, true, false), (true, true, true)] {
        let (tx, rx) = std::sync::mpsc::sync_channel::<wgpu::CommandBuffer>(if concurrent { 4 } else { rounds + 50 });
        std::thread::scope(|scope| {
            let producer = scope.spawn(|| {
                if !ahead {
                    return;
                }
                for _ in 0..rounds + 50 {
                    if sim_writes {
                        ctx.queue.write_buffer(&sim, 0, &sim_values);
                    }
                    if tx.send(record(8)).is_err() {
                        return;
                    }
                }
            });
            if !concurrent {
                // Everything recorded before the first round: no thread beside the exchange.
                while !producer.is_finished() {
                    std::thread::yield_now();
                }
            }
            let (mut writes, mut submits) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
            for r in 0..rounds + 50 {
                let cmd = if ahead { rx.recv().expect("a recorded buffer") } else { record(8) };
                let t = Instant::now();
                ctx.queue.write_buffer(&x, 0, bytemuck::cast_slice(&input));
                ctx.queue.write_buffer(&xn, 0, bytemuck::cast_slice(&input));
                let ts = Instant::now();
                ctx.queue.submit([cmd]);
                let te = Instant::now();
                let (txm, rxm) = std::sync::mpsc::channel();
                staging.slice(..).map_async(wgpu::MapMode::Read, move |res| {
                    let _ = txm.send(res);
                });
                spin_until_mapped(dev, &rxm);
                staging.unmap();
                if r >= 50 {
                    writes.push((ts - t).as_secs_f64() * 1e6);
                    submits.push((te - ts).as_secs_f64() * 1e6);
                }
            }
            for v in [&mut writes, &mut submits] {
                v.sort_by(f64::total_cmp);
            }
            let q = |v: &Vec<f64>, f: f64| v[((v.len() - 1) as f64 * f) as usize];
            println!(
                "host-attention exchange, {}: two write_buffer calls median {:.1} us (p90 {:.1}), submitting a recorded buffer of 8 dispatches median {:.1} us (p90 {:.1})",
                match (ahead, sim_writes, concurrent) {
                    (false, ..) => "recorded here just before",
                    (true, false, _) => "recorded ahead by another thread",
                    (true, true, false) => "recorded ahead by another thread that also wrote 44 KB per buffer",
                    (true, true, true) => "recorded by another thread at work beside it, 44 KB writes",
                },
                q(&writes, 0.5),
                q(&writes, 0.9),
                q(&submits, 0.5),
                q(&submits, 0.9),
            );
        });
    }
}

/// Non-blocking polls until the mapping reported through `rx` is done, as the hybrid waits.
fn spin_until_mapped(dev: &wgpu::Device, rx: &std::sync::mpsc::Receiver<Result<(), wgpu::BufferAsyncError>>) {
    loop {
        dev.poll(wgpu::PollType::Poll).expect("poll");
        if let Ok(res) = rx.try_recv() {
            res.expect("map");
            return;
        }
        std::hint::spin_loop();
    }
}
