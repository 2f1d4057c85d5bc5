//! An ARM being trained: the frozen base with LoRA on its top layers, or (full
//! fine-tuning) with every weight of its top layers trainable.
//!
//! The layers below the first trainable one get no gradient, so they run on the
//! inference engine (quantized kernels, no autograd) and only the top blocks, the final
//! norm and the head go through candle's autograd, in f32 (or f64 for gradient checks).
//! Those top blocks are built in HF's row order (GGUF Q/K rows un-permuted, half-split
//! RoPE), so the trained LoRA is saved in PEFT's layout, and fully tuned weights under
//! their HF names, as they are.

use candle_core::{DType, Device, Tensor, Var, D};

use crate::cpu::llama::Llama;
use crate::error::{Error, Result};
use crate::guide::uniform;
use crate::model::config::{LlamaConfig, RopeLayout};
use crate::model::llama::{
    self, activate, causal_mask, rope_tables, unpermute_interleaved_rows, Proj,
};
use crate::model::lora::TARGETS;
use crate::model::weights::WeightSource;
use crate::model::Checkpoint;

/// Which parts of the model get LoRA, and how.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    /// Dropout on the LoRA input during training (PEFT's `lora_dropout`).
    pub dropout: f64,
    /// PEFT short names: `q_proj`, …, `down_proj`.
    pub targets: Vec<String>,
    /// How many of the top layers carry LoRA (all layers when ≥ the model's depth).
    pub layers: usize,
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// What the optimizer trains.
#[derive(Clone, Debug, PartialEq)]
pub enum Tuning {
    /// Low-rank deltas on the frozen weights of the top layers.
    Lora(LoraSpec),
    /// Every weight of the top `layers` blocks (projections, their biases, both norms)
    /// and the final norm; with `train_head` also the LM head (a tied base's head is
    /// trained as a copy: the input embeddings stay frozen). With `keep_layers` the
    /// model is the base's bottom K layers only (a weak ARM for a stronger base; see
    /// [`super::full::keep_bottom_layers`]), and `layers` counts from the top of those.
    Full {
        layers: usize,
        train_head: bool,
        keep_layers: Option<usize>,
    },
}

impl Tuning {
    /// How many of the top layers train (all layers when ≥ the model's depth).
    pub fn layers(&self) -> usize {
        match self {
            Self::Lora(spec) => spec.layers,
            Self::Full { layers, .. } => *layers,
        }
    }
}

/// A projection (frozen, or a trainable var's tensor in full fine-tuning) with an
/// optional trainable low-rank delta.
struct TrainLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LoraVars>,
}

/// The trainable pair of one module: `A` `[r, in]`, `B` `[out, r]`.
#[derive(Clone)]
pub struct LoraVars {
    /// HF module path, e.g. `model.layers.27.self_attn.q_proj`.
    pub module: String,
    pub a: Var,
    pub b: Var,
}

struct TopBlock {
    input_norm: Tensor,
    post_norm: Tensor,
    q: TrainLinear,
    k: TrainLinear,
    v: TrainLinear,
    o: TrainLinear,
    gate: TrainLinear,
    up: TrainLinear,
    down: TrainLinear,
}

/// Randomness for one forward pass: dropout masks are a function of (seed, step, micro
/// batch, module), so a resumed run draws exactly what an uninterrupted one would.
#[derive(Clone, Copy, Debug)]
pub struct DropoutKey {
    pub seed: u64,
    pub step: u64,
    pub micro: u64,
}

pub struct TrainableArm {
    cfg: LlamaConfig,
    prefix: Llama,
    first_trainable: usize,
    top: Vec<TopBlock>,
    norm: Tensor,
    head: Tensor,
    lora: Vec<LoraVars>,
    /// Full fine-tuning's parameters under their HF tensor names (empty for LoRA); the
    /// forward pass uses the vars' own tensors, so an update is seen at once.
    full: Vec<(String, Var)>,
    tuning: Tuning,
    /// While set, the LoRA deltas are left out: the forward pass is the frozen base's
    /// (DPO's reference model, with no second copy of the weights).
    lora_off: bool,
    cos: Tensor,
    sin: Tensor,
    dtype: DType,
    device: Device,
}

impl TrainableArm {
    /// Builds the ARM on `base`: fresh LoRA weights (A Kaiming-uniform, B zero, as in
    /// PEFT), or for full fine-tuning the base's own weights as trainable vars.
    /// `max_len` bounds the sequences it will see.
    pub fn new(
        base: &Checkpoint,
        tuning: &Tuning,
        max_len: usize,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (lora_spec, train_head, cfg) = match tuning {
            Tuning::Lora(spec) => (Some(spec), false, base.config.clone()),
            Tuning::Full {
                train_head,
                keep_layers,
                ..
            } => {
                let cfg = match keep_layers {
                    Some(k) => super::full::keep_bottom_layers(&base.config, *k)?,
                    None => base.config.clone(),
                };
                (None, *train_head, cfg)
            }
        };
        if let Some(spec) = lora_spec {
            validate_lora(spec)?;
        }
        let n_top = tuning.layers().clamp(1, cfg.num_layers);
        let first = cfg.num_layers - n_top;
        let prefix = Llama::load(base.source.as_ref(), &cfg, &[None], max_len, device)?;
        let src = base.source.as_ref();
        let mut full = Vec::new();
        // A weight in HF order, as a trainable var (full fine-tuning) or a constant.
        let mut weight = |name: &str, trainable: bool| -> Result<Tensor> {
            let t = load_hf_order(src, &cfg, name, device)?.to_dtype(dtype)?;
            if !trainable {
                return Ok(t);
            }
            let var = Var::from_tensor(&t)?;
            let t = var.as_tensor().clone();
            full.push((name.to_string(), var));
            Ok(t)
        };
        let in_full = lora_spec.is_none();
        let mut counter = 0u64;
        let mut lora = Vec::new();
        let mut top = Vec::with_capacity(n_top);
        for layer in first..cfg.num_layers {
            let mut linear = |proj: Proj| -> Result<TrainLinear> {
                let module = llama::module_path(layer, proj);
                let w = weight(&format!("{module}.weight"), in_full)?;
                let bias_name = format!("{module}.bias");
                let bias = if src.contains(&bias_name) {
                    Some(weight(&bias_name, in_full)?)
                } else {
                    None
                };
                let vars = match lora_spec {
                    Some(spec) if spec.targets.iter().any(|t| t == proj.short_name()) => {
                        let (out, inp) = w.dims2()?;
                        let bound = 1.0 / (inp as f64).sqrt();
                        let a: Vec<f64> = (0..spec.rank * inp)
                            .map(|_| {
                                counter += 1;
                                (uniform(seed, counter) * 2.0 - 1.0) * bound
                            })
                            .collect();
                        let a = Tensor::from_vec(a, (spec.rank, inp), device)?.to_dtype(dtype)?;
                        let b = Tensor::zeros((out, spec.rank), dtype, device)?;
                        let vars = LoraVars {
                            module: module.clone(),
                            a: Var::from_tensor(&a)?,
                            b: Var::from_tensor(&b)?,
                        };
                        lora.push(vars.clone());
                        Some(vars)
                    }
                    _ => None,
                };
                Ok(TrainLinear {
                    weight: w,
                    bias,
                    lora: vars,
                })
            };
            let (q, k, v, o) = (
                linear(Proj::Q)?,
                linear(Proj::K)?,
                linear(Proj::V)?,
                linear(Proj::O)?,
            );
            let (gate, up, down) = (linear(Proj::Gate)?, linear(Proj::Up)?, linear(Proj::Down)?);
            top.push(TopBlock {
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
                input_norm: weight(&llama::input_norm(layer), in_full)?,
                post_norm: weight(&llama::post_attention_norm(layer), in_full)?,
            });
        }
        let norm = weight(llama::FINAL_NORM, in_full)?;
        let head = if src.contains(llama::LM_HEAD) {
            weight(llama::LM_HEAD, train_head)?
        } else if train_head {
            // Tied: the head trains as a copy of the embeddings, saved as `lm_head`.
            let t = load_hf_order(src, &cfg, llama::EMBED, device)?.to_dtype(dtype)?;
            let var = Var::from_tensor(&t)?;
            full.push((llama::LM_HEAD.to_string(), var.clone()));
            var.as_tensor().clone()
        } else {
            weight(llama::EMBED, false)?
        };
        let (cos, sin) = rope_tables(&cfg, max_len, dtype, device)?;
        Ok(Self {
            cfg,
            prefix,
            first_trainable: first,
            top,
            norm,
            head,
            lora,
            full,
            tuning: tuning.clone(),
            lora_off: false,
            cos,
            sin,
            dtype,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn tuning(&self) -> &Tuning {
        &self.tuning
    }

    /// The layer indices that train (carry LoRA, or are fully tuned).
    pub fn trainable_layers(&self) -> std::ops::Range<usize> {
        self.first_trainable..self.cfg.num_layers
    }

    pub fn lora_vars(&self) -> &[LoraVars] {
        &self.lora
    }

    /// Full fine-tuning's parameters by HF tensor name (empty for LoRA).
    pub fn full_vars(&self) -> &[(String, Var)] {
        &self.full
    }

    /// Every trainable var under the name it is saved as: PEFT's
    /// `base_model.model.<module>.lora_{A,B}.weight` for LoRA, the HF tensor name for
    /// full fine-tuning. The order is fixed (the optimizer's moments follow it).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut named = self.full.clone();
        for l in &self.lora {
            let prefix = format!("base_model.model.{}", l.module);
            named.push((format!("{prefix}.lora_A.weight"), l.a.clone()));
            named.push((format!("{prefix}.lora_B.weight"), l.b.clone()));
        }
        named
    }

    pub fn vars(&self) -> Vec<Var> {
        self.named_vars().into_iter().map(|(_, v)| v).collect()
    }

    /// Per-sequence sums of `log π(token_{t+1} | ≤ t)` over response tokens: sequence
    /// `i` is `seqs[i]` and its response starts at index `starts[i]` (the first token
    /// scored is `seqs[i][starts[i]]`). Differentiable in the LoRA weights.
    pub fn response_logprobs(
        &mut self,
        seqs: &[Vec<u32>],
        starts: &[usize],
        dropout: Option<DropoutKey>,
    ) -> Result<Tensor> {
        let x = self.final_hidden(seqs, dropout)?;
        let (n, t_max, _) = x.dims3()?;
        // Only response positions go through the head: position t predicts token t+1.
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        let mut owner = Vec::new();
        for (i, (s, &start)) in seqs.iter().zip(starts).enumerate() {
            if start == 0 || start > s.len() {
                return Err(Error::Request(format!(
                    "response start {start} outside a sequence of {} tokens (the prompt needs ≥ 1 token)",
                    s.len()
                )));
            }
            for (t, &token) in s.iter().enumerate().skip(start) {
                rows.push((i * t_max + t - 1) as u32);
                targets.push(token);
                owner.push(i as u32);
            }
        }
        let flat = x.reshape((n * t_max, self.cfg.hidden_size))?;
        let picked = flat.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)?;
        let logits = picked.matmul(&self.head.t()?)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let m = targets.len();
        let target = Tensor::from_vec(targets, (m, 1), &self.device)?;
        let token_lp = logp.gather(&target, 1)?.squeeze(1)?;
        // Sum per sequence: a [n, m] 0/1 matrix times the token log-probs.
        let mut sel = vec![0f64; n * m];
        for (j, &i) in owner.iter().enumerate() {
            sel[i as usize * m + j] = 1.0;
        }
        let sel = Tensor::from_vec(sel, (n, m), &self.device)?.to_dtype(self.dtype)?;
        Ok(sel.matmul(&token_lp.unsqueeze(1)?)?.squeeze(1)?)
    }

    /// [`Self::response_logprobs`] of the frozen base: the LoRA deltas left out, no
    /// dropout, no gradient (DPO's reference log-probs, valid at any point of training).
    /// Meaningless for full fine-tuning, whose weights are the trained ones: an error.
    pub fn base_response_logprobs(
        &mut self,
        seqs: &[Vec<u32>],
        starts: &[usize],
    ) -> Result<Tensor> {
        if !matches!(self.tuning, Tuning::Lora(_)) {
            return Err(Error::Request(
                "the frozen base's log-probs need LoRA training (not --full)".into(),
            ));
        }
        self.lora_off = true;
        let lp = self.response_logprobs(seqs, starts, None);
        self.lora_off = false;
        Ok(lp?.detach())
    }

    /// Hidden states after the final norm, `[n, t_max, hidden]`, for sequences
    /// right-padded to the longest (causal attention keeps the padding from reaching
    /// real positions). Differentiable in the LoRA weights.
    pub fn final_hidden(
        &mut self,
        seqs: &[Vec<u32>],
        dropout: Option<DropoutKey>,
    ) -> Result<Tensor> {
        let n = seqs.len();
        let t_max = seqs.iter().map(Vec::len).max().unwrap_or(0);
        if n == 0 || seqs.iter().any(Vec::is_empty) {
            return Err(Error::Request(
                "no sequences to score (or an empty one)".into(),
            ));
        }
        // Frozen layers, one sequence at a time, right-padded with zeros to t_max.
        let mut hidden = Vec::with_capacity(n);
        for s in seqs {
            let hs = self
                .prefix
                .hidden_states(std::slice::from_ref(s), self.first_trainable)?
                .to_dtype(self.dtype)?;
            let pad = t_max - s.len();
            hidden.push(if pad > 0 {
                hs.pad_with_zeros(1, 0, pad)?
            } else {
                hs
            });
        }
        let mut x = Tensor::cat(&hidden, 0)?;
        // One query row per position, no KV groups, nothing cached before: `[t, t]`;
        // a sliding-window layer gets its own.
        let mask_for = |window: Option<usize>| -> Result<Option<Tensor>> {
            causal_mask(t_max, 0, 1, window, &self.device)?
                .map(|m| m.to_dtype(self.dtype))
                .transpose()
                .map_err(Error::from)
        };
        let full_mask = mask_for(None)?;
        for (i, block) in self.top.iter().enumerate() {
            let key = dropout.map(|k| (k, i));
            let mask = match self.cfg.sliding_window(self.first_trainable + i) {
                Some(w) => mask_for(Some(w))?,
                None => full_mask.clone(),
            };
            x = self.block_forward(block, &x, mask.as_ref(), key)?;
        }
        Ok(candle_nn::ops::rms_norm_slow(
            &x,
            &self.norm,
            self.cfg.rms_norm_eps as f32,
        )?)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn block_forward(
        &self,
        b: &TopBlock,
        x: &Tensor,
        mask: Option<&Tensor>,
        key: Option<(DropoutKey, usize)>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (bsz, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let eps = cfg.rms_norm_eps as f32;
        let lin = |l: &TrainLinear, x: &Tensor, slot: usize| {
            self.linear(l, x, key.map(|(k, i)| (k, i * 7 + slot)))
        };
        let h = candle_nn::ops::rms_norm_slow(x, &b.input_norm, eps)?;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((bsz, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        let q = candle_nn::rotary_emb::rope_slow(&heads(lin(&b.q, &h, 0)?, nh)?, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope_slow(&heads(lin(&b.k, &h, 1)?, nkv)?, &cos, &sin)?;
        let v = heads(lin(&b.v, &h, 2)?, nkv)?;
        let (k, v) = (repeat_kv(&k, nh / nkv)?, repeat_kv(&v, nh / nkv)?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let att = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((bsz, t, nh * hd))?;
        let x = (x + lin(&b.o, &att, 3)?)?;
        let h = candle_nn::ops::rms_norm_slow(&x, &b.post_norm, eps)?;
        let gate = activate(&lin(&b.gate, &h, 4)?, cfg.hidden_act)?;
        let up = lin(&b.up, &h, 5)?;
        Ok((&x + lin(&b.down, &(gate * up)?, 6)?)?)
    }

    fn linear(
        &self,
        l: &TrainLinear,
        x: &Tensor,
        key: Option<(DropoutKey, usize)>,
    ) -> Result<Tensor> {
        let mut y = x.broadcast_matmul(&l.weight.t()?)?;
        if let Some(b) = &l.bias {
            y = y.broadcast_add(b)?;
        }
        if let (Some(vars), Tuning::Lora(spec), false) = (&l.lora, &self.tuning, self.lora_off) {
            let input = match key {
                Some((k, slot)) if spec.dropout > 0.0 => self.dropout(x, spec.dropout, k, slot)?,
                _ => x.clone(),
            };
            let low = input.broadcast_matmul(&vars.a.as_tensor().t()?)?;
            let delta = low.broadcast_matmul(&vars.b.as_tensor().t()?)?;
            y = (y + (delta * spec.scale())?)?;
        }
        Ok(y)
    }

    /// Inverted dropout with a mask drawn from the counter-based generator.
    fn dropout(&self, x: &Tensor, p: f64, key: DropoutKey, slot: usize) -> Result<Tensor> {
        let stream = key
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(key.step << 24)
            .wrapping_add(key.micro << 12)
            .wrapping_add(slot as u64);
        let keep = 1.0 / (1.0 - p);
        let mask: Vec<f64> = (0..x.elem_count() as u64)
            .map(|i| if uniform(stream, i) < p { 0.0 } else { keep })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), &self.device)?.to_dtype(self.dtype)?;
        Ok((x * mask)?)
    }
}

fn validate_lora(spec: &LoraSpec) -> Result<()> {
    if spec.rank == 0 {
        return Err(Error::Request("LoRA rank must be ≥ 1".into()));
    }
    for t in &spec.targets {
        if !TARGETS.contains(&t.as_str()) {
            return Err(Error::Request(format!(
                "unknown LoRA target `{t}` (valid: {})",
                TARGETS.join(", ")
            )));
        }
    }
    Ok(())
}

/// A tensor of `src` as dense f32 in HF's row order: a GGUF's interleaved-RoPE Q/K
/// projections (weights and biases) are un-permuted back to HF's half-split rows.
pub fn load_hf_order(
    src: &dyn WeightSource,
    cfg: &LlamaConfig,
    name: &str,
    device: &Device,
) -> Result<Tensor> {
    let t = src.load(name, device)?.dense(device)?;
    let module = name
        .strip_suffix(".weight")
        .or_else(|| name.strip_suffix(".bias"))
        .unwrap_or(name);
    let Some(heads) = llama::parse_module_path(module).and_then(|(_, p)| p.rope_heads(cfg)) else {
        return Ok(t);
    };
    if cfg.rope_layout != RopeLayout::Interleaved {
        return Ok(t);
    }
    if t.rank() == 1 {
        let rows = unpermute_interleaved_rows(&t.unsqueeze(1)?, heads, cfg.head_dim)?;
        return Ok(rows.squeeze(1)?);
    }
    unpermute_interleaved_rows(&t, heads, cfg.head_dim)
}

/// `[b, n_kv, t, d]` → `[b, n_kv·n_rep, t, d]`, each KV head repeated for its query group.
fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, n_kv, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, n_kv, n_rep, t, d))?
        .reshape((b, n_kv * n_rep, t, d))?)
}
