// The decode matvec with a subgroup reduction: subgroupAdd inside each subgroup, then one
// shared-memory slot per subgroup and row. Composed after matmul_dec_<type>.wgsl and
// matmul_dec.wgsl; compiled only when the adapter has SUBGROUP. Works for any subgroup size.

@compute @workgroup_size(DV_WG)
fn dv_main_sg(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) n_sg: u32,
) {
    let group = dv_group(wid, nwg);
    let t = wid.z;
    if (t >= step.n_tokens) {
        return;
    }
    let acc = dv_partial(lid, group, t);
    for (var r = 0u; r < DV_NR; r++) {
        let s = subgroupAdd(acc[r]);
        if (lane == 0u) {
            dv_sh[sg * DV_NR + r] = s;
        }
    }
    if (DV_NORM) {
        let s = subgroupAdd(dv_ss);
        if (lane == 0u) {
            dv_sh[DV_WG * DV_NR + sg] = s;
        }
    }
    workgroupBarrier();
    if (lid < DV_STORERS) {
        let r0 = dv_store_row(lid);
        let r1 = min(r0 + 1u, DV_NR - 1u);
        var total0 = 0.0;
        var total1 = 0.0;
        var ss = 0.0;
        for (var k = 0u; k < n_sg; k++) {
            total0 += dv_sh[k * DV_NR + r0];
            total1 += dv_sh[k * DV_NR + r1];
            if (DV_NORM) {
                ss += dv_sh[DV_WG * DV_NR + k];
            }
        }
        let scale = dv_norm_scale(ss);
        dv_store(group, t, lid, scale * total0, scale * total1);
    }
}

// Few tokens (matmul_dec.wgsl's dvt_main) with the subgroup reduction: one shared slot per
// subgroup and (row, token).
@compute @workgroup_size(DV_WG)
fn dvt_main_sg(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) n_sg: u32,
) {
    let group = dv_group(wid, nwg);
    dvt_t0 = wid.z * DV_NT;
    let acc = dvt_partial(lid, group);
    for (var i = 0u; i < DV_NRT; i++) {
        let s = subgroupAdd(acc[i]);
        if (lane == 0u) {
            dv_sh[sg * DV_NRT + i] = s;
        }
    }
    workgroupBarrier();
    for (var i = lid; i < DVT_STORERS; i += DV_WG) {
        let e0 = dvt_elem(i);
        let e1 = min(e0 + 1u, DV_NRT - 1u);
        var total0 = 0.0;
        var total1 = 0.0;
        for (var k = 0u; k < n_sg; k++) {
            total0 += dv_sh[k * DV_NRT + e0];
            total1 += dv_sh[k * DV_NRT + e1];
        }
        dvt_store(group, e0, total0, total1);
    }
}
