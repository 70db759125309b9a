//! Neuron-aware FFN kernels for one token (decode), PowerInfer-style.
//!
//! Neuron i of a gated FFN `down(act(gate·x) * (up·x))` is row i of gate, row i of up and row i
//! of the transposed `down_t`. [`HotFfn`] holds the rows of the *hot* neurons (those placed on
//! the GPU) in a compact layout; the ops below run over them in one compute pass:
//!
//! ```text
//! ReLU model, gate computed densely over the hot rows:
//!   DenseGateOp     g[r] = gate_hot[r] · x                         (every hot row r)
//!   SelectOp        list = { r : g[r] > 0 } (ascending) + dispatch arguments
//!   SparseMatvecOp  h[r] = relu(g[r]) * (up_hot[r] · x)            (r in list)
//!   SparseAxpyOp    y (+)= Σ_{r in list} h[r] * down_t_hot[r]
//! With a predictor (logits over all n_ff neurons computed elsewhere):
//!   SelectOp        list = { r : logits[hot_ids[r]] >= threshold }
//!   SparseMatvecOp  h[r] = act(gate_hot[r] · x) * (up_hot[r] · x)  (r in list)
//!   SparseAxpyOp    as above
//! ```
//!
//! A prefill batch runs every hot row instead, densely ([`BatchFfnOp`]: tiled products over
//! the same layout for many tokens at once).
//!
//! The list's length is known only on the GPU: [`SelectOp`] writes the indirect dispatch
//! arguments of the matvec and the AXPY into [`ActiveList::args`], so nothing is read back and
//! every bind group is built once. Everything is deterministic bit for bit: the list is
//! compacted with workgroup prefix sums (no atomics), and every float sum has a fixed order.
//!
//! # Layout
//! Each hot matrix is `n_hot` rows of `n_embd` values, rows contiguous, quants split from
//! scales so that every load is aligned: `quants` is `array<vec4<u32>>`, a row being `units`
//! 16-byte units (F32: 4 values, F16: 8, Q8_0: half a block, Q4_0/Q4_1: a block, in GGUF
//! nibble order); `scales` holds the blocks' f16 scales two to a word (Q8_0, Q4_0) or
//! `d | m << 16` per block (Q4_1), and is a 4-byte placeholder for F32 and F16. A workgroup
//! always reads whole runs of a row, so the bytes read are those of the active rows.
//!
//! # Buffers the caller provides (f32 unless said)
//! - `x`: the FFN input (after its norm), `n_embd` values.
//! - `g` (ReLU path): `n_hot` values, compact row order (DenseGateOp writes it).
//! - `logits` (predictor path): `n_ff` values, neuron order.
//! - `h`: `n_hot` values, compact row order; only the active rows are written.
//! - `y`: `n_embd` values, overwritten or added to.

use super::ops::{Kernel, MAX_GROUPS};
use super::{GpuContext, GpuError, ShaderSpec};
use super::shaders::compose;
use crate::gguf::GgmlType;
use crate::model::{Activation, Matrix};
use wgpu::{Buffer, ComputePass};

const SELECT: &str = compose!("sparse_select.wgsl");
// The gather matvec takes exp_poly from act.wgsl, the activations' one copy of it.
const MATVEC: &str = compose!("dequant_q4.wgsl", "dequant_q8.wgsl", "kquant_scales.wgsl", "sparse_matvec.wgsl", "sparse_grouped.wgsl", "act.wgsl");
const MATVEC_SG: &str = compose!("dequant_q4.wgsl", "dequant_q8.wgsl", "kquant_scales.wgsl", "sparse_matvec.wgsl", "sparse_grouped.wgsl", "sparse_matvec_sg.wgsl", "act.wgsl");
pub(super) const AXPY: &str = compose!("dequant_q4.wgsl", "dequant_q8.wgsl", "sparse_axpy.wgsl");
pub(super) const BATCH: &str = compose!("kquant_scales.wgsl", "sparse_batch.wgsl", "sparse_grouped.wgsl");

/// (file name, source) of this module's kernels; the subgroup file is listed composed after
/// the matvec file it extends.
pub const SHADERS: &[(&str, &str)] = &[("sparse_select.wgsl", SELECT), ("sparse_matvec.wgsl", MATVEC), ("sparse_matvec_sg.wgsl", MATVEC_SG), ("sparse_axpy.wgsl", AXPY), ("sparse_batch.wgsl", BATCH), ("sparse_grouped.wgsl", BATCH)];

/// Hot rows per workgroup of the select kernel (256 threads x 8 rows, `SEL_BLOCK`).
const SELECT_BLOCK: u32 = 2048;
/// Byte offsets in [`ActiveList::args`] of the matvec's and the AXPY's dispatch arguments.
pub const MATVEC_ARGS_OFFSET: u64 = 0;
pub const AXPY_ARGS_OFFSET: u64 = 12;
/// u32 words before the indices in [`ActiveList::list`].
pub const LIST_HEADER_WORDS: usize = 4;

/// Launch shapes of the sparse kernels (tuning knobs; [`SparseConfig::for_context`] is the
/// default).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseConfig {
    /// Threads per row of the matvecs (a power of two, 32 to 256).
    pub matvec_wg: u32,
    /// Reduce the matvecs with subgroup operations (only where the adapter has them).
    pub subgroups: bool,
    /// Threads of an AXPY workgroup (a power of two).
    pub axpy_wg: u32,
    /// Most column threads (16-byte units of a row) per AXPY workgroup; the rest of the
    /// workgroup are row lanes. A power of two.
    pub axpy_cols: u32,
    /// The AXPY's chunks of the list hold at least this many rows...
    pub min_chunk_rows: u32,
    /// ...and there are at most this many (the partial-sum scratch is max_chunks x n_embd).
    pub max_chunks: u32,
}

impl SparseConfig {
    pub fn for_context(ctx: &GpuContext) -> SparseConfig {
        SparseConfig { matvec_wg: 128, subgroups: ctx.has_subgroups(), axpy_wg: 256, axpy_cols: 16, min_chunk_rows: 32, max_chunks: 64 }
    }

    fn check(&self, ctx: &GpuContext) -> Result<(), GpuError> {
        let max_wg = ctx.limits.max_compute_invocations_per_workgroup;
        let ok = self.matvec_wg.is_power_of_two()
            && (32..=256).contains(&self.matvec_wg)
            && self.matvec_wg <= max_wg
            && self.axpy_wg.is_power_of_two()
            && self.axpy_wg <= max_wg
            && self.axpy_cols.is_power_of_two()
            && self.axpy_cols <= self.axpy_wg
            && self.min_chunk_rows >= 1
            && (1..=MAX_GROUPS).contains(&self.max_chunks);
        if ok {
            Ok(())
        } else {
            Err(GpuError::Unsupported(format!("sparse kernels: bad launch configuration {self:?}")))
        }
    }
}

/// The kernels' code for a weight type (`T_*` in the shaders).
fn type_code(ty: GgmlType) -> Option<u32> {
    Some(match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q8_0 => 2,
        GgmlType::Q4_0 => 3,
        GgmlType::Q4_1 => 4,
        // The grouped types in `gpu::kquant`'s layout: gate and up only (the AXPY over down_t
        // takes the first five; a grouped down_t is gathered as F16).
        GgmlType::Q5_0 => 5,
        GgmlType::Q5_1 => 6,
        GgmlType::Q4_K => 7,
        GgmlType::Q5_K => 8,
        GgmlType::Q6_K => 9,
        _ => return None,
    })
}

/// The type hot rows of `ty` are held in: their own, or F16 where the kernels reading them
/// (`grouped`: the matvecs, which take the grouped types; else the AXPY) have none for it.
fn gathered_type(ty: GgmlType, grouped: bool) -> GgmlType {
    if type_code(ty).is_none() || (!grouped && super::kquant::is_grouped(ty)) {
        GgmlType::F16
    } else {
        ty
    }
}

/// Values per 16-byte unit of quants.
fn unit_values(ty: GgmlType) -> usize {
    match ty {
        GgmlType::F32 => 4,
        GgmlType::F16 => 8,
        GgmlType::Q8_0 => 16,
        _ => 32,
    }
}

/// (quant bytes, scale bytes) of one row of `cols` values in the GPU layout.
fn row_layout(ty: GgmlType, cols: usize) -> (usize, usize) {
    if super::kquant::is_grouped(ty) && type_code(ty).is_some() {
        return super::kquant::layout_bytes(ty, cols);
    }
    let blocks = cols / 32;
    let scales = match ty {
        GgmlType::Q8_0 | GgmlType::Q4_0 => blocks * 2,
        GgmlType::Q4_1 => blocks * 4,
        _ => 0,
    };
    (cols / unit_values(ty) * 16, scales)
}

/// Bytes of the scale prefix of a GGUF block (split off into `scales`).
fn block_split(ty: GgmlType) -> Option<(usize, usize)> {
    match ty {
        GgmlType::Q8_0 => Some((34, 2)),
        GgmlType::Q4_0 => Some((18, 2)),
        GgmlType::Q4_1 => Some((20, 4)),
        _ => None,
    }
}

/// (quant bytes, scale bytes) of one row of `cols` values of type `ty` in the GPU layout
/// (see the module docs); scales are 0 bytes for F32 and F16.
pub fn row_parts(ty: GgmlType, cols: usize) -> (usize, usize) {
    row_layout(ty, cols)
}

/// Writes rows `ids` of `m` (a type the kernels take, its columns a multiple of 32) in the
/// GPU layout: row after row, quants into `quants` and block scales into `scales`, each
/// `ids.len()` times [`row_parts`] long at least (bytes past that are left alone). What
/// [`HotFfn::upload`] uploads, and what a prefill batch streams into a mapped buffer.
pub fn pack_rows(m: &Matrix, ids: &[u32], quants: &mut [u8], scales: &mut [u8]) {
    debug_assert!(packable(m.ty), "{} rows are not laid out row by row", m.ty.name());
    let (qb, sb) = row_layout(m.ty, m.cols);
    let row_bytes = m.row_bytes();
    let bytes = m.bytes();
    for (k, &id) in ids.iter().enumerate() {
        let row = &bytes[id as usize * row_bytes..(id as usize + 1) * row_bytes];
        let (q, s) = (&mut quants[k * qb..(k + 1) * qb], &mut scales[k * sb..(k + 1) * sb]);
        match block_split(m.ty) {
            None => q.copy_from_slice(row),
            Some((block, scale)) => {
                let qpb = block - scale;
                for (j, b) in row.chunks_exact(block).enumerate() {
                    s[j * scale..(j + 1) * scale].copy_from_slice(&b[..scale]);
                    q[j * qpb..(j + 1) * qpb].copy_from_slice(&b[scale..]);
                }
            }
        }
    }
}

/// Whether rows of `ty` are laid out row after row ([`pack_rows`] packs them): the types with
/// sparse kernels but the grouped ones (`gpu::kquant`, whose high bits and scales follow all
/// the rows).
pub fn packable(ty: GgmlType) -> bool {
    type_code(ty).is_some() && !super::kquant::is_grouped(ty)
}

/// The hot rows of one matrix in the GPU layout (see the module docs).
pub struct HotRows {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    quants: Buffer,
    scales: Buffer,
}

impl HotRows {
    /// `grouped`: whether the kernels reading these rows take the grouped types (the matvecs
    /// do, the AXPY does not).
    fn gather(ctx: &GpuContext, m: &Matrix, hot: &[u32], what: &str, grouped: bool) -> Result<HotRows, GpuError> {
        if gathered_type(m.ty, grouped) != m.ty {
            // No sparse kernel for the type (the AXPY over a grouped down_t, which ember's own
            // transposes never are): its hot rows become F16.
            let rb = m.row_bytes();
            let mut values = vec![0.0f32; m.cols];
            let mut bytes = Vec::with_capacity(hot.len() * m.cols * 2);
            for &id in hot {
                crate::quant::dequantize(m.ty, &m.bytes()[id as usize * rb..(id as usize + 1) * rb], &mut values)
                    .map_err(|e| GpuError::Unsupported(format!("hot FFN rows: {}: no sparse GPU kernel for {} weights ({e})", m.name, m.ty.name())))?;
                bytes.extend(values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()));
            }
            let rows: Vec<u32> = (0..hot.len() as u32).collect();
            return Self::gather(ctx, &Matrix::from_raw(&m.name, hot.len(), m.cols, GgmlType::F16, &bytes), &rows, what, grouped);
        }
        let (qb, sb) = row_layout(m.ty, m.cols);
        let limit = ctx.max_binding().min(ctx.limits.max_buffer_size);
        let total = hot.len() as u64 * qb as u64;
        if total > limit {
            return Err(GpuError::Unsupported(format!(
                "{}: {} hot rows of {what} take {} MiB, more than the {} MiB this GPU binds at once",
                m.name,
                hot.len(),
                total >> 20,
                limit >> 20
            )));
        }
        let row_bytes = m.row_bytes();
        let bytes = m.bytes();
        if super::kquant::is_grouped(m.ty) && type_code(m.ty).is_some() {
            // The hot rows in the file's blocks, then the grouped layout of gpu/kquant.rs over
            // them (its high-bit and scale segments start after the hot rows' groups).
            let mut rows = Vec::with_capacity(hot.len() * row_bytes);
            for &id in hot {
                rows.extend_from_slice(&bytes[id as usize * row_bytes..(id as usize + 1) * row_bytes]);
            }
            let (mut quants, scales) = super::kquant::repack(m.ty, &rows);
            quants.resize(quants.len().max(16), 0);
            let label = format!("{} hot {what}", m.name);
            return Ok(HotRows { ty: m.ty, rows: hot.len(), cols: m.cols, quants: ctx.upload(&label, &quants), scales: ctx.upload(&format!("{label} scales"), &scales) });
        }
        let mut quants = vec![0u8; hot.len() * qb];
        let mut scales = vec![0u8; hot.len() * sb];
        pack_rows(m, hot, &mut quants, &mut scales);
        // An empty matrix still binds one unit (`array<vec4<u32>>`'s smallest binding).
        quants.resize(quants.len().max(16), 0);
        let label = format!("{} hot {what}", m.name);
        Ok(HotRows { ty: m.ty, rows: hot.len(), cols: m.cols, quants: ctx.upload(&label, &quants), scales: ctx.upload(&format!("{label} scales"), &scales) })
    }

    /// The quants buffer (`rows` x [`row_parts`].0 bytes, at least 16).
    pub fn quants(&self) -> &Buffer {
        &self.quants
    }

    /// The scales buffer (`rows` x [`row_parts`].1 bytes, at least 4).
    pub fn scales(&self) -> &Buffer {
        &self.scales
    }

    /// 16-byte units per row.
    fn units(&self) -> u32 {
        (self.cols / unit_values(self.ty)) as u32
    }

    fn code(&self) -> u32 {
        type_code(self.ty).expect("gathered types have kernels")
    }

    pub fn gpu_bytes(&self) -> u64 {
        self.quants.size() + self.scales.size()
    }
}

/// The hot neurons of one FFN on the GPU: compact copies of their gate, up and down_t rows and
/// their ids (`hot_ids`: n_hot u32, ascending neuron ids; compact row r is neuron hot_ids[r]).
pub struct HotFfn {
    pub n_embd: usize,
    pub n_ff: usize,
    pub gate: HotRows,
    pub up: HotRows,
    pub down_t: HotRows,
    hot_ids: Buffer,
    config: SparseConfig,
}

impl HotFfn {
    /// Gathers rows `hot` (strictly ascending neuron ids below n_ff; any number, none or all)
    /// of gate and up (n_ff x n_embd) and of the transposed down matrix down_t (n_ff x n_embd)
    /// and uploads them. Types: F32, F16, Q8_0, Q4_0, Q4_1 (gate and up also Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), each matrix its own; n_embd a
    /// multiple of 32; Q5_0, Q5_1, Q4_K, Q5_K and Q6_K gate and up rows in `gpu::kquant`'s
    /// layout (a down_t of those types is gathered as F16: the AXPY has no kernel for them).
    pub fn upload(ctx: &GpuContext, gate: &Matrix, up: &Matrix, down_t: &Matrix, hot: &[u32]) -> Result<HotFfn, GpuError> {
        Self::upload_with(ctx, gate, up, down_t, hot, SparseConfig::for_context(ctx))
    }

    /// [`upload`](Self::upload) with chosen launch shapes (tests, benchmarks).
    #[doc(hidden)]
    pub fn upload_with(ctx: &GpuContext, gate: &Matrix, up: &Matrix, down_t: &Matrix, hot: &[u32], config: SparseConfig) -> Result<HotFfn, GpuError> {
        config.check(ctx)?;
        let bad = |why: String| Err(GpuError::Unsupported(format!("hot FFN rows: {why}")));
        let (n_ff, n_embd) = (gate.rows, gate.cols);
        for m in [gate, up, down_t] {
            if type_code(m.ty).is_none() && !super::matrix::GPU_TYPES.contains(&m.ty) {
                return bad(format!("{}: no sparse GPU kernel for {} weights", m.name, m.ty.name()));
            }
            if m.rows != n_ff || m.cols != n_embd {
                return bad(format!("{} is {}x{}, gate {n_ff}x{n_embd} (down must be given transposed, n_ff x n_embd)", m.name, m.rows, m.cols));
            }
        }
        if n_embd == 0 || !n_embd.is_multiple_of(32) {
            return bad(format!("n_embd {n_embd} is not a positive multiple of 32"));
        }
        if let Some(w) = hot.windows(2).find(|w| w[0] >= w[1]) {
            return bad(format!("neuron ids are not strictly ascending ({} then {})", w[0], w[1]));
        }
        if let Some(&last) = hot.last() {
            if last as usize >= n_ff {
                return bad(format!("neuron id {last} is not below n_ff = {n_ff}"));
            }
        }
        if hot.len() as u64 > MAX_GROUPS as u64 * SELECT_BLOCK as u64 || hot.len().checked_mul(n_embd).is_none_or(|n| n > u32::MAX as usize / 2) {
            return bad(format!("{} hot rows of {n_embd} values are too many for 32-bit indexing", hot.len()));
        }
        Ok(HotFfn {
            n_embd,
            n_ff,
            gate: HotRows::gather(ctx, gate, hot, "gate", true)?,
            up: HotRows::gather(ctx, up, hot, "up", true)?,
            down_t: HotRows::gather(ctx, down_t, hot, "down_t", false)?,
            hot_ids: ctx.upload("hot ids", bytemuck::cast_slice(hot)),
            config,
        })
    }

    /// An FFN of `rows` neurons over buffers the caller fills (a streaming area's slot): for
    /// each of gate, up and down_t its type and (quants, scales) buffers, of at least `rows`
    /// rows in the layout of [`row_parts`] (the quants at least 16 bytes, the scales 4). The
    /// neurons' ids are not kept (the batch op needs none). Types and sizes as
    /// [`upload`](Self::upload) takes them.
    pub fn over_buffers(ctx: &GpuContext, n_embd: usize, rows: usize, parts: [(GgmlType, &Buffer, &Buffer); 3]) -> Result<HotFfn, GpuError> {
        let bad = |why: String| Err(GpuError::Unsupported(format!("streamed FFN rows: {why}")));
        if n_embd == 0 || !n_embd.is_multiple_of(32) {
            return bad(format!("n_embd {n_embd} is not a positive multiple of 32"));
        }
        if rows.checked_mul(n_embd).is_none_or(|n| n > u32::MAX as usize / 2) {
            return bad(format!("{rows} rows of {n_embd} values are too many for 32-bit indexing"));
        }
        let mut hot = Vec::with_capacity(3);
        for (ty, quants, scales) in parts {
            if type_code(ty).is_none() {
                return bad(format!("no sparse GPU kernel for {} weights", ty.name()));
            }
            let (qb, sb) = row_layout(ty, n_embd);
            if quants.size() < (rows * qb).max(16) as u64 || scales.size() < (rows * sb).max(4) as u64 {
                return bad(format!("buffers of {} and {} bytes hold fewer than {rows} rows of {} values", quants.size(), scales.size(), ty.name()));
            }
            hot.push(HotRows { ty, rows, cols: n_embd, quants: quants.clone(), scales: scales.clone() });
        }
        let mut it = hot.into_iter();
        let (gate, up, down_t) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        Ok(HotFfn { n_embd, n_ff: rows, gate, up, down_t, hot_ids: ctx.zeros("streamed ids (unused)", 4), config: SparseConfig::for_context(ctx) })
    }

    /// GPU bytes one hot neuron takes in this layout (its three rows and its id): what
    /// placement charges per neuron, before the ops' per-row buffers (`g`, `h`, the list).
    pub fn bytes_per_neuron(gate: GgmlType, up: GgmlType, down_t: GgmlType, n_embd: usize) -> u64 {
        Self::row_bytes(gathered_type(gate, true), n_embd) + Self::row_bytes(gathered_type(up, true), n_embd) + Self::row_bytes(gathered_type(down_t, false), n_embd) + 4
    }

    /// GPU bytes of one hot row of `n_embd` values of type `ty` (quants and scales): what a
    /// kernel reads per active row.
    pub fn row_bytes(ty: GgmlType, n_embd: usize) -> u64 {
        let (q, s) = row_layout(ty, n_embd);
        (q + s) as u64
    }

    pub fn n_hot(&self) -> usize {
        self.gate.rows
    }

    /// The neuron id of each compact row (n_hot u32).
    pub fn hot_ids(&self) -> &Buffer {
        &self.hot_ids
    }

    /// Every byte this upload allocated.
    pub fn gpu_bytes(&self) -> u64 {
        self.gate.gpu_bytes() + self.up.gpu_bytes() + self.down_t.gpu_bytes() + self.hot_ids.size()
    }

    /// Column threads and row lanes of an AXPY workgroup, and its column tiles.
    fn axpy_shape(&self) -> (u32, u32, u32) {
        let units = self.down_t.units();
        let tc = self.config.axpy_cols.min(units.next_power_of_two());
        (tc, self.config.axpy_wg / tc, units.div_ceil(tc))
    }
}

/// The active rows of one token: `list` is `[count, chunk_rows, n_chunks, 0, r_0, r_1, ...]`
/// (u32; compact row indices, ascending; room for n_hot) and `args` the indirect dispatch
/// arguments [`SelectOp`] writes for [`SparseMatvecOp`] (at [`MATVEC_ARGS_OFFSET`]: one
/// workgroup per row, 2D past 65535) and [`SparseAxpyOp`] (at [`AXPY_ARGS_OFFSET`]: column
/// tiles x chunks). The AXPY cuts the list into `n_chunks` chunks of `chunk_rows` entries.
pub struct ActiveList {
    list: Buffer,
    args: Buffer,
    n_hot: usize,
}

impl ActiveList {
    pub fn new(ctx: &GpuContext, hot: &HotFfn) -> ActiveList {
        let list = ctx.zeros("sparse list", (LIST_HEADER_WORDS + hot.n_hot()) as u64 * 4);
        let args = ctx.indirect_args("sparse dispatch args", 32);
        ActiveList { list, args, n_hot: hot.n_hot() }
    }

    pub fn list(&self) -> &Buffer {
        &self.list
    }

    pub fn args(&self) -> &Buffer {
        &self.args
    }

    pub fn gpu_bytes(&self) -> u64 {
        self.list.size() + self.args.size()
    }
}

fn check_len(what: &str, buf: &Buffer, values: usize) -> Result<(), GpuError> {
    if buf.size() < values as u64 * 4 {
        return Err(GpuError::Unsupported(format!("sparse kernels: {what} holds {} bytes, fewer than its {values} values", buf.size())));
    }
    Ok(())
}

fn check_distinct(a: (&str, &Buffer), b: (&str, &Buffer)) -> Result<(), GpuError> {
    if a.1 == b.1 {
        return Err(GpuError::Unsupported(format!("sparse kernels: {} and {} must be different buffers", a.0, b.0)));
    }
    Ok(())
}

fn check_list(hot: &HotFfn, list: &ActiveList) -> Result<(), GpuError> {
    if list.n_hot != hot.n_hot() {
        return Err(GpuError::Unsupported(format!("sparse kernels: the active list has room for {} rows, the FFN {} hot rows", list.n_hot, hot.n_hot())));
    }
    Ok(())
}

/// A 2D grid of `n` workgroups: x up to 65535, the rest in y (kernels skip the excess).
fn grid(n: u32) -> (u32, u32) {
    if n <= MAX_GROUPS {
        (n, 1)
    } else {
        (MAX_GROUPS, n.div_ceil(MAX_GROUPS))
    }
}

/// The matvec kernel's entry point `entry` (its subgroup variant where the config says) for
/// `hot`'s types.
fn matvec_spec(hot: &HotFfn, act: u32, entry: &str) -> ShaderSpec {
    let cfg = &hot.config;
    let consts = [("TYPE_A", hot.gate.code()), ("TYPE_B", hot.up.code()), ("MV_WG", cfg.matvec_wg), ("ACT", act)];
    let spec = if cfg.subgroups { ShaderSpec::new("sparse/matvec_sg", MATVEC_SG, format!("{entry}_sg")) } else { ShaderSpec::new("sparse/matvec", MATVEC, entry) };
    spec.with_all(&consts)
}

/// Entry point `entry` of the batch kernels for weights of type codes `a` and `b`, activation
/// `act`.
fn batch_spec(entry: &str, a: u32, b: u32, act: u32) -> ShaderSpec {
    ShaderSpec::new("sparse/batch", BATCH, entry).with_all(&[("TYPE_A", a), ("TYPE_B", b), ("ACT", act)])
}

fn matvec_params(ctx: &GpuContext, hot: &HotFfn) -> Buffer {
    ctx.uniform("sparse matvec params", bytemuck::cast_slice(&[hot.n_hot() as u32, hot.gate.units(), hot.up.units(), 0]))
}

/// `g[r] = gate_hot[r] · x` for every hot row r: the dense gate over the compact gate rows
/// whose signs the ReLU criterion selects by. One workgroup per row.
pub struct DenseGateOp {
    kernel: Kernel,
    n_hot: u32,
    _params: Buffer,
}

impl DenseGateOp {
    /// `x`: n_embd f32; `g`: n_hot f32 (written).
    pub fn new(ctx: &GpuContext, hot: &HotFfn, x: &Buffer, g: &Buffer) -> Result<DenseGateOp, GpuError> {
        check_len("x", x, hot.n_embd)?;
        check_len("g", g, hot.n_hot())?;
        check_distinct(("x", x), ("g", g))?;
        let params = matvec_params(ctx, hot);
        let w = [&hot.gate.quants, &hot.gate.scales, &hot.up.quants, &hot.up.scales];
        let kernel = Kernel::new(ctx, &matvec_spec(hot, 0, "dense"), &[(0, x), (2, g), (4, &params), (5, w[0]), (6, w[1]), (7, w[2]), (8, w[3])]);
        Ok(DenseGateOp { kernel, n_hot: hot.n_hot() as u32, _params: params })
    }

    /// Bytes of the op's own buffers.
    pub fn gpu_bytes(&self) -> u64 {
        self._params.size()
    }

    pub fn encode(&self, pass: &mut ComputePass<'_>) {
        if self.n_hot == 0 {
            return;
        }
        let (gx, gy) = grid(self.n_hot);
        self.kernel.bind(pass);
        pass.dispatch_workgroups(gx, gy, 1);
    }
}

/// Which hot rows are active.
#[derive(Clone, Copy, Debug)]
pub enum Criterion<'a> {
    /// `values[r] > 0` for compact row r (`values`: n_hot f32, e.g. [`DenseGateOp`]'s `g`).
    Relu { values: &'a Buffer },
    /// `logits[hot_ids[r]] >= threshold` (`logits`: n_ff f32, a predictor's output over all
    /// neurons). The threshold can be changed later with [`SelectOp::set_threshold`].
    Predictor { logits: &'a Buffer, threshold: f32 },
}

/// Compacts the active hot rows into [`ActiveList`] (ascending, deterministic: workgroup
/// prefix sums, no atomics) and writes the next kernels' dispatch arguments. NaN is never
/// active. Workgroups of 256 threads over blocks of 2048 rows; each also counts the active
/// rows of the blocks before its own.
pub struct SelectOp {
    kernel: Kernel,
    groups: u32,
    params: Buffer,
}

impl SelectOp {
    pub fn new(ctx: &GpuContext, hot: &HotFfn, list: &ActiveList, criterion: Criterion<'_>) -> Result<SelectOp, GpuError> {
        check_list(hot, list)?;
        let (values, threshold, code) = match criterion {
            Criterion::Relu { values } => {
                check_len("relu values", values, hot.n_hot())?;
                (values, 0.0f32, 0)
            }
            Criterion::Predictor { logits, threshold } => {
                check_len("predictor logits", logits, hot.n_ff)?;
                (logits, threshold, 1)
            }
        };
        let (_, _, tiles) = hot.axpy_shape();
        let cfg = &hot.config;
        let words = [hot.n_hot() as u32, threshold.to_bits(), tiles, cfg.min_chunk_rows, cfg.max_chunks, 0, 0, 0];
        let params = ctx.uniform("sparse select params", bytemuck::cast_slice(&words));
        let spec = ShaderSpec::new("sparse/select", SELECT, "main").with("CRITERION", code);
        let kernel = Kernel::new(ctx, &spec, &[(0, values), (1, &hot.hot_ids), (2, &list.list), (3, &list.args), (4, &params)]);
        let groups = (hot.n_hot() as u32).div_ceil(SELECT_BLOCK).max(1);
        Ok(SelectOp { kernel, groups, params })
    }

    /// Bytes of the op's own buffers.
    pub fn gpu_bytes(&self) -> u64 {
        self.params.size()
    }

    /// Changes the predictor threshold (written before the next submission).
    pub fn set_threshold(&self, queue: &wgpu::Queue, threshold: f32) {
        queue.write_buffer(&self.params, 4, bytemuck::bytes_of(&threshold));
    }

    pub fn encode(&self, pass: &mut ComputePass<'_>) {
        self.kernel.bind(pass);
        pass.dispatch_workgroups(self.groups, 1, 1);
    }
}

/// What [`SparseMatvecOp`] computes for each active row r.
#[derive(Clone, Copy, Debug)]
pub enum MatvecMode<'a> {
    /// `h[r] = relu(g[r]) * (up_hot[r] · x)`, the gate already computed (`g`: n_hot f32).
    Relu { g: &'a Buffer },
    /// `h[r] = act(gate_hot[r] · x) * (up_hot[r] · x)`.
    Gated { act: Activation },
    /// `h[r] = gate_hot[r] · x`: the gate of a predictor's candidates (the `h` buffer then
    /// holds gate values, n_hot f32), read before knowing which of them fire.
    Gate,
    /// `h[r] = act(g[r]) * (up_hot[r] · x)`, `g` from [`MatvecMode::Gate`] over a list that
    /// contains this one (`g`: n_hot f32).
    ActUp { g: &'a Buffer, act: Activation },
}

/// The shaders' ACT constant.
fn act_code(act: Activation) -> u32 {
    match act {
        Activation::Relu => 0,
        Activation::Silu => 1,
        Activation::Drelu => 2,
        // GPU sessions refuse GeLU models before any kernel is built (`HParams::gpu_unsupported`,
        // checked by `GpuWeights::upload_parts`): reaching this is a bug in ember, not bad input.
        Activation::GeluTanh => unreachable!("no GPU kernel computes GeLU; GPU sessions refuse these models"),
    }
}

/// The gather matvec over the active list: one workgroup per active row reads only that row
/// (of up, or of gate and up), writes `h[r]`. Rows not in the list are neither read nor
/// written. Dispatched indirectly from [`ActiveList::args`].
pub struct SparseMatvecOp {
    kernel: Kernel,
    args: Buffer,
    _params: Buffer,
}

impl SparseMatvecOp {
    /// `x`: n_embd f32; `h`: n_hot f32.
    pub fn new(ctx: &GpuContext, hot: &HotFfn, list: &ActiveList, x: &Buffer, h: &Buffer, mode: MatvecMode<'_>) -> Result<SparseMatvecOp, GpuError> {
        check_list(hot, list)?;
        check_len("x", x, hot.n_embd)?;
        check_len("h", h, hot.n_hot())?;
        check_distinct(("x", x), ("h", h))?;
        let params = matvec_params(ctx, hot);
        let w = [&hot.gate.quants, &hot.gate.scales, &hot.up.quants, &hot.up.scales];
        let kernel = match mode {
            MatvecMode::Relu { g } => {
                check_len("g", g, hot.n_hot())?;
                check_distinct(("g", g), ("h", h))?;
                let entries = [(0, x), (1, &list.list), (2, h), (3, g), (4, &params), (5, w[0]), (6, w[1]), (7, w[2]), (8, w[3])];
                Kernel::new(ctx, &matvec_spec(hot, 0, "sparse_relu"), &entries)
            }
            MatvecMode::Gated { act } => {
                let entries = [(0, x), (1, &list.list), (2, h), (4, &params), (5, w[0]), (6, w[1]), (7, w[2]), (8, w[3])];
                Kernel::new(ctx, &matvec_spec(hot, act_code(act), "sparse_gated"), &entries)
            }
            MatvecMode::Gate => {
                let entries = [(0, x), (1, &list.list), (2, h), (4, &params), (5, w[0]), (6, w[1]), (7, w[2]), (8, w[3])];
                Kernel::new(ctx, &matvec_spec(hot, 0, "sparse_gate"), &entries)
            }
            MatvecMode::ActUp { g, act } => {
                check_len("g", g, hot.n_hot())?;
                check_distinct(("g", g), ("h", h))?;
                let entries = [(0, x), (1, &list.list), (2, h), (3, g), (4, &params), (5, w[0]), (6, w[1]), (7, w[2]), (8, w[3])];
                Kernel::new(ctx, &matvec_spec(hot, act_code(act), "sparse_act_up"), &entries)
            }
        };
        Ok(SparseMatvecOp { kernel, args: list.args.clone(), _params: params })
    }

    /// Bytes of the op's own buffers.
    pub fn gpu_bytes(&self) -> u64 {
        self._params.size()
    }

    pub fn encode(&self, pass: &mut ComputePass<'_>) {
        self.kernel.bind(pass);
        pass.dispatch_workgroups_indirect(&self.args, MATVEC_ARGS_OFFSET);
    }
}

/// `y = Σ_{r in list} h[r] * down_t_hot[r]`, or `y += ...` (`add`), over n_embd columns.
/// Two passes: workgroups over (column tile x chunk of the list) write partial sums to a
/// scratch buffer (dispatched indirectly), then one pass adds the chunks in order into y.
/// Deterministic bit for bit; with no active row, overwrite gives exact zeros and add leaves
/// y untouched.
pub struct SparseAxpyOp {
    partial: Kernel,
    reduce: Kernel,
    args: Buffer,
    reduce_groups: u32,
    scratch: Buffer,
    params: Buffer,
}

impl SparseAxpyOp {
    /// `h`: n_hot f32 (read at the active rows); `y`: n_embd f32.
    pub fn new(ctx: &GpuContext, hot: &HotFfn, list: &ActiveList, h: &Buffer, y: &Buffer, add: bool) -> Result<SparseAxpyOp, GpuError> {
        check_list(hot, list)?;
        check_len("h", h, hot.n_hot())?;
        check_len("y", y, hot.n_embd)?;
        check_distinct(("h", h), ("y", y))?;
        let cfg = &hot.config;
        let d = &hot.down_t;
        let (tc, tr, _) = hot.axpy_shape();
        let n4 = (hot.n_embd / 4) as u32;
        let scratch_bytes = cfg.max_chunks as u64 * hot.n_embd as u64 * 4;
        if scratch_bytes > ctx.max_binding() {
            return Err(GpuError::Unsupported(format!("sparse AXPY: {} chunks of {} columns exceed a storage binding", cfg.max_chunks, hot.n_embd)));
        }
        let scratch = ctx.zeros("sparse axpy partials", scratch_bytes);
        let params = ctx.uniform("sparse axpy params", bytemuck::cast_slice(&[n4, d.units(), add as u32, 0]));
        let acc = (unit_values(d.ty) / 4) as u32;
        let axpy = |entry: &str| ShaderSpec::new("sparse/axpy", AXPY, entry).with_all(&[("WTYPE", d.code()), ("AX_TC", tc), ("AX_TR", tr), ("AX_ACC", acc)]);
        let partial = Kernel::new(ctx, &axpy("partial_sums"), &[(0, &list.list), (1, h), (2, &scratch), (4, &params), (5, &d.quants), (6, &d.scales)]);
        let reduce = Kernel::new(ctx, &axpy("reduce"), &[(0, &list.list), (2, &scratch), (3, y), (4, &params)]);
        Ok(SparseAxpyOp { partial, reduce, args: list.args.clone(), reduce_groups: n4.div_ceil(64), scratch, params })
    }

    /// Bytes of the op's own buffers (partial-sum scratch, parameters).
    pub fn gpu_bytes(&self) -> u64 {
        self.scratch.size() + self.params.size()
    }

    pub fn encode(&self, pass: &mut ComputePass<'_>) {
        self.partial.bind(pass);
        pass.dispatch_workgroups_indirect(&self.args, AXPY_ARGS_OFFSET);
        self.reduce.bind(pass);
        pass.dispatch_workgroups(self.reduce_groups, 1, 1);
    }
}

/// The FFN of a batch of tokens over every row of a [`HotFfn`], densely (a prefill batch's
/// union of firing neurons is nearly all of them, and a silent ReLU neuron adds exactly zero):
/// `h[t][r] = act(gate[r] · x[t]) * (up[r] · x[t])`, then `y[t] += Σ_r h[t][r] * down_t[r]`
/// in row order (deterministic, no atomics). Two tiled kernels (`shaders/sparse_batch.wgsl`);
/// the token count is read from the `step` uniform, so the bind groups are built once.
pub struct BatchFfnOp {
    gate_up: Option<Kernel>,
    down: Option<Kernel>,
    rows: u32,
    cols: u32,
    _params: Buffer,
}

/// Tokens per workgroup of the batch kernels (rows: 32 for gate/up, columns: 64 for down).
const BATCH_TOKENS: u32 = 64;

impl BatchFfnOp {
    /// `x`: the FFN input of up to `max_tokens` tokens (n_embd f32 each); `h`: scratch of
    /// `max_tokens` x n_hot f32; `y`: `max_tokens` x n_embd f32, added to.
    pub fn new(ctx: &GpuContext, hot: &HotFfn, x: &Buffer, h: &Buffer, y: &Buffer, act: Activation, max_tokens: usize, step: &Buffer) -> Result<BatchFfnOp, GpuError> {
        check_len("x", x, max_tokens * hot.n_embd)?;
        check_len("h", h, max_tokens * hot.n_hot())?;
        check_len("y", y, max_tokens * hot.n_embd)?;
        check_distinct(("x", x), ("h", h))?;
        check_distinct(("x", x), ("y", y))?;
        check_distinct(("h", h), ("y", y))?;
        let (rows, cols) = (hot.n_hot() as u32, hot.n_embd as u32);
        let params = ctx.uniform("sparse batch params", bytemuck::cast_slice(&[rows, cols, 0, 0]));
        if rows == 0 {
            return Ok(BatchFfnOp { gate_up: None, down: None, rows, cols, _params: params });
        }
        let (g, u, d) = (&hot.gate, &hot.up, &hot.down_t);
        let gate_up = Kernel::new(ctx, &batch_spec("gate_up", g.code(), u.code(), act_code(act)), &[(0, x), (1, h), (3, &params), (4, &g.quants), (5, &g.scales), (6, &u.quants), (7, &u.scales), (8, step)]);
        // The down kernel reads its matrix through the first pair of bindings; the second pair
        // is bound to it too (the shared loader names both).
        let down = Kernel::new(ctx, &batch_spec("down", d.code(), d.code(), 0), &[(1, h), (2, y), (3, &params), (4, &d.quants), (5, &d.scales), (6, &d.quants), (7, &d.scales), (8, step)]);
        Ok(BatchFfnOp { gate_up: Some(gate_up), down: Some(down), rows, cols, _params: params })
    }

    /// Bytes of the op's own buffers.
    pub fn gpu_bytes(&self) -> u64 {
        self._params.size()
    }

    pub fn encode(&self, pass: &mut ComputePass<'_>, n_tokens: u32) {
        let (Some(gate_up), Some(down)) = (&self.gate_up, &self.down) else { return };
        if n_tokens == 0 {
            return;
        }
        let tiles = n_tokens.div_ceil(BATCH_TOKENS);
        gate_up.bind(pass);
        pass.dispatch_workgroups(self.rows.div_ceil(32), tiles, 1);
        down.bind(pass);
        pass.dispatch_workgroups(self.cols.div_ceil(64), tiles, 1);
    }
}

/// `y[t * stride + offset + r] = W[r] · x[t]` for rows r of a matrix in the hot layout and the
/// tokens of a batch (`shaders/sparse_batch.wgsl`, entry `rows`): a streamed prefill's q/k/v
/// and o products, a chunk of rows at a time. The rows, stride and offset change per chunk
/// ([`RowsOp::set`], a queue write: ordered before the next submission, so one submission may
/// use one setting); the token count comes from the `step` uniform.
pub struct RowsOp {
    kernel: Kernel,
    params: Buffer,
    /// Rows of the current setting.
    rows: u32,
    /// The most rows the weight buffers hold.
    capacity: usize,
    cols: usize,
    y_len: usize,
}

impl RowsOp {
    /// `quants`/`scales`: room for `capacity` rows of `cols` values of type `ty` in the hot
    /// layout ([`row_parts`]); `x`: `max_tokens` x cols f32; `y`: `y_len` f32 (every setting's
    /// writes must stay inside: checked by [`RowsOp::set`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(ctx: &GpuContext, ty: GgmlType, cols: usize, capacity: usize, quants: &Buffer, scales: &Buffer, x: &Buffer, y: &Buffer, max_tokens: usize, step: &Buffer) -> Result<RowsOp, GpuError> {
        let Some(code) = type_code(ty) else {
            return Err(GpuError::Unsupported(format!("streamed rows: no sparse GPU kernel for {} weights", ty.name())));
        };
        if cols == 0 || !cols.is_multiple_of(32) {
            return Err(GpuError::Unsupported(format!("streamed rows: {cols} columns, not a positive multiple of 32")));
        }
        let (qb, sb) = row_layout(ty, cols);
        if quants.size() < (capacity * qb) as u64 || scales.size() < (capacity * sb) as u64 {
            return Err(GpuError::Unsupported(format!("streamed rows: buffers of {} and {} bytes hold fewer than {capacity} rows", quants.size(), scales.size())));
        }
        check_len("x", x, max_tokens * cols)?;
        check_distinct(("x", x), ("y", y))?;
        let params = ctx.uniform("streamed rows params", bytemuck::cast_slice(&[0u32, cols as u32, 0, 0]));
        let kernel = Kernel::new(ctx, &batch_spec("rows", code, code, 0), &[(0, x), (1, y), (3, &params), (4, quants), (5, scales), (6, quants), (7, scales), (8, step)]);
        Ok(RowsOp { kernel, params, rows: 0, capacity, cols, y_len: (y.size() / 4) as usize })
    }

    /// The next submission computes `rows` rows (at most the capacity) for `n_tokens` tokens
    /// into `y[t * stride + offset + r]`.
    pub fn set(&mut self, queue: &wgpu::Queue, rows: usize, stride: usize, offset: usize, n_tokens: usize) -> Result<(), GpuError> {
        let last = (n_tokens.max(1) - 1) * stride + offset + rows;
        if rows > self.capacity || offset + rows > stride || last > self.y_len {
            return Err(GpuError::Unsupported(format!("streamed rows: {rows} rows at offset {offset} of {stride} for {n_tokens} tokens do not fit ({} rows, {} values of output)", self.capacity, self.y_len)));
        }
        queue.write_buffer(&self.params, 0, bytemuck::cast_slice(&[rows as u32, self.cols as u32, stride as u32, offset as u32]));
        self.rows = rows as u32;
        Ok(())
    }

    /// Bytes of the op's own buffers.
    pub fn gpu_bytes(&self) -> u64 {
        self.params.size()
    }

    pub fn encode(&self, pass: &mut ComputePass<'_>, n_tokens: u32) {
        if self.rows == 0 || n_tokens == 0 {
            return;
        }
        self.kernel.bind(pass);
        pass.dispatch_workgroups(self.rows.div_ceil(32), n_tokens.div_ceil(BATCH_TOKENS), 1);
    }
}
