//! stllm: an LLM inference engine that loads HuggingFace model folders directly (config.json +
//! safetensors) and runs them on ggml backends.
//!
//! Layers (see ARCHITECTURE.md): [`ggml`] (the only `unsafe`), [`loader`], [`graph`] (shared
//! blocks), [`models`] (one file per architecture), [`memory`] (KV cache), [`model`] and
//! [`session`] (loaded weights; incremental decoding of one sequence), [`sampling`], [`cli`].

pub mod cli;
pub mod ggml;
pub mod graph;
pub mod loader;
pub mod memory;
pub mod model;
pub mod models;
pub mod runner;
pub mod runtime;
pub mod sampling;
pub mod session;

pub use model::{Model, ModelOptions};
pub use session::{Session, SessionOptions};
