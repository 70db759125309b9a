// Prelude (composed before rms_norm.wgsl and head_norm.wgsl): the sum over a workgroup of one
// f32 per thread, by a shared-memory tree in a fixed order (the same inputs give the same sum
// bit for bit). The kernel declares SUM_WG, its workgroup size (a power of two), and calls
// workgroup_sum from every thread (uniform control flow: it holds barriers).

var<workgroup> sum_partial: array<f32, SUM_WG>;

// The sum of s over the workgroup's threads (tid: local_invocation_index).
fn workgroup_sum(tid: u32, s: f32) -> f32 {
    sum_partial[tid] = s;
    workgroupBarrier();
    for (var off = SUM_WG / 2u; off > 0u; off >>= 1u) {
        if (tid < off) {
            sum_partial[tid] += sum_partial[tid + off];
        }
        workgroupBarrier();
    }
    return sum_partial[0];
}
