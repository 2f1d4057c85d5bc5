// y[r, c] = x[r, c] / sqrt(mean_c x[r, c]² + eps) · weight[c]; one workgroup per row.
// Defines: WG (power of two).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let row = workgroup_index(wid, nwg);
    let n = select(0u, p.n, row < p.rows);
    let base = row * p.n;
    var ss = 0.0;
    for (var c = tid; c < n; c += WG) {
        ss += x[base + c] * x[base + c];
    }
    partial[tid] = ss;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (tid < s) {
            partial[tid] += partial[tid + s];
        }
        workgroupBarrier();
    }
    // 1/sqrt rather than inverseSqrt: the latter may be a low-precision estimate.
    let inv = 1.0 / sqrt(partial[0] / f32(p.n) + p.eps);
    for (var c = tid; c < n; c += WG) {
        y[base + c] = x[base + c] * inv * weight[c];
    }
}
