// Prelude (composed before the Q8_0 type files and the sparse kernels): signed bytes become
// floats without int-to-float conversions (a quarter of the FMA rate on NVIDIA), as
// dequant_q4.wgsl's nibbles. With the sign bit flipped (u = q + 128), a byte at bit p <= 8,
// or'ed into the bits of 2^(23-p), gives exactly 2^(23-p) + u, and subtracting 2^(23-p) + 128
// leaves q. Bytes 2 and 3 are shifted down by 16 first.
const Q8_MASK = vec4<u32>(0xFFu, 0xFF00u, 0xFFu, 0xFF00u);
const Q8_MAGIC = vec4<u32>(0x4B000000u, 0x47000000u, 0x4B000000u, 0x47000000u);
const Q8_SUB = vec4<f32>(8388736.0, 32896.0, 8388736.0, 32896.0);

// The four signed bytes of w (elements 4k..4k+3 of a block whose word k is w), as floats.
fn i8x4_to_f32(w: u32) -> vec4<f32> {
    let a = w ^ 0x80808080u;
    let s = a >> 16u;
    return bitcast<vec4<f32>>((vec4<u32>(a, a, s, s) & Q8_MASK) | Q8_MAGIC) - Q8_SUB;
}
