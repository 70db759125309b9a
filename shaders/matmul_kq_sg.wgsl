// The integer-dot-product decode matvec with a subgroup reduction: subgroupAdd inside each
// subgroup, then one shared-memory slot per subgroup and row. Composed after matmul_kq.wgsl;
// compiled only when the adapter has SUBGROUP. Works for any subgroup size.

@compute @workgroup_size(KQ_WG)
fn kq_main_sg(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) n_sg: u32,
) {
    let group = kq_group(wid, nwg);
    let t = wid.z;
    if (t >= step.n_tokens) {
        return;
    }
    let nb = chunk.cols / 32u;
    var wn: array<WB, KQ_NR * KQ_BPT>;
    if (KQ_PF == 1u) {
        // The first step's weights are requested before the activations are quantised.
        wn = kq_fetch(group, 0u, lid, nb);
    }
    let xs = kq_x(lid, t, nb);
    var scale = 1.0;
    if (DV_NORM) {
        let ss = subgroupAdd(kq_ss);
        if (lane == 0u) {
            kq_sh[KQ_SS + sg] = ss;
        }
        workgroupBarrier();
        var total = 0.0;
        for (var k = 0u; k < n_sg; k++) {
            total += kq_sh[KQ_SS + k];
        }
        scale = dv_norm_scale(total);
    }
    for (var rs = 0u; rs < KQ_RG; rs++) {
        if (kq_row(group, rs, 0u) >= chunk.rows) {
            break;
        }
        var w: array<WB, KQ_NR * KQ_BPT>;
        if (KQ_PF == 1u) {
            w = wn;
            wn = kq_fetch(group, min(rs + 1u, KQ_RG - 1u), lid, nb);
        } else {
            w = kq_fetch(group, rs, lid, nb);
        }
        let acc = kq_sums(w, xs, lid, nb);
        let buf = (rs & 1u) * KQ_NR * KQ_WG;
        for (var r = 0u; r < KQ_NR; r++) {
            let s = subgroupAdd(acc[r]);
            if (lane == 0u) {
                kq_sh[buf + sg * KQ_NR + r] = s;
            }
        }
        workgroupBarrier();
        kq_store_step(group, rs, t, lid, buf, n_sg, KQ_NR, 1u, scale);
    }
}
