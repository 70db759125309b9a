// Q5_1 slots of the decode matvec (matmul_dec.wgsl), in the layout of src/gpu/kquant.rs: as
// Q5_0 (matmul_dec_q5_0.wgsl), with each block's `d | m << 16` one word of wd. x = d * q + m.

@group(0) @binding(4) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> wd: array<vec4<u32>>;

const PERM: u32 = 0u;
// Elements per slot.
const SLOT: u32 = 32u;

// a[k]: the activations of word k's low nibbles (elements 4k..4k+3), a[4 + k] of its high
// nibbles (16 + 4k..); sum: of all 32.
struct XSlot {
    a: array<vec4<f32>, 8>,
    sum: f32,
}

struct WSlot {
    q: vec4<u32>,
    h: u32,
    dm: u32,
}

fn slot_fetch(b: u32) -> WSlot {
    let g = chunk.rows * (chunk.cols / 32u);
    return WSlot(wq[b], wq[g + (b >> 2u)][b & 3u], wd[b >> 2u][b & 3u]);
}

fn slot_x(row4: u32, j: u32) -> XSlot {
    var a: array<vec4<f32>, 8>;
    let c = row4 + 8u * j;
    var s = vec4<f32>(0.0);
    for (var k = 0u; k < 8u; k++) {
        a[k] = xa(c + k);
        s += a[k];
    }
    return XSlot(a, (s.x + s.y) + (s.z + s.w));
}

const BIT4 = vec4<u32>(1u, 2u, 4u, 8u);

// sum (d q + m) x over the slot.
fn slot_dot(w: WSlot, xs: XSlot) -> f32 {
    var acc = 0.0;
    for (var k = 0u; k < 4u; k++) {
        let q = w.q[k];
        let s = q >> 12u;
        let hl = select(vec4<f32>(0.0), vec4<f32>(16.0), (vec4<u32>(w.h >> (4u * k)) & BIT4) != vec4<u32>(0u));
        let hh = select(vec4<f32>(0.0), vec4<f32>(16.0), (vec4<u32>(w.h >> (16u + 4u * k)) & BIT4) != vec4<u32>(0u));
        let lo = q4_lo_pow(q, s) - Q4_LO_POW + hl;
        let hi = q4_hi_pow(q, s) - Q4_HI_POW + hh;
        acc += dot(lo, xs.a[k]) + dot(hi, xs.a[4u + k]);
    }
    let dm = unpack2x16float(w.dm);
    return dm.x * acc + dm.y * xs.sum;
}
