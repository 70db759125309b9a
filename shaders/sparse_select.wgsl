// The active hot neurons of one token, compacted into an ascending list, and the indirect
// dispatch arguments of the kernels that walk it (src/gpu/sparse.rs).
//
// Hot row r is active when (CRITERION 0, relu) vals[r] > 0, vals being a value per hot row
// (e.g. the gate of the hot rows), or (CRITERION 1, predictor) vals[hot_ids[r]] >= threshold,
// vals being a predictor's logits over all n_ff neurons. NaN is never active.
//
// No atomics, so the list is the same on every run: workgroup b owns rows
// b * SEL_BLOCK .. (b + 1) * SEL_BLOCK (SEL_EPT consecutive rows per thread). It counts the
// active rows before its block itself (every workgroup reads the flags of the blocks before
// it: cheap next to a workgroup-wide handshake, and the flags are few), scans its threads'
// counts in shared memory, and writes its rows' indices at their places. The last workgroup
// has the total and writes the header and the dispatch arguments.
//
// list: [count, chunk_rows, n_chunks, 0, index 0, index 1, ...]
// args: [count of workgroups x, y, z for one workgroup per row (2D past 65535),
//        axpy tiles, axpy chunks, 1]
// The axpy pass cuts the list into n_chunks chunks of chunk_rows entries:
// chunk_rows = max(min_chunk_rows, ceil(count / max_chunks)).

struct Params {
    n_hot: u32,
    threshold: f32,
    axpy_tiles: u32,
    min_chunk_rows: u32,
    max_chunks: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<storage, read> vals: array<f32>;
@group(0) @binding(1) var<storage, read> hot_ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> list: array<u32>;
@group(0) @binding(3) var<storage, read_write> args: array<u32>;
@group(0) @binding(4) var<uniform> params: Params;

const CRITERION: u32 = 0u;
const SEL_WG: u32 = 256u;
const SEL_EPT: u32 = 8u;
const SEL_BLOCK: u32 = SEL_WG * SEL_EPT;
const MAX_GROUPS: u32 = 65535u;

// (active rows before the block, inclusive scan of the threads' own counts).
var<workgroup> scan: array<vec2<u32>, SEL_WG>;

fn is_active(r: u32) -> bool {
    if (CRITERION == 0u) {
        return vals[r] > 0.0;
    }
    return vals[hot_ids[r]] >= params.threshold;
}

@compute @workgroup_size(SEL_WG)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = params.n_hot;
    let start = wid.x * SEL_BLOCK;
    // Four rows per thread and step, all loaded before any is counted: GPUs issue in order,
    // and a loop of load-then-add would wait out one memory latency per row.
    var before = 0u;
    for (var r = lid; r < start; r += 4u * SEL_WG) {
        var on: array<bool, 4>;
        for (var k = 0u; k < 4u; k++) {
            on[k] = is_active(min(r + k * SEL_WG, start - 1u));
        }
        for (var k = 0u; k < 4u; k++) {
            before += select(0u, select(0u, 1u, on[k]), r + k * SEL_WG < start);
        }
    }
    let r0 = start + lid * SEL_EPT;
    var flags = 0u;
    var mine = 0u;
    for (var e = 0u; e < SEL_EPT; e++) {
        let r = r0 + e;
        if (r < n && is_active(r)) {
            flags |= 1u << e;
            mine += 1u;
        }
    }
    // Hillis-Steele inclusive scan of (before, mine): the last thread ends with the block's
    // total of `before`, every thread with its inclusive prefix of `mine`.
    scan[lid] = vec2<u32>(before, mine);
    for (var off = 1u; off < SEL_WG; off <<= 1u) {
        workgroupBarrier();
        var v = scan[lid];
        if (lid >= off) {
            v += scan[lid - off];
        }
        workgroupBarrier();
        scan[lid] = v;
    }
    workgroupBarrier();
    let prior = scan[SEL_WG - 1u].x;
    var at = prior + scan[lid].y - mine;
    for (var e = 0u; e < SEL_EPT; e++) {
        if ((flags & (1u << e)) != 0u) {
            list[4u + at] = r0 + e;
            at += 1u;
        }
    }
    if (wid.x == nwg.x - 1u && lid == SEL_WG - 1u) {
        let count = at;
        let chunk_rows = max(params.min_chunk_rows, (count + params.max_chunks - 1u) / params.max_chunks);
        let n_chunks = (count + chunk_rows - 1u) / chunk_rows;
        list[0] = count;
        list[1] = chunk_rows;
        list[2] = n_chunks;
        list[3] = 0u;
        let gy = (count + MAX_GROUPS - 1u) / MAX_GROUPS;
        args[0] = min(count, MAX_GROUPS);
        args[1] = gy;
        args[2] = 1u;
        args[3] = params.axpy_tiles;
        args[4] = n_chunks;
        args[5] = 1u;
    }
}
