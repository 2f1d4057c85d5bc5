// out[r, :] = table[ids[id_index + r / batch], :] for r < rows: base and ARM rows (a
// batch) share the token; a prompt chunk has one batch per position, each its token.
// A thread handles one 32-column group of one position.
// The id is read on the GPU (the previous step's sample), so nothing is read back.
// One thread per 32-column group; the table may be split in row chunks, one dispatch
// each: a dispatch writes only if the id falls in its chunk, and chunk 0 writes zeros
// for an id outside the vocabulary (never reading out of bounds).
// Defines: WG, FMT.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let gid = workgroup_index(wid, nwg) * WG + tid;
    let groups = (p.dim + 31u) / 32u;
    let position = gid / groups;
    let g = gid % groups;
    if (position * p.batch >= p.rows) {
        return;
    }
    let id = ids[p.id_index + position];
    let in_chunk = id >= p.row_start && id - p.row_start < p.chunk_rows;
    let invalid = id >= p.vocab && p.row_start == 0u;
    if (g * 32u >= p.dim || !(in_chunk || invalid)) {
        return;
    }
    let local = id - p.row_start;
    var q: array<f32, 32>;
    if (in_chunk) {
        if (FMT == 0u) {
            for (var i = 0u; i < 32u; i++) {
                let c = min(g * 32u + i, p.dim - 1u);
                q[i] = bitcast<f32>(w[local * p.dim + c]);
            }
        } else {
            decode_block((local * (p.dim / 32u) + g) * block_bytes(), &q);
        }
    }
    for (var b = 0u; b < p.batch; b++) {
        let r = position * p.batch + b;
        for (var i = 0u; i < 32u; i++) {
            let c = g * 32u + i;
            if (c < p.dim) {
                out[r * p.dim + c] = q[i];
            }
        }
    }
}
