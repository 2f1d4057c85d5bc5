// In-place rotary embedding of `vectors` head vectors at position pos[pos_index]
// (a storage buffer, so it advances per token without rebuilding anything). One
// thread per rotated pair. inv_freq[i] comes from the host so Llama 3.1 scaling
// needs no shader change. Defines: WG, INTERLEAVED (GGUF/Meta pairs (2i, 2i+1);
// otherwise HF half-split pairs (i, i + d/2)).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(3) var<storage, read> pos: array<u32>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let gid = workgroup_index(wid, nwg) * WG + tid;
    let half = p.head_dim / 2u;
    if (gid >= p.vectors * half) {
        return;
    }
    let v = gid / half;
    let i = gid % half;
    let angle = f32(pos[p.pos_index]) * inv_freq[i];
    let c = cos(angle);
    let s = sin(angle);
    var a = v * p.head_dim + i;
    var b = a + half;
    if (INTERLEAVED) {
        a = v * p.head_dim + 2u * i;
        b = a + 1u;
    }
    let x0 = x[a];
    let x1 = x[b];
    x[a] = x0 * c - x1 * s;
    x[b] = x0 * s + x1 * c;
}
