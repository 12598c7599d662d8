"""Health, model list, metrics, tokenize/detokenize."""
import pytest

from conftest import HIDDEN_SIZE, LLAMA, QWEN, metric_sum

METRICS = [
    "stllm_requests_total",
    "stllm_prompt_tokens_total",
    "stllm_generated_tokens_total",
    "stllm_time_to_first_token_seconds",
    "stllm_inter_token_latency_seconds",
    "stllm_queue_length",
    "stllm_running_sequences",
    "stllm_kv_cells_used",
    "stllm_kv_cells_cached",
    "stllm_prefix_cache_hits_total",
]


def test_health(server):
    with server.http() as h:
        r = h.get("/health")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok"}


def test_models_list(client):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert sorted(ids) == sorted([LLAMA, QWEN]), ids
    for m in models.data:
        assert m.object == "model"
        assert isinstance(m.created, int)
        assert isinstance(m.owned_by, str) and m.owned_by


def test_models_list_raw(server):
    with server.http() as h:
        r = h.get("/v1/models")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["object"] == "list"
    assert {m["id"] for m in body["data"]} == {LLAMA, QWEN}


def test_metrics_exposition(server, client):
    # One request first so the per-request series exist.
    client.chat.completions.create(model=LLAMA, messages=[{"role": "user", "content": "metrics"}],
                                   max_tokens=3, temperature=0)
    with server.http() as h:
        r = h.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain"), r.headers["content-type"]
    m = server.metrics()
    missing = [name for name in METRICS
               if name not in m and f"{name}_bucket" not in m and f"{name}_count" not in m]
    assert not missing, f"metrics missing: {missing}; have {sorted(m)[:60]}"
    # Requests by endpoint and status.
    ok = [(l, v) for l, v in m["stllm_requests_total"] if l.get("status") == "200"]
    assert ok and all("endpoint" in l for l, _ in ok), m["stllm_requests_total"]
    assert sum(v for _, v in ok) >= 1
    # Token counters and histograms per model.
    assert metric_sum(m, "stllm_prompt_tokens_total", model=LLAMA) > 0
    assert metric_sum(m, "stllm_generated_tokens_total", model=LLAMA) >= 3
    for h in ["stllm_time_to_first_token_seconds", "stllm_inter_token_latency_seconds"]:
        buckets = [(l, v) for l, v in m.get(f"{h}_bucket", []) if l.get("model") == LLAMA]
        assert buckets, f"{h}_bucket for model={LLAMA} missing"
        assert any(l.get("le") == "+Inf" for l, _ in buckets)
        assert f"{h}_sum" in m and f"{h}_count" in m
        assert metric_sum(m, f"{h}_count", model=LLAMA) >= 1
    # The wait queue is the server's (slots are shared by the models); the rest is per model.
    assert len(m["stllm_queue_length"]) >= 1
    for g in ["stllm_running_sequences", "stllm_kv_cells_used", "stllm_kv_cells_cached"]:
        labels = {l.get("model") for l, _ in m[g]}
        assert {LLAMA, QWEN} <= labels, f"{g} labels: {m[g]}"


# -- tokenize / detokenize ---------------------------------------------------------------------

def _tok(server, **body):
    with server.http() as h:
        r = h.post("/tokenize", json=body)
    assert r.status_code == 200, f"/tokenize {body}: {r.status_code} {r.text}"
    out = r.json()
    assert isinstance(out["tokens"], list) and all(isinstance(t, int) for t in out["tokens"])
    assert out["count"] == len(out["tokens"])
    return out["tokens"]


def _detok(server, model, tokens):
    with server.http() as h:
        r = h.post("/detokenize", json={"model": model, "tokens": tokens})
    assert r.status_code == 200, f"/detokenize: {r.status_code} {r.text}"
    return r.json()["prompt"]


@pytest.mark.parametrize("model", [LLAMA, QWEN])
def test_tokenize_round_trip(server, model):
    text = "Hello world, the capital of France is Paris."
    toks = _tok(server, model=model, prompt=text, add_special_tokens=False)
    assert toks
    assert _detok(server, model, toks) == text


def test_tokenize_special_tokens(server):
    plain = _tok(server, model=LLAMA, prompt="Hello world", add_special_tokens=False)
    special = _tok(server, model=LLAMA, prompt="Hello world", add_special_tokens=True)
    # The llama fixture's tokenizer adds BOS (<s> = 1).
    assert special == [1] + plain, (plain, special)


def test_tokenize_messages_matches_chat_usage(server, client):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Count the tokens of this."}]
    toks = _tok(server, model=LLAMA, messages=messages)
    r = client.chat.completions.create(model=LLAMA, messages=messages, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens == len(toks), (r.usage, toks)


def test_tokenize_unknown_model(server):
    with server.http() as h:
        r = h.post("/tokenize", json={"model": "no-such-model", "prompt": "x"})
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "model_not_found"


def test_embedding_dims_are_hidden_size(client):
    r = client.embeddings.create(model=LLAMA, input="Hello world")
    assert len(r.data) == 1 and len(r.data[0].embedding) == HIDDEN_SIZE
