// The LoRA variant's epilogue for matvec: the up-projection of an ARM row's delta,
// folded into the store so the delta costs no dispatch of its own.
// lora_b is `[arms, y_stride, lora_rank]` (already times the adapter scale, zeros for a
// row without this projection); lora_t holds the rows' down-projections, written by
// lora_down for all projections sharing this input, or by the attention op as one
// partial sum per head (lora_parts of them, summed here). A prompt chunk's row r has
// t slot r − lora_first (slots of base rows stay unused).

@group(0) @binding(4) var<storage, read> lora_b: array<f32>;
@group(0) @binding(5) var<storage, read> lora_t: array<f32>;

fn lora_delta(r: u32, i: u32) -> f32 {
    // Over a prompt chunk row r is batch row r % batch of its position.
    let br = r % p.batch;
    if (br < p.lora_first) {
        return 0.0;
    }
    let a = br - p.lora_first;
    let bb = (a * p.y_stride + i) * p.lora_rank;
    let tb = (r - p.lora_first) * p.lora_t_stride + p.lora_t_offset;
    var s = 0.0;
    for (var k = 0u; k < p.lora_rank; k++) {
        var t = 0.0;
        for (var part = 0u; part < p.lora_parts; part++) {
            t += lora_t[tb + part * p.lora_rank + k];
        }
        s += lora_b[bb + k] * t;
    }
    return s;
}
