//! How far a response's decoding distribution moved from the base, estimated from the
//! response itself: `Σ_t [log π_dec(y_t | x, y_<t) − log π_base(y_t | x, y_<t)]`. Over
//! responses sampled from `π_dec` its mean is `KL(π_dec ‖ π_base)` of whole responses (a
//! Monte Carlo estimate, unbiased; one response's value may be negative): the x-axis on
//! which the paper compares GenARM's α sweep with DPO's β.
//!
//! `π_dec` is what the sampler drew from ([`Sampler::probabilities`]): for GenARM at α,
//! `softmax((log π_base + Σ_i α_i · log π_arm_i) / T)` cut to top-k / top-p and
//! renormalised; for a trained policy (DPO), the policy's own softmax at `T`. So α = 0 at
//! T = 1 with no cut gives exactly 0, and T ≠ 1 alone gives a positive KL (the sampled
//! distribution is not the base's). Greedy decoding is a point mass: `−Σ log π_base(y_t)`.
//!
//! The log-probs come from one teacher-forced pass over prompt + response after the
//! response was generated, so measuring costs the method nothing it is charged for.

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::guide::{combine, Sampler, SamplingParams};

/// `log π_dec(id)` for the guided `scores` under `params` (see the module doc). A token
/// that teacher forcing's rounding puts just outside the nucleus it was drawn from is
/// counted in with its own weight instead of getting `−∞`.
pub fn decoding_logprob(params: &SamplingParams, scores: &[f32], id: u32) -> f64 {
    if params.greedy {
        return 0.0;
    }
    let t = params.temperature as f64;
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    // The weights `probabilities` returns are exp((s − max) / T), unnormalised.
    let kept = Sampler::new(params.clone()).probabilities(scores);
    let mut total: f64 = kept.iter().map(|&(_, w)| w).sum();
    if !kept.iter().any(|&(i, _)| i == id) {
        total += ((scores[id as usize] as f64 - max) / t).exp();
    }
    (scores[id as usize] as f64 - max) / t - total.ln()
}

/// Each model's log-prob rows at the positions that predicted `response`'s tokens:
/// `[model][t][vocab]`, model 0 being the engine's base (with its `--lora`, if any).
/// The last response token is never fed (nothing is predicted from it), so a response
/// that filled the context still fits.
fn response_rows(
    engine: &mut dyn Engine,
    prompt: &[u32],
    response: &[u32],
) -> Result<Vec<Vec<Vec<f32>>>> {
    if prompt.is_empty() {
        return Err(Error::Request(
            "the KL to the base needs a prompt of at least one token".into(),
        ));
    }
    let mut seq = prompt.to_vec();
    seq.extend_from_slice(&response[..response.len() - 1]);
    let rows = engine.teacher_forced(&seq)?;
    Ok(rows
        .into_iter()
        .map(|model| model.into_iter().skip(prompt.len() - 1).collect())
        .collect())
}

/// The estimate for a response GenARM sampled at `alphas` from `engine`'s base and ARMs
/// (the engine the sweep decoded with). 0 for an empty response.
pub fn guided_kl(
    engine: &mut dyn Engine,
    prompt: &[u32],
    response: &[u32],
    alphas: &[f32],
    params: &SamplingParams,
) -> Result<f64> {
    if response.is_empty() {
        return Ok(0.0);
    }
    let rows = response_rows(engine, prompt, response)?;
    let (base, arms) = rows.split_first().expect("the base's rows come first");
    if arms.len() != alphas.len() {
        return Err(Error::Request(format!(
            "{} ARM weights given for {} ARMs",
            alphas.len(),
            arms.len()
        )));
    }
    let mut kl = 0.0;
    for (t, &y) in response.iter().enumerate() {
        let arm_rows: Vec<&[f32]> = arms.iter().map(|a| a[t].as_slice()).collect();
        let scores = combine(&base[t], &arm_rows, alphas);
        kl += decoding_logprob(params, &scores, y) - base[t][y as usize] as f64;
    }
    Ok(kl)
}

/// The estimate for a response sampled (with no ARM) from `policy`'s own model, e.g. base
/// + a DPO LoRA, against `base`'s model. 0 for an empty response.
pub fn policy_kl(
    policy: &mut dyn Engine,
    base: &mut dyn Engine,
    prompt: &[u32],
    response: &[u32],
    params: &SamplingParams,
) -> Result<f64> {
    if response.is_empty() {
        return Ok(0.0);
    }
    let sampled = response_rows(policy, prompt, response)?.swap_remove(0);
    let reference = response_rows(base, prompt, response)?.swap_remove(0);
    Ok(response
        .iter()
        .enumerate()
        .map(|(t, &y)| decoding_logprob(params, &sampled[t], y) - reference[t][y as usize] as f64)
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_softmax_at_temperature() {
        let scores = [0.0f32, -1.0, -2.5];
        let params = SamplingParams {
            temperature: 0.5,
            ..Default::default()
        };
        let z: f64 = scores.iter().map(|&s| (s as f64 / 0.5).exp()).sum();
        let want = (-1.0 / 0.5) - z.ln();
        assert!((decoding_logprob(&params, &scores, 1) - want).abs() < 1e-12);
    }

    #[test]
    fn top_p_renormalises_over_the_nucleus_and_greedy_is_a_point_mass() {
        // Probabilities ∝ e^0, e^-1, e^-5 (0.73, 0.27, 0.005): top-p 0.8 keeps two.
        let scores = [0.0f32, -1.0, -5.0];
        let params = SamplingParams {
            top_p: 0.8,
            ..Default::default()
        };
        let kept = 1.0 + (-1.0f64).exp();
        assert!((decoding_logprob(&params, &scores, 1) - (-1.0 - kept.ln())).abs() < 1e-12);
        // Outside the nucleus: counted in with its own weight, finite.
        let outside = decoding_logprob(&params, &scores, 2);
        assert!((outside - (-5.0 - (kept + (-5.0f64).exp()).ln())).abs() < 1e-12);
        let greedy = SamplingParams {
            greedy: true,
            ..Default::default()
        };
        assert_eq!(decoding_logprob(&greedy, &scores, 0), 0.0);
    }
}
