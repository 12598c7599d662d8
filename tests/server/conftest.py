"""Fixtures for the `stllm serve` tests: real clients (the official `openai` package, httpx, curl)
against a real server process on loopback.

Every server is a child process started with `--port 0`; its port is read from the
`listening on http://127.0.0.1:PORT` line it prints on stderr. Every process started here is
killed at teardown (SIGTERM, then SIGKILL after a bounded wait), and every wait is bounded.

Environment:
  STLLM_BIN              the binary (default target/release/stllm)
  STLLM_START_TIMEOUT    seconds to wait for "listening on" (default 180)
"""
import atexit
import os
import pathlib
import re
import signal
import subprocess
import threading
import time

import httpx
import openai
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("STLLM_BIN", str(ROOT / "target" / "release" / "stllm"))
LLAMA_DIR = ROOT / "tests" / "fixtures" / "llama-f32"
QWEN_DIR = ROOT / "tests" / "fixtures" / "qwen3-f32-sharded"
DEMO_DIR = ROOT / "models" / "demo"
START_TIMEOUT = float(os.environ.get("STLLM_START_TIMEOUT", "180"))
LISTEN_RE = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")

# Model names as the tests use them: the llama fixture under its folder's name (NAME defaults to
# the folder name), the qwen3 fixture under an explicit NAME= (both spellings of --model).
LLAMA = "llama-f32"
QWEN = "qwen3"
HIDDEN_SIZE = 64  # hidden_size of both fixtures (config.json)

_ALL = []  # every Server started, for the final reaper


class Server:
    """One `stllm serve` process."""

    def __init__(self, args, name="server"):
        self.args = [str(a) for a in args]
        self.name = name
        self.proc = None
        self.port = None
        self.log = []  # stderr lines
        self._ready = threading.Event()
        self.api_key = None
        if "--api-key" in self.args:
            self.api_key = self.args[self.args.index("--api-key") + 1]

    # -- life cycle ------------------------------------------------------------------------------

    def start(self, timeout=START_TIMEOUT):
        if not os.path.isfile(BIN) or not os.access(BIN, os.X_OK):
            pytest.fail(f"stllm binary not found at {BIN} (build it with `cargo build --release` "
                        f"or set STLLM_BIN)", pytrace=False)
        cmd = [BIN, "serve", *self.args, "--host", "127.0.0.1", "--port", "0"]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        _ALL.append(self)
        threading.Thread(target=self._pump, args=(self.proc.stderr, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stdout, False), daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready.wait(0.1):
                return self
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the pumps read the last lines
                pytest.fail(f"{self.name}: `{' '.join(cmd)}` exited with {self.proc.returncode} "
                            f"before listening; stderr:\n{self.log_tail()}", pytrace=False)
        self.kill()
        pytest.fail(f"{self.name}: no 'listening on http://127.0.0.1:PORT' line within "
                    f"{timeout:.0f}s; stderr:\n{self.log_tail()}", pytrace=False)

    def _pump(self, stream, is_stderr):
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.log.append(("" if is_stderr else "[stdout] ") + line)
            if is_stderr and self.port is None:
                m = LISTEN_RE.search(line)
                if m:
                    self.port = int(m.group(1))
                    self._ready.set()
        stream.close()

    def log_tail(self, n=40):
        return "\n".join(self.log[-n:])

    def signal(self, sig):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self, grace=10.0):
        """SIGTERM, then SIGKILL (of the whole process group) after `grace` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.wait(grace)
        if rc is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            rc = self.wait(10)
        return rc

    # -- clients ---------------------------------------------------------------------------------

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.port}"

    def url(self, path):
        return self.base_url + path

    def client(self, api_key=None, **kw):
        """The official client. No retries: the tests look at each status code themselves."""
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 120.0)
        return openai.OpenAI(base_url=self.base_url + "/v1",
                             api_key=api_key or self.api_key or "sk-no-key-needed", **kw)

    def http(self, **kw):
        headers = kw.pop("headers", {})
        if self.api_key:
            headers.setdefault("Authorization", f"Bearer {self.api_key}")
        kw.setdefault("timeout", 120.0)
        return httpx.Client(base_url=self.base_url, headers=headers, **kw)

    def metrics(self):
        with self.http() as h:
            r = h.get("/metrics")
        assert r.status_code == 200, f"/metrics: {r.status_code} {r.text[:500]}"
        return parse_metrics(r.text)


def parse_metrics(text):
    """Prometheus text format -> {name: [(labels dict, value)]}."""
    out = {}
    line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\d+)?$')
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = line_re.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        labels = dict(label_re.findall(m.group(3) or ""))
        v = m.group(4)
        value = float("inf") if v == "+Inf" else float("-inf") if v == "-Inf" else float(v)
        out.setdefault(m.group(1), []).append((labels, value))
    return out


def metric_sum(metrics, name, **labels):
    """Sum of a metric's samples whose labels include `labels` (0 when absent)."""
    return sum(v for l, v in metrics.get(name, []) if all(l.get(k) == str(x) for k, x in labels.items()))


def wait_until(pred, timeout, interval=0.1, what="condition"):
    """Poll `pred` until it returns a truthy value or `timeout` seconds pass; returns the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = pred()
        if last or time.monotonic() >= deadline:
            return last
        time.sleep(interval)


def start_server(args, name="server"):
    return Server(args, name).start()


@pytest.fixture(scope="session", autouse=True)
def _reap_all():
    yield
    for s in _ALL:
        s.kill(grace=10)


@atexit.register
def _reap_at_exit():
    for s in _ALL:
        if s.proc and s.proc.poll() is None:
            try:
                os.killpg(s.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# One server per configuration, shared by the session.

@pytest.fixture(scope="session")
def server():
    """Two models (both --model spellings), no key, generous limits."""
    s = start_server(["--model", LLAMA_DIR, "--model", f"{QWEN}={QWEN_DIR}", "--ctx-size", "2048",
                      "--threads", "2"], "main")
    yield s
    s.kill()


@pytest.fixture(scope="session")
def client(server):
    return server.client()


@pytest.fixture(scope="session")
def auth_server():
    s = start_server(["--model", LLAMA_DIR, "--api-key", "sk-test-secret", "--ctx-size", "512",
                      "--threads", "1"], "auth")
    yield s
    s.kill()


@pytest.fixture(scope="session")
def tight_server():
    """One running request and one waiting: the rest get 429."""
    s = start_server(["--model", LLAMA_DIR, "--max-concurrent", "1", "--max-queue", "1",
                      "--ctx-size", "512", "--threads", "1"], "tight")
    yield s
    s.kill()
