"""Runs the genarm binary and reads its `--json` output."""

import json
import subprocess
import time


class GenarmError(RuntimeError):
    """A genarm command that failed, timed out or printed no JSON; the message holds
    the command line and the end of its stderr."""


class Genarm:
    def __init__(self, binary, log):
        self.binary = binary
        self.log = log

    def version(self):
        return self._run(["--version"], timeout=30).strip()

    def _run(self, args, timeout):
        cmd = [self.binary, *map(str, args)]
        shown = " ".join(cmd)
        self.log(f"$ {shown}")
        start = time.monotonic()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise GenarmError(f"timed out after {timeout:.0f} s: {shown}") from e
        self.log(f"  ({time.monotonic() - start:.1f} s, exit {done.returncode})")
        if done.returncode != 0:
            tail = done.stderr.strip()[-1500:]
            raise GenarmError(f"exit {done.returncode}: {shown}\n{tail}")
        return done.stdout

    def json(self, args, timeout):
        out = self._run([*args, "--json"], timeout)
        lines = [line for line in out.splitlines() if line.strip()]
        if not lines:
            raise GenarmError(f"no JSON printed by: {self.binary} {' '.join(map(str, args))}")
        return json.loads(lines[-1])

    def logits(self, model, tokens, backend, arms=(), timeout=600):
        args = ["logits", "--model", model, "--backend", backend, "--tokens", ",".join(map(str, tokens))]
        for path, alpha in arms:
            args += ["--arm", f"{path}:{alpha}"]
        return self.json(args, timeout)

    def greedy(self, model, prompt, n_new, backend, arms=(), timeout=600):
        args = [
            "generate",
            "--model",
            model,
            "--backend",
            backend,
            "--greedy",
            "--ignore-eos",
            "--max-new-tokens",
            n_new,
            "--prompt-tokens",
            ",".join(map(str, prompt)),
        ]
        for path, alpha in arms:
            args += ["--arm", f"{path}:{alpha}"]
        return self.json(args, timeout)

    def bench(self, model, backend, arms, tokens, runs, prompt_len, timeout=600):
        args = [
            "bench",
            "--model",
            model,
            "--backend",
            backend,
            "--tokens",
            tokens,
            "--runs",
            runs,
            "--prompt-len",
            prompt_len,
        ]
        for path in arms:
            args += ["--arm", f"{path}:1"]
        return self.json(args, timeout)

    def init_lora(self, model, out, seed, timeout=120):
        self._run(["init-lora", "--model", model, "--out", out, "--seed", seed, "--overwrite"], timeout)
