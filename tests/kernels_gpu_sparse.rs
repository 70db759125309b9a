//! The neuron-aware GPU kernels (ember::gpu::sparse) against a plain f64 reference over
//! dequantised rows, on random inputs at awkward sizes (lavapipe in CI): every weight type,
//! hot subsets of random size (empty and all included), sparsity from 0% to 100%, both select
//! criteria, overwrite and add, the subgroup and shared-memory reductions, and bit-for-bit
//! determinism across runs.

mod common;

use common::{gpu, matrix, Rng};
use ember::gguf::GgmlType;
use ember::gpu::sparse::{ActiveList, Criterion, DenseGateOp, HotFfn, MatvecMode, SelectOp, SparseAxpyOp, SparseConfig, SparseMatvecOp, AXPY_ARGS_OFFSET, LIST_HEADER_WORDS};
use ember::gpu::GpuContext;
use ember::model::{Activation, Matrix};
use wgpu::{Buffer, ComputePass};

const TYPES: [GgmlType; 5] = [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1];
/// Fractions of the hot rows that are inactive.
const SPARSITY: [f64; 5] = [0.0, 0.5, 0.9, 0.99, 1.0];

/// A random strictly ascending subset of 0..n_ff with `n` elements.
fn subset(n_ff: usize, n: usize, rng: &mut Rng) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..n_ff as u32).collect();
    for i in 0..n {
        let j = i + (rng.next_u64() % (n_ff - i) as u64) as usize;
        ids.swap(i, j);
    }
    let mut out = ids[..n].to_vec();
    out.sort_unstable();
    out
}

/// Runs what `f` encodes in one compute pass and waits.
fn run(ctx: &GpuContext, f: impl FnOnce(&mut ComputePass<'_>)) {
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
        f(&mut pass);
    }
    ctx.submit_and_wait(enc).unwrap();
}


fn fill(ctx: &GpuContext, buf: &Buffer, v: &[f32]) {
    ctx.queue.write_buffer(buf, 0, bytemuck::cast_slice(v));
}

/// The active list as the GPU wrote it: (count, chunk_rows, n_chunks, indices).
fn read_list(ctx: &GpuContext, list: &ActiveList, n_hot: usize) -> (usize, u32, u32, Vec<u32>) {
    let words: Vec<u32> = ctx.read(list.list(), LIST_HEADER_WORDS + n_hot).unwrap();
    let count = words[0] as usize;
    assert!(count <= n_hot, "count {count} > n_hot {n_hot}");
    (count, words[1], words[2], words[LIST_HEADER_WORDS..LIST_HEADER_WORDS + count].to_vec())
}

fn dot64(a: &[f32], b: &[f32]) -> (f64, f64) {
    a.iter().zip(b).fold((0.0, 0.0), |(s, m), (&p, &q)| (s + p as f64 * q as f64, m + (p as f64 * q as f64).abs()))
}

/// The gate's factor (dReLU's is ReLU's).
fn act64(act: Activation, g: f64) -> f64 {
    match act {
        Activation::Relu | Activation::Drelu => g.max(0.0),
        Activation::Silu => g / (1.0 + (-g).exp()),
        Activation::GeluTanh => unreachable!("no GPU kernel computes GeLU"),
    }
}

/// A neuron's hidden value: act(g) * u, or for dReLU relu(g) * relu(u).
fn gated64(act: Activation, g: f64, u: f64) -> f64 {
    match act {
        Activation::Drelu => g.max(0.0) * u.max(0.0),
        _ => act64(act, g) * u,
    }
}

/// |got - want| <= tol * scale, NaN never passes.
fn check(what: &str, got: f32, want: f64, scale: f64, tol: f64) -> f64 {
    let err = (got as f64 - want).abs() / scale.max(1e-30);
    assert!(err <= tol, "{what}: got {got}, want {want} (scale {scale:e}, relative error {err:e} > {tol:e})");
    err
}

/// Dequantised rows of the three matrices, neuron order.
struct Dense {
    gate: Vec<Vec<f32>>,
    up: Vec<Vec<f32>>,
    down_t: Vec<Vec<f32>>,
}

impl Dense {
    fn new(gate: &Matrix, up: &Matrix, down_t: &Matrix) -> Dense {
        let rows = |m: &Matrix| (0..m.rows).map(|r| m.row_f32(r)).collect();
        Dense { gate: rows(gate), up: rows(up), down_t: rows(down_t) }
    }
}

/// The AXPY's outputs: overwrite into `y`, add into `y_add`, which held `y0`.
struct AxpyOut<'a> {
    y: &'a [f32],
    y_add: &'a [f32],
    y0: &'a [f32],
}

/// Checks the AXPY's outputs against the f64 AXPY of the GPU's own h over the active rows.
fn check_axpy(what: &str, dense: &Dense, hot: &[u32], active: &[u32], h: &[f32], out: AxpyOut<'_>) -> f64 {
    let AxpyOut { y, y_add, y0 } = out;
    let n_embd = y.len();
    let mut worst = 0.0f64;
    if active.is_empty() {
        assert!(y.iter().all(|v| v.to_bits() == 0), "{what}: no active row, y not exactly zero");
        assert!(y_add.iter().zip(y0).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: no active row, y changed in add mode");
        return 0.0;
    }
    for j in 0..n_embd {
        let (mut s, mut m) = (0.0f64, 0.0f64);
        for &r in active {
            let t = h[r as usize] as f64 * dense.down_t[hot[r as usize] as usize][j] as f64;
            s += t;
            m += t.abs();
        }
        worst = worst.max(check(&format!("{what}: y[{j}]"), y[j], s, m, 2e-5));
        worst = worst.max(check(&format!("{what}: y_add[{j}]"), y_add[j], s + y0[j] as f64, m + (y0[j] as f64).abs(), 2e-5));
    }
    worst
}

/// The buffers and ops of one hot FFN in predictor mode.
struct PredictorRig {
    x: Buffer,
    logits: Buffer,
    h: Buffer,
    y: Buffer,
    y_add: Buffer,
    list: ActiveList,
    select: SelectOp,
    matvec: SparseMatvecOp,
    axpy: SparseAxpyOp,
    axpy_add: SparseAxpyOp,
}

impl PredictorRig {
    fn new(ctx: &GpuContext, hot: &HotFfn, act: Activation) -> PredictorRig {
        let (n_embd, n_ff, n_hot) = (hot.n_embd, hot.n_ff, hot.n_hot());
        let x = ctx.zeros("x", n_embd as u64 * 4);
        let logits = ctx.zeros("logits", n_ff as u64 * 4);
        let h = ctx.zeros("h", n_hot as u64 * 4);
        let y = ctx.zeros("y", n_embd as u64 * 4);
        let y_add = ctx.zeros("y_add", n_embd as u64 * 4);
        let list = ActiveList::new(ctx, hot);
        let select = SelectOp::new(ctx, hot, &list, Criterion::Predictor { logits: &logits, threshold: 0.0 }).unwrap();
        let matvec = SparseMatvecOp::new(ctx, hot, &list, &x, &h, MatvecMode::Gated { act }).unwrap();
        let axpy = SparseAxpyOp::new(ctx, hot, &list, &h, &y, false).unwrap();
        let axpy_add = SparseAxpyOp::new(ctx, hot, &list, &h, &y_add, true).unwrap();
        PredictorRig { x, logits, h, y, y_add, list, select, matvec, axpy, axpy_add }
    }

    fn encode(&self, pass: &mut ComputePass<'_>) {
        self.select.encode(pass);
        self.matvec.encode(pass);
        self.axpy.encode(pass);
        self.axpy_add.encode(pass);
    }
}

/// Predictor path (select by logits, gate and up per active row, AXPY) for one hot FFN at
/// every sparsity level; returns the worst relative errors of h and y.
fn check_predictor(ctx: &GpuContext, hot: &HotFfn, ids: &[u32], dense: &Dense, act: Activation, rng: &mut Rng, what: &str) -> (f64, f64) {
    let (n_embd, n_ff, n_hot) = (hot.n_embd, hot.n_ff, hot.n_hot());
    let rig = PredictorRig::new(ctx, hot, act);
    let x = rng.vec(n_embd);
    let logits = rng.vec(n_ff);
    fill(ctx, &rig.x, &x);
    fill(ctx, &rig.logits, &logits);
    // Reference dots of every hot row.
    let dots: Vec<((f64, f64), (f64, f64))> = ids.iter().map(|&id| (dot64(&dense.gate[id as usize], &x), dot64(&dense.up[id as usize], &x))).collect();
    let mut hot_logits: Vec<f32> = ids.iter().map(|&id| logits[id as usize]).collect();
    hot_logits.sort_by(|a, b| b.total_cmp(a));
    let (mut worst_h, mut worst_y) = (0.0f64, 0.0f64);
    for &sparsity in &SPARSITY {
        let k = ((1.0 - sparsity) * n_hot as f64).round() as usize;
        // The k largest hot logits pass (random logits are distinct).
        let threshold = if k == 0 { f32::INFINITY } else { hot_logits[k - 1] };
        rig.select.set_threshold(&ctx.queue, threshold);
        let y0 = rng.vec(n_embd);
        fill(ctx, &rig.y_add, &y0);
        fill(ctx, &rig.y, &vec![f32::NAN; n_embd]);
        fill(ctx, &rig.h, &vec![f32::NAN; n_hot]);
        run(ctx, |p| rig.encode(p));
        let what = format!("{what} sparsity {sparsity}");
        let (count, chunk_rows, n_chunks, active) = read_list(ctx, &rig.list, n_hot);
        let want: Vec<u32> = (0..n_hot as u32).filter(|&r| logits[ids[r as usize] as usize] >= threshold).collect();
        assert_eq!(count, k, "{what}: count");
        assert_eq!(active, want, "{what}: active list");
        assert!(n_chunks as usize * chunk_rows as usize >= count && (n_chunks as usize) * (chunk_rows as usize) < count + chunk_rows as usize, "{what}: chunks {n_chunks} x {chunk_rows} for {count}");
        let h: Vec<f32> = ctx.read(&rig.h, n_hot).unwrap();
        for r in 0..n_hot {
            if active.binary_search(&(r as u32)).is_err() {
                assert!(h[r].is_nan(), "{what}: inactive row {r} of h written");
                continue;
            }
            let ((g, gm), (u, um)) = dots[r];
            let want = gated64(act, g, u);
            // d(act(g) u) ~ |act'(g)| |dg| |u| + |act(g)| |du| with |dg| ~ eps sum |g_j x_j|,
            // |du| ~ eps sum |u_j x_j| and |act'| <= 1.1 (ReLU and SiLU).
            let scale = 1.1 * gm * u.abs() + act64(act, g).abs() * um;
            worst_h = worst_h.max(check(&format!("{what}: h[{r}]"), h[r], want, scale, 1e-5));
        }
        let y: Vec<f32> = ctx.read(&rig.y, n_embd).unwrap();
        let y_add: Vec<f32> = ctx.read(&rig.y_add, n_embd).unwrap();
        worst_y = worst_y.max(check_axpy(&what, dense, ids, &active, &h, AxpyOut { y: &y, y_add: &y_add, y0: &y0 }));
        // Run to run, bit for bit.
        fill(ctx, &rig.y_add, &y0);
        run(ctx, |p| rig.encode(p));
        let h2: Vec<f32> = ctx.read(&rig.h, n_hot).unwrap();
        let y2: Vec<f32> = ctx.read(&rig.y, n_embd).unwrap();
        let y_add2: Vec<f32> = ctx.read(&rig.y_add, n_embd).unwrap();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&h2), bits(&h), "{what}: h differs between runs");
        assert_eq!(bits(&y2), bits(&y), "{what}: y differs between runs");
        assert_eq!(bits(&y_add2), bits(&y_add), "{what}: y_add differs between runs");
    }
    (worst_h, worst_y)
}

/// Hot subset sizes: none, all, and random ones.
fn hot_sizes(n_ff: usize, rng: &mut Rng) -> Vec<usize> {
    vec![0, n_ff, 1 + (rng.next_u64() % n_ff as u64) as usize]
}

fn predictor_for_types(types: [GgmlType; 3], config: impl Fn(&GpuContext) -> SparseConfig, seed: u64) {
    predictor_for_types_at(types, config, seed, &[(1007, 96), (333, 576)]);
}

fn predictor_for_types_at(types: [GgmlType; 3], config: impl Fn(&GpuContext) -> SparseConfig, seed: u64, shapes: &[(usize, usize)]) {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(seed);
    for &(n_ff, n_embd) in shapes {
        let gate = matrix(types[0], n_ff, n_embd, &mut rng);
        let up = matrix(types[1], n_ff, n_embd, &mut rng);
        let down_t = matrix(types[2], n_ff, n_embd, &mut rng);
        let dense = Dense::new(&gate, &up, &down_t);
        for (i, n_hot) in hot_sizes(n_ff, &mut rng).into_iter().enumerate() {
            let ids = subset(n_ff, n_hot, &mut rng);
            let hot = HotFfn::upload_with(&ctx, &gate, &up, &down_t, &ids, config(&ctx)).unwrap();
            let act = [Activation::Silu, Activation::Relu, Activation::Drelu][i % 3];
            let what = format!("{types:?} n_ff {n_ff} n_embd {n_embd} hot {n_hot} {act:?}");
            let (wh, wy) = check_predictor(&ctx, &hot, &ids, &dense, act, &mut rng, &what);
            eprintln!("{what}: ok, worst relative error h {wh:.1e} y {wy:.1e}");
        }
    }
}

#[test]
fn predictor_path_f32() {
    predictor_for_types([GgmlType::F32; 3], SparseConfig::for_context, 31);
}

#[test]
fn predictor_path_f16() {
    predictor_for_types([GgmlType::F16; 3], SparseConfig::for_context, 32);
}

#[test]
fn predictor_path_q8_0() {
    predictor_for_types([GgmlType::Q8_0; 3], SparseConfig::for_context, 33);
}

#[test]
fn predictor_path_q4_0() {
    predictor_for_types([GgmlType::Q4_0; 3], SparseConfig::for_context, 34);
}

#[test]
fn predictor_path_q4_1() {
    predictor_for_types([GgmlType::Q4_1; 3], SparseConfig::for_context, 35);
}

/// The 5-bit and K-quant types as gate and up (src/gpu/kquant.rs's layout over the hot rows),
/// down_t as ember transposes it (Q8_0), against the dequantised reference.
#[test]
fn predictor_path_grouped_types() {
    for (i, ty) in [GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K].into_iter().enumerate() {
        predictor_for_types_at([ty, ty, GgmlType::Q8_0], SparseConfig::for_context, 40 + i as u64, &[(301, 512)]);
    }
}

/// Different types per matrix (down_t as ember transposes it: Q8_0), with the shared-memory
/// reductions and a small AXPY tile with many short chunks (chunk edges everywhere).
#[test]
fn predictor_path_mixed_types_fallback_shapes() {
    let config = |_: &GpuContext| SparseConfig { subgroups: false, matvec_wg: 32, axpy_cols: 4, axpy_wg: 64, min_chunk_rows: 1, max_chunks: 7 };
    predictor_for_types([GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0], config, 36);
    predictor_for_types([GgmlType::F16, GgmlType::Q8_0, GgmlType::F32], SparseConfig::for_context, 37);
}

/// A charged predictor's two lists: the candidates' gate (`MatvecMode::Gate` over the list of
/// logits >= 0), then up only for the candidates that fire (`MatvecMode::ActUp` over the list
/// of logits >= 1, a subset). Rows outside a list stay untouched; h equals what
/// `MatvecMode::Gated` gives over the firing list, bit for bit (one list or two, the same
/// sums); values against the f64 reference.
#[test]
fn gate_then_up_over_two_lists() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(45);
    let configs = [SparseConfig::for_context(&ctx), SparseConfig { subgroups: false, matvec_wg: 32, ..SparseConfig::for_context(&ctx) }];
    for (ci, config) in configs.iter().enumerate() {
        for (ti, &ty) in TYPES.iter().enumerate() {
            let (n_ff, n_embd) = if (ti + ci) % 2 == 0 { (1007, 576) } else { (333, 96) };
            let act = [Activation::Silu, Activation::Relu, Activation::Drelu][ti % 3];
            let gate = matrix(ty, n_ff, n_embd, &mut rng);
            let up = matrix(ty, n_ff, n_embd, &mut rng);
            let down_t = matrix(ty, n_ff, n_embd, &mut rng);
            let dense = Dense::new(&gate, &up, &down_t);
            let n_hot = 1 + (rng.next_u64() % n_ff as u64) as usize;
            let ids = subset(n_ff, n_hot, &mut rng);
            let hot = HotFfn::upload_with(&ctx, &gate, &up, &down_t, &ids, *config).unwrap();
            let x = rng.vec(n_embd);
            // -1: not a candidate, 0: a candidate that does not fire, 1: one that fires.
            let marks: Vec<f32> = (0..n_ff).map(|_| [-1.0f32, 0.0, 1.0][(rng.next_u64() % 3) as usize]).collect();
            let (xb, marks_b) = (ctx.zeros("x", 4 * n_embd as u64), ctx.zeros("marks", 4 * n_ff as u64));
            let (g, h, h_one) = (ctx.zeros("g", 4 * n_hot as u64), ctx.zeros("h", 4 * n_hot as u64), ctx.zeros("h one list", 4 * n_hot as u64));
            fill(&ctx, &xb, &x);
            fill(&ctx, &marks_b, &marks);
            for b in [&g, &h, &h_one] {
                fill(&ctx, b, &vec![f32::NAN; n_hot]);
            }
            let (cands, fires) = (ActiveList::new(&ctx, &hot), ActiveList::new(&ctx, &hot));
            let sel_c = SelectOp::new(&ctx, &hot, &cands, Criterion::Predictor { logits: &marks_b, threshold: 0.0 }).unwrap();
            let sel_f = SelectOp::new(&ctx, &hot, &fires, Criterion::Predictor { logits: &marks_b, threshold: 1.0 }).unwrap();
            let gate_op = SparseMatvecOp::new(&ctx, &hot, &cands, &xb, &g, MatvecMode::Gate).unwrap();
            let up_op = SparseMatvecOp::new(&ctx, &hot, &fires, &xb, &h, MatvecMode::ActUp { g: &g, act }).unwrap();
            let one = SparseMatvecOp::new(&ctx, &hot, &fires, &xb, &h_one, MatvecMode::Gated { act }).unwrap();
            run(&ctx, |p| {
                sel_c.encode(p);
                gate_op.encode(p);
                sel_f.encode(p);
                up_op.encode(p);
                one.encode(p);
            });
            let what = format!("{ty:?} {act:?} n_ff {n_ff} n_embd {n_embd} hot {n_hot} config {ci}");
            let (gv, hv, h1): (Vec<f32>, Vec<f32>, Vec<f32>) = (ctx.read(&g, n_hot).unwrap(), ctx.read(&h, n_hot).unwrap(), ctx.read(&h_one, n_hot).unwrap());
            let (mut n_c, mut n_f) = (0, 0);
            for r in 0..n_hot {
                let m = marks[ids[r] as usize];
                let ((gd, gm), (ud, um)) = (dot64(&dense.gate[ids[r] as usize], &x), dot64(&dense.up[ids[r] as usize], &x));
                if m < 0.0 {
                    assert!(gv[r].is_nan() && hv[r].is_nan(), "{what}: row {r}, not a candidate, written");
                    continue;
                }
                n_c += 1;
                check(&format!("{what}: g[{r}]"), gv[r], gd, gm, 1e-5);
                if m < 1.0 {
                    assert!(hv[r].is_nan(), "{what}: row {r}, a candidate that does not fire, has h");
                    continue;
                }
                n_f += 1;
                let scale = 1.1 * gm * ud.abs() + act64(act, gd).abs() * um;
                check(&format!("{what}: h[{r}]"), hv[r], gated64(act, gd, ud), scale, 1e-5);
                assert_eq!(hv[r].to_bits(), h1[r].to_bits(), "{what}: row {r}: two lists {} vs one {}", hv[r], h1[r]);
            }
            assert!(n_c > n_f && n_f > 0, "{what}: {n_c} candidates, {n_f} firing: the test needs both kinds");
        }
    }
}

/// ReLU path: the dense gate over the hot rows, select by its sign, up per active row, AXPY.
#[test]
fn relu_path_matches_reference() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(41);
    let configs = [SparseConfig::for_context(&ctx), SparseConfig { subgroups: false, min_chunk_rows: 3, max_chunks: 5, ..SparseConfig::for_context(&ctx) }];
    for (ci, config) in configs.iter().enumerate() {
        for (ti, &ty) in TYPES.iter().enumerate() {
            let (n_ff, n_embd) = if (ti + ci) % 2 == 0 { (1007, 576) } else { (333, 96) };
            let gate = matrix(ty, n_ff, n_embd, &mut rng);
            let up = matrix(ty, n_ff, n_embd, &mut rng);
            let down_t = matrix(ty, n_ff, n_embd, &mut rng);
            let dense = Dense::new(&gate, &up, &down_t);
            let n_hot = if ti == 0 { n_ff } else { 1 + (rng.next_u64() % n_ff as u64) as usize };
            let ids = subset(n_ff, n_hot, &mut rng);
            let hot = HotFfn::upload_with(&ctx, &gate, &up, &down_t, &ids, *config).unwrap();
            let x_buf = ctx.zeros("x", n_embd as u64 * 4);
            let g_buf = ctx.zeros("g", n_hot as u64 * 4);
            let h_buf = ctx.zeros("h", n_hot as u64 * 4);
            let y_buf = ctx.zeros("y", n_embd as u64 * 4);
            let y_add_buf = ctx.zeros("y_add", n_embd as u64 * 4);
            let list = ActiveList::new(&ctx, &hot);
            let gate_op = DenseGateOp::new(&ctx, &hot, &x_buf, &g_buf).unwrap();
            let select = SelectOp::new(&ctx, &hot, &list, Criterion::Relu { values: &g_buf }).unwrap();
            let matvec = SparseMatvecOp::new(&ctx, &hot, &list, &x_buf, &h_buf, MatvecMode::Relu { g: &g_buf }).unwrap();
            let axpy = SparseAxpyOp::new(&ctx, &hot, &list, &h_buf, &y_buf, false).unwrap();
            let axpy_add = SparseAxpyOp::new(&ctx, &hot, &list, &h_buf, &y_add_buf, true).unwrap();
            let encode = |p: &mut ComputePass<'_>| {
                gate_op.encode(p);
                select.encode(p);
                matvec.encode(p);
                axpy.encode(p);
                axpy_add.encode(p);
            };
            // A random x (about half the gates positive), then x = 0 (every gate zero: nothing
            // active, as at 100% sparsity).
            for zero_x in [false, true] {
                let x = if zero_x { vec![0.0; n_embd] } else { rng.vec(n_embd) };
                let what = format!("relu {ty:?} n_ff {n_ff} n_embd {n_embd} hot {n_hot} config {ci} x=0 {zero_x}");
                let y0 = rng.vec(n_embd);
                fill(&ctx, &x_buf, &x);
                fill(&ctx, &y_add_buf, &y0);
                fill(&ctx, &h_buf, &vec![f32::NAN; n_hot]);
                run(&ctx, encode);
                let g: Vec<f32> = ctx.read(&g_buf, n_hot).unwrap();
                let h: Vec<f32> = ctx.read(&h_buf, n_hot).unwrap();
                let mut worst_g = 0.0f64;
                for r in 0..n_hot {
                    let (want, mag) = dot64(&dense.gate[ids[r] as usize], &x);
                    worst_g = worst_g.max(check(&format!("{what}: g[{r}]"), g[r], want, mag, 1e-5));
                }
                // The list is exactly the rows whose GPU gate is positive.
                let want_active: Vec<u32> = (0..n_hot as u32).filter(|&r| g[r as usize] > 0.0).collect();
                let (count, _, _, active) = read_list(&ctx, &list, n_hot);
                assert_eq!(active, want_active, "{what}: active list");
                assert_eq!(count, want_active.len());
                if !zero_x && n_hot > 20 {
                    assert!(count > n_hot / 4 && count < n_hot * 3 / 4, "{what}: {count} of {n_hot} active");
                }
                let mut worst_h = 0.0f64;
                for r in 0..n_hot {
                    if active.binary_search(&(r as u32)).is_err() {
                        assert!(h[r].is_nan(), "{what}: inactive row {r} of h written");
                        continue;
                    }
                    let (u, um) = dot64(&dense.up[ids[r] as usize], &x);
                    let want = g[r] as f64 * u;
                    worst_h = worst_h.max(check(&format!("{what}: h[{r}]"), h[r], want, g[r].abs() as f64 * um, 1e-5));
                }
                let y: Vec<f32> = ctx.read(&y_buf, n_embd).unwrap();
                let y_add: Vec<f32> = ctx.read(&y_add_buf, n_embd).unwrap();
                let worst_y = check_axpy(&what, &dense, &ids, &active, &h, AxpyOut { y: &y, y_add: &y_add, y0: &y0 });
                // Bit for bit again.
                fill(&ctx, &y_add_buf, &y0);
                run(&ctx, encode);
                assert_eq!(ctx.read::<u32>(&y_buf, n_embd).unwrap(), bytemuck::cast_slice::<f32, u32>(&y), "{what}: y differs between runs");
                assert_eq!(ctx.read::<u32>(&y_add_buf, n_embd).unwrap(), bytemuck::cast_slice::<f32, u32>(&y_add), "{what}: y_add differs between runs");
                eprintln!("{what}: ok ({count} active), worst relative error g {worst_g:.1e} h {worst_h:.1e} y {worst_y:.1e}");
            }
        }
    }
}

/// The select kernel alone over several of its 2048-row blocks: exact ascending lists, header
/// and dispatch arguments, both criteria, every sparsity; NaN values never active.
#[test]
fn select_lists_and_dispatch_arguments() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(51);
    let n_embd = 32;
    let n_ff = 9001;
    let m = matrix(GgmlType::F32, n_ff, n_embd, &mut rng);
    let config = SparseConfig::for_context(&ctx);
    for n_hot in [0usize, 1, 2048, 2049, 6000, n_ff] {
        let ids = subset(n_ff, n_hot, &mut rng);
        let hot = HotFfn::upload_with(&ctx, &m, &m, &m, &ids, config).unwrap();
        let list = ActiveList::new(&ctx, &hot);
        let values = ctx.zeros("values", n_hot as u64 * 4);
        let logits = ctx.zeros("logits", n_ff as u64 * 4);
        let relu = SelectOp::new(&ctx, &hot, &list, Criterion::Relu { values: &values }).unwrap();
        let pred = SelectOp::new(&ctx, &hot, &list, Criterion::Predictor { logits: &logits, threshold: 0.25 }).unwrap();
        for &sparsity in &SPARSITY {
            // ReLU: a `1 - sparsity` share of positive values, the rest <= 0 (zeros and NaN
            // among them).
            let v: Vec<f32> = (0..n_hot)
                .map(|_| {
                    let on = ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64) >= sparsity;
                    match (on, rng.next_u64() % 4) {
                        (true, _) => rng.signed().abs(),
                        (false, 0) => 0.0,
                        (false, 1) => f32::NAN,
                        (false, _) => -rng.signed().abs(),
                    }
                })
                .collect();
            fill(&ctx, &values, &v);
            run(&ctx, |p| relu.encode(p));
            let want: Vec<u32> = (0..n_hot as u32).filter(|&r| v[r as usize] > 0.0).collect();
            check_list(&ctx, &hot, &list, &want, config, &format!("relu n_hot {n_hot} sparsity {sparsity}"));
            // Predictor: logits over all neurons against 0.25, NaN among them.
            let l: Vec<f32> = (0..n_ff).map(|i| if i % 97 == 5 { f32::NAN } else { rng.signed() + (0.75 - sparsity as f32) * 2.0 }).collect();
            fill(&ctx, &logits, &l);
            run(&ctx, |p| pred.encode(p));
            let want: Vec<u32> = (0..n_hot as u32).filter(|&r| l[ids[r as usize] as usize] >= 0.25).collect();
            check_list(&ctx, &hot, &list, &want, config, &format!("predictor n_hot {n_hot} sparsity {sparsity}"));
        }
    }
}

fn check_list(ctx: &GpuContext, hot: &HotFfn, list: &ActiveList, want: &[u32], config: SparseConfig, what: &str) {
    let (count, chunk_rows, n_chunks, active) = read_list(ctx, list, hot.n_hot());
    assert_eq!(count, want.len(), "{what}: count");
    assert_eq!(active, want, "{what}: list");
    let want_chunk = config.min_chunk_rows.max((count as u32).div_ceil(config.max_chunks));
    assert_eq!(chunk_rows, want_chunk, "{what}: chunk_rows");
    assert_eq!(n_chunks, (count as u32).div_ceil(want_chunk), "{what}: n_chunks");
    let args: Vec<u32> = ctx.read(list.args(), 6).unwrap();
    let units = (hot.n_embd / 4) as u32;
    let tiles = units.div_ceil(config.axpy_cols.min(units.next_power_of_two()));
    assert_eq!(args, vec![count as u32, if count == 0 { 0 } else { 1 }, 1, tiles, n_chunks, 1], "{what}: dispatch arguments");
    assert_eq!(AXPY_ARGS_OFFSET, 12);
}

/// Bad shapes and buffers are errors, not panics; gpu_bytes counts every byte.
#[test]
fn errors_and_accounting() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(61);
    let gate = matrix(GgmlType::Q4_0, 100, 64, &mut rng);
    let up = matrix(GgmlType::Q8_0, 100, 64, &mut rng);
    let down_t = matrix(GgmlType::F16, 100, 64, &mut rng);
    let wide = matrix(GgmlType::F16, 100, 96, &mut rng);
    let short = matrix(GgmlType::F16, 99, 64, &mut rng);
    let odd = matrix(GgmlType::F32, 100, 40, &mut rng);
    assert!(HotFfn::upload(&ctx, &gate, &up, &down_t, &[3, 3]).is_err(), "repeated id");
    assert!(HotFfn::upload(&ctx, &gate, &up, &down_t, &[5, 4]).is_err(), "descending ids");
    assert!(HotFfn::upload(&ctx, &gate, &up, &down_t, &[100]).is_err(), "id past n_ff");
    assert!(HotFfn::upload(&ctx, &gate, &up, &wide, &[1]).is_err(), "n_embd mismatch");
    assert!(HotFfn::upload(&ctx, &gate, &short, &down_t, &[1]).is_err(), "n_ff mismatch");
    assert!(HotFfn::upload(&ctx, &odd, &odd, &odd, &[1]).is_err(), "n_embd not a multiple of 32");

    let ids = [0u32, 7, 42, 99];
    // The context's one staging buffer is made (and counted) by its first upload: make it
    // before measuring what the hot neurons alone take.
    let _warm = ctx.upload("staging warm-up", &[0u8; 16]);
    let before = ctx.allocated_bytes();
    let hot = HotFfn::upload(&ctx, &gate, &up, &down_t, &ids).unwrap();
    assert_eq!(hot.gpu_bytes(), ctx.allocated_bytes() - before, "gpu_bytes");
    // Q4_0 row: 2 x 16 + 2 x 2 bytes; Q8_0: 64 + 4; F16: 128; id 4.
    assert_eq!(HotFfn::bytes_per_neuron(GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::F16, 64), 36 + 68 + 128 + 4);
    assert!(hot.gpu_bytes() >= 4 * (36 + 68 + 128 + 4));

    let list = ActiveList::new(&ctx, &hot);
    let small = ctx.zeros("small", 8);
    let x = ctx.zeros("x", 64 * 4);
    let h = ctx.zeros("h", 4 * 4);
    assert!(SelectOp::new(&ctx, &hot, &list, Criterion::Relu { values: &small }).is_err(), "short values");
    assert!(SelectOp::new(&ctx, &hot, &list, Criterion::Predictor { logits: &h, threshold: 0.0 }).is_err(), "logits shorter than n_ff");
    assert!(SparseMatvecOp::new(&ctx, &hot, &list, &small, &h, MatvecMode::Gated { act: Activation::Silu }).is_err(), "short x");
    assert!(SparseMatvecOp::new(&ctx, &hot, &list, &x, &x, MatvecMode::Gated { act: Activation::Silu }).is_err(), "x is h");
    assert!(SparseMatvecOp::new(&ctx, &hot, &list, &x, &h, MatvecMode::Relu { g: &h }).is_err(), "g is h");
    assert!(SparseAxpyOp::new(&ctx, &hot, &list, &h, &small, true).is_err(), "short y");
    assert!(DenseGateOp::new(&ctx, &hot, &x, &small).is_err(), "short g");
    let other = HotFfn::upload(&ctx, &gate, &up, &down_t, &[1, 2]).unwrap();
    assert!(SparseAxpyOp::new(&ctx, &other, &list, &h, &x, false).is_err(), "list of another FFN");
    let bad = SparseConfig { matvec_wg: 48, ..SparseConfig::for_context(&ctx) };
    assert!(HotFfn::upload_with(&ctx, &gate, &up, &down_t, &ids, bad).is_err(), "bad config");
}

/// Times the predictor path's kernels on a real GPU: `cargo test --release --test
/// kernels_gpu_sparse bench_sparse -- --ignored --nocapture`. Shape `EMBER_BENCH_SHAPE=n_ff,n_embd`
/// (default 11008,4096, all neurons hot), types `EMBER_BENCH_TYPES=Q4_0,Q4_0,Q8_0` (gate, up,
/// down_t). GPU time per kernel from timestamp queries (median of 30); GB/s over the bytes of
/// the rows read. Several copies of the weights rotate so that the L2 cache does not hold them.
#[test]
#[ignore]
fn bench_sparse() {
    use ember::gpu::timer::PassTimer;
    let ctx = GpuContext::new(&ember::gpu::DeviceChoice::BestOrSoftware).unwrap();
    eprintln!("adapter: {} ({:?}), subgroups {}", ctx.adapter.name, ctx.adapter.backend, ctx.has_subgroups());
    let Some(mut timer) = PassTimer::new(&ctx, 4) else { panic!("the benchmark needs timestamp queries") };
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let shape: Vec<usize> = env("EMBER_BENCH_SHAPE", "11008,4096").split(',').map(|t| t.trim().parse().unwrap()).collect();
    let (n_ff, n_embd) = (shape[0], shape[1]);
    let types: Vec<GgmlType> = env("EMBER_BENCH_TYPES", "Q4_0,Q4_0,Q8_0")
        .split(',')
        .map(|t| *TYPES.iter().find(|ty| format!("{ty:?}").eq_ignore_ascii_case(t.trim())).unwrap_or_else(|| panic!("type {t}")))
        .collect();
    let mut rng = Rng(7);
    let ids: Vec<u32> = (0..n_ff as u32).collect();
    let (gate, up, down_t) = (matrix(types[0], n_ff, n_embd, &mut rng), matrix(types[1], n_ff, n_embd, &mut rng), matrix(types[2], n_ff, n_embd, &mut rng));
    let copies = 4;
    let hots: Vec<HotFfn> = (0..copies).map(|_| HotFfn::upload(&ctx, &gate, &up, &down_t, &ids).unwrap()).collect();
    let row_bytes = |ty| HotFfn::row_bytes(ty, n_embd);
    let rigs: Vec<PredictorRig> = hots.iter().map(|h| PredictorRig::new(&ctx, h, Activation::Relu)).collect();
    let logits = rng.vec(n_ff);
    let mut sorted = logits.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    for rig in &rigs {
        fill(&ctx, &rig.x, &rng.vec(n_embd));
        fill(&ctx, &rig.logits, &logits);
    }
    for active in [0.05, 0.1, 0.25, 0.5, 1.0] {
        let k = ((active * n_ff as f64) as usize).max(1);
        for rig in &rigs {
            rig.select.set_threshold(&ctx.queue, sorted[k - 1]);
        }
        let mut times: Vec<[f64; 3]> = Vec::new();
        for i in 0..33 {
            let rig = &rigs[i % copies];
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            rig.select.encode(&mut timer.pass(&mut enc, "select"));
            rig.matvec.encode(&mut timer.pass(&mut enc, "matvec"));
            rig.axpy.encode(&mut timer.pass(&mut enc, "axpy"));
            let t = timer.finish(&ctx, enc).unwrap();
            if i >= 3 {
                times.push([t[0], t[1], t[2]]);
            }
        }
        let median = |j: usize| {
            let mut v: Vec<f64> = times.iter().map(|t| t[j]).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2] / 1000.0
        };
        let (ts, tm, ta) = (median(0), median(1), median(2));
        let mv_bytes = k as f64 * (row_bytes(types[0]) + row_bytes(types[1])) as f64;
        let ax_bytes = k as f64 * row_bytes(types[2]) as f64;
        eprintln!(
            "{types:?} {n_ff}x{n_embd}, {k} active ({:.0}%): select {ts:.1} us, matvec {tm:.1} us ({:.0} GB/s), axpy {ta:.1} us ({:.0} GB/s)",
            active * 100.0,
            mv_bytes / tm / 1000.0,
            ax_bytes / ta / 1000.0
        );
    }
}

/// What placement charges per hot neuron (`HotFfn::bytes_per_neuron`) is what the hot rows
/// take, for the grouped types too: in their own layout (the file's bytes) where the kernels
/// take them, as F16 where not (Q2_K and Q3_K; a grouped down_t).
#[test]
fn grouped_hot_rows_take_what_placement_charges() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng(0x5107);
    let (n_ff, n_embd) = (90, 512);
    for ty in [GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::Q2_K, GgmlType::Q3_K] {
        for down_ty in [GgmlType::Q8_0, ty] {
            let gate = matrix(ty, n_ff, n_embd, &mut rng);
            let up = matrix(ty, n_ff, n_embd, &mut rng);
            let down_t = matrix(down_ty, n_ff, n_embd, &mut rng);
            let ids = subset(n_ff, 37, &mut rng);
            let hot = HotFfn::upload(&ctx, &gate, &up, &down_t, &ids).unwrap();
            let charged = 37 * HotFfn::bytes_per_neuron(ty, ty, down_ty, n_embd);
            // Each of the six buffers is padded by at most 16 bytes.
            assert!(hot.gpu_bytes() >= charged && hot.gpu_bytes() <= charged + 6 * 16, "{ty:?}/{down_ty:?}: {} bytes held, {charged} charged", hot.gpu_bytes());
            if ty != GgmlType::Q2_K && ty != GgmlType::Q3_K {
                // Gate and up in the file's bytes.
                assert_eq!(HotFfn::row_bytes(ty, n_embd) as usize, gate.row_bytes(), "{ty:?}");
            }
        }
    }
}
