//! Every WGSL file under shaders/ parses and validates with naga, and is listed in
//! `ember::gpu::shaders::all()` (so none is forgotten by the binary or by this test).

#[test]
fn every_shader_validates() {
    let caps = naga::valid::Capabilities::all();
    for (name, src) in ember::gpu::shaders::all() {
        let module = naga::front::wgsl::parse_str(src).unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(src)));
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
}

/// Every tile of the cooperative-matrix prefill kernel that `--tune coop` accepts validates
/// (lavapipe has no cooperative matrices, so on the CPU this is their only check; the device
/// compares them with the portable kernel, `ember bench --prefill-kernels`).
#[test]
fn every_coop_tile_validates() {
    let caps = naga::valid::Capabilities::all();
    let variants = ember::gpu::matrix::coop_variants();
    // 64:2:2 (the default), 128:2:2, 128:2:4, 32:1:2, 64:1:4, ... for two types.
    assert!(variants.len() >= 10, "{} tiles", variants.len());
    for (key, src) in variants {
        let module = naga::front::wgsl::parse_str(&src).unwrap_or_else(|e| panic!("{key}: {}", e.emit_to_string(&src)));
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
            .validate(&module)
            .unwrap_or_else(|e| panic!("{key}: {e:?}"));
    }
}

#[test]
fn every_file_in_shaders_is_listed() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let listed: Vec<&str> = ember::gpu::shaders::all().iter().map(|(n, _)| *n).collect();
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".wgsl") {
            assert!(listed.contains(&name.as_str()), "shaders/{name} is not in gpu::shaders::all()");
        }
    }
}
