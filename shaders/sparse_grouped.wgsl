// The grouped types' (5-bit and K-quant) unpacking, shared by the sparse kernels: composed
// after sparse_matvec.wgsl or sparse_batch.wgsl, which define wqv/wdw over their own bindings
// (and after kquant_scales.wgsl, for the K-quants' scales and mins).

// Group g (of n in the buffer) of a grouped-type matrix at bindings b: its quants, its high
// bits (5-bit: one word, bit e for element e; Q6_K: two words of bit pairs, elements 0..15 and
// 16..31), and (scale of elements 0..15, minimum, scale of elements 16..31), x = scale (q -
// offset) + minimum; each scale a product ggml also forms exactly.
fn grouped_fetch(b: u32, ty: u32, g: u32, n: u32) -> GUnit {
    var h = vec2<u32>(0u);
    if (ty == T_Q6_K) {
        let v = wqv(b, n + (g >> 1u));
        h = select(v.xy, v.zw, (g & 1u) == 1u);
    } else if (ty != T_Q4_K) {
        h.x = wqv(b, n + (g >> 2u))[g & 3u];
    }
    var s: vec3<f32>;
    if (ty == T_Q5_0) {
        let d = half_of(wdw(b, g >> 1u), g);
        s = vec3<f32>(d, 0.0, d);
    } else if (ty == T_Q5_1) {
        let dm = unpack2x16float(wdw(b, g));
        s = vec3<f32>(dm.x, dm.y, dm.x);
    } else if (ty == T_Q6_K) {
        let sb = g >> 3u;
        let sub = g & 7u;
        let sc = bitcast<i32>(wdw(b, 4u * sb + (sub >> 1u)));
        let sh = 16u * (sub & 1u);
        let d = half_of(wdw(b, 4u * (n >> 3u) + (sb >> 1u)), sb);
        s = vec3<f32>(d * f32(extractBits(sc, sh, 8u)), 0.0, d * f32(extractBits(sc, sh + 8u, 8u)));
    } else {
        let sb = 4u * (g >> 3u);
        let hd = vec4<u32>(wdw(b, sb), wdw(b, sb + 1u), wdw(b, sb + 2u), wdw(b, sb + 3u));
        let dm = unpack2x16float(hd.x);
        let sm = k4_scale_min(hd, g & 7u);
        s = vec3<f32>(dm.x * sm.x, -(dm.y * sm.y), dm.x * sm.x);
    }
    return GUnit(wqv(b, g), h, s);
}

struct GUnit {
    q: vec4<u32>,
    h: vec2<u32>,
    s: vec3<f32>,
}

// The offset a grouped type's quants are stored with.
fn grouped_bias(ty: u32) -> f32 {
    return select(select(0.0, 16.0, ty == T_Q5_0), 32.0, ty == T_Q6_K);
}

// Whether a grouped type has a minimum.
fn grouped_min(ty: u32) -> bool {
    return ty == T_Q5_1 || ty == T_Q4_K || ty == T_Q5_K;
}

// The high bits of word k's four elements in the low (hi_half false) or high nibbles, times 16.
fn grouped_high(ty: u32, h: vec2<u32>, k: u32, hi_half: bool) -> vec4<f32> {
    if (ty == T_Q6_K) {
        let w = select(h.x, h.y, hi_half);
        return vec4<f32>((vec4<u32>(w >> (8u * k)) >> vec4<u32>(0u, 2u, 4u, 6u)) & vec4<u32>(3u)) * 16.0;
    }
    if (ty == T_Q4_K) {
        return vec4<f32>(0.0);
    }
    let w = select(h.x, h.x >> 16u, hi_half);
    return vec4<f32>((vec4<u32>(w >> (4u * k)) >> vec4<u32>(0u, 1u, 2u, 3u)) & vec4<u32>(1u)) * 16.0;
}
