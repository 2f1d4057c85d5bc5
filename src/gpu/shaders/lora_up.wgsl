// The second half of the LoRA delta: y[first + a, i] += Σ_k B[a, i, k] · t[a, k], with B
// the rows' `[out, rank]` matrices (already times the adapter scale) stacked and
// zero-padded like A. One thread per output value; rank is small (8–64).
// Defines: WG.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read> t: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let ai = workgroup_index(wid, nwg) * WG + tid;
    if (ai >= p.arms * p.cols) {
        return;
    }
    let arm = ai / p.cols;
    var s = 0.0;
    for (var k = 0u; k < p.rank; k++) {
        s += b[ai * p.rank + k] * t[arm * p.rank + k];
    }
    y[p.first * p.cols + ai] += s;
}
