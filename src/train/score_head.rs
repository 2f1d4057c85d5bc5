//! The scalar head of a conventional trajectory-level reward model — the baseline the
//! GenARM paper contrasts ARMs with: `r(x, y) = w · h_last`, where `h_last` is the
//! final-normed hidden state of the last token of prompt + response, on the same
//! base + LoRA as an ARM. Trained with the Bradley–Terry loss
//! `−log σ(r(x, y_w) − r(x, y_l))`.

use candle_core::{DType, Device, Tensor, Var};

use super::arm::{DropoutKey, TrainableArm};
use crate::error::{Error, Result};
use crate::guide::uniform;

pub struct ScoreHead {
    /// `[1, hidden]`, saved as `score.weight` (the name HF's sequence-classification
    /// heads use).
    pub weight: Var,
}

impl ScoreHead {
    /// A fresh head, uniform in ±1/√hidden (PyTorch's default for a linear layer): a
    /// zero head would give the LoRA no gradient on the first step.
    pub fn new(hidden: usize, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let bound = 1.0 / (hidden as f64).sqrt();
        // A stream of its own, apart from the LoRA initialisation's draws.
        let stream = seed ^ 0x5C0E_11EA_D000_0001;
        let w: Vec<f64> = (0..hidden as u64)
            .map(|i| (uniform(stream, i) * 2.0 - 1.0) * bound)
            .collect();
        let w = Tensor::from_vec(w, (1, hidden), device)?.to_dtype(dtype)?;
        Ok(Self {
            weight: Var::from_tensor(&w)?,
        })
    }

    /// `r` for each whole sequence (prompt + response), read at its last token;
    /// differentiable in the head and the LoRA weights.
    pub fn rewards(
        &self,
        arm: &mut TrainableArm,
        seqs: &[Vec<u32>],
        dropout: Option<DropoutKey>,
    ) -> Result<Tensor> {
        let x = arm.final_hidden(seqs, dropout)?;
        let (n, t_max, hidden) = x.dims3()?;
        let (_, head_in) = self.weight.dims2()?;
        if head_in != hidden {
            return Err(Error::Request(format!(
                "score head takes {head_in} features, the model's hidden size is {hidden}"
            )));
        }
        let last: Vec<u32> = seqs
            .iter()
            .enumerate()
            .map(|(i, s)| (i * t_max + s.len() - 1) as u32)
            .collect();
        let flat = x.reshape((n * t_max, hidden))?;
        let picked = flat.index_select(&Tensor::new(last.as_slice(), arm.device())?, 0)?;
        Ok(picked.matmul(&self.weight.as_tensor().t()?)?.squeeze(1)?)
    }
}
