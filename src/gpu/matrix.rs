//! Weight matrices on the GPU (repacked layouts) and their matrix-product kernels.
//!
//! # Layouts
//! Rows stay contiguous, and scales are split from quants so that every load is aligned: Q4_0
//! takes 18 bytes per 32 elements as in the file.
//!
//! | type | `wq` (binding 4) | `wd` (binding 5) |
//! | --- | --- | --- |
//! | F32 | the GGUF bytes | — |
//! | F16 | the GGUF bytes | — |
//! | Q8_0 | the 32 quant bytes of each block | f16 scales, two per word |
//! | Q4_0 | the 16 quant bytes of each block | f16 scales, two per word |
//! | Q4_1 | as Q4_0 | `d | m << 16` per block |
//! | Q5_0, Q5_1, Q4_K, Q5_K, Q6_K | 16 bytes of low nibbles per 32 elements, then the high bits | the file's scales (see `gpu/kquant.rs`) |
//!
//! The 5-bit and K-quant types (`gpu/kquant.rs`) are cut into 32-element groups laid out alike
//! (nibbles in Q4_1's order, high bits in a second segment, K-quant super-block headers kept
//! packed as the file has them and unpacked by the kernels), so they take the file's bytes.
//!
//! The quants of a row are in GGUF order, or, where the row's block count allows and the
//! type's decode kernel wants it, permuted within runs of 8 (Q4) or 4 (Q8_0) blocks (`PERM` in
//! the shaders, see `shaders/matmul_q4_0.wgsl`): a thread that loads 16 bytes of quants then
//! needs activations that its neighbours' loads continue, so activation loads coalesce (in GGUF
//! order each thread's 128 bytes of activations are contiguous and a warp's load touches 32
//! cache lines). Scales are padded to 16 bytes. A matrix whose buffers would exceed the
//! adapter's largest binding is split by rows (in multiples of 64) into chunks, each with its
//! own buffers, bind groups and dispatches.
//!
//! # Kernels
//! - Decode (one token): `shaders/matmul_dec.wgsl` after `matmul_dec_<type>.wgsl` (the type's
//!   *slots*: 16 bytes of weights per thread and step, bound as `vec4<u32>`), with a subgroup
//!   reduction (`matmul_dec_sg.wgsl`) or a shared-memory tree; each type's workgroup shape comes
//!   from [`decode_config`] (measured on an H200, see BENCHMARKS.md). One-token products can
//!   fold the RMSNorm before them (`matmul_dec_norm.wgsl`, [`GpuMatrix::bind_matmul_normed`])
//!   and, for q/k/v, RoPE and the KV-cache write (`matmul_dec_rope.wgsl`). `shaders/matmul_kq.wgsl` is
//!   an alternative for Q4_0 and Q4_1 in GGUF order and Q4_K and Q6_K (grouped layout): activations quantised once per workgroup to
//!   22 bits (about f32's own rounding) and integer dot products, a third of the arithmetic.
//! - A few tokens (up to [`MATVEC_MAX_TOKENS`], a batched decode's products): the decode
//!   kernel's few-token entry points (`matmul_dec.wgsl`'s `dvt_main`, `matmul_dec_sg.wgsl`'s
//!   `dvt_main_sg`) over groups of 2, 4, 8 or 16 tokens (the grid's z dimension): the same
//!   slots and loads as one token, each row's slot applied to every token of the group
//!   (`matmul_dec_tok.wgsl`: dequantised once per 4 elements for all tokens, F32, F16, Q8_0,
//!   Q4_0, Q4_1, Q4_K, Q5_K, Q6_K; `matmul_dec_tok_slot.wgsl`: decoded per token, Q5_0, Q5_1,
//!   Q2_K, Q3_K),
//!   so the weights are read once per group; see [`default_mv_configs`]. At `--gpu-precision q8`
//!   (or `ember bench --tune mv-batch-kernel=kq`, [`GpuTuning::batch_kq`](super::GpuTuning))
//!   Q4_0/Q4_1 in GGUF order, Q4_K and Q6_K take the integer kernel's few-token entry point
//!   instead (`shaders/matmul_kq_tok.wgsl`'s `kqt_main`, [`KqTokens`]): each token's activations
//!   quantised to 8 bits once per workgroup of KQ_NR x KQ_RG rows, in registers or staged in
//!   workgroup memory, and integer dot products. The earlier
//!   `shaders/matmul_common.wgsl` `mv_main` (units of 8 elements, groups of up to 8 tokens)
//!   stays behind [`MvConfig::units`] (`ember bench --tune mv-batch-kernel=units`).
//! - More tokens: the tiled `mm_tiled` (128 rows x 64 tokens per workgroup, 8 x 4 per thread,
//!   the type's `tile8` dequantising the weight tile once into shared memory; 64 rows where the
//!   adapter has under 24 KiB of shared memory), or where the context has cooperative matrices
//!   (`GpuContext::has_coop_matrix`), `shaders/matmul_coop.wgsl`'s `mm_coop`: the same tiles as
//!   f16 in shared memory multiplied on 16x16x16 fragments with f32 sums (tensor cores). The
//!   portable kernel stays the reference ([`Kernel::Tiled`]); embedding lookups:
//!   `shaders/get_rows_common.wgsl`.
//!
//! Quants become floats without int-to-float conversions (a quarter-rate instruction on NVIDIA):
//! a nibble or byte or'ed into the mantissa of a power of two and the power subtracted.

use super::kquant;
use super::ops::RopeShape;
use super::{GpuContext, GpuError, ShaderSpec};
use crate::gguf::GgmlType;
use crate::model::{Activation, Matrix};
use std::sync::Arc;

use super::shaders::compose;

/// The kernel sources of one weight type. Every product is composed with matmul_store.wgsl
/// and act.wgsl (its epilogues).
struct TypeSources {
    name: &'static str,
    /// Type + matmul_common.wgsl.
    mm: &'static str,
    /// Type + matmul_common.wgsl + matmul_vec_sg.wgsl.
    mm_sg: &'static str,
    /// Type + get_rows_common.wgsl.
    get_rows: &'static str,
    /// Decode block type + matmul_dec.wgsl.
    dec: &'static str,
    /// Decode block type + matmul_dec.wgsl + matmul_dec_sg.wgsl.
    dec_sg: &'static str,
    /// `dec` and `dec_sg` with an RMSNorm folded in (matmul_dec_norm.wgsl).
    dec_norm: &'static str,
    dec_sg_norm: &'static str,
    /// The same with RoPE and the KV-cache write in the epilogue (matmul_dec_rope.wgsl).
    dec_norm_rope: &'static str,
    dec_sg_norm_rope: &'static str,
    /// The prefill product on cooperative matrices: `enable`s + type + matmul_common.wgsl +
    /// matmul_coop.wgsl.
    coop: &'static str,
}

macro_rules! type_sources {
    // `$file`: the type file of the unit kernels, after the shaders/ preludes it uses
    // (dequant_q4.wgsl, dequant_q8.wgsl, kquant_scales.wgsl, nibbles.wgsl). `$dec`: the preludes the decode
    // type file uses, the decode type file, then (unless it has its own slot_dot_x and
    // slot_dot_rows) matmul_dec_rows.wgsl, then the few-token kernel's slot product:
    // matmul_dec_tok.wgsl (groups of 4 decoded once for all tokens) or matmul_dec_tok_slot.wgsl
    // (per token).
    ($name:literal, [$($file:literal),+], [$($dec:literal),+]) => {
        TypeSources {
            name: $name,
            mm: compose!($($file),+, "matmul_common.wgsl", "matmul_store.wgsl", "act.wgsl"),
            mm_sg: compose!($($file),+, "matmul_common.wgsl", "matmul_vec_sg.wgsl", "matmul_store.wgsl", "act.wgsl"),
            get_rows: compose!($($file),+, "get_rows_common.wgsl"),
            dec: compose!($($dec),+, "matmul_dec.wgsl", "matmul_dec_x.wgsl", "matmul_dec_norope.wgsl", "matmul_store.wgsl", "act.wgsl"),
            dec_sg: compose!($($dec),+, "matmul_dec.wgsl", "matmul_dec_x.wgsl", "matmul_dec_norope.wgsl", "matmul_dec_sg.wgsl", "matmul_store.wgsl", "act.wgsl"),
            dec_norm: compose!($($dec),+, "matmul_dec.wgsl", "matmul_dec_norm.wgsl", "matmul_dec_norope.wgsl", "matmul_store.wgsl", "act.wgsl"),
            dec_sg_norm: compose!($($dec),+, "matmul_dec.wgsl", "matmul_dec_norm.wgsl", "matmul_dec_norope.wgsl", "matmul_dec_sg.wgsl", "matmul_store.wgsl", "act.wgsl"),
            dec_norm_rope: compose!($($dec),+, "matmul_dec.wgsl", "matmul_dec_norm.wgsl", "rope_angle.wgsl", "matmul_dec_rope.wgsl", "matmul_store.wgsl", "act.wgsl"),
            dec_sg_norm_rope: compose!($($dec),+, "matmul_dec.wgsl", "matmul_dec_norm.wgsl", "rope_angle.wgsl", "matmul_dec_rope.wgsl", "matmul_dec_sg.wgsl", "matmul_store.wgsl", "act.wgsl"),
            // `enable` directives must open a module: they are not in matmul_coop.wgsl itself.
            coop: concat!("enable f16;\nenable wgpu_cooperative_matrix;\n", compose!($($file),+, "matmul_common.wgsl", "matmul_coop.wgsl", "matmul_store.wgsl", "act.wgsl")),
        }
    };
}

const F32_SRC: TypeSources = type_sources!("f32", ["matmul_f32.wgsl"], ["matmul_dec_f32.wgsl", "matmul_dec_rows.wgsl", "matmul_dec_tok.wgsl"]);
const F16_SRC: TypeSources = type_sources!("f16", ["matmul_f16.wgsl"], ["matmul_dec_f16.wgsl", "matmul_dec_rows.wgsl", "matmul_dec_tok.wgsl"]);
const Q8_0_SRC: TypeSources = type_sources!("q8_0", ["dequant_q8.wgsl", "matmul_q8_0.wgsl"], ["dequant_q8.wgsl", "matmul_dec_q8_0.wgsl", "matmul_dec_rows.wgsl", "matmul_dec_tok.wgsl"]);
const Q4_0_SRC: TypeSources = type_sources!("q4_0", ["dequant_q4.wgsl", "matmul_q4_0.wgsl"], ["dequant_q4.wgsl", "matmul_dec_q4_0.wgsl", "matmul_dec_tok.wgsl"]);
const Q4_1_SRC: TypeSources = type_sources!("q4_1", ["dequant_q4.wgsl", "matmul_q4_1.wgsl"], ["dequant_q4.wgsl", "matmul_dec_q4_1.wgsl", "matmul_dec_rows.wgsl", "matmul_dec_tok.wgsl"]);
// The grouped types of `kquant` (5-bit and K-quants): their files read the Chunk uniform, so
// they are validated only as composed (as are the files that use a prelude).
const Q5_0_SRC: TypeSources = type_sources!("q5_0", ["nibbles.wgsl", "matmul_q5_0.wgsl"], ["dequant_q4.wgsl", "matmul_dec_q5_0.wgsl", "matmul_dec_rows.wgsl", "matmul_dec_tok_slot.wgsl"]);
const Q5_1_SRC: TypeSources = type_sources!("q5_1", ["nibbles.wgsl", "matmul_q5_1.wgsl"], ["dequant_q4.wgsl", "matmul_dec_q5_1.wgsl", "matmul_dec_rows.wgsl", "matmul_dec_tok_slot.wgsl"]);
const Q4_K_SRC: TypeSources = type_sources!("q4_k", ["kquant_scales.wgsl", "nibbles.wgsl", "matmul_q4_k.wgsl"], ["kquant_scales.wgsl", "dequant_q4.wgsl", "matmul_dec_q4_k.wgsl", "matmul_dec_rows.wgsl", "matmul_dec_tok.wgsl"]);
const Q5_K_SRC: TypeSources = type_sources!("q5_k", ["kquant_scales.wgsl", "nibbles.wgsl", "matmul_q5_k.wgsl"], ["kquant_scales.wgsl", "dequant_q4.wgsl", "matmul_dec_q5_k.wgsl", "matmul_dec_rows.wgsl", "matmul_dec_tok.wgsl"]);
const Q6_K_SRC: TypeSources = type_sources!("q6_k", ["nibbles.wgsl", "matmul_q6_k.wgsl"], ["dequant_q4.wgsl", "matmul_dec_q6_k.wgsl", "matmul_dec_rows.wgsl", "matmul_dec_tok.wgsl"]);
const Q2_K_SRC: TypeSources = type_sources!("q2_k", ["matmul_q2_k.wgsl"], ["matmul_dec_q2_k.wgsl", "matmul_dec_rows.wgsl", "matmul_dec_tok_slot.wgsl"]);
const Q3_K_SRC: TypeSources = type_sources!("q3_k", ["matmul_q3_k.wgsl"], ["matmul_dec_q3_k.wgsl", "matmul_dec_rows.wgsl", "matmul_dec_tok_slot.wgsl"]);

/// The integer-dot-product decode matvec of Q4_0, Q4_1, Q4_K and Q6_K (its own weight bindings; Q4_K's
/// headers unpacked by kquant_scales.wgsl), as the blocks kernel: plain, with a folded RMSNorm,
/// and with RoPE too; shared-memory or subgroup reduction.
const KQ_SRC: &str = compose!("kquant_scales.wgsl", "matmul_kq.wgsl", "matmul_dec_x.wgsl", "matmul_dec_norope.wgsl", "matmul_store.wgsl", "act.wgsl");
const KQ_SG_SRC: &str = compose!("kquant_scales.wgsl", "matmul_kq.wgsl", "matmul_dec_x.wgsl", "matmul_dec_norope.wgsl", "matmul_kq_sg.wgsl", "matmul_store.wgsl", "act.wgsl");
const KQ_NORM_SRC: &str = compose!("kquant_scales.wgsl", "matmul_kq.wgsl", "matmul_dec_norm.wgsl", "matmul_dec_norope.wgsl", "matmul_store.wgsl", "act.wgsl");
const KQ_SG_NORM_SRC: &str = compose!("kquant_scales.wgsl", "matmul_kq.wgsl", "matmul_dec_norm.wgsl", "matmul_dec_norope.wgsl", "matmul_kq_sg.wgsl", "matmul_store.wgsl", "act.wgsl");
const KQ_NORM_ROPE_SRC: &str = compose!("kquant_scales.wgsl", "matmul_kq.wgsl", "matmul_dec_norm.wgsl", "rope_angle.wgsl", "matmul_dec_rope.wgsl", "matmul_store.wgsl", "act.wgsl");
const KQ_SG_NORM_ROPE_SRC: &str = compose!("kquant_scales.wgsl", "matmul_kq.wgsl", "matmul_dec_norm.wgsl", "rope_angle.wgsl", "matmul_dec_rope.wgsl", "matmul_kq_sg.wgsl", "matmul_store.wgsl", "act.wgsl");
/// The integer kernel for a few tokens (`kqt_main`, a batched decode's products; no folded
/// norm or RoPE).
const KQ_TOK_SRC: &str = compose!("kquant_scales.wgsl", "matmul_kq.wgsl", "matmul_dec_x.wgsl", "matmul_dec_norope.wgsl", "matmul_kq_tok.wgsl", "matmul_store.wgsl", "act.wgsl");

macro_rules! listed {
    ($src:ident, $file:literal, $dec:literal) => {
        listed!($src, $file, $dec, include_str!(concat!("../../shaders/", $file)))
    };
    // `$alone`: the type file as validated by itself.
    ($src:ident, $file:literal, $dec:literal, $alone:expr) => {
        [
            ($file, $alone),
            ("matmul_common.wgsl", $src.mm),
            ("matmul_vec_sg.wgsl", $src.mm_sg),
            ("get_rows_common.wgsl", $src.get_rows),
            // A decode block file needs matmul_dec.wgsl's bindings: listed composed.
            ($dec, $src.dec),
            ("matmul_dec.wgsl", $src.dec),
            ("matmul_dec_sg.wgsl", $src.dec_sg),
            ("matmul_dec_x.wgsl", $src.dec),
            ("matmul_dec_norm.wgsl", $src.dec_norm),
            ("matmul_dec_norm.wgsl", $src.dec_sg_norm),
            ("matmul_dec_norope.wgsl", $src.dec),
            ("matmul_dec_rope.wgsl", $src.dec_norm_rope),
            ("matmul_dec_rope.wgsl", $src.dec_sg_norm_rope),
            ("matmul_store.wgsl", $src.dec),
            // Stand-alone (listed once per type, the same text).
            ("matmul_kq.wgsl", KQ_SRC),
            ("matmul_kq_sg.wgsl", KQ_SG_SRC),
            ("matmul_kq.wgsl", KQ_NORM_SRC),
            ("matmul_kq_sg.wgsl", KQ_SG_NORM_SRC),
            ("matmul_kq.wgsl", KQ_NORM_ROPE_SRC),
            ("matmul_kq_sg.wgsl", KQ_SG_NORM_ROPE_SRC),
            ("matmul_kq_tok.wgsl", KQ_TOK_SRC),
            ("matmul_coop.wgsl", $src.coop),
        ]
    };
}

const LISTED: [[(&str, &str); 22]; 12] = [
    listed!(F32_SRC, "matmul_f32.wgsl", "matmul_dec_f32.wgsl"),
    listed!(F16_SRC, "matmul_f16.wgsl", "matmul_dec_f16.wgsl"),
    listed!(Q8_0_SRC, "matmul_q8_0.wgsl", "matmul_dec_q8_0.wgsl", Q8_0_SRC.mm),
    listed!(Q4_0_SRC, "matmul_q4_0.wgsl", "matmul_dec_q4_0.wgsl", Q4_0_SRC.mm),
    listed!(Q4_1_SRC, "matmul_q4_1.wgsl", "matmul_dec_q4_1.wgsl", Q4_1_SRC.mm),
    listed!(Q5_0_SRC, "matmul_q5_0.wgsl", "matmul_dec_q5_0.wgsl", Q5_0_SRC.mm),
    listed!(Q5_1_SRC, "matmul_q5_1.wgsl", "matmul_dec_q5_1.wgsl", Q5_1_SRC.mm),
    listed!(Q4_K_SRC, "matmul_q4_k.wgsl", "matmul_dec_q4_k.wgsl", Q4_K_SRC.mm),
    listed!(Q5_K_SRC, "matmul_q5_k.wgsl", "matmul_dec_q5_k.wgsl", Q5_K_SRC.mm),
    listed!(Q6_K_SRC, "matmul_q6_k.wgsl", "matmul_dec_q6_k.wgsl", Q6_K_SRC.mm),
    listed!(Q2_K_SRC, "matmul_q2_k.wgsl", "matmul_dec_q2_k.wgsl", Q2_K_SRC.mm),
    listed!(Q3_K_SRC, "matmul_q3_k.wgsl", "matmul_dec_q3_k.wgsl", Q3_K_SRC.mm),
];

/// (file name, source) of this module's kernels: each type file on its own, and each kernel
/// file as compiled, composed after every type file (so one name appears once per type).
pub const SHADERS: &[(&str, &str)] = LISTED.as_flattened();

/// nibbles.wgsl as compiled before one of the type files that use it.
pub const NIBBLES_SHADER: (&str, &str) = ("nibbles.wgsl", Q5_0_SRC.mm);

/// matmul_dec_rows.wgsl as compiled after one of the type files that use it.
pub const DEC_ROWS_SHADER: (&str, &str) = ("matmul_dec_rows.wgsl", F16_SRC.dec);

/// The few-token kernel's slot products as compiled after a type file of each kind.
pub const DEC_TOK_SHADERS: [(&str, &str); 2] = [("matmul_dec_tok.wgsl", Q4_0_SRC.dec), ("matmul_dec_tok_slot.wgsl", Q5_0_SRC.dec)];

/// The weight types the GPU kernels compute with as they are.
pub const GPU_TYPES: [GgmlType; 12] = [
    GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1,
    GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K,
    GgmlType::Q2_K, GgmlType::Q3_K,
];

fn sources(ty: GgmlType) -> Option<&'static TypeSources> {
    Some(match ty {
        GgmlType::F32 => &F32_SRC,
        GgmlType::F16 => &F16_SRC,
        GgmlType::Q8_0 => &Q8_0_SRC,
        GgmlType::Q4_0 => &Q4_0_SRC,
        GgmlType::Q4_1 => &Q4_1_SRC,
        GgmlType::Q5_0 => &Q5_0_SRC,
        GgmlType::Q5_1 => &Q5_1_SRC,
        GgmlType::Q4_K => &Q4_K_SRC,
        GgmlType::Q5_K => &Q5_K_SRC,
        GgmlType::Q6_K => &Q6_K_SRC,
        GgmlType::Q2_K => &Q2_K_SRC,
        GgmlType::Q3_K => &Q3_K_SRC,
        _ => return None,
    })
}

/// Bytes per row of the quants (`wq`) and of the scales (`wd`) of a type's GPU layout.
fn layout_bytes(ty: GgmlType, cols: usize) -> (usize, usize) {
    let blocks = cols / 32;
    match ty {
        GgmlType::F32 => (cols * 4, 0),
        GgmlType::F16 => (cols * 2, 0),
        GgmlType::Q8_0 => (blocks * 32, blocks * 2),
        GgmlType::Q4_0 => (blocks * 16, blocks * 2),
        GgmlType::Q4_1 => (blocks * 16, blocks * 4),
        t if kquant::is_grouped(t) => kquant::layout_bytes(t, cols),
        _ => unreachable!(),
    }
}

/// Blocks per super-group of a type's permuted word order (PERM = 1 in the shaders), used for
/// rows whose block count it divides: Q4_0 and Q4_1 runs of 8 blocks, Q8_0 runs of 4, arranged
/// so that a thread loading 16 bytes of quants needs activations that its neighbours' loads
/// continue (see shaders/matmul_q4_0.wgsl and matmul_q8_0.wgsl).
fn perm_group(ty: GgmlType) -> Option<usize> {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 => Some(8),
        GgmlType::Q8_0 => Some(4),
        _ => None,
    }
}

/// Whether a matrix of this type and width takes the permuted word order: where the group
/// divides the row and the type's decode kernel wants it (the integer-dot-product kernel reads
/// blocks in GGUF order).
fn uses_perm(ctx: &GpuContext, ty: GgmlType, cols: usize) -> bool {
    perm_group(ty).is_some_and(|g| (cols / 32).is_multiple_of(g))
        && !matches!(decode_config(ctx, ty).0, DecodeKernel::Quantized { .. })
        && !(ctx.tuning.batch_kq.is_some() && kq_type(ty).is_some())
}

/// KQ_TYPE of the integer kernels (matmul_kq.wgsl) for the types they serve.
fn kq_type(ty: GgmlType) -> Option<u32> {
    match ty {
        GgmlType::Q4_0 => Some(0),
        GgmlType::Q4_1 => Some(1),
        GgmlType::Q4_K => Some(2),
        GgmlType::Q6_K => Some(3),
        _ => None,
    }
}

/// Element e (0..32) of a GGUF Q4 block's 16 quant bytes: the nibble.
fn q4_nibble(qs: &[u8], e: usize) -> u8 {
    if e < 16 {
        qs[e] & 15
    } else {
        qs[e - 16] >> 4
    }
}

/// Splits GGUF blocks of whole rows of `cols` into the quant and scale arrays of the GPU layout
/// (the quants of each row in the permuted word order if `perm` and the group divides the row);
/// the scales are
/// padded to a multiple of 16 bytes (the decode kernel binds them as vec4 words).
fn repack(ty: GgmlType, bytes: &[u8], cols: usize, perm: bool) -> (Vec<u8>, Vec<u8>) {
    let (block, scale) = match ty {
        GgmlType::F32 | GgmlType::F16 => return (bytes.to_vec(), Vec::new()),
        GgmlType::Q8_0 => (34, 2),
        GgmlType::Q4_0 => (18, 2),
        GgmlType::Q4_1 => (20, 4),
        t if kquant::is_grouped(t) => return kquant::repack(t, bytes),
        _ => unreachable!(),
    };
    let n = bytes.len() / block;
    let mut q = Vec::with_capacity(n * (block - scale));
    let mut d = Vec::with_capacity(n * scale + 16);
    for b in bytes.chunks_exact(block) {
        d.extend_from_slice(&b[..scale]);
    }
    d.resize(d.len().div_ceil(16) * 16, 0);
    match perm_group(ty).filter(|g| perm && (cols / 32).is_multiple_of(*g)) {
        None => {
            for b in bytes.chunks_exact(block) {
                q.extend_from_slice(&b[scale..]);
            }
        }
        // 8 blocks of 16 quant bytes: slot i, word k, byte c holds element 4i + c of block 2k
        // (low nibble) and of block 2k + 1 (high nibble).
        Some(8) => {
            for sg in bytes.chunks_exact(8 * block) {
                let qs: Vec<&[u8]> = sg.chunks_exact(block).map(|b| &b[scale..]).collect();
                for i in 0..8 {
                    for k in 0..4 {
                        for c in 0..4 {
                            q.push(q4_nibble(qs[2 * k], 4 * i + c) | q4_nibble(qs[2 * k + 1], 4 * i + c) << 4);
                        }
                    }
                }
            }
        }
        // 4 blocks of 32 quant bytes: slot i, word k holds elements 4i..4i+3 of block k.
        Some(4) => {
            for sg in bytes.chunks_exact(4 * block) {
                let qs: Vec<&[u8]> = sg.chunks_exact(block).map(|b| &b[scale..]).collect();
                for i in 0..8 {
                    for qk in &qs {
                        q.extend_from_slice(&qk[4 * i..4 * i + 4]);
                    }
                }
            }
        }
        _ => unreachable!(),
    }
    (q, d)
}

/// Rows per chunk are a multiple of this (the tiled kernel's row tile), so chunk boundaries
/// fall on whole words of packed f16 scales.
const CHUNK_ROWS_ALIGN: usize = 64;

/// One row range of a matrix with its own buffers.
struct Chunk {
    rows: usize,
    wq: wgpu::Buffer,
    wd: Option<wgpu::Buffer>,
    /// `Chunk` uniform of the kernels: rows, row0, ld_y (all rows), cols.
    params: wgpu::Buffer,
}

/// A weight matrix in GPU memory, in the layout of its type (see the module docs).
pub struct GpuMatrix {
    pub rows: usize,
    pub cols: usize,
    pub ty: GgmlType,
    pub name: String,
    /// Quants in the permuted word order (PERM = 1 in the shaders).
    perm: bool,
    chunks: Vec<Chunk>,
}

/// One specialisation of the matvec: tokens per workgroup, threads and rows per workgroup, and
/// whether to reduce with subgroup operations.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MvConfig {
    pub nt: u32,
    pub wg: u32,
    pub nr: u32,
    /// Decode (nt = 1): units per thread per loop iteration, 1 or 2 (slots per row per step
    /// for the blocks kernels, 1 to 4, also for nt > 1).
    pub unroll: u32,
    /// nt > 1: the units kernel (matmul_common.wgsl's `mv_main`, each 8-element unit
    /// dequantised once for the group) instead of the blocks kernel (matmul_dec.wgsl's
    /// `dvt_main`). Not used at nt = 1, whose kernel is the [`DecodeKernel`].
    pub units: bool,
    /// nt > 1, blocks kernel: the next step's weights loaded before this step's arithmetic
    /// (DV_PF = 1).
    pub prefetch: bool,
    pub subgroups: bool,
    /// nt > 1: the integer kernel (matmul_kq_tok.wgsl's `kqt_main`) with this shape instead of
    /// the blocks kernel, for the types and layouts it serves (Q4_0 and Q4_1 in GGUF block
    /// order, Q4_K, Q6_K) where its workgroup memory fits; the other fields then stay the
    /// blocks kernel's, for the matrices that fall back to it.
    pub kq: Option<KqTokens>,
}

/// The shape of the few-token integer kernel (shaders/matmul_kq_tok.wgsl; its header says
/// where registers and workgroup memory go).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KqTokens {
    /// Rows per step (KQ_NR) and steps per workgroup (KQ_RG).
    pub nr: u32,
    pub rg: u32,
    /// The next step's weights loaded before this step's arithmetic (KQ_PF; registers only).
    pub prefetch: bool,
    /// 1: llama.cpp's 8-bit activations; 3: 22-bit ones (registers only).
    pub limbs: u32,
    /// Some(threads): the quantised activations staged in workgroup memory (KQ_XS = 1), that
    /// many threads per workgroup walking the row's blocks; None: in registers, one thread per
    /// block of the row (up to 512).
    pub staged: Option<u32>,
}

impl KqTokens {
    /// `--gpu-precision q8`'s batched products: 8-bit activations in registers, 2 rows per step,
    /// 16 steps (32 rows per workgroup). Not yet measured against other shapes
    /// (benches/device/batch_mv.sh sweeps them).
    pub const DEFAULT: KqTokens = KqTokens { nr: 2, rg: 16, prefetch: false, limbs: 1, staged: None };

    /// `nr:rg[:pf[:threads]]` (`ember bench --tune mv-batch-kq=...`): threads 0 or absent keeps
    /// the activations in registers, else stages them in workgroup memory with that many threads.
    pub fn parse(s: &str) -> Option<KqTokens> {
        let n: Vec<u32> = s.split(':').map(|t| t.trim().parse().ok()).collect::<Option<_>>()?;
        if !(2..=4).contains(&n.len()) || n[0] == 0 || n[1] == 0 {
            return None;
        }
        let staged = n.get(3).copied().filter(|&w| w > 0);
        if staged.is_some_and(|w| !w.is_power_of_two()) {
            return None;
        }
        Some(KqTokens { nr: n[0], rg: n[1], prefetch: n.get(2) == Some(&1), limbs: 1, staged })
    }
}

/// Token counts up to this go through the matvec (weights read once per group of up to 8
/// tokens); larger ones through the tiled matmul. On an H100 the matvec takes ~11 us per token
/// for a 4096x11008 Q4_0 matrix, the tiled kernel ~560 us for any count up to 64.
pub const MATVEC_MAX_TOKENS: u32 = 16;

/// The matvec variants: n tokens use the first with nt >= n. The nt = 1 variant is the
/// generic default here; [`GpuMatrix::bind_matmul`] uses each type's own (see
/// [`decode_config`]).
///
/// A few tokens (a batched decode's products) run the blocks kernel over groups of 2, 4 and 8
/// tokens (matmul_dec.wgsl's `dvt_main`: the one-token kernel's coalesced 16-byte slots, each
/// row's weights applied to every token of the group, so an 8-token step reads each weight
/// once), 64 threads and 2 rows per workgroup. Measured on an H100 (BENCHMARKS.md, session
/// 10): 16 accumulators per thread (rows x tokens) keep the kernel near the one-token kernel's
/// bandwidth (4 tokens x 4 rows: 750-810 GB/s), 32 made it spill (8 x 4: 83 GB/s; a step of 8
/// sequences at 168 t/s against 617 with groups of 4 and 615 with 8 x 2). The context's [`GpuTuning`](super::GpuTuning) replaces the
/// shape (`batch_matvec`, where the adapter has the threads; threads are halved where the
/// reduction's memory would not fit), the largest group (`batch_max_tokens`), the prefetch,
/// or takes the earlier units kernel (`batch_units`: groups of up to 8 tokens, 128 threads and
/// 4 rows by default; its gate/up products ran at 57 GB/s on an H100 at 8 tokens with ember
/// 1b515c4, against 830-1100 GB/s for the one-token kernels on the same matrices). The
/// tuning's `batch_kq` (`--gpu-precision q8`) puts its shape on every few-token variant: the
/// integer kernel runs them where the type and layout allow ([`MvConfig::kq`]).
#[doc(hidden)]
pub fn default_mv_configs(ctx: &GpuContext) -> Vec<MvConfig> {
    let subgroups = ctx.has_subgroups();
    let t = &ctx.tuning;
    let storage = ctx.limits.max_compute_workgroup_storage_size;
    let max_wg = ctx.limits.max_compute_invocations_per_workgroup;
    let shape_ok = |(wg, nr): (u32, u32)| wg.is_power_of_two() && wg <= max_wg && nr >= 2 && nr.is_multiple_of(2);
    let mut v = vec![MvConfig { nt: 1, wg: 128, nr: 2, unroll: 1, units: false, prefetch: false, subgroups, kq: None }];
    if t.batch_units {
        let fits = |nt: u32, (wg, nr): (u32, u32)| shape_ok((wg, nr)) && wg * nr * nt * 4 <= storage;
        for nt in [2, 4, 8] {
            let (wg, nr) = t.batch_matvec.filter(|&c| fits(nt, c)).unwrap_or((128, 4));
            v.push(MvConfig { nt, wg, nr, unroll: 1, units: true, prefetch: false, subgroups, kq: None });
        }
        return v;
    }
    let (wg, nr) = t.batch_matvec.filter(|&c| shape_ok(c)).unwrap_or((64.min(max_wg), 2));
    for nt in [2, 4, 8, 16].into_iter().filter(|&nt| nt <= t.batch_max_tokens.max(2)) {
        // The reduction keeps (rows x tokens + 1) partial sums per thread in shared memory.
        let mut wg = wg;
        while wg > 8 && wg * (nr * nt + 1) * 4 > storage {
            wg /= 2;
        }
        if wg * (nr * nt + 1) * 4 <= storage {
            v.push(MvConfig { nt, wg, nr, unroll: 1, units: false, prefetch: t.batch_prefetch, subgroups, kq: t.batch_kq });
        }
    }
    v
}

/// A decode kernel and, for [`DecodeKernel::Blocks`], its workgroup's (threads, rows, slots per
/// row per step).
#[doc(hidden)]
pub type DecodeChoice = (DecodeKernel, (u32, u32, u32));

/// The decode matvec of a weight type: its kernel and, for [`DecodeKernel::Blocks`], the
/// workgroup's (threads, rows, slots per row per step); the context's
/// [`GpuTuning::decode_overrides`](super::GpuTuning) replace it (`ember` reads them from
/// `EMBER_MV_DEC=q4_0=kq:4:4:1,f16=128:2:2:1`: `kq:nr:rg:pf` for the integer kernel,
/// `wg:nr:ub:pf` for the blocks kernel).
#[doc(hidden)]
pub fn decode_config(ctx: &GpuContext, ty: GgmlType) -> DecodeChoice {
    if let Some((_, c)) = ctx.tuning.decode_overrides.iter().find(|(n, _)| *n == ty.name().to_lowercase()) {
        return *c;
    }
    if matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K | GgmlType::Q6_K) && ctx.tuning.integer_decode {
        // 8 rows per step, 4 steps, 8-bit activations: the fastest in a 7B forward pass on an
        // H200 (BENCHMARKS.md) for Q4_0; Q4_K and Q6_K (their 32-element groups as blocks)
        // take the same shape, not yet measured on their own.
        return (DecodeKernel::Quantized { nr: 8, rg: 4, prefetch: false, limbs: 1 }, (64, 2, 1));
    }
    // The fastest on an H200 (BENCHMARKS.md): all variants of the three kernels came within
    // ~5% of each other there for Q4_0; these won on a 7B layer's shapes.
    match ty {
        GgmlType::F32 | GgmlType::F16 => (DecodeKernel::Blocks { prefetch: false }, (256, 2, 1)),
        GgmlType::Q8_0 => (DecodeKernel::Blocks { prefetch: false }, (64, 2, 1)),
        // A 7B Q4_K_M on an H100 (session 8, benches/device/kquant.sh): tg128 179 t/s against
        // 136 with the 32-thread, 2-row shape chosen for Q4_0, and 125/122/99 for the other
        // shapes tried.
        GgmlType::Q4_K | GgmlType::Q6_K => (DecodeKernel::Blocks { prefetch: true }, (64, 4, 1)),
        _ => (DecodeKernel::Blocks { prefetch: true }, (32, 2, 1)),
    }
}

/// `kq:nr:rg:pf` or `wg:nr:ub:pf` (see [`decode_config`]).
#[doc(hidden)]
pub fn parse_decode(cfg: &str) -> Option<DecodeChoice> {
    let cfg = cfg.trim();
    let (kind, rest) = match cfg.split_once(':') {
        Some(("kq", r)) => ("kq", r),
        _ => ("blocks", cfg),
    };
    let n: Vec<u32> = rest.split(':').map(|t| t.trim().parse().ok()).collect::<Option<_>>()?;
    let ok_len = if kind == "blocks" { n.len() == 4 } else { matches!(n.len(), 3 | 4) };
    if !ok_len || n[0] == 0 || n[1] == 0 {
        return None;
    }
    Some(match kind {
        "kq" => (DecodeKernel::Quantized { nr: n[0], rg: n[1], prefetch: n[2] == 1, limbs: if n.len() == 4 && n[3] == 1 { 1 } else { 3 } }, (64, 2, 1)),
        _ => (DecodeKernel::Blocks { prefetch: n[3] == 1 }, (n[0], n[1], n[2])),
    })
}

/// [`default_mv_configs`] with the type's own decode variant.
fn type_mv_configs(ctx: &GpuContext, ty: GgmlType) -> Vec<MvConfig> {
    let (_, (wg, nr, unroll)) = decode_config(ctx, ty);
    let wg = wg.min(ctx.limits.max_compute_invocations_per_workgroup);
    let mut v = default_mv_configs(ctx);
    v[0] = MvConfig { nt: 1, wg, nr, unroll, units: false, prefetch: false, subgroups: ctx.has_subgroups(), kq: None };
    v
}

/// The kernel of the one-token (nt = 1) matvec variants.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeKernel {
    /// `matmul_dec.wgsl`: 16 bytes of weights per thread and slot; with prefetch (DV_PF = 1)
    /// or not.
    Blocks { prefetch: bool },
    /// `matmul_kq.wgsl` (Q4_0 and Q4_1 in GGUF block order, Q4_K, Q6_K; other types and permuted
    /// matrices fall back to the blocks kernel): activations quantised to 22 bits in registers once per
    /// workgroup, `nr` rows per step, `rg` steps per workgroup, integer dot products; the
    /// MvConfig's wg, nr and unroll are not used.
    Quantized { nr: u32, rg: u32, prefetch: bool, limbs: u32 },
    /// `matmul_common.wgsl`'s `mv_main`: one 8-element unit per thread and step.
    Units,
}

/// Which kernel [`MatmulOp::encode_with`] runs.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// The choice of [`MatmulOp::encode`].
    Auto,
    /// The matvec (several groups of tokens when n_tokens exceeds the largest variant's nt).
    Matvec,
    /// The portable tiled matmul (the reference of the cooperative-matrix one).
    Tiled,
    /// The tiled matmul on cooperative matrices; the portable one where the context has none
    /// ([`GpuContext::has_coop_matrix`]).
    Coop,
}

/// What a product does with its results (shaders/matmul_store.wgsl's EPI).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Epilogue {
    /// y = W x.
    #[default]
    Store,
    /// y += W x: the residual connection, with no separate add.
    Add,
    /// The matrix's rows interleave gate and up (row 2i gate i, row 2i + 1 up i, see
    /// [`GpuMatrix::upload_stacked`]): y = act(gate) * up (dReLU: relu(gate) * relu(up)), half
    /// as many values as rows.
    GatedPairs { act: Activation },
}

impl Epilogue {
    fn code(self) -> u32 {
        match self {
            Epilogue::Store => 0,
            Epilogue::Add => 1,
            Epilogue::GatedPairs { act: Activation::Silu } => 2,
            Epilogue::GatedPairs { act: Activation::Relu } => 3,
            Epilogue::GatedPairs { act: Activation::Drelu } => 4,
            Epilogue::GatedPairs { act: Activation::GeluTanh } => 5,
        }
    }

    /// Whether the epilogue combines (gate, up) row pairs into one value (half as many outputs as rows).
    pub fn pairs(self) -> bool {
        matches!(self, Epilogue::GatedPairs { .. })
    }
}

/// Where a product's results go: its rows in up to 3 consecutive sections, each (rows,
/// element offset in y); token t's values of a section start at offset + t * rows (for
/// gated pairs, one section of rows / 2 values per token). No sections: the whole matrix at
/// offset 0, which is `y[t * rows + r]`.
#[derive(Clone, Debug, Default)]
pub struct MatOut {
    pub epilogue: Epilogue,
    pub sections: Vec<(u32, u32)>,
}

impl MatOut {
    /// The whole matrix at offset 0 with this epilogue.
    pub fn with(epilogue: Epilogue) -> MatOut {
        MatOut { epilogue, sections: Vec::new() }
    }

    fn sections(&self, rows: u32) -> Vec<(u32, u32)> {
        if self.sections.is_empty() {
            return vec![(rows, 0)];
        }
        assert!(self.sections.len() <= 3 && self.sections.iter().map(|s| s.0).sum::<u32>() == rows, "output sections {:?} do not cover {rows} rows", self.sections);
        assert!(!self.epilogue.pairs() || self.sections.len() == 1, "gated pairs take one output section");
        self.sections.clone()
    }
}

/// Tokens per workgroup of the portable tiled kernel (MM_TN in matmul_common.wgsl).
const TILED_TOKENS: u32 = 64;

/// matmul_coop.wgsl's constants for `shape`.
fn coop_consts(shape: crate::gpu::tuning::CoopShape) -> [(&'static str, u32); 4] {
    [("CM_TM", shape.rows()), ("CM_TN", shape.tokens), ("CM_KB", shape.kb), ("CM_FT", shape.ft)]
}

/// Every cooperative-matrix tile `--tune coop` accepts within 48 KiB of workgroup memory (the
/// most NVIDIA's Vulkan driver offers), composed after the F16 and Q4_0 type files (the tile
/// code is the same for every type): (spec key, WGSL), for the shader-validation test.
#[doc(hidden)]
pub fn coop_variants() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for tokens in [32, 64, 128] {
        for kb in [1, 2, 4] {
            for ft in [2, 4] {
                let shape = crate::gpu::tuning::CoopShape { tokens, kb, ft };
                if shape.check(48 * 1024).is_err() {
                    continue;
                }
                for (name, src) in [F16_SRC, Q4_0_SRC].map(|t| (t.name, t.coop)) {
                    let spec = ShaderSpec::new(format!("coop {name}"), src, "mm_coop").with("EPI", 0).with_all(&coop_consts(shape));
                    out.push((spec.key(), spec.text()));
                }
            }
        }
    }
    out
}

/// Rows per workgroup of the portable tiled kernel: 128 (24 KiB of shared memory) where the
/// adapter allows, else 64 (16 KiB, WebGPU's default limit).
fn tiled_rows(ctx: &GpuContext) -> u32 {
    if ctx.limits.max_compute_workgroup_storage_size >= 24 * 1024 {
        128
    } else {
        64
    }
}

/// A workgroup grid of `groups` groups: 1D up to 65535, else 2D (kernels flatten it and skip
/// the excess).
fn grid(groups: u32) -> (u32, u32) {
    const MAX: u32 = 65535;
    if groups <= MAX {
        (groups, 1)
    } else {
        (MAX, groups.div_ceil(MAX))
    }
}

/// `n` threads rounded up to a multiple of 64 (within the adapter's limit): a workgroup that
/// ends in a partial subgroup summed wrong on lavapipe (its last subgroup was lost), and the
/// extra threads of the row kernels only idle.
fn whole_subgroups(n: u32, ctx: &GpuContext) -> u32 {
    n.next_multiple_of(64).min(ctx.limits.max_compute_invocations_per_workgroup).max(n)
}

fn bind_group(ctx: &GpuContext, pipeline: &wgpu::ComputePipeline, resources: &[(u32, wgpu::BindingResource)]) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry> = resources.iter().map(|(binding, r)| wgpu::BindGroupEntry { binding: *binding, resource: r.clone() }).collect();
    ctx.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &pipeline.get_bind_group_layout(0), entries: &entries })
}

impl GpuMatrix {
    /// Repacks a CPU matrix ([`GPU_TYPES`]; another type that dequantises becomes F16, on the
    /// GPU's side; columns a multiple of 32) into the GPU layout and uploads it, split by rows
    /// where a buffer would exceed the adapter's largest storage binding.
    pub fn upload(ctx: &GpuContext, m: &Matrix) -> Result<GpuMatrix, GpuError> {
        let limit = ctx.max_binding().min(ctx.limits.max_buffer_size);
        Self::upload_with_limit(ctx, m, limit)
    }

    /// Uploads matrices of one type and width as one, so that one dispatch computes all their
    /// products: their rows one after another (q, k and v; see [`MatOut`]'s sections), or with
    /// `interleave` two matrices of equal height alternating row by row (row 2i is row i of
    /// the first, row 2i + 1 of the second: gate and up for [`Epilogue::GatedPairs`]). None
    /// when the parts differ in type or width (or, interleaved, in height).
    pub fn upload_stacked(ctx: &GpuContext, name: &str, parts: &[&Matrix], interleave: bool) -> Result<Option<GpuMatrix>, GpuError> {
        let first = parts[0];
        if parts.iter().any(|m| m.ty != first.ty || m.cols != first.cols) || (interleave && (parts.len() != 2 || parts[1].rows != first.rows)) {
            return Ok(None);
        }
        let rows: usize = parts.iter().map(|m| m.rows).sum();
        let mut bytes = Vec::with_capacity(parts.iter().map(|m| m.n_bytes()).sum());
        if interleave {
            let rb = first.row_bytes();
            for (a, b) in first.bytes().chunks_exact(rb).zip(parts[1].bytes().chunks_exact(rb)) {
                bytes.extend_from_slice(a);
                bytes.extend_from_slice(b);
            }
        } else {
            for m in parts {
                bytes.extend_from_slice(m.bytes());
            }
        }
        Self::upload(ctx, &Matrix::from_raw(name, rows, first.cols, first.ty, &bytes)).map(Some)
    }

    /// [`upload`](Self::upload) with buffers of at most `limit` bytes (tests force splits).
    #[doc(hidden)]
    pub fn upload_with_limit(ctx: &GpuContext, m: &Matrix, limit: u64) -> Result<GpuMatrix, GpuError> {
        Self::upload_layout(ctx, m, limit, uses_perm(ctx, m.ty, m.cols))
    }

    /// [`upload`](Self::upload) in a chosen word order (benchmarks; `perm` applies only where
    /// the type's group divides the row).
    #[doc(hidden)]
    pub fn upload_layout(ctx: &GpuContext, m: &Matrix, limit: u64, perm: bool) -> Result<GpuMatrix, GpuError> {
        let perm = perm && perm_group(m.ty).is_some_and(|g| (m.cols / 32).is_multiple_of(g));
        if sources(m.ty).is_none() {
            // A type the loader kept (the CPU's kernels use it) but the GPU has no kernel for:
            // F16 on the GPU's side.
            let mut values = vec![0.0f32; m.rows * m.cols];
            if crate::quant::dequantize(m.ty, m.bytes(), &mut values).is_err() {
                return Err(GpuError::Unsupported(format!("{}: no GPU matmul kernel for {} weights", m.name, m.ty.name())));
            }
            return Self::upload_layout(ctx, &Matrix::from_f32(&m.name, m.rows, m.cols, &values, GgmlType::F16), limit, perm);
        }
        if m.cols == 0 || !m.cols.is_multiple_of(32) || m.rows == 0 {
            return Err(GpuError::Unsupported(format!("{}: GPU matrices need a multiple of 32 columns, not {}x{}", m.name, m.rows, m.cols)));
        }
        if m.rows > u32::MAX as usize / 2 || m.rows.checked_mul(m.cols).is_none_or(|n| n > u32::MAX as usize / 4) {
            return Err(GpuError::Unsupported(format!("{}: {}x{} is too large for 32-bit indexing", m.name, m.rows, m.cols)));
        }
        let (qb, sb) = layout_bytes(m.ty, m.cols);
        let fit = |per_row: usize| if per_row == 0 { usize::MAX } else { (limit / per_row as u64) as usize };
        // The quants and scales are padded by up to 16 bytes per chunk.
        let max_rows = fit(qb).min(if sb == 0 { usize::MAX } else { (limit.saturating_sub(16) / sb as u64) as usize });
        let max_rows = max_rows.min((limit.saturating_sub(16) / qb as u64) as usize);
        let per_chunk = if m.rows <= max_rows { m.rows } else { max_rows / CHUNK_ROWS_ALIGN * CHUNK_ROWS_ALIGN };
        if per_chunk == 0 {
            return Err(GpuError::Unsupported(format!(
                "{}: {} rows of {} bytes do not fit a storage binding of {limit} bytes",
                m.name, CHUNK_ROWS_ALIGN, qb
            )));
        }
        let row_bytes = m.row_bytes();
        let bytes = m.bytes();
        let mut chunks = Vec::new();
        for row0 in (0..m.rows).step_by(per_chunk) {
            let rows = per_chunk.min(m.rows - row0);
            let (q, d) = repack(m.ty, &bytes[row0 * row_bytes..(row0 + rows) * row_bytes], m.cols, perm);
            let label = format!("{} rows {row0}..{}", m.name, row0 + rows);
            let wq = ctx.upload(&label, &q);
            let wd = (!d.is_empty()).then(|| ctx.upload(&format!("{label} scales"), &d));
            let p = [rows as u32, row0 as u32, m.rows as u32, m.cols as u32];
            let params = ctx.uniform(&format!("{label} params"), bytemuck::cast_slice(&p));
            chunks.push(Chunk { rows, wq, wd, params });
        }
        Ok(GpuMatrix { rows: m.rows, cols: m.cols, ty: m.ty, name: m.name.clone(), perm, chunks })
    }

    /// GPU bytes this matrix occupies (weights, scales and the small per-chunk uniforms).
    pub fn gpu_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.wq.size() + c.wd.as_ref().map_or(0, |b| b.size()) + c.params.size()).sum()
    }

    /// Number of row-chunks (buffers of quants) the matrix was split into.
    #[doc(hidden)]
    pub fn n_chunks(&self) -> usize {
        self.chunks.len()
    }

    /// Entry point `entry` of the type's kernel source `text` (named `variant` in `sources`)
    /// with the matrix's word order (PERM).
    fn spec(&self, variant: &str, text: &'static str, entry: &str) -> ShaderSpec {
        ShaderSpec::new(format!("matmul/{}/{variant}", self.sources().name), text, entry).with("PERM", self.perm as u32)
    }

    fn sources(&self) -> &'static TypeSources {
        sources(self.ty).expect("uploaded types have kernels")
    }

    /// The few-token integer kernel (matmul_kq_tok.wgsl) for groups of `nt` tokens with shape
    /// `kq`, and the rows per workgroup; None where the type has no integer kernel, or the
    /// workgroup memory it needs (the reduction's planes, and staged activations) exceeds the
    /// adapter's, or staging asks for more than 8-bit activations: those take the blocks kernel.
    fn kq_tokens_spec(&self, ctx: &GpuContext, nt: u32, kq: KqTokens, pairs: bool, epi: u32) -> Option<(ShaderSpec, u32)> {
        let ty = kq_type(self.ty)?;
        let nb = (self.cols / 32) as u32;
        let max_wg = ctx.limits.max_compute_invocations_per_workgroup;
        // A pair's two rows meet in one step.
        let nr = if pairs { kq.nr.next_multiple_of(2) } else { kq.nr };
        let (wg, bpt, xnb) = match kq.staged {
            // As many threads as a row has blocks (up to 512; more blocks per thread beyond).
            None => {
                let bpt = nb.div_ceil(512.min(max_wg));
                (whole_subgroups(nb.div_ceil(bpt), ctx), bpt, 1)
            }
            Some(wg) => (wg, 1, nb),
        };
        let v = nr * nt;
        let parts = (wg / v).max(1);
        let shared = 4 * v * (wg + 1) + 4 * v * parts + 40 * nt * xnb;
        let ok = nr >= 1 && kq.rg >= 1 && wg <= max_wg && (kq.staged.is_none() || (kq.limbs == 1 && wg.is_power_of_two())) && matches!(kq.limbs, 1 | 3);
        if !ok || shared > ctx.limits.max_compute_workgroup_storage_size {
            return None;
        }
        let spec = ShaderSpec::new(format!("matmul/{}/kq_tok", self.sources().name), KQ_TOK_SRC, "kqt_main").with("EPI", epi).with_all(&[
            ("KQ_TYPE", ty),
            ("KQ_LIMBS", kq.limbs),
            ("KQ_WG", wg),
            ("KQ_BPT", bpt),
            ("KQ_NR", nr),
            ("KQ_RG", kq.rg),
            ("KQ_PF", (kq.prefetch && kq.staged.is_none()) as u32),
            ("KQ_NT", nt),
            ("KQ_XS", kq.staged.is_some() as u32),
            ("KQ_XNB", xnb),
        ]);
        Some((spec, nr * kq.rg))
    }

    /// The bind group entries of a product or lookup over chunk `c`: bindings 0-3 as given,
    /// the weights at 4 and 5 (scales, where the type has them), then `extra` at 6.
    fn weight_bindings<'a>(&'a self, c: &'a Chunk, first: [&'a wgpu::Buffer; 3], extra: Option<&'a wgpu::Buffer>) -> Vec<(u32, wgpu::BindingResource<'a>)> {
        let mut v: Vec<(u32, wgpu::BindingResource<'a>)> = first.iter().enumerate().map(|(i, b)| (i as u32, b.as_entire_binding())).collect();
        v.push((3, c.params.as_entire_binding()));
        v.push((4, c.wq.as_entire_binding()));
        if let Some(d) = &c.wd {
            v.push((5, d.as_entire_binding()));
        }
        if let Some(e) = extra {
            v.push((6, e.as_entire_binding()));
        }
        v
    }

    /// Builds the pipelines and bind groups of y = W x once: `x` holds up to max_tokens rows of
    /// `cols` f32, `y` up to max_tokens rows of `rows` f32 (y[t * rows + r]), `step` is the
    /// shared [`Step`](super::Step) uniform whose n_tokens the kernels read.
    pub fn bind_matmul(&self, ctx: &GpuContext, x: &wgpu::Buffer, y: &wgpu::Buffer, step: &wgpu::Buffer) -> MatmulOp {
        self.bind_matmul_out(ctx, x, y, step, &MatOut::default())
    }

    /// [`bind_matmul`](Self::bind_matmul) with the results placed and combined as `out` says
    /// (sections of y, residual add, gated pairs).
    pub fn bind_matmul_out(&self, ctx: &GpuContext, x: &wgpu::Buffer, y: &wgpu::Buffer, step: &wgpu::Buffer, out: &MatOut) -> MatmulOp {
        self.bind_matmul_variant(ctx, x, y, step, &type_mv_configs(ctx, self.ty), decode_config(ctx, self.ty).0, out)
    }

    /// [`bind_matmul`](Self::bind_matmul) with chosen matvec variants (benchmarks, tests).
    #[doc(hidden)]
    pub fn bind_matmul_with(&self, ctx: &GpuContext, x: &wgpu::Buffer, y: &wgpu::Buffer, step: &wgpu::Buffer, configs: &[MvConfig]) -> MatmulOp {
        self.bind_matmul_with_out(ctx, x, y, step, configs, &MatOut::default())
    }

    /// [`bind_matmul_with`](Self::bind_matmul_with) with an output layout and epilogue.
    #[doc(hidden)]
    pub fn bind_matmul_with_out(&self, ctx: &GpuContext, x: &wgpu::Buffer, y: &wgpu::Buffer, step: &wgpu::Buffer, configs: &[MvConfig], out: &MatOut) -> MatmulOp {
        // Tests wanting another one-token kernel name it through `bind_matmul_variant`.
        self.bind_matmul_variant(ctx, x, y, step, configs, DecodeKernel::Blocks { prefetch: true }, out)
    }

    /// [`bind_matmul_with`](Self::bind_matmul_with) with a chosen kernel for the nt = 1
    /// variants (benchmarks compare them).
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    pub fn bind_matmul_variant(&self, ctx: &GpuContext, x: &wgpu::Buffer, y: &wgpu::Buffer, step: &wgpu::Buffer, configs: &[MvConfig], decode: DecodeKernel, out: &MatOut) -> MatmulOp {
        self.bind_inner(ctx, x, y, step, configs, decode, out, None)
    }

    /// y = W rmsnorm(norm.x) with the RMSNorm before the product part of the op: one token
    /// runs the decode kernel with the norm folded in (reading `norm.x` itself, no separate
    /// dispatch); more tokens, or a type whose decode kernel has no fold, run the norm into
    /// `xn` and then the product over `xn` (which must hold as many tokens as `norm.x`).
    pub fn bind_matmul_normed(&self, ctx: &GpuContext, norm: &NormIn, xn: &wgpu::Buffer, y: &wgpu::Buffer, step: &wgpu::Buffer, out: &MatOut) -> MatmulOp {
        self.bind_inner(ctx, xn, y, step, &type_mv_configs(ctx, self.ty), decode_config(ctx, self.ty).0, out, Some(norm))
    }

    /// [`bind_matmul_normed`](Self::bind_matmul_normed) with chosen matvec variants and
    /// one-token kernel (tests).
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    pub fn bind_matmul_normed_with(&self, ctx: &GpuContext, norm: &NormIn, xn: &wgpu::Buffer, y: &wgpu::Buffer, step: &wgpu::Buffer, configs: &[MvConfig], decode: DecodeKernel, out: &MatOut) -> MatmulOp {
        self.bind_inner(ctx, xn, y, step, configs, decode, out, Some(norm))
    }

    /// [`bind_matmul_normed`](Self::bind_matmul_normed) over q, k and v stacked (`out`'s
    /// three sections) whose one-token kernel also applies RoPE to q and k and writes k and v
    /// into the KV cache at the step's position (llama's adjacent pairs only); q's section is
    /// stored rotated, k's and v's not at all. Where the kernel does not fold (see
    /// [`MatmulOp::folds`]) the product stores all three and the caller's separate RoPE + KV
    /// write must run.
    #[allow(clippy::too_many_arguments)]
    pub fn bind_matmul_normed_rope(&self, ctx: &GpuContext, norm: &NormIn, rope: &RopeIn, xn: &wgpu::Buffer, y: &wgpu::Buffer, step: &wgpu::Buffer, out: &MatOut) -> MatmulOp {
        self.bind_inner_rope(ctx, xn, y, step, &type_mv_configs(ctx, self.ty), decode_config(ctx, self.ty).0, out, Some(norm), Some(rope))
    }

    /// [`bind_matmul_normed_rope`](Self::bind_matmul_normed_rope) with chosen matvec variants
    /// and one-token kernel (tests).
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    pub fn bind_matmul_normed_rope_with(&self, ctx: &GpuContext, norm: &NormIn, rope: &RopeIn, xn: &wgpu::Buffer, y: &wgpu::Buffer, step: &wgpu::Buffer, configs: &[MvConfig], decode: DecodeKernel, out: &MatOut) -> MatmulOp {
        self.bind_inner_rope(ctx, xn, y, step, configs, decode, out, Some(norm), Some(rope))
    }

    #[allow(clippy::too_many_arguments)]
    fn bind_inner(&self, ctx: &GpuContext, x: &wgpu::Buffer, y: &wgpu::Buffer, step: &wgpu::Buffer, configs: &[MvConfig], decode: DecodeKernel, out: &MatOut, norm: Option<&NormIn>) -> MatmulOp {
        self.bind_inner_rope(ctx, x, y, step, configs, decode, out, norm, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn bind_inner_rope(&self, ctx: &GpuContext, x: &wgpu::Buffer, y: &wgpu::Buffer, step: &wgpu::Buffer, configs: &[MvConfig], decode: DecodeKernel, out: &MatOut, norm: Option<&NormIn>, rope: Option<&RopeIn>) -> MatmulOp {
        let src = self.sources();
        // Without folding the norm (and RoPE) stay separate dispatches (benchmarks).
        let fold = ctx.tuning.fold_norms;
        let rope = rope.filter(|_| fold && norm.is_some());
        // The RoPE epilogue's uniform: head_dim, rope_dim, theta_scale, freq_scale, n_ctx.
        let rope_params = rope.map(|r| {
            let sections = out.sections(self.rows as u32);
            assert!(sections.len() == 3 && sections[1].0 == sections[2].0 && !r.shape.neox && !out.epilogue.pairs() && out.epilogue != Epilogue::Add, "{}: the RoPE epilogue needs q, k, v sections, adjacent pairs and a plain store", self.name);
            let RopeShape { head_dim, rope_dim, base, freq_scale, .. } = r.shape;
            assert!(head_dim.is_multiple_of(2) && rope_dim.is_multiple_of(2) && rope_dim <= head_dim && sections[0].0.is_multiple_of(head_dim) && sections[1].0.is_multiple_of(head_dim));
            let n_ctx = (r.cache_k.size / (sections[1].0 as u64 * 2)).min(u32::MAX as u64) as u32;
            // As RopeKvOp (and the CPU): computed on the host so the backends share the bits.
            let theta_scale = base.powf(-2.0 / rope_dim as f32);
            let words = [head_dim, rope_dim, theta_scale.to_bits(), freq_scale.to_bits(), n_ctx, 0, 0, 0];
            ctx.uniform(&format!("{} rope", self.name), bytemuck::cast_slice(&words))
        });
        // The nt = 1 blocks pipeline with the norm folded in: (nr, pipeline).
        let mut folded: Option<(u32, Arc<wgpu::ComputePipeline>)> = None;
        let mut mv_pipes = Vec::new();
        let mut kq_tokens = false;
        let pairs = out.epilogue.pairs();
        let sections = out.sections(self.rows as u32);
        assert!(!pairs || self.rows.is_multiple_of(2), "{}: a gated pairs product needs an even row count", self.name);
        // The integer kernel needs Q4 blocks in GGUF order (or Q4_K's or Q6_K's groups); otherwise the
        // blocks kernel.
        let decode = match decode {
            DecodeKernel::Quantized { .. } if self.perm || !matches!(self.ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K | GgmlType::Q6_K) => DecodeKernel::Blocks { prefetch: true },
            d => d,
        };
        let epi = out.epilogue.code();
        // A pair's two rows must meet in one workgroup.
        let configs: Vec<MvConfig> = configs.iter().map(|c| MvConfig { nr: if pairs { c.nr.next_multiple_of(2) } else { c.nr }, ..*c }).collect();
        for cfg in &configs {
            let sg = cfg.subgroups && ctx.has_subgroups();
            if let (1, DecodeKernel::Quantized { nr, rg, prefetch, limbs }) = (cfg.nt, decode) {
                // As many threads as a row has blocks (up to 512; more blocks per thread beyond).
                let nb = (self.cols / 32) as u32;
                let bpt = nb.div_ceil(512.min(ctx.limits.max_compute_invocations_per_workgroup));
                let wg = whole_subgroups(nb.div_ceil(bpt), ctx);
                // A pair's two rows (gate/up, or a RoPE pair) meet in one step.
                let nr = if pairs || rope.is_some() { nr.next_multiple_of(2) } else { nr };
                assert!(nr >= 1 && rg >= 1 && (2 * nr + 1) * wg * 4 <= ctx.limits.max_compute_workgroup_storage_size, "bad integer matvec config {decode:?}");
                let pf = prefetch as u32;
                let kq_type = kq_type(self.ty).expect("checked above");
                let kq_spec = |folded: bool| {
                    let (name, text) = match (sg, folded, folded && rope.is_some()) {
                        (false, false, _) => ("kq", KQ_SRC),
                        (true, false, _) => ("kq_sg", KQ_SG_SRC),
                        (false, true, false) => ("kq_norm", KQ_NORM_SRC),
                        (true, true, false) => ("kq_sg_norm", KQ_SG_NORM_SRC),
                        (false, true, true) => ("kq_norm_rope", KQ_NORM_ROPE_SRC),
                        (true, true, true) => ("kq_sg_norm_rope", KQ_SG_NORM_ROPE_SRC),
                    };
                    let mut spec = ShaderSpec::new(format!("matmul/{name}"), text, if sg { "kq_main_sg" } else { "kq_main" })
                        .with("EPI", epi)
                        .with_all(&[("KQ_TYPE", kq_type), ("KQ_LIMBS", limbs), ("KQ_WG", wg), ("KQ_BPT", bpt), ("KQ_NR", nr), ("KQ_RG", rg), ("KQ_PF", pf)]);
                    if let (true, Some(n)) = (folded, norm) {
                        spec.set("DV_EPS_BITS", n.eps.to_bits());
                    }
                    spec
                };
                if fold && norm.is_some() {
                    folded = Some((nr * rg, ctx.pipeline(&kq_spec(true))));
                }
                mv_pipes.push((MvConfig { nr: nr * rg, ..*cfg }, ctx.pipeline(&kq_spec(false))));
                continue;
            }
            if let (true, Some(kq)) = (cfg.nt > 1 && !cfg.units && !self.perm, cfg.kq) {
                if let Some((spec, rows)) = self.kq_tokens_spec(ctx, cfg.nt, kq, pairs, epi) {
                    kq_tokens = true;
                    mv_pipes.push((MvConfig { nr: rows, ..*cfg }, ctx.pipeline(&spec)));
                    continue;
                }
            }
            if cfg.nt > 1 && !cfg.units {
                // The few-token blocks kernel (no folded norm: only one token folds).
                assert!(
                    (1..=4).contains(&cfg.unroll) && cfg.nr >= 1 && cfg.wg.is_power_of_two() && cfg.wg <= ctx.limits.max_compute_invocations_per_workgroup,
                    "bad matvec config {cfg:?}"
                );
                assert!(cfg.wg * (cfg.nr * cfg.nt + 1) * 4 <= ctx.limits.max_compute_workgroup_storage_size, "matvec config {cfg:?} needs too much shared memory");
                let pf = cfg.prefetch as u32;
                let (name, text) = if sg { ("dec_sg", src.dec_sg) } else { ("dec", src.dec) };
                let spec = self
                    .spec(name, text, if sg { "dvt_main_sg" } else { "dvt_main" })
                    .with("EPI", epi)
                    .with_all(&[("DV_WG", cfg.wg), ("DV_NR", cfg.nr), ("DV_UB", cfg.unroll), ("DV_PF", pf), ("DV_NT", cfg.nt)]);
                mv_pipes.push((*cfg, ctx.pipeline(&spec)));
                continue;
            }
            let blocks = cfg.nt == 1 && decode != DecodeKernel::Units;
            let pf = matches!(decode, DecodeKernel::Blocks { prefetch: true }) as u32;
            let max_unroll = if blocks { 4 } else { 2 };
            assert!(
                cfg.nt >= 1 && cfg.nr >= 1 && (1..=max_unroll).contains(&cfg.unroll) && cfg.wg.is_power_of_two() && cfg.wg <= ctx.limits.max_compute_invocations_per_workgroup,
                "bad matvec config {cfg:?}"
            );
            // The reduction keeps every thread's partial sums in shared memory.
            assert!(cfg.wg * cfg.nr * cfg.nt * 4 <= ctx.limits.max_compute_workgroup_storage_size, "matvec config {cfg:?} needs too much shared memory");
            let spec = if blocks {
                let dec_spec = |folded: bool| {
                    let (name, text) = match (sg, folded, folded && rope.is_some()) {
                        (false, false, _) => ("dec", src.dec),
                        (true, false, _) => ("dec_sg", src.dec_sg),
                        (false, true, false) => ("dec_norm", src.dec_norm),
                        (true, true, false) => ("dec_sg_norm", src.dec_sg_norm),
                        (false, true, true) => ("dec_norm_rope", src.dec_norm_rope),
                        (true, true, true) => ("dec_sg_norm_rope", src.dec_sg_norm_rope),
                    };
                    // A RoPE pair's two rows must meet in one workgroup.
                    let nr = if folded && rope.is_some() { cfg.nr.next_multiple_of(2) } else { cfg.nr };
                    // Activations per word (DV_XW): per row (1) was 2% faster for Q4_0 on an
                    // H200 than per slot (0); once for all rows (2) loads half as much, which
                    // a folded norm's extra loads need. The same code for the other types.
                    // The tuning's decode_xw overrides (benchmarks).
                    let xw = ctx.tuning.decode_xw.filter(|&v| v <= 2).unwrap_or(2 * (self.ty == GgmlType::Q4_0) as u32);
                    let mut spec = self
                        .spec(name, text, if sg { "dv_main_sg" } else { "dv_main" })
                        .with("EPI", epi)
                        .with_all(&[("DV_WG", cfg.wg), ("DV_NR", nr), ("DV_UB", cfg.unroll), ("DV_PF", pf), ("DV_XW", xw)]);
                    if let (true, Some(n)) = (folded, norm) {
                        spec.set("DV_EPS_BITS", n.eps.to_bits());
                    }
                    (spec, nr)
                };
                if fold && norm.is_some() && cfg.nt == 1 {
                    let (spec, nr) = dec_spec(true);
                    folded = Some((nr, ctx.pipeline(&spec)));
                }
                dec_spec(false).0
            } else {
                let (name, text) = if sg { ("mm_sg", src.mm_sg) } else { ("mm", src.mm) };
                self
                    .spec(name, text, if sg { "mv_main_sg" } else { "mv_main" })
                    .with("EPI", epi)
                    .with_all(&[("MV_WG", cfg.wg), ("MV_NR", cfg.nr), ("MV_NT", cfg.nt), ("MV_UNROLL", cfg.unroll)])
            };
            mv_pipes.push((*cfg, ctx.pipeline(&spec)));
        }
        mv_pipes.sort_by_key(|(c, _)| c.nt);
        let tm = tiled_rows(ctx);
        let tiled_spec = self.spec("mm", src.mm, "mm_tiled").with("EPI", epi).with("MM_TM", tm);
        let tiled = ctx.pipeline(&tiled_spec);
        let shape = ctx.tuning.coop_shape;
        let coop_spec = self.spec("coop", src.coop, "mm_coop").with("EPI", epi).with_all(&coop_consts(shape));
        let coop = ctx.has_coop_matrix().then(|| (ctx.pipeline(&coop_spec), shape.rows(), shape.tokens));
        // MatOut of matmul_store.wgsl: section ends (whole-matrix rows), then offsets.
        let r = self.rows as u32;
        let mut words = [r, r, r, r, 0, 0, 0, 0];
        let mut end = 0;
        for (i, &(rows, offset)) in sections.iter().enumerate() {
            end += rows;
            words[i] = end;
            words[4 + i] = offset;
        }
        let mat_out = ctx.uniform(&format!("{} out", self.name), bytemuck::cast_slice(&words));
        let chunks = self
            .chunks
            .iter()
            .map(|c| {
                let res = || self.weight_bindings(c, [x, y, step], Some(&mat_out));
                let mv = mv_pipes.iter().map(|(cfg, p)| (cfg.nt, cfg.nr, p.clone(), bind_group(ctx, p, &res()))).collect();
                let folded = folded.as_ref().zip(norm).map(|((nr, p), n)| {
                    let mut entries = self.weight_bindings(c, [n.x, y, step], Some(&mat_out));
                    entries.push((7, n.weight.as_entire_binding()));
                    if let (Some(r), Some(p)) = (rope, &rope_params) {
                        entries.extend([(8, r.cache_k.binding()), (9, r.cache_v.binding()), (10, p.as_entire_binding())]);
                    }
                    (*nr, p.clone(), bind_group(ctx, p, &entries))
                });
                let coop = coop.as_ref().map(|(p, rows, tokens)| (p.clone(), bind_group(ctx, p, &res()), *rows, *tokens));
                OpChunk { rows: c.rows as u32, mv, tiled: (tiled.clone(), bind_group(ctx, &tiled, &res())), tiled_rows: tm, coop, folded }
            })
            .collect();
        // Elements of y that n tokens reach: the end of the last section's n rows.
        let y_per_token: Vec<(u64, u64)> = sections.iter().map(|&(rows, offset)| (offset as u64, if pairs { rows as u64 / 2 } else { rows as u64 })).collect();
        let norm = norm.map(|n| {
            assert!(n.x.size() <= x.size(), "{}: the normalised rows must fit the product's input", self.name);
            super::ops::RmsNormOp::new(ctx, n.x, n.weight, x, self.cols as u32, n.eps, step)
        });
        MatmulOp { chunks, cols: self.cols as u64, x_size: x.size(), y_size: y.size(), y_per_token, norm, kq_tokens, _mat_out: mat_out, _rope_params: rope_params }
    }

    /// Builds the embedding lookup out[i] = row ids[i] (dequantised f32) for i < n_tokens of
    /// `step`: `ids` holds u32 row numbers, `out` n_tokens rows of `cols` f32. Ids out of range
    /// leave their output row unwritten.
    pub fn bind_get_rows(&self, ctx: &GpuContext, ids: &wgpu::Buffer, out: &wgpu::Buffer, step: &wgpu::Buffer) -> GetRowsOp {
        let src = self.sources();
        let spec = self.spec("get_rows", src.get_rows, "get_rows");
        let p = ctx.pipeline(&spec);
        let groups = self
            .chunks
            .iter()
            .map(|c| bind_group(ctx, &p, &self.weight_bindings(c, [ids, out, step], None)))
            .collect();
        GetRowsOp { pipeline: p, groups, cols: self.cols as u64, out_size: out.size() }
    }
}

struct OpChunk {
    rows: u32,
    /// (nt, nr, pipeline, bind group), by increasing nt.
    mv: Vec<(u32, u32, Arc<wgpu::ComputePipeline>, wgpu::BindGroup)>,
    tiled: (Arc<wgpu::ComputePipeline>, wgpu::BindGroup),
    /// Rows per workgroup of the tiled kernel (MM_TM).
    tiled_rows: u32,
    /// The cooperative-matrix tiled kernel, where the context has cooperative matrices, with its
    /// rows and tokens per workgroup.
    coop: Option<(Arc<wgpu::ComputePipeline>, wgpu::BindGroup, u32, u32)>,
    /// The one-token decode kernel with the op's RMSNorm folded in: (nr, pipeline, bind group).
    folded: Option<(u32, Arc<wgpu::ComputePipeline>, wgpu::BindGroup)>,
}

/// RoPE and the KV-cache write in a q/k/v product's epilogue
/// ([`GpuMatrix::bind_matmul_normed_rope`]): this layer's caches (f16 pairs, `[pos][kv_dim]`).
pub struct RopeIn<'a> {
    /// One sequence's cache of this layer (a buffer, or its sequence's range of a cache of
    /// several, `GpuKvCache::k_range`).
    pub cache_k: super::ops::BufRange<'a>,
    pub cache_v: super::ops::BufRange<'a>,
    pub shape: RopeShape,
}

/// The RMSNorm before a product ([`GpuMatrix::bind_matmul_normed`]): `x` holds the raw rows
/// (as many tokens as the product's input), `weight` the norm's `cols` weights.
pub struct NormIn<'a> {
    pub x: &'a wgpu::Buffer,
    pub weight: &'a wgpu::Buffer,
    pub eps: f32,
}

/// y = W x with bound buffers; see [`GpuMatrix::bind_matmul`].
pub struct MatmulOp {
    chunks: Vec<OpChunk>,
    cols: u64,
    x_size: u64,
    y_size: u64,
    /// (element offset, elements per token) of each output section.
    y_per_token: Vec<(u64, u64)>,
    /// The RMSNorm into x that runs first, unless the decode kernel folds it in.
    norm: Option<super::ops::RmsNormOp>,
    /// Whether some few-token variant runs the integer kernel (matmul_kq_tok.wgsl).
    kq_tokens: bool,
    _mat_out: wgpu::Buffer,
    _rope_params: Option<wgpu::Buffer>,
}

impl MatmulOp {
    /// Whether some few-token variant runs the integer kernel (matmul_kq_tok.wgsl) rather than
    /// falling back to the blocks kernel (benchmarks say which ran).
    #[doc(hidden)]
    pub fn uses_kq_tokens(&self) -> bool {
        self.kq_tokens
    }

    /// Whether [`encode`](Self::encode) of `n_tokens` runs the kernel with the norm (and the
    /// RoPE epilogue, if bound) folded in.
    pub fn folds(&self, n_tokens: u32) -> bool {
        self.folds_with(n_tokens, Kernel::Auto)
    }

    fn folds_with(&self, n_tokens: u32, kernel: Kernel) -> bool {
        n_tokens == 1 && !matches!(kernel, Kernel::Tiled | Kernel::Coop) && self.norm.is_some() && self.chunks.iter().all(|c| c.folded.is_some())
    }

    /// Records the product for `n_tokens` tokens (the Step uniform's n_tokens for this
    /// forward): the matvec up to [`MATVEC_MAX_TOKENS`] tokens, else the tiled matmul.
    pub fn encode(&self, pass: &mut wgpu::ComputePass<'_>, n_tokens: u32) {
        self.encode_with(pass, n_tokens, Kernel::Auto)
    }

    /// [`encode`](Self::encode) with a forced kernel (tests, benchmarks).
    #[doc(hidden)]
    pub fn encode_with(&self, pass: &mut wgpu::ComputePass<'_>, n_tokens: u32, kernel: Kernel) {
        if n_tokens == 0 {
            return;
        }
        let n = n_tokens as u64;
        assert!(n * self.cols * 4 <= self.x_size, "matmul: {n_tokens} tokens of {} columns overflow x ({} bytes)", self.cols, self.x_size);
        for &(offset, per_token) in &self.y_per_token {
            assert!((offset + n * per_token) * 4 <= self.y_size, "matmul: {n_tokens} tokens of {per_token} values from element {offset} overflow y ({} bytes)", self.y_size);
        }
        let matvec = match kernel {
            Kernel::Auto => n_tokens <= MATVEC_MAX_TOKENS,
            Kernel::Matvec => true,
            Kernel::Tiled | Kernel::Coop => false,
        };
        // Auto takes the cooperative-matrix kernel wherever it was built.
        let coop = matches!(kernel, Kernel::Auto | Kernel::Coop);
        if let Some(norm) = &self.norm {
            if self.folds_with(n_tokens, kernel) {
                for c in &self.chunks {
                    let (nr, p, bg) = c.folded.as_ref().expect("checked above");
                    let (gx, gy) = grid(c.rows.div_ceil(*nr));
                    pass.set_pipeline(p);
                    pass.set_bind_group(0, bg, &[]);
                    pass.dispatch_workgroups(gx, gy, 1);
                }
                return;
            }
            norm.encode(pass, n_tokens);
        }
        for c in &self.chunks {
            if matvec {
                // The smallest variant covering all tokens, else the largest in several groups.
                let (nt, nr, p, bg) = c.mv.iter().find(|m| m.0 >= n_tokens).or(c.mv.last()).expect("matvec variants are bound");
                let (gx, gy) = grid(c.rows.div_ceil(*nr));
                pass.set_pipeline(p);
                pass.set_bind_group(0, bg, &[]);
                pass.dispatch_workgroups(gx, gy, n_tokens.div_ceil(*nt));
            } else if let (true, Some((p, bg, rows, tokens))) = (coop, &c.coop) {
                pass.set_pipeline(p);
                pass.set_bind_group(0, bg, &[]);
                pass.dispatch_workgroups(c.rows.div_ceil(*rows), n_tokens.div_ceil(*tokens), 1);
            } else {
                let (p, bg) = &c.tiled;
                pass.set_pipeline(p);
                pass.set_bind_group(0, bg, &[]);
                pass.dispatch_workgroups(c.rows.div_ceil(c.tiled_rows), n_tokens.div_ceil(TILED_TOKENS), 1);
            }
        }
    }
}

/// Embedding lookup with bound buffers; see [`GpuMatrix::bind_get_rows`].
pub struct GetRowsOp {
    pipeline: Arc<wgpu::ComputePipeline>,
    groups: Vec<wgpu::BindGroup>,
    cols: u64,
    out_size: u64,
}

impl GetRowsOp {
    /// Records the lookup of `n` ids (n must equal the Step uniform's n_tokens).
    pub fn encode(&self, pass: &mut wgpu::ComputePass<'_>, n: u32) {
        if n == 0 {
            return;
        }
        assert!(n as u64 * self.cols * 4 <= self.out_size, "get_rows: {n} rows of {} columns overflow out ({} bytes)", self.cols, self.out_size);
        let (gx, gy) = grid(n);
        pass.set_pipeline(&self.pipeline);
        for bg in &self.groups {
            pass.set_bind_group(0, bg, &[]);
            pass.dispatch_workgroups(gx, gy, 1);
        }
    }
}
