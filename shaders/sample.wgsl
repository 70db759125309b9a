// Draws the next token from the top-k kernel's candidates (topk.wgsl's output: (index, value
// bits) pairs, values descending, the lower index first on ties, padded with (NONE, -inf)), and
// writes its id into out[0], where the argmax kernel put the greedy one (the argmax's other
// words, its logit and non-finite flag, stay): the next step's embedding lookup and the host's
// readback take it from there, as in greedy decoding, so sampled decoding queues the same way.
//
// The rule is ember::engine::sampler::SampleRule::pick_sorted, in the same f32 operations in
// the same order (one thread, at most K_MAX candidates): top-p over the weights at temperature
// 1, min-p as a floor on the logit (ln min_p given), weights exp((l - l0) / T) (1 / T given),
// then one uniform draw against their running sum. The draw is a counter-based hash of (seed,
// draw number): no state on the GPU, and the host's sampler draws the same number.

struct Params {
    top_k: u32,
    top_p: f32,
    ln_min_p: f32,
    inv_temp: f32,
    seed_lo: u32,
    seed_hi: u32,
    draw: u32,
    pad: u32,
}

@group(0) @binding(0) var<storage, read> cand: array<vec2<u32>>;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@group(0) @binding(2) var<uniform> params: Params;

const K_MAX: u32 = 64u;
const NONE: u32 = 0xffffffffu;

// One round of the integer hash (sampler.rs's mix32).
fn mix32(x0: u32) -> u32 {
    var x = x0;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    return x ^ (x >> 16u);
}

// sampler.rs's uniform(seed, draw): [0, 1) on a grid of 2^-24.
fn draw_uniform(seed_lo: u32, seed_hi: u32, draw: u32) -> f32 {
    let h = mix32(seed_lo ^ mix32(seed_hi ^ mix32(draw ^ 0x9e3779b9u)));
    return f32(h >> 8u) * (1.0 / 16777216.0);
}

fn logit(i: u32) -> f32 {
    return bitcast<f32>(cand[i].y);
}

@compute @workgroup_size(1)
fn sample() {
    let k = min(params.top_k, K_MAX);
    var n = 0u;
    while (n < k && cand[n].x != NONE) {
        n++;
    }
    if (n == 0u) {
        // No finite logit at all (the argmax flags that as an error); as the CPU, token 0.
        out[0] = 0u;
        return;
    }
    let l0 = logit(0u);
    if (params.top_p < 1.0) {
        var total = 0.0;
        for (var i = 0u; i < n; i++) {
            total += exp(logit(i) - l0);
        }
        let goal = params.top_p * total;
        var cum = 0.0;
        for (var i = 0u; i < n; i++) {
            cum += exp(logit(i) - l0);
            if (cum >= goal) {
                n = i + 1u;
                break;
            }
        }
    }
    let l_floor = l0 + params.ln_min_p;
    var m = 0u;
    while (m < n && logit(m) >= l_floor) {
        m++;
    }
    n = max(m, 1u);
    var total = 0.0;
    for (var i = 0u; i < n; i++) {
        total += exp(max((logit(i) - l0) * params.inv_temp, -200.0));
    }
    let goal = draw_uniform(params.seed_lo, params.seed_hi, params.draw) * total;
    var cum = 0.0;
    for (var i = 0u; i < n; i++) {
        cum += exp(max((logit(i) - l0) * params.inv_temp, -200.0));
        if (goal < cum) {
            out[0] = cand[i].x;
            return;
        }
    }
    out[0] = cand[n - 1u].x;
}
