// The down half of the LoRA deltas of the adapted batch rows (first + a for a < arms;
// rows before `first`, the base, have none), for every projection that reads this
// input at once: t[a, k] = Σ_c A[a, k, c] · x[first + a, c]. A stacks, per row, each
// projection's `[rank, cols]` matrix zero-padded to the largest rank (zeros where the
// row's adapter lacks the projection); matvec's LoRA epilogue does the up half.
// One workgroup per (a, k). Over a prompt chunk the batch (first + arms rows) repeats
// per position: t slot s (of p.slots) belongs to row first + s, and is computed only
// where that row is an adapted one (row % batch ≥ first).
// t is `[slots, rank]`; for one position slots = arms and slot = arm.
// Defines: WG (power of two).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> t: array<f32>;

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let ak = workgroup_index(wid, nwg);
    let row = p.first + ak / p.rank;
    let batch_row = row % (p.first + p.arms);
    let live = ak < p.slots * p.rank && batch_row >= p.first;
    let ab = ((batch_row - min(batch_row, p.first)) * p.rank + ak % p.rank) * p.cols;
    let n = select(0u, p.cols, live);
    var s = 0.0;
    for (var c = tid; c < n; c += WG) {
        s += a[ab + c] * x[row * p.cols + c];
    }
    partial[tid] = s;
    workgroupBarrier();
    for (var h = WG / 2u; h > 0u; h >>= 1u) {
        if (tid < h) {
            partial[tid] += partial[tid + h];
        }
        workgroupBarrier();
    }
    if (tid == 0u && live) {
        t[ak] = partial[0];
    }
}
