//! Every WGSL kernel, compiled into the binary. [`all`] lists them for the naga validation test.

/// A kernel's source: shaders/step.wgsl (the prelude every kernel shares), then the named files
/// of shaders/ in order, so that no fragment is written twice. The other preludes (helpers that
/// several kernels share: dequant_q4.wgsl, dequant_q8.wgsl, kquant_scales.wgsl, nibbles.wgsl,
/// rope_angle.wgsl, workgroup_sum.wgsl) are named where used, each once per kernel: WGSL has no includes and
/// refuses a declaration made twice.
macro_rules! compose {
    ($($file:literal),+) => { concat!(include_str!("../../shaders/step.wgsl"), "\n", $(include_str!(concat!("../../shaders/", $file)), "\n"),+) };
}
pub(crate) use compose;

pub const COPY: &str = compose!("copy.wgsl");

/// (file name, source) of every kernel under shaders/.
pub fn all() -> Vec<(&'static str, &'static str)> {
    // step.wgsl, the prelude, is validated inside every kernel; listed here with the smallest.
    // The other preludes are validated inside their users, and listed with one.
    let mut v = vec![
        ("copy.wgsl", COPY),
        ("step.wgsl", COPY),
        ("dequant_q4.wgsl", super::sparse::AXPY),
        ("dequant_q8.wgsl", super::sparse::AXPY),
        ("kquant_scales.wgsl", super::sparse::BATCH),
        ("rope_angle.wgsl", super::ops::ROPE_KV),
        ("workgroup_sum.wgsl", super::ops::RMS_NORM),
    ];
    v.extend_from_slice(super::matrix::SHADERS);
    v.push(super::matrix::NIBBLES_SHADER);
    v.push(super::matrix::DEC_ROWS_SHADER);
    v.extend_from_slice(&super::matrix::DEC_TOK_SHADERS);
    v.extend_from_slice(super::ops::SHADERS);
    v.extend_from_slice(super::sparse::SHADERS);
    v
}
