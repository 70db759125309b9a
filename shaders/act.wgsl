// The gated FFN's activation times its up value, shared by gated_act.wgsl and the matrix
// products that fuse it (matmul_store.wgsl).
//
// SiLU uses the same e^x polynomial as the CPU backend (ember::cpu::ops::exp_poly, after
// llama.cpp's vectorised x86 SiLU) so both backends agree closely.

// e^x: x = n ln2 + b with |b| <= ln2/2, a degree-5 polynomial in b, times 2^n.
fn exp_poly(x: f32) -> f32 {
    let shift = 12582912.0; // 1.5 * 2^23: adding it rounds to an integer
    let log2e = bitcast<f32>(0x3fb8aa3bu);
    let ln2_hi = bitcast<f32>(0x3f317200u);
    let ln2_lo = bitcast<f32>(0x35bfbe8eu);
    let c0 = bitcast<f32>(0x3f7ffff6u);
    let c1 = bitcast<f32>(0x3efffedbu);
    let c2 = bitcast<f32>(0x3e2aaf33u);
    let c3 = bitcast<f32>(0x3d2b9f17u);
    let c4 = bitcast<f32>(0x3c072010u);
    // z's low mantissa bits hold round(x * log2e) (read from the bits, so no compiler can
    // fold the `z - shift` of the CPU version away).
    let z = fma(x, log2e, shift);
    let ni = bitcast<i32>(z) - bitcast<i32>(shift);
    let n = f32(ni);
    let b = fma(-n, ln2_lo, fma(-n, ln2_hi, x));
    let u = b * b;
    let j = fma(fma(fma(c4, b, c3), u, fma(c2, b, c1)), u, fma(c0, b, 1.0));
    if (abs(n) > 126.0) {
        // Far outside SiLU's working range: the result over- or underflows.
        return j * exp2(n);
    }
    return j * bitcast<f32>(u32(ni + 127) << 23u);
}

// silu(g) * u.
fn silu_mul(g: f32, u: f32) -> f32 {
    return g / (1.0 + exp_poly(-g)) * u;
}

// relu(g) * u.
fn relu_mul(g: f32, u: f32) -> f32 {
    return select(0.0, g * u, g > 0.0);
}

// dReLU: relu(g) * relu(u), zero unless both are positive (as ember::cpu::ops::gated).
fn drelu_mul(g: f32, u: f32) -> f32 {
    return select(0.0, g * u, g > 0.0 && u > 0.0);
}

// x rounded to the nearest f16 (ties to even) by bit arithmetic, for x in f16's normal range
// (GeLU's table inputs and outputs below; 2^-14 and smaller round to multiples of 2^-24).
fn act_round_f16(x: f32) -> f32 {
    let b = bitcast<u32>(x);
    let normal = bitcast<f32>((b + 0xfffu + ((b >> 13u) & 1u)) & 0xffffe000u);
    let tiny = round(x * 16777216.0) * 5.9604644775390625e-08;
    return select(normal, tiny, abs(x) < 6.103515625e-05);
}

// GeGLU: gelu(g) * u with GELU's tanh form, as llama.cpp's CPU backend computes it (and
// ember::cpu::ops::gelu_tanh): 0 from g <= -10, g * u from g >= 10, else the f16-rounded
// GELU of the f16-rounded g (its table). tanh's argument stays below 44 there.
fn gelu_mul(g: f32, u: f32) -> f32 {
    if (g <= -10.0) {
        return 0.0;
    }
    if (g >= 10.0) {
        return g * u;
    }
    let h = act_round_f16(g);
    let y = 0.5 * h * (1.0 + tanh(clamp(0.7978845608 * h * (1.0 + 0.044715 * h * h), -15.0, 15.0)));
    return act_round_f16(y) * u;
}
