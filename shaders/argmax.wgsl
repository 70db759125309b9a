// Greedy argmax of the last token's logits row (row step.n_tokens - 1): the index and value of
// the largest element, the lowest index on ties; -inf and NaN are never chosen (all of them:
// index 0, value -inf), as ember::cpu::ops::argmax.
//
// `blocks`: n_blocks workgroups of 256 threads, each over block_len consecutive logits (strided
// loads, then a shared-memory tree reduction), writing (index, value bits) per block.
// `finish`: one workgroup reduces the blocks' results into out[0] = index, out[1] = value bits.

struct Step {
    n_tokens: u32,
    pos0: u32,
    n_kv: u32,
    pad: u32,
}

struct Params {
    n_vocab: u32,
    n_blocks: u32,
    block_len: u32,
    pad: u32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read_write> part: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;
@group(0) @binding(3) var<uniform> params: Params;
@group(0) @binding(4) var<uniform> step: Step;

const WG: u32 = 256u;
const NONE: u32 = 0xffffffffu;
const MIN_FINITE: f32 = -3.40282347e38;

var<workgroup> sv: array<f32, WG>;
var<workgroup> si: array<u32, WG>;

// (av, ai) beats (bv, bi): a real candidate, larger, or as large with a lower index.
fn better(av: f32, ai: u32, bv: f32, bi: u32) -> bool {
    return ai != NONE && (bi == NONE || av > bv || (av == bv && ai < bi));
}

// Tree reduction of the threads' candidates; the result lands in sv[0], si[0].
fn reduce(tid: u32, v: f32, i: u32) {
    sv[tid] = v;
    si[tid] = i;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off >>= 1u) {
        if (tid < off && better(sv[tid + off], si[tid + off], sv[tid], si[tid])) {
            sv[tid] = sv[tid + off];
            si[tid] = si[tid + off];
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(WG)
fn blocks(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let n = params.n_vocab;
    let row = (max(step.n_tokens, 1u) - 1u) * n;
    let start = wg.x * params.block_len;
    let end = min(start + params.block_len, n);
    var bv = 0.0;
    var bi = NONE;
    // Increasing indices per thread: the strict > keeps the first of equal values. Four
    // independent loads per step, so that their latencies overlap.
    var i = start + tid;
    for (; i + 3u * WG < end; i += 4u * WG) {
        let v = vec4<f32>(logits[row + i], logits[row + i + WG], logits[row + i + 2u * WG], logits[row + i + 3u * WG]);
        for (var j = 0u; j < 4u; j++) {
            if (v[j] >= MIN_FINITE && (bi == NONE || v[j] > bv)) {
                bv = v[j];
                bi = i + j * WG;
            }
        }
    }
    for (; i < end; i += WG) {
        let v = logits[row + i];
        if (v >= MIN_FINITE && (bi == NONE || v > bv)) {
            bv = v;
            bi = i;
        }
    }
    reduce(tid, bv, bi);
    if (tid == 0u) {
        part[wg.x] = vec2<u32>(si[0], bitcast<u32>(sv[0]));
    }
}

@compute @workgroup_size(WG)
fn finish(@builtin(local_invocation_index) tid: u32) {
    var bv = 0.0;
    var bi = NONE;
    for (var j = tid; j < params.n_blocks; j += WG) {
        let c = part[j];
        let cv = bitcast<f32>(c.y);
        if (better(cv, c.x, bv, bi)) {
            bv = cv;
            bi = c.x;
        }
    }
    reduce(tid, bv, bi);
    if (tid == 0u) {
        if (si[0] == NONE) {
            out[0] = 0u;
            out[1] = 0xff800000u;
        } else {
            out[0] = si[0];
            out[1] = bitcast<u32>(sv[0]);
        }
    }
}
