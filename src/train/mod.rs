//! ARM training (native only): preference data, the GenARM loss, LoRA on the frozen
//! base's top layers, AdamW, checkpoints; and the scalar reward model baseline
//! (`score_head`, Bradley–Terry loss) on the same machinery.

pub mod arm;
pub mod data;
pub mod loss;
pub mod optim;
pub mod prefs;
pub mod score_head;
pub mod trainer;
