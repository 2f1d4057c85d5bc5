//! ARM training (native only): preference data, the GenARM loss, LoRA on the frozen
//! base's top layers, AdamW, checkpoints.

pub mod arm;
pub mod data;
pub mod loss;
pub mod optim;
pub mod prefs;
pub mod trainer;
