"""/v1/completions (string and token-id prompts, echo, logprobs, streaming) and /v1/embeddings."""
import base64
import struct

import pytest

from conftest import HIDDEN_SIZE, LLAMA, QWEN
from test_chat import partial_char_token

PROMPT = "The capital of France is"


def complete(client, prompt=PROMPT, model=LLAMA, **kw):
    kw.setdefault("max_tokens", 10)
    return client.completions.create(model=model, prompt=prompt, temperature=0, **kw)


def tokenize(server, text, special, model=LLAMA):
    with server.http() as h:
        r = h.post("/tokenize", json={"model": model, "prompt": text, "add_special_tokens": special})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


@pytest.mark.parametrize("model", [LLAMA, QWEN])
def test_completion_string(client, model):
    r = complete(client, model=model)
    assert r.object == "text_completion"
    assert r.model == model and r.id
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert isinstance(r.choices[0].text, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_token_list_equals_string(server, client):
    by_text = complete(client)
    # Whichever tokenization the server used for the string (with or without BOS), the same ids
    # as a token-id prompt give the same greedy text.
    candidates = [tokenize(server, PROMPT, True), tokenize(server, PROMPT, False)]
    ids = next((c for c in candidates if len(c) == by_text.usage.prompt_tokens), None)
    assert ids is not None, (by_text.usage, candidates)
    by_ids = complete(client, prompt=ids)
    assert by_ids.usage.prompt_tokens == len(ids)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_completion_token_list_raw_ids(client):
    r = complete(client, prompt=[1, 50, 60, 70, 80], max_tokens=4)
    assert r.usage.prompt_tokens == 5
    assert r.choices[0].finish_reason in ("stop", "length")


def test_completion_max_tokens_length(client):
    r = complete(client, max_tokens=7)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7


def test_completion_echo(client):
    plain = complete(client, max_tokens=6)
    echoed = complete(client, max_tokens=6, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text


def test_completion_logprobs(client):
    r = complete(client, max_tokens=5, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp is not None
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert all(x <= 0 for x in lp.token_logprobs)
    for tok, lpv, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3, top  # `logprobs` entries, plus the chosen one when not among them
        assert max(top.values()) <= 0
        if "\ufffd" not in tok and not any("\ufffd" in t for t in top):
            # (Token strings that are partial UTF-8 all print as U+FFFD and collide as keys.)
            assert abs(max(top.values()) - lpv) < 1e-4, "greedy: the chosen token is the most likely"
    assert lp.text_offset == sorted(lp.text_offset)
    # The tokens spell the text (a part of a character as `bytes:\\xNN`).
    raw = b"".join(token_bytes(t) for t in lp.tokens)
    assert raw.decode("utf-8", "replace") == r.choices[0].text


def token_bytes(tok):
    """A legacy completions token's bytes (`bytes:\\xNN...` spelled out, else its UTF-8)."""
    if tok.startswith("bytes:"):
        hexes = tok[len("bytes:"):].split("\\x")
        assert hexes[0] == "", tok
        return bytes(int(h, 16) for h in hexes[1:])
    return tok.encode()


def test_completion_logprobs_spell_partial_characters_as_bytes(client):
    """Legacy completions name a token that is part of a character `bytes:\\xNN` (as OpenAI
    does) instead of U+FFFD, and its text offset counts its own bytes."""
    tid = partial_char_token()
    r = complete(client, max_tokens=3, logprobs=1, logit_bias={str(tid): 100})
    lp = r.choices[0].logprobs
    assert lp.tokens == ["bytes:\\xe2"] * 3, lp.tokens
    assert lp.text_offset == [lp.text_offset[0] + i for i in range(3)]
    for top in lp.top_logprobs:  # the model's own alternatives (before the bias), spelled alike
        for k in top:
            assert not k.startswith("bytes:") or token_bytes(k).decode("utf-8", "replace") == "\ufffd", k


def test_completion_streaming(client):
    ref = complete(client, max_tokens=8)
    chunks = list(client.completions.create(model=LLAMA, prompt=PROMPT, temperature=0, max_tokens=8,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [ref.choices[0].finish_reason]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == ref.usage.completion_tokens


def test_completion_stop(client):
    full = complete(client, max_tokens=24).choices[0].text
    stop = next((full[i:i + 2] for i in range(len(full) // 2, len(full) - 2)
                 if full[i:i + 2].isalnum() and full[i:i + 2].isascii()
                 and full.find(full[i:i + 2]) >= 1), None)
    assert stop, f"greedy output too short to pick a stop string from: {full!r}"
    r = complete(client, max_tokens=24, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"


# -- embeddings ----------------------------------------------------------------------------------

def _embed_raw(server, **body):
    with server.http() as h:
        r = h.post("/v1/embeddings", json=body)
    assert r.status_code == 200, f"{r.status_code} {r.text[:500]}"
    return r.json()


@pytest.mark.parametrize("model", [LLAMA, QWEN])
def test_embeddings_float_and_base64_agree(server, model):
    texts = ["Hello world", "The capital of France is Paris."]
    f = _embed_raw(server, model=model, input=texts, encoding_format="float")
    b = _embed_raw(server, model=model, input=texts, encoding_format="base64")
    assert f["object"] == "list" and f["model"] == model
    assert [d["index"] for d in f["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in f["data"])
    assert f["usage"]["prompt_tokens"] > 0
    for df, db in zip(f["data"], b["data"]):
        floats = df["embedding"]
        assert len(floats) == HIDDEN_SIZE
        raw = base64.b64decode(db["embedding"])
        assert len(raw) == 4 * HIDDEN_SIZE
        decoded = list(struct.unpack(f"<{HIDDEN_SIZE}f", raw))
        # JSON floats are printed from the same f32s: equal after rounding to f32.
        assert decoded == [struct.unpack("<f", struct.pack("<f", x))[0] for x in floats]
    assert f["data"][0]["embedding"] != f["data"][1]["embedding"]


def test_embeddings_default_is_float(server):
    r = _embed_raw(server, model=LLAMA, input="Hello world")
    assert isinstance(r["data"][0]["embedding"], list)
    assert len(r["data"][0]["embedding"]) == HIDDEN_SIZE


def test_embeddings_token_input(server):
    ids = tokenize(server, "Hello world", False)
    by_text = _embed_raw(server, model=LLAMA, input="Hello world")
    by_ids = _embed_raw(server, model=LLAMA, input=ids)
    by_ids_list = _embed_raw(server, model=LLAMA, input=[ids, ids])
    assert len(by_ids["data"]) == 1 and len(by_ids_list["data"]) == 2
    assert by_ids["data"][0]["embedding"] == by_ids_list["data"][1]["embedding"]
    if by_text["usage"]["prompt_tokens"] == len(ids):
        assert by_ids["data"][0]["embedding"] == by_text["data"][0]["embedding"]


def test_embeddings_official_client(client):
    """The openai package asks for base64 by default and decodes it itself."""
    r = client.embeddings.create(model=LLAMA, input=["a b c", "d e f"])
    assert len(r.data) == 2
    assert all(len(d.embedding) == HIDDEN_SIZE for d in r.data)
    f = client.embeddings.create(model=LLAMA, input=["a b c", "d e f"], encoding_format="float")
    for x, y in zip(r.data, f.data):
        assert max(abs(a - b) for a, b in zip(x.embedding, y.embedding)) < 1e-6
