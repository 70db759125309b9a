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

const DQ_LO_MASK = vec4<u32>(0xFu, 0xF00u, 0xF0000u, 0xF000u);
const DQ_HI_MASK = vec4<u32>(0xF0u, 0xF000u, 0xF00u, 0xF0000u);
const DQ_LO_MAGIC = vec4<u32>(0x4B000000u, 0x47000000u, 0x43000000u, 0x45000000u);
const DQ_HI_MAGIC = vec4<u32>(0x49000000u, 0x45000000u, 0x47000000u, 0x43000000u);
const DQ_LO_SUB = vec4<f32>(8388608.0, 32768.0, 128.0, 2048.0);
const DQ_HI_SUB = vec4<f32>(524288.0, 2048.0, 32768.0, 128.0);
const BIT4 = vec4<u32>(1u, 2u, 4u, 8u);

// sum (d q + m) x over the slot.
fn slot_dot(w: WSlot, xs: XSlot) -> f32 {
    var acc = 0.0;
    for (var k = 0u; k < 4u; k++) {
        let q = w.q[k];
        let s = q >> 12u;
        let hl = select(vec4<f32>(0.0), vec4<f32>(16.0), (vec4<u32>(w.h >> (4u * k)) & BIT4) != vec4<u32>(0u));
        let hh = select(vec4<f32>(0.0), vec4<f32>(16.0), (vec4<u32>(w.h >> (16u + 4u * k)) & BIT4) != vec4<u32>(0u));
        let lo = bitcast<vec4<f32>>((vec4<u32>(q, q, q, s) & DQ_LO_MASK) | DQ_LO_MAGIC) - DQ_LO_SUB + hl;
        let hi = bitcast<vec4<f32>>((vec4<u32>(q, q, s, s) & DQ_HI_MASK) | DQ_HI_MAGIC) - DQ_HI_SUB + hh;
        acc += dot(lo, xs.a[k]) + dot(hi, xs.a[4u + k]);
    }
    let dm = unpack2x16float(w.dm);
    return dm.x * acc + dm.y * xs.sum;
}
