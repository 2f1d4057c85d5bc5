//! Judging generations: scorers for objectives, the prompt sets they run on, α sweeps,
//! the baselines they are compared with (scalar reward model, best-of-N, ARGS), what
//! each costs, how far each decoding distribution moved from the base (`kl`), and the
//! report.

pub mod arm_reward;
pub mod baselines;
pub mod charts;
pub mod cost;
pub mod kl;
pub mod pareto;
pub mod plot;
pub mod prompts;
pub mod report;
pub mod reward_model;
pub mod run;
pub mod scorers;
