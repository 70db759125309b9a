// F32 weights: the GGUF bytes as they are, rows contiguous; unit g = row * (cols / 8) + u is
// the 8 floats at wq[2g], wq[2g + 1] (bound as u32 words, like the other types' quants).

@group(0) @binding(4) var<storage, read> wq: array<vec4<u32>>;

// Elements per unit; every type has 8, as two vec4 of activations.
const UNIT: u32 = 8u;
alias XUnit = array<vec4<f32>, 2>;
// One word order only (the other types' PERM).
const PERM: u32 = 0u;

// Offsets (in vec4, from the row's start) of unit u's two activation vec4.
fn x_chunks(u: u32) -> vec2<u32> {
    return vec2<u32>(2u * u, 2u * u + 1u);
}

fn x_sum(xv: XUnit) -> f32 {
    return 0.0;
}

fn x_prep(xv: XUnit) -> XUnit {
    return xv;
}

// One unit's weights as loaded: the bits of its first four floats in q, of the last four in r.
struct WUnit {
    q: vec4<u32>,
    r: vec4<u32>,
}

fn unit_fetch(g: u32) -> WUnit {
    return WUnit(wq[2u * g], wq[2u * g + 1u]);
}

fn unit_deq(w: WUnit) -> XUnit {
    return XUnit(bitcast<vec4<f32>>(w.q), bitcast<vec4<f32>>(w.r));
}

fn unit_dot(w: WUnit, xp: XUnit, xs: f32) -> f32 {
    return dot(bitcast<vec4<f32>>(w.q), xp[0]) + dot(bitcast<vec4<f32>>(w.r), xp[1]);
}

// Elements 8p..8p+7 of block kb (32 elements) of `row`.
fn tile8(row: u32, kb: u32, p: u32, cols: u32) -> array<f32, 8> {
    let w = unit_deq(unit_fetch(row * (cols / 8u) + 4u * kb + p));
    return array<f32, 8>(w[0].x, w[0].y, w[0].z, w[0].w, w[1].x, w[1].y, w[1].z, w[1].w);
}
