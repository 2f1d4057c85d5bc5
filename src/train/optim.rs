//! AdamW with decoupled weight decay, global-norm clipping and warmup + cosine/linear
//! decay. Written out (rather than candle-nn's) so its moments can be checkpointed.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    Cosine,
    Linear,
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cosine" => Ok(Self::Cosine),
            "linear" => Ok(Self::Linear),
            _ => Err(format!("unknown schedule `{s}` (cosine or linear)")),
        }
    }
}

/// Learning rate at `step` (0-based) of `total`: linear warmup, then decay to zero.
pub fn learning_rate(
    base: f64,
    step: usize,
    warmup: usize,
    total: usize,
    schedule: Schedule,
) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
    match schedule {
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        Schedule::Linear => base * (1.0 - progress),
    }
}

pub struct AdamW {
    pub vars: Vec<Var>,
    /// First and second moments, one pair per var.
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Steps taken (for bias correction).
    pub t: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Which vars decay: the matrices; 1-D vars (norm weights, biases) do not, as in
    /// HF's trainer — decaying an RMSNorm gain towards zero only shrinks activations.
    pub decays: Vec<bool>,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, weight_decay: f64) -> Result<Self> {
        let m = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let decays = vars.iter().map(|v| v.rank() >= 2).collect();
        Ok(Self {
            decays,
            vars,
            m,
            v,
            t: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        })
    }

    /// One update with the given gradients (a missing gradient counts as zero).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        for (i, var) in self.vars.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            self.m[i] = ((&self.m[i] * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            self.v[i] = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let m_hat = (&self.m[i] / bc1)?;
            let v_hat = (&self.v[i] / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
            let decay = if self.decays[i] {
                self.weight_decay
            } else {
                0.0
            };
            let decayed = (var.as_tensor() * (1.0 - lr * decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }
}

/// The vars' gradients from a backward pass, scaled by `scale`.
pub fn collect_grads(store: &GradStore, vars: &[Var], scale: f64) -> Result<Vec<Option<Tensor>>> {
    vars.iter()
        .map(|v| match store.get(v.as_tensor()) {
            Some(g) => Ok(Some((g * scale)?)),
            None => Ok(None),
        })
        .collect()
}

/// Adds `more` into `acc` elementwise (gradient accumulation over micro-batches).
pub fn accumulate(acc: &mut Vec<Option<Tensor>>, more: Vec<Option<Tensor>>) -> Result<()> {
    if acc.is_empty() {
        *acc = more;
        return Ok(());
    }
    for (a, m) in acc.iter_mut().zip(more) {
        *a = match (a.take(), m) {
            (Some(x), Some(y)) => Some((x + y)?),
            (x, None) => x,
            (None, y) => y,
        };
    }
    Ok(())
}

/// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter().flatten() {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    if norm > max_norm && norm.is_finite() {
        let s = max_norm / (norm + 1e-6);
        for g in grads.iter_mut().flatten() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}
