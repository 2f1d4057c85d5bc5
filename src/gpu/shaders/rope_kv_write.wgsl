// The step before attention, in one dispatch: the rotary embedding of q (in place)
// and of the new k at position t = pos[pos_index], k and v written into the caches at
// t. qkv holds each batch row's q [heads, hd], k and v [kv_heads, hd] side by side, as
// the stacked q/k/v matvec stores them. One thread per rotated pair: q's pairs first,
// then k's, each k thread also copying the two v values at the same places. The
// preallocated caches are written in place, never grown; positions at or past the
// capacity are not stored (the host refuses them first). inv_freq comes from the host
// so Llama 3.1 scaling needs no shader change. Defines: WG, INTERLEAVED (GGUF/Meta
// pairs (2i, 2i+1); otherwise HF half-split pairs (i, i + d/2)).
// A prompt chunk's rows are `batch`-row batches, one per position: row r sits at
// t = pos[pos_index] + r / batch and writes batch row r % batch's caches.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(2) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(3) var<storage, read_write> v_cache: array<f32>;
@group(0) @binding(4) var<storage, read> pos: array<u32>;
@group(0) @binding(5) var<storage, read> inv_freq: array<f32>;

/// Offsets of pair i within a head vector.
fn pair(i: u32) -> vec2<u32> {
    if (INTERLEAVED) {
        return vec2<u32>(2u * i, 2u * i + 1u);
    }
    return vec2<u32>(i, i + p.head_dim / 2u);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let gid = workgroup_index(wid, nwg) * WG + tid;
    let half = p.head_dim / 2u;
    let q_pairs = p.rows * p.heads * half;
    if (gid >= q_pairs + p.rows * p.kv_heads * half) {
        return;
    }
    let q_len = p.heads * p.head_dim;
    let kv_len = p.kv_heads * p.head_dim;
    let row_len = q_len + 2u * kv_len;
    let j = select(gid - q_pairs, gid, gid < q_pairs);
    let i = j % half;
    // The row of this pair's head: q heads then kv heads, each row's in a run.
    let r = (j / half) / select(p.kv_heads, p.heads, gid < q_pairs);
    let t = pos[p.pos_index] + r / p.batch;
    let angle = f32(t) * inv_freq[i];
    let c = cos(angle);
    let s = sin(angle);
    let off = pair(i);
    if (gid < q_pairs) {
        let head = j / half;
        let ab = (head / p.heads) * row_len + (head % p.heads) * p.head_dim + off;
        let x0 = qkv[ab.x];
        let x1 = qkv[ab.y];
        qkv[ab.x] = x0 * c - x1 * s;
        qkv[ab.y] = x0 * s + x1 * c;
        return;
    }
    if (t >= p.capacity) {
        return;
    }
    // kv head `head` of all rows' kv heads: its cache is [capacity, hd].
    let head = j / half;
    let k = (head / p.kv_heads) * row_len + q_len + (head % p.kv_heads) * p.head_dim + off;
    let v = k + kv_len;
    let cache_head = (r % p.batch) * p.kv_heads + head % p.kv_heads;
    let at = (cache_head * p.capacity + t) * p.head_dim + off;
    let x0 = qkv[k.x];
    let x1 = qkv[k.y];
    k_cache[at.x] = x0 * c - x1 * s;
    k_cache[at.y] = x0 * s + x1 * c;
    v_cache[at.x] = qkv[v.x];
    v_cache[at.y] = qkv[v.y];
}
