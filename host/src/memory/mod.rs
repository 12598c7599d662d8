//! Model memory that persists across steps: the KV cache of attention layers.

pub mod kv;
