//! The GenARM training objective (no reference model, no length normalisation):
//! `loss = −log σ( β_r · (Σ_t log π(y_w,t) − Σ_t log π(y_l,t)) − γ )`.

use candle_core::Tensor;

use crate::error::Result;

/// Mean loss over pairs from the per-pair summed response log-probs.
pub fn genarm_loss(chosen: &Tensor, rejected: &Tensor, beta_r: f64, gamma: f64) -> Result<Tensor> {
    let z = (((chosen - rejected)? * beta_r)? - gamma)?;
    Ok(softplus(&z.neg()?)?.mean_all()?)
}

/// `log(1 + eˣ)` without overflow: `max(x, 0) + log(1 + e^{−|x|})`.
fn softplus(x: &Tensor) -> Result<Tensor> {
    let tail = ((x.abs()?.neg()?.exp()? + 1.0)?).log()?;
    Ok((x.relu()? + tail)?)
}

/// The same loss for one pair in f64, for tests and logs.
pub fn genarm_loss_f64(chosen: f64, rejected: f64, beta_r: f64, gamma: f64) -> f64 {
    let z = beta_r * (chosen - rejected) - gamma;
    // −log σ(z) = log(1 + e^{−z})
    (-z).max(0.0) + (-(z.abs())).exp().ln_1p()
}
