// out[i] = silu(gate[i]) · up[i] (the SwiGLU MLP). Defines: WG.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> gate: array<f32>;
@group(0) @binding(2) var<storage, read> up: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let i = workgroup_index(wid, nwg) * WG + tid;
    if (i >= p.n) {
        return;
    }
    let g = gate[i];
    // g / (1 + e^-g): for very negative g, e^-g = inf and the quotient is -0, not NaN.
    out[i] = g / (1.0 + exp(-g)) * up[i];
}
