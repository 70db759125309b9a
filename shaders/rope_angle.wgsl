// Prelude (composed before rope_kv.wgsl and matmul_dec_rope.wgsl): RoPE's rotation angle, one
// function so that the separate RoPE dispatch and the decode product's RoPE epilogue rotate bit
// for bit alike. theta_i = pos * theta_scale^i is built by repeated multiplication in f32, as
// the CPU backend (and llama.cpp) does, and reduced to [-pi, pi] before cos and sin so GPU
// trigonometry stays accurate at large positions.

// 2 pi in four parts, the first three of 8 significant bits, so that n * part is exact for
// n < 2^16 (|t| < 400000) and the reduction needs no fused multiply-add (which some drivers,
// lavapipe among them, do not fuse).
const ROPE_TWO_PI_1: f32 = 6.28125;
const ROPE_TWO_PI_2: f32 = 0.00193023681640625;
const ROPE_TWO_PI_3: f32 = 5.066394805908203e-06;
const ROPE_TWO_PI_4: f32 = 3.968374517882012e-09;
const ROPE_INV_TWO_PI: f32 = 0.15915493667125702;

// (cos, sin) of rotation pair i's angle at position pos: freq_scale * pos * theta_scale^i.
fn rope_angle(pos: u32, i: u32, theta_scale: f32, freq_scale: f32) -> vec2<f32> {
    var theta = f32(pos);
    for (var j = 0u; j < i; j++) {
        theta *= theta_scale;
    }
    let t = freq_scale * theta;
    let n = round(t * ROPE_INV_TWO_PI);
    let r = (((t - n * ROPE_TWO_PI_1) - n * ROPE_TWO_PI_2) - n * ROPE_TWO_PI_3) - n * ROPE_TWO_PI_4;
    return vec2<f32>(cos(r), sin(r));
}
