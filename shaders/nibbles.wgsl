// Prelude (composed before the 5-bit and K-quant type files that read a word's nibbles as
// integers: matmul_q5_0, q5_1, q4_k, q5_k and q6_k.wgsl, which or the high bits into them).

// Word w's low and high nibbles (4 each) as integers.
fn nibbles_lo(w: u32) -> vec4<u32> {
    return (vec4<u32>(w) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(15u);
}

fn nibbles_hi(w: u32) -> vec4<u32> {
    return (vec4<u32>(w) >> vec4<u32>(4u, 12u, 20u, 28u)) & vec4<u32>(15u);
}
