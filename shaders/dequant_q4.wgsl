// Prelude (composed before the kernels that decode 4-bit quants: the Q4/Q5/Q6 type files and
// the sparse kernels): nibbles become floats without int-to-float conversions (a quarter of the
// FMA rate on NVIDIA). A nibble q at bit p <= 16 of a word, or'ed into the bits of 2^(23-p),
// reads as exactly 2^(23-p) + q, so subtracting Q4_LO_POW / Q4_HI_POW leaves q exactly, and
// subtracting them plus a type's offset (Q4_0's 8, Q5_0's 16, Q6_K's 32) leaves q - offset.
// Mask and or fuse into one logic op on NVIDIA, so an element costs a logic op, an add and a
// multiply-add. The nibbles above bit 16 are taken from the word shifted down by 12 (s = w >> 12:
// 24 -> 12, 20 -> 8, 28 -> 16); callers compute s once for both halves.

// Low nibbles: bits 0, 8, 16 of w and 12 of s; high nibbles: bits 4, 12 of w and 8, 16 of s.
const Q4_LO_MASK = vec4<u32>(0xFu, 0xF00u, 0xF0000u, 0xF000u);
const Q4_HI_MASK = vec4<u32>(0xF0u, 0xF000u, 0xF00u, 0xF0000u);
// Bits of 2^(23-p): (150 - p) << 23, for p = 0, 8, 16, 12 and 4, 12, 8, 16.
const Q4_LO_MAGIC = vec4<u32>(0x4B000000u, 0x47000000u, 0x43000000u, 0x45000000u);
const Q4_HI_MAGIC = vec4<u32>(0x49000000u, 0x45000000u, 0x47000000u, 0x43000000u);
// 2^(23-p) as floats.
const Q4_LO_POW = vec4<f32>(8388608.0, 32768.0, 128.0, 2048.0);
const Q4_HI_POW = vec4<f32>(524288.0, 2048.0, 32768.0, 128.0);

// 2^(23-p) + q for the low nibbles q of w's four bytes (elements 4k..4k+3 of a block whose
// word k is w), s = w >> 12: subtract Q4_LO_POW (plus the offset) to get the quants.
fn q4_lo_pow(w: u32, s: u32) -> vec4<f32> {
    return bitcast<vec4<f32>>((vec4<u32>(w, w, w, s) & Q4_LO_MASK) | Q4_LO_MAGIC);
}

// The same for the high nibbles (elements 16 + 4k..16 + 4k + 3): subtract Q4_HI_POW.
fn q4_hi_pow(w: u32, s: u32) -> vec4<f32> {
    return bitcast<vec4<f32>>((vec4<u32>(w, w, s, s) & Q4_HI_MASK) | Q4_HI_MAGIC);
}

// w's low nibbles minus `offset`, as floats, for kernels whose type (so offset) is a runtime
// value (the sparse kernels): the same subtraction, of 2^(23-p) + offset.
fn q4_lo(w: u32, offset: f32) -> vec4<f32> {
    return q4_lo_pow(w, w >> 12u) - (Q4_LO_POW + offset);
}

// w's high nibbles minus `offset`, as floats.
fn q4_hi(w: u32, offset: f32) -> vec4<f32> {
    return q4_hi_pow(w, w >> 12u) - (Q4_HI_POW + offset);
}
