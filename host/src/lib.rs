//! stllm: an LLM inference engine that loads HuggingFace model folders directly (config.json +
//! safetensors) and runs them on ggml backends.
//!
//! Layers (see ARCHITECTURE.md): `ggml` (the only `unsafe`), [`loader`], `graph` (shared
//! blocks), `models` (one file per architecture), `memory` (KV cache) — these three and
//! `ggml` are internal — [`model`] and
//! [`runner`] (one model's KV cache and forward step over a batch of sequences), [`session`]
//! (incremental decoding of one sequence), [`engine`] (continuous batching and prefix caching
//! for many concurrent requests; `Send + Sync`), [`sampling`], [`runtime`] (wasm components),
//! [`cli`] and [`server`] (`stllm serve`, an OpenAI-compatible HTTP server; both behind the
//! default `cli` feature).
//!
//! The shortest use (the README's embedding example):
//!
//! ```
//! use std::sync::Arc;
//! use stllm::{Engine, EngineOptions, GenerateRequest, Model, ModelOptions};
//!
//! let model = Arc::new(Model::load("tests/fixtures/llama-f32".as_ref(), &ModelOptions::default())?);
//! let engine = Engine::new(model, EngineOptions { n_cells: 256, ..Default::default() })?;
//! // Greedy, 8 tokens after a prompt of token ids; requests from other threads share the steps.
//! let (tokens, summary) = engine.generate(GenerateRequest::greedy(vec![1, 2, 3], 8))?.wait();
//! assert!(!tokens.is_empty() && tokens.len() <= 8);
//! println!("{tokens:?} ({:?}, first token after {:?})", summary.reason, summary.time_to_first_token);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[cfg(feature = "cli")]
pub mod cli;
pub mod engine;
pub mod files;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod ggml;
pub(crate) mod graph;
pub mod hub;
pub mod loader;
pub mod lora;
pub(crate) mod memory;
pub mod model;
pub(crate) mod models;
pub(crate) mod placement;
pub mod progress;
pub mod runner;
pub mod runtime;
pub mod sampling;
#[cfg(feature = "cli")]
pub mod server;
pub mod session;

pub use engine::{Engine, EngineOptions, GenerateRequest};
/// The internal layers (`ggml`, `graph`, `models`, `memory`, `placement`) are not public API;
/// what callers need of them is re-exported here.
pub use ggml::{default_threads, devices, load_backends_from, DType, GgmlError};
pub use memory::state::StateError;
pub use model::{Model, ModelOptions};
pub use session::{Session, SessionOptions};
