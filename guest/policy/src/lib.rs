//! stllm's default policy: the tokenizer (`tokenizers`, pure-Rust regex), chat templates
//! (`minijinja` with Python compatibility), samplers and the generation loop.
//!
//! The same code runs in two places: compiled to a wasm component (`component`, the default
//! guest the host embeds) and natively as a library, so Rust apps can use it without wasm and
//! tests can compare both paths. Everything here is plain Rust over small traits
//! ([`generate::Engine`], [`generate::Sink`]); the component module adapts the WIT imports to them.

pub mod generate;
pub mod sampling;
pub mod template;
pub mod tokenizer;
pub mod tools;

#[cfg(target_arch = "wasm32")]
mod component;

/// What went wrong, in the categories of the WIT `error` variant.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    InvalidInput(String),
    ContextFull(String),
    Cancelled,
    Internal(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::InvalidInput(m) => write!(f, "invalid input: {m}"),
            Error::ContextFull(m) => write!(f, "context full: {m}"),
            Error::Cancelled => write!(f, "cancelled"),
            Error::Internal(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for Error {}
