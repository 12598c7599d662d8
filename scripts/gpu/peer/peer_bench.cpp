// peer-bench: stllm's own llama.cpp benchmark harness, written against llama.h (the crate that
// vendors llama.cpp strips its tools, so llama-bench and llama-batched-bench are not available).
// It measures what scripts/gpu/bench.sh compares stllm with, on the same GGUF model, and prints one
// JSON line per measurement (keys as stllm bench --json, so bench_summary.py reads both):
//
//   single   prefill of --prompt random tokens into an empty KV cache (TTFT: llama_decode of the
//            whole prompt, logits of the last token only, then llama_synchronize), and decode of
//            --gen tokens one at a time after --depth tokens already in the cache (each step one
//            llama_decode + llama_synchronize; the tokens are random, no sampling), best of --repeat
//            (the mean is printed too). One untimed warm-up (prompt + 1 token) first.
//   batched  for each N of --npl: N sequences of --prompt random tokens prefilled together (batches
//            of n_batch tokens), then --gen steps of one token per sequence (a batch of N tokens,
//            logits for all); decode_tok_s = N * gen / decode time. One context per KV layout:
//            kv_unified = true (one KV buffer shared by all sequences) and false (n_ctx / n_seq_max
//            cells per sequence), --kv both|unified|split; n_seq_max = the largest N and n_ctx =
//            --ctx (default largest N x (prompt + gen)). Each N gets an untimed warm-up pass
//            (prefill + 4 steps) first; best of --repeat.
//
// Usage: peer-bench -m MODEL.gguf [--ngl 99] [--fa 1] [--threads N] [--backend-dir DIR] [-v]
//          single  [--prompt 512] [--gen 128] [--depth 512] [--repeat 3]
//          batched [--npl 1,8,32] [--prompt 128] [--gen 128] [--ctx N] [--kv both] [--repeat 1]
// Backend modules (GGML_BACKEND_DL builds): loaded from --backend-dir, else from the executable's
// folder (ggml_backend_load_all).

#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

bool g_verbose = false;

void log_cb(ggml_log_level level, const char * text, void *) {
    if (g_verbose || level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

[[noreturn]] void die(const std::string & msg) {
    fprintf(stderr, "peer-bench: %s\n", msg.c_str());
    exit(1);
}

double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

std::string json_str(const std::string & s) {
    std::string o = "\"";
    for (char c : s) {
        if (c == '"' || c == '\\') {
            o += '\\';
            o += c;
        } else if ((unsigned char) c < 0x20) {
            char b[8];
            snprintf(b, sizeof b, "\\u%04x", c);
            o += b;
        } else {
            o += c;
        }
    }
    return o + "\"";
}

std::vector<int> parse_list(const char * s) {
    std::vector<int> v;
    for (const char * p = s; *p;) {
        v.push_back(atoi(p));
        const char * c = strchr(p, ',');
        if (!c) break;
        p = c + 1;
    }
    return v;
}

struct Opts {
    std::string model, backend_dir, mode = "single", kv = "both";
    int ngl = 99, fa = 1, threads = 0, prompt = -1, gen = 128, depth = 512, repeat = -1, ctx = 0;
    std::vector<int> npl = {1, 8, 32};
};

struct Rng {
    std::mt19937 gen{42};
    int n_vocab;
    llama_token next() { return (llama_token) (gen() % (unsigned) n_vocab); }
};

// Decode n tokens of sequence `seq` from position pos0 in chunks of n_batch; logits on the last.
void fill(llama_context * ctx, llama_batch & b, int n_batch, Rng & rng, int seq, int pos0, int n) {
    for (int i0 = 0; i0 < n; i0 += n_batch) {
        int m = std::min(n_batch, n - i0);
        b.n_tokens = m;
        for (int i = 0; i < m; i++) {
            b.token[i] = rng.next();
            b.pos[i] = pos0 + i0 + i;
            b.n_seq_id[i] = 1;
            b.seq_id[i][0] = seq;
            b.logits[i] = i0 + i == n - 1;
        }
        if (llama_decode(ctx, b) != 0) die("llama_decode failed (prefill)");
    }
}

struct Env {
    llama_model * model;
    std::string engine, device;
    int n_vocab;
};

llama_context * make_ctx(const Env & env, const Opts & o, int n_ctx, int n_seq, bool unified, int n_batch) {
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_batch = n_batch;
    cp.n_ubatch = 512;
    cp.n_seq_max = n_seq;
    cp.kv_unified = unified;
    cp.flash_attn_type = o.fa ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.no_perf = true;
    if (o.threads > 0) cp.n_threads = cp.n_threads_batch = o.threads;
    llama_context * ctx = llama_init_from_model(env.model, cp);
    if (!ctx) die("llama_init_from_model failed");
    return ctx;
}

void run_single(const Env & env, const Opts & o) {
    int prompt = o.prompt < 0 ? 512 : o.prompt, repeat = o.repeat < 0 ? 3 : o.repeat;
    int n_ctx = std::max(prompt, o.depth + o.gen) + 1;
    const int n_batch = 2048;
    llama_context * ctx = make_ctx(env, o, n_ctx, 1, true, n_batch);
    llama_memory_t mem = llama_get_memory(ctx);
    llama_batch b = llama_batch_init(n_batch, 0, 1);
    Rng rng{std::mt19937(42), env.n_vocab};

    auto pp = [&]() {
        llama_memory_clear(mem, false);
        llama_synchronize(ctx);
        double t0 = now_ms();
        fill(ctx, b, n_batch, rng, 0, 0, prompt);
        llama_synchronize(ctx);
        return now_ms() - t0;
    };
    auto tg = [&](int depth, int n) {
        llama_memory_clear(mem, false);
        if (depth > 0) fill(ctx, b, n_batch, rng, 0, 0, depth);
        llama_synchronize(ctx);
        double t0 = now_ms();
        for (int i = 0; i < n; i++) {
            b.n_tokens = 1;
            b.token[0] = rng.next();
            b.pos[0] = depth + i;
            b.n_seq_id[0] = 1;
            b.seq_id[0][0] = 0;
            b.logits[0] = true;
            if (llama_decode(ctx, b) != 0) die("llama_decode failed (decode)");
            llama_synchronize(ctx);
        }
        return now_ms() - t0;
    };
    pp();
    tg(prompt, 1);  // warm-up
    double pp_best = 1e300, pp_sum = 0, tg_best = 1e300, tg_sum = 0;
    for (int r = 0; r < repeat; r++) {
        double t = pp();
        pp_best = std::min(pp_best, t);
        pp_sum += t;
    }
    for (int r = 0; r < repeat && o.gen > 0; r++) {
        double t = tg(o.depth, o.gen);
        tg_best = std::min(tg_best, t);
        tg_sum += t;
    }
    printf("{\"bench\": \"single\", \"engine\": %s, \"device\": %s, \"prompt\": %d, \"gen\": %d, \"depth\": %d, "
           "\"repeat\": %d, \"ttft_ms\": %.3f, \"ttft_ms_mean\": %.3f, \"prefill_tok_s\": %.2f, "
           "\"decode_tok_s\": %.2f, \"decode_tok_s_mean\": %.2f}\n",
           json_str(env.engine).c_str(), json_str(env.device).c_str(), prompt, o.gen, o.depth, repeat, pp_best,
           pp_sum / repeat, prompt / (pp_best / 1e3), o.gen ? o.gen / (tg_best / 1e3) : 0.0,
           o.gen ? o.gen * repeat / (tg_sum / 1e3) : 0.0);
    fflush(stdout);
    llama_batch_free(b);
    llama_free(ctx);
}

void run_batched(const Env & env, const Opts & o) {
    int prompt = o.prompt < 0 ? 128 : o.prompt, repeat = o.repeat < 0 ? 1 : o.repeat;
    int n_seq = *std::max_element(o.npl.begin(), o.npl.end());
    int n_ctx = o.ctx > 0 ? o.ctx : n_seq * (prompt + o.gen);
    const int n_batch = std::max(2048, n_seq);
    std::vector<bool> layouts;
    if (o.kv != "unified") layouts.push_back(false);
    if (o.kv != "split") layouts.push_back(true);
    for (bool unified : layouts) {
        llama_context * ctx = make_ctx(env, o, n_ctx, n_seq, unified, n_batch);
        llama_memory_t mem = llama_get_memory(ctx);
        llama_batch b = llama_batch_init(n_batch, 0, 1);
        Rng rng{std::mt19937(42), env.n_vocab};
        // One pass: prefill N sequences, then `steps` decode steps; returns {prefill ms, decode ms}.
        auto pass = [&](int npl, int steps) {
            llama_memory_clear(mem, false);
            llama_synchronize(ctx);
            double t0 = now_ms();
            int total = npl * prompt;
            for (int i0 = 0; i0 < total; i0 += n_batch) {
                int m = std::min(n_batch, total - i0);
                b.n_tokens = m;
                for (int i = 0; i < m; i++) {
                    int k = i0 + i, s = k / prompt, p = k % prompt;
                    b.token[i] = rng.next();
                    b.pos[i] = p;
                    b.n_seq_id[i] = 1;
                    b.seq_id[i][0] = s;
                    b.logits[i] = p == prompt - 1;
                }
                if (llama_decode(ctx, b) != 0) die("llama_decode failed (batched prefill)");
            }
            llama_synchronize(ctx);
            double t1 = now_ms();
            for (int g = 0; g < steps; g++) {
                b.n_tokens = npl;
                for (int s = 0; s < npl; s++) {
                    b.token[s] = rng.next();
                    b.pos[s] = prompt + g;
                    b.n_seq_id[s] = 1;
                    b.seq_id[s][0] = s;
                    b.logits[s] = true;
                }
                if (llama_decode(ctx, b) != 0) die("llama_decode failed (batched decode): KV cache full? raise --ctx");
                llama_synchronize(ctx);
            }
            return std::make_pair(t1 - t0, now_ms() - t1);
        };
        for (int npl : o.npl) {
            pass(npl, std::min(4, o.gen));  // warm-up
            double pp_best = 1e300, tg_best = 1e300;
            for (int r = 0; r < repeat; r++) {
                auto [pp, tg] = pass(npl, o.gen);
                pp_best = std::min(pp_best, pp);
                tg_best = std::min(tg_best, tg);
            }
            printf("{\"bench\": \"concurrent\", \"engine\": %s, \"device\": %s, \"seqs\": %d, \"kv_unified\": %s, "
                   "\"n_ctx\": %u, \"prompt\": %d, \"gen\": %d, \"repeat\": %d, \"prefill_ms\": %.3f, "
                   "\"prefill_tok_s\": %.2f, \"decode_ms\": %.3f, \"decode_tok_s\": %.2f}\n",
                   json_str(env.engine).c_str(), json_str(env.device).c_str(), npl, unified ? "true" : "false",
                   llama_n_ctx(ctx), prompt, o.gen, repeat, pp_best, npl * prompt / (pp_best / 1e3), tg_best,
                   npl * o.gen / (tg_best / 1e3));
            fflush(stdout);
        }
        llama_batch_free(b);
        llama_free(ctx);
    }
}

}  // namespace

int main(int argc, char ** argv) {
    Opts o;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        auto val = [&]() -> const char * {
            if (i + 1 >= argc) die("missing value after " + a);
            return argv[++i];
        };
        if (a == "-m" || a == "--model") o.model = val();
        else if (a == "--ngl") o.ngl = atoi(val());
        else if (a == "--fa") o.fa = atoi(val());
        else if (a == "--threads") o.threads = atoi(val());
        else if (a == "--backend-dir") o.backend_dir = val();
        else if (a == "--prompt") o.prompt = atoi(val());
        else if (a == "--gen") o.gen = atoi(val());
        else if (a == "--depth") o.depth = atoi(val());
        else if (a == "--repeat") o.repeat = atoi(val());
        else if (a == "--ctx") o.ctx = atoi(val());
        else if (a == "--kv") o.kv = val();
        else if (a == "--npl") o.npl = parse_list(val());
        else if (a == "-v") g_verbose = true;
        else if (a == "single" || a == "batched") o.mode = a;
        else die("unknown argument " + a + " (see the header of scripts/gpu/peer/peer_bench.cpp)");
    }
    if (o.model.empty()) die("-m MODEL.gguf is required");
    if (o.npl.empty() || *std::min_element(o.npl.begin(), o.npl.end()) < 1) die("--npl needs positive counts");
    if (o.kv != "both" && o.kv != "unified" && o.kv != "split") die("--kv must be both, unified or split");
    if (o.repeat == 0) die("--repeat must be at least 1");

    llama_log_set(log_cb, nullptr);
    if (!o.backend_dir.empty()) ggml_backend_load_all_from_path(o.backend_dir.c_str());
    else ggml_backend_load_all();
    llama_backend_init();

    Env env{};
    for (size_t i = 0; i < ggml_backend_dev_count(); i++) {
        ggml_backend_dev_t d = ggml_backend_dev_get(i);
        if (ggml_backend_dev_type(d) == GGML_BACKEND_DEVICE_TYPE_GPU && env.device.empty()) {
            env.device = std::string(ggml_backend_dev_name(d)) + " (" + ggml_backend_dev_description(d) + ")";
        }
    }
    if (env.device.empty() || o.ngl == 0) env.device = "CPU";
    // ggml_commit() is what ggml's CMake found in the enclosing git repository (stllm's when built
    // from prepare.sh's tree), so only the version is named.
    env.engine = std::string("llama.cpp (ggml ") + ggml_version() + ") via scripts/gpu/peer/peer_bench.cpp";

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = o.ngl;
    env.model = llama_model_load_from_file(o.model.c_str(), mp);
    if (!env.model) die("cannot load " + o.model);
    env.n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(env.model));
    if (env.n_vocab <= 0) die("the model has no vocabulary size");

    if (o.mode == "single") run_single(env, o);
    else run_batched(env, o);
    llama_model_free(env.model);
    llama_backend_free();
    return 0;
}
