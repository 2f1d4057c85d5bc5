#!/usr/bin/env python3
"""The check's verdicts and its Markdown table, from the result JSON alone (so a table
can be made again from a fetched gpu_check.json: `report.py gpu_check.json`)."""

import json
import sys

import numpy as np

BF16_RULE = (
    "per position p, |genarm - f32| <= 2 * max(|transformers_bf16 - f32| at p, median over "
    "positions of |transformers_bf16 - f32|) + 1e-5; at the last position, over tokens with "
    "f32 log p > -20, genarm's largest error <= 2 * transformers' largest + 1e-5"
)


def bf16_verdict(genarm, hf_bf16, f32):
    """Each argument is (next-token log-probs, last-position log-softmax)."""
    g_next, t_next, f_next = (np.asarray(x[0], dtype=np.float64) for x in (genarm, hf_bf16, f32))
    err_g, err_t = np.abs(g_next - f_next), np.abs(t_next - f_next)
    floor = float(np.median(err_t)) if len(err_t) else 0.0
    bound = 2 * np.maximum(err_t, floor) + 1e-5
    within = err_g <= bound
    g_last, t_last, f_last = (np.asarray(x[1], dtype=np.float64) for x in (genarm, hf_bf16, f32))
    keep = f_last > -20
    last_g = float(np.abs(g_last - f_last)[keep].max())
    last_t = float(np.abs(t_last - f_last)[keep].max())
    last_ok = last_g <= 2 * last_t + 1e-5
    return {
        "pass": bool(within.all() and last_ok),
        "positions": len(err_g),
        "positions_within_bound": int(within.sum()),
        "positions_genarm_no_worse": int((err_g <= err_t).sum()),
        "genarm_max_abs": float(err_g.max()),
        "genarm_mean_abs": float(err_g.mean()),
        "transformers_bf16_max_abs": float(err_t.max()),
        "transformers_bf16_mean_abs": float(err_t.mean()),
        "genarm_abs_per_position": [float(f"{x:.3g}") for x in err_g],
        "transformers_bf16_abs_per_position": [float(f"{x:.3g}") for x in err_t],
        "last_position_genarm_max_abs": last_g,
        "last_position_transformers_bf16_max_abs": last_t,
    }


def _phase(result, name):
    ph = result.get("phases", {}).get(name, {})
    return ph if ph.get("status") in ("done", "pass", "fail") else None


def _row(phase, key):
    return (phase or {}).get("results", {}).get(key)


def goals(result):
    """The issue's goals, each with what was measured (None where the phase did not
    run) and whether it was met."""
    out = []

    def goal(text, measured, met, unit=""):
        out.append(
            {"goal": text, "measured": measured, "unit": unit, "met": None if measured is None else bool(met)}
        )

    bw = _phase(result, "copy_bandwidth")
    cuda = _phase(result, "speed_genarm_cuda")
    hf = _phase(result, "speed_transformers")
    base = _row(cuda, "base")
    fraction = None
    if bw and base:
        fraction = cuda["weight_bytes_per_token"] * base["tokens_per_second"] / 1e9 / bw["gb_per_s"]
    goal(
        "CUDA 7B bf16 base-only decode >= 40% of the measured copy bandwidth",
        fraction,
        fraction is not None and fraction >= 0.40,
        "of copy bandwidth",
    )
    for key, label in (("lora", "a LoRA ARM"), ("arm1b", "a 1B ARM"), ("arm7b", "a 7B ARM")):
        g, t = _row(cuda, key), _row(hf, key)
        ratio = g["tokens_per_second"] / t["tokens_per_second"] if g and t else None
        goal(f">= 3x transformers' tokens/s with {label}", ratio, ratio is not None and ratio >= 3, "x")
    for key, label, limit in (("lora", "+ 1 LoRA ARM", 1.15), ("arm1b", "+ a 1B ARM", 1.25)):
        r = _row(cuda, key)
        v = r["time_per_token_vs_base"] if r else None
        goal(f"CUDA {label} <= {limit}x the base's time per token", v, v is not None and v <= limit, "x")
    web = _phase(result, "speed_webgpu_q4_1")
    rows = (web or {}).get("results", [])
    v = rows[0]["tokens_per_second"] if rows else None
    goal("WebGPU base-only >= 400 tokens/s on the 135M shape", v, v is not None and v >= 400, "tokens/s")
    for i, limit in ((1, 1.2), (2, 1.4)):
        v = rows[i]["time_per_token_vs_base"] if len(rows) > i else None
        goal(
            f"WebGPU + {i} LoRA ARM{'s' if i > 1 else ''} <= {limit}x the base's time per token",
            v,
            v is not None and v <= limit,
            "x",
        )
    return out


def _num(x, digits=3):
    if x is None:
        return "—"
    if isinstance(x, float) and (abs(x) < 1e-3 or abs(x) >= 1e5) and x != 0:
        return f"{x:.2e}"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _verdict(ph):
    if ph is None:
        return "not run"
    return ph.get("status", "?")


def markdown(result):
    ph = result.get("phases", {})
    env = ph.get("environment", {})
    lines = []
    dry = result.get("mode") == "dry"
    lines.append(
        "# genarm GPU check" + (" — DRY RUN (tiny shapes on the CPU; not GPU numbers)" if dry else "")
    )
    lines.append("")
    lines.append(
        f"Started {result.get('started_utc')}; GPU: {env.get('gpu', 'none')}"
        f" ({env.get('nvidia_smi', 'no nvidia-smi')}); torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}, peft {env.get('peft')}; {env.get('genarm')} "
        f"({env.get('genarm_build', '?')} build)."
    )
    bw = ph.get("copy_bandwidth", {})
    if "gb_per_s" in bw:
        lines.append(
            f"Copy bandwidth ({bw['device']}, read + write, median of 10): " f"**{bw['gb_per_s']:.0f} GB/s**."
        )
    lines += ["", "## Parity", "", "| check | measured | bound | result |", "|---|---|---|---|"]
    p = ph.get("parity_small_f32", {})
    lines.append(
        f"| `logits --backend {p.get('backend', 'cuda')}`, small f32 model vs transformers f32 | "
        f"max abs Δ log p {_num(max(p.get('max_abs_next_token_logprob', 0), p.get('max_abs_last_logprobs', 0)) if 'bound' in p else None)} | "
        f"≤ {_num(p.get('bound'))} | {_verdict(p or None)} |"
    )
    p7 = ph.get("parity_7b_bf16", {})
    for which, label in (("base", "7B-shaped bf16"), ("lora", "7B-shaped bf16 + PEFT LoRA ARM")):
        v = p7.get(which)
        if v:
            measured = (
                f"genarm max {_num(v['genarm_max_abs'])} / transformers bf16 max "
                f"{_num(v['transformers_bf16_max_abs'])}; {v['positions_within_bound']}/"
                f"{v['positions']} positions within bound, genarm ≤ transformers at "
                f"{v['positions_genarm_no_worse']}; last position {_num(v['last_position_genarm_max_abs'])}"
                f" / {_num(v['last_position_transformers_bf16_max_abs'])}"
            )
            verdict = "pass" if v["pass"] else "fail"
        else:
            measured, verdict = "—", _verdict(p7 or None)
        lines.append(
            f"| {label} vs f32 evaluation of the same weights | {measured} | "
            f"no worse than transformers' bf16 (rule in JSON) | {verdict} |"
        )
    g = ph.get("greedy_guided_f32", {})
    if "tokens" in g:
        same = "equal" if g.get("status") == "pass" else f"differ from token {g.get('first_difference')}"
        measured = f"{g['tokens']} tokens {same} (smallest top-2 gap {_num(g.get('smallest_top2_gap'))})"
    else:
        measured = "—"
    lines.append(
        f"| GenARM greedy, base + LoRA ARM + smaller ARM (α {g.get('alphas', list((1.0, 0.5)))}), "
        f"f32, vs plain torch rule | {measured} | equal | {_verdict(g or None)} |"
    )
    w = ph.get("webgpu_parity_q4_1", {})
    measured = (
        (
            f"max abs Δ log p {_num(w['max_abs_logprob_vs_cpu'])}; greedy {w['greedy_tokens']} tokens "
            f"{'equal' if w['greedy_tokens_equal'] else 'differ'}"
        )
        if "bound" in w
        else "—"
    )
    lines.append(
        f"| WebGPU ({w.get('adapter', 'Vulkan')}) vs `--backend cpu`, Q4_1 135M shape + LoRA ARMs | "
        f"{measured} | ≤ {_num(w.get('bound', 5e-3))}, equal | {_verdict(w or None)} |"
    )

    cuda, hf = ph.get("speed_genarm_cuda", {}), ph.get("speed_transformers", {})
    lines += [
        "",
        f"## Decode speed, 7B-shaped bf16 (tokens/s, median of {cuda.get('runs', hf.get('runs', '?'))} "
        f"round-robin runs of {cuda.get('tokens', hf.get('tokens', '?'))} tokens)",
        "",
        "| configuration | genarm CUDA | × base time | transformers, GenARM rule | × base time | genarm / transformers |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in (
        ("base", "base only"),
        ("lora", "+ 1 LoRA ARM"),
        ("arm1b", "+ 1B own-weight ARM"),
        ("arm7b", "+ 7B own-weight ARM"),
    ):
        a, b = _row(cuda, key), _row(hf, key)
        ratio = a["tokens_per_second"] / b["tokens_per_second"] if a and b else None
        lines.append(
            f"| {label} | {_num(a and a['tokens_per_second'])} | "
            f"{_num(a and a.get('time_per_token_vs_base', 1.0))} | {_num(b and b['tokens_per_second'])} | "
            f"{_num(b and b['time_per_token_vs_base'])} | {_num(ratio)} |"
        )
    if "weight_bytes_per_token" in cuda and _row(cuda, "base") and "gb_per_s" in bw:
        gbs = cuda["weight_bytes_per_token"] * cuda["results"]["base"]["tokens_per_second"] / 1e9
        lines.append("")
        lines.append(
            f"Base-only weight reads: {cuda['weight_bytes_per_token'] / 1e9:.2f} GB per token → "
            f"{gbs:.0f} GB/s, {100 * gbs / bw['gb_per_s']:.0f}% of the copy bandwidth."
        )

    web = ph.get("speed_webgpu_q4_1", {})
    lines += [
        "",
        f"## WebGPU engine, Q4_1 135M shape ({web.get('adapter', '—')}; median of "
        f"{web.get('runs', '?')} runs of {web.get('tokens', '?')} tokens)",
        "",
        "| configuration | tokens/s | × base time | dispatches/token | weight GB/s | of copy bandwidth |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in web.get("results", []):
        share = (
            r["weight_gb_per_s"] / bw["gb_per_s"] if r.get("weight_gb_per_s") and "gb_per_s" in bw else None
        )
        lines.append(
            f"| {r['config']} | {_num(r['tokens_per_second'])} | {_num(r['time_per_token_vs_base'])} | "
            f"{_num(r['dispatches_per_token'])} | {_num(r['weight_gb_per_s'])} | "
            f"{'—' if share is None else f'{100 * share:.1f}%'} |"
        )

    lines += ["", "## Goals", "", "| goal | measured | met |", "|---|---:|---|"]
    for gl in result.get("goals", []):
        m = gl["measured"]
        shown = (
            "—"
            if m is None
            else (
                f"{100 * m:.0f}%"
                if gl["unit"] == "of copy bandwidth"
                else f"{_num(m)}{'×' if gl['unit'] == 'x' else ''}"
            )
        )
        met = {True: "yes", False: "no", None: "not measured"}[gl["met"]]
        if dry and gl["met"] is not None:
            met = f"({met}: dry run, not a GPU measurement)"
        lines.append(f"| {gl['goal']} | {shown} | {met} |")

    lines += ["", "## Phases", "", "| phase | status | seconds | note |", "|---|---|---:|---|"]
    for name, p in ph.items():
        note = p.get("error") or p.get("reason") or ""
        note = note.replace("|", "\\|").replace("\n", " ")[:300]
        lines.append(f"| {name} | {p.get('status')} | {p.get('seconds', '')} | {note} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: report.py gpu_check.json")
    with open(sys.argv[1]) as f:
        print(markdown(json.load(f)))
