// y = sum over the active list of h[r] * D[r] (D: the hot rows of down_t, n_embd values each),
// overwriting y or adding to it (src/gpu/sparse.rs). Deterministic: every sum has a fixed order.
//
// Pass 1 (`partial_sums`): the list is cut into chunks of chunk_rows entries (list header,
// written by sparse_select.wgsl with the dispatch arguments); workgroup (tile, chunk) covers
// AX_TC units of every row of its chunk. Its AX_TC x AX_TR threads are AX_TR row lanes of
// AX_TC column threads: lane l takes the chunk's entries l, l + AX_TR, ..., so each row is read
// as runs of AX_TC contiguous 16-byte units, two rows in flight per thread. The lanes' sums
// meet in shared memory in lane order and go to partial[chunk][columns].
// Pass 2 (`reduce`): y[j] (+)= sum of partial[c][j] over the chunks in order. With no active
// row, overwrite writes zeros and add leaves y as it was.
//
// Unit layouts are those of sparse_matvec.wgsl; WTYPE, AX_TC, AX_TR and AX_ACC (vec4
// accumulators per thread: a unit's elements / 4) are rewritten by src/gpu/sparse.rs (the lines
// must stay of the form `const NAME: u32 = <n>u;`). A unit's accumulator k holds its columns
// 4k..4k+3 (for Q4 types the low nibbles of word k are columns 4k.., the high ones 16 + 4k..,
// accumulator 4 + k).

struct Params {
    // Columns of y / 4.
    n4: u32,
    // 16-byte units per row of D.
    units: u32,
    // Non-zero: y += the sum; zero: y = the sum.
    add: u32,
    pad: u32,
}

@group(0) @binding(0) var<storage, read> list: array<u32>;
@group(0) @binding(1) var<storage, read> h: array<f32>;
@group(0) @binding(2) var<storage, read_write> partial: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<vec4<f32>>;
@group(0) @binding(4) var<uniform> params: Params;
@group(0) @binding(5) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(6) var<storage, read> wd: array<u32>;

const T_F32: u32 = 0u;
const T_F16: u32 = 1u;
const T_Q8_0: u32 = 2u;
const T_Q4_0: u32 = 3u;
const T_Q4_1: u32 = 4u;

const WTYPE: u32 = 3u;
const AX_TC: u32 = 16u;
const AX_TR: u32 = 16u;
const AX_ACC: u32 = 8u;
const AX_WG: u32 = AX_TC * AX_TR;

struct Unit {
    q: vec4<u32>,
    s: vec2<f32>,
}

fn half_of(word: u32, i: u32) -> f32 {
    let v = unpack2x16float(word);
    return select(v.x, v.y, (i & 1u) == 1u);
}

fn fetch(g: u32) -> Unit {
    var s = vec2<f32>(1.0, 0.0);
    if (WTYPE == T_Q8_0) {
        s.x = half_of(wd[g >> 2u], g >> 1u);
    } else if (WTYPE == T_Q4_0) {
        s.x = half_of(wd[g >> 1u], g);
    } else if (WTYPE == T_Q4_1) {
        s = unpack2x16float(wd[g]);
    }
    return Unit(wq[g], s);
}

// Quants become floats without int-to-float conversions: dequant_q8.wgsl's i8x4_to_f32 and
// dequant_q4.wgsl's q4_lo and q4_hi.

// acc += hv * (the unit's elements). Always 8 accumulators (a Q4 block's 32 elements); the
// driver drops those a type leaves unused.
fn axpy_unit(w: Unit, hv: f32, acc: ptr<function, array<vec4<f32>, 8>>) {
    let q = w.q;
    if (WTYPE == T_F32) {
        (*acc)[0] = fma(vec4<f32>(hv), bitcast<vec4<f32>>(q), (*acc)[0]);
        return;
    }
    if (WTYPE == T_F16) {
        (*acc)[0] = fma(vec4<f32>(hv), vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y)), (*acc)[0]);
        (*acc)[1] = fma(vec4<f32>(hv), vec4<f32>(unpack2x16float(q.z), unpack2x16float(q.w)), (*acc)[1]);
        return;
    }
    let hd = vec4<f32>(hv * w.s.x);
    if (WTYPE == T_Q8_0) {
        (*acc)[0] = fma(hd, i8x4_to_f32(q.x), (*acc)[0]);
        (*acc)[1] = fma(hd, i8x4_to_f32(q.y), (*acc)[1]);
        (*acc)[2] = fma(hd, i8x4_to_f32(q.z), (*acc)[2]);
        (*acc)[3] = fma(hd, i8x4_to_f32(q.w), (*acc)[3]);
        return;
    }
    // Q4_0: hv d (q - 8); Q4_1: hv d q + hv m.
    let bias = select(0.0, 8.0, WTYPE == T_Q4_0);
    let hm = vec4<f32>(select(0.0, hv * w.s.y, WTYPE == T_Q4_1));
    (*acc)[0] = fma(hd, q4_lo(q.x, bias), (*acc)[0] + hm);
    (*acc)[1] = fma(hd, q4_lo(q.y, bias), (*acc)[1] + hm);
    (*acc)[2] = fma(hd, q4_lo(q.z, bias), (*acc)[2] + hm);
    (*acc)[3] = fma(hd, q4_lo(q.w, bias), (*acc)[3] + hm);
    (*acc)[4] = fma(hd, q4_hi(q.x, bias), (*acc)[4] + hm);
    (*acc)[5] = fma(hd, q4_hi(q.y, bias), (*acc)[5] + hm);
    (*acc)[6] = fma(hd, q4_hi(q.z, bias), (*acc)[6] + hm);
    (*acc)[7] = fma(hd, q4_hi(q.w, bias), (*acc)[7] + hm);
}

var<workgroup> lanes: array<vec4<f32>, AX_WG>;

@compute @workgroup_size(AX_WG)
fn partial_sums(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let tc = lid % AX_TC;
    let tr = lid / AX_TC;
    let units = params.units;
    let u = wid.x * AX_TC + tc;
    let chunk = wid.y;
    let count = list[0];
    let chunk_rows = list[1];
    let i0 = chunk * chunk_rows;
    let i1 = min(count, i0 + chunk_rows);
    var acc: array<vec4<f32>, 8>;
    if (u < units) {
        for (var i = i0 + tr; i < i1; i += 2u * AX_TR) {
            let i2 = i + AX_TR;
            let two = i2 < i1;
            let r1 = list[4u + i];
            let r2 = list[4u + select(i, i2, two)];
            let w1 = fetch(r1 * units + u);
            let w2 = fetch(r2 * units + u);
            let h1 = h[r1];
            let h2 = h[r2];
            axpy_unit(w1, h1, &acc);
            if (two) {
                axpy_unit(w2, h2, &acc);
            }
        }
    }
    // Lane 0 adds the lanes' sums in lane order, one accumulator at a time (a small shared
    // array whatever the type).
    let row4 = chunk * params.n4 + u * AX_ACC;
    for (var k = 0u; k < AX_ACC; k++) {
        lanes[lid] = acc[k];
        workgroupBarrier();
        if (tr == 0u && u < units) {
            var s = lanes[tc];
            for (var l = 1u; l < AX_TR; l++) {
                s += lanes[l * AX_TC + tc];
            }
            partial[row4 + k] = s;
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(64)
fn reduce(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let n_chunks = list[2];
    if (j >= params.n4 || (params.add != 0u && n_chunks == 0u)) {
        return;
    }
    var s = vec4<f32>(0.0);
    for (var c = 0u; c < n_chunks; c++) {
        s += partial[c * params.n4 + j];
    }
    if (params.add != 0u) {
        y[j] += s;
    } else {
        y[j] = s;
    }
}
