//! `cargo bench --bench engine`: the serving core under load, through the Engine API.
//!
//! 1. Aggregate decode tokens/s with N concurrent sequences (continuous batching): N requests of
//!    `STLLM_BENCH_PROMPT` (16) distinct prompt tokens each generate `STLLM_BENCH_GEN` (32)
//!    tokens; the decode rate counts tokens after every request's first token, over that time.
//! 2. Time to first token for a request with a `STLLM_BENCH_SYSTEM` (1000) token shared system
//!    prompt plus a 24-token question: cold (prefix-cache miss) and warm (hit, new question).
//!
//! The model is `$STLLM_BENCH_MODEL` (default: the tiny Qwen2 fixture); `STLLM_BENCH_SEQS`
//! (default "1,4,16,64"), `STLLM_BENCH_THREADS`. Prints a JSON line per measurement.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use stllm::engine::{Engine, EngineOptions, Event, GenerateRequest};
use stllm::{Model, ModelOptions};

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn tokens(seed: u32, n: usize, vocab: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (seed.wrapping_mul(7919).wrapping_add(i * 104729 + 13)) % vocab).collect()
}

fn main() {
    let dir = std::env::var_os("STLLM_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2-bf16"));
    let prompt = env_usize("STLLM_BENCH_PROMPT", 16);
    let gen = env_usize("STLLM_BENCH_GEN", 32);
    let system = env_usize("STLLM_BENCH_SYSTEM", 1000);
    let threads = env_usize("STLLM_BENCH_THREADS", stllm::default_threads());
    let seqs: Vec<usize> = std::env::var("STLLM_BENCH_SEQS")
        .unwrap_or_else(|_| "1,4,16,64".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let model = Arc::new(Model::load(&dir, &ModelOptions { threads, ..Default::default() }).expect("load model"));
    let vocab = model.hparams().n_vocab as u32;
    let arch = model.hparams().arch.clone();

    for &n in &seqs {
        let engine = Engine::new(
            model.clone(),
            EngineOptions {
                n_cells: n * (prompt + gen) + 64,
                max_seqs: n.max(1),
                prefix_cache: false,
                ..Default::default()
            },
        )
        .expect("engine");
        let t0 = Instant::now();
        let gens: Vec<_> = (0..n)
            .map(|i| {
                let req = GenerateRequest {
                    stop_tokens: Some(vec![]),
                    ..GenerateRequest::greedy(tokens(i as u32 + 1, prompt, vocab), gen)
                };
                engine.generate(req).expect("submit")
            })
            .collect();
        // Each request on its own thread, recording when its tokens arrive.
        let handles: Vec<_> = gens
            .into_iter()
            .map(|g| {
                std::thread::spawn(move || {
                    let mut times = Vec::new();
                    for ev in g {
                        if let Event::Token(_) = ev {
                            times.push(Instant::now());
                        }
                    }
                    times
                })
            })
            .collect();
        let times: Vec<Vec<Instant>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let end = Instant::now();
        let all_first = times.iter().map(|t| t[0]).max().unwrap();
        let after: usize = times.iter().map(|t| t.iter().filter(|&&x| x > all_first).count()).sum();
        let decode = after as f64 / (end - all_first).as_secs_f64();
        let total = (n * gen) as f64 / (end - t0).as_secs_f64();
        let ttft_ms: f64 = times.iter().map(|t| (t[0] - t0).as_secs_f64() * 1e3).sum::<f64>() / n as f64;
        let st = engine.stats();
        println!(
            "{{\"bench\":\"concurrent\",\"arch\":\"{arch}\",\"threads\":{threads},\"seqs\":{n},\"prompt\":{prompt},\"gen\":{gen},\
             \"decode_tok_s\":{decode:.2},\"overall_tok_s\":{total:.2},\"mean_ttft_ms\":{ttft_ms:.1},\"steps\":{}}}",
            st.steps
        );
    }

    if system > 0 {
        let engine = Engine::new(
            model.clone(),
            EngineOptions { n_cells: 2 * (system + 64) + 64, max_seqs: 4, ..Default::default() },
        )
        .expect("engine");
        let sys_prompt = tokens(1000, system, vocab);
        for (label, q) in [("miss", 1u32), ("hit", 2), ("hit", 3)] {
            let mut p = sys_prompt.clone();
            p.extend(tokens(q * 31, 24, vocab));
            let t0 = Instant::now();
            let mut g = engine.generate(GenerateRequest::greedy(p, 1)).expect("submit");
            let first = g.next();
            let ttft = t0.elapsed().as_secs_f64() * 1e3;
            assert!(matches!(first, Some(Event::Token(_))));
            let (_, f) = g.wait();
            println!(
                "{{\"bench\":\"ttft\",\"arch\":\"{arch}\",\"threads\":{threads},\"system\":{system},\"question\":24,\
                 \"prefix\":\"{label}\",\"cached_tokens\":{},\"ttft_ms\":{ttft:.1}}}",
                f.cached_tokens
            );
        }
    }
}
