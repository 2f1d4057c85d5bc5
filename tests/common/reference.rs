//! A plain f64 reference forward pass to judge the engines against.
// Written as plain index loops on purpose: it is the slow, obvious version the engine
// is judged against.
#![allow(clippy::needless_range_loop)]

use super::fixtures::TinyModel;

/// y = W x (+ b) for a row-major W of shape [out, in].
fn linear(x: &[f64], w: &[f64], b: Option<&[f64]>, out: usize) -> Vec<f64> {
    let inp = x.len();
    assert_eq!(w.len(), out * inp);
    let mut y = vec![0.0; out];
    for o in 0..out {
        let mut acc = 0.0;
        for i in 0..inp {
            acc += w[o * inp + i] * x[i];
        }
        if let Some(b) = b {
            acc += b[o];
        }
        y[o] = acc;
    }
    y
}

fn rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let mean_sq = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * inv * w).collect()
}

/// HF "rotate_half" RoPE applied in place to one head vector at position `pos`.
pub fn rope_rotate_half(x: &mut [f64], pos: usize, theta: f64) {
    rope_rotate_half_scaled(x, pos, theta, 1.0);
}

/// [`rope_rotate_half`] with linear RoPE scaling: every frequency divided by `factor`.
pub fn rope_rotate_half_scaled(x: &mut [f64], pos: usize, theta: f64, factor: f64) {
    let hd = x.len();
    let half = hd / 2;
    for i in 0..half {
        let inv_freq = theta.powf(-2.0 * i as f64 / hd as f64) / factor;
        let angle = pos as f64 * inv_freq;
        let (sin, cos) = angle.sin_cos();
        let a = x[i];
        let b = x[i + half];
        x[i] = a * cos - b * sin;
        x[i + half] = b * cos + a * sin;
    }
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn softmax(xs: &[f64]) -> Vec<f64> {
    let max = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = xs.iter().map(|x| (x - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

pub fn log_softmax(xs: &[f64]) -> Vec<f64> {
    let max = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let log_sum = xs.iter().map(|x| (x - max).exp()).sum::<f64>().ln() + max;
    xs.iter().map(|x| x - log_sum).collect()
}

/// Log-probabilities at every position of `tokens`: `log_softmax` of [`reference_logits`].
pub fn reference_logprobs(model: &TinyModel, tokens: &[u32]) -> Vec<Vec<f64>> {
    reference_logits(model, tokens)
        .iter()
        .map(|l| log_softmax(l))
        .collect()
}

/// Logits at every position of `tokens` (the sequence starts at position 0).
pub fn reference_logits(model: &TinyModel, tokens: &[u32]) -> Vec<Vec<f64>> {
    let cfg = &model.config;
    let h = cfg.hidden_size;
    let hd = cfg.head_dim();
    let n_heads = cfg.num_heads;
    let n_kv = cfg.num_kv_heads;
    let group = n_heads / n_kv;
    let eps = cfg.rms_norm_eps;
    let bias = move |name: String| {
        if cfg.qkv_bias() {
            Some(model.get(&name))
        } else {
            None
        }
    };
    let o_bias = |name: String| cfg.o_bias.then(|| model.get(&name));
    let mlp_bias = |name: String| cfg.mlp_bias.then(|| model.get(&name));
    let act = cfg.activation();
    let rope_factor = cfg.rope_linear_factor.unwrap_or(1.0);

    // Embedding lookup.
    let embed = model.get("model.embed_tokens.weight");
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| {
            let t = t as usize;
            assert!(t < cfg.vocab_size, "token {t} out of vocab");
            embed[t * h..(t + 1) * h].to_vec()
        })
        .collect();

    for l in 0..cfg.num_layers {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        let attn_norm = model.get(&p("input_layernorm.weight"));
        let wq = model.get(&p("self_attn.q_proj.weight"));
        let wk = model.get(&p("self_attn.k_proj.weight"));
        let wv = model.get(&p("self_attn.v_proj.weight"));
        let wo = model.get(&p("self_attn.o_proj.weight"));
        let bq = bias(p("self_attn.q_proj.bias"));
        let bk = bias(p("self_attn.k_proj.bias"));
        let bv = bias(p("self_attn.v_proj.bias"));

        // q, k, v for every position, RoPE applied per head.
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let xn = rms_norm(x, attn_norm, eps);
            let mut q = linear(&xn, wq, bq, n_heads * hd);
            let mut k = linear(&xn, wk, bk, n_kv * hd);
            let v = linear(&xn, wv, bv, n_kv * hd);
            for head in 0..n_heads {
                let q = &mut q[head * hd..(head + 1) * hd];
                rope_rotate_half_scaled(q, pos, cfg.rope_theta, rope_factor);
            }
            for head in 0..n_kv {
                let k = &mut k[head * hd..(head + 1) * hd];
                rope_rotate_half_scaled(k, pos, cfg.rope_theta, rope_factor);
            }
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }

        // Causal attention; query head `head` reads kv head `head / group`; with a
        // sliding window w, only keys t − w < s ≤ t.
        let scale = 1.0 / (hd as f64).sqrt();
        let wo_b = o_bias(p("self_attn.o_proj.bias"));
        for t in 0..xs.len() {
            let first = match cfg.sliding_window {
                Some(w) => (t + 1).saturating_sub(w),
                None => 0,
            };
            let mut attn_out = vec![0.0; n_heads * hd];
            for head in 0..n_heads {
                let kv = head / group;
                let q = &qs[t][head * hd..(head + 1) * hd];
                let mut scores = Vec::new();
                for s in first..=t {
                    let k = &ks[s][kv * hd..(kv + 1) * hd];
                    let dot: f64 = q.iter().zip(k).map(|(a, b)| a * b).sum();
                    scores.push(dot * scale);
                }
                let probs = softmax(&scores);
                for s in first..=t {
                    let v = &vs[s][kv * hd..(kv + 1) * hd];
                    for d in 0..hd {
                        attn_out[head * hd + d] += probs[s - first] * v[d];
                    }
                }
            }
            let o = linear(&attn_out, wo, wo_b, h);
            for d in 0..h {
                xs[t][d] += o[d];
            }
        }

        // MLP: down(act(gate(x)) * up(x)), each with its bias if the config has them.
        let mlp_norm = model.get(&p("post_attention_layernorm.weight"));
        let wg = model.get(&p("mlp.gate_proj.weight"));
        let wu = model.get(&p("mlp.up_proj.weight"));
        let wd = model.get(&p("mlp.down_proj.weight"));
        let inter = cfg.intermediate_size;
        for x in xs.iter_mut() {
            let xn = rms_norm(x, mlp_norm, eps);
            let gate = linear(&xn, wg, mlp_bias(p("mlp.gate_proj.bias")), inter);
            let up = linear(&xn, wu, mlp_bias(p("mlp.up_proj.bias")), inter);
            let gated: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| act.apply_f64(*g) * u)
                .collect();
            let down = linear(&gated, wd, mlp_bias(p("mlp.down_proj.bias")), h);
            for d in 0..h {
                x[d] += down[d];
            }
        }
    }

    let final_norm = model.get("model.norm.weight");
    let lm_head = if cfg.tie_word_embeddings {
        model.get("model.embed_tokens.weight")
    } else {
        model.get("lm_head.weight")
    };
    xs.iter()
        .map(|x| linear(&rms_norm(x, final_norm, eps), lm_head, None, cfg.vocab_size))
        .collect()
}
