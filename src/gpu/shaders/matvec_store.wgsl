// How matvec stores a value, chosen at compile time (STORE), so the ops that would
// otherwise follow it cost no dispatch: 0 writes, 1 adds to what is there (the
// residual stream), 2 gates it by what is there (SwiGLU: the up projection stored
// over the gate projection's output becomes silu(gate) · up). Each value is read and
// written by the one invocation that computes it.

fn store_y(i: u32, v: f32) {
    if (STORE == 1u) {
        y[i] += v;
    } else if (STORE == 2u) {
        let g = y[i];
        // g / (1 + e^-g): for very negative g, e^-g = inf and the quotient is -0, not NaN.
        y[i] = g / (1.0 + exp(-g)) * v;
    } else {
        y[i] = v;
    }
}
