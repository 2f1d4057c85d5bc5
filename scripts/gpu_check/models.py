"""The check's models, made where it runs: random weights of real shapes.

Nothing is carried to the GPU machine but code, so every checkpoint is written there:
HF safetensors directories (through transformers, so they are what users load),
PEFT LoRA adapters (through peft), and a SmolLM2-shaped Q4_1 GGUF (gguf_writer.py).
"""

import os
from dataclasses import dataclass

import numpy as np
import torch

import gguf_writer

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Shape:
    """A Llama-family architecture: what config.json or the GGUF metadata says."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    rope_theta: float = 10000.0
    tied: bool = False

    def params(self):
        head_dim = self.hidden // self.heads
        attn = self.hidden * head_dim * (2 * self.heads + 2 * self.kv_heads)
        layer = attn + 3 * self.hidden * self.ffn + 2 * self.hidden
        heads = 1 if self.tied else 2
        return self.layers * layer + heads * self.vocab * self.hidden + self.hidden

    def weight_bytes_per_token(self, bytes_per_weight):
        """Bytes of weights one decode step reads: every matrix once, the embedding one
        row (or all of it when tied, since it is also the LM head)."""
        embedding = 0 if self.tied else (self.vocab - 1) * self.hidden
        return int((self.params() - embedding) * bytes_per_weight)


# The real shapes (on the GPU) and tiny stand-ins with the same structure (dry run):
# grouped-query attention where the real model has it, a tied head for SmolLM2, an ARM
# vocabulary a few ids longer than its base's (cut before normalising, as GenARM does).
SHAPES = {
    "gpu": {
        "small": Shape("small-f32", 512, 4, 8, 4, 1408, 32000),
        "small_arm": Shape("small-arm-f32", 256, 2, 4, 2, 704, 32008),
        "llama7b": Shape("llama-2-7b", 4096, 32, 32, 32, 11008, 32000),
        "arm1b": Shape("tinyllama-1.1b", 2048, 22, 32, 4, 5632, 32000),
        "smollm": Shape("smollm2-135m", 576, 30, 9, 3, 1536, 49152, 100000.0, True),
    },
    "dry": {
        "small": Shape("small-f32-dry", 64, 2, 4, 2, 160, 512),
        "small_arm": Shape("small-arm-f32-dry", 32, 1, 2, 1, 96, 520),
        "llama7b": Shape("llama-7b-dry", 128, 2, 4, 4, 352, 512),
        "arm1b": Shape("arm-1b-dry", 64, 2, 4, 2, 160, 512),
        "smollm": Shape("smollm2-dry", 64, 2, 2, 1, 128, 256, 100000.0, True),
    },
}

# Logits of standard deviation ≈ HEAD_LOGIT_STD: peaked next-token distributions, so a
# greedy pick is not decided by rounding (HF's default init gives near-uniform ones).
HEAD_LOGIT_STD = 4.0


def llama_config(shape, dtype):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=shape.tied,
        dtype=dtype,
    )


def random_hf_model(shape, dtype, device, seed):
    """A LlamaForCausalLM with HF's own initialisation, norm weights spread around 1
    (so a reader that skipped them would fail parity) and a head scaled for peaked
    distributions."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(shape, dtype), dtype=dtype)
    model.to(device)  # a no-op unless from_config ignored the device context
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p, dtype=torch.float32).mul_(0.1).to(p.dtype))
        head = model.get_output_embeddings().weight
        head.normal_(0.0, HEAD_LOGIT_STD / shape.hidden**0.5)
    return model.eval()


def save_hf(model, out_dir, shard_bytes):
    """save_pretrained with shards of at most `shard_bytes`, so big models exercise the
    sharded index reader."""
    model.save_pretrained(out_dir, max_shard_size=shard_bytes)
    return dir_bytes(out_dir)


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def add_random_lora(model, base_dir, seed, rank=8, alpha=16, b_std=0.05):
    """Wraps `model` in a PEFT LoRA on all seven projections with random A (PEFT's own
    init) and random B (PEFT starts B at zero, which would make the ARM the base)."""
    from peft import LoraConfig, get_peft_model

    model.config._name_or_path = str(base_dir)  # becomes base_model_name_or_path
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, b_std)
    return peft_model.eval()


def link_copy(src_dir, dst_dir):
    """Another model directory with the same files as hard links: a second full-weight
    model of the same shape without writing (or storing) its bytes again."""
    os.makedirs(dst_dir, exist_ok=True)
    for f in os.listdir(src_dir):
        dst = os.path.join(dst_dir, f)
        if not os.path.exists(dst):
            os.link(os.path.join(src_dir, f), dst)


def write_smollm_gguf(path, shape, seed):
    """A SmolLM2-shaped llama GGUF quantized as the real one is: projections Q4_1, the
    tied embedding/head Q8_0, norms F32. Q and K rows are random, so llama.cpp's row
    permutation of real checkpoints does not matter here."""
    rng = np.random.default_rng(seed)
    head_dim = shape.hidden // shape.heads

    def normal(rows, cols, std):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * std).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(shape.hidden, dtype=np.float32)).astype(np.float32)

    tensors = [
        (
            "token_embd.weight",
            normal(shape.vocab, shape.hidden, HEAD_LOGIT_STD / shape.hidden**0.5),
            gguf_writer.Q8_0,
        ),
        ("output_norm.weight", norm(), gguf_writer.F32),
    ]
    q4 = gguf_writer.Q4_1
    for i in range(shape.layers):
        b = f"blk.{i}."
        tensors += [
            (b + "attn_norm.weight", norm(), gguf_writer.F32),
            (b + "attn_q.weight", normal(shape.heads * head_dim, shape.hidden, 0.02), q4),
            (b + "attn_k.weight", normal(shape.kv_heads * head_dim, shape.hidden, 0.02), q4),
            (b + "attn_v.weight", normal(shape.kv_heads * head_dim, shape.hidden, 0.02), q4),
            (b + "attn_output.weight", normal(shape.hidden, shape.heads * head_dim, 0.02), q4),
            (b + "ffn_norm.weight", norm(), gguf_writer.F32),
            (b + "ffn_gate.weight", normal(shape.ffn, shape.hidden, 0.02), q4),
            (b + "ffn_up.weight", normal(shape.ffn, shape.hidden, 0.02), q4),
            (b + "ffn_down.weight", normal(shape.hidden, shape.ffn, 0.02), q4),
        ]
    metadata = {
        "general.architecture": "llama",
        "general.name": shape.name,
        "llama.context_length": 8192,
        "llama.embedding_length": shape.hidden,
        "llama.block_count": shape.layers,
        "llama.feed_forward_length": shape.ffn,
        "llama.attention.head_count": shape.heads,
        "llama.attention.head_count_kv": shape.kv_heads,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.freq_base": float(shape.rope_theta),
        "llama.vocab_size": shape.vocab,
    }
    return gguf_writer.write_gguf(path, metadata, tensors)


def describe(shape):
    return {
        "name": shape.name,
        "hidden": shape.hidden,
        "layers": shape.layers,
        "heads": shape.heads,
        "kv_heads": shape.kv_heads,
        "ffn": shape.ffn,
        "vocab": shape.vocab,
        "tied": shape.tied,
        "params": shape.params(),
    }
