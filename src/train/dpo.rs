//! DPO (Rafailov et al., 2023), the training-time baseline GenARM is compared with: a
//! LoRA *policy* on the base, trained with
//! `−log σ(β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))])`,
//! the reference being the frozen base itself.
//!
//! The reference needs no second copy of the weights: it is the trained model's own
//! forward pass with the LoRA deltas left out ([`TrainableArm::base_response_logprobs`]),
//! so it is right at any point of training, and a resumed run recomputes exactly what
//! the first run used. Each pair's two summed response log-probs are computed once and
//! kept here, next to the pairs.
//!
//! With the log-ratios `log π − log π_ref` in place of the summed log-probs, the DPO loss
//! is the GenARM loss ([`super::loss::genarm_loss`]) with β_r = β: the trainer scores a
//! pair by its log-ratios, and its loss, accuracy (DPO's implicit-reward accuracy) and
//! evaluation are shared.

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Tensor};

use super::arm::TrainableArm;
use super::data::TokenizedPair;
use crate::error::Result;

/// The frozen base's summed response log-probs `[chosen, rejected]` of each pair seen.
#[derive(Default)]
pub struct ReferenceLogprobs {
    by_pair: HashMap<TokenizedPair, [f64; 2]>,
}

impl ReferenceLogprobs {
    /// How many pairs have their reference.
    pub fn len(&self) -> usize {
        self.by_pair.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_pair.is_empty()
    }

    /// A pair's reference `[log π_ref(y_w), log π_ref(y_l)]`, if computed.
    pub fn get(&self, pair: &TokenizedPair) -> Option<[f64; 2]> {
        self.by_pair.get(pair).copied()
    }

    /// Computes the reference of every pair in `pairs` not seen yet, `chunk` pairs per
    /// forward pass.
    pub fn extend(
        &mut self,
        arm: &mut TrainableArm,
        pairs: &[&TokenizedPair],
        chunk: usize,
    ) -> Result<()> {
        let mut seen = HashSet::new();
        let missing: Vec<&TokenizedPair> = pairs
            .iter()
            .copied()
            .filter(|&p| !self.by_pair.contains_key(p) && seen.insert(p))
            .collect();
        for group in missing.chunks(chunk.max(1)) {
            let (seqs, starts) = pair_sequences(group);
            let lp = arm
                .base_response_logprobs(&seqs, &starts)?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            for (p, two) in group.iter().zip(lp.chunks_exact(2)) {
                self.by_pair.insert((*p).clone(), [two[0], two[1]]);
            }
        }
        Ok(())
    }

    /// `(chosen − ref_chosen, rejected − ref_rejected)`: the policy's log-ratios, from its
    /// summed log-probs of `pairs` (each pair's reference must be computed).
    pub fn log_ratios(
        &self,
        pairs: &[&TokenizedPair],
        chosen: &Tensor,
        rejected: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let mut refs = [Vec::new(), Vec::new()];
        for p in pairs {
            let r = self.get(p).ok_or_else(|| {
                crate::error::Error::Request(
                    "a pair has no reference log-probs (compute them first)".into(),
                )
            })?;
            refs[0].push(r[0]);
            refs[1].push(r[1]);
        }
        let as_tensor = |v: &[f64]| -> Result<Tensor> {
            Ok(Tensor::new(v, chosen.device())?.to_dtype(chosen.dtype())?)
        };
        Ok((
            (chosen - as_tensor(&refs[0])?)?,
            (rejected - as_tensor(&refs[1])?)?,
        ))
    }
}

/// Prompt + chosen and prompt + rejected of each pair, in that order, with the index of
/// each response's first token.
pub fn pair_sequences(pairs: &[&TokenizedPair]) -> (Vec<Vec<u32>>, Vec<usize>) {
    let mut seqs = Vec::with_capacity(2 * pairs.len());
    let mut starts = Vec::with_capacity(2 * pairs.len());
    for p in pairs {
        for resp in [&p.chosen, &p.rejected] {
            seqs.push([p.prompt.as_slice(), resp].concat());
            starts.push(p.prompt.len());
        }
    }
    (seqs, starts)
}
