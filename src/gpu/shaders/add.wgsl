// dst[i] += src[i] (the residual). In place because WebGPU forbids binding one
// buffer both writable and read-only in the same dispatch. Defines: WG.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<storage, read> src: array<f32>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let i = workgroup_index(wid, nwg) * WG + tid;
    if (i < p.n) {
        dst[i] += src[i];
    }
}
