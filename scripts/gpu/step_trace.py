#!/usr/bin/env python3
"""Summarise the step trace of a stllm run (STLLM_LOG=stllm::step=trace on stderr): for the steps
of each size (tokens in the step), how many, the mean time in each phase of `Runner::run_select`
(graph build, allocation, inputs, compute, read back), and the mean time between the end of one
step and the end of the next minus the step itself: the compute thread's time outside steps
(scheduling, sampling, waiting for work). Distinct attended-cell counts (n_kv) say how often the
graph's shape changed.

Usage: step_trace.py LOG [LABEL]   (prints one markdown row per step size with >= 5 steps)
"""
import re
import sys
from collections import defaultdict
from datetime import datetime

ANSI = re.compile(r"\x1b\[[0-9;]*m")
FIELD = re.compile(r"(\w+)=(\d+)")
PHASES = ["build_us", "alloc_us", "inputs_us", "compute_us", "read_us"]


def parse(path):
    steps = []
    for line in open(path, errors="replace"):
        line = ANSI.sub("", line)
        if "stllm::step" not in line:
            continue
        ts = line.split()[0]
        try:
            t = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
        f = {k: int(v) for k, v in FIELD.findall(line)}
        if "n_tokens" in f and all(p in f for p in PHASES):
            f["t"] = t
            steps.append(f)
    return steps


def main():
    steps = parse(sys.argv[1])
    label = sys.argv[2] if len(sys.argv) > 2 else sys.argv[1]
    if not steps:
        print(f"| {label} | no step trace |")
        return
    by = defaultdict(list)
    for i, s in enumerate(steps):
        total = sum(s[p] for p in PHASES)
        # Time from the previous step's end to this step's start.
        gap = None
        if i > 0:
            gap = (s["t"] - steps[i - 1]["t"]) * 1e6 - total
        by[s["n_tokens"]].append((s, total, gap))
    print("| run | tokens/step | steps | build | alloc | inputs | compute | read | step µs | outside steps µs | n_kv shapes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, rows in sorted(by.items(), key=lambda kv: -len(kv[1])):
        if len(rows) < 5:
            continue
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
        ph = [mean([r[0][p] for r in rows]) for p in PHASES]
        gaps = [r[2] for r in rows if r[2] is not None]
        shapes = len({r[0]["n_kv"] for r in rows})
        print(f"| {label} | {n} | {len(rows)} | " + " | ".join(f"{x:.0f}" for x in ph)
              + f" | {mean([r[1] for r in rows]):.0f} | {mean(gaps):.0f} | {shapes} |")
    span = steps[-1]["t"] - steps[0]["t"]
    busy = sum(sum(s[p] for p in PHASES) for s in steps[1:]) / 1e6
    print(f"\n{label}: {len(steps)} steps over {span * 1e3:.1f} ms, {busy * 1e3:.1f} ms in steps "
          f"({100 * busy / span if span else 0:.0f}%)")


if __name__ == "__main__":
    main()
