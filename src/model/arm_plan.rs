//! How each ARM is loaded next to its base, decided once for every engine: a LoRA on
//! the base's own weights becomes an extra batch row, anything else a model of its own.
//! Also the check that an ARM scores the base's tokens.

use std::path::{Path, PathBuf};

use candle_core::Device;

use super::lora::{ArmInfo, LoraAdapter, ARM_INFO};
use super::tokenizer::same_vocabulary;
use super::weights::{read_regular_file, MAX_JSON_FILE_LEN};
use super::Checkpoint;
use crate::error::{Error, Result};

/// An ARM resolved to what must be loaded for it.
// One plan per ARM, built once at load: the size difference between variants costs
// nothing, and boxing would change every engine's match on it.
#[allow(clippy::large_enum_variant)]
pub enum ArmPlan {
    /// A LoRA on the base's own weights: an extra row of the base's batch.
    SharedLora(LoraAdapter),
    /// A LoRA on another checkpoint.
    LoraOn(LoraAdapter, Checkpoint),
    /// A checkpoint of its own.
    Full(Checkpoint),
    /// Not an ARM: a policy LoRA on the base's own weights (`--lora`, e.g. a DPO
    /// policy), merged into the base's own row; ARMs then guide base + this LoRA.
    Policy(LoraAdapter),
}

impl ArmPlan {
    /// The slider label: `genarm.json`'s name (next to an adapter, or in a fully tuned
    /// model's directory), the adapter directory or the file stem.
    pub fn label(&self, path: &Path) -> String {
        match self {
            Self::SharedLora(adapter) | Self::LoraOn(adapter, _) | Self::Policy(adapter) => {
                adapter.label()
            }
            Self::Full(_) => full_info(path)
                .and_then(|info| info.name)
                .unwrap_or_else(|| file_label(path)),
        }
    }
}

/// `genarm.json` of a model directory, if it has a readable one (the browser has no
/// files to read: there the label falls back to the name).
fn full_info(path: &Path) -> Option<ArmInfo> {
    let bytes = read_regular_file(&path.join(ARM_INFO), MAX_JSON_FILE_LEN).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn file_label(path: &Path) -> String {
    path.file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Decides how an ARM path is loaded. A LoRA adapter shares the base's weights unless
/// its `base_model_name_or_path` is a local checkpoint other than the base.
pub fn plan_arm(path: &Path, base: &Path, device: &Device) -> Result<(PathBuf, ArmPlan)> {
    let plan = if LoraAdapter::is_adapter_dir(path) {
        let adapter = LoraAdapter::open(path, device)?;
        if adapter.info.is_scalar_reward_model() {
            return Err(Error::Incompatible {
                arm: path.display().to_string(),
                message: "this is a scalar reward model (`genarm train --scalar-head`), not an \
                          ARM; pass it to `genarm eval --reward-model`"
                    .into(),
            });
        }
        if adapter.info.is_policy() {
            return Err(Error::Incompatible {
                arm: path.display().to_string(),
                message: "this is a policy (`genarm train --loss dpo`), not an ARM; \
                          decode with it by `--lora`"
                    .into(),
            });
        }
        match lora_own_base(&adapter, base)? {
            Some(ckpt) => ArmPlan::LoraOn(adapter, ckpt),
            None => ArmPlan::SharedLora(adapter),
        }
    } else {
        ArmPlan::Full(Checkpoint::open(path)?)
    };
    Ok((path.into(), plan))
}

/// Opens `path` as the policy LoRA the base decodes with (`--lora`): any LoRA adapter on
/// the base's own weights, not a scalar reward model.
pub fn plan_policy(path: &Path, base: &Path, device: &Device) -> Result<(PathBuf, ArmPlan)> {
    let refuse = |message: &str| Error::Incompatible {
        arm: path.display().to_string(),
        message: message.into(),
    };
    if !LoraAdapter::is_adapter_dir(path) {
        return Err(refuse(
            "--lora takes a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors)",
        ));
    }
    let adapter = LoraAdapter::open(path, device)?;
    if adapter.info.is_scalar_reward_model() {
        return Err(refuse(
            "this is a scalar reward model, not a policy; pass it to `genarm eval --reward-model`",
        ));
    }
    if lora_own_base(&adapter, base)?.is_some() {
        return Err(refuse(
            "its base_model_name_or_path names another checkpoint; a policy LoRA must be \
             trained on the --model base",
        ));
    }
    Ok((path.into(), ArmPlan::Policy(adapter)))
}

/// Where a model's outputs come from: a group of models that read the same weights
/// (group 0 is the base's batch) and a row in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub group: usize,
    pub row: usize,
}

/// The ARMs grouped by the weights they read, the same for every engine: group 0 is the
/// base with one extra row per LoRA on its own weights; every other ARM is a group of
/// its own with one row.
pub struct ArmGroups<'a> {
    /// Group 0's rows: the base itself (`None`, or the policy LoRA it decodes with), then
    /// each shared-weight LoRA.
    pub base_rows: Vec<Option<&'a LoraAdapter>>,
    /// Groups 1.., in ARM order: each own-weight ARM's checkpoint and its LoRA, if any.
    pub own: Vec<(&'a Checkpoint, Option<&'a LoraAdapter>)>,
    /// Each ARM's slot, in ARM order.
    pub arm_slots: Vec<Slot>,
    /// Each ARM's slider label, in ARM order.
    pub labels: Vec<String>,
}

/// Groups `plans` (from [`plan_arm`], and at most one from [`plan_policy`]) around
/// `base`, checking that every own-weight ARM scores the base's tokens. A policy takes
/// group 0's row 0 and is no ARM (no slot, no label).
pub fn group_arms<'a>(base: &Checkpoint, plans: &'a [(PathBuf, ArmPlan)]) -> Result<ArmGroups<'a>> {
    let mut groups = ArmGroups {
        base_rows: vec![None],
        own: Vec::new(),
        arm_slots: Vec::with_capacity(plans.len()),
        labels: Vec::with_capacity(plans.len()),
    };
    for (path, plan) in plans {
        if let ArmPlan::Policy(adapter) = plan {
            if groups.base_rows[0].is_some() {
                return Err(Error::Request("at most one --lora policy".into()));
            }
            groups.base_rows[0] = Some(adapter);
            continue;
        }
        groups.labels.push(plan.label(path));
        let (ckpt, adapter) = match plan {
            ArmPlan::SharedLora(adapter) => {
                groups.arm_slots.push(Slot {
                    group: 0,
                    row: groups.base_rows.len(),
                });
                groups.base_rows.push(Some(adapter));
                continue;
            }
            ArmPlan::LoraOn(adapter, ckpt) => (ckpt, Some(adapter)),
            ArmPlan::Full(ckpt) => (ckpt, None),
            // Taken as row 0 above.
            ArmPlan::Policy(_) => continue,
        };
        check_compatible(base, ckpt, &path.display().to_string())?;
        groups.own.push((ckpt, adapter));
        groups.arm_slots.push(Slot {
            group: groups.own.len(),
            row: 0,
        });
    }
    Ok(groups)
}

/// The checkpoint a LoRA runs on when it is not `base`: the local checkpoint its
/// `base_model_name_or_path` names, if that exists and is another file; `None` means
/// the base's own weights.
///
/// The path comes from a file the user downloaded, not from the user, so it is opened
/// only when it looks like a model they could have named (a `.gguf` file or a
/// directory with `config.json`), and a failure names the path without quoting the
/// file: `/etc/passwd` must not end up in an error message.
pub fn lora_own_base(adapter: &LoraAdapter, base: &Path) -> Result<Option<Checkpoint>> {
    let Some(named) = adapter.config.base_model_name_or_path.as_deref() else {
        return Ok(None);
    };
    let p = resolve_relative(&adapter.path, named);
    if !p.exists() || same_file(&p, base) {
        return Ok(None);
    }
    let refuse = |why: &str| Error::Incompatible {
        arm: adapter.path.display().to_string(),
        message: format!(
            "its base_model_name_or_path `{}` {why}; pass the base with --model, or open \
             that path directly to see what is wrong with it",
            p.display()
        ),
    };
    if !looks_like_model(&p) {
        return Err(refuse(
            "exists but is not a model (a .gguf file or a directory with config.json)",
        ));
    }
    Checkpoint::open(&p)
        .map(Some)
        .map_err(|_| refuse("does not open as a model"))
}

/// A `.gguf` regular file, or a directory holding `config.json`.
fn looks_like_model(p: &Path) -> bool {
    let is_gguf = p
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    (is_gguf && p.is_file()) || (p.is_dir() && p.join("config.json").is_file())
}

/// A relative base path in an adapter config is relative to the adapter's directory.
fn resolve_relative(adapter_dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.into()
    } else {
        adapter_dir.join(p)
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// An ARM must score the base's tokens: its vocabulary must cover the base's, with the
/// same token at every shared id when both carry a tokenizer.
pub fn check_compatible(base: &Checkpoint, arm: &Checkpoint, arm_name: &str) -> Result<()> {
    let incompatible = |message: String| Error::Incompatible {
        arm: arm_name.into(),
        message,
    };
    if arm.config.vocab_size < base.config.vocab_size {
        return Err(incompatible(format!(
            "its vocabulary has {} tokens, fewer than the base's {}",
            arm.config.vocab_size, base.config.vocab_size
        )));
    }
    match (&base.tokenizer, &arm.tokenizer) {
        (Some(b), Some(a)) => same_vocabulary(b, a)
            .map_err(|m| incompatible(format!("tokenizer differs from the base's: {m}"))),
        (Some(_), None) | (None, Some(_)) => Err(incompatible(
            "one of base and ARM has a tokenizer and the other has none; cannot check they agree"
                .into(),
        )),
        (None, None) => Ok(()),
    }
}
