//! The GenARM pick on the device the models run on: guided scores, temperature,
//! top-k/top-p and the seeded draw as candle tensor ops, so only the chosen id and each
//! model's log-prob of it are read back (one transfer of `models + 2` numbers) instead of
//! every row's full log-softmax.
//!
//! It mirrors `guide::Sampler` step by step, with the uniform number the host sampler
//! would use (`Sampler::peek_uniform`): the same f32 combination, the same f64 weights
//! `exp((s − max) / T)`, the inverse CDF in vocabulary order (full distribution) or in
//! the sampler's order (score descending, lower id first) over the top-k / top-p prefix.
//! Prefix sums are blocked matrix products rather than one running sum, so a draw may
//! differ from the host's only when `u · total` falls within f64 rounding of a boundary
//! between two tokens (about 1e-16 of the mass).
//!
//! Top-k / top-p work on a candidate set: the tokens scoring at least a threshold found
//! by bisection, twice as many slots as top-k needs (at most `CANDIDATES`), compacted
//! and ranked pairwise. When the
//! kept prefix may reach past that set (a flat distribution with top-p near 1) the pick
//! answers `None` and the caller samples the host way.

use candle_core::{DType, Device, Tensor};

use crate::engine::Chosen;
use crate::error::{Error, Result};
use crate::guide::SamplingParams;

/// How many tokens the top-k / top-p path ranks at most (a `CANDIDATES²` comparison).
pub const CANDIDATES: usize = 1024;
/// Bisection steps of the candidate threshold: the score range over 2^48.
const THRESHOLD_STEPS: usize = 48;

/// Tensors built once per vocabulary size and device.
pub struct DeviceSampler {
    vocab: usize,
    /// Prefix sums run over `[blocks, block]` (vocabulary padded with zeros).
    block: usize,
    blocks: usize,
    /// `[block, block]` f64, 1 where row ≤ column: `x · upper` is x's inclusive prefix sum.
    upper: Tensor,
    /// `[blocks, blocks]` f64, 1 where row < column: the exclusive prefix of block totals.
    strict_upper: Tensor,
    /// `[vocab]` u32 token ids and `[vocab]` filled with `vocab` (no token).
    ids: Tensor,
    none: Tensor,
    device: Device,
}

impl DeviceSampler {
    pub fn new(vocab: usize, device: &Device) -> Result<Self> {
        if vocab == 0 || vocab >= 1 << 24 {
            return Err(Error::Request(format!(
                "a device sampler needs a vocabulary of 1 to 2^24 tokens, not {vocab}"
            )));
        }
        let block = (vocab as f64).sqrt().ceil() as usize;
        let blocks = vocab.div_ceil(block);
        Ok(Self {
            vocab,
            block,
            blocks,
            upper: triangle(block, true, device)?,
            strict_upper: triangle(blocks, false, device)?,
            ids: Tensor::arange(0u32, vocab as u32, device)?,
            none: Tensor::full(vocab as u32, vocab, device)?,
            device: device.clone(),
        })
    }

    /// Picks the next token from `rows` (each model's `[vocab]` f32 log-probs on the
    /// device, base first) with weights `alphas` and uniform `u` (unused when greedy).
    /// `None`: the top-k / top-p prefix may be larger than the candidate set; sample on
    /// the host instead.
    pub fn pick(
        &self,
        rows: &[Tensor],
        alphas: &[f32],
        params: &SamplingParams,
        u: f64,
    ) -> Result<Option<Chosen>> {
        let Some(base) = rows.first() else {
            return Err(Error::Request("no model rows to pick from".into()));
        };
        if rows.len() != alphas.len() + 1 {
            return Err(Error::Request(format!(
                "{} ARM weights given for {} ARMs",
                alphas.len(),
                rows.len() - 1
            )));
        }
        // Exactly `guide::combine`: s += α·a in f32, ARM by ARM, zero weights skipped.
        let mut scores = base.clone();
        for (arm, &alpha) in rows[1..].iter().zip(alphas) {
            if alpha != 0.0 {
                scores = (scores + arm.affine(alpha as f64, 0.0)?)?;
            }
        }
        let max = scores.max_keepdim(0)?;
        let full = params.top_k.is_none_or(|k| k >= self.vocab) && params.top_p >= 1.0;
        let (id, overflow) = if params.greedy {
            // The lowest id among the maxima, as `guide::argmax`.
            let at_max = scores.broadcast_eq(&max)?;
            (at_max.where_cond(&self.ids, &self.none)?.min(0)?, None)
        } else {
            let t = Tensor::new(params.temperature as f64, &self.device)?;
            let weights = scores
                .to_dtype(DType::F64)?
                .broadcast_sub(&max.to_dtype(DType::F64)?)?
                .broadcast_div(&t)?
                .exp()?;
            if full {
                (self.inverse_cdf(&weights, u)?, None)
            } else {
                let (id, overflow) = self.pick_top(&scores, &weights, params, u)?;
                (id, Some(overflow))
            }
        };
        // One transfer: [id, overflow, log-prob of id under each model].
        let safe = id.minimum(self.vocab as u32 - 1)?.reshape(1)?;
        let lps = Tensor::stack(rows, 0)?
            .index_select(&safe, 1)?
            .flatten_all()?;
        let head = Tensor::stack(
            &[
                id.to_dtype(DType::F32)?,
                overflow.map_or_else(
                    || Tensor::new(0f32, &self.device),
                    |o| o.to_dtype(DType::F32),
                )?,
            ],
            0,
        )?;
        let out = Tensor::cat(&[head, lps], 0)?.to_vec1::<f32>()?;
        if out[1] != 0.0 {
            return Ok(None);
        }
        let id = out[0] as u32;
        let logprobs = &out[2..];
        let score = logprobs[0]
            + logprobs[1..]
                .iter()
                .zip(alphas)
                .map(|(lp, a)| if *a == 0.0 { 0.0 } else { a * lp })
                .sum::<f32>();
        if id as usize >= self.vocab || !score.is_finite() {
            return Err(Error::Request(
                "the guided scores are not finite (NaN or infinite logits)".into(),
            ));
        }
        Ok(Some(Chosen {
            id,
            base_logprob: logprobs[0],
            arm_logprobs: logprobs[1..].to_vec(),
        }))
    }

    /// Inclusive prefix sums of `x` (`[vocab]` f64) in vocabulary order.
    fn prefix_sums(&self, x: &Tensor) -> Result<Tensor> {
        let pad = self.blocks * self.block - self.vocab;
        let x = if pad > 0 {
            Tensor::cat(&[x, &Tensor::zeros(pad, DType::F64, &self.device)?], 0)?
        } else {
            x.clone()
        };
        let within = x.reshape((self.blocks, self.block))?.matmul(&self.upper)?;
        let totals = within.narrow(1, self.block - 1, 1)?; // [blocks, 1]
        let before = totals.t()?.contiguous()?.matmul(&self.strict_upper)?.t()?; // [blocks, 1]
        Ok(within
            .broadcast_add(&before)?
            .flatten_all()?
            .narrow(0, 0, self.vocab)?)
    }

    /// `guide::pick` over every token in vocabulary order: the first id whose running
    /// weight exceeds `u · total`, else the last id with weight.
    fn inverse_cdf(&self, weights: &Tensor, u: f64) -> Result<Tensor> {
        let cum = self.prefix_sums(weights)?;
        let target = cum.narrow(0, self.vocab - 1, 1)?.affine(u, 0.0)?;
        let first = cum
            .broadcast_gt(&target)?
            .where_cond(&self.ids, &self.none)?
            .min(0)?;
        let zero = self.ids.zeros_like()?;
        let last = weights.gt(0.0)?.where_cond(&self.ids, &zero)?.max(0)?;
        let found = first.lt(self.vocab as u32)?;
        Ok(found.where_cond(&first, &last)?)
    }

    /// The top-k / top-p pick over the candidate set; also answers whether the kept
    /// prefix may reach past it (then the pick is not to be used).
    fn pick_top(
        &self,
        scores: &Tensor,
        weights: &Tensor,
        params: &SamplingParams,
        u: f64,
    ) -> Result<(Tensor, Tensor)> {
        let limit = params.top_k.unwrap_or(self.vocab).min(self.vocab);
        // Half the slots for the tokens wanted, half for ties near the threshold.
        let want = limit.min(CANDIDATES / 2);
        let slots = (2 * want).max(64);
        let want = want as f64;
        let s = scores.to_dtype(DType::F64)?;
        let finite = s.ge(f64::MIN)?;
        let n_finite = finite.to_dtype(DType::F64)?.sum_all()?;
        // Bisection for the highest threshold that keeps `want` tokens (or every finite
        // one): count(s ≥ lo) ≥ want > count(s ≥ hi) throughout.
        let max = s.max_keepdim(0)?.squeeze(0)?;
        let mut lo = finite
            .where_cond(&s, &max.broadcast_as(s.shape())?)?
            .min(0)?;
        let mut hi = max.affine(1.0, 1.0)?;
        let want = n_finite.minimum(want)?;
        for _ in 0..THRESHOLD_STEPS {
            let mid = ((&lo + &hi)? * 0.5)?;
            let count = s.broadcast_ge(&mid)?.to_dtype(DType::F64)?.sum_all()?;
            let enough = count.ge(&want)?;
            lo = enough.where_cond(&mid, &lo)?;
            hi = enough.where_cond(&hi, &mid)?;
        }
        let chosen = s.broadcast_ge(&lo)?;

        // Compaction: candidate i goes to slot (its rank in id order), others to a dump
        // slot past the end.
        let cum = self.prefix_sums(&chosen.to_dtype(DType::F64)?)?;
        let count = cum.narrow(0, self.vocab - 1, 1)?.squeeze(0)?;
        let dump = Tensor::full(slots as f64, self.vocab, &self.device)?;
        let slot = chosen
            .where_cond(&(&cum - 1.0)?, &dump)?
            .minimum(slots as f64)?
            .to_dtype(DType::U32)?;
        let compact = |x: &Tensor| -> Result<Tensor> {
            Ok(Tensor::zeros(slots + 1, DType::F64, &self.device)?
                .index_add(&slot, x, 0)?
                .narrow(0, 0, slots)?)
        };
        let slot_valid = Tensor::arange(0f64, slots as f64, &self.device)?
            .broadcast_lt(&count)?
            .to_dtype(DType::F64)?;
        let c_score = compact(&s)?;
        let c_id = compact(&self.ids.to_dtype(DType::F64)?)?;
        let c_w = (compact(weights)? * &slot_valid)?;

        // Pairwise order among candidates: j is ahead of i when it scores higher, or the
        // same with a lower id (the sampler's order). Invalid slots are ahead of nobody.
        let col = |x: &Tensor| x.unsqueeze(1);
        let row = |x: &Tensor| x.unsqueeze(0);
        let higher = row(&c_score)?.broadcast_gt(&col(&c_score)?)?;
        let tie = row(&c_score)?.broadcast_eq(&col(&c_score)?)?;
        let lower_id = row(&c_id)?.broadcast_lt(&col(&c_id)?)?;
        let ahead = ((higher.to_dtype(DType::F64)?
            + (tie.to_dtype(DType::F64)? * lower_id.to_dtype(DType::F64)?)?)?
        .broadcast_mul(&row(&slot_valid)?))?;
        let rank = ahead.sum(1)?;
        let before = ahead.matmul(&col(&c_w)?)?.squeeze(1)?;

        // The kept prefix: the first `limit`, and with top-p those before the mass
        // reached p of the total.
        let mut keep = (rank.lt(limit as f64)?.to_dtype(DType::F64)? * &slot_valid)?;
        let mut overflow = count.gt(slots as f64)?;
        if params.top_p < 1.0 {
            let total = weights.sum_all()?;
            let need = total.affine(params.top_p as f64, 0.0)?;
            keep = (keep * before.broadcast_lt(&need)?.to_dtype(DType::F64)?)?;
            // Complete only if the candidates reach the mass, or hold every token the
            // prefix may take.
            let mass = c_w.sum_all()?;
            let short = mass.lt(&need)?;
            let all_taken = count.ge(&n_finite.minimum(limit as f64)?)?;
            let incomplete = (short.to_dtype(DType::F64)?
                * (1.0 - all_taken.to_dtype(DType::F64)?)?)?
            .gt(0.0)?;
            overflow =
                (overflow.to_dtype(DType::F64)? + incomplete.to_dtype(DType::F64)?)?.gt(0.0)?;
        }

        // Inverse CDF over the kept prefix in that order.
        let kept_w = (&c_w * &keep)?;
        let target = kept_w.sum_all()?.affine(u, 0.0)?;
        let through = (&before + &kept_w)?;
        let far = Tensor::full(f64::MAX, slots, &self.device)?;
        let crosses = (through.broadcast_gt(&target)?.to_dtype(DType::F64)? * &keep)?.gt(0.0)?;
        let first = crosses.where_cond(&rank, &far)?.argmin(0)?;
        let has_weight = (kept_w.gt(0.0)?.to_dtype(DType::F64)?).gt(0.0)?;
        let last = has_weight
            .where_cond(&rank, &Tensor::full(-1.0f64, slots, &self.device)?)?
            .argmax(0)?;
        let any = crosses.to_dtype(DType::F64)?.sum_all()?.gt(0.0)?;
        let slot = any.where_cond(&first, &last)?.reshape(1)?;
        let id = c_id
            .index_select(&slot, 0)?
            .squeeze(0)?
            .to_dtype(DType::U32)?;
        Ok((id, overflow))
    }
}

/// `[n, n]` f64 ones on and above the diagonal (`inclusive`) or strictly above.
fn triangle(n: usize, inclusive: bool, device: &Device) -> Result<Tensor> {
    let r = Tensor::arange(0u32, n as u32, device)?;
    let (row, col) = (r.unsqueeze(1)?, r.unsqueeze(0)?);
    let mask = if inclusive {
        row.broadcast_le(&col)?
    } else {
        row.broadcast_lt(&col)?
    };
    Ok(mask.to_dtype(DType::F64)?)
}
