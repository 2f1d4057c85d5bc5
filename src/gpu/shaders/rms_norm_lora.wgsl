// rms_norm.wgsl plus the LoRA down-projections of the normed rows, in one dispatch:
// workgroups 0..rows write y as rms_norm does; workgroup rows + ak computes
// t[ak] = Σ_c A[ak, c] · y[first + ak / rank, c] from x itself (its own sum of
// squares), so it needs nothing the other workgroups write. A and t are laid out as
// lora_down's: `[arms, rank, n]` and `[slots, rank]`. Over a prompt chunk the rows
// are `batch`-row batches, one per position: t slot s belongs to row first + s, which
// is adapted when its batch row (row % batch) is first or later.
// Defines: WG (power of two).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> a: array<f32>;
@group(0) @binding(5) var<storage, read_write> t: array<f32>;

var<workgroup> partial: array<vec2<f32>, WG>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let idx = workgroup_index(wid, nwg);
    let lora = idx >= p.rows;
    let ak = idx - select(0u, p.rows, lora);
    let row = select(idx, p.first + ak / p.rank, lora);
    let live = idx < p.rows + (p.rows - p.first) * p.rank;
    let batch_row = row % p.batch;
    let adapted = lora && batch_row >= p.first;
    let ab = ((batch_row - select(batch_row, p.first, adapted)) * p.rank + ak % p.rank) * p.n;
    let n = select(0u, p.n, live);
    let base = row * p.n;
    // (sum of squares, A-row · x·weight): the norm's 1/rms is applied once at the end.
    var acc = vec2<f32>(0.0, 0.0);
    for (var c = tid; c < n; c += WG) {
        let v = x[base + c];
        acc.x += v * v;
        if (adapted) {
            acc.y += a[ab + c] * v * weight[c];
        }
    }
    partial[tid] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (tid < s) {
            partial[tid] += partial[tid + s];
        }
        workgroupBarrier();
    }
    let inv = 1.0 / sqrt(partial[0].x / f32(p.n) + p.eps);
    if (lora) {
        if (tid == 0u && live && adapted) {
            t[ak] = partial[0].y * inv;
        }
        return;
    }
    for (var c = tid; c < n; c += WG) {
        y[base + c] = x[base + c] * inv * weight[c];
    }
}
