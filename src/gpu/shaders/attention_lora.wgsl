// The attention op's LoRA variant: once head h of row r is in `out`, the part of the
// o projection's down half that reads this head's columns, for the adapted rows:
// lora_parts[s, h, k] = Σ_d A[a, k, h·hd + d] · out[r, h, d], a = r % batch − lora_first
// (the ARM), s = r − lora_first (the t slot; a = s for one position).
// matvec's epilogue sums the heads' parts, so the down half costs no dispatch of its
// own. lora_a is `[arms, lora_rank, heads·hd]`.

@group(0) @binding(7) var<storage, read> lora_a: array<f32>;
@group(0) @binding(8) var<storage, read_write> lora_parts: array<f32>;

fn o_lora_down(r: u32, h: u32, tid: u32, ob: u32, live: bool) {
    // The head's outputs were written by the other invocations of this workgroup.
    storageBarrier();
    let br = r % p.batch;
    if (!live || br < p.lora_first) {
        return;
    }
    let a = br - p.lora_first;
    let slot = r - p.lora_first;
    let q_len = p.heads * p.head_dim;
    for (var k = tid; k < p.lora_rank; k += WG) {
        let ab = (a * p.lora_rank + k) * q_len + h * p.head_dim;
        var s = 0.0;
        for (var d = 0u; d < p.head_dim; d++) {
            s += lora_a[ab + d] * out[ob + d];
        }
        lora_parts[(slot * p.heads + h) * p.lora_rank + k] = s;
    }
}
