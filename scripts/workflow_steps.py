#!/usr/bin/env python3
"""Runs a GitHub Actions job's `run` steps here, exactly as the workflow writes them.

CI uses it so that the Pages workflow's build cannot drift from what is tested: every
`run:` of the job runs in order with bash (`set -euo pipefail`) and the step's `env:`;
`uses:` steps (checkout, upload, deploy) are GitHub's and are listed as skipped. An
expression `${{ ... }}` in an env value becomes empty, as an unset repository variable
would. The parser reads only the subset of YAML the workflows here use (block maps and
lists, single-line scalars) and refuses anything else rather than guess.

    scripts/workflow_steps.py .github/workflows/pages.yml build
"""

import os
import re
import subprocess
import sys


def job_steps(lines, job):
    """The steps of `job` as dicts of name/run/uses/env."""
    start = None
    for i, line in enumerate(lines):
        if re.fullmatch(rf"  {re.escape(job)}:\s*", line):
            start = i
            break
    if start is None:
        sys.exit(f"no job `{job}` in the workflow")
    steps, step, in_steps, in_env = [], None, False, False
    for line in lines[start + 1:]:
        if line.strip() == "" or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= 2:
            break  # the next job
        text = line.strip()
        if indent == 4:
            in_steps = text == "steps:"
            continue
        if not in_steps:
            continue
        if indent == 6 and text.startswith("- "):
            step = {"env": {}}
            steps.append(step)
            text = text[2:]
            indent = 8
            in_env = False
        if step is None:
            sys.exit(f"unexpected line in steps: {line!r}")
        if indent == 8:
            key, _, value = text.partition(":")
            value = value.strip()
            in_env = key == "env" and value == ""
            if key in ("name", "run", "uses", "id"):
                if value in ("|", ">", "|-", ">-"):
                    sys.exit(f"multi-line `{key}` is not supported: keep steps on one line")
                step[key] = value
            elif key not in ("env", "with"):
                sys.exit(f"unsupported step key `{key}`")
        elif indent == 10 and in_env:
            key, _, value = text.partition(":")
            step["env"][key] = re.sub(r"\$\{\{.*?\}\}", "", value.strip())
    return steps


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    path, job = sys.argv[1], sys.argv[2]
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for step in job_steps(lines, job):
        label = step.get("name") or step.get("uses") or step.get("run")
        if "uses" in step:
            print(f"==> skipped (GitHub's): {label}", flush=True)
            continue
        print(f"==> {label}: {step['run']}", flush=True)
        env = {**os.environ, **step["env"]}
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", step["run"]], env=env)
        if result.returncode != 0:
            sys.exit(f"step `{label}` failed with exit status {result.returncode}")


if __name__ == "__main__":
    main()
