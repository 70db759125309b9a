//! Every WGSL kernel, compiled into the binary. [`all`] lists them for the naga validation test.

pub const COPY: &str = include_str!("../../shaders/copy.wgsl");

/// (file name, source) of every kernel under shaders/.
pub fn all() -> Vec<(&'static str, &'static str)> {
    let mut v = vec![("copy.wgsl", COPY)];
    v.extend_from_slice(super::matrix::SHADERS);
    v.push(super::matrix::DEC_ROWS_SHADER);
    v.extend_from_slice(super::ops::SHADERS);
    v.extend_from_slice(super::sparse::SHADERS);
    v
}
