// Matvec with a subgroup reduction: subgroupAdd inside each subgroup, then one shared-memory
// slot per subgroup. Composed after matmul_<type>.wgsl and matmul_common.wgsl; compiled only
// when the adapter has SUBGROUP. Works for any subgroup size.

@compute @workgroup_size(MV_WG)
fn mv_main_sg(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) n_sg: u32,
) {
    let group = flat_group(wid, nwg);
    let t0 = wid.z * MV_NT;
    let acc = mv_partial(lid, group, t0);
    for (var i = 0u; i < MV_NRT; i++) {
        let s = subgroupAdd(acc[i]);
        if (lane == 0u) {
            mv_sh[sg * MV_NRT + i] = s;
        }
    }
    workgroupBarrier();
    for (var i = lid; i < MV_STORES; i += MV_WG) {
        let e = mv_elems(i);
        var total0 = 0.0;
        var total1 = 0.0;
        for (var k = 0u; k < n_sg; k++) {
            total0 += mv_sh[k * MV_NRT + e.x];
            total1 += mv_sh[k * MV_NRT + e.y];
        }
        mv_store(group, t0, i, total0, total1);
    }
}
