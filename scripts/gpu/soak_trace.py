#!/usr/bin/env python3
"""Where a soak's time to first token goes: reads a `stllm serve` log written with
STLLM_LOG=info,stllm::request=debug,stllm::step=trace and prints

- the attended-cell counts (n_kv) of the steps and the mean step time by step size and n_kv
  range: with one unified KV pool every row attends to the cells up to the highest one in use;
- the policy's own timings (instance checkout, first piece after the call started) in percentiles;
- for the requests with the slowest time to first token: their token counts and the steps computed
  between their arrival and their first piece (how many, how many tokens, the largest n_kv, the
  time in steps and outside them).

- with --records FILE (written by benches/soak/soak.py --records): each request paired with its
  log line by response id, its client-measured time to first token split into the time before
  the server's handler started (connection, request upload, queueing in the client or the
  runtime), the server's own time to the first piece, and the time from there to the client
  reading it (the response's way back, the client's own queueing).

Usage: soak_trace.py LOG [N_SLOWEST] [--records FILE]
"""
import json
import re
import sys
from datetime import datetime

ANSI = re.compile(r"\x1b\[[0-9;]*m")
FIELD = re.compile(r"(\w+)=(\"[^\"]*\"|[^\s]+)")
PHASES = ["build_us", "alloc_us", "inputs_us", "compute_us", "read_us"]


def ts(line):
    try:
        return datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
    except (ValueError, IndexError):
        return None


def num(v):
    v = v.strip('"')
    if v.startswith("Some("):
        v = v[5:-1]
    try:
        return float(v)
    except ValueError:
        return v


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))]


def main():
    argv = sys.argv[1:]
    records = None
    if "--records" in argv:
        k = argv.index("--records")
        records = argv[k + 1]
        del argv[k:k + 2]
    path = argv[0]
    n_slow = int(argv[1]) if len(argv) > 1 else 5
    steps, reqs, gens = [], [], []
    for line in open(path, errors="replace"):
        line = ANSI.sub("", line)
        t = ts(line)
        if t is None:
            continue
        f = {k: num(v) for k, v in FIELD.findall(line)}
        if "stllm::step" in line and all(p in f for p in PHASES):
            f["t"] = t
            f["dur"] = sum(f[p] for p in PHASES) / 1e6
            steps.append(f)
        elif "stllm::request" in line and "choice finished" in line:
            f["t"] = t
            reqs.append(f)
        elif "stllm::request" in line and "policy generate returned" in line:
            gens.append(f)
    if steps:
        nkv = [s["n_kv"] for s in steps]
        print(f"steps: {len(steps)}; n_kv p50 {pct(nkv, 50):.0f}, p90 {pct(nkv, 90):.0f}, max {max(nkv):.0f}")
        print("| step tokens | n_kv range | steps | mean step µs | mean compute µs | mean inputs µs |")
        print("|---|---|---|---|---|---|")
        tok_b = [(1, 1), (2, 8), (9, 32), (33, 64), (65, 256), (257, 1 << 30)]
        kv_b = [(0, 2048), (2049, 8192), (8193, 16384), (16385, 32768), (32769, 1 << 30)]
        for lo, hi in tok_b:
            for klo, khi in kv_b:
                sel = [s for s in steps if lo <= s["n_tokens"] <= hi and klo <= s["n_kv"] <= khi]
                if len(sel) < 3:
                    continue
                m = lambda k: sum(s[k] for s in sel) / len(sel)
                print(f"| {lo}–{hi if hi < 1 << 29 else '…'} | {klo}–{khi if khi < 1 << 29 else '…'} | {len(sel)} "
                      f"| {sum(s['dur'] for s in sel) / len(sel) * 1e6:.0f} | {m('compute_us'):.0f} | {m('inputs_us'):.0f} |")
    if gens:
        co = [g["checkout_us"] for g in gens if isinstance(g.get("checkout_us"), float)]
        fp = [g["first_piece_us"] for g in gens if isinstance(g.get("first_piece_us"), float)]
        print(f"\npolicy calls: {len(gens)}; checkout p50/p99 {pct(co, 50) / 1e3:.1f}/{pct(co, 99) / 1e3:.1f} ms; "
              f"first piece after the call p50/p99 {pct(fp, 50) / 1e3:.1f}/{pct(fp, 99) / 1e3:.1f} ms")
    ok = [r for r in reqs if isinstance(r.get("ttft_ms"), float)]
    if not ok:
        print("no request log lines (STLLM_LOG=info,stllm::request=debug)")
        return
    tt = [r["ttft_ms"] for r in ok]
    print(f"\nrequests: {len(ok)}; ttft p50/p90/p99 {pct(tt, 50):.0f}/{pct(tt, 90):.0f}/{pct(tt, 99):.0f} ms")
    print("| ttft ms | prompt | cached | arrived s | steps before its first piece | tokens in them | max n_kv | in steps ms | outside ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    t_start = min(r["t"] - r["total_ms"] / 1e3 for r in ok)
    for r in sorted(ok, key=lambda r: -r["ttft_ms"])[:n_slow]:
        arr = r["t"] - r["total_ms"] / 1e3
        first = arr + r["ttft_ms"] / 1e3
        sel = [s for s in steps if arr <= s["t"] <= first]
        busy = sum(s["dur"] for s in sel) * 1e3
        print(f"| {r['ttft_ms']:.0f} | {r['prompt_tokens']:.0f} | {r['cached_tokens']:.0f} | {arr - t_start:.2f} "
              f"| {len(sel)} | {sum(s['n_tokens'] for s in sel):.0f} | {max((s['n_kv'] for s in sel), default=0):.0f} "
              f"| {busy:.0f} | {r['ttft_ms'] - busy:.0f} |")
    if records:
        client_split(ok, records, n_slow)


def client_split(reqs, path, n_slow):
    """Pairs the client's records with the server's log lines (choice 0) by response id."""
    by_id = {r["id"].strip('"'): r for r in reqs if r.get("choice") == 0 and isinstance(r.get("id"), str)}
    rows = []
    for line in open(path):
        c = json.loads(line)
        s = by_id.get(c.get("id"))
        if s is None or c.get("first") is None:
            continue
        arrived = s["t"] - s["total_ms"] / 1e3
        before = (arrived - c["sent"]) * 1e3
        after = (c["first"] - (arrived + s["ttft_ms"] / 1e3)) * 1e3
        rows.append((c["ttft"] * 1e3, before, s["ttft_ms"], after))
    if not rows:
        print("\nno client record matched a log line by id (was the log written with stllm::request=info?)")
        return
    print(f"\nclient records paired with the log: {len(rows)}")
    for name, k in (("client ttft", 0), ("before the handler", 1), ("server ttft", 2), ("after the first piece", 3)):
        xs = [r[k] for r in rows]
        print(f"{name}: p50 {pct(xs, 50):.1f} ms, p90 {pct(xs, 90):.1f}, p99 {pct(xs, 99):.1f}, max {max(xs):.1f}")
    print("| client ttft ms | before the handler | server ttft | after the first piece |")
    print("|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r[0])[:n_slow]:
        print(f"| {r[0]:.0f} | {r[1]:.1f} | {r[2]:.1f} | {r[3]:.1f} |")


if __name__ == "__main__":
    main()
