// sparse_matvec.wgsl's entry points with a subgroup reduction: subgroupAdd inside each
// subgroup, one shared slot per subgroup, and thread 0 adds the slots in subgroup order.
// Appended to sparse_matvec.wgsl; compiled only when the adapter has SUBGROUP. Works for any
// subgroup size.

fn sg_sum(v: vec2<f32>, lane: u32, sg: u32, n_sg: u32) -> vec2<f32> {
    let s = subgroupAdd(v);
    if (lane == 0u) {
        mv_sh[sg] = s;
    }
    workgroupBarrier();
    var total = vec2<f32>(0.0);
    for (var k = 0u; k < n_sg; k++) {
        total += mv_sh[k];
    }
    return total;
}

@compute @workgroup_size(MV_WG)
fn dense_sg(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) n_sg: u32,
) {
    let job = dense_job(wid, nwg);
    let s = sg_sum(dense_partial(job, lid), lane, sg, n_sg);
    if (lid == 0u) {
        dense_store(job, s);
    }
}

@compute @workgroup_size(MV_WG)
fn sparse_relu_sg(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) n_sg: u32,
) {
    let job = list_job(wid, nwg);
    let s = sg_sum(relu_partial(job, lid), lane, sg, n_sg);
    if (lid == 0u) {
        relu_store(job, s);
    }
}

@compute @workgroup_size(MV_WG)
fn sparse_gated_sg(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) n_sg: u32,
) {
    let job = list_job(wid, nwg);
    let s = sg_sum(gated_partial(job, lid), lane, sg, n_sg);
    if (lid == 0u) {
        gated_store(job, s);
    }
}

@compute @workgroup_size(MV_WG)
fn sparse_gate_sg(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) n_sg: u32,
) {
    let job = list_job(wid, nwg);
    let s = sg_sum(dense_partial(job, lid), lane, sg, n_sg);
    if (lid == 0u) {
        dense_store(job, s);
    }
}

@compute @workgroup_size(MV_WG)
fn sparse_act_up_sg(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) n_sg: u32,
) {
    let job = list_job(wid, nwg);
    let s = sg_sum(relu_partial(job, lid), lane, sg, n_sg);
    if (lid == 0u) {
        act_up_store(job, s);
    }
}
