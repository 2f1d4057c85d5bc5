// k_cache[r, h, pos, :] = k_new[r, h, :] (same for v), pos = pos[pos_index]: the
// preallocated cache is written in place, never grown. Positions at or past the
// capacity are dropped (the host refuses them first). Defines: WG.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> k_new: array<f32>;
@group(0) @binding(2) var<storage, read> v_new: array<f32>;
@group(0) @binding(3) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(4) var<storage, read_write> v_cache: array<f32>;
@group(0) @binding(5) var<storage, read> pos: array<u32>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let i = workgroup_index(wid, nwg) * WG + tid;
    let t = pos[p.pos_index];
    if (i >= p.rows * p.kv_heads * p.head_dim || t >= p.capacity) {
        return;
    }
    let vec = i / p.head_dim;
    let d = i % p.head_dim;
    let at = (vec * p.capacity + t) * p.head_dim + d;
    k_cache[at] = k_new[i];
    v_cache[at] = v_new[i];
}
