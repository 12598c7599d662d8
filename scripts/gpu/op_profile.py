#!/usr/bin/env python3
"""Summarise stllm's per-op profile (STLLM_LOG=stllm::ops=trace on stderr: every step is computed
one node at a time and each op's time logged, so the totals include one device synchronisation
per node). For the steps of each size class (tokens in the step), prints the ops that took the
most time in total, with their share, node count and mean time per step.

Usage: op_profile.py LOG [TOP] [CLASSES]
  CLASSES: comma-separated token ranges, default "1-1,2-64,65-100000"
"""
import re
import sys
from collections import defaultdict

ANSI = re.compile(r"\x1b\[[0-9;]*m")
FIELD = re.compile(r"(\w+)=(\S+)")


def main():
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    classes = [tuple(int(x) for x in c.split("-")) for c in (sys.argv[3] if len(sys.argv) > 3 else "1-1,2-64,65-100000").split(",")]
    # (class) -> op -> [nodes, us]; steps are counted by distinct (timestamp-less) step ends:
    # a step's lines come together, so a new step starts when an op repeats.
    agg = {c: defaultdict(lambda: [0, 0]) for c in classes}
    steps = {c: 0 for c in classes}
    kv = {c: [] for c in classes}
    seen = set()
    cur = None
    for line in open(path, errors="replace"):
        line = ANSI.sub("", line)
        if "stllm::ops" not in line:
            continue
        f = dict(FIELD.findall(line))
        try:
            n, op, nodes, us, n_kv = int(f["n_tokens"]), f["op"], int(f["nodes"]), int(f["us"]), int(f["n_kv"])
        except (KeyError, ValueError):
            continue
        c = next((c for c in classes if c[0] <= n <= c[1]), None)
        if c is None:
            continue
        if cur != (n, n_kv) or op in seen:
            steps[c] += 1
            kv[c].append(n_kv)
            seen = set()
            cur = (n, n_kv)
        seen.add(op)
        agg[c][op][0] += nodes
        agg[c][op][1] += us
    for c in classes:
        if not steps[c]:
            continue
        total = sum(v[1] for v in agg[c].values())
        ks = sorted(kv[c])
        print(f"\n### steps of {c[0]}–{c[1]} tokens: {steps[c]} steps, n_kv median {ks[len(ks) // 2]}, "
              f"{total / steps[c] / 1e3:.2f} ms per step profiled (one sync per node)")
        print("| op [first operand's shape] | share | nodes/step | ms/step |")
        print("|---|---|---|---|")
        for op, (nodes, us) in sorted(agg[c].items(), key=lambda kv: -kv[1][1])[:top]:
            print(f"| {op} | {100 * us / total:.1f}% | {nodes / steps[c]:.0f} | {us / steps[c] / 1e3:.3f} |")


if __name__ == "__main__":
    main()
