// Embedding lookup: out[i] = row ids[i] of the matrix, dequantised to f32, for i < n_tokens.
// One workgroup per id (a 2D grid past 65535); each row-chunk of a split matrix has its own
// dispatch and writes only the ids inside it.
//
// Composed after one of the matmul_<type>.wgsl files (weight bindings 4, 5; UNIT, x_chunks,
// unit_fetch and unit_deq, the exact dequantisation of one 8-element unit).

struct Chunk {
    rows: u32,
    row0: u32,
    ld_y: u32,
    cols: u32,
}

@group(0) @binding(0) var<storage, read> ids: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(2) var<uniform> step: Step;
@group(0) @binding(3) var<uniform> chunk: Chunk;

@compute @workgroup_size(64)
fn get_rows(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = wid.x + wid.y * nwg.x;
    if (i >= step.n_tokens) {
        return;
    }
    let id = ids[i];
    if (id < chunk.row0 || id - chunk.row0 >= chunk.rows) {
        return;
    }
    let units = chunk.cols / UNIT;
    let src = (id - chunk.row0) * units;
    let dst = i * (chunk.cols / 4u);
    for (var u = lid; u < units; u += 64u) {
        let v = unit_deq(unit_fetch(src + u));
        let c = dst + x_chunks(u);
        out[c.x] = v[0];
        out[c.y] = v[1];
    }
}
