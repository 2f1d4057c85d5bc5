// out[r, h, :] = softmax_t(q[r, h]·k[r, g, t] · scale) · v[r, g, t, :] over t = 0..=pos,
// or with a sliding window w > 0 over pos − w < t ≤ pos (transformers' mask),
// g = h / (heads / kv_heads) (grouped-query attention); q is read from the stacked
// q/k/v rows, `[heads + 2·kv_heads, head_dim]` each. One workgroup per (row, head):
// scores go to a scratch buffer (the context can exceed workgroup memory), max and
// sum are tree reductions. Calls o_lora_down from the prelude at the end.
// A prompt chunk's rows are `batch`-row batches, one per position: row r queries at
// pos + r / batch over batch row r % batch's cache, which the chunk's rope_kv_write
// already filled up to the chunk's last position (causal: it reads only up to its own).
// Defines: WG (power of two).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> k_cache: array<f32>;
@group(0) @binding(3) var<storage, read> v_cache: array<f32>;
@group(0) @binding(4) var<storage, read> pos: array<u32>;
@group(0) @binding(5) var<storage, read_write> scores: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let idx = workgroup_index(wid, nwg);
    let live = idx < p.rows * p.heads;
    let r = idx / p.heads;
    let h = idx % p.heads;
    let g = h / (p.heads / p.kv_heads);
    let at = pos[p.pos_index] + r / p.batch;
    let n = select(0u, min(at, p.capacity - 1u) + 1u, live);
    // The first key the query sees: the cache stays full-size, older keys are skipped.
    let first = select(0u, n - min(p.window, n), p.window > 0u);
    let hd = p.head_dim;
    let qb = r * (p.heads + 2u * p.kv_heads) * hd + h * hd;
    let ob = idx * hd;
    let cb = ((r % p.batch) * p.kv_heads + g) * p.capacity * hd;
    let sb = idx * p.capacity;

    var m = -3.0e38;
    for (var t = first + tid; t < n; t += WG) {
        var s = 0.0;
        for (var d = 0u; d < hd; d++) {
            s += qkv[qb + d] * k_cache[cb + t * hd + d];
        }
        s *= p.scale;
        scores[sb + t] = s;
        m = max(m, s);
    }
    partial[tid] = m;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (tid < s) {
            partial[tid] = max(partial[tid], partial[tid + s]);
        }
        workgroupBarrier();
    }
    let mx = partial[0];
    workgroupBarrier();

    var l = 0.0;
    for (var t = first + tid; t < n; t += WG) {
        let e = exp(scores[sb + t] - mx);
        scores[sb + t] = e;
        l += e;
    }
    partial[tid] = l;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (tid < s) {
            partial[tid] += partial[tid + s];
        }
        workgroupBarrier();
    }
    let sum = partial[0];
    // Phase 3 reads weights other threads wrote to storage.
    storageBarrier();

    let nd = select(0u, hd, live);
    for (var d = tid; d < nd; d += WG) {
        var acc = 0.0;
        for (var t = first; t < n; t++) {
            acc += scores[sb + t] * v_cache[cb + t * hd + d];
        }
        out[ob + d] = acc / sum;
    }
    // A no-op unless ARM rows adapt o_proj (attention_lora.wgsl).
    o_lora_down(r, h, tid, ob, live);
}
