//! Element-wise and row-wise operations of the forward pass.

use crate::model::{Activation, RopeStyle};

/// `out = x / rms(x) * weight` for each row of `x`. The sum of squares is accumulated in f64
/// and the scale computed as `1 / sqrt(mean + eps)` in f32, as llama.cpp does.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    for (row, o) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let sum: f64 = row.iter().map(|&v| (v * v) as f64).sum();
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = (v * scale) * w;
        }
    }
}

/// [`rms_norm`] in place: each `weight.len()` values of `x` divided by their RMS and scaled by
/// `weight` (qwen3's per-head q/k norms run it over rows of one head).
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let n = weight.len();
    for row in x.chunks_exact_mut(n) {
        let sum: f64 = row.iter().map(|&v| (v * v) as f64).sum();
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for (v, &w) in row.iter_mut().zip(weight) {
            *v = (*v * scale) * w;
        }
    }
}

/// Precomputed RoPE angles for a model: `theta_i = pos * base^(-2i/d)`, built by repeated
/// multiplication in f32 like llama.cpp so both agree to the bit.
pub struct Rope {
    pub dim: usize,
    pub style: RopeStyle,
    theta_scale: f32,
    freq_scale: f32,
}

impl Rope {
    pub fn new(dim: usize, base: f32, freq_scale: f32, style: RopeStyle) -> Self {
        Rope { dim, style, theta_scale: base.powf(-2.0 / dim as f32), freq_scale }
    }

    /// (cos, sin) for each of the `dim / 2` pairs at position `pos`.
    pub fn angles(&self, pos: usize) -> Vec<(f32, f32)> {
        let mut theta = pos as f32;
        (0..self.dim / 2)
            .map(|_| {
                let t = self.freq_scale * theta;
                theta *= self.theta_scale;
                (t.cos(), t.sin())
            })
            .collect()
    }

    /// Rotates every head (`head_dim` values each) of one token's vector in place.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, angles: &[(f32, f32)]) {
        #[cfg(target_arch = "x86_64")]
        if x86::has_fma() {
            // SAFETY: the CPU has FMA.
            return unsafe { x86::rope_apply(self, x, head_dim, angles) };
        }
        self.apply_body(x, head_dim, angles)
    }

    /// The rotation; `mul_add` is a call into the C library unless the caller is compiled
    /// with FMA, hence the x86 twin that inlines this.
    #[inline(always)]
    fn apply_body(&self, x: &mut [f32], head_dim: usize, angles: &[(f32, f32)]) {
        for head in x.chunks_exact_mut(head_dim) {
            for (i, &(c, s)) in angles.iter().enumerate() {
                let (a, b) = match self.style {
                    RopeStyle::Adjacent => (2 * i, 2 * i + 1),
                    RopeStyle::Halves => (i, i + self.dim / 2),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0.mul_add(c, -(x1 * s));
                head[b] = x0.mul_add(s, x1 * c);
            }
        }
    }
}

/// `e^x` by the polynomial that llama.cpp's vectorised SiLU uses on x86 (a range reduction
/// `x = n ln2 + b` with |b| <= ln2/2, a degree-5 polynomial in b, scaling by 2^n; after Arm's
/// optimized-routines expf). Its results differ from the C library's `expf` in the last bit now
/// and then; such a bit can flip an 8-bit activation quantisation downstream and, through it, a
/// nearly tied greedy token, so ember computes SiLU the same way.
pub fn exp_poly(x: f32) -> f32 {
    exp_poly_body(x)
}

/// [`exp_poly`]'s operations, inlined into callers compiled with FMA.
#[inline(always)]
fn exp_poly_body(x: f32) -> f32 {
    // The constants as exact bit patterns (hex floats in the literature).
    const SHIFT: f32 = 12582912.0; // 1.5 * 2^23: adding it rounds to an integer
    let log2e = f32::from_bits(0x3fb8aa3b);
    let ln2_hi = f32::from_bits(0x3f317200);
    let ln2_lo = f32::from_bits(0x35bfbe8e);
    let c = [f32::from_bits(0x3f7ffff6), f32::from_bits(0x3efffedb), f32::from_bits(0x3e2aaf33), f32::from_bits(0x3d2b9f17), f32::from_bits(0x3c072010)];
    let z = x.mul_add(log2e, SHIFT);
    let n = z - SHIFT;
    let b = (-n).mul_add(ln2_lo, (-n).mul_add(ln2_hi, x));
    let u = b * b;
    let j = c[4].mul_add(b, c[3]).mul_add(u, c[2].mul_add(b, c[1])).mul_add(u, c[0].mul_add(b, 1.0));
    if n.abs() > 126.0 {
        return scale_far(j, n);
    }
    j * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `j * 2^n` far outside SiLU's working range, where the result over- or underflows.
#[cold]
fn scale_far(j: f32, n: f32) -> f32 {
    j * 2f32.powi(n as i32)
}

/// SiLU as llama.cpp's x86 CPU backend computes it: whole groups of 16 with [`exp_poly`], the
/// remainder with the C library's `expf`. On x86 the groups run eight lanes at a time with the
/// same operations per lane (bit-identical, tested).
fn silu_gated(gate: &mut [f32], up: &[f32]) {
    let vectorised = gate.len() / 16 * 16;
    #[cfg(target_arch = "x86_64")]
    if x86::has_fma() {
        // SAFETY: the CPU has AVX2 and FMA.
        unsafe { x86::silu_gated(&mut gate[..vectorised], &up[..vectorised]) };
        return silu_tail(gate, up, vectorised);
    }
    for (g, &u) in gate[..vectorised].iter_mut().zip(up) {
        *g = *g / (1.0 + exp_poly(-*g)) * u;
    }
    silu_tail(gate, up, vectorised)
}

/// The elements past the last group of 16, with the C library's `expf`.
fn silu_tail(gate: &mut [f32], up: &[f32], from: usize) {
    for (g, &u) in gate[from..].iter_mut().zip(&up[from..]) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Scalar SiLU-gated product with [`exp_poly`] on every element: the reference the x86
/// kernel is tested against.
pub fn silu_gated_reference(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp_poly(-*g)) * u;
    }
}

/// The vectorised SiLU on its own (every element with [`exp_poly`]), for tests against
/// [`silu_gated_reference`]; the scalar reference where the CPU lacks AVX2 and FMA.
pub fn silu_gated_fast(gate: &mut [f32], up: &[f32]) {
    let n8 = gate.len() / 8 * 8;
    #[cfg(target_arch = "x86_64")]
    if x86::has_fma() {
        // SAFETY: the CPU has AVX2 and FMA.
        unsafe { x86::silu_gated(&mut gate[..n8], &up[..n8]) };
        return silu_gated_reference(&mut gate[n8..], &up[n8..]);
    }
    let _ = n8;
    silu_gated_reference(gate, up)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{exp_poly_body, Rope};
    use std::arch::x86_64::*;

    pub(super) fn has_fma() -> bool {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    #[target_feature(enable = "fma")]
    pub(super) unsafe fn rope_apply(rope: &Rope, x: &mut [f32], head_dim: usize, angles: &[(f32, f32)]) {
        rope.apply_body(x, head_dim, angles)
    }

    /// `gate = gate / (1 + exp_poly(-gate)) * up`, eight lanes at a time (a multiple of 8
    /// elements), each lane doing [`super::exp_poly`]'s operations in its order. A group
    /// with a lane outside exp's normal range (|n| > 126) is redone by the scalar code.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_gated(gate: &mut [f32], up: &[f32]) {
        debug_assert!(gate.len().is_multiple_of(8) && up.len() >= gate.len());
        let c = |bits: u32| _mm256_set1_ps(f32::from_bits(bits));
        let shift = _mm256_set1_ps(12582912.0);
        let (log2e, ln2_hi, ln2_lo) = (c(0x3fb8aa3b), c(0x3f317200), c(0x35bfbe8e));
        let (c0, c1, c2, c3, c4) = (c(0x3f7ffff6), c(0x3efffedb), c(0x3e2aaf33), c(0x3d2b9f17), c(0x3c072010));
        let one = _mm256_set1_ps(1.0);
        let sign = _mm256_set1_ps(-0.0);
        let limit = _mm256_set1_ps(126.0);
        for i in (0..gate.len()).step_by(8) {
            let gp = gate.as_mut_ptr().add(i);
            let g = _mm256_loadu_ps(gp);
            let x = _mm256_xor_ps(g, sign);
            let z = _mm256_fmadd_ps(x, log2e, shift);
            let n = _mm256_sub_ps(z, shift);
            let b = _mm256_fnmadd_ps(n, ln2_lo, _mm256_fnmadd_ps(n, ln2_hi, x));
            let u = _mm256_mul_ps(b, b);
            let hi = _mm256_fmadd_ps(_mm256_fmadd_ps(c4, b, c3), u, _mm256_fmadd_ps(c2, b, c1));
            let j = _mm256_fmadd_ps(hi, u, _mm256_fmadd_ps(c0, b, one));
            let far = _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_andnot_ps(sign, n), limit);
            let e = if _mm256_movemask_ps(far) != 0 {
                let mut lanes = [0.0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), x);
                _mm256_loadu_ps(lanes.map(exp_poly_body).as_ptr())
            } else {
                let pow = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)));
                _mm256_mul_ps(j, _mm256_castsi256_ps(pow))
            };
            let up = _mm256_loadu_ps(up.as_ptr().add(i));
            _mm256_storeu_ps(gp, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), up));
        }
    }
}

/// `gate[i] = act(gate[i]) * up[i]`: the gated FFN's hidden vector, in place.
pub fn gated_activation(act: Activation, gate: &mut [f32], up: &[f32]) {
    match act {
        Activation::Silu => silu_gated(gate, up),
        Activation::Relu => {
            for (g, &u) in gate.iter_mut().zip(up) {
                *g = if *g > 0.0 { *g * u } else { 0.0 };
            }
        }
        Activation::Drelu => {
            for (g, &u) in gate.iter_mut().zip(up) {
                *g = gated(Activation::Drelu, *g, u);
            }
        }
        Activation::GeluTanh => {
            for (g, &u) in gate.iter_mut().zip(up) {
                *g = gelu_tanh(*g) * u;
            }
        }
    }
}

/// GELU with the tanh approximation, `x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, as
/// llama.cpp's CPU backend computes it for GeGLU: from -10 to 10 the input is rounded to f16
/// and the result (computed in f32 with the C library's tanhf) rounded to f16 again (its
/// 65536-entry table); below -10 it is 0, from 10 on x itself. Matching it keeps Gemma's greedy
/// tokens on llama.cpp's; the f16 roundings are within GELU's own approximation error.
#[inline]
#[allow(clippy::excessive_precision)]
pub fn gelu_tanh(x: f32) -> f32 {
    use half::f16;
    if x <= -10.0 {
        return 0.0;
    }
    if x >= 10.0 {
        return x;
    }
    const SQRT_2_OVER_PI: f32 = 0.79788456080286535587989211986876;
    const COEF_A: f32 = 0.044715;
    let h = f16::from_f32(x).to_f32();
    let y = 0.5 * h * (1.0 + (SQRT_2_OVER_PI * h * (1.0 + COEF_A * h * h)).tanh());
    f16::from_f32(y).to_f32()
}

/// One neuron's hidden value from its gate and up pre-activations: `act(g) * u`, or for dReLU
/// `relu(g) * relu(u)`. For ReLU and dReLU the same value as [`gated_activation`] (ReLU's zero
/// may be -0 here); SiLU's scalar division may differ from the vectorised one in the last bit.
#[inline]
pub fn gated(act: Activation, g: f32, u: f32) -> f32 {
    match act {
        Activation::Drelu => {
            if g > 0.0 && u > 0.0 {
                g * u
            } else {
                0.0
            }
        }
        _ => activate(act, g) * u,
    }
}

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Index and value of the largest element (the first one on ties).
pub fn argmax(x: &[f32]) -> (usize, f32) {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, &v) in x.iter().enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best
}

/// The gate's factor `act(g)` for one neuron (the sparse paths, which see neurons one by one
/// and decide from the gate which ones to compute further). SiLU uses [`exp_poly`] like the
/// vectorised dense path. dReLU's gate factor is ReLU's; its up factor is applied by [`gated`].
pub fn activate(act: Activation, g: f32) -> f32 {
    match act {
        Activation::Silu => g / (1.0 + exp_poly(-g)),
        Activation::Relu | Activation::Drelu => g.max(0.0),
        Activation::GeluTanh => gelu_tanh(g),
    }
}
