"""The torch side of the check: transformers' log-probs, the GenARM rule written plainly
in torch (greedy, one forward per model per token, each with its own KV cache), and the
device's copy bandwidth."""

import statistics
import time

import numpy as np
import torch


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def teacher_forced(model, tokens, vocab):
    """(next-token log-probs at positions 0..n-2, the full log-softmax at the last
    position), as genarm's `logits --json` reports them, in float64 on the host. The
    logits are cut to `vocab` before normalising."""
    device = next(model.parameters()).device
    ids = torch.tensor([tokens], device=device)
    logits = model(input_ids=ids).logits[0, :, :vocab].float()
    lp = torch.log_softmax(logits, dim=-1)
    nxt = lp[torch.arange(len(tokens) - 1, device=device), ids[0, 1:]]
    return nxt.double().cpu().numpy(), lp[-1].double().cpu().numpy()


class GuidedGreedy:
    """GenARM's rule, greedy: argmax over the base vocabulary of
    log_softmax(base) + Σ α_i · log_softmax(arm_i[:vocab]), every model stepping on its
    own KV cache, as the official implementation does."""

    def __init__(self, models, alphas, vocab):
        assert len(models) == len(alphas) + 1, "one alpha per ARM"
        self.models = models
        self.alphas = alphas
        self.vocab = vocab
        self.device = next(models[0].parameters()).device

    def _scores(self, outputs):
        scores = torch.log_softmax(outputs[0].logits[0, -1, : self.vocab].float(), dim=-1)
        for out, alpha in zip(outputs[1:], self.alphas):
            arm = torch.log_softmax(out.logits[0, -1, : self.vocab].float(), dim=-1)
            scores = scores + alpha * arm
        return scores

    def _step(self, ids, caches):
        outputs = []
        for i, model in enumerate(self.models):
            out = model(input_ids=ids, past_key_values=caches[i], use_cache=True)
            caches[i] = out.past_key_values
            outputs.append(out)
        return self._scores(outputs)

    @torch.no_grad()
    def run(self, prompt, n_new, record_gaps=False):
        """The chosen ids (a device tensor), the seconds the decode took after the
        prompt's forward, and, with `record_gaps`, each step's top-1 minus top-2 score
        (how far a pick was from a tie)."""
        caches = [None] * len(self.models)
        ids = torch.tensor([prompt], device=self.device)
        scores = self._step(ids, caches)
        chosen, gaps = [], []
        synchronize(self.device)
        start = time.perf_counter()
        for step in range(n_new):
            if record_gaps:
                top = torch.topk(scores, 2).values
                gaps.append(float(top[0] - top[1]))
            # torch.argmax returns the first maximal index, like genarm's guide::argmax.
            nxt = torch.argmax(scores)
            chosen.append(nxt)
            if step + 1 < n_new:
                scores = self._step(nxt.view(1, 1), caches)
        synchronize(self.device)
        seconds = time.perf_counter() - start
        return torch.stack(chosen), seconds, gaps


def copy_bandwidth(device, n_bytes, repeats=10):
    """Device-to-device copy of a random buffer: bytes read plus bytes written over the
    median time of `repeats` copies after three warm-ups (the ceiling for decode)."""
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - start)
    if not torch.equal(dst, src):
        raise RuntimeError("the copied buffer differs from its source")
    median = statistics.median(times)
    return {
        "bytes_moved": 2 * src.numel() * 4,
        "median_seconds": median,
        "gb_per_s": 2 * src.numel() * 4 / median / 1e9,
    }


def abs_errors(got, want):
    return np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64))
