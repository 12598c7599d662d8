#!/usr/bin/env python3
"""A bounded soak of an OpenAI-compatible server on loopback: C concurrent streaming clients send a
fixed number of requests with mixed prompt lengths behind a shared prefix; some disconnect early.

Reports JSON (stdout, or --out) and one markdown row (stderr, or --md): p50/p99 time to first token,
p50/p99 inter-token latency, aggregate generated tokens/s, errors, and the server's resident memory
(VmRSS of --pid, with its children) before, at peak and after.

Modes:
  --mode chat    POST /v1/chat/completions: a shared system prompt + a user message of
                 mixed length (words); needs a chat template on the server side.
  --mode tokens  POST /v1/completions with a shared prefix of token ids + a tail of mixed length.
                 --prompt-format ids sends the ids themselves (servers with a different tokenizer
                 compare fairly); --prompt-format text sends the same ids decoded with
                 --tokenizer DIR (a byte-level BPE tokenizer.json), for servers that take only text
                 (llama-cpp-python's server), re-tokenized by the server.

Tokens of a request: usage.completion_tokens when the server sends the usage chunk
(stream_options.include_usage), else max_tokens when it finished with "length" (use --ban-token
EOS for fixed-length outputs), else the number of content chunks. Inter-token latency: the gaps
between successive content chunks divided by the tokens they carry (per-chunk otherwise). TTFT:
from sending the request to the first content chunk. Requests that disconnect on purpose count for
TTFT and tokens but not for errors. Every wait is bounded (--request-timeout, --timeout).

Needs httpx only (pip install httpx). Example:
  soak.py --base-url http://127.0.0.1:8080/v1 --model qwen3 --mode tokens --vocab-size 384 \
          --concurrency 64 --requests 512 --max-tokens 64 --pid 1234 --label stllm
"""
import argparse
import asyncio
import json
import multiprocessing
import os
import random
import statistics
import sys
import threading
import time

import httpx

WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this "
         "from or had by word but what some we can out other were all there when up use your how said "
         "an each she which do their time if will way about many then them write would like so these "
         "her long make thing see him two has look more day could go come did number sound no most "
         "people my over know water than call first who may down side been now find").split()


# -- resident memory ----------------------------------------------------------------------------

def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def rss_bytes(pid):
    """VmRSS of pid and its descendants, in bytes (None if pid is gone or not given)."""
    if not pid:
        return None
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            if p == pid:
                return None
            continue
        todo.extend(_children(p))
    return total


# -- prompts ------------------------------------------------------------------------------------

def byte_level_decoder(tokenizer_dir):
    """id -> bytes for a byte-level BPE tokenizer.json (GPT-2 byte mapping)."""
    with open(os.path.join(tokenizer_dir, "tokenizer.json")) as f:
        tok = json.load(f)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    unicode_to_byte = {chr(c): b for b, c in zip(bs, cs)}
    out = {}
    for text, i in tok["model"]["vocab"].items():
        try:
            out[i] = bytes(unicode_to_byte[ch] for ch in text)
        except KeyError:
            continue
    special = {a["id"] for a in tok.get("added_tokens", [])}
    return {i: b for i, b in out.items() if i not in special}


def make_prompts(args, rng):
    """The request bodies' prompt parts, in order: [(kind, value)]."""
    lens = [int(x) for x in args.prompt_lens.split(",")]
    prompts = []
    if args.mode == "chat":
        system = " ".join(rng.choice(WORDS) for _ in range(args.shared_prefix))
        for i in range(args.requests):
            user = " ".join(rng.choice(WORDS) for _ in range(lens[i % len(lens)]))
            prompts.append([{"role": "system", "content": system},
                            {"role": "user", "content": f"Request {i}: {user}"}])
        return prompts
    # Token ids: from tokens that are whole UTF-8 on their own when a tokenizer is given (so the
    # text form decodes cleanly), else from [--min-token-id, --vocab-size).
    decode = byte_level_decoder(args.tokenizer) if args.tokenizer else None
    if decode:
        pool = []
        for i, b in sorted(decode.items()):
            try:
                b.decode("utf-8")
                if i >= args.min_token_id:
                    pool.append(i)
            except UnicodeDecodeError:
                pass
    else:
        if not args.vocab_size:
            sys.exit("--mode tokens needs --vocab-size or --tokenizer")
        pool = list(range(args.min_token_id, args.vocab_size))
    if args.prompt_format == "text" and not decode:
        sys.exit("--prompt-format text needs --tokenizer")
    prefix = [rng.choice(pool) for _ in range(args.shared_prefix)]
    for i in range(args.requests):
        ids = prefix + [rng.choice(pool) for _ in range(lens[i % len(lens)])]
        if args.prompt_format == "text":
            prompts.append(b"".join(decode[t] for t in ids).decode("utf-8"))
        else:
            prompts.append(ids)
    return prompts


# -- one request ----------------------------------------------------------------------------------

def request_max_tokens(args, i):
    """Request i's max_tokens: --max-tokens, or with --vary-max-tokens F a value drawn (seeded by
    i) from [max_tokens * (1 - F), max_tokens * (1 + F)], so that streams do not all end together
    and arrive again in waves."""
    if not args.vary_max_tokens:
        return args.max_tokens
    u = random.Random(1_000_003 * (i + 1) + args.seed_prompts).uniform(-1.0, 1.0)
    return max(1, round(args.max_tokens * (1 + args.vary_max_tokens * u)))


async def one_request(http, args, prompt, disconnect_after, max_tokens=None):
    """Stream one request; returns a record."""
    max_tokens = args.max_tokens if max_tokens is None else max_tokens
    body = {"model": args.model, "max_tokens": max_tokens, "temperature": args.temperature,
            "stream": True}
    if args.include_usage:
        body["stream_options"] = {"include_usage": True}
    if args.seed is not None:
        body["seed"] = args.seed
    if args.ban_token is not None:
        body["logit_bias"] = {str(args.ban_token): -100}
    if args.mode == "chat":
        body["messages"] = prompt
        path = "/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/completions"
    rec = {"ttft": None, "gaps": [], "tokens": 0, "error": None, "disconnected": False,
           "id": None, "sent": time.time(), "first": None}
    t0 = time.monotonic()
    last = None
    chunks = 0
    usage_tokens = None
    finish = None
    done = False
    try:
        async with http.stream("POST", args.base_url + path, json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode("utf-8", "replace")
                rec["error"] = f"HTTP {r.status_code}: {text[:200]}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                ev = json.loads(data)
                if rec["id"] is None:
                    rec["id"] = ev.get("id")
                if ev.get("usage"):
                    usage_tokens = ev["usage"].get("completion_tokens")
                for ch in ev.get("choices") or []:
                    if ch.get("finish_reason"):
                        finish = ch["finish_reason"]
                    piece = (ch.get("delta") or {}).get("content") if args.mode == "chat" else ch.get("text")
                    if piece is None:
                        continue
                    now = time.monotonic()
                    if rec["ttft"] is None:
                        rec["ttft"] = now - t0
                        rec["first"] = time.time()
                    else:
                        rec["gaps"].append(now - last)
                    last = now
                    chunks += 1
                if disconnect_after is not None and chunks >= disconnect_after:
                    rec["disconnected"] = True
                    break
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"[:200]
        return rec
    rec["chunks"] = chunks
    if usage_tokens is None and finish == "length" and not rec["disconnected"]:
        # No usage chunk (e.g. llama-cpp-python), but a request that ran to max_tokens made
        # exactly that many tokens (a server may put several in one chunk).
        usage_tokens = max_tokens
    rec["tokens"] = usage_tokens if (usage_tokens is not None and not rec["disconnected"]) else chunks
    if usage_tokens and chunks and usage_tokens != chunks and rec["gaps"]:
        # Chunks carrying several tokens: spread each gap over them.
        per = chunks / usage_tokens
        rec["gaps"] = [g * per for g in rec["gaps"]]
    if finish is not None and not done and not rec["disconnected"]:
        # A finished stream without the closing `data: [DONE]` (transformers serve ends so): the
        # official client accepts it; counted apart, not an error.
        rec["no_done"] = True
    if finish is None and not done and not rec["disconnected"]:
        rec["error"] = "stream ended without a finish_reason or data: [DONE]"
    elif finish is None and not rec["disconnected"]:
        rec["error"] = "stream ended without a finish_reason (interrupted?)"
    return rec


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, int(round(p / 100 * len(xs) + 0.5)) - 1))
    return xs[k]


async def run_part(args, part, parts, barrier):
    """The clients of one process (every `parts`-th request from `part`); returns its records and
    the wall-clock times its measured phase started and ended."""
    rng = random.Random(args.seed_prompts)
    prompts = make_prompts(args, rng)
    n_disc = int(round(args.disconnect_frac * args.requests))
    disc = set(rng.sample(range(args.requests), n_disc))
    mine = list(range(part, args.requests, parts))
    conc = len(range(part, args.concurrency, parts))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=conc + 4, max_keepalive_connections=conc)
    timeout = httpx.Timeout(args.request_timeout, connect=30)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as http:
        # Warm-up (not measured): rounds of C concurrent short requests (over all processes), so
        # engines are started and per-request resources (stllm's policy instances, up to
        # --max-concurrent) exist before measuring; --warmup 0 measures a cold server.
        warm = argparse.Namespace(**{**vars(args), "max_tokens": 2})
        for _ in range(args.warmup):
            try:
                recs = await asyncio.wait_for(
                    asyncio.gather(*[one_request(http, warm, prompts[i % len(prompts)], None)
                                     for i in range(part, args.concurrency, parts)]), args.timeout)
            except asyncio.TimeoutError:
                sys.exit(f"warm-up: {args.concurrency} concurrent 2-token requests did not finish in {args.timeout} s")
            bad = [r["error"] for r in recs if r["error"]]
            if bad:
                sys.exit(f"warm-up: {len(bad)} requests failed, e.g. {bad[0]}")
        if barrier is not None:
            await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
        else:
            rss_at_start.value = rss_bytes(args.pid) or 0
        queue = asyncio.Queue()
        for i in mine:
            queue.put_nowait(i)
        records = {}

        async def client():
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                records[i] = await one_request(http, args, prompts[i],
                                               args.disconnect_after if i in disc else None,
                                               request_max_tokens(args, i))

        t0 = time.time()
        tasks = [asyncio.create_task(client()) for _ in range(conc)]
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), args.timeout)
            timed_out = False
        except asyncio.TimeoutError:
            timed_out = True
            for t in tasks:
                t.cancel()
        t1 = time.time()
    return records, t0, t1, timed_out


def part_main(args, part, parts, barrier, q):
    try:
        q.put((part, asyncio.run(run_part(args, part, parts, barrier))))
    except BaseException as e:  # noqa: BLE001 (reported by the parent)
        if barrier is not None:
            barrier.abort()  # the other processes stop waiting for this one
        q.put((part, f"{type(e).__name__}: {e}"))


class _Box:
    value = 0


# The server's resident memory when the measured phase starts (after the warm-up): set by the
# single client, or by the barrier's action when several processes wait for each other.
rss_at_start = _Box()


def run(args):
    global rss_at_start
    parts = max(1, min(args.procs, args.concurrency))
    rss_peak = [rss_bytes(args.pid) or 0]
    stop = threading.Event()

    def sample_rss():
        while not stop.is_set():
            v = rss_bytes(args.pid)
            if v:
                rss_peak[0] = max(rss_peak[0], v)
            stop.wait(0.25)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    if parts == 1:
        results = [asyncio.run(run_part(args, 0, 1, None))]
    else:
        # Several client processes, so that the load generator (Python parsing every SSE chunk)
        # is not what limits a fast server's time to first token.
        ctx = multiprocessing.get_context("fork")
        rss_at_start = ctx.Value("d", 0.0)
        shared = rss_at_start

        def at_start():
            shared.value = rss_bytes(args.pid) or 0

        barrier, q = ctx.Barrier(parts, action=at_start), ctx.Queue()
        procs = [ctx.Process(target=part_main, args=(args, k, parts, barrier, q)) for k in range(parts)]
        for p in procs:
            p.start()
        got = dict(q.get(timeout=args.timeout + 600) for _ in procs)
        for p in procs:
            p.join()
        bad = sorted((v for v in got.values() if isinstance(v, str)), key=lambda v: "BrokenBarrier" in v)
        if bad:
            sys.exit(f"a client process failed: {bad[0]}")
        results = [got[k] for k in range(parts)]
    stop.set()
    time.sleep(args.settle)  # let the server free what disconnected clients held
    rss_after = rss_bytes(args.pid)
    rss_before = rss_at_start.value or None
    records = {}
    for r, _, _, _ in results:
        records.update(r)
    wall = max(r[2] for r in results) - min(r[1] for r in results)
    timed_out = any(r[3] for r in results)

    done = [records[i] for i in sorted(records)]
    if args.records:
        with open(args.records, "w") as f:
            for i, r in zip(sorted(records), done):
                f.write(json.dumps({"i": i, "id": r["id"], "sent": r["sent"], "first": r["first"],
                                    "ttft": r["ttft"], "error": r["error"]}) + "\n")
    errors = [r["error"] for r in done if r["error"]]
    ttft = [r["ttft"] for r in done if r["ttft"] is not None and not r["error"]]
    gaps = [g for r in done if not r["error"] for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in done if not r["error"])
    mib = (lambda b: None if b is None else round(b / 2**20, 1))
    ms = (lambda s: None if s is None else round(s * 1000, 2))
    out = {
        "label": args.label, "base_url": args.base_url, "model": args.model, "mode": args.mode,
        "prompt_format": args.prompt_format if args.mode == "tokens" else "chat",
        "concurrency": args.concurrency, "requests": args.requests, "completed": len(done),
        "client_processes": parts,
        "timed_out": timed_out, "disconnected_on_purpose": sum(1 for r in done if r["disconnected"]),
        "max_tokens": args.max_tokens, "vary_max_tokens": args.vary_max_tokens,
        "prompt_lens": args.prompt_lens, "shared_prefix": args.shared_prefix,
        "wall_s": round(wall, 3), "generated_tokens": tokens,
        "tok_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "ttft_ms": {"p50": ms(pct(ttft, 50)), "p99": ms(pct(ttft, 99)),
                    "mean": ms(statistics.mean(ttft)) if ttft else None},
        "itl_ms": {"p50": ms(pct(gaps, 50)), "p99": ms(pct(gaps, 99)),
                   "mean": ms(statistics.mean(gaps)) if gaps else None},
        "errors": len(errors) + (args.requests - len(done)), "error_samples": errors[:5],
        "finished_without_done": sum(1 for r in done if r.get("no_done")),
        "rss_mib": {"before": mib(rss_before), "peak": mib(rss_peak[0] or None), "after": mib(rss_after)},
        "pid": args.pid,
    }
    return out


MD_HEADER = ("| server | mode | C | requests | p50 TTFT ms | p99 TTFT ms | p50 ITL ms | p99 ITL ms "
             "| tok/s | errors | RSS MiB before → peak → after |\n"
             "|---|---|---|---|---|---|---|---|---|---|---|")


def md_row(o):
    r = o["rss_mib"]
    mode = o["mode"] if o["mode"] == "chat" else f"tokens ({o['prompt_format']})"
    return (f"| {o['label']} | {mode} | {o['concurrency']} | {o['requests']} | {o['ttft_ms']['p50']} "
            f"| {o['ttft_ms']['p99']} | {o['itl_ms']['p50']} | {o['itl_ms']['p99']} | {o['tok_per_s']} "
            f"| {o['errors']}{' (timed out)' if o['timed_out'] else ''} "
            f"| {r['before']} → {r['peak']} → {r['after']} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1")
    ap.add_argument("--model", required=True)
    ap.add_argument("--api-key")
    ap.add_argument("--label", default="server")
    ap.add_argument("--mode", choices=["chat", "tokens"], default="chat")
    ap.add_argument("--prompt-format", choices=["ids", "text"], default="ids")
    ap.add_argument("--tokenizer", help="folder with tokenizer.json (byte-level BPE) for --prompt-format text")
    ap.add_argument("--vocab-size", type=int)
    ap.add_argument("--min-token-id", type=int, default=8, help="skip the specials below this id")
    ap.add_argument("--concurrency", "-c", type=int, default=64)
    ap.add_argument("--requests", "-n", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-lens", default="8,32,128,16,64",
                    help="per-request prompt lengths after the shared prefix, cycled (words or tokens)")
    ap.add_argument("--shared-prefix", type=int, default=64, help="shared system prompt (words) or prefix (tokens)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--seed-prompts", type=int, default=0)
    ap.add_argument("--ban-token", type=int, help="logit_bias -100 on this id (e.g. EOS: fixed-length outputs)")
    ap.add_argument("--no-usage", dest="include_usage", action="store_false",
                    help="do not ask for stream_options.include_usage")
    ap.add_argument("--disconnect-frac", type=float, default=0.1)
    ap.add_argument("--disconnect-after", type=int, default=4, help="content chunks before disconnecting")
    ap.add_argument("--warmup", type=int, default=1, help="rounds of C concurrent 2-token requests first")
    ap.add_argument("--pid", type=int, help="server process for resident memory")
    ap.add_argument("--vary-max-tokens", type=float, default=0.0,
                    help="F in [0, 1): each request's max_tokens drawn from max_tokens * (1 ± F)")
    ap.add_argument("--procs", type=int, default=1,
                    help="client processes sharing the C streams (a fast server outruns one Python process)")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds before the last RSS sample")
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--timeout", type=float, default=1800, help="bound on the whole soak")
    ap.add_argument("--out", help="append the JSON line to this file")
    ap.add_argument("--records", help="write one JSON line per measured request (id, wall-clock send and "
                    "first-chunk times, ttft) to this file, for scripts/gpu/soak_trace.py --records")
    ap.add_argument("--md", help="append the markdown row to this file (header when new)")
    args = ap.parse_args()
    args.base_url = args.base_url.rstrip("/")
    out = run(args)
    line = json.dumps(out)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    row = md_row(out)
    print(MD_HEADER + "\n" + row, file=sys.stderr)
    if args.md:
        new = not os.path.exists(args.md)
        with open(args.md, "a") as f:
            f.write((MD_HEADER + "\n" if new else "") + row + "\n")
    sys.exit(1 if out["errors"] or out["timed_out"] else 0)


if __name__ == "__main__":
    main()
