// Prelude (composed before the Q4_K and Q5_K type files and sparse_grouped.wgsl): the 6-bit
// sub-block scales and minimums of a K-quant super-block header, which those kernels all read.

// Sub-block j's 6-bit scale and min from a header whose words 1..3 hold the 12 packed bytes
// (ggml's get_scale_min_k4: sub-blocks 0..3 whole in bytes 0..3 and 4..7, 4..7 split between a
// nibble of bytes 8..11 and the top two bits of bytes 0..7).
fn k4_scale_min(h: vec4<u32>, j: u32) -> vec2<f32> {
    let i = 8u * (j & 3u);
    if (j < 4u) {
        return vec2<f32>(f32((h.y >> i) & 63u), f32((h.z >> i) & 63u));
    }
    let sc = ((h.w >> i) & 15u) | (((h.y >> (i + 6u)) & 3u) << 4u);
    let m = ((h.w >> (i + 4u)) & 15u) | (((h.z >> (i + 6u)) & 3u) << 4u);
    return vec2<f32>(f32(sc), f32(m));
}
