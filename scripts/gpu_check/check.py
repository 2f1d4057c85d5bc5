#!/usr/bin/env python3
"""genarm's GPU check: parity and speed of the CUDA and WebGPU engines on one GPU.

Every phase is timed and guarded: a failure is recorded in the JSON and the rest still
runs; a phase whose estimate no longer fits the time budget is recorded as skipped.
The JSON (and the Markdown table made from it) is rewritten after every phase, so a run
cut short still returns what it measured. `--dry-run` does the same with tiny shapes on
the CPU (torch on the CPU, genarm's `cpu` backend in place of `cuda`, WebGPU on
whatever Vulkan adapter there is: lavapipe without a GPU).

    check.py --genarm BIN --out DIR --work-dir DIR [--dry-run] [--phases a,b] [--budget-s S]
"""

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback

import numpy as np
import torch

import models
import reference
import report
from genarm_cli import Genarm

# GenARM weights in every guided run: the LoRA ARM at 1, the second ARM at 0.5.
ALPHAS = (1.0, 0.5)


class Settings:
    """What differs between the GPU run and the dry run."""

    def __init__(self, dry_run):
        self.dry = dry_run
        self.mode = "dry" if dry_run else "gpu"
        self.shapes = models.SHAPES[self.mode]
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.cuda_backend = "cpu" if dry_run else "cuda"
        self.copy_bytes = (64 if dry_run else 4096) << 20
        self.shard_bytes = "64KB" if dry_run else "4GB"
        self.parity_tokens = 24 if dry_run else 32
        self.greedy_tokens = 64
        # decode tokens, timed runs and prompt length of every speed measurement
        self.bench_tokens = 8 if dry_run else 64
        self.bench_runs = 2 if dry_run else 3
        self.webgpu_bench_tokens = 8 if dry_run else 128
        self.webgpu_bench_runs = 2 if dry_run else 5
        self.prompt_len = 16


# Every HF checkpoint the check makes: name → (shape in models.SHAPES, dtype, seed, and
# for a PEFT LoRA adapter the checkpoint it is made on, else None).
HF_MODELS = {
    "small-f32": ("small", torch.float32, 1, None),
    "small-f32-lora": (None, torch.float32, 2, "small-f32"),
    "small-arm-f32": ("small_arm", torch.float32, 3, None),
    "llama7b-bf16": ("llama7b", torch.bfloat16, 4, None),
    "llama7b-lora": (None, torch.bfloat16, 5, "llama7b-bf16"),
    "arm1b-bf16": ("arm1b", torch.bfloat16, 6, None),
}

# Each phase: (name, seconds it should take on the H200, function name). The seconds are
# estimates from sizes (a 7B bf16 checkpoint is 13.5 GB to write, load and read per
# token), not yet timed there: the first GPU run's per-phase times should replace them.
# The order puts the cheap checks first, then everything that needs the 7B models.
PHASES = [
    ("environment", 5, "environment"),
    ("copy_bandwidth", 10, "copy_bandwidth"),
    ("parity_small_f32", 20, "parity_small_f32"),
    ("greedy_guided_f32", 30, "greedy_guided_f32"),
    ("webgpu_parity_q4_1", 40, "webgpu_parity"),
    ("speed_webgpu_q4_1", 30, "speed_webgpu"),
    ("make_7b_models", 60, "make_7b_models"),
    ("parity_7b_bf16", 60, "parity_7b_bf16"),
    ("speed_genarm_cuda", 120, "speed_genarm_cuda"),
    ("speed_transformers", 90, "speed_transformers"),
]


class Check:
    def __init__(self, args):
        self.s = Settings(args.dry_run)
        self.work = os.path.abspath(args.work_dir)
        self.out = os.path.abspath(args.out)
        self.budget = args.budget_s
        self.started = time.monotonic()
        self.log_file = open(os.path.join(self.out, "gpu_check.log"), "a", buffering=1)
        self.genarm = Genarm(os.path.abspath(args.genarm), self.log)
        self.made = {}
        os.makedirs(self.work, exist_ok=True)
        self.result = {
            "mode": self.s.mode,
            "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "budget_s": self.budget,
            "shapes": {k: models.describe(v) for k, v in self.s.shapes.items()},
            "phases": {},
        }
        if not self.s.dry:
            # f32 parity means f32: no TF32 in transformers' matmuls.
            torch.set_float32_matmul_precision("highest")

    # ---- bookkeeping ----

    def log(self, line):
        stamp = f"[{self.elapsed():6.1f}s]"
        print(f"{stamp} {line}", flush=True)
        self.log_file.write(f"{stamp} {line}\n")

    def elapsed(self):
        return time.monotonic() - self.started

    def run(self, wanted):
        for name, estimate, method in PHASES:
            if wanted and name not in wanted:
                continue
            left = self.budget - self.elapsed()
            if left < estimate:
                self.record(
                    name,
                    {
                        "status": "skipped",
                        "reason": f"{left:.0f} s of the budget left, the phase needs ~{estimate} s",
                    },
                )
                continue
            self.log(f"== {name}")
            # A run killed by its time limit leaves this phase marked as interrupted.
            self.record(
                name, {"status": "interrupted", "reason": "still running when the run ended"}, announce=False
            )
            start = time.monotonic()
            try:
                details = getattr(self, method)()
            except Exception as e:  # a phase's failure is a result, not the end of the run
                details = {
                    "status": "error",
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc()[-3000:],
                }
            details["seconds"] = round(time.monotonic() - start, 1)
            self.record(name, details)
            self.free_memory()
        self.result["goals"] = report.goals(self.result)
        self.result["total_seconds"] = round(self.elapsed(), 1)
        self.write()
        return self.result

    def record(self, name, details, announce=True):
        self.result["phases"][name] = details
        if announce:
            self.log(
                f"-- {name}: {details.get('status')} ({details.get('seconds', 0)} s)"
                + (f" {details['error']}" if "error" in details else "")
                + (f" {details['reason']}" if "reason" in details else "")
            )
        self.write()

    def write(self):
        path = os.path.join(self.out, "gpu_check.json")
        with open(path + ".part", "w") as f:
            json.dump(self.result, f, indent=1)
        os.replace(path + ".part", path)
        with open(os.path.join(self.out, "gpu_check.md"), "w") as f:
            f.write(report.markdown(self.result))

    def free_memory(self):
        gc.collect()
        if self.s.device.type == "cuda":
            torch.cuda.empty_cache()

    def path(self, name):
        return os.path.join(self.work, name)

    def make_once(self, key, fn):
        """Makes a model once per run; a directory left complete by an earlier run on
        the same machine (a `.done` marker) is reused."""
        if key in self.made:
            return self.made[key]
        marker = self.path(key + ".done")
        if os.path.exists(marker):
            self.log(f"reusing {self.path(key)}")
        else:
            start = time.monotonic()
            fn(self.path(key))
            with open(marker, "w") as f:
                f.write("ok\n")
            self.log(f"made {self.path(key)} in {time.monotonic() - start:.1f} s")
        self.made[key] = self.path(key)
        return self.made[key]

    def load_hf(self, path, dtype):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=self.s.device.type).eval()

    def tokens(self, n, vocab, seed):
        return [int(t) for t in np.random.default_rng(seed).integers(0, vocab, n)]

    # ---- models ----

    def model(self, key):
        """The HF checkpoint or PEFT adapter HF_MODELS names `key`, made once."""
        shape, dtype, seed, lora_base = HF_MODELS[key]
        if lora_base is None:

            def make(d):
                m = models.random_hf_model(self.s.shapes[shape], dtype, self.s.device, seed=seed)
                models.save_hf(m, d, self.s.shard_bytes)

        else:
            base = self.model(lora_base)

            def make(d):
                models.add_random_lora(self.load_hf(base, dtype), base, seed=seed).save_pretrained(d)

        return self.make_once(key, make)

    def arm7b(self):
        base = self.model("llama7b-bf16")
        return self.make_once("arm7b-bf16", lambda d: models.link_copy(base, d))

    def smollm_gguf(self):
        def make(d):
            os.makedirs(d, exist_ok=True)
            models.write_smollm_gguf(os.path.join(d, "model.gguf"), self.s.shapes["smollm"], seed=7)
            for i in (1, 2):
                self.genarm.init_lora(os.path.join(d, "model.gguf"), os.path.join(d, f"lora-{i}"), seed=i)

        d = self.make_once("smollm-q4_1", make)
        return os.path.join(d, "model.gguf"), [os.path.join(d, f"lora-{i}") for i in (1, 2)]

    # ---- phases ----

    def environment(self):
        env = {
            "status": "done",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "genarm": self.genarm.version(),
            "genarm_build": os.environ.get("GENARM_BUILD", "unknown"),  # cuda or plain (run.sh)
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        }
        import peft
        import transformers

        env["transformers"] = transformers.__version__
        env["peft"] = peft.__version__
        if self.s.device.type == "cuda":
            p = torch.cuda.get_device_properties(0)
            env["gpu"] = p.name
            env["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
            env["multiprocessors"] = p.multi_processor_count
            env["torch_cuda"] = torch.version.cuda
        if shutil.which("nvidia-smi"):
            q = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,clocks.sm,clocks.mem",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        lib = subprocess.run(
            ["sh", "-c", "ldconfig -p | grep 'libvulkan.so.1' | head -1"], capture_output=True, text=True
        )
        env["libvulkan"] = lib.stdout.strip() or None
        env["vk_driver_files"] = os.environ.get("VK_DRIVER_FILES")
        return env

    def copy_bandwidth(self):
        bw = reference.copy_bandwidth(self.s.device, self.s.copy_bytes)
        bw["status"] = "done"
        bw["device"] = str(self.s.device)
        return bw

    def parity_small_f32(self):
        shape = self.s.shapes["small"]
        path = self.model("small-f32")
        tokens = self.tokens(self.s.parity_tokens, shape.vocab, seed=11)
        model = self.load_hf(path, torch.float32)
        want_next, want_last = reference.teacher_forced(model, tokens, shape.vocab)
        del model
        self.free_memory()
        got = self.genarm.logits(path, tokens, self.s.cuda_backend)
        err_next = reference.abs_errors(got["next_token_logprobs"], want_next).max()
        err_last = reference.abs_errors(got["last_logprobs"], want_last).max()
        worst = float(max(err_next, err_last))
        bound = 1e-4
        return {
            "status": "pass" if worst <= bound else "fail",
            "backend": got.get("backend"),
            "max_abs_next_token_logprob": float(err_next),
            "max_abs_last_logprobs": float(err_last),
            "bound": bound,
            "tokens": len(tokens),
        }

    def greedy_guided_f32(self):
        vocab = self.s.shapes["small"].vocab
        base, lora, arm = self.model("small-f32"), self.model("small-f32-lora"), self.model("small-arm-f32")
        prompt = self.tokens(8, vocab, seed=12)
        from peft import PeftModel

        torch_models = [
            self.load_hf(base, torch.float32),
            PeftModel.from_pretrained(self.load_hf(base, torch.float32), lora).eval(),
            self.load_hf(arm, torch.float32),
        ]
        rule = reference.GuidedGreedy(torch_models, list(ALPHAS), vocab)
        want, _, gaps = rule.run(prompt, self.s.greedy_tokens, record_gaps=True)
        want = want.tolist()
        del torch_models, rule
        self.free_memory()
        got = self.genarm.greedy(
            base,
            prompt,
            self.s.greedy_tokens,
            self.s.cuda_backend,
            arms=[(lora, ALPHAS[0]), (arm, ALPHAS[1])],
        )["tokens"]
        first_diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if first_diff is None and len(got) != len(want):
            first_diff = min(len(got), len(want))
        out = {
            "status": "pass" if first_diff is None else "fail",
            "tokens": len(want),
            "alphas": list(ALPHAS),
            "smallest_top2_gap": min(gaps),
            "genarm_tokens": got,
            "torch_tokens": want,
        }
        if first_diff is not None:
            out["first_difference"] = first_diff
            if first_diff < len(gaps):
                out["top2_gap_there"] = gaps[first_diff]
        return out

    def webgpu_parity(self):
        model, loras = self.smollm_gguf()
        vocab = self.s.shapes["smollm"].vocab
        tokens = self.tokens(self.s.parity_tokens, vocab, seed=13)
        arms = [(loras[0], 1.0)]
        gpu = self.genarm.logits(model, tokens, "webgpu", arms)
        cpu = self.genarm.logits(model, tokens, "cpu", arms)
        # As in tests/gpu_engine.rs: both decode the same Q4_1 blocks with f32
        # activations and sum in another order; tokens below log p = -20 cannot matter.
        worst = 0.0
        for g, c in [(gpu, cpu)] + list(zip(gpu["arms"], cpu["arms"])):
            worst = max(
                worst, float(reference.abs_errors(g["next_token_logprobs"], c["next_token_logprobs"]).max())
            )
            keep = np.asarray(c["last_logprobs"]) > -20
            worst = max(
                worst,
                float(
                    reference.abs_errors(
                        np.asarray(g["last_logprobs"])[keep], np.asarray(c["last_logprobs"])[keep]
                    ).max()
                ),
            )
        bound = 5e-3
        prompt = tokens[:8]
        both = [(loras[0], ALPHAS[0]), (loras[1], ALPHAS[1])]
        g_ids = self.genarm.greedy(model, prompt, self.s.greedy_tokens, "webgpu", both)["tokens"]
        c_ids = self.genarm.greedy(model, prompt, self.s.greedy_tokens, "cpu", both)["tokens"]
        same = g_ids == c_ids
        return {
            "status": "pass" if worst <= bound and same else "fail",
            "adapter": gpu.get("backend"),
            "max_abs_logprob_vs_cpu": worst,
            "bound": bound,
            "greedy_tokens_equal": same,
            "greedy_tokens": len(c_ids),
            "first_difference": (
                None
                if same
                else next(
                    (i for i, (a, b) in enumerate(zip(g_ids, c_ids)) if a != b), min(len(g_ids), len(c_ids))
                )
            ),
        }

    def speed_webgpu(self):
        model, loras = self.smollm_gguf()
        b = self.genarm.bench(
            model, "webgpu", loras, self.s.webgpu_bench_tokens, self.s.webgpu_bench_runs, self.s.prompt_len
        )
        bytes_per_token = b.get("weight_bytes_per_token")
        rows = []
        for r in b["results"]:
            rows.append(
                {
                    "config": r["config"],
                    "tokens_per_second": r["tokens_per_second"],
                    "time_per_token_vs_base": r["time_per_token_vs_base"],
                    "dispatches_per_token": r.get("dispatches_per_token"),
                    "weight_gb_per_s": (
                        bytes_per_token * r["tokens_per_second"] / 1e9 if bytes_per_token else None
                    ),
                }
            )
        return {
            "status": "done",
            "adapter": b.get("backend"),
            "weight_bytes_per_token": bytes_per_token,
            "tokens": self.s.webgpu_bench_tokens,
            "runs": self.s.webgpu_bench_runs,
            "results": rows,
        }

    def make_7b_models(self):
        made = {
            "base": self.model("llama7b-bf16"),
            "lora": self.model("llama7b-lora"),
            "arm1b": self.model("arm1b-bf16"),
            "arm7b": self.arm7b(),
        }
        return {"status": "done", "paths": made, "bytes": {k: models.dir_bytes(v) for k, v in made.items()}}

    def parity_7b_bf16(self):
        """bf16 weights against a float32 evaluation of the same weights: genarm's error
        must be no worse than transformers' own bf16 error (rule in report.BF16_RULE)."""
        from peft import PeftModel

        shape = self.s.shapes["llama7b"]
        base, lora = self.model("llama7b-bf16"), self.model("llama7b-lora")
        tokens = self.tokens(self.s.parity_tokens, shape.vocab, seed=14)
        runs = {}
        for name, dtype in (("transformers_bf16", torch.bfloat16), ("transformers_f32", torch.float32)):
            model = self.load_hf(base, dtype)
            runs[name] = {"base": reference.teacher_forced(model, tokens, shape.vocab)}
            model = PeftModel.from_pretrained(model, lora).eval()
            runs[name]["lora"] = reference.teacher_forced(model, tokens, shape.vocab)
            del model
            self.free_memory()
        got = self.genarm.logits(base, tokens, self.s.cuda_backend, arms=[(lora, 1.0)])
        runs["genarm"] = {
            "base": (got["next_token_logprobs"], got["last_logprobs"]),
            "lora": (got["arms"][0]["next_token_logprobs"], got["arms"][0]["last_logprobs"]),
        }
        out = {"backend": got.get("backend"), "tokens": len(tokens), "rule": report.BF16_RULE}
        for which in ("base", "lora"):
            out[which] = report.bf16_verdict(
                runs["genarm"][which], runs["transformers_bf16"][which], runs["transformers_f32"][which]
            )
        out["status"] = "pass" if all(out[w]["pass"] for w in ("base", "lora")) else "fail"
        return out

    def speed_genarm_cuda(self):
        """genarm bench times the base and base + the given ARMs as prefixes of its ARM
        list, so each ARM kind gets its own call (see README: a `bench` that timed each
        ARM alone against one base would load the base once)."""
        base = self.model("llama7b-bf16")
        arms = {"lora": self.model("llama7b-lora"), "arm1b": self.model("arm1b-bf16"), "arm7b": self.arm7b()}
        rows, base_speeds = {}, []
        for key, arm in arms.items():
            b = self.genarm.bench(
                base, self.s.cuda_backend, [arm], self.s.bench_tokens, self.s.bench_runs, self.s.prompt_len
            )
            base_row, arm_row = b["results"]
            base_speeds.append(base_row["tokens_per_second"])
            rows[key] = {
                "tokens_per_second": arm_row["tokens_per_second"],
                "time_per_token_vs_base": arm_row["time_per_token_vs_base"],
                "base_tokens_per_second_same_call": base_row["tokens_per_second"],
                "runs": arm_row["runs"],
                "backend": b.get("backend"),
            }
        rows["base"] = {
            "tokens_per_second": float(np.median(base_speeds)),
            "runs": base_speeds,
            "note": "median of the base-only medians of the three calls",
        }
        shape = self.s.shapes["llama7b"]
        return {
            "status": "done",
            "tokens": self.s.bench_tokens,
            "runs": self.s.bench_runs,
            "prompt_len": self.s.prompt_len,
            "weight_bytes_per_token": shape.weight_bytes_per_token(2),
            "results": rows,
        }

    def speed_transformers(self):
        """The official GenARM rule in transformers: one forward per model per token,
        each with its own KV cache; a LoRA ARM is a second copy of the base with the
        PEFT adapter (as the official code loads it). Round-robin, medians."""
        from peft import PeftModel

        vocab = self.s.shapes["llama7b"].vocab
        base_dir = self.model("llama7b-bf16")
        base = self.load_hf(base_dir, torch.bfloat16)
        arms = {
            "lora": PeftModel.from_pretrained(
                self.load_hf(base_dir, torch.bfloat16), self.model("llama7b-lora")
            ).eval(),
            "arm1b": self.load_hf(self.model("arm1b-bf16"), torch.bfloat16),
            "arm7b": self.load_hf(self.arm7b(), torch.bfloat16),
        }
        configs = {"base": reference.GuidedGreedy([base], [], vocab)}
        for key, arm in arms.items():
            configs[key] = reference.GuidedGreedy([base, arm], [1.0], vocab)
        prompt = [(i * 7 + 100) % vocab for i in range(self.s.prompt_len)]  # genarm bench's prompt
        speeds = {k: [] for k in configs}
        for round_ in range(self.s.bench_runs + 1):  # round 0 warms up
            for key, rule in configs.items():
                _, seconds, _ = rule.run(prompt, self.s.bench_tokens)
                if round_ > 0:
                    speeds[key].append((self.s.bench_tokens - 1) / seconds)
        base_speed = float(np.median(speeds["base"]))
        rows = {
            k: {
                "tokens_per_second": float(np.median(v)),
                "runs": v,
                "time_per_token_vs_base": base_speed / float(np.median(v)),
            }
            for k, v in speeds.items()
        }
        del base, arms, configs
        return {
            "status": "done",
            "dtype": "bfloat16",
            "tokens": self.s.bench_tokens,
            "runs": self.s.bench_runs,
            "prompt_len": self.s.prompt_len,
            "results": rows,
        }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--genarm", required=True, help="the genarm binary")
    p.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md, gpu_check.log")
    p.add_argument("--work-dir", required=True, help="folder for the models the check makes")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    p.add_argument(
        "--phases",
        default="",
        help="comma-separated phase names (default: all): " + ", ".join(name for name, _, _ in PHASES),
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=440.0,
        help="skip a phase whose estimate no longer fits (default 440)",
    )
    args = p.parse_args()
    wanted = [w for w in args.phases.split(",") if w]
    unknown = set(wanted) - {name for name, _, _ in PHASES}
    if unknown:
        p.error(f"unknown phases: {', '.join(sorted(unknown))}")
    os.makedirs(args.out, exist_ok=True)
    # The output's tail is what a device run returns: no progress bars in it.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    result = Check(args).run(wanted)
    print(report.markdown(result))

    def named(*statuses):
        return [n for n, ph in result["phases"].items() if ph.get("status") in statuses]

    bad, skipped = named("fail", "error"), named("skipped")
    print(
        f"phases: {len(result['phases'])}; failed or errored: {', '.join(bad) or 'none'}; "
        f"skipped: {', '.join(skipped) or 'none'}"
    )
    # 1: something is wrong; 2: all that ran is fine, but not everything ran.
    return 1 if bad else 2 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
