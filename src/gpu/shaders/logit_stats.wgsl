// Per logits row: its max and log-sum-exp over its `vocab` logits (the engine passes
// rows already cut to the base vocabulary: an ARM is normalised over the base's tokens
// only), written to stats[2·(row_base + r)] and stats[2·(row_base + r) + 1]. One
// workgroup per row.
// Defines: WG (power of two).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> stats: array<f32>;

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let row = workgroup_index(wid, nwg);
    let live = row < p.rows;
    let n = select(0u, p.vocab, live);
    let base = row * p.vocab;
    var m = -3.4e38;
    for (var i = tid; i < n; i += WG) {
        m = max(m, logits[base + i]);
    }
    partial[tid] = m;
    workgroupBarrier();
    for (var h = WG / 2u; h > 0u; h >>= 1u) {
        if (tid < h) {
            partial[tid] = max(partial[tid], partial[tid + h]);
        }
        workgroupBarrier();
    }
    let row_max = partial[0];
    workgroupBarrier();
    var s = 0.0;
    for (var i = tid; i < n; i += WG) {
        s += exp(logits[base + i] - row_max);
    }
    partial[tid] = s;
    workgroupBarrier();
    for (var h = WG / 2u; h > 0u; h >>= 1u) {
        if (tid < h) {
            partial[tid] += partial[tid + h];
        }
        workgroupBarrier();
    }
    if (tid == 0u && live) {
        stats[2u * (p.row_base + row)] = row_max;
        stats[2u * (p.row_base + row) + 1u] = row_max + log(partial[0]);
    }
}
