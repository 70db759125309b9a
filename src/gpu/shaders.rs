//! Every WGSL kernel, compiled into the binary. [`all`] lists them for the naga validation test.

pub const ADD: &str = include_str!("../../shaders/add.wgsl");

/// (file name, source) of every kernel under shaders/.
pub fn all() -> Vec<(&'static str, &'static str)> {
    let mut v = vec![("add.wgsl", ADD)];
    v.extend_from_slice(super::matrix::SHADERS);
    v.extend_from_slice(super::ops::SHADERS);
    v
}
