"""Graceful shutdown: SIGTERM (and SIGINT) during a stream lets it finish, exits 0, refuses new work."""
import json
import signal
import socket
import threading
import time

import httpx
import pytest

from conftest import LLAMA, LLAMA_DIR, start_server


def _stream(server, out, started, max_tokens):
    body = {"model": LLAMA, "messages": [{"role": "user", "content": "Keep talking."}],
            "temperature": 0, "max_tokens": max_tokens, "stream": True}
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as h:
            with h.stream("POST", "/v1/chat/completions", json=body) as r:
                out["status"] = r.status_code
                for line in r.iter_lines():
                    if not line:
                        continue
                    out.setdefault("lines", []).append(line)
                    started.set()
    except Exception as e:  # noqa: BLE001 - checked by the test
        out["error"] = repr(e)
    finally:
        out["ended"] = time.monotonic()
        started.set()


def _refused(port):
    """True when a new request is refused: connection refused/reset, or an error status."""
    try:
        with httpx.Client(timeout=5) as h:
            r = h.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                       json={"model": LLAMA, "messages": [{"role": "user", "content": "x"}],
                             "max_tokens": 1})
        return r.status_code >= 500
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectTimeout):
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_shutdown_during_stream(sig):
    s = start_server(["--model", LLAMA_DIR, "--ctx-size", "512", "--threads", "1"], "shutdown")
    try:
        out, started = {}, threading.Event()
        t = threading.Thread(target=_stream, args=(s, out, started, 200), daemon=True)
        t.start()
        assert started.wait(60), "no first chunk within 60 s"
        assert "error" not in out, out
        s.signal(sig)
        signalled = time.monotonic()
        # While the stream drains (if it is still running), new requests are refused.
        time.sleep(0.3)
        if t.is_alive():
            assert _refused(s.port), "a new request was served after the shutdown signal"
        t.join(60)
        assert not t.is_alive(), "the in-flight stream did not end within 60 s"
        assert "error" not in out, f"stream broken by shutdown: {out.get('error')}"
        lines = out["lines"]
        assert lines[-1] == "data: [DONE]", lines[-3:]
        final = json.loads(lines[-2][len("data: "):])
        assert final["choices"][0]["finish_reason"] in ("stop", "length"), final
        rc = s.wait(30)
        assert rc is not None, "server still running 30 s after the stream finished"
        assert rc == 0, f"exit code {rc}; stderr:\n{s.log_tail()}"
        assert time.monotonic() - signalled < 60
        # Gone: connections are refused.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", s.port), timeout=2).close()
    finally:
        s.kill()


def test_idle_shutdown_is_quick():
    s = start_server(["--model", LLAMA_DIR, "--ctx-size", "256", "--threads", "1"], "idle-shutdown")
    try:
        t0 = time.monotonic()
        s.signal(signal.SIGTERM)
        rc = s.wait(15)
        assert rc == 0, f"exit code {rc} (None: still running after 15 s); stderr:\n{s.log_tail()}"
        assert time.monotonic() - t0 < 10
    finally:
        s.kill()
