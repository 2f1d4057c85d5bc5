//! What a decoding method costs, in the unit that does not depend on the machine: token
//! positions pushed through a transformer, counted per model (base, ARMs, scalar reward
//! model). A prompt of P tokens fed once is P positions; k candidate rows of one token
//! each are k positions; a LoRA ARM row that shares the base's weight reads still counts
//! as its own positions.

use std::ops::{Add, AddAssign};

use serde::Serialize;

use crate::engine::{Chosen, Engine, StepLogProbs};
use crate::error::Result;
use crate::guide::Sampler;

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ForwardPasses {
    pub base: u64,
    /// Summed over ARMs.
    pub arm: u64,
    /// The scalar reward model.
    pub rm: u64,
}

impl ForwardPasses {
    pub fn total(&self) -> u64 {
        self.base + self.arm + self.rm
    }
}

impl Add for ForwardPasses {
    type Output = Self;

    fn add(self, o: Self) -> Self {
        Self {
            base: self.base + o.base,
            arm: self.arm + o.arm,
            rm: self.rm + o.rm,
        }
    }
}

impl AddAssign for ForwardPasses {
    fn add_assign(&mut self, o: Self) {
        *self = *self + o;
    }
}

impl std::iter::Sum for ForwardPasses {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), Add::add)
    }
}

/// Forward passes and wall-clock seconds of one piece of work.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    pub passes: ForwardPasses,
    pub seconds: f64,
}

impl Add for Cost {
    type Output = Self;

    fn add(self, o: Self) -> Self {
        Self {
            passes: self.passes + o.passes,
            seconds: self.seconds + o.seconds,
        }
    }
}

impl std::iter::Sum for Cost {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), Add::add)
    }
}

/// An engine that counts the positions it feeds: each fed token is one position for the
/// base and one for every ARM row (the engine runs them all, whatever the α).
pub struct CountingEngine<'a> {
    inner: &'a mut dyn Engine,
    n_arms: u64,
    passes: ForwardPasses,
}

impl<'a> CountingEngine<'a> {
    pub fn new(inner: &'a mut dyn Engine) -> Self {
        let n_arms = inner.arm_labels().len() as u64;
        Self {
            inner,
            n_arms,
            passes: ForwardPasses::default(),
        }
    }

    /// The wrapped engine, for work that is not the method's (measuring its output).
    pub fn uncounted(&mut self) -> &mut dyn Engine {
        &mut *self.inner
    }

    /// The count so far, and a fresh start.
    pub fn take(&mut self) -> ForwardPasses {
        std::mem::take(&mut self.passes)
    }

    fn count(&mut self, positions: usize) {
        let p = positions as u64;
        self.passes.base += p;
        self.passes.arm += p * self.n_arms;
    }
}

impl Engine for CountingEngine<'_> {
    fn backend(&self) -> String {
        self.inner.backend()
    }
    fn facts(&self) -> &crate::model::BaseFacts {
        self.inner.facts()
    }
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    fn arm_labels(&self) -> Vec<String> {
        self.inner.arm_labels()
    }
    fn context_len(&self) -> usize {
        self.inner.context_len()
    }
    fn position(&self) -> usize {
        self.inner.position()
    }
    fn reset(&mut self) {
        self.inner.reset()
    }
    fn rewind(&mut self, position: usize) -> Result<()> {
        self.inner.rewind(position)
    }
    fn step(&mut self, tokens: &[u32]) -> Result<StepLogProbs> {
        self.count(tokens.len());
        self.inner.step(tokens)
    }
    fn teacher_forced(&mut self, tokens: &[u32]) -> Result<Vec<Vec<Vec<f32>>>> {
        self.count(tokens.len());
        self.inner.teacher_forced(tokens)
    }
    fn guided_step(
        &mut self,
        tokens: &[u32],
        alphas: &[f32],
        sampler: &mut Sampler,
    ) -> Result<Chosen> {
        self.count(tokens.len());
        self.inner.guided_step(tokens, alphas, sampler)
    }
}
