"""Writes tests/fixtures/parity/: tiny random models saved by transformers, PEFT and
llama.cpp's converter, each with the log-probs transformers computes for them in
float64. `tests/parity.rs` loads every case with genarm and compares.

Run by a developer, not by CI:

    python3 -m pip install torch transformers peft safetensors numpy gguf sentencepiece protobuf
    python3 tests/parity/make_fixtures.py [--llama-cpp DIR]

DIR is a llama.cpp checkout (it holds convert_hf_to_gguf.py, conversion/ and
gguf-py/); without it the GGUF cases are left out of the manifest. The output is
deterministic for fixed library versions, which manifest.json records.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
import peft
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "parity"

VOCAB = 96
# Longer than every sliding window below, so the windows cut in.
TOKENS = [int(t) for t in np.random.default_rng(1234).integers(0, VOCAB, 24)]

# f32 engines against a float64 reference over two layers: a few ulps per op. Logits
# here reach |x| ~ 10, so f32 rounding of one logit is ~1e-6 and the sums in attention
# and the MLP add a few times that; 1e-4 leaves room without hiding a wrong feature,
# which moves log-probs by 1e-2 or more with these weight scales.
F32_TOL = 1e-4

# Weight scales: large enough that a wrong RoPE, bias or activation is visible.
WEIGHT_STD = 0.25
EMBED_STD = 0.8
NORM_STD = 0.3
BIAS_STD = 0.3
LORA_STD = 0.3

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def small(**overrides):
    """The shape every case starts from: 2 layers, hidden 32, 4 heads of 8, GQA 2."""
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    base.update(overrides)
    return base


def rope(theta, scaling=None):
    """RoPE settings in the layout this transformers version writes."""
    if TRANSFORMERS_5:
        params = {"rope_type": "default", "rope_theta": theta}
        if scaling:
            params.update(scaling)
        return {"rope_parameters": params}
    return {"rope_theta": theta, "rope_scaling": scaling}


LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that the scaled and unscaled frequencies differ at 24 tokens.
    "original_max_position_embeddings": 16,
}


def randomize(model, seed, only_lora=False):
    """Overwrites every parameter (or only the LoRA ones) with seeded normals at the
    scales above. PEFT starts lora_B at zero, which would make every adapter a no-op."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if only_lora and "lora_" not in name:
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if name.endswith("norm.weight"):
                value = 1.0 + NORM_STD * noise
            elif name.endswith(".bias"):
                value = BIAS_STD * noise
            elif "embed_tokens" in name:
                value = EMBED_STD * noise
            elif "lora_" in name:
                value = LORA_STD * noise
            else:
                value = WEIGHT_STD * noise
            p.copy_(value.to(p.dtype))


def log_probs(model):
    """Teacher-forced next-token log-softmax at every position, in float64."""
    model = model.double().eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([TOKENS])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1).tolist()


def rounded(rows):
    return [[float(f"{x:.7g}") for x in row] for row in rows]


def write_reference(case_dir, models):
    case_dir.mkdir(parents=True, exist_ok=True)
    doc = {"tokens": TOKENS, "log_probs": [rounded(m) for m in models]}
    (case_dir / "reference.json").write_text(json.dumps(doc, separators=(",", ":")))


def build(cls, config_cls, config_kwargs, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    config = config_cls(**config_kwargs)
    config._attn_implementation = "eager"
    model = cls(config).to(torch.float32)
    randomize(model, seed)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype)


def save(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    # Tokenizer files are not part of these cases; keep only what transformers wrote
    # for the weights and the config.
    for extra in ["generation_config.json"]:
        (path / extra).unlink(missing_ok=True)


class Manifest:
    def __init__(self):
        self.cases = []

    def add(self, name, kind, **fields):
        entry = {"name": name, "kind": kind}
        entry.update(fields)
        self.cases.append(entry)


def reread(cls, path):
    """The saved checkpoint as a user loads it, in float64. (Casting the in-memory
    model instead would keep RoPE's inv_freq buffer at the save dtype: BF16 there
    moves log-probs by ~4e-3, an artefact no checkpoint carries.)"""
    return cls.from_pretrained(path, dtype=torch.float64, attn_implementation="eager")


def max_delta(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def with_config(**changes):
    """The same checkpoint read with some config values changed: what an engine that
    ignored the feature would compute."""
    def variant(cls, path):
        config = cls.config_class.from_pretrained(path)
        for key, value in changes.items():
            setattr(config, key, value)
        return cls.from_pretrained(path, config=config, dtype=torch.float64,
                                   attn_implementation="eager")
    return variant


def zero_biases(cls, path):
    model = reread(cls, path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
    return model


def hf_case(manifest, name, cls, config_cls, config_kwargs, seed, dtype=torch.float32,
            save_kwargs=None, note="", without=None):
    """`without`: (what, variant) — the checkpoint with the case's feature ignored; the
    manifest records how far that moves the log-probs, i.e. how much the case's
    tolerance is worth (it must be far above the tolerance)."""
    case = OUT / name
    model = build(cls, config_cls, config_kwargs, seed, dtype)
    save(model, case / "model", **(save_kwargs or {}))
    reference = log_probs(reread(cls, case / "model"))
    write_reference(case, [reference])
    extra = {}
    if without is not None:
        what, variant = without
        effect = max_delta(reference, log_probs(variant(cls, case / "model")))
        extra["feature_effect"] = f"{what}: max |delta| {effect:.3g}"
    manifest.add(name, "hf", model="model", tolerance=F32_TOL, note=note, **extra)
    return case / "model"


def llama(name, manifest, seed, note, without=None, **overrides):
    kwargs = small(**overrides)
    return hf_case(manifest, name, LlamaForCausalLM, LlamaConfig, kwargs, seed, note=note,
                   without=without)


def plain_rope(theta):
    return with_config(**rope(theta))


def hf_cases(manifest):
    llama("llama2_mha", manifest, 11, "MHA, rope_theta 1e4",
          num_key_value_heads=4, **rope(1e4))
    llama("llama3_gqa", manifest, 12, "GQA 4/2, rope_theta 5e5",
          without=("rope_theta 1e4 instead", plain_rope(1e4)), **rope(5e5))
    llama("llama31_rope_llama3", manifest, 13,
          "rope_type llama3, original_max_position_embeddings 16",
          without=("rope_type default instead", plain_rope(5e5)),
          **rope(5e5, LLAMA3_SCALING))
    llama("llama_rope_linear", manifest, 14, "rope_type linear, factor 4",
          without=("rope_type default instead", plain_rope(1e4)),
          **rope(1e4, {"rope_type": "linear", "factor": 4.0}))
    llama("llama_head_dim_16", manifest, 15, "head_dim 16 != hidden 32 / 4 heads",
          head_dim=16, **rope(1e4))
    llama("llama_tied", manifest, 16, "tie_word_embeddings",
          tie_word_embeddings=True, **rope(1e4))
    llama("llama_attention_bias", manifest, 17, "q/k/v/o biases",
          without=("biases zeroed", zero_biases), attention_bias=True, **rope(1e4))
    llama("llama_mlp_bias", manifest, 18, "gate/up/down biases",
          without=("biases zeroed", zero_biases), mlp_bias=True, **rope(1e4))
    llama("llama_gelu", manifest, 19, "hidden_act gelu (erf)",
          without=("gelu_pytorch_tanh instead", with_config(hidden_act="gelu_pytorch_tanh")),
          hidden_act="gelu", **rope(1e4))
    llama("llama_gelu_tanh", manifest, 20, "hidden_act gelu_pytorch_tanh",
          without=("gelu (erf) instead", with_config(hidden_act="gelu")),
          hidden_act="gelu_pytorch_tanh", **rope(1e4))
    hf_case(manifest, "mistral_sliding", MistralForCausalLM, MistralConfig,
            small(sliding_window=6, head_dim=8, **rope(1e4)), 21,
            note="sliding_window 6 < 24 tokens",
            without=("no window", with_config(sliding_window=None)))
    qwen_kwargs = small(
        use_sliding_window=True,
        sliding_window=5,
        max_window_layers=1,
        layer_types=["sliding_attention", "full_attention"],
        **rope(1e4),
    )
    hf_case(manifest, "qwen2_mixed_layers", Qwen2ForCausalLM, Qwen2Config, qwen_kwargs, 22,
            note="q/k/v biases; layer 0 slides (window 5), layer 1 is full",
            without=("every layer full", with_config(layer_types=["full_attention"] * 2)))
    hf_case(manifest, "llama_bf16", LlamaForCausalLM, LlamaConfig, small(**rope(1e4)), 23,
            dtype=torch.bfloat16, note="BF16 safetensors")
    hf_case(manifest, "llama_sharded", LlamaForCausalLM, LlamaConfig, small(**rope(1e4)), 24,
            save_kwargs={"max_shard_size": "20KB"}, note="sharded: model.safetensors.index.json")
    v4_layout_case(manifest, "llama_v4_config", 25, dict(LLAMA3_SCALING),
                   "transformers-4 config layout: rope_theta + rope_scaling llama3")
    v4_layout_case(manifest, "llama_v4_config_type_key", 26, {"type": "linear", "factor": 4.0},
                   "transformers-4 config layout, rope_scaling with the old `type` key")


def v4_layout_case(manifest, name, seed, scaling, note):
    """A config.json in transformers-4 layout (top-level rope_theta and rope_scaling),
    written by hand: what most checkpoints on the Hub still carry."""
    case = OUT / name
    model = build(LlamaForCausalLM, LlamaConfig, small(**rope(5e5)), seed)
    save(model, case / "model")
    config = json.loads((case / "model" / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_theta"] = 5e5
    config["rope_scaling"] = scaling
    config["transformers_version"] = "4.46.0"
    (case / "model" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    # The reference comes from transformers reading that file back.
    write_reference(case, [log_probs(reread(LlamaForCausalLM, case / "model"))])
    manifest.add(name, "hf", model="model", tolerance=F32_TOL, note=note)


# Cases genarm is known to get wrong today: (why, engines it fails on; None = all).
# tests/parity.rs reports them but does not fail. Remove an entry once genarm is fixed
# (the test says so when a known failure passes), and the test holds the line.
KNOWN_FAILURES = {
    "lora_peft_exact_config": (
        "genarm refuses the adapter_config.json PEFT 0.21 writes: it lists fields genarm's "
        "allow-list does not know (kasa_config, lora_ga_config, monteclora_config, "
        "use_bdlora, velora_config), all null, i.e. off",
        None,
    ),
    "arm_larger_vocab": (
        "the webgpu engine log-softmaxes a full-weight ARM over its own 97 tokens and cuts "
        "to 96 afterwards (max |delta| 0.183 = exactly that); the cut must come first",
        ["webgpu"],
    ),
}


def known_failure(name):
    if name not in KNOWN_FAILURES:
        return {}
    why, engines = KNOWN_FAILURES[name]
    fields = {"known_failure": why}
    if engines is not None:
        fields["known_failure_engines"] = engines
    return fields

# The adapter read with its feature ignored (see hf_case's `without`).
LORA_VARIANTS = {
    "lora_rslora": ("use_rslora false instead", {"use_rslora": False}),
    "lora_patterns": ("no rank/alpha patterns (shapes kept by rank_pattern only)",
                      {"alpha_pattern": {}}),
}

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_base():
    return build(LlamaForCausalLM, LlamaConfig, small(**rope(1e4)), 30)


def save_adapter(peft_model, path, drop_nulls):
    """Saves as PEFT does; with `drop_nulls`, the config's null fields are removed, as
    PEFT versions older than the fields wrote it (null is every such field's default,
    so PEFT reads the file the same way)."""
    peft_model.save_pretrained(path)
    # PEFT's model card template carries nothing a loader reads.
    (path / "README.md").unlink(missing_ok=True)
    if drop_nulls:
        config_path = path / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config = {k: v for k, v in config.items() if v is not None}
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def lora_cases(manifest):
    from peft import LoraConfig, PeftModel, get_peft_model

    save(lora_base(), OUT / "lora_base")
    base_ref = log_probs(reread(LlamaForCausalLM, OUT / "lora_base"))
    adapters = {
        "lora_plain": dict(r=4, lora_alpha=8),
        "lora_rslora": dict(r=4, lora_alpha=8, use_rslora=True),
        "lora_patterns": dict(
            r=4,
            lora_alpha=8,
            # Overlapping keys: q_proj of layer 1 matches two rank keys.
            rank_pattern={"model.layers.1.self_attn.q_proj": 6, "q_proj": 2, "down_proj": 3},
            alpha_pattern={"v_proj": 3.0, "layers.0.mlp.up_proj": 20.0},
        ),
        "lora_layers": dict(r=4, lora_alpha=8, layers_to_transform=[1]),
        "lora_peft_exact_config": dict(r=4, lora_alpha=8),
    }
    for seed, (name, kwargs) in enumerate(adapters.items(), start=40):
        config = LoraConfig(target_modules=LORA_TARGETS, lora_dropout=0.0,
                            task_type="CAUSAL_LM", **kwargs)
        peft_model = get_peft_model(lora_base(), config)
        randomize(peft_model, seed, only_lora=True)
        case = OUT / name
        exact = name == "lora_peft_exact_config"
        save_adapter(peft_model, case / "adapter", drop_nulls=not exact)
        # The reference reads the adapter back as a user would.
        loaded = PeftModel.from_pretrained(reread(LlamaForCausalLM, OUT / "lora_base"),
                                           case / "adapter")
        reference = log_probs(loaded)
        write_reference(case, [base_ref, reference])
        note = ("adapter_config.json exactly as PEFT wrote it" if exact
                else json.dumps(kwargs, sort_keys=True))
        extra = known_failure(name)
        if name in LORA_VARIANTS:
            what, changes = LORA_VARIANTS[name]
            plain = LoraConfig.from_pretrained(case / "adapter")
            for key, value in changes.items():
                setattr(plain, key, value)
            variant = PeftModel.from_pretrained(reread(LlamaForCausalLM, OUT / "lora_base"),
                                                case / "adapter", config=plain)
            effect = max_delta(reference, log_probs(variant))
            extra["feature_effect"] = f"{what}: max |delta| {effect:.3g}"
        manifest.add(name, "lora", model="../lora_base", adapter="adapter",
                     tolerance=F32_TOL, note=note, **extra)


def full_arm_case(manifest):
    """A full-weight ARM with one token more than the base (as the released Tulu-2
    ARM): its logits are cut to the base vocabulary before the log-softmax."""
    name = "arm_larger_vocab"
    case = OUT / name
    arm = build(LlamaForCausalLM, LlamaConfig, small(vocab_size=VOCAB + 1, **rope(1e4)), 50)
    save(arm, case / "arm")
    arm = reread(LlamaForCausalLM, case / "arm").eval()
    with torch.no_grad():
        logits = arm(input_ids=torch.tensor([TOKENS])).logits[0, :, :VOCAB]
    arm_ref = torch.log_softmax(logits, dim=-1).tolist()
    base_ref = log_probs(reread(LlamaForCausalLM, OUT / "lora_base"))
    write_reference(case, [base_ref, arm_ref])
    manifest.add(name, "arm", model="../lora_base", adapter="arm", tolerance=F32_TOL,
                 note=f"full-weight ARM, vocab {VOCAB + 1} cut to the base's {VOCAB}",
                 **known_failure(name))


def refusal_cases(manifest):
    """Files genarm must refuse by name: each written by the library itself."""
    from peft import LoraConfig, get_peft_model

    configs = {
        "refuse_rope_yarn": (
            small(**rope(1e4, {"rope_type": "yarn", "factor": 4.0,
                               "original_max_position_embeddings": 16})),
            "rope_type `yarn`",
        ),
        "refuse_partial_rotary": (small(partial_rotary_factor=0.5, **rope(1e4)),
                                  "partial_rotary_factor"),
        "refuse_quantization_config": (
            small(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True},
                  **rope(1e4)),
            "quantization_config",
        ),
        "refuse_relu": (small(hidden_act="relu", **rope(1e4)), "hidden_act `relu`"),
    }
    for name, (kwargs, needle) in configs.items():
        LlamaConfig(**kwargs).save_pretrained(OUT / name / "model")
        manifest.add(name, "refuse", model="model", expect_error=needle)
    adapters = {
        "refuse_dora": (dict(use_dora=True), "`use_dora` = true"),
        "refuse_modules_to_save": (dict(modules_to_save=["lm_head"]), "`modules_to_save`"),
    }
    for seed, (name, (kwargs, needle)) in enumerate(adapters.items(), start=60):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                            task_type="CAUSAL_LM", **kwargs)
        peft_model = get_peft_model(lora_base(), config)
        randomize(peft_model, seed, only_lora=True)
        save_adapter(peft_model, OUT / name / "adapter", drop_nulls=True)
        manifest.add(name, "refuse", model="../lora_base", adapter="adapter",
                     expect_error=needle)


# --- GGUF: llama.cpp's converter, reference on the weights the file really holds ---

def write_sentencepiece(path):
    """A 96-piece SentencePiece model: the converter needs a tokenizer to write a GGUF."""
    from sentencepiece import sentencepiece_model_pb2 as sp

    proto = sp.ModelProto()
    proto.trainer_spec.model_type = sp.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = VOCAB
    for text, kind in [("<unk>", sp.ModelProto.SentencePiece.UNKNOWN),
                       ("<s>", sp.ModelProto.SentencePiece.CONTROL),
                       ("</s>", sp.ModelProto.SentencePiece.CONTROL)]:
        proto.pieces.add(piece=text, score=0.0, type=kind)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["\u2581" + c for c in letters] + list(letters) + [f"\u2581{c}a" for c in letters]
    for i, text in enumerate(words[: VOCAB - 3]):
        proto.pieces.add(piece=text, score=-float(i), type=sp.ModelProto.SentencePiece.NORMAL)
    path.write_bytes(proto.SerializeToString())


def convert(llama_cpp, model_dir, outfile, outtype):
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model"
        shutil.copytree(model_dir, src)
        write_sentencepiece(src / "tokenizer.model")
        env = dict(os.environ, PYTHONPATH=str(llama_cpp / "gguf-py"))
        subprocess.run(
            [sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(src),
             "--outfile", str(outfile), "--outtype", outtype],
            check=True, env=env, stdout=subprocess.DEVNULL,
        )


GGUF_TO_HF = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def unpermute(w, n_head):
    """Undoes the converter's Q/K row order (pairs interleaved per head)."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def dequantized_state(gguf_path, config):
    """The GGUF's tensors dequantized and renamed back to transformers' names."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(gguf_path))
    state = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] == "rope_freqs":
            continue
        w = dequantize(t.data, t.tensor_type).astype(np.float64)
        w = w.reshape([int(d) for d in reversed(t.shape.tolist())])
        if parts[0] == "blk":
            layer, kind = parts[1], parts[2]
            hf = f"model.layers.{layer}.{GGUF_TO_HF[kind]}.{parts[3]}"
            if kind == "attn_q":
                w = unpermute(w, config.num_attention_heads)
            elif kind == "attn_k":
                w = unpermute(w, config.num_key_value_heads)
        else:
            hf = f"{GGUF_TO_HF[parts[0]]}.{parts[1]}"
        state[hf] = torch.from_numpy(np.ascontiguousarray(w))
    return state


# (HF case converted, llama.cpp --outtype). llama3 RoPE scaling becomes the
# rope_freqs.weight tensor; linear scaling becomes {arch}.rope.scaling.* keys.
GGUF_CONVERSIONS = [
    ("llama2_mha", "f32"),
    ("llama2_mha", "q8_0"),
    ("llama31_rope_llama3", "f16"),
    ("llama31_rope_llama3", "q8_0"),
    ("llama_rope_linear", "f16"),
    ("llama_tied", "q8_0"),
    ("llama_attention_bias", "f16"),
]


def gguf_cases(manifest, llama_cpp):
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    for source, outtype in GGUF_CONVERSIONS:
        model_dir = OUT / source / "model"
        name = f"gguf_{source}_{outtype}"
        case = OUT / name
        case.mkdir(parents=True, exist_ok=True)
        convert(llama_cpp, model_dir, case / "model.gguf", outtype)
        model = reread(LlamaForCausalLM, model_dir)
        exact = log_probs(model)
        state = dequantized_state(case / "model.gguf", model.config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected, unexpected
        assert set(missing) <= {"lm_head.weight"}, missing
        if model.config.tie_word_embeddings:
            model.tie_weights()
        stored = log_probs(model)
        write_reference(case, [stored])
        manifest.add(
            name, "gguf", model="model.gguf", tolerance=F32_TOL,
            note=f"llama.cpp --outtype {outtype} of {source}; reference on the GGUF's "
                 f"dequantized weights (they move log-probs by {max_delta(exact, stored):.2e} "
                 f"from {source}'s own reference)",
            **known_failure(name),
        )


def llama_cpp_commit(llama_cpp):
    head = subprocess.run(["git", "-C", str(llama_cpp), "rev-parse", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode == 0:
        return head.stdout.strip()
    marker = llama_cpp / "COMMIT"
    return marker.read_text().strip() if marker.exists() else "unknown"


def main():
    # PEFT stores target_modules as a set: fix the hash seed so that its order in
    # adapter_config.json, and so the fixtures, are the same on every run.
    if os.environ.get("PYTHONHASHSEED") != "0":
        env = dict(os.environ, PYTHONHASHSEED="0")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp", type=Path, default=None,
                        help="llama.cpp checkout with convert_hf_to_gguf.py and gguf-py/")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    manifest = Manifest()
    hf_cases(manifest)
    lora_cases(manifest)
    full_arm_case(manifest)
    refusal_cases(manifest)
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "numpy": np.__version__,
    }
    if args.llama_cpp is not None:
        gguf_cases(manifest, args.llama_cpp.resolve())
        import gguf
        versions["gguf"] = getattr(gguf, "__version__", "gguf-py of the llama.cpp below")
        versions["llama.cpp"] = llama_cpp_commit(args.llama_cpp)
    doc = {
        "generated_by": "tests/parity/make_fixtures.py",
        "versions": versions,
        "tokens": TOKENS,
        "cases": manifest.cases,
    }
    (OUT / "manifest.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{len(manifest.cases)} cases in {OUT}")


if __name__ == "__main__":
    main()
