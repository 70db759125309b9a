// y = W x[t] (stored through matmul_store.wgsl) for Q4_0 and Q4_1 weights in GGUF block order (PERM = 0 of
// matmul_q4_0.wgsl) and Q4_K in the grouped layout of src/gpu/kquant.rs: the decode matvec with
// integer dot products, one token per grid z.
//
// Why: decoding nibbles to f32 costs about 3.6 instructions per weight (mask and or, subtract,
// multiply-add, scales); this kernel needs about a third of that. (On an H200 it measured the
// same as matmul_dec.wgsl, ~45% of the copy bandwidth for Q4_0: that limit is not arithmetic
// there; it may be elsewhere.) Here each thread quantises the activations of the blocks it
// owns once, to 22-bit fixed point per block (x ~ s * xq, |xq| < 2^21: an error of 2^-22 of the
// block's largest |x|, about f32's own rounding, unlike llama.cpp's 8-bit activations), split
// into three byte limbs xq = b2 * 2^16 + b1 * 2^8 + b0 (b2 signed, b1 and b0 unsigned). A row's
// block is then 24 packed 4x8-bit dot products (one instruction each on GPUs with DP4A) plus 12
// mask and shift operations: about 1.3 instructions per weight. The sums are exact integers
// (|sum q xq| < 32 * 15 * 2^21 < 2^31), converted to f32 once per block.
//
// With KQ_LIMBS = 1 the activations are instead llama.cpp's 8-bit ones (Q8_0: xq = round(x / s),
// s = max|x| / 127 per block, |xq| <= 127) and a block is 8 dot products and 12 mask and shift
// operations: the numerics of llama.cpp's CPU Q4_0 x Q8_0 dot product, at 0.6 instructions
// per weight.
//
// Q4_K (KQ_TYPE = 2): a "block" is one 32-element group of the grouped layout, whose 16 quant
// bytes are in Q4_1's order, so the dot products are Q4_1's; the group's scale d * sc and
// minimum dmin * m come from its super-block's 16-byte header (kquant_scales.wgsl's
// k4_scale_min, composed before this file): y += d sc s_x sum(q xq) - dmin m sum(x). With 8-bit
// activations sum(x) is Q8_1's f16(s * sum xq), as llama.cpp's GPU Q4_K x Q8_1 product.
//
// Q6_K (KQ_TYPE = 3, the same grouped layout): a group's quants are its nibbles with the bit
// pairs of wq's second segment or'ed in as bits 4..5 of each byte (0..63, still packed 4x8-bit),
// and its two halves of 16 (a word's low nibbles and its high nibbles) have their own signed
// 8-bit scales: y += d s_x (sc_0 sum_0 + sc_1 sum_1), sum_h = sum (q - 32) xq over half h, the
// 32 taken off exactly through the half's sum of xq (|sum q xq| < 16 * 63 * 2^21 < 2^31 per half).
//
// A workgroup of KQ_WG threads (a multiple of 64, see src/gpu/matrix.rs) owns every block of a
// row (thread i: blocks i, i + KQ_WG, ..., KQ_BPT of them), loads and quantises their activations
// once, then walks KQ_RG steps of KQ_NR rows, loading only weights (the next step's before this
// step's arithmetic when KQ_PF = 1). Row sums meet through subgroupAdd (kq_main_sg,
// matmul_kq_sg.wgsl) or shared memory (kq_main).
//
// Composed like matmul_dec.wgsl: then matmul_dec_x.wgsl or matmul_dec_norm.wgsl (the RMSNorm
// before the product folded in: its weight multiplied into the activations before they are
// quantised, the sum of squares reduced once per workgroup, 1 / rms applied to the totals),
// then matmul_dec_norope.wgsl or matmul_dec_rope.wgsl (RoPE and the KV-cache write), then
// matmul_store.wgsl. With a pairs epilogue (gate/up or RoPE pairs) KQ_NR is even and a storing
// thread takes two adjacent rows.
//
// KQ_TYPE, KQ_LIMBS, KQ_WG, KQ_BPT, KQ_NR, KQ_RG and KQ_PF are rewritten by src/gpu/matrix.rs before
// compilation (lines exactly of the form `const NAME: u32 = <n>u;`).

struct Chunk {
    rows: u32,
    row0: u32,
    ld_y: u32,
    cols: u32,
}

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<uniform> step: Step;
@group(0) @binding(3) var<uniform> chunk: Chunk;
// Block (Q4_K: group) b's 16 quant bytes (GGUF nibble order).
@group(0) @binding(4) var<storage, read> wq: array<vec4<u32>>;
// Q4_0: the f16 scale of block b at half b; Q4_1: d | m << 16 in word b; Q4_K: the header of
// super-block b / 8 in words 4 (b / 8) .. 4 (b / 8) + 3 (word 0: d | dmin << 16); Q6_K: the 16
// signed 8-bit scales of super-block sb in words 4 sb .. 4 sb + 3, then its f16 d at half sb of
// the segment from word 4 SB (SB: super-blocks in the buffer; see src/gpu/kquant.rs).
@group(0) @binding(5) var<storage, read> wd: array<u32>;

// 0: Q4_0, 1: Q4_1, 2: Q4_K, 3: Q6_K (rows of whole super-blocks).
const KQ_TYPE: u32 = 0u;
// 3: 22-bit activations in three byte limbs; 1: 8-bit activations.
const KQ_LIMBS: u32 = 3u;
const KQ_WG: u32 = 128u;
// Blocks per thread and row.
const KQ_BPT: u32 = 1u;
// Rows per step and steps per workgroup.
const KQ_NR: u32 = 4u;
const KQ_RG: u32 = 2u;
const KQ_PF: u32 = 0u;

var<workgroup> kq_sh: array<f32, 2u * KQ_NR * KQ_WG>;
// The folded norm's sum of squares: this thread's share. The workgroup's partial sums go to
// the last KQ_WG slots of kq_sh (KQ_SS), which the second step's parts reach only after every
// thread has read the total (no extra shared memory for products without a norm).
var<private> kq_ss: f32;
const KQ_SS: u32 = 2u * KQ_NR * KQ_WG - KQ_WG;

// Whether a storing thread takes two adjacent rows.
const KQ_PAIRS: bool = EPI_PAIRS || DV_ROPE;

// A block's activations as limbs: l0[g], l1[g], l2[g] pack the bytes b0, b1, b2 of elements
// 4g..4g+3 (with one limb, l0 packs the signed 8-bit values and qsum is their sum); s is the
// scale; sum the exact f32 sum of the 32 activations (for Q4_0's -8 and the minimum of Q4_1
// and Q4_K); sub the block's group in its super-block (Q4_K); hs the sums of xq over elements
// 0..15 and 16..31 (Q6_K).
struct XQ {
    l0: array<u32, 8>,
    l1: array<u32, 8>,
    l2: array<u32, 8>,
    s: f32,
    sum: f32,
    qsum: i32,
    sub: u32,
    hs: vec2<i32>,
}

// One block of one row as loaded: quants and the packed scale (and minimum); Q4_K: d holds
// the super-block header's word 0 (d | dmin << 16) and h its words 1..3 (the packed 6-bit
// scales and minimums, decoded in kq_dot); Q6_K: d the super-block's f16 d in its low half, h.xy
// the group's two words of high bit pairs, h.z its two 8-bit scales in the low half.
struct WB {
    q: vec4<u32>,
    d: u32,
    h: vec3<u32>,
}

fn kq_group(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

fn kq_row(group: u32, rs: u32, r: u32) -> u32 {
    return (group * KQ_RG + rs) * KQ_NR + r;
}

// Quantises block j of token row x[row4..] (times the folded norm's weights; the squares of the
// raw values are added to kq_ss when `counts`: each block once per workgroup).
fn kq_quant(row4: u32, j: u32, counts: bool) -> XQ {
    var a: array<vec4<f32>, 8>;
    var m = vec4<f32>(0.0);
    var sv = vec4<f32>(0.0);
    for (var g = 0u; g < 8u; g++) {
        let raw = x[row4 + 8u * j + g];
        if (DV_NORM && counts) {
            kq_ss += dot(raw, raw);
        }
        a[g] = raw * dv_norm_w(8u * j + g);
        m = max(m, abs(a[g]));
        sv += a[g];
    }
    let amax = max(max(m.x, m.y), max(m.z, m.w));
    var r: XQ;
    r.sum = (sv.x + sv.y) + (sv.z + sv.w);
    r.sub = j & 7u;
    if (KQ_LIMBS == 1u) {
        // As llama.cpp's quantize_row_q8_0/q8_1: d = max|x| / 127, xq = round(x / d), d then
        // stored as f16 (and Q8_1's sum as f16(d * sum xq), used below for Q4_1's minimum).
        let d = amax / 127.0;
        let inv = select(0.0, 1.0 / d, amax > 0.0);
        for (var g = 0u; g < 8u; g++) {
            let v = a[g] * inv;
            // Half away from zero, as roundf.
            let q = vec4<i32>(trunc(v + select(vec4<f32>(-0.5), vec4<f32>(0.5), v >= vec4<f32>(0.0))));
            r.l0[g] = pack4xI8(q);
            let qs = dot4I8Packed(r.l0[g], 0x01010101u);
            r.qsum += qs;
            r.hs[g / 4u] += qs;
        }
        r.s = unpack2x16float(pack2x16float(vec2<f32>(d, d * f32(r.qsum)))).x;
        r.sum = unpack2x16float(pack2x16float(vec2<f32>(d, d * f32(r.qsum)))).y;
        return r;
    }
    // |xq| <= 2^21 - 1; all-zero blocks quantise to zeros.
    let inv = select(0.0, 2097151.0 / amax, amax > 0.0);
    r.s = select(0.0, amax / 2097151.0, amax > 0.0);
    for (var g = 0u; g < 8u; g++) {
        // Round to nearest without a float-to-int conversion (a quarter-rate instruction on
        // NVIDIA): adding 1.5 * 2^23 leaves the rounded integer in the low mantissa bits.
        let q = bitcast<vec4<i32>>(fma(a[g], vec4<f32>(inv), vec4<f32>(12582912.0))) - vec4<i32>(0x4B400000);
        let u = bitcast<vec4<u32>>(q);
        r.l0[g] = pack4xU8(u & vec4<u32>(0xFFu));
        r.l1[g] = pack4xU8((u >> vec4<u32>(8u)) & vec4<u32>(0xFFu));
        r.l2[g] = pack4xI8(q >> vec4<u32>(16u));
        if (KQ_TYPE == 3u) {
            r.hs[g / 4u] += (q.x + q.y) + (q.z + q.w);
        }
    }
    return r;
}

fn kq_fetch(group: u32, rs: u32, lid: u32, nb: u32) -> array<WB, KQ_NR * KQ_BPT> {
    var w: array<WB, KQ_NR * KQ_BPT>;
    for (var r = 0u; r < KQ_NR; r++) {
        // Rows past the chunk read its last row and blocks past the row its last block:
        // neither is summed.
        let row = min(kq_row(group, rs, r), chunk.rows - 1u);
        for (var s = 0u; s < KQ_BPT; s++) {
            let b = row * nb + min(lid + s * KQ_WG, nb - 1u);
            var d: u32;
            var h = vec3<u32>(0u);
            if (KQ_TYPE == 3u) {
                let g = chunk.rows * nb;
                let sb = b >> 3u;
                let sub = b & 7u;
                let hv = wq[g + (b >> 1u)];
                d = wd[4u * (g >> 3u) + (sb >> 1u)] >> (16u * (sb & 1u));
                h = vec3<u32>(select(hv.xy, hv.zw, (b & 1u) == 1u), wd[4u * sb + (sub >> 1u)] >> (16u * (sub & 1u)));
            } else if (KQ_TYPE == 2u) {
                let o = 4u * (b >> 3u);
                d = wd[o];
                h = vec3<u32>(wd[o + 1u], wd[o + 2u], wd[o + 3u]);
            } else if (KQ_TYPE == 1u) {
                d = wd[b];
            } else {
                d = wd[b >> 1u] >> ((b & 1u) * 16u);
            }
            w[r * KQ_BPT + s] = WB(wq[b], d, h);
        }
    }
    return w;
}

// The 4 bit pairs of t's low byte as bits 4..5 of 4 bytes (Q6_K).
fn kq_pairs(t: u32) -> u32 {
    let b = t & 0xFFu;
    return ((b | (b << 6u) | (b << 12u) | (b << 18u)) & 0x03030303u) << 4u;
}

// Q6_K: a group times the quantised activations, sum d sc (q - 32) x.
fn kq_dot_q6(w: WB, xq: XQ) -> f32 {
    // Word k's quants (0..63): elements 4k..4k+3 (x) and 16 + 4k.. (y).
    var q: array<vec2<u32>, 4>;
    for (var k = 0u; k < 4u; k++) {
        q[k] = vec2<u32>(w.q[k] & 0x0F0F0F0Fu, (w.q[k] >> 4u) & 0x0F0F0F0Fu) | vec2<u32>(kq_pairs(w.h.x >> (8u * k)), kq_pairs(w.h.y >> (8u * k)));
    }
    var a: vec2<i32>;
    if (KQ_LIMBS == 1u) {
        for (var k = 0u; k < 4u; k++) {
            a += vec2<i32>(dot4I8Packed(q[k].x, xq.l0[k]), dot4I8Packed(q[k].y, xq.l0[4u + k]));
        }
    } else {
        var a0 = vec2<u32>(0u);
        var a1 = vec2<u32>(0u);
        var a2 = vec2<i32>(0);
        for (var k = 0u; k < 4u; k++) {
            a0 += vec2<u32>(dot4U8Packed(q[k].x, xq.l0[k]), dot4U8Packed(q[k].y, xq.l0[4u + k]));
            a1 += vec2<u32>(dot4U8Packed(q[k].x, xq.l1[k]), dot4U8Packed(q[k].y, xq.l1[4u + k]));
            a2 += vec2<i32>(dot4I8Packed(q[k].x, xq.l2[k]), dot4I8Packed(q[k].y, xq.l2[4u + k]));
        }
        a = a2 * 65536 + bitcast<vec2<i32>>(a1 * 256u + a0);
    }
    a -= 32 * xq.hs;
    let sc = vec2<f32>(f32(extractBits(bitcast<i32>(w.h.z), 0u, 8u)), f32(extractBits(bitcast<i32>(w.h.z), 8u, 8u)));
    return unpack2x16float(w.d).x * xq.s * (sc.x * f32(a.x) + sc.y * f32(a.y));
}

// One row's block times the quantised activations.
fn kq_dot(w: WB, xq: XQ) -> f32 {
    if (KQ_TYPE == 3u) {
        return kq_dot_q6(w, xq);
    }
    if (KQ_LIMBS == 1u) {
        var a = 0i;
        for (var k = 0u; k < 4u; k++) {
            let lo = w.q[k] & 0x0F0F0F0Fu;
            let hi = (w.q[k] >> 4u) & 0x0F0F0F0Fu;
            a += dot4I8Packed(lo, xq.l0[k]) + dot4I8Packed(hi, xq.l0[4u + k]);
        }
        let dm = unpack2x16float(w.d);
        if (KQ_TYPE == 2u) {
            let sm = k4_scale_min(vec4<u32>(w.d, w.h), xq.sub);
            return (dm.x * sm.x) * xq.s * f32(a) - (dm.y * sm.y) * xq.sum;
        }
        if (KQ_TYPE == 1u) {
            return dm.x * xq.s * f32(a) + dm.y * xq.sum;
        }
        // sum (q - 8) xq exactly, as llama.cpp's integer dot product.
        return dm.x * xq.s * f32(a - 8 * xq.qsum);
    }
    var a0 = 0u;
    var a1 = 0u;
    var a2 = 0i;
    for (var k = 0u; k < 4u; k++) {
        // Word k: low nibbles are elements 4k..4k+3, high nibbles 16+4k..16+4k+3 (groups k, 4+k).
        let lo = w.q[k] & 0x0F0F0F0Fu;
        let hi = (w.q[k] >> 4u) & 0x0F0F0F0Fu;
        a0 += dot4U8Packed(lo, xq.l0[k]) + dot4U8Packed(hi, xq.l0[4u + k]);
        a1 += dot4U8Packed(lo, xq.l1[k]) + dot4U8Packed(hi, xq.l1[4u + k]);
        a2 += dot4I8Packed(lo, xq.l2[k]) + dot4I8Packed(hi, xq.l2[4u + k]);
    }
    let qx = f32(a2 * 65536 + i32(a1 * 256u + a0)) * xq.s;
    let dm = unpack2x16float(w.d);
    if (KQ_TYPE == 2u) {
        // sum (d sc q - dmin m) x
        let sm = k4_scale_min(vec4<u32>(w.d, w.h), xq.sub);
        return (dm.x * sm.x) * qx - (dm.y * sm.y) * xq.sum;
    }
    if (KQ_TYPE == 1u) {
        // sum (d q + m) x
        return dm.x * qx + dm.y * xq.sum;
    }
    // sum d (q - 8) x
    return dm.x * (qx - 8.0 * xq.sum);
}

fn kq_x(lid: u32, t: u32, nb: u32) -> array<XQ, KQ_BPT> {
    var xs: array<XQ, KQ_BPT>;
    for (var s = 0u; s < KQ_BPT; s++) {
        let b = lid + s * KQ_WG;
        xs[s] = kq_quant(t * (chunk.cols / 4u), min(b, nb - 1u), b < nb);
    }
    return xs;
}

fn kq_sums(w: array<WB, KQ_NR * KQ_BPT>, xs: array<XQ, KQ_BPT>, lid: u32, nb: u32) -> array<f32, KQ_NR> {
    var acc: array<f32, KQ_NR>;
    for (var s = 0u; s < KQ_BPT; s++) {
        if (lid + s * KQ_WG < nb) {
            for (var r = 0u; r < KQ_NR; r++) {
                acc[r] += kq_dot(w[r * KQ_BPT + s], xs[s]);
            }
        }
    }
    return acc;
}

// Row r's total from parts: the sum over k < n of kq_sh[buf + k * stride_k + r * stride_r].
fn kq_total(buf: u32, r: u32, n: u32, stride_k: u32, stride_r: u32) -> f32 {
    var total = 0.0;
    for (var k = 0u; k < n; k++) {
        total += kq_sh[buf + k * stride_k + r * stride_r];
    }
    return total;
}

// Stores step rs's rows (or row pairs) from their parts in kq_sh, times the norm's scale.
fn kq_store_step(group: u32, rs: u32, t: u32, lid: u32, buf: u32, n: u32, stride_k: u32, stride_r: u32, scale: f32) {
    if (KQ_PAIRS) {
        for (var p = lid; p < KQ_NR / 2u; p += KQ_WG) {
            let row = kq_row(group, rs, 2u * p);
            if (row < chunk.rows) {
                let a = scale * kq_total(buf, 2u * p, n, stride_k, stride_r);
                let b = scale * kq_total(buf, 2u * p + 1u, n, stride_k, stride_r);
                if (DV_ROPE) {
                    dv_rope_store(t, row, a, b);
                } else {
                    y_put_pair(t, row, a, b);
                }
            }
        }
    } else {
        for (var r = lid; r < KQ_NR; r += KQ_WG) {
            let row = kq_row(group, rs, r);
            if (row < chunk.rows) {
                y_put(t, row, scale * kq_total(buf, r, n, stride_k, stride_r));
            }
        }
    }
}

// 1 / rms of the token's row from every thread's kq_ss (1 without a folded norm), by a tree in
// shared memory.
fn kq_norm_scale(lid: u32) -> f32 {
    if (!DV_NORM) {
        return 1.0;
    }
    kq_sh[KQ_SS + lid] = kq_ss;
    var s = 1u;
    while (s < KQ_WG) {
        s <<= 1u;
    }
    for (s >>= 1u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s && lid + s < KQ_WG) {
            kq_sh[KQ_SS + lid] += kq_sh[KQ_SS + lid + s];
        }
    }
    workgroupBarrier();
    return dv_norm_scale(kq_sh[KQ_SS]);
}

// Shared-memory reduction (any adapter).
@compute @workgroup_size(KQ_WG)
fn kq_main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let group = kq_group(wid, nwg);
    let t = wid.z;
    if (t >= step.n_tokens) {
        return;
    }
    let nb = chunk.cols / 32u;
    let xs = kq_x(lid, t, nb);
    let scale = kq_norm_scale(lid);
    for (var rs = 0u; rs < KQ_RG; rs++) {
        if (kq_row(group, rs, 0u) >= chunk.rows) {
            break;
        }
        let acc = kq_sums(kq_fetch(group, rs, lid, nb), xs, lid, nb);
        let buf = (rs & 1u) * KQ_NR * KQ_WG;
        for (var r = 0u; r < KQ_NR; r++) {
            kq_sh[buf + r * KQ_WG + lid] = acc[r];
        }
        workgroupBarrier();
        kq_store_step(group, rs, t, lid, buf, KQ_WG, 1u, KQ_WG, scale);
    }
}
