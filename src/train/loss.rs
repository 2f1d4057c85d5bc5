//! The GenARM training objective (no reference model, no length normalisation):
//! `loss = −log σ( β_r · (Σ_t log π(y_w,t) − Σ_t log π(y_l,t)) − γ )`, optionally plus
//! `λ · (−Σ_t log π(y_w,t) / |y_w|)`, the chosen response's mean negative log-likelihood
//! (an anchor: without it, pairs whose rejected response is systematically longer are
//! fitted by lowering every token's probability, as the margin grows with the length
//! gap), and the
//! Bradley–Terry loss of a scalar reward model, `−log σ(r_w − r_l)` — the same form
//! with β_r = 1, γ = 0 and scalar rewards in place of summed log-probs; and DPO's, the
//! same form again on log-ratios to a reference model (`super::dpo`).

use std::str::FromStr;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// What a LoRA is trained to be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// An ARM: the GenARM loss on summed response log-probs.
    #[default]
    Genarm,
    /// A policy: the DPO loss on log-ratios to the frozen base (see `super::dpo`).
    Dpo,
}

impl FromStr for Objective {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "genarm" => Ok(Self::Genarm),
            "dpo" => Ok(Self::Dpo),
            other => Err(format!("unknown objective `{other}` (genarm or dpo)")),
        }
    }
}

/// Mean loss over pairs from the per-pair summed response log-probs.
pub fn genarm_loss(chosen: &Tensor, rejected: &Tensor, beta_r: f64, gamma: f64) -> Result<Tensor> {
    let z = (((chosen - rejected)? * beta_r)? - gamma)?;
    Ok(softplus(&z.neg()?)?.mean_all()?)
}

/// `λ · mean_i(−chosen_i / len_i)`: the anchor term, from the summed log-probs of the
/// chosen responses and their token counts.
pub fn sft_term(chosen: &Tensor, chosen_tokens: &[usize], weight: f64) -> Result<Tensor> {
    let lens: Vec<f32> = chosen_tokens.iter().map(|&n| n.max(1) as f32).collect();
    let lens = Tensor::new(lens.as_slice(), chosen.device())?.to_dtype(chosen.dtype())?;
    Ok(((chosen / lens)?.neg()?.mean_all()? * weight)?)
}

/// One pair's anchor term in f64.
pub fn sft_term_f64(chosen: f64, chosen_tokens: usize, weight: f64) -> f64 {
    weight * -chosen / chosen_tokens.max(1) as f64
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

/// The DPO loss of one pair in f64, from the policy's and the reference's summed
/// response log-probs: `−log σ(β·[(π_w − ref_w) − (π_l − ref_l)])`.
pub fn dpo_loss_f64(policy: [f64; 2], reference: [f64; 2], beta: f64) -> f64 {
    genarm_loss_f64(
        policy[0] - reference[0],
        policy[1] - reference[1],
        beta,
        0.0,
    )
}

/// Mean Bradley–Terry loss `−log σ(r_w − r_l)` over pairs of scalar rewards.
pub fn bradley_terry_loss(chosen: &Tensor, rejected: &Tensor) -> Result<Tensor> {
    genarm_loss(chosen, rejected, 1.0, 0.0)
}

/// The Bradley–Terry loss of one pair in f64.
pub fn bradley_terry_loss_f64(chosen: f64, rejected: f64) -> f64 {
    genarm_loss_f64(chosen, rejected, 1.0, 0.0)
}
