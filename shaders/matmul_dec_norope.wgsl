// The decode matvec stores through matmul_store.wgsl (no RoPE epilogue; the other choice is
// matmul_dec_rope.wgsl). Composed after matmul_dec.wgsl.

const DV_ROPE: bool = false;

fn dv_rope_store(t: u32, r: u32, a: f32, b: f32) {}
