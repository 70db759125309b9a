// Where a matrix product's results go, and what is done with them on the way (the product's
// epilogue). Composed into matmul_dec.wgsl, matmul_common.wgsl and matmul_kq.wgsl (which
// declare `y` and `chunk`), and before act.wgsl.
//
// Output sections: rows [0, ends.x), [ends.x, ends.y) and [ends.y, ends.z) of the whole matrix
// are stored apart, section s of token t from element offs[s] of y on, one row of the section
// per token. So one product over q, k and v stacked fills three separate arrays (one dispatch
// instead of three); a plain product is one section at offset 0 (ends.x = rows).
//
// EPI (rewritten by src/gpu/matrix.rs; the line must stay `const EPI: u32 = <n>u;`):
// 0: store; 1: add to what y holds (the residual connection x += W v, with no separate add
// pass); 2, 3 and 4: the gated FFN, whose matrix interleaves gate and up rows (row 2i is gate
// i, row 2i + 1 up i): act(gate) * up is stored at offs.x + t * ends.x / 2 + i (2: SiLU, 3: ReLU,
// 4: dReLU, relu(gate) * relu(up); 5: GeGLU, gelu(gate) * up),
// so the hidden vector needs neither a second product nor an activation pass.

struct MatOut {
    ends: vec4<u32>,
    offs: vec4<u32>,
}

@group(0) @binding(6) var<uniform> mat_out: MatOut;

const EPI: u32 = 0u;
// Whether the epilogue combines pairs of rows (EPI 2 to 5).
const EPI_PAIRS: bool = EPI >= 2u;

// y's element for row r of the chunk and token t.
fn y_index(t: u32, r: u32) -> u32 {
    let row = chunk.row0 + r;
    let e = mat_out.ends;
    if (row < e.x) {
        return mat_out.offs.x + t * e.x + row;
    }
    if (row < e.y) {
        return mat_out.offs.y + t * (e.y - e.x) + (row - e.x);
    }
    return mat_out.offs.z + t * (e.z - e.y) + (row - e.y);
}

// Stores (or adds, EPI 1) the total of row r of the chunk for token t.
fn y_put(t: u32, r: u32, v: f32) {
    let i = y_index(t, r);
    if (EPI == 1u) {
        y[i] += v;
    } else {
        y[i] = v;
    }
}

// EPI 2 to 5: act(g) * u for the chunk's rows r (even: a gate row) and r + 1 (its up row).
fn y_put_pair(t: u32, r: u32, g: f32, u: f32) {
    let i = mat_out.offs.x + t * (mat_out.ends.x / 2u) + (chunk.row0 + r) / 2u;
    if (EPI == 5u) {
        y[i] = gelu_mul(g, u);
    } else if (EPI == 4u) {
        y[i] = drelu_mul(g, u);
    } else if (EPI == 3u) {
        y[i] = relu_mul(g, u);
    } else {
        y[i] = silu_mul(g, u);
    }
}
