//! Shared graph blocks: everything a model file calls more than once lives here.
//!
//! A model's `build` receives a [`Forward`]: the compute context, the graph being built, this
//! step's input tensors and the KV cache. Blocks take weight structs, not long argument lists.

pub mod attention;
pub mod decoder;
pub mod ffn;
pub mod norm;
pub mod rope;

use crate::ggml::{Context, Graph, Tensor};
use crate::memory::kv::KvCache;

/// Input tensors of one forward step (filled by the session after allocation).
#[derive(Debug, Clone, Copy)]
pub struct StepInputs {
    /// I32 [n_tokens]: token ids
    pub tokens: Tensor,
    /// I32 [n_tokens]: absolute positions
    pub pos: Tensor,
    /// F32 [n_kv, n_tokens]: 0 where a token may attend, -inf elsewhere (causal)
    pub mask: Tensor,
    /// Same for sliding-window layers, when the model has any
    pub mask_swa: Option<Tensor>,
    /// I32 [n_out]: which token rows to compute logits for
    pub out_ids: Tensor,
}

/// One forward step being built.
pub struct Forward<'a> {
    pub ctx: &'a Context,
    pub graph: &'a mut Graph,
    pub inp: StepInputs,
    pub kv: &'a KvCache,
    /// Cells already in the cache before this step (this step writes cells n_past..n_past+n_tokens)
    pub n_past: usize,
    pub n_tokens: usize,
    /// Per-layer hidden states to read back (debugging / parity), if requested
    pub taps: Option<Vec<Tensor>>,
    /// Return the final normalised hidden states `[n_embd, n_out]` instead of logits
    pub embeddings: bool,
}

impl Forward<'_> {
    /// Cells attended to in this step.
    pub fn n_kv(&self) -> usize {
        self.n_past + self.n_tokens
    }

    /// Record a hidden state for read-back when taps are on.
    pub fn tap(&mut self, t: Tensor) {
        if let Some(taps) = &mut self.taps {
            taps.push(t.set_output());
        }
    }
}
