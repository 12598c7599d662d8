"""Concurrent requests are batched without changing greedy results; disconnects free everything."""
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from conftest import LLAMA, QWEN, metric_sum, wait_until

PROMPTS = [
    "Tell me a story about a cat.",
    "What is the capital of France?",
    "Hello",
    "Write a poem about the sea and the wind and the long grey shore.",
    "1 2 3 4 5 6 7 8",
    "Explain batching.",
    "Why is the sky blue? Answer in detail, please, with examples.",
    "Bonjour",
]
# Six llama requests and two qwen3: both models' compute threads run at once.
JOBS = [(LLAMA if i < 6 else QWEN, p) for i, p in enumerate(PROMPTS)]


def run_one(client, job):
    model, prompt = job
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                       temperature=0, max_tokens=24)
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens


def run_one_streaming(client, job):
    model, prompt = job
    text, finish = "", None
    for c in client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            temperature=0, max_tokens=24, stream=True):
        if c.choices:
            text += c.choices[0].delta.content or ""
            finish = c.choices[0].finish_reason or finish
    return text, finish


def test_concurrent_equals_sequential(client):
    sequential = [run_one(client, j) for j in JOBS]
    with ThreadPoolExecutor(len(JOBS)) as ex:
        concurrent = list(ex.map(lambda j: run_one(client, j), JOBS))
    for job, s, c in zip(JOBS, sequential, concurrent):
        assert s == c, f"{job}: sequential {s!r} != concurrent {c!r}"
    # Streams too.
    with ThreadPoolExecutor(len(JOBS)) as ex:
        streamed = list(ex.map(lambda j: run_one_streaming(client, j), JOBS))
    for job, s, st in zip(JOBS, sequential, streamed):
        assert (s[0], s[1]) == st, f"{job}: sequential {s[:2]!r} != streamed {st!r}"


def _busy(server):
    m = server.metrics()
    running = metric_sum(m, "stllm_running_sequences")
    held = (metric_sum(m, "stllm_kv_cells_used", model=LLAMA)
            - metric_sum(m, "stllm_kv_cells_cached", model=LLAMA))
    return running, held, metric_sum(m, "stllm_queue_length")


def _idle(server, timeout=10):
    """Wait (bounded) until nothing runs or waits; returns (running, cells held by sequences, queue)."""
    last = [None]

    def check():
        last[0] = _busy(server)
        return last[0][0] == 0 and last[0][2] == 0

    wait_until(check, timeout)
    return last[0]


def _open_and_drop(server, chunks_before_drop):
    """Open a long stream, read a few chunks, then close the connection."""
    body = {"model": LLAMA, "messages": [{"role": "user", "content": "Go on forever."}],
            "temperature": 0, "max_tokens": 200, "stream": True}
    got = 0
    with server.http() as h:
        with h.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    got += 1
                    if got >= chunks_before_drop:
                        break
    return got


def test_disconnect_mid_stream_frees_everything(server):
    running, idle_held, _ = _idle(server)
    assert running == 0, "server not idle before the test"
    for n in (1, 3):
        _open_and_drop(server, n)
    # Several at once as well.
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda n: _open_and_drop(server, n), [2, 2, 5, 5]))

    def freed():
        running, held, queue = _busy(server)
        return running == 0 and queue == 0 and held == idle_held

    assert wait_until(freed, 5.0), f"after disconnects (running, held cells, queue) = {_busy(server)}, " \
                                   f"idle held cells {idle_held}"
    # Disconnects of clients are not server errors.
    m = server.metrics()
    assert metric_sum(m, "stllm_requests_total", status="500") == 0


def test_disconnect_before_first_token(server):
    """A client that goes away while its request waits in the queue leaves nothing behind."""
    running, idle_held, _ = _idle(server)
    body = {"model": LLAMA, "messages": [{"role": "user", "content": "x " * 20}],
            "temperature": 0, "max_tokens": 200, "stream": True}
    for _ in range(4):
        try:
            with httpx.Client(base_url=server.base_url, timeout=httpx.Timeout(0.05, connect=5)) as h:
                with h.stream("POST", "/v1/chat/completions", json=body) as r:
                    for _line in r.iter_lines():
                        break
        except httpx.TimeoutException:
            pass
    assert wait_until(lambda: _busy(server)[:2] == (0, idle_held), 5.0), _busy(server)
