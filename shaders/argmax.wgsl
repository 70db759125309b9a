// Greedy argmax of the last token's logits row (row step.n_tokens - 1): the index and value of
// the largest element, the lowest index on ties; NaN and infinities are never chosen (all of them:
// index 0, value -inf), as ember::cpu::ops::argmax does for NaN and -inf. out[2] is 1 when the row holds a NaN or an
// infinity, else 0: the host reads it with the id and reports the logits as the CPU path does,
// instead of generating a token from them.
//
// `blocks`: n_blocks workgroups of 256 threads, each over block_len consecutive logits (strided
// loads, then a shared-memory tree reduction), writing (index, value bits) per block; a block
// that saw a non-finite value sets the index's top bit (indices are below 2^31), or writes
// NONE_BAD when it has no candidate at all.
// `finish`: one workgroup reduces the blocks' results into out[0] = index, out[1] = value bits,
// out[2] = the non-finite flag.

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
const NONE_BAD: u32 = 0xfffffffeu;
const BAD: u32 = 0x80000000u;

var<workgroup> sv: array<f32, WG>;
var<workgroup> si: array<u32, WG>;
// Set by any thread that saw a NaN or an infinity (workgroup memory starts zeroed).
var<workgroup> wbad: atomic<u32>;

// NaN or +-infinity, from the bits: compilers may fold float NaN tests away.
fn non_finite(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7f800000u) == 0x7f800000u;
}

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
    var bad = false;
    // Increasing indices per thread: the strict > keeps the first of equal values. Four
    // independent loads per step, so that their latencies overlap.
    var i = start + tid;
    for (; i + 3u * WG < end; i += 4u * WG) {
        let v = vec4<f32>(logits[row + i], logits[row + i + WG], logits[row + i + 2u * WG], logits[row + i + 3u * WG]);
        for (var j = 0u; j < 4u; j++) {
            bad = bad || non_finite(v[j]);
            if (!non_finite(v[j]) && (bi == NONE || v[j] > bv)) {
                bv = v[j];
                bi = i + j * WG;
            }
        }
    }
    for (; i < end; i += WG) {
        let v = logits[row + i];
        bad = bad || non_finite(v);
        if (!non_finite(v) && (bi == NONE || v > bv)) {
            bv = v;
            bi = i;
        }
    }
    if (bad) {
        atomicOr(&wbad, 1u);
    }
    reduce(tid, bv, bi);
    if (tid == 0u) {
        var idx = si[0];
        if (atomicLoad(&wbad) != 0u) {
            idx = select(idx | BAD, NONE_BAD, idx == NONE);
        }
        part[wg.x] = vec2<u32>(idx, bitcast<u32>(sv[0]));
    }
}

@compute @workgroup_size(WG)
fn finish(@builtin(local_invocation_index) tid: u32) {
    var bv = 0.0;
    var bi = NONE;
    for (var j = tid; j < params.n_blocks; j += WG) {
        let c = part[j];
        let cv = bitcast<f32>(c.y);
        var ci = c.x;
        if (ci == NONE_BAD) {
            atomicOr(&wbad, 1u);
            ci = NONE;
        } else if (ci != NONE && (ci & BAD) != 0u) {
            atomicOr(&wbad, 1u);
            ci = ci & ~BAD;
        }
        if (better(cv, ci, bv, bi)) {
            bv = cv;
            bi = ci;
        }
    }
    reduce(tid, bv, bi);
    if (tid == 0u) {
        out[2] = atomicLoad(&wbad);
        if (si[0] == NONE) {
            out[0] = 0u;
            out[1] = 0xff800000u;
        } else {
            out[0] = si[0];
            out[1] = bitcast<u32>(sv[0]);
        }
    }
}
