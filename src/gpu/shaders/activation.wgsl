// The MLP gate's activation, chosen at compile time (ACT): 0 SiLU, 1 the exact GELU
// x·Φ(x), 2 GELU's tanh approximation. Each is written so that no intermediate
// overflows to NaN at large |x|. WGSL has no erf, hence Φ below.

// erf(x) / x as a polynomial in x²: the Maclaurin series 2/√π Σ (−1)ⁿ x²ⁿ / (n!·(2n+1)),
// cut after 12 terms, where the next is below 1e-9 for |x| < 1.
fn erf_series(x: f32) -> f32 {
    let x2 = x * x;
    var s = -1.22905553e-09;
    s = s * x2 + 1.48071928e-08;
    s = s * x2 - 1.63658447e-07;
    s = s * x2 + 1.64621144e-06;
    s = s * x2 - 1.49256504e-05;
    s = s * x2 + 1.20553330e-04;
    s = s * x2 - 8.54832702e-04;
    s = s * x2 + 5.22397763e-03;
    s = s * x2 - 2.68661706e-02;
    s = s * x2 + 1.12837917e-01;
    s = s * x2 - 3.76126389e-01;
    s = s * x2 + 1.12837917e+00;
    return x * s;
}

// erfc(z) for z ≥ 0: the Chebyshev fit t·exp(−z² + P(t)), t = 1/(1 + z/2), whose
// relative error is below 1.2e-7 for every z ≥ 0 (Press et al., Numerical Recipes §6.2).
fn erfc_cheb(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    var q = 0.17087277;
    q = q * t - 0.82215223;
    q = q * t + 1.48851587;
    q = q * t - 1.13520398;
    q = q * t + 0.27886807;
    q = q * t - 0.18628806;
    q = q * t + 0.09678418;
    q = q * t + 0.37409196;
    q = q * t + 1.00002368;
    q = q * t - 1.26551223;
    return t * exp(q - z * z);
}

// Φ(x), the standard normal CDF: the series near 0, else from erfc, so the lower
// tail keeps its relative accuracy (x·Φ(x) is tiny there, not rounded to zero).
fn normal_cdf(x: f32) -> f32 {
    let z = abs(x) * 0.70710678;
    if (z < 1.0) {
        return 0.5 + 0.5 * erf_series(x * 0.70710678);
    }
    let tail = 0.5 * erfc_cheb(z);
    return select(tail, 1.0 - tail, x > 0.0);
}

fn activation(g: f32) -> f32 {
    if (ACT == 1u) {
        return g * normal_cdf(g);
    } else if (ACT == 2u) {
        // ½(1 + tanh u) = 1 / (1 + e^(−2u)): no tanh of a large argument.
        let u = 0.7978845608 * (g + 0.044715 * g * g * g);
        return g / (1.0 + exp(-2.0 * u));
    }
    // g / (1 + e^-g): for very negative g, e^-g = inf and the quotient is -0, not NaN.
    return g / (1.0 + exp(-g));
}
