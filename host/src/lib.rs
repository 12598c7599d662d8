//! stllm: an LLM inference engine that loads HuggingFace model folders directly (config.json +
//! safetensors) and runs them on ggml backends.
//!
//! Layers (see ARCHITECTURE.md): [`ggml`] (the only `unsafe`), [`loader`], [`graph`] (shared
//! blocks), [`models`] (one file per architecture), [`memory`] (KV cache), [`model`] and
//! [`runner`] (one model's KV cache and forward step over a batch of sequences), [`session`]
//! (incremental decoding of one sequence), [`engine`] (continuous batching and prefix caching
//! for many concurrent requests; `Send + Sync`), [`sampling`], [`runtime`] (wasm components),
//! [`cli`].

pub mod cli;
pub mod engine;
pub mod ggml;
pub mod graph;
pub mod loader;
pub mod lora;
pub mod memory;
pub mod model;
pub mod models;
pub mod placement;
pub mod runner;
pub mod runtime;
pub mod sampling;
pub mod session;

pub use engine::{Engine, EngineOptions, GenerateRequest};
pub use model::{Model, ModelOptions};
pub use session::{Session, SessionOptions};
