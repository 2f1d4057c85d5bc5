// lora_down.wgsl for CPU adapters: one invocation per (a, k) dot product, no
// workgroup memory and no barriers (see matvec_rows.wgsl); slots as lora_down.wgsl.
// Defines: WG.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> t: array<f32>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let ak = workgroup_index(wid, nwg) * WG + tid;
    let row = p.first + ak / p.rank;
    let batch_row = row % (p.first + p.arms);
    if (ak >= p.slots * p.rank || batch_row < p.first) {
        return;
    }
    let ab = ((batch_row - p.first) * p.rank + ak % p.rank) * p.cols;
    var s = 0.0;
    for (var c = 0u; c < p.cols; c++) {
        s += a[ab + c] * x[row * p.cols + c];
    }
    t[ak] = s;
}
