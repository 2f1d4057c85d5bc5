// How matvec stores a value, chosen at compile time (STORE), so the ops that would
// otherwise follow it cost no dispatch: 0 writes, 1 adds to what is there (the
// residual stream), 2 gates it by what is there (the gated MLP: the up projection
// stored over the gate projection's output becomes act(gate) · up, act from
// activation.wgsl). Each value is read and written by the one invocation that
// computes it. The value already carries the bias, if any (bias_at).

fn store_y(i: u32, v: f32) {
    if (STORE == 1u) {
        y[i] += v;
    } else if (STORE == 2u) {
        y[i] = activation(y[i]) * v;
    } else {
        y[i] = v;
    }
}
