// y[r, row_offset + i] = Σ_c W[i, c] · x[r, c] for r < M (the batch: base + ARM rows)
// and every row i of one weight chunk. One workgroup per weight row: each thread
// decodes a strided subset of the row's blocks once and dots it with all M
// activation rows (the weights are the memory traffic), then a pairwise tree
// reduction in workgroup memory sums the WG partials.
// The LoRA variant adds each ARM row's low-rank delta as it stores (lora_delta, from
// lora_epilogue.wgsl; the plain variant's returns 0).
// Adds the projection's bias (bias_at: 0 without one) and stores through store_y
// (matvec_store.wgsl).
// M is the batch (base + ARM rows), or a prompt chunk's batches of every position:
// the weights are decoded once for all M rows. The partials are reduced RT rows at a
// time (RT divides M), so workgroup memory stays WG · RT floats however large M is.
// Defines: WG (power of two), M, RT, FMT, STORE, ACT.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

var<workgroup> partial: array<f32, WG * RT>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let row = workgroup_index(wid, nwg);
    // No early return: every thread must reach the barriers below.
    let live = row < p.rows;
    var acc: array<f32, M>;
    if (FMT == 0u) {
        let n = select(0u, p.cols, live);
        for (var c = tid; c < n; c += WG) {
            let wv = bitcast<f32>(w[row * p.cols + c]);
            for (var r = 0u; r < M; r++) {
                acc[r] += wv * x[r * p.cols + c];
            }
        }
    } else {
        let nb = select(0u, p.cols / 32u, live);
        let row_off = row * (p.cols / 32u) * block_bytes();
        for (var b = tid; b < nb; b += WG) {
            var q: array<f32, 32>;
            decode_block(row_off + b * block_bytes(), &q);
            for (var r = 0u; r < M; r++) {
                let xb = r * p.cols + b * 32u;
                var s = 0.0;
                for (var i = 0u; i < 32u; i++) {
                    s += q[i] * x[xb + i];
                }
                acc[r] += s;
            }
        }
    }
    for (var r0 = 0u; r0 < M; r0 += RT) {
        for (var r = 0u; r < RT; r++) {
            partial[r * WG + tid] = acc[r0 + r];
        }
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s >>= 1u) {
            if (tid < s) {
                for (var r = 0u; r < RT; r++) {
                    partial[r * WG + tid] += partial[r * WG + tid + s];
                }
            }
            workgroupBarrier();
        }
        if (tid == 0u && live) {
            for (var r = 0u; r < RT; r++) {
                let i = p.row_offset + row;
                let v = partial[r * WG] + lora_delta(r0 + r, i) + bias_at(i);
                store_y((r0 + r) * p.y_stride + i, v);
            }
        }
        // The next tile overwrites what thread 0 has just read.
        workgroupBarrier();
    }
}
