"""SSE framing checked byte for byte with curl (no SDK in between)."""
import json
import shutil
import subprocess
import tempfile

import pytest

from conftest import LLAMA


def curl_stream(server, path, body, extra=()):
    assert shutil.which("curl"), "curl is needed for the SSE framing tests"
    with tempfile.NamedTemporaryFile("r") as hdr:
        p = subprocess.run(["curl", "-sS", "-N", "--max-time", "60", "-D", hdr.name,
                            "-H", "Content-Type: application/json", *extra,
                            "-d", json.dumps(body), server.url(path)],
                           capture_output=True, timeout=90)
        headers = hdr.read()
    assert p.returncode == 0, p.stderr.decode()
    return headers, p.stdout.decode("utf-8")


def parse_sse(text):
    """Strict framing: events are `data: <payload>` lines each followed by a blank line."""
    assert text.endswith("\n\n"), f"stream does not end with a blank line: {text[-80:]!r}"
    events = text.replace("\r\n", "\n").split("\n\n")[:-1]
    payloads = []
    for ev in events:
        lines = ev.split("\n")
        assert len(lines) == 1, f"one data line per event expected: {ev!r}"
        assert lines[0].startswith("data: "), f"not a data line: {lines[0]!r}"
        payloads.append(lines[0][len("data: "):])
    assert payloads and payloads[-1] == "[DONE]", f"last event {payloads[-1:]!r} is not [DONE]"
    assert payloads.count("[DONE]") == 1
    return [json.loads(p) for p in payloads[:-1]]


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_sse_framing(server, include_usage):
    body = {"model": LLAMA, "messages": [{"role": "user", "content": "Hello"}],
            "temperature": 0, "max_tokens": 8, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    headers, text = curl_stream(server, "/v1/chat/completions", body)
    assert " 200" in headers.splitlines()[0], headers
    assert "content-type: text/event-stream" in headers.lower(), headers
    chunks = parse_sse(text)
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["model"] == LLAMA and isinstance(c["created"], int) for c in chunks)
    with_choices = [c for c in chunks if c["choices"]]
    assert with_choices[0]["choices"][0]["delta"].get("role") == "assistant"
    finals = [c for c in with_choices if c["choices"][0].get("finish_reason")]
    assert len(finals) == 1 and finals[0] is with_choices[-1], "one final chunk, the last with choices"
    assert finals[0]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0].get("finish_reason") is None for c in with_choices[:-1])
    if include_usage:
        last = chunks[-1]
        assert last["choices"] == [] and last is not with_choices[-1]
        u = last["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["completion_tokens"] > 0
        assert all(c.get("usage") is None for c in chunks[:-1])
    else:
        assert all(c.get("usage") is None for c in chunks)


def test_completions_sse_framing(server):
    body = {"model": LLAMA, "prompt": "Hello", "temperature": 0, "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}
    headers, text = curl_stream(server, "/v1/completions", body)
    assert "content-type: text/event-stream" in headers.lower(), headers
    chunks = parse_sse(text)
    assert all(c["object"] == "text_completion" for c in chunks)
    with_choices = [c for c in chunks if c["choices"]]
    assert with_choices[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_error_before_stream_is_json(server):
    """An invalid streaming request is refused with a plain JSON error, not an event stream."""
    body = {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}], "stream": True}
    headers, text = curl_stream(server, "/v1/chat/completions", body)
    assert " 404" in headers.splitlines()[0], headers
    assert json.loads(text)["error"]["code"] == "model_not_found"
