//! PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`), the format
//! trained ARMs are shipped in. PEFT's tensor names are kept:
//! `base_model.model.<module>.lora_A.weight` is `[r, in]`, `lora_B.weight` is `[out, r]`,
//! and the delta added to `W` (`[out, in]`) is `scale · B·A`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Deserialize;

use super::safetensors::SafetensorsFiles;
use super::weights::{Bytes, WeightSource};
use crate::error::{Error, Result};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// genarm's own side file: what the ARM was trained to prefer (the playground's label).
pub const ARM_INFO: &str = "genarm.json";
/// A scalar reward model's head next to its LoRA: one tensor `score.weight`,
/// `[1, hidden]` f32, read on the final-normed hidden state of the last token.
pub const SCORE_HEAD_WEIGHTS: &str = "score_head.safetensors";
pub const SCORE_HEAD_TENSOR: &str = "score.weight";

/// What a LoRA directory holds, from `genarm.json`'s `kind` (absent for an ARM).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterKind {
    /// An autoregressive reward model: a causal LM, usable with `--arm`.
    #[default]
    Arm,
    /// A scalar (trajectory-level) reward model: LoRA + `score_head.safetensors`.
    ScalarRewardModel,
}

impl AdapterKind {
    fn is_arm(&self) -> bool {
        *self == Self::Arm
    }
}

/// The projections a LoRA may target, by PEFT's short module names.
pub const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

#[derive(Clone, Debug, Deserialize)]
pub struct AdapterConfig {
    #[serde(default)]
    pub peft_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
}

/// What `genarm.json` says about an ARM.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
pub struct ArmInfo {
    /// Short label, e.g. "positive".
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub objective: Option<String>,
    #[serde(default)]
    pub beta_r: Option<f64>,
    /// `"scalar_reward_model"` for a reward model (not usable as an ARM); absent for ARMs.
    #[serde(default, skip_serializing_if = "AdapterKind::is_arm")]
    pub kind: AdapterKind,
}

impl ArmInfo {
    pub fn is_scalar_reward_model(&self) -> bool {
        self.kind == AdapterKind::ScalarRewardModel
    }
}

/// One module's low-rank pair.
#[derive(Clone, Debug)]
pub struct LoraPair {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`, already multiplied by the adapter's scale.
    pub b_scaled: Tensor,
}

#[derive(Clone, Debug)]
pub struct LoraAdapter {
    pub path: PathBuf,
    pub config: AdapterConfig,
    pub info: ArmInfo,
    /// Keyed by HF module path, e.g. `model.layers.3.self_attn.q_proj`.
    pub modules: BTreeMap<String, LoraPair>,
}

impl LoraAdapter {
    pub fn is_adapter_dir(path: &Path) -> bool {
        path.join(ADAPTER_CONFIG).is_file()
    }

    pub fn scale(config: &AdapterConfig) -> f64 {
        if config.use_rslora {
            config.lora_alpha / (config.r as f64).sqrt()
        } else {
            config.lora_alpha / config.r as f64
        }
    }

    /// Reads an adapter directory.
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let cfg_bytes = std::fs::read(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let info_path = dir.join(ARM_INFO);
        let info = match std::fs::read(&info_path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(&info_path, e)),
        };
        let weights_path = dir.join(ADAPTER_WEIGHTS);
        let weights = Bytes::open(&weights_path)?;
        Self::from_bytes(dir, &cfg_bytes, info.as_deref(), weights, device)
    }

    /// Builds an adapter from its files' bytes (`dir` names it in errors).
    pub fn from_bytes(
        dir: &Path,
        config_json: &[u8],
        info_json: Option<&[u8]>,
        weights: Bytes,
        device: &Device,
    ) -> Result<Self> {
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let config: AdapterConfig = serde_json::from_slice(config_json)
            .map_err(|e| Error::format(&cfg_path, format!("invalid adapter config: {e}")))?;
        if let Some(t) = config.peft_type.as_deref().filter(|t| *t != "LORA") {
            return Err(Error::unsupported(&cfg_path, format!("peft_type `{t}`")));
        }
        if config.r == 0 {
            return Err(Error::field(&cfg_path, "r", "must be > 0"));
        }
        let info = match info_json {
            Some(bytes) => serde_json::from_slice(bytes)
                .map_err(|e| Error::format(dir.join(ARM_INFO), format!("invalid ARM info: {e}")))?,
            None => ArmInfo::default(),
        };
        let weights_path = dir.join(ADAPTER_WEIGHTS);
        let files =
            SafetensorsFiles::from_shards(&weights_path, vec![(weights_path.clone(), weights)])?;
        let scale = Self::scale(&config);
        let mut modules = BTreeMap::new();
        let names: Vec<String> = files.names().map(str::to_owned).collect();
        for name in names {
            let Some(module) = name.strip_suffix(".lora_A.weight") else {
                if name.ends_with(".lora_B.weight") {
                    continue;
                }
                return Err(Error::unsupported(
                    &weights_path,
                    format!("adapter tensor `{name}` (only lora_A/lora_B pairs are supported)"),
                ));
            };
            let b_name = format!("{module}.lora_B.weight");
            let module = module.strip_prefix("base_model.model.").unwrap_or(module);
            if !TARGETS.iter().any(|t| module.ends_with(t)) {
                return Err(Error::unsupported(
                    &weights_path,
                    format!("LoRA on module `{module}`"),
                ));
            }
            let a = files.load(&name, device)?.dense(device)?;
            let b = files.load(&b_name, device)?.dense(device)?;
            let (a, b) = if config.fan_in_fan_out {
                (a.t()?.contiguous()?, b.t()?.contiguous()?)
            } else {
                (a, b)
            };
            let (r_a, _) = a.dims2()?;
            let (_, r_b) = b.dims2()?;
            if r_a != config.r || r_b != config.r {
                return Err(Error::TensorShape {
                    path: weights_path.clone(),
                    name: b_name,
                    got: b.dims().to_vec(),
                    want: vec![b.dims()[0], config.r],
                });
            }
            let b_scaled = (b * scale)?;
            modules.insert(module.to_string(), LoraPair { a, b_scaled });
        }
        if modules.is_empty() {
            return Err(Error::format(&weights_path, "adapter has no LoRA tensors"));
        }
        Ok(Self {
            path: dir.into(),
            config,
            info,
            modules,
        })
    }

    /// A display name: `genarm.json`'s name, else the directory name.
    pub fn label(&self) -> String {
        self.info.name.clone().unwrap_or_else(|| {
            self.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "arm".into())
        })
    }
}

/// Writes a PEFT adapter with random weights on every target of every layer: A is
/// uniform in ±1/√in (PEFT's Kaiming-uniform bound), B uniform with std `b_std` (PEFT
/// starts B at zero; a non-zero B makes the adapter change the model, for timing and
/// tests). Files are written to a temporary name and renamed, so a reader never sees
/// half an adapter.
pub fn write_random_adapter(
    dir: &Path,
    cfg: &super::config::LlamaConfig,
    base_model: &str,
    rank: usize,
    alpha: f64,
    b_std: f64,
    seed: u64,
) -> Result<()> {
    use crate::guide::uniform;
    let mut counter = 0u64;
    let mut random = |n: usize, bound: f64| -> Vec<f32> {
        (0..n)
            .map(|_| {
                counter += 1;
                ((uniform(seed, counter) * 2.0 - 1.0) * bound) as f32
            })
            .collect()
    };
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let shapes = |t: &str| -> (usize, usize) {
        match t {
            "q_proj" => (cfg.num_heads * hd, h),
            "k_proj" | "v_proj" => (cfg.num_kv_heads * hd, h),
            "o_proj" => (h, cfg.num_heads * hd),
            "gate_proj" | "up_proj" => (cfg.intermediate_size, h),
            _ => (h, cfg.intermediate_size),
        }
    };
    let mut tensors = std::collections::HashMap::new();
    for layer in 0..cfg.num_layers {
        for t in TARGETS {
            let kind = if ["gate_proj", "up_proj", "down_proj"].contains(&t) {
                "mlp"
            } else {
                "self_attn"
            };
            let (out, inp) = shapes(t);
            let prefix = format!("base_model.model.model.layers.{layer}.{kind}.{t}");
            let a = random(rank * inp, 1.0 / (inp as f64).sqrt());
            let b = random(out * rank, b_std * 3f64.sqrt());
            tensors.insert(
                format!("{prefix}.lora_A.weight"),
                Tensor::from_vec(a, (rank, inp), &Device::Cpu)?,
            );
            tensors.insert(
                format!("{prefix}.lora_B.weight"),
                Tensor::from_vec(b, (out, rank), &Device::Cpu)?,
            );
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": TARGETS,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
    });
    save_safetensors_atomic(&tensors, &dir.join(ADAPTER_WEIGHTS))?;
    write_atomic(
        &dir.join(ADAPTER_CONFIG),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )
}

/// Saves tensors as safetensors through a temporary file and a rename.
pub fn save_safetensors_atomic(
    tensors: &std::collections::HashMap<String, Tensor>,
    path: &Path,
) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(tensors, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
