//! A trained scalar reward model (`genarm train --scalar-head`) for scoring: the base
//! with the RM's LoRA and `r = w · h_last`, the final-normed hidden state of the last
//! token. Two copies of the model: one row for whole sequences and prompt prefills, and
//! optionally k rows that score k one-token continuations of a shared prefix at once
//! (ARGS), each on the prefix's KV cache, so a candidate costs one token position.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::cpu::llama::Llama;
use crate::error::{Error, Result};
use crate::model::arm_plan::{check_compatible, lora_own_base};
use crate::model::lora::{LoraAdapter, SCORE_HEAD_TENSOR, SCORE_HEAD_WEIGHTS};
use crate::model::Checkpoint;

pub struct ScalarRewardModel {
    /// One row: whole sequences, and the prefix the candidate rows continue.
    single: Llama,
    /// `candidate_rows` rows for one-token continuations (ARGS); `None` when zero.
    candidates: Option<Llama>,
    /// `[hidden, 1]`.
    head: Tensor,
    label: String,
}

impl ScalarRewardModel {
    /// Opens `dir`'s adapter after checking that it is a scalar reward model with its
    /// head; callers that run long before loading the model check it up front with this.
    pub fn open_adapter(dir: &Path, device: &Device) -> Result<LoraAdapter> {
        if !LoraAdapter::is_adapter_dir(dir) {
            return Err(Error::format(
                dir,
                "not a scalar reward model: no adapter_config.json (train one with \
                 `genarm train --scalar-head`)",
            ));
        }
        let adapter = LoraAdapter::open(dir, device)?;
        if !adapter.info.is_scalar_reward_model() {
            return Err(Error::format(
                dir.join(crate::model::lora::ARM_INFO),
                "not a scalar reward model (train one with `genarm train --scalar-head`; \
                 genarm.json must say \"kind\": \"scalar_reward_model\")",
            ));
        }
        let head_path = dir.join(SCORE_HEAD_WEIGHTS);
        if !head_path.is_file() {
            return Err(Error::format(
                &head_path,
                "the reward model's head is missing",
            ));
        }
        Ok(adapter)
    }

    /// Loads the reward model in `dir` on `base` (or on the checkpoint its
    /// `base_model_name_or_path` names, which must share the base's vocabulary), with
    /// `candidate_rows` rows for candidate scoring (0 for none).
    pub fn load(
        base: &Path,
        dir: &Path,
        candidate_rows: usize,
        context: usize,
        device: &Device,
    ) -> Result<Self> {
        let adapter = Self::open_adapter(dir, device)?;
        let head_path = dir.join(SCORE_HEAD_WEIGHTS);
        let base_ckpt = Checkpoint::open(base)?;
        let label = adapter.label();
        let own_base = lora_own_base(&adapter, base)?;
        if let Some(own) = &own_base {
            check_compatible(&base_ckpt, own, &dir.display().to_string())?;
        }
        let ckpt = own_base.as_ref().unwrap_or(&base_ckpt);
        let adapter = &adapter;
        let hidden = ckpt.config.hidden_size;
        let head = read_head(&head_path, hidden, device)?;
        let load = |rows: usize| {
            Llama::load(
                ckpt.source.as_ref(),
                &ckpt.config,
                &vec![Some(adapter); rows],
                context,
                device,
            )
        };
        let single = load(1)?;
        let candidates = (candidate_rows > 0)
            .then(|| load(candidate_rows))
            .transpose()?;
        Ok(Self {
            single,
            candidates,
            head,
            label,
        })
    }

    /// `genarm.json`'s name, or the directory name.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// How many one-token continuations `score_candidates` takes at once.
    pub fn candidate_rows(&self) -> usize {
        self.candidates.as_ref().map_or(0, Llama::rows)
    }

    /// The longest sequence the model holds.
    pub fn context_len(&self) -> usize {
        self.single.capacity()
    }

    /// `r(tokens)` from a fresh sequence; the cache keeps `tokens`, so continuations
    /// of it can follow (`score_continuation`, `start_candidates`).
    pub fn score_sequence(&mut self, tokens: &[u32]) -> Result<f32> {
        self.single.reset();
        self.feed_single(tokens)
    }

    /// `r(prefix ++ more)` where `prefix` is the first `prefix_len` tokens given to
    /// `score_sequence`: only `more` is computed.
    pub fn score_continuation(&mut self, prefix_len: usize, more: &[u32]) -> Result<f32> {
        self.single.rewind(prefix_len)?;
        self.feed_single(more)
    }

    fn feed_single(&mut self, tokens: &[u32]) -> Result<f32> {
        let h = self.single.final_hidden_rows(&[tokens.to_vec()], false)?;
        Ok(self.rewards(&h)?[0])
    }

    /// Makes the sequence last scored by `score_sequence` every candidate row's prefix.
    pub fn start_candidates(&mut self) -> Result<()> {
        let rows = self.candidates.as_mut().ok_or_else(no_candidate_rows)?;
        rows.copy_cache_from(&self.single, 0)
    }

    /// `r(prefix ++ [c])` for each candidate `c` (one per row), each on the cached
    /// prefix. Then `keep_candidate` must say which one the prefix continues with.
    pub fn score_candidates(&mut self, candidates: &[u32]) -> Result<Vec<f32>> {
        let rows = self.candidates.as_mut().ok_or_else(no_candidate_rows)?;
        if candidates.len() != rows.rows() {
            return Err(Error::Request(format!(
                "{} candidates for a reward model with {} candidate rows",
                candidates.len(),
                rows.rows()
            )));
        }
        let tokens: Vec<Vec<u32>> = candidates.iter().map(|&c| vec![c]).collect();
        let h = rows.final_hidden_rows(&tokens, false)?;
        self.rewards(&h)
    }

    /// Extends every row's prefix with the candidate of row `row`.
    pub fn keep_candidate(&mut self, row: usize) -> Result<()> {
        let rows = self.candidates.as_mut().ok_or_else(no_candidate_rows)?;
        let last = rows.position().saturating_sub(1);
        rows.keep_row(row, last)
    }

    /// `w · h` per row of `[rows, 1, hidden]` hidden states.
    fn rewards(&self, hidden: &Tensor) -> Result<Vec<f32>> {
        let (rows, _, h) = hidden.dims3()?;
        let r = hidden.reshape((rows, h))?.matmul(&self.head)?;
        Ok(r.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }
}

fn no_candidate_rows() -> Error {
    Error::Request("this reward model was loaded without candidate rows".into())
}

/// `score.weight` `[1, hidden]` as a `[hidden, 1]` f32 column.
fn read_head(path: &Path, hidden: usize, device: &Device) -> Result<Tensor> {
    let tensors = candle_core::safetensors::load(path, device)
        .map_err(|e| Error::format(path, format!("cannot read the head: {e}")))?;
    let w = tensors
        .get(SCORE_HEAD_TENSOR)
        .ok_or_else(|| Error::MissingTensor {
            path: path.into(),
            name: SCORE_HEAD_TENSOR.into(),
        })?;
    if w.dims() != [1, hidden] {
        return Err(Error::TensorShape {
            path: path.into(),
            name: SCORE_HEAD_TENSOR.into(),
            got: w.dims().to_vec(),
            want: vec![1, hidden],
        });
    }
    Ok(w.to_dtype(DType::F32)?.t()?.contiguous()?)
}
