// Q2_K slots of the decode matvec (matmul_dec.wgsl), in the 2-bit layout of src/gpu/kquant.rs:
// a slot is one 32-element group, 8 bytes of 2-bit quants (byte k: elements 4k..4k+3 at bits 0,
// 2, 4, 6; half of a vec4 load); its two scale bytes (low nibble scale, high nibble min, one per
// 16 elements) in its super-block's vec4 of wd, and the super-block's `d | dmin << 16` in wd's
// second segment (word 4 SB + super-block). x = d * sc * q - dmin * m.

@group(0) @binding(4) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> wd: array<vec4<u32>>;

const PERM: u32 = 0u;
// Elements per slot.
const SLOT: u32 = 32u;

// a[k]: elements 4k..4k+3; sum: of elements 0..15 and of 16..31 (for the minimums).
struct XSlot {
    a: array<vec4<f32>, 8>,
    sum: vec2<f32>,
}

// Quants (elements 0..15, 16..31), the word holding the two scale bytes (at bit sc_shift), and
// the super-block's d and dmin.
struct WSlot {
    q: vec2<u32>,
    sc: u32,
    sc_shift: u32,
    dm: u32,
}

fn slot_fetch(b: u32) -> WSlot {
    let g = chunk.rows * (chunk.cols / 32u);
    let qv = wq[b >> 1u];
    let sb = b >> 3u;
    let sub = b & 7u;
    return WSlot(select(qv.xy, qv.zw, (b & 1u) == 1u), wd[sb][sub >> 1u], 16u * (sub & 1u), wd[(g >> 3u) + (sb >> 2u)][sb & 3u]);
}

fn slot_x(row4: u32, j: u32) -> XSlot {
    var a: array<vec4<f32>, 8>;
    let c = row4 + 8u * j;
    var s0 = vec4<f32>(0.0);
    var s1 = vec4<f32>(0.0);
    for (var k = 0u; k < 4u; k++) {
        a[k] = xa(c + k);
        a[4u + k] = xa(c + 4u + k);
        s0 += a[k];
        s1 += a[4u + k];
    }
    return XSlot(a, vec2<f32>((s0.x + s0.y) + (s0.z + s0.w), (s1.x + s1.y) + (s1.z + s1.w)));
}

const FIELDS = vec4<u32>(0u, 2u, 4u, 6u);

// sum (d sc q - dmin m) x over the slot.
fn slot_dot(w: WSlot, xs: XSlot) -> f32 {
    var lo = 0.0;
    var hi = 0.0;
    for (var k = 0u; k < 4u; k++) {
        lo += dot(vec4<f32>((vec4<u32>(w.q.x >> (8u * k)) >> FIELDS) & vec4<u32>(3u)), xs.a[k]);
        hi += dot(vec4<f32>((vec4<u32>(w.q.y >> (8u * k)) >> FIELDS) & vec4<u32>(3u)), xs.a[4u + k]);
    }
    let s = w.sc >> w.sc_shift;
    let dm = unpack2x16float(w.dm);
    return dm.x * (f32(s & 15u) * lo + f32((s >> 8u) & 15u) * hi) - dm.y * (f32((s >> 4u) & 15u) * xs.sum.x + f32((s >> 12u) & 15u) * xs.sum.y);
}
