//! `cargo bench --bench decode`: prefill and decode tokens/s of one model through the library
//! API. The model is `$STLLM_BENCH_MODEL` (a HuggingFace folder), else the tiny Qwen2 fixture.
//! Knobs: `STLLM_BENCH_PROMPT` (default 128), `STLLM_BENCH_GEN` (32), `STLLM_BENCH_THREADS`.
//! For comparisons with peers use benches/compare_cpu.sh, which runs them in the same session.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use stllm::session::Logits;
use stllm::{Model, ModelOptions, Session, SessionOptions};

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn main() {
    let dir = std::env::var_os("STLLM_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2-bf16"));
    let prompt = env_usize("STLLM_BENCH_PROMPT", 128);
    let gen = env_usize("STLLM_BENCH_GEN", 32);
    let threads = env_usize("STLLM_BENCH_THREADS", stllm::default_threads());
    let model = Arc::new(Model::load(&dir, &ModelOptions { threads, ..Default::default() }).expect("load model"));
    let n_vocab = model.hparams().n_vocab as u32;
    let opts = SessionOptions { n_ctx: Some(prompt + gen + 1), ..Default::default() };
    let mut s = Session::new(model.clone(), &opts).expect("session");
    let tokens: Vec<u32> = (0..prompt as u32).map(|i| (i * 7919 + 13) % n_vocab).collect();
    for round in 0..3 {
        s.reset();
        let t0 = Instant::now();
        let l = s.decode(&tokens, Logits::Last).expect("prefill");
        let pp = t0.elapsed().as_secs_f64();
        let mut t = stllm::sampling::argmax(&l[0]);
        let t1 = Instant::now();
        for _ in 0..gen {
            t = stllm::sampling::argmax(&s.decode(&[t], Logits::Last).expect("decode")[0]);
        }
        let tg = t1.elapsed().as_secs_f64();
        println!(
            "round {round}: {} prefill {prompt} tok: {:.1} tok/s, decode {gen} tok: {:.2} tok/s ({threads} threads)",
            model.hparams().arch,
            prompt as f64 / pp,
            gen as f64 / tg
        );
    }
}
