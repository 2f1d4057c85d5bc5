// Prepended to every shader. Dispatches larger than the per-dimension workgroup limit
// are laid out as a 2-D grid by `GpuContext::grid`; this recovers the linear workgroup
// index from it (the two must agree).
fn workgroup_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}
