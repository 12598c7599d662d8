//! `cargo bench --bench boundary`: what the WIT boundary costs. Generates the same tokens with
//! the policy code running natively over a `Session` and inside the wasm component, and reports
//! the time per token of each, plus component start-up (cold compile and cached).
//!
//! Model: `$STLLM_BENCH_MODEL` (a folder with tokenizer.json), else the tiny llama fixture.
//! `STLLM_BENCH_GEN` tokens (default 64), `STLLM_BENCH_THREADS`.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use stllm::runtime::{GenerateRequest, ModelHandle, Prompt, Runtime, RuntimeConfig, Sampling};
use stllm::{Model, ModelOptions, Session, SessionOptions};

struct Null;

impl stllm_policy::generate::Sink for Null {
    fn emit(&mut self, _: &str, _: &[u32]) -> bool {
        true
    }
}

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn main() {
    let dir = std::env::var_os("STLLM_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-f32"));
    let gen = env_usize("STLLM_BENCH_GEN", 64) as u32;
    let threads = env_usize("STLLM_BENCH_THREADS", stllm::default_threads());
    let model = Arc::new(Model::load(&dir, &ModelOptions { threads, ..Default::default() }).expect("load model"));
    let prompt_text = "The quick brown fox jumps over the lazy dog. Tell me a story about it.";

    // Component start-up: cold (empty cache) and cached.
    let cold_dir = tempfile::tempdir().unwrap();
    let handle = Arc::new(ModelHandle::from_dir(&dir, Some(model.clone())).unwrap());
    let cfg = RuntimeConfig { cache_dir: Some(cold_dir.path().to_path_buf()), ..Default::default() };
    let t0 = Instant::now();
    drop(Runtime::new(handle.clone(), cfg.clone()).unwrap());
    let cold = t0.elapsed();
    let t0 = Instant::now();
    let rt = Runtime::new(handle.clone(), cfg).unwrap();
    let cached = t0.elapsed();
    println!(
        "component load: cold compile {:.0} ms, from cache {:.0} ms",
        cold.as_secs_f64() * 1e3,
        cached.as_secs_f64() * 1e3
    );

    let trt = tokio::runtime::Runtime::new().unwrap();
    let tj = std::fs::read_to_string(dir.join("tokenizer.json")).unwrap();
    let cj = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok();
    let tok = stllm_policy::tokenizer::Tokenizer::new(&tj, cj.as_deref()).unwrap();
    let prompt = tok.encode(prompt_text, true).unwrap();
    // first request: instance creation + tokenizer parse inside the guest
    let t0 = Instant::now();
    trt.block_on(rt.tokenize("warm up", false)).unwrap();
    println!("first guest call (instantiate + parse tokenizer.json): {:.0} ms", t0.elapsed().as_secs_f64() * 1e3);

    for (label, temperature, top_k) in
        [("greedy (decode-top k=1)", 0.0f32, 0u32), ("temperature 1, full vocabulary", 1.0, 0)]
    {
        let sampling = Sampling { temperature, top_k, seed: 1, ..Default::default() };
        let req = GenerateRequest {
            prompt: Prompt::Tokens(prompt.clone()),
            tools_json: None,
            max_tokens: gen,
            stop: vec![],
            ignore_eos: true,
            sampling,
            adapters: None,
            logprobs: None,
            parse_tool_calls: false,
        };
        let mut best_wasm = f64::MAX;
        let mut best_native = f64::MAX;
        for _ in 0..3 {
            let t0 = Instant::now();
            let w = trt.block_on(rt.generate(&req, |_, _| true, Arc::new(AtomicBool::new(false)))).unwrap();
            best_wasm = best_wasm.min(t0.elapsed().as_secs_f64());

            let t0 = Instant::now();
            let mut sess = Session::new(
                model.clone(),
                &SessionOptions { n_ctx: Some(prompt.len() + gen as usize), ..Default::default() },
            )
            .unwrap();
            let nreq = stllm_policy::generate::Request {
                max_tokens: gen,
                stop: vec![],
                ignore_eos: true,
                sampling: stllm_policy::sampling::SamplingParams { temperature, top_k, seed: 1, ..Default::default() },
                ..Default::default()
            };
            let n = stllm_policy::generate::generate(&tok, &mut sess, &prompt, &nreq, &[], &mut Null, None).unwrap();
            best_native = best_native.min(t0.elapsed().as_secs_f64());
            assert_eq!(n.tokens, w.tokens, "native and wasm loops must agree");
        }
        let per = |t: f64| t / gen as f64 * 1e3;
        println!(
            "{label}: {gen} tokens, native loop {:.2} ms/token, wasm policy {:.2} ms/token, boundary + guest overhead {:+.2} ms/token ({:+.1}%)",
            per(best_native),
            per(best_wasm),
            per(best_wasm) - per(best_native),
            (best_wasm / best_native - 1.0) * 100.0
        );
    }
}
