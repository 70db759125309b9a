// F32 weights: the GGUF bytes as they are, rows contiguous; unit g = row * (cols / 4) + u is
// the 4 floats at wq[g] (bound as u32 words so every type shares one binding type).

@group(0) @binding(4) var<storage, read> wq: array<vec4<u32>>;

const UNIT: u32 = 4u;
const XV: u32 = 1u;
alias XUnit = array<vec4<f32>, 1>;

fn x_sum(xv: XUnit) -> f32 {
    return 0.0;
}

// One unit's weights as loaded (no scale).
struct WUnit {
    q: vec4<u32>,
    d: vec2<f32>,
}

fn unit_fetch(g: u32) -> WUnit {
    return WUnit(wq[g], vec2<f32>(0.0));
}

fn unit_deq(w: WUnit) -> XUnit {
    return XUnit(bitcast<vec4<f32>>(w.q));
}

fn unit_dot(w: WUnit, xv: XUnit, xs: f32) -> f32 {
    return dot(bitcast<vec4<f32>>(w.q), xv[0]);
}

// Elements 8p..8p+7 of block kb (32 elements) of `row`.
fn tile8(row: u32, kb: u32, p: u32, cols: u32) -> array<f32, 8> {
    let g = row * (cols / 4u) + 8u * kb + 2u * p;
    let a = bitcast<vec4<f32>>(wq[g]);
    let b = bitcast<vec4<f32>>(wq[g + 1u]);
    return array<f32, 8>(a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w);
}
