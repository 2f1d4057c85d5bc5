//! PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`), the format
//! trained ARMs are shipped in. PEFT's tensor names are kept:
//! `base_model.model.<module>.lora_A.weight` is `[r, in]`, `lora_B.weight` is `[out, r]`,
//! and the delta added to `W` (`[out, in]`) is `scale · B·A`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Deserialize;

use super::llama::{self, Proj};
use super::safetensors::SafetensorsFiles;
use super::weights::{read_regular_file, Bytes, WeightSource, MAX_JSON_FILE_LEN};
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
    /// A policy (`genarm train --loss dpo`): the base + this LoRA is the model that
    /// decodes (`--lora`), not a reward to guide it with.
    Policy,
}

impl AdapterKind {
    fn is_arm(&self) -> bool {
        *self == Self::Arm
    }
}

/// The projections a LoRA may target, by PEFT's short module names (`q_proj`, …).
pub const TARGETS: [&str; 7] = {
    let mut names = [""; 7];
    let mut i = 0;
    while i < names.len() {
        names[i] = Proj::ALL[i].short_name();
        i += 1;
    }
    names
};

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
    /// Per-module ranks, keyed by a regex PEFT matches against the module path's end,
    /// in the file's order (PEFT takes the first key that matches).
    #[serde(default, deserialize_with = "in_file_order")]
    pub rank_pattern: Vec<(String, usize)>,
    /// Per-module alphas, matched the same way.
    #[serde(default, deserialize_with = "in_file_order")]
    pub alpha_pattern: Vec<(String, f64)>,
}

/// A JSON object's entries in the order the file lists them (serde_json's own map
/// sorts its keys).
fn in_file_order<'de, D, V>(d: D) -> std::result::Result<Vec<(String, V)>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Entries<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Entries<V> {
        type Value = Vec<(String, V)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object of pattern: value")
        }
        fn visit_unit<E>(self) -> std::result::Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut entries = Vec::new();
            while let Some(entry) = map.next_entry()? {
                entries.push(entry);
            }
            Ok(entries)
        }
    }
    d.deserialize_any(Entries(std::marker::PhantomData))
}

/// `adapter_config.json` keys that do not change what a loaded LoRA computes (how it
/// was trained or initialised, which modules it targets — the tensors say that).
const INERT_ADAPTER_KEYS: &[&str] = &[
    "task_type",
    "revision",
    "inference_mode",
    "lora_dropout",
    "init_lora_weights",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "megatron_config",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "runtime_config",
    "auto_mapping",
    "peft_version",
    "qalora_group_size",
    "ensure_weight_tying",
];

/// Keys read into `AdapterConfig`.
const READ_ADAPTER_KEYS: &[&str] = &[
    "peft_type",
    "r",
    "lora_alpha",
    "base_model_name_or_path",
    "use_rslora",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
];

/// Whether a field PEFT would act on is at its "off" value, the only value genarm
/// accepts for what it does not implement. PEFT's features are off when their flag is
/// false or their setting null or empty — so a feature added in a later PEFT, written
/// as `"new_config": null`, loads, and the same feature switched on is refused.
fn is_off(key: &str, v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (key, v) {
        ("bias", Value::String(s)) => s == "none",
        (_, Value::Null | Value::Bool(false)) => true,
        (_, Value::Array(a)) => a.is_empty(),
        (_, Value::Object(o)) => o.is_empty(),
        (_, Value::String(s)) => s.is_empty(),
        _ => false,
    }
}

impl AdapterConfig {
    /// Parses `adapter_config.json`, refusing by name every field PEFT would act on
    /// that genarm does not implement.
    pub fn from_json(bytes: &[u8], path: &Path) -> Result<Self> {
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(bytes)
            .map_err(|e| Error::format(path, format!("invalid adapter config: {e}")))?;
        for (key, value) in &map {
            if READ_ADAPTER_KEYS.contains(&key.as_str())
                || INERT_ADAPTER_KEYS.contains(&key.as_str())
                || key.starts_with('_')
            {
                continue;
            }
            if !is_off(key, value) {
                let shown = value.to_string().chars().take(60).collect::<String>();
                return Err(Error::unsupported(
                    path,
                    format!(
                        "adapter field `{key}` = {shown}: genarm implements plain LoRA \
                         (with rsLoRA, rank_pattern and alpha_pattern), not this"
                    ),
                ));
            }
        }
        // From the bytes again, not the map: the patterns' order matters.
        let config: Self = serde_json::from_slice(bytes)
            .map_err(|e| Error::format(path, format!("invalid adapter config: {e}")))?;
        if let Some(t) = config.peft_type.as_deref().filter(|t| *t != "LORA") {
            return Err(Error::unsupported(path, format!("peft_type `{t}`")));
        }
        if config.r == 0 {
            return Err(Error::field(path, "r", "must be > 0"));
        }
        if !config.lora_alpha.is_finite() {
            return Err(Error::field(path, "lora_alpha", "must be a finite number"));
        }
        for (key, r) in &config.rank_pattern {
            if *r == 0 {
                return Err(Error::field(
                    path,
                    format!("rank_pattern.{key}"),
                    "must be > 0",
                ));
            }
        }
        for (key, a) in &config.alpha_pattern {
            if !a.is_finite() {
                return Err(Error::field(
                    path,
                    format!("alpha_pattern.{key}"),
                    "must be a finite number",
                ));
            }
        }
        let keys = config.rank_pattern.iter().map(|(k, _)| k);
        for key in keys.chain(config.alpha_pattern.iter().map(|(k, _)| k)) {
            pattern_regex(key).map_err(|e| {
                Error::field(path, "rank_pattern/alpha_pattern", format!("`{key}`: {e}"))
            })?;
        }
        Ok(config)
    }

    /// The rank and alpha of `module` (e.g. `model.layers.3.self_attn.q_proj`): the
    /// first pattern key that matches the end of the path at a dot boundary, as PEFT
    /// matches them, else the adapter's `r` and `lora_alpha`.
    pub fn module_rank_alpha(&self, module: &str) -> (usize, f64) {
        fn first_match<V: Copy>(entries: &[(String, V)], module: &str) -> Option<V> {
            entries
                .iter()
                .find(|(k, _)| pattern_regex(k).is_ok_and(|re| re.is_match(module)))
                .map(|(_, v)| *v)
        }
        let r = first_match(&self.rank_pattern, module).unwrap_or(self.r);
        let alpha = first_match(&self.alpha_pattern, module).unwrap_or(self.lora_alpha);
        (r, alpha)
    }
}

/// PEFT's rule: pattern `key` matches a module path that is `key` or ends in `.key`,
/// with `key` a regular expression.
fn pattern_regex(key: &str) -> std::result::Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
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
    /// `"scalar_reward_model"` for a reward model, `"policy"` for a DPO policy (neither
    /// usable as an ARM); absent for ARMs.
    #[serde(default, skip_serializing_if = "AdapterKind::is_arm")]
    pub kind: AdapterKind,
}

impl ArmInfo {
    pub fn is_scalar_reward_model(&self) -> bool {
        self.kind == AdapterKind::ScalarRewardModel
    }

    pub fn is_policy(&self) -> bool {
        self.kind == AdapterKind::Policy
    }
}

/// One module's low-rank pair.
#[derive(Clone, Debug)]
pub struct LoraPair {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`, already multiplied by the module's scale.
    pub b_scaled: Tensor,
}

impl LoraPair {
    /// This module's rank (PEFT's `rank_pattern` may differ from the adapter's `r`).
    pub fn rank(&self) -> usize {
        self.a.dims().first().copied().unwrap_or(0)
    }
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

    /// The factor PEFT multiplies `B·A` by, for a module of rank `r` and alpha `alpha`.
    pub fn scale(use_rslora: bool, r: usize, alpha: f64) -> f64 {
        if use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// The largest rank of any module (rank_pattern may give modules their own).
    pub fn max_rank(&self) -> usize {
        self.modules.values().map(LoraPair::rank).max().unwrap_or(0)
    }

    /// Reads an adapter directory.
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let cfg_bytes = read_regular_file(&cfg_path, MAX_JSON_FILE_LEN)?;
        let info_path = dir.join(ARM_INFO);
        let info = match read_regular_file(&info_path, MAX_JSON_FILE_LEN) {
            Ok(bytes) => Some(bytes),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
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
        let config = AdapterConfig::from_json(config_json, &cfg_path)?;
        let info = match info_json {
            Some(bytes) => serde_json::from_slice(bytes)
                .map_err(|e| Error::format(dir.join(ARM_INFO), format!("invalid ARM info: {e}")))?,
            None => ArmInfo::default(),
        };
        let weights_path = dir.join(ADAPTER_WEIGHTS);
        let files =
            SafetensorsFiles::from_shards(&weights_path, vec![(weights_path.clone(), weights)])?;
        let mut modules = BTreeMap::new();
        let names: Vec<String> = files.names().map(str::to_owned).collect();
        for name in &names {
            if !name.ends_with(".lora_A.weight") && !name.ends_with(".lora_B.weight") {
                return Err(Error::unsupported(
                    &weights_path,
                    format!("adapter tensor `{name}` (only lora_A/lora_B pairs are supported)"),
                ));
            }
        }
        for name in &names {
            let Some(full) = name.strip_suffix(".lora_A.weight") else {
                let a_name = name.replace(".lora_B.weight", ".lora_A.weight");
                if !files.contains(&a_name) {
                    return Err(Error::format(
                        &weights_path,
                        format!("`{name}` has no matching `{a_name}`"),
                    ));
                }
                continue;
            };
            let b_name = format!("{full}.lora_B.weight");
            let module = full.strip_prefix("base_model.model.").unwrap_or(full);
            if !TARGETS.iter().any(|t| module.ends_with(&format!(".{t}"))) {
                return Err(Error::unsupported(
                    &weights_path,
                    format!("LoRA on module `{module}`"),
                ));
            }
            if !files.contains(&b_name) {
                return Err(Error::format(
                    &weights_path,
                    format!("`{name}` has no matching `{b_name}`"),
                ));
            }
            let a = files.load(name, device)?.dense(device)?;
            let b = files.load(&b_name, device)?.dense(device)?;
            // Each factor must be a finite matrix (a transpose keeps both properties).
            for (t, tname) in [(&a, name), (&b, &b_name)] {
                if t.rank() != 2 {
                    return Err(Error::format(
                        &weights_path,
                        format!(
                            "tensor `{tname}` has shape {:?}, expected a matrix",
                            t.dims()
                        ),
                    ));
                }
                let values = t.to_dtype(candle_core::DType::F32)?.flatten_all()?;
                if !values.to_vec1::<f32>()?.iter().all(|x| x.is_finite()) {
                    return Err(Error::format(
                        &weights_path,
                        format!("tensor `{tname}` holds NaN or infinite values"),
                    ));
                }
            }
            let (a, b) = if config.fan_in_fan_out {
                (a.t()?.contiguous()?, b.t()?.contiguous()?)
            } else {
                (a, b)
            };
            let (r, alpha) = config.module_rank_alpha(module);
            let why = if config.rank_pattern.is_empty() {
                "r"
            } else {
                "r / rank_pattern"
            };
            // A is `[r, in]`, B is `[out, r]`.
            for (t, tname, axis) in [(&a, name, 0), (&b, &b_name, 1)] {
                if t.dims()[axis] != r {
                    return Err(Error::format(
                        &weights_path,
                        format!(
                            "tensor `{tname}` has shape {:?}, but {why} in {ADAPTER_CONFIG} gives module `{module}` rank {r}",
                            t.dims()
                        ),
                    ));
                }
            }
            let b_scaled = (b * Self::scale(config.use_rslora, r, alpha))?;
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
    let mut tensors = std::collections::HashMap::new();
    for layer in 0..cfg.num_layers {
        for proj in Proj::ALL {
            let (out, inp) = proj.shape(cfg);
            let prefix = format!("base_model.model.{}", llama::module_path(layer, proj));
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
    crate::outdir::save_safetensors(&tensors, &dir.join(ADAPTER_WEIGHTS))?;
    write_atomic(
        &dir.join(ADAPTER_CONFIG),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: serde_json::Value) -> Result<AdapterConfig> {
        AdapterConfig::from_json(
            json.to_string().as_bytes(),
            Path::new("adapter_config.json"),
        )
    }

    #[test]
    fn patterns_match_like_peft_first_key_in_file_order() {
        // Raw text: serde_json's own map would sort the keys.
        let text = r#"{"r": 8, "lora_alpha": 16,
            "rank_pattern": {"q_proj": 4, "layers.1.self_attn.q_proj": 2},
            "alpha_pattern": {"layers\\.[01]\\.mlp\\.down_proj": 3.0}}"#;
        let c =
            AdapterConfig::from_json(text.as_bytes(), Path::new("adapter_config.json")).unwrap();
        // Both keys match layer 1's q_proj: the first in the file wins, as in PEFT.
        assert_eq!(
            c.module_rank_alpha("model.layers.1.self_attn.q_proj"),
            (4, 16.0)
        );
        assert_eq!(
            c.module_rank_alpha("model.layers.0.mlp.down_proj"),
            (8, 3.0)
        );
        assert_eq!(
            c.module_rank_alpha("model.layers.2.mlp.down_proj"),
            (8, 16.0)
        );
        // A key matches at a dot boundary only.
        assert_eq!(
            c.module_rank_alpha("model.layers.0.self_attn.xq_proj"),
            (8, 16.0)
        );
    }

    #[test]
    fn features_peft_acts_on_are_refused_unless_off() {
        let base = |extra: serde_json::Value| {
            let mut v = serde_json::json!({"r": 8, "lora_alpha": 16});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            config(v)
        };
        for off in [
            serde_json::json!({"use_dora": false, "bias": "none", "modules_to_save": null}),
            serde_json::json!({"kasa_config": null, "use_bdlora": null, "layer_replication": []}),
        ] {
            base(off).unwrap();
        }
        for (on, name) in [
            (serde_json::json!({"use_dora": true}), "use_dora"),
            (serde_json::json!({"bias": "lora_only"}), "bias"),
            (
                serde_json::json!({"modules_to_save": ["lm_head"]}),
                "modules_to_save",
            ),
            (
                serde_json::json!({"some_future_config": {"k": 1}}),
                "some_future_config",
            ),
            (
                serde_json::json!({"rank_pattern": {"q_proj": 0}}),
                "rank_pattern.q_proj",
            ),
            (
                serde_json::json!({"alpha_pattern": {"(": 1.0}}),
                "alpha_pattern",
            ),
        ] {
            let err = base(on).unwrap_err().to_string();
            assert!(err.contains(name), "`{err}` lacks `{name}`");
        }
    }
}
