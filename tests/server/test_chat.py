"""/v1/chat/completions through the official client: non-streaming, streaming, sampling fields,
stop, length, n, logprobs, seed, prefix-cache usage."""
import json
import math

import pytest

from conftest import LLAMA, LLAMA_DIR, QWEN

USER = [{"role": "user", "content": "Tell me a story about a cat."}]


def greedy(client, messages=USER, model=LLAMA, **kw):
    kw.setdefault("max_tokens", 16)
    return client.chat.completions.create(model=model, messages=messages, temperature=0, **kw)


def stream_text(client, **kw):
    """Stream a chat completion; returns (content, finish_reason, chunks)."""
    chunks = list(client.chat.completions.create(stream=True, **kw))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1, f"finish_reason in {len(finishes)} chunks: {finishes}"
    return content, finishes[0], chunks


@pytest.mark.parametrize("model", [LLAMA, QWEN])
def test_chat_non_streaming(client, model):
    r = greedy(client, model=model, max_tokens=8)
    assert r.object == "chat.completion"
    assert r.id and isinstance(r.created, int)
    assert r.model == model
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0
    assert c.message.role == "assistant"
    assert isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 8
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details is not None
    assert isinstance(u.prompt_tokens_details.cached_tokens, int)


def test_chat_greedy_is_deterministic(client):
    a = greedy(client).choices[0].message.content
    b = greedy(client).choices[0].message.content
    assert a == b


@pytest.mark.parametrize("model", [LLAMA, QWEN])
def test_chat_streaming_matches_non_streaming(client, model):
    ref = greedy(client, model=model, max_tokens=12)
    content, finish, chunks = stream_text(client, model=model, messages=USER, temperature=0,
                                          max_tokens=12)
    assert content == ref.choices[0].message.content
    assert finish == ref.choices[0].finish_reason
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1, "all chunks of a stream share one id"
    assert all(c.model == model for c in chunks)
    first = next(c for c in chunks if c.choices)
    assert first.choices[0].delta.role == "assistant"


def test_chat_stream_include_usage(client):
    ref = greedy(client, max_tokens=6)
    chunks = list(client.chat.completions.create(
        model=LLAMA, messages=USER, temperature=0, max_tokens=6, stream=True,
        stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [], "the usage chunk has empty choices"
    assert last.usage is not None
    assert last.usage.completion_tokens == ref.usage.completion_tokens
    assert last.usage.prompt_tokens == ref.usage.prompt_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1]), "only the last chunk carries usage"


def test_chat_stream_without_usage_has_none(client):
    chunks = list(client.chat.completions.create(model=LLAMA, messages=USER, temperature=0,
                                                 max_tokens=4, stream=True))
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)


def test_chat_roles_and_content_parts(client):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"},
                                     {"type": "text", "text": " there"}]},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 2}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
    ]
    r = greedy(client, messages=messages, max_tokens=4)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens > 20


def test_content_parts_equal_plain_string(client):
    """A single text part is the same prompt as the plain string."""
    a = greedy(client, messages=[{"role": "user", "content": "Hello there"}], max_tokens=8)
    b = greedy(client, messages=[{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}],
               max_tokens=8)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.choices[0].message.content == b.choices[0].message.content


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_gives_length(client, field):
    r = client.chat.completions.create(model=LLAMA, messages=USER, temperature=0, **{field: 5})
    assert r.choices[0].finish_reason == "length", r.choices[0]
    assert r.usage.completion_tokens == 5


def _pick_stop(text):
    """A 3-character alphanumeric substring of `text` first occurring after its start."""
    for i in range(max(1, len(text) // 3), len(text) - 3):
        s = text[i:i + 3]
        if s.isalnum() and s.isascii() and text.find(s) >= 1:
            return s, text.find(s)
    return None, None


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_string(client, as_list):
    full = greedy(client, max_tokens=32).choices[0].message.content
    stop, at = _pick_stop(full)
    assert stop, f"greedy output too short to pick a stop string from: {full!r}"
    r = greedy(client, max_tokens=32, stop=[stop, "zzzzzz-never"] if as_list else stop)
    out = r.choices[0].message.content
    assert stop not in out
    assert out == full[:at], (full, stop, out)
    assert r.choices[0].finish_reason == "stop"


def test_stop_string_streaming(client):
    full = greedy(client, max_tokens=32).choices[0].message.content
    stop, at = _pick_stop(full)
    assert stop, f"greedy output too short to pick a stop string from: {full!r}"
    content, finish, _ = stream_text(client, model=LLAMA, messages=USER, temperature=0,
                                     max_tokens=32, stop=stop)
    assert stop not in content, "a streamed stop string must not reach the client"
    assert content == full[:at]
    assert finish == "stop"


def test_n_two_greedy(client):
    r = greedy(client, n=2, max_tokens=10)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content == r.choices[1].message.content
    single = greedy(client, max_tokens=10)
    assert r.choices[0].message.content == single.choices[0].message.content
    assert r.usage.completion_tokens == 2 * single.usage.completion_tokens
    assert r.usage.prompt_tokens == single.usage.prompt_tokens


def test_n_two_streaming(client):
    chunks = list(client.chat.completions.create(model=LLAMA, messages=USER, temperature=0,
                                                 max_tokens=6, n=2, stream=True))
    texts = {0: "", 1: ""}
    finishes = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert texts[0] == texts[1]
    assert set(finishes) == {0, 1}


def test_logprobs(client):
    r = greedy(client, max_tokens=6, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content is not None
    assert len(lp.content) == r.usage.completion_tokens
    for t in lp.content:
        assert isinstance(t.token, str)
        assert t.logprob <= 0.0 and math.isfinite(t.logprob)
        assert t.bytes is None or isinstance(t.bytes, list)
        assert len(t.top_logprobs) == 3
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True), tops
        assert all(x <= 0.0 for x in tops)
        # Greedy: the chosen token is the most likely one.
        assert t.top_logprobs[0].token == t.token
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4
    # The tokens' bytes spell the content.
    assert all(t.bytes is not None for t in lp.content)
    raw = b"".join(bytes(t.bytes) for t in lp.content)
    assert raw.decode("utf-8", "replace") == r.choices[0].message.content


def partial_char_token():
    """The fixture's byte-level token for byte 0xE2 alone (the first of the three of '€')."""
    vocab = json.loads((LLAMA_DIR / "tokenizer.json").read_text())["model"]["vocab"]
    return vocab["\u00e2"]


def test_logprobs_bytes_of_a_partial_character(client):
    """A token that is part of a character decodes to U+FFFD as text, but its `bytes` are its
    own (not U+FFFD's three), so clients can join the bytes into the real text."""
    tid = partial_char_token()
    r = greedy(client, max_tokens=3, logprobs=True, top_logprobs=2, logit_bias={str(tid): 100})
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    for t in content:
        assert t.bytes == [0xE2], t
        # (The alternatives are the model's own, before the bias.) Each one's bytes spell it.
        for x in t.top_logprobs:
            assert bytes(x.bytes).decode("utf-8", "replace") == x.token, x


def test_logprobs_without_top(client):
    r = greedy(client, max_tokens=3, logprobs=True)
    lp = r.choices[0].logprobs
    assert lp is not None and len(lp.content) == r.usage.completion_tokens
    assert all(t.logprob <= 0 for t in lp.content)
    assert all(not t.top_logprobs for t in lp.content)


def test_no_logprobs_by_default(client):
    assert greedy(client, max_tokens=3).choices[0].logprobs is None


def test_seed_determinism(client):
    def sample(seed):
        return client.chat.completions.create(model=LLAMA, messages=USER, temperature=1.0,
                                              top_p=1.0, seed=seed, max_tokens=16
                                              ).choices[0].message.content
    a, b = sample(1234), sample(1234)
    assert a == b, "same seed, same sampled text"
    others = {sample(s) for s in (1, 2, 3, 4)}
    assert len(others | {a}) > 1, "temperature 1.0 with different seeds never changed the text"


def test_top_k_one_is_greedy(client):
    """Extra field top_k: with top_k=1 only the argmax survives, whatever the temperature."""
    g = greedy(client, max_tokens=12).choices[0].message.content
    r = client.chat.completions.create(model=LLAMA, messages=USER, temperature=1.5, seed=7,
                                       max_tokens=12, extra_body={"top_k": 1})
    assert r.choices[0].message.content == g


def test_extras_accepted(client):
    r = client.chat.completions.create(
        model=LLAMA, messages=USER, temperature=0.8, seed=3, max_tokens=4,
        presence_penalty=0.5, frequency_penalty=0.5, top_p=0.9,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    assert r.choices[0].finish_reason in ("stop", "length")


def _tokenize(server, text):
    with server.http() as h:
        r = h.post("/tokenize", json={"model": LLAMA, "prompt": text, "add_special_tokens": False})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def _detokenize(server, tokens):
    with server.http() as h:
        r = h.post("/detokenize", json={"model": LLAMA, "tokens": tokens})
    assert r.status_code == 200, r.text
    return r.json()["prompt"]


def test_logit_bias(server, client):
    tok = _tokenize(server, " France")[0]
    r = greedy(client, max_tokens=5, logit_bias={str(tok): 100})
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == _detokenize(server, [tok] * 5)
    # -100 bans a token: the greedy first token never comes again.
    first = greedy(client, max_tokens=1, logprobs=True).choices[0].logprobs.content[0]
    banned = {str(t): -100 for t in _tokenize(server, first.token)}
    r = greedy(client, max_tokens=1, logprobs=True, logit_bias=banned)
    assert r.choices[0].logprobs.content[0].token != first.token


def test_prefix_cache_cached_tokens(server, client):
    system = ("You are the assistant of a test suite. " * 8).strip()
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hi!"}]
    before = server.metrics()
    a = greedy(client, messages=messages, max_tokens=4)
    b = greedy(client, messages=messages, max_tokens=4)
    assert a.usage.prompt_tokens > 32
    assert b.usage.prompt_tokens_details.cached_tokens > 0, b.usage
    assert b.usage.prompt_tokens_details.cached_tokens < b.usage.prompt_tokens
    assert a.choices[0].message.content == b.choices[0].message.content
    after = server.metrics()
    from conftest import metric_sum
    assert (metric_sum(after, "stllm_prefix_cache_hits_total", model=LLAMA)
            > metric_sum(before, "stllm_prefix_cache_hits_total", model=LLAMA))
