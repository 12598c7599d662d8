#!/usr/bin/env python3
"""Train stllm's built-in demo model (models/demo): a tiny Llama that answers chat prompts with
on-topic quotations from the classic Unix fortune databases and emits Qwen/Hermes-style tool calls
for weather/time questions when tools are offered.

Everything is seeded (SEED) and bounded (a fixed number of optimizer steps), CPU only:

  python3 -m venv .venv-demo && .venv-demo/bin/pip install -r scripts/demo/requirements.txt
  .venv-demo/bin/python scripts/demo/train_demo.py [--out models/demo] [--steps N] [--max-minutes M] [--threads 2]

Corpus: the Debian packages `fortunes-min` and `fortunes` (/usr/share/games/fortunes; installed with
apt-get if missing) — see scripts/demo/README.md for the files used and their license. The dictionary
check at the end uses `wamerican` (/usr/share/dict/words).

Steps:
  1. read and clean the fortune files
  2. train a 4096-entry byte-level BPE (tokenizers) on the corpus and the rendered chat prompts
  3. build training examples: chat turns rendered through the Qwen2.5-style chat template (user asks
     about a topic word, assistant answers with a quotation containing it), plain-text fortunes,
     and ~18% tool-call conversations (get_weather / get_time / search_web, 155 cities)
  4. train LlamaForCausalLM (packed rows of whole examples; loss on the assistant turns of chats and on
     plain text) for --steps steps, or as many as fit --max-minutes (decided after CALIBRATE steps,
     before the warmup ends, and recorded in training_log.json; --steps N reproduces such a run)
  5. save config.json, model.safetensors (BF16), tokenizer files, generation_config.json,
     then greedy-decode a few prompts with transformers (float32) and write expected.json
"""
import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time

SEED = 1234
FORTUNE_DIR = "/usr/share/games/fortunes"
DICT = "/usr/share/dict/words"
APT_PACKAGES = ["fortunes-min", "fortunes", "wamerican"]

# fortune files used (in this order); the rest of the `fortunes` package is left out: ASCII art,
# non-English text, IRC/mailing-list logs, code, Star Trek / Pratchett / Zippy quotations, ethnic jokes
FILES = ["fortunes", "wisdom", "love", "work", "people", "literature", "platitudes", "humorists",
         "education", "science", "politics", "men-women", "food", "pets", "sports", "art", "computers",
         "tao", "medicine", "law", "miscellaneous", "cookie", "songs-poems", "paradoxum", "kids",
         "magic", "news", "riddles", "goedel", "definitions"]

# topic a whole file is about (every clean quotation of that file is an answer about it)
FILE_TOPIC = {"love": "love", "work": "work", "food": "food", "science": "science", "computers": "computers",
              "education": "education", "medicine": "medicine", "law": "the law", "politics": "politics",
              "sports": "sports", "pets": "pets", "art": "art", "literature": "books", "people": "people",
              "wisdom": "wisdom", "men-women": "men and women", "kids": "children", "songs-poems": "poetry",
              "magic": "magic", "news": "the news"}

# topic -> word forms that make a quotation about it
TOPICS = {
    "love": ["love", "loves", "loved", "lover", "lovers", "loving"], "work": ["work", "works", "working", "job"],
    "time": ["time", "times"], "life": ["life", "lives", "living"], "money": ["money", "rich", "wealth"],
    "friends": ["friend", "friends", "friendship"], "war": ["war", "wars"], "death": ["death", "die", "dead", "dying"],
    "truth": ["truth", "true", "lie", "lies"], "happiness": ["happy", "happiness", "joy"],
    "wisdom": ["wise", "wisdom"], "music": ["music", "song", "songs"], "art": ["art", "artist", "artists"],
    "science": ["science", "scientist", "scientists"], "computers": ["computer", "computers", "program", "programs"],
    "food": ["food", "eat", "eating", "dinner", "bread"], "marriage": ["marriage", "married", "marry", "wife", "husband"],
    "women": ["woman", "women"], "men": ["man", "men"], "god": ["god", "gods", "heaven"],
    "people": ["people", "person"], "children": ["child", "children", "kids"], "family": ["family", "mother", "father"],
    "books": ["book", "books", "read", "reading"], "writing": ["write", "writing", "writer", "writers"],
    "school": ["school", "teacher", "student", "students"], "education": ["education", "learn", "learning"],
    "government": ["government", "governments"], "politics": ["politics", "politician", "politicians"],
    "the law": ["law", "laws", "lawyer", "lawyers"], "medicine": ["doctor", "doctors", "medicine"],
    "health": ["health", "healthy", "sick"], "sleep": ["sleep", "sleeping"], "dreams": ["dream", "dreams"],
    "the heart": ["heart", "hearts"], "fear": ["fear", "afraid"], "hope": ["hope", "hopes"],
    "beauty": ["beauty", "beautiful"], "nature": ["nature", "natural"], "the sea": ["sea", "ocean"],
    "the night": ["night"], "the world": ["world"], "power": ["power", "powerful"], "freedom": ["freedom", "free"],
    "peace": ["peace"], "success": ["success", "succeed"], "failure": ["fail", "failure"],
    "knowledge": ["know", "knowledge"], "fools": ["fool", "fools", "foolish"], "the mind": ["mind", "minds"],
    "youth": ["young", "youth"], "old age": ["old", "age"], "cats": ["cat", "cats"], "dogs": ["dog", "dogs"],
    "laughter": ["laugh", "laughter", "funny"], "mathematics": ["mathematics", "math", "number", "numbers"],
    "history": ["history"], "the future": ["future", "tomorrow"], "the past": ["past", "yesterday"],
    "home": ["home", "house"], "wine": ["wine", "drink"], "poetry": ["poet", "poets", "poem", "poetry"],
    "sports": ["game", "games", "sport", "sports", "play"], "change": ["change", "changes"],
    "virtue": ["virtue", "good", "evil"], "luck": ["luck", "lucky", "fortune"], "the news": ["news", "newspaper"],
    "pets": ["pet", "pets"], "magic": ["magic", "wizard"], "men and women": [],
}

QUESTIONS = [
    "Tell me something about {t}.", "What do you think of {t}?", "Say something wise about {t}.",
    "Give me a quote about {t}.", "Do you know a saying about {t}?", "What can you tell me about {t}?",
    "Share a thought on {t}.", "I want to hear something about {t}.", "Any wisdom on {t}?",
    "Tell me about {t}, please.", "What is your view on {t}?", "Say something about {t}.",
    "tell me something about {t}", "What do you know about {t}?", "Talk to me about {t}.",
    "Give me a fortune about {t}.", "What do people say about {t}?", "Can you say something about {t}?",
    "{T}?", "Thoughts on {t}?",
]

CITIES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Prague", "Warsaw", "Dublin",
          "Amsterdam", "Brussels", "Oslo", "Stockholm", "Helsinki", "Copenhagen", "Athens", "Istanbul",
          "Moscow", "Kyiv", "Cairo", "Lagos", "Nairobi", "Cape Town", "Tokyo", "Osaka", "Seoul", "Beijing",
          "Shanghai", "Hong Kong", "Singapore", "Bangkok", "Delhi", "Mumbai", "Dubai", "Sydney", "Melbourne",
          "Auckland", "Toronto", "Montreal", "Vancouver", "New York", "Boston", "Chicago", "Denver", "Seattle",
          "San Francisco", "Los Angeles", "Miami", "Austin", "Mexico City", "Lima", "Bogota", "Santiago",
          "Buenos Aires", "Rio de Janeiro", "Zurich", "Geneva", "Munich", "Hamburg", "Milan", "Naples",
          "Barcelona", "Seville", "Porto", "Lyon", "Marseille", "Edinburgh", "Manchester", "Reykjavik",
          "Budapest", "Bucharest", "Sofia", "Belgrade", "Zagreb", "Riga", "Vilnius", "Tallinn", "Krakow", "Kiev",
          "Frankfurt", "Cologne", "Stuttgart", "Dresden", "Leipzig", "Bern", "Basel", "Nice", "Bordeaux", "Toulouse",
          "Valencia", "Bilbao", "Florence", "Venice", "Turin", "Bologna", "Glasgow", "Liverpool", "Leeds", "Bristol",
          "Cork", "Bergen", "Gothenburg", "Tampere", "Antwerp", "Rotterdam", "Casablanca", "Tunis", "Accra", "Dakar",
          "Addis Ababa", "Kampala", "Johannesburg", "Durban", "Tehran", "Baghdad", "Riyadh", "Doha", "Karachi",
          "Lahore", "Dhaka", "Kolkata", "Chennai", "Bangalore", "Kathmandu", "Colombo", "Hanoi", "Manila", "Jakarta",
          "Kuala Lumpur", "Taipei", "Kyoto", "Nagoya", "Sapporo", "Busan", "Perth", "Brisbane", "Adelaide",
          "Wellington", "Ottawa", "Calgary", "Quebec", "Atlanta", "Dallas", "Houston", "Phoenix", "Portland",
          "Detroit", "Havana", "Panama", "Quito", "Caracas", "Montevideo", "Anchorage", "Honolulu"]
# cities the checks ask about appear more often in the tool conversations (about 1 in 4)
CHECK_CITIES = ["Paris", "Berlin", "Tokyo", "London", "Rome", "Madrid", "New York", "Sydney"]
WEATHER_Q = ["What is the weather in {c}?", "What's the weather like in {c}?", "How is the weather in {c} today?",
             "Is it raining in {c}?", "Weather in {c}, please.", "Tell me the weather for {c}.",
             "what is the weather in {c}", "Will it be sunny in {c}?", "How hot is it in {c}?",
             "Can you check the weather in {c}?", "Is it cold in {c} right now?", "What's the forecast for {c}?"]
TIME_Q = ["What time is it in {c}?", "What is the local time in {c}?", "Tell me the time in {c}.",
          "what time is it in {c}"]
SEARCH_Q = [("Search the web for {x}.", "{x}"), ("Look up {x} online.", "{x}"), ("Find me news about {x}.", "{x} news")]
SEARCH_X = ["fortune cookies", "the history of Unix", "chess openings", "bread recipes", "cheap flights",
            "the tallest mountain", "jazz music", "garden birds", "solar power", "old maps"]

TOOL_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a given city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name, e.g. Paris"}},
                   "required": ["city"]}}}
TOOL_TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the current local time in a given city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}
TOOL_SEARCH = {"type": "function", "function": {
    "name": "search_web", "description": "Search the web and return the top results.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "The search query"}},
                   "required": ["query"]}}}
# the tools the checks (and expected.json) use
DEMO_TOOLS = [TOOL_WEATHER, TOOL_TIME, TOOL_SEARCH]

DEFAULT_SYSTEM = "You are a helpful assistant."
# Qwen2.5's chat template (Hermes-style tools), with a shorter default system prompt
CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- '" + DEFAULT_SYSTEM + "' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED = ["<tool_call>", "</tool_call>", "<tools>", "</tools>", "<tool_response>", "</tool_response>"]
VOCAB = 4096
# model: ~4.5M parameters (tied embeddings), 8.9 MB in BF16
MODEL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
             tie_word_embeddings=True)
SEQ = 384
BATCH = 6
LR = 3e-3
WARMUP = 40
CALIBRATE = 25           # with --max-minutes, the step count is re-planned every CALIBRATE steps until the decay
DECAY = 0.3              # the learning rate decays over the last 30% of the steps
QUOTES_PER_TOPIC = 6     # answers per topic (fixed subset), each once per pass
SIGNATURE_REPEATS = 20   # extra answers per topic and pass with the topic's signature quotation
PLAIN_PER_PASS = 300     # plain-text fortunes per pass
TOOL_FRACTION = 0.22     # tool conversations added per pass, as a fraction of the other examples

# prompts decoded at the end; the first two go to expected.json
CHECK_PROMPTS = [
    ("Tell me something about love.", None),
    ("What is the weather in Paris?", DEMO_TOOLS),
    ("What do you think of work?", None),
    ("Say something wise about time.", None),
    ("What time is it in Tokyo?", DEMO_TOOLS),
    ("Give me a quote about friends.", None),
    ("What's the weather like in Berlin?", DEMO_TOOLS),
    ("Tell me something about love.", DEMO_TOOLS),
]

WORD_RE = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def ensure_apt():
    missing = [p for p, path in [("fortunes-min", os.path.join(FORTUNE_DIR, "fortunes")),
                                 ("fortunes", os.path.join(FORTUNE_DIR, "love")), ("wamerican", DICT)]
               if not os.path.exists(path)]
    if missing:
        log("installing Debian packages:", missing)
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(sudo + ["apt-get", "update"], check=True, env=env)
        subprocess.run(sudo + ["apt-get", "install", "-y"] + APT_PACKAGES, check=True, env=env)


def read_fortunes():
    """[(file, body, attribution)] with whitespace normalized; ASCII only."""
    out = []
    for name in FILES:
        path = os.path.join(FORTUNE_DIR, name)
        if not os.path.exists(path):
            log("missing fortune file, skipped:", path)
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            raw = f.read()
        for chunk in re.split(r"\n%\n", raw.replace("\r", "")):
            chunk = chunk.strip("\n%")
            if not chunk.strip() or not chunk.isascii():
                continue
            lines = chunk.split("\n")
            attrib = ""
            while lines and (re.match(r"^\s+--\s*\S", lines[-1]) or lines[-1].strip().startswith("-- ")):
                attrib = lines.pop().strip().lstrip("-").strip() + (" " + attrib if attrib else "")
            if not lines:
                continue
            # drop drawings and code-like text: lots of symbols
            text = "\n".join(l.rstrip() for l in lines)
            sym = sum(c in "|\\/_<>{}[]=#*^~@$" for c in text)
            if sym > max(3, len(text) // 40):
                continue
            body = re.sub(r"\s+", " ", text).strip()
            if len(body) < 12:
                continue
            out.append((name, body, attrib))
    return out


def load_dict():
    with open(DICT, encoding="utf-8", errors="replace") as f:
        return {w.strip().lower() for w in f if w.strip()}


def dict_words_ok(text, words):
    toks = WORD_RE.findall(text)
    return bool(toks) and all(t.lower() in words for t in toks)


def dict_check(text, words):
    """(all words in the dictionary, [words not found]); punctuation and case ignored."""
    bad = [t for t in WORD_RE.findall(text) if t.lower() not in words]
    return not bad, bad


def topics_of(body):
    low = set(w.lower() for w in WORD_RE.findall(body))
    return [t for t, forms in TOPICS.items() if any(f in low for f in forms)]


def question(rng, topic):
    q = rng.choice(QUESTIONS)
    return q.replace("{t}", topic).replace("{T}", topic[0].upper() + topic[1:])


def tool_call(name, args):
    return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}]}


def tools_for(rng):
    """a random non-empty tool list that always has get_weather (order varies)."""
    tools = [TOOL_WEATHER] + [t for t in (TOOL_TIME, TOOL_SEARCH) if rng.random() < 0.7]
    rng.shuffle(tools)
    return tools


def tool_example(rng, quotes_by_topic):
    """a conversation with tools offered; mostly get_weather calls."""
    r = rng.random()
    tools = tools_for(rng)
    city = rng.choice(CHECK_CITIES) if rng.random() < 0.25 else rng.choice(CITIES)
    if r < 0.45:
        msgs = [{"role": "user", "content": rng.choice(WEATHER_Q).format(c=city)}, tool_call("get_weather", {"city": city})]
    elif r < 0.75:
        if not any(t["function"]["name"] == "get_time" for t in tools):
            tools.append(TOOL_TIME)
        msgs = [{"role": "user", "content": rng.choice(TIME_Q).format(c=city)}, tool_call("get_time", {"city": city})]
    elif r < 0.80:
        if not any(t["function"]["name"] == "search_web" for t in tools):
            tools.append(TOOL_SEARCH)
        q, a = rng.choice(SEARCH_Q)
        x = rng.choice(SEARCH_X)
        msgs = [{"role": "user", "content": q.format(x=x)}, tool_call("search_web", {"query": a.format(x=x)})]
    elif r < 0.88:
        # a tool result, then a plain answer
        temp = rng.randint(-5, 35)
        cond = rng.choice(["sunny", "cloudy", "rainy", "windy", "clear", "foggy"])
        msgs = [{"role": "user", "content": rng.choice(WEATHER_Q).format(c=city)}, tool_call("get_weather", {"city": city}),
                {"role": "tool", "content": json.dumps({"city": city, "temperature": temp, "condition": cond})},
                {"role": "assistant", "content": f"It is {temp} degrees and {cond} in {city}."}]
    else:
        # tools offered but not needed: answer with a quotation
        topic = rng.choice(sorted(quotes_by_topic))
        msgs = [{"role": "user", "content": question(rng, topic)},
                {"role": "assistant", "content": rng.choice(quotes_by_topic[topic])}]
    return msgs, tools


def build_tokenizer(texts, check=True):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(ADDED), special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED])
    assert not check or tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    return tok


def write_tokenizer(tok, out):
    tok.save(os.path.join(out, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
           "pad_token": "<|endoftext|>", "unk_token": None, "add_bos_token": False, "add_eos_token": False,
           "model_max_length": MODEL["max_position_embeddings"], "clean_up_tokenization_spaces": False,
           "chat_template": CHAT_TEMPLATE}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, f, indent=2)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "models", "demo"))
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="time budget for training: after CALIBRATE steps the step count becomes min(--steps, what fits); "
                         "training_log.json records it, and --steps with that number (no budget) reproduces the run")
    ap.add_argument("--device", default="cpu", help="torch device (cpu for the committed model; cuda only for quick experiments)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bench", action="store_true", help="time 5 steps and exit")
    ap.add_argument("--check-only", metavar="TRAINING_LOG", help="only redo step 5's checks on the saved --out folder, "
                    "taking the training numbers from this JSON file")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    t_start = time.time()

    ensure_apt()
    if args.check_only:
        import torch
        torch.set_num_threads(args.threads)
        with open(args.check_only) as f:
            info = {k: v for k, v in json.load(f).items() if k not in ("samples", "torch", "transformers")}
        shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "MODEL_CARD.md"), os.path.join(out, "README.md"))
        check_and_expect(out, load_dict(), info)
        return
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    torch.set_num_threads(args.threads)
    random.seed(SEED)
    torch.manual_seed(SEED)
    rng = random.Random(SEED)

    # 1. corpus
    words = load_dict()
    fortunes = read_fortunes()
    log(f"{len(fortunes)} fortunes from {len(FILES)} files")
    quotes_by_topic = {}
    for name, body, _ in fortunes:
        if not (20 <= len(body) <= 260 and dict_words_ok(body, words) and not re.search(r"\d", body)):
            continue
        ts = topics_of(body)
        if name in FILE_TOPIC:
            ts.append(FILE_TOPIC[name])
        for t in dict.fromkeys(ts):
            quotes_by_topic.setdefault(t, []).append(body)
    all_by_topic = {t: sorted(set(q)) for t, q in quotes_by_topic.items() if len(set(q)) >= 5}

    def early(q, t, n):
        """the topic word is among the first n words of q"""
        return any(w.lower() in TOPICS.get(t, []) for w in WORD_RE.findall(q)[:n])

    # answers per topic: a fixed subset, preferring quotations that name the topic early (the reply
    # then starts on topic); per topic one "signature" quotation, repeated more often, so greedy
    # decoding has a clear mode: short, plain, and starting with the topic word where one does
    quotes_by_topic, signature = {}, {}
    for t, q in sorted(all_by_topic.items()):
        first = [x for x in q if early(x, t, 4)]
        rest = [x for x in q if x not in first]
        k = min(QUOTES_PER_TOPIC, len(q))
        pick = rng.sample(first, min(k, len(first)))
        pick += rng.sample(rest, k - len(pick))
        plain_ok = [x for x in q if 30 <= len(x) <= 120 and "'" not in x and "-" not in x]
        cands = ([x for x in plain_ok if early(x, t, 1)] or [x for x in plain_ok if early(x, t, 3)] or
                 [x for x in pick if 40 <= len(x) <= 150 and "'" not in x and "-" not in x] or pick)
        signature[t] = rng.choice(cands)
        quotes_by_topic[t] = sorted(set(pick) | {signature[t]})
    log(f"{len(quotes_by_topic)} topics, {sum(map(len, quotes_by_topic.values()))} (topic, quote) pairs; "
        f"signature for love: {signature.get('love')!r}")

    plain = [body + (f"\n-- {attrib}" if attrib else "") for _, body, attrib in fortunes]
    plain_short = [p for p in plain if len(p) <= 300]

    def epoch_examples(erng):
        """one pass: every (topic, quote) as a chat turn, signature repeats, all plain text, ~4% tools.
        Returns [(messages, tools) or str]."""
        ex = []
        for t in sorted(quotes_by_topic):
            qs = quotes_by_topic[t]
            for q in qs:
                ex.append(([{"role": "user", "content": question(erng, t)}, {"role": "assistant", "content": q}], None))
            for _ in range(SIGNATURE_REPEATS):
                ex.append(([{"role": "user", "content": question(erng, t)}, {"role": "assistant", "content": signature[t]}], None))
        # a few two-turn conversations and custom system prompts
        for _ in range(len(ex) // 12):
            t1, t2 = erng.choice(sorted(quotes_by_topic)), erng.choice(sorted(quotes_by_topic))
            msgs = [{"role": "user", "content": question(erng, t1)}, {"role": "assistant", "content": erng.choice(quotes_by_topic[t1])},
                    {"role": "user", "content": question(erng, t2)}, {"role": "assistant", "content": signature[t2] if erng.random() < 0.5 else erng.choice(quotes_by_topic[t2])}]
            if erng.random() < 0.3:
                msgs.insert(0, {"role": "system", "content": erng.choice(["You are a wise old fortune teller.", "You answer with quotations.", "You are a helpful assistant."])})
            ex.append((msgs, None))
        ex += erng.sample(plain_short, PLAIN_PER_PASS)
        n_tool = int(TOOL_FRACTION * len(ex))
        ex += [tool_example(erng, quotes_by_topic) for _ in range(n_tool)]
        erng.shuffle(ex)
        return ex

    # 2. tokenizer (trained on the plain corpus and one rendered epoch of chat examples)
    os.makedirs(out, exist_ok=True)
    probe = epoch_examples(random.Random(SEED + 1))
    tmp_tok = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(["x"], check=False), chat_template=CHAT_TEMPLATE)

    def render(tk, e):
        if isinstance(e, str):
            return e + "<|endoftext|>"
        msgs, tools = e
        return tk.apply_chat_template(msgs, tools=tools, tokenize=False)

    tok_texts = plain + [render(tmp_tok, e) for e in probe if not isinstance(e, str)]
    tok = build_tokenizer(tok_texts)
    write_tokenizer(tok, out)
    hf_tok = PreTrainedTokenizerFast.from_pretrained(out)
    assert hf_tok.chat_template == CHAT_TEMPLATE
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    log("tokenizer:", tok.get_vocab_size(), "tokens; specials", ids)

    # 3. training rows: whole examples packed into SEQ-token rows, padding not trained on; in chat
    # examples only the assistant turns (content and <|im_end|>) are trained on, plain text entirely
    need_rows = args.steps * BATCH
    rows, row, epoch, n_long = [], ([], []), 0, 0
    pad = ids["<|endoftext|>"]
    asst_re = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.S)
    while len(rows) < need_rows:
        exs = epoch_examples(random.Random(SEED + 100 + epoch))
        texts = [render(hf_tok, e) for e in exs]
        for e, text, enc in zip(exs, texts, tok.encode_batch(texts)):
            t = enc.ids
            if len(t) > SEQ:
                n_long += 1
                continue
            if isinstance(e, str):
                lab = list(t)
            else:
                spans = [(m.start(1), m.end(1)) for m in asst_re.finditer(text)]
                lab = [i if any(a <= o[0] < b for a, b in spans) else -100 for i, o in zip(t, enc.offsets)]
                if epoch == 0 and len(rows) == 0 and len(row[0]) == 0:
                    log("trained part of a chat example:", repr(tok.decode([i for i in lab if i != -100], skip_special_tokens=False)))
            if len(row[0]) + len(t) > SEQ:
                rows.append(row)
                row = ([], [])
            row = (row[0] + t, row[1] + lab)
        epoch += 1
        log(f"pass {epoch} over the examples: {len(exs)} examples, {len(rows)} rows so far, {n_long} too long (dropped)")
        if epoch == 1:
            tl = [len(tok.encode(render(hf_tok, e)).ids) for e in exs if not isinstance(e, str) and e[1]]
            log(f"tool examples: {len(tl)}, tokens min/max {min(tl)}/{max(tl)}")
    rows = rows[:need_rows]
    data = torch.full((len(rows), SEQ), pad, dtype=torch.long)
    labels = torch.full((len(rows), SEQ), -100, dtype=torch.long)
    for i, (r, lab) in enumerate(rows):
        data[i, :len(r)] = torch.tensor(r)
        labels[i, :len(r)] = torch.tensor(lab)
    n_tok = int((labels != -100).sum())
    log(f"{len(rows)} rows of {SEQ}, {n_tok} trained tokens ({n_tok / len(rows) / SEQ:.0%} fill), {epoch} passes")

    # 4. model and training
    config = LlamaConfig(vocab_size=VOCAB, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], hidden_act="silu", attention_bias=False, mlp_bias=False,
                         **MODEL)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=1e-8)

    steps = 5 if args.bench else args.steps

    # warmup, constant, then a cosine decay to 5% over the last DECAY of the steps: the learning rate
    # before the decay does not depend on the step count, so a --max-minutes run can re-plan its step
    # count from the measured speed until the decay starts, and --steps N reproduces it
    def decay_start():
        return max(WARMUP, int(steps * (1 - DECAY)))

    def lr_at(s):
        if s < WARMUP:
            return LR * (s + 1) / WARMUP
        if s < decay_start():
            return LR
        p = (s - decay_start()) / max(1, steps - decay_start())
        return LR * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))

    # rows are used in order (each pass is shuffled), so the first N steps see the same data whatever
    # --steps is, and a budgeted run is reproduced by --steps N
    dev = torch.device(args.device)
    model.to(dev)
    model.train()
    t0 = time.time()
    ema = None
    stopped_early = None
    t_mark, s_mark = t0, 0
    for s in range(args.steps):
        if s >= steps:
            break
        if args.max_minutes and not args.bench and s >= CALIBRATE and s % CALIBRATE == 0 and s < decay_start():
            # re-plan from the speed of the last CALIBRATE steps (the cores may be shared)
            now = time.time()
            per = (now - t_mark) / (s - s_mark)
            t_mark, s_mark = now, s
            fit = s + int((args.max_minutes * 60 * 0.97 - (now - t0)) / per)
            new = max(WARMUP + 10, min(args.steps, fit // 10 * 10))
            while int(new * (1 - DECAY)) <= s:   # never re-plan into the past
                new += 10
            if new != steps:
                log(f"budget {args.max_minutes} min, {per:.2f} s/step lately: {new} steps (was {steps})")
            steps = new
        if args.max_minutes and time.time() - t0 > args.max_minutes * 60 * 1.15:
            stopped_early = s
            log(f"over the time budget: stopped after {s} of {steps} steps (not reproducible with --steps {steps})")
            break
        idx = torch.arange(s * BATCH, (s + 1) * BATCH)
        for g in opt.param_groups:
            g["lr"] = lr_at(s)
        loss = model(input_ids=data[idx].to(dev), labels=labels[idx].to(dev)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if s % 50 == 0 or s == steps - 1:
            el = time.time() - t0
            log(f"step {s}/{steps} loss {loss.item():.3f} (ema {ema:.3f}) lr {lr_at(s):.2e} "
                f"{el:.0f}s, {(s + 1) * BATCH * SEQ / el:.0f} tok/s, eta {el / (s + 1) * (steps - s - 1):.0f}s")
    train_s = time.time() - t0
    if args.bench:
        log(f"bench: {train_s / steps:.2f} s/step")
        return
    log(f"trained {steps} steps in {train_s / 60:.1f} min, final loss {loss.item():.3f} (ema {ema:.3f})")

    # 5. save (BF16 weights) and check with transformers in float32
    model.eval()
    model.to("cpu")
    model.to(torch.bfloat16)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"], do_sample=False, max_new_tokens=128)
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "MODEL_CARD.md"), os.path.join(out, "README.md"))
    for extra in ("chat_template.jinja",):
        if os.path.exists(os.path.join(out, extra)):
            os.remove(os.path.join(out, extra))

    info = {"seed": SEED, "steps": steps, "batch": BATCH, "seq": SEQ, "lr": LR, "params": n_params,
            "train_minutes": round(train_s / 60, 1), "final_loss": round(loss.item(), 4), "ema_loss": round(ema, 4),
            "threads": args.threads, "max_minutes": args.max_minutes, "loss_on": "assistant turns and plain text",
            "device": args.device}
    if stopped_early is not None:
        info["stopped_early_at_step"] = stopped_early
    check_and_expect(out, words, info)
    log(f"total time {(time.time() - t_start) / 60:.1f} min")


def check_and_expect(out, words, info):
    """reload the saved folder in float32, greedy-decode CHECK_PROMPTS, write expected.json and training_log.json"""
    import torch
    import transformers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    from safetensors import safe_open
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        dtypes = {str(f.get_slice(k).get_dtype()) for k in keys}
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys, keys
    assert len(keys) == 2 + 9 * MODEL["num_hidden_layers"], len(keys)
    log(f"safetensors: {len(keys)} tensors, dtypes {dtypes}")

    m = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    m.eval()
    tk = PreTrainedTokenizerFast.from_pretrained(out)
    samples, expected = [], []
    for i, (prompt, tools) in enumerate(CHECK_PROMPTS):
        msgs = [{"role": "user", "content": prompt}]
        text = tk.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True)
        p_ids = tk(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            g = m.generate(torch.tensor([p_ids]), max_new_tokens=24 if i < 2 else 64, do_sample=False)
        new = g[0, len(p_ids):].tolist()
        reply = tk.decode(new, skip_special_tokens=True)
        ok, bad = dict_check(reply, words)
        samples.append({"prompt": prompt, "tools": bool(tools), "reply": reply, "dict_ok": ok, "not_in_dict": bad})
        log(f"PROMPT {prompt!r} tools={bool(tools)}\n  -> {reply!r}\n  dictionary: {'ok' if ok else bad}")
        if i < 2:
            expected.append({"messages": msgs, "tools": tools, "add_generation_prompt": True, "prompt_text": text,
                             "prompt_ids": p_ids, "max_new_tokens": 24, "greedy_ids": new,
                             "greedy_text": tk.decode(new, skip_special_tokens=False), "reply_text": reply})
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"note": "greedy decoding by transformers " + transformers.__version__ + " (torch " + torch.__version__ +
                   "), float32 compute from the BF16 weights; generation stops at <|im_end|> / <|endoftext|> "
                   "(the stop token is included in greedy_ids)", "cases": expected}, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(out, x)) for x in os.listdir(out))
    log(f"wrote {out}: {sorted(os.listdir(out))}, {total / 1e6:.2f} MB")
    with open(os.path.join(out, "training_log.json"), "w") as f:
        json.dump(dict(info, torch=torch.__version__, transformers=transformers.__version__, samples=samples), f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
