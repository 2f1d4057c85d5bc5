// The GenARM step on the device: guided scores, then argmax or a seeded draw, written
// where the next step's embedding reads its token. One workgroup of SAMPLE_WG threads.
//
//   score_i = lp_0(i) + Σ_j α_j · lp_j(i),   lp_j(i) = logits[slot_j, i] − lse[slot_j]
//
// Sampling draws from softmax(score / T) restricted to a kept set {d_i ≥ τ}, where
// d_i = (score_i − max) / T: top-k moves τ up to the k-th largest d, top-p further up
// to the largest τ whose kept mass still reaches p. Both thresholds are found by
// bisection on τ (counts and masses are monotone in τ), so no sort is needed. The
// draw is the inverse CDF of the host-supplied uniform u over the kept weights in
// vocabulary order: a per-thread chunk sum, a workgroup prefix scan, then the one
// thread whose range holds u·mass walks its chunk.
//
// knobs (a `Knobs` uniform: `SampleKnobs` in uniforms.rs) and alphas (α_1 … α_n) are
// written by the host before each token. Output: cur[0] = id; chosen = [id, lp_0(id),
// lp_j(id)…] as u32 bits. An id of NONE means no score was finite.

const SAMPLE_WG: u32 = 256u;
const NONE: u32 = 0xffffffffu;
// exp(-104) underflows f32: below this tempered score a token weighs nothing.
const FLOOR: f32 = -104.0;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> stats: array<f32>;
@group(0) @binding(3) var<storage, read> slots: array<u32>;
@group(0) @binding(4) var<uniform> knobs: Knobs;
@group(0) @binding(5) var<storage, read> alphas: array<f32>;
@group(0) @binding(6) var<storage, read_write> scores: array<f32>;
@group(0) @binding(7) var<storage, read_write> cur: array<u32>;
@group(0) @binding(8) var<storage, read_write> chosen: array<u32>;

var<workgroup> red_f: array<f32, SAMPLE_WG>;
var<workgroup> red_u: array<u32, SAMPLE_WG>;
var<workgroup> found: atomic<u32>;

fn model_lp(j: u32, i: u32) -> f32 {
    let row = slots[j];
    return logits[row * p.vocab + i] - stats[2u * row + 1u];
}

fn reduce_sum(tid: u32, v: f32) -> f32 {
    red_f[tid] = v;
    workgroupBarrier();
    for (var h = SAMPLE_WG / 2u; h > 0u; h >>= 1u) {
        if (tid < h) {
            red_f[tid] += red_f[tid + h];
        }
        workgroupBarrier();
    }
    let total = workgroupUniformLoad(&red_f[0]);
    workgroupBarrier();
    return total;
}

// The largest value, lowest index among ties; NONE when nothing compares (all NaN).
fn reduce_argmax(tid: u32, v: f32, i: u32) -> u32 {
    red_f[tid] = v;
    red_u[tid] = i;
    workgroupBarrier();
    for (var h = SAMPLE_WG / 2u; h > 0u; h >>= 1u) {
        if (tid < h) {
            let ov = red_f[tid + h];
            let oi = red_u[tid + h];
            let better = oi != NONE && (red_u[tid] == NONE || ov > red_f[tid]
                || (ov == red_f[tid] && oi < red_u[tid]));
            if (better) {
                red_f[tid] = ov;
                red_u[tid] = oi;
            }
        }
        workgroupBarrier();
    }
    let best = workgroupUniformLoad(&red_u[0]);
    workgroupBarrier();
    return best;
}

// Tempered score relative to the max: ≤ 0, −inf for masked tokens.
fn tempered(i: u32, mx: f32, inv_t: f32) -> f32 {
    return (scores[i] - mx) * inv_t;
}

fn count_at_least(tid: u32, tau: f32, mx: f32, inv_t: f32) -> f32 {
    var c = 0.0;
    for (var i = tid; i < p.vocab; i += SAMPLE_WG) {
        c += select(0.0, 1.0, tempered(i, mx, inv_t) >= tau);
    }
    return reduce_sum(tid, c);
}

fn mass_at_least(tid: u32, tau: f32, mx: f32, inv_t: f32) -> f32 {
    var m = 0.0;
    for (var i = tid; i < p.vocab; i += SAMPLE_WG) {
        let d = tempered(i, mx, inv_t);
        m += select(0.0, exp(d), d >= tau);
    }
    return reduce_sum(tid, m);
}

@compute @workgroup_size(SAMPLE_WG)
fn main(@builtin(local_invocation_index) tid: u32) {
    let inv_t = knobs.inv_temperature;
    let top_p = knobs.top_p;
    let u = knobs.u;
    let top_k = knobs.top_k;
    let greedy = knobs.greedy != 0u;

    // 1. Guided scores and their argmax.
    var best = 0.0;
    var best_i = NONE;
    for (var i = tid; i < p.vocab; i += SAMPLE_WG) {
        var s = model_lp(0u, i);
        for (var j = 1u; j < p.models; j++) {
            let alpha = alphas[j - 1u];
            if (alpha != 0.0) {
                s += alpha * model_lp(j, i);
            }
        }
        scores[i] = s;
        if (s > -3.4e38 && (best_i == NONE || s > best)) {
            best = s;
            best_i = i;
        }
    }
    let arg = reduce_argmax(tid, best, best_i);
    var id = arg;

    if (!greedy && arg != NONE) {
        let mx = scores[arg];
        // 2. The kept set's threshold.
        var tau = FLOOR;
        if (top_k > 0u && top_k < p.vocab) {
            var lo = FLOOR;
            var hi = 0.0;
            for (var it = 0u; it < 32u; it++) {
                let mid = 0.5 * (lo + hi);
                if (count_at_least(tid, mid, mx, inv_t) >= f32(top_k)) {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            tau = lo;
        }
        if (top_p < 1.0) {
            let need = top_p * mass_at_least(tid, tau, mx, inv_t);
            var lo = tau;
            var hi = 0.0;
            for (var it = 0u; it < 32u; it++) {
                let mid = 0.5 * (lo + hi);
                if (mass_at_least(tid, mid, mx, inv_t) >= need) {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            tau = lo;
        }

        // 3. Inverse CDF over the kept weights in vocabulary order.
        let chunk = (p.vocab + SAMPLE_WG - 1u) / SAMPLE_WG;
        let start = min(tid * chunk, p.vocab);
        let end = min(start + chunk, p.vocab);
        var chunk_mass = 0.0;
        var last_here = NONE;
        for (var i = start; i < end; i++) {
            let d = tempered(i, mx, inv_t);
            if (d >= tau) {
                chunk_mass += exp(d);
                last_here = i;
            }
        }
        // Inclusive prefix sum of the chunk masses (Hillis–Steele).
        red_f[tid] = chunk_mass;
        if (tid == 0u) {
            atomicStore(&found, NONE);
        }
        workgroupBarrier();
        for (var off = 1u; off < SAMPLE_WG; off <<= 1u) {
            let add = select(0.0, red_f[tid - min(off, tid)], tid >= off);
            workgroupBarrier();
            red_f[tid] += add;
            workgroupBarrier();
        }
        let inclusive = red_f[tid];
        let total = workgroupUniformLoad(&red_f[SAMPLE_WG - 1u]);
        let goal = u * total;
        let exclusive = inclusive - chunk_mass;
        if (goal >= exclusive && goal < inclusive) {
            var acc = exclusive;
            var pick = last_here;
            for (var i = start; i < end; i++) {
                let d = tempered(i, mx, inv_t);
                if (d >= tau) {
                    acc += exp(d);
                    if (acc > goal) {
                        pick = i;
                        break;
                    }
                }
            }
            atomicMin(&found, pick);
        }
        // Rounding can leave the goal past the last_here weight: take the last_here kept id.
        let last_kept = reduce_argmax(tid, f32(select(0u, last_here, last_here != NONE)), last_here);
        if (tid == 0u) {
            red_u[0] = atomicLoad(&found);
        }
        let picked = workgroupUniformLoad(&red_u[0]);
        id = select(last_kept, picked, picked != NONE);
    }

    if (tid == 0u) {
        cur[0] = id;
        chosen[0] = id;
        if (id != NONE) {
            for (var j = 0u; j < p.models; j++) {
                chosen[1u + j] = bitcast<u32>(model_lp(j, id));
            }
        }
    }
}
