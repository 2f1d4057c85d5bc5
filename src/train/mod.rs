//! ARM training (native only): preference data, the GenARM loss, LoRA on the frozen
//! base's top layers or full fine-tuning of them (`full`: the output is an HF model
//! directory), AdamW, checkpoints; and the scalar reward model baseline
//! (`score_head`, Bradley–Terry loss) and the DPO policy (`dpo`) on the same machinery.

pub mod arm;
pub mod data;
pub mod dpo;
pub mod full;
pub mod loss;
pub mod optim;
pub mod prefs;
pub mod score_head;
pub mod trainer;
