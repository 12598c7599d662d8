//! Model memory that persists across steps: the KV cache of attention layers (tensors in
//! [`kv`], which cells hold which sequence in [`cells`]), and prompt-cache files that save and
//! restore a sequence ([`state`]).

pub mod cells;
pub mod kv;
pub mod recurrent;
pub mod state;
