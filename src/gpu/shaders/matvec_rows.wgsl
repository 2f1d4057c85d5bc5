// y[r, row_offset + i] = Σ_c W[i, c] · x[r, c], one invocation per weight row: no
// workgroup memory and no barriers. The variant for CPU adapters (lavapipe,
// SwiftShader), which run a workgroup's invocations as SIMD lanes and pay dearly for
// every barrier; GPUs take `matvec.wgsl`, whose reads are coalesced.
// Adds the LoRA delta as matvec.wgsl does.
// Adds the projection's bias (bias_at: 0 without one) and stores through store_y
// (matvec_store.wgsl).
// M is the batch, or a prompt chunk's batches of every position (see matvec.wgsl).
// Defines: WG, M, FMT, STORE, ACT.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let row = workgroup_index(wid, nwg) * WG + tid;
    if (row >= p.rows) {
        return;
    }
    var acc: array<f32, M>;
    if (FMT == 0u) {
        for (var c = 0u; c < p.cols; c++) {
            let wv = bitcast<f32>(w[row * p.cols + c]);
            for (var r = 0u; r < M; r++) {
                acc[r] += wv * x[r * p.cols + c];
            }
        }
    } else {
        let nb = p.cols / 32u;
        let row_off = row * nb * block_bytes();
        for (var b = 0u; b < nb; b++) {
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
    for (var r = 0u; r < M; r++) {
        let i = p.row_offset + row;
        store_y(r * p.y_stride + i, acc[r] + lora_delta(r, i) + bias_at(i));
    }
}
