//! Model memory that persists across steps: the KV cache of attention layers, and prompt-cache
//! files that save and restore it.

pub mod kv;
pub mod state;
