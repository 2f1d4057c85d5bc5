//! Writers for the on-disk formats the engine loads: HF safetensors dirs (sharded or
//! not), llama.cpp GGUF files (with llama.cpp's Q/K row permutation) and PEFT LoRA dirs.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::fixtures::{TinyLora, TinyModel};

impl TinyModel {
    // -- HF directory --------------------------------------------------------

    /// Writes `config.json` and the weights as `model.safetensors` (shards == 1)
    /// or `model-0000K-of-0000N.safetensors` + `model.safetensors.index.json`.
    pub fn write_hf_dir(&self, dir: &Path, dtype: DType, shards: usize) {
        let cfg = &self.config;
        let torch_dtype = match dtype {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            other => panic!("unsupported HF dtype {other:?}"),
        };
        // Qwen2 is the usual Llama-like architecture with q/k/v biases; Mistral slides
        // without them; Llama has o/MLP biases.
        let qwen2 = cfg.attention_bias && !cfg.o_bias && !cfg.mlp_bias;
        let (arch, model_type) = if qwen2 {
            ("Qwen2ForCausalLM", "qwen2")
        } else if cfg.sliding_window.is_some() {
            assert!(!cfg.qkv_bias() && !cfg.mlp_bias, "Mistral has no biases");
            ("MistralForCausalLM", "mistral")
        } else {
            ("LlamaForCausalLM", "llama")
        };
        let mut config = serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": cfg.rope_theta,
            "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "hidden_act": cfg.hidden_act,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "torch_dtype": torch_dtype,
        });
        match model_type {
            "llama" => {
                config["attention_bias"] = cfg.o_bias.into();
                config["mlp_bias"] = cfg.mlp_bias.into();
            }
            "qwen2" => {
                config["attention_bias"] = true.into();
                if let Some(w) = cfg.sliding_window {
                    config["use_sliding_window"] = true.into();
                    config["sliding_window"] = w.into();
                    config["max_window_layers"] = 0.into();
                }
            }
            _ => config["sliding_window"] = cfg.sliding_window.into(),
        }
        assert!(
            model_type != "llama" || cfg.sliding_window.is_none(),
            "a sliding window is written as Mistral or Qwen2"
        );
        if let Some(factor) = cfg.rope_linear_factor {
            config["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": factor});
        }
        std::fs::create_dir_all(dir).expect("create HF dir");
        write_json(&dir.join("config.json"), &config);

        let names: Vec<&String> = self.tensors.keys().collect();
        assert!(
            shards >= 1 && shards <= names.len(),
            "shards must be in 1..={}",
            names.len()
        );
        if shards == 1 {
            let all: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
            self.save_safetensors(&dir.join("model.safetensors"), &all, dtype);
            return;
        }
        // Contiguous chunks of the sorted names, sizes differing by at most one.
        let mut weight_map = serde_json::Map::new();
        let mut total_size = 0usize;
        let mut start = 0;
        for k in 0..shards {
            let end = start + (names.len() - start) / (shards - k);
            let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, shards);
            let chunk: Vec<&str> = names[start..end].iter().map(|s| s.as_str()).collect();
            for name in &chunk {
                weight_map.insert(name.to_string(), serde_json::Value::from(file.clone()));
                total_size += self.get(name).len() * dtype.size_in_bytes();
            }
            self.save_safetensors(&dir.join(&file), &chunk, dtype);
            start = end;
        }
        let index = serde_json::json!({
            "metadata": { "total_size": total_size },
            "weight_map": weight_map,
        });
        write_json(&dir.join("model.safetensors.index.json"), &index);
    }

    fn save_safetensors(&self, path: &Path, names: &[&str], dtype: DType) {
        let mut map = HashMap::new();
        for &name in names {
            let (shape, data) = &self.tensors[name];
            let t = f64_tensor(shape, data)
                .to_dtype(dtype)
                .expect("convert dtype");
            map.insert(name.to_string(), t);
        }
        candle_core::safetensors::save(&map, path).expect("write safetensors");
    }

    // -- GGUF ----------------------------------------------------------------

    pub fn write_gguf(&self, path: &Path, dtype: GgmlDType) {
        self.write_gguf_with_tokens(path, dtype, None)
    }

    /// Writes a llama.cpp-style GGUF. Matrices are stored as `dtype`, 1-D tensors
    /// as F32 (as llama.cpp does). Q/K weights and biases get llama.cpp's row
    /// permutation. With `tokens`, a minimal "gpt2" tokenizer is embedded.
    pub fn write_gguf_with_tokens(&self, path: &Path, dtype: GgmlDType, tokens: Option<&[String]>) {
        self.write_gguf_with_tokenizer(path, dtype, tokens, "gpt2")
    }

    /// `write_gguf_with_tokens` with another `tokenizer.ggml.model` (e.g. "llama", the
    /// SentencePiece vocabularies of Llama 2 and Mistral).
    pub fn write_gguf_with_tokenizer(
        &self,
        path: &Path,
        dtype: GgmlDType,
        tokens: Option<&[String]>,
        tokenizer_model: &str,
    ) {
        self.write_gguf_as(path, &|_| dtype, tokens, tokenizer_model)
    }

    /// `write_gguf` with each matrix's type chosen by its HF name (mixed-type files
    /// such as llama.cpp's Q4_K_M).
    pub fn write_gguf_mixed(&self, path: &Path, dtype_of: &dyn Fn(&str) -> GgmlDType) {
        self.write_gguf_as(path, dtype_of, None, "gpt2")
    }

    fn write_gguf_as(
        &self,
        path: &Path,
        dtype_of: &dyn Fn(&str) -> GgmlDType,
        tokens: Option<&[String]>,
        tokenizer_model: &str,
    ) {
        let cfg = &self.config;
        assert!(
            !cfg.o_bias
                && !cfg.mlp_bias
                && cfg.hidden_act == "silu"
                && cfg.sliding_window.is_none()
                && cfg.rope_linear_factor.is_none(),
            "the GGUF writer does not write o/MLP biases, activations, windows or RoPE scaling"
        );
        let mut metadata: Vec<(&str, gguf_file::Value)> = vec![
            (
                "general.architecture",
                gguf_file::Value::String("llama".into()),
            ),
            (
                "general.name",
                gguf_file::Value::String("tiny-llama".into()),
            ),
            (
                "llama.context_length",
                u32_value(cfg.max_position_embeddings),
            ),
            ("llama.embedding_length", u32_value(cfg.hidden_size)),
            ("llama.block_count", u32_value(cfg.num_layers)),
            (
                "llama.feed_forward_length",
                u32_value(cfg.intermediate_size),
            ),
            ("llama.attention.head_count", u32_value(cfg.num_heads)),
            ("llama.attention.head_count_kv", u32_value(cfg.num_kv_heads)),
            ("llama.rope.dimension_count", u32_value(cfg.head_dim())),
            (
                "llama.rope.freq_base",
                gguf_file::Value::F32(cfg.rope_theta as f32),
            ),
            (
                "llama.attention.layer_norm_rms_epsilon",
                gguf_file::Value::F32(cfg.rms_norm_eps as f32),
            ),
            ("llama.vocab_size", u32_value(cfg.vocab_size)),
        ];
        if let Some(tokens) = tokens {
            let strings = tokens
                .iter()
                .map(|t| gguf_file::Value::String(t.clone()))
                .collect();
            let types = tokens.iter().map(|_| gguf_file::Value::I32(1)).collect();
            metadata.extend([
                (
                    "tokenizer.ggml.model",
                    gguf_file::Value::String(tokenizer_model.into()),
                ),
                ("tokenizer.ggml.tokens", gguf_file::Value::Array(strings)),
                ("tokenizer.ggml.merges", gguf_file::Value::Array(vec![])),
                ("tokenizer.ggml.token_type", gguf_file::Value::Array(types)),
                ("tokenizer.ggml.bos_token_id", u32_value(0)),
                ("tokenizer.ggml.eos_token_id", u32_value(1)),
            ]);
        }

        let mut qtensors: Vec<(String, QTensor)> = Vec::new();
        for (hf_name, (shape, data)) in &self.tensors {
            let name = gguf_name(hf_name);
            // Q and K rows are permuted for llama.cpp's interleaved RoPE.
            let n_head = if hf_name.contains(".q_proj.") {
                Some(cfg.num_heads)
            } else if hf_name.contains(".k_proj.") {
                Some(cfg.num_kv_heads)
            } else {
                None
            };
            let data = match n_head {
                Some(n_head) => {
                    let n_cols = if shape.len() == 2 { shape[1] } else { 1 };
                    permute_qk_rows(data, shape[0], n_cols, n_head)
                }
                None => data.clone(),
            };
            qtensors.push((name, quantize(shape, &data, dtype_of(hf_name))));
        }

        let meta_refs: Vec<(&str, &gguf_file::Value)> =
            metadata.iter().map(|(k, v)| (*k, v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create GGUF parent dir");
        }
        let mut file = std::fs::File::create(path).expect("create GGUF file");
        gguf_file::write(&mut file, &meta_refs, &tensor_refs).expect("write GGUF");
    }
}

/// llama.cpp tensor name for an HF tensor name.
pub fn gguf_name(hf_name: &str) -> String {
    match hf_name {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf_name
        .strip_prefix("model.layers.")
        .unwrap_or_else(|| panic!("no GGUF name for {hf_name}"));
    let (layer, rest) = rest.split_once('.').unwrap();
    let (module, suffix) = rest.rsplit_once('.').unwrap();
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("no GGUF name for {other}"),
    };
    format!("blk.{layer}.{short}.{suffix}")
}

fn u32_value(v: usize) -> gguf_file::Value {
    gguf_file::Value::U32(u32::try_from(v).expect("fits in u32"))
}

fn f64_tensor(shape: &[usize], data: &[f64]) -> Tensor {
    let values: Vec<f32> = data.iter().map(|&v| v as f32).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).expect("build tensor")
}

/// QTensor of `dtype` for a matrix; 1-D tensors (norms, biases) always F32. A
/// matrix whose rows do not split into whole blocks also falls back to F32, as
/// llama.cpp's converter does.
pub(super) fn quantize(shape: &[usize], data: &[f64], dtype: GgmlDType) -> QTensor {
    let row_len = *shape.last().unwrap();
    let dtype = if shape.len() < 2 || !row_len.is_multiple_of(dtype.block_size()) {
        GgmlDType::F32
    } else {
        dtype
    };
    QTensor::quantize(&f64_tensor(shape, data), dtype).expect("quantize")
}

fn write_json(path: &Path, value: &serde_json::Value) {
    let text = serde_json::to_string_pretty(value).unwrap();
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

// ---------------------------------------------------------------------------
// llama.cpp's Q/K row permutation
// ---------------------------------------------------------------------------

/// HF row (within one head) stored at GGUF row `j` of that head: GGUF row
/// 2*i + s holds HF row s*(hd/2) + i. This turns HF's "rotate_half" RoPE pairs
/// (i, i + hd/2) into llama.cpp's adjacent pairs (2i, 2i + 1).
fn hf_row_for_gguf_row(j: usize, hd: usize) -> usize {
    let (i, s) = (j / 2, j % 2);
    s * (hd / 2) + i
}

/// HF layout -> GGUF layout, for a row-major [n_rows, n_cols] matrix (use
/// n_cols = 1 for a bias) with n_rows = n_head * head_dim.
pub fn permute_qk_rows(w: &[f64], n_rows: usize, n_cols: usize, n_head: usize) -> Vec<f64> {
    move_qk_rows(w, n_rows, n_cols, n_head, true)
}

/// GGUF layout -> HF layout; inverse of `permute_qk_rows`.
pub fn unpermute_qk_rows(w: &[f64], n_rows: usize, n_cols: usize, n_head: usize) -> Vec<f64> {
    move_qk_rows(w, n_rows, n_cols, n_head, false)
}

/// Moves every head's rows from HF to GGUF order (`to_gguf`) or back.
fn move_qk_rows(w: &[f64], n_rows: usize, n_cols: usize, n_head: usize, to_gguf: bool) -> Vec<f64> {
    assert_eq!(w.len(), n_rows * n_cols);
    assert_eq!(n_rows % n_head, 0);
    let hd = n_rows / n_head;
    assert_eq!(hd % 2, 0);
    let mut out = vec![0.0; w.len()];
    for h in 0..n_head {
        for j in 0..hd {
            let (gguf, hf) = (h * hd + j, h * hd + hf_row_for_gguf_row(j, hd));
            let (dst, src) = if to_gguf { (gguf, hf) } else { (hf, gguf) };
            out[dst * n_cols..(dst + 1) * n_cols]
                .copy_from_slice(&w[src * n_cols..(src + 1) * n_cols]);
        }
    }
    out
}

/// Writes a PEFT adapter dir: `adapter_config.json` + `adapter_model.safetensors`
/// (F32, keys `base_model.model.<hf prefix>.lora_{A,B}.weight`).
pub fn write_lora_dir(dir: &Path, lora: &TinyLora, base_model: &str) {
    std::fs::create_dir_all(dir).expect("create LoRA dir");
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": lora.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
    });
    write_json(&dir.join("adapter_config.json"), &config);
    let mut map = HashMap::new();
    for (prefix, pair) in &lora.pairs {
        map.insert(
            format!("base_model.model.{prefix}.lora_A.weight"),
            f64_tensor(&[lora.r, pair.in_features], &pair.a),
        );
        map.insert(
            format!("base_model.model.{prefix}.lora_B.weight"),
            f64_tensor(&[pair.out_features, lora.r], &pair.b),
        );
    }
    candle_core::safetensors::save(&map, dir.join("adapter_model.safetensors"))
        .expect("write adapter safetensors");
}
