//! Embedding the serving core in a Rust application: one [`Engine`] shared by many threads,
//! each streaming its own request; a request cancelled mid-way; the engine's stats at the end.
//! The native tokenizer (the policy crate's, the same code the wasm component runs) turns text
//! into tokens and streamed tokens back into text.
//!
//! `cargo run --release --example serve_threads -- tests/fixtures/qwen3-bf16`

use std::sync::Arc;

use stllm::engine::{Engine, EngineOptions, Event, GenerateRequest};
use stllm::{Model, ModelOptions};
use stllm_policy::tokenizer::{DecodeState, Tokenizer};

fn main() -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "tests/fixtures/qwen3-bf16".into()));
    let model = Arc::new(Model::load(&dir, &ModelOptions::default())?);
    let tok = Arc::new(Tokenizer::new(
        &std::fs::read_to_string(dir.join("tokenizer.json"))?,
        std::fs::read_to_string(dir.join("tokenizer_config.json")).ok().as_deref(),
    )?);
    let engine = Arc::new(Engine::new(model, EngineOptions { n_cells: 4096, ..Default::default() })?);

    let system = "You are a terse assistant. Answer in one line. ";
    let questions = ["What is a KV cache?", "Why batch requests?", "What is a prefix cache?", "Name a prime."];
    let workers: Vec<_> =
        questions
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let (engine, tok) = (engine.clone(), tok.clone());
                let prompt = tok.encode(&format!("{system}{q}"), true).expect("tokenize");
                std::thread::spawn(move || -> anyhow::Result<String> {
                    let g = engine.generate(GenerateRequest::greedy(prompt, 24))?;
                    let id = g.id();
                    let (mut text, mut st) = (String::new(), DecodeState::default());
                    for ev in g {
                        match ev {
                            Event::Token(t) => {
                                if let Some(piece) = tok.decode_step(&mut st, t, true)? {
                                    text.push_str(&piece);
                                }
                                // The last worker changes its mind after 5 tokens.
                                if i == 3 && st_len(&text) >= 5 {
                                    engine.cancel(id);
                                }
                            }
                            Event::Done(f) => {
                                text.push_str(&format!(
                                "  [{:?}; {} tokens, {} prompt tokens from the prefix cache, first token after {:?}]",
                                f.reason, f.generated, f.cached_tokens, f.time_to_first_token.unwrap_or_default()
                            ));
                            }
                        }
                    }
                    Ok(text)
                })
            })
            .collect();
    for (q, w) in questions.iter().zip(workers) {
        println!("{q}\n  -> {}", w.join().expect("worker panicked")?);
    }
    engine.wait_idle(std::time::Duration::from_secs(10));
    let s = engine.stats();
    println!(
        "stats: {} requests, {} tokens in {} steps, KV {}/{} cells ({} cached), prefix hits {} / misses {}",
        s.requests_finished,
        s.tokens_generated,
        s.steps,
        s.kv_cells_used,
        s.kv_cells,
        s.kv_cells_cached,
        s.prefix_hits,
        s.prefix_misses
    );
    Ok(())
}

/// Rough length in words, to decide when to cancel.
fn st_len(text: &str) -> usize {
    text.split_whitespace().count()
}
