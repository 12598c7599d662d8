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
    /// [n_kv, n_tokens] (F16 for flash attention, else F32): 0 where a token may attend (a cell
    /// of its own sequence at an earlier or equal position), -inf elsewhere
    pub mask: Tensor,
    /// Same for sliding-window layers, when the model has any
    pub mask_swa: Option<Tensor>,
    /// I32 [n_out]: which token rows to compute logits for
    pub out_ids: Tensor,
    /// I64 [n_tokens]: the KV cell each token's K/V row is written to
    pub kv_idxs: Tensor,
}

/// One forward step being built.
pub struct Forward<'a> {
    pub ctx: &'a Context,
    pub graph: &'a mut Graph,
    pub inp: StepInputs,
    pub kv: &'a KvCache,
    /// Cells attended to in this step (`0..n_kv`, this step's cells included)
    pub n_kv: usize,
    pub n_tokens: usize,
    /// Per-layer hidden states to read back (debugging / parity), if requested
    pub taps: Option<Vec<Tensor>>,
    /// Return the final normalised hidden states `[n_embd, n_out]` instead of logits
    pub embeddings: bool,
    /// Fused flash attention (else softmax(KQ)·V with V transposed on the fly)
    pub flash_attn: bool,
}

impl Forward<'_> {
    /// Record a hidden state for read-back when taps are on.
    pub fn tap(&mut self, t: Tensor) {
        if let Some(taps) = &mut self.taps {
            taps.push(t.set_output());
        }
    }
}
