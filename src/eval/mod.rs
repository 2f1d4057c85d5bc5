//! Judging generations: scorers for objectives, and the prompt sets they run on.

pub mod pareto;
pub mod plot;
pub mod prompts;
pub mod run;
pub mod scorers;
