//! Shared graph blocks: everything a model file calls more than once lives here.
//!
//! A model's `build` receives a [`Forward`]: the compute context, the graph being built, this
//! step's input tensors and the KV cache. Blocks take weight structs, not long argument lists.

pub mod attention;
pub mod decoder;
pub mod ffn;
pub mod mamba;
pub mod moe;
pub mod norm;
pub mod rope;

use crate::ggml::{Context, Graph, Tensor};
use crate::memory::kv::KvCache;
use crate::memory::recurrent::RecurrentCache;

/// A step's recurrent inputs (hybrid models): the state cache and the slot of each of the
/// step's `n_seqs` sequences (I32), which hold `n_seq_tokens` tokens each, sequence-major.
pub struct RsInputs<'a> {
    pub cache: &'a RecurrentCache,
    pub ids: Tensor,
    pub n_seqs: usize,
    pub n_seq_tokens: usize,
}

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
    /// I32 [n_seqs]: the recurrent-state slot of each sequence (hybrid models)
    pub rs_ids: Option<Tensor>,
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
    /// Row ranges `(first, len)` of the tokens attended to in separate flash-attention calls
    /// (see [`attn_segments`]); empty: one call for all rows.
    pub attn_segments: Vec<(usize, usize)>,
    /// Recurrent state inputs, for models with Mamba layers
    pub rs: Option<RsInputs<'a>>,
    /// LoRA adapters active in this step (see [`crate::lora`])
    pub lora: &'a [crate::lora::ActiveLora<'a>],
    /// With two or more adapters: their matrices stacked, gathered per token
    pub lora_stack: Option<crate::lora::StackInputs<'a>>,
}

/// How to split a batch's rows for flash attention. ggml's CPU kernel tiles 64 query rows at a
/// time and skips a KV tile only when it is masked for all of them; rows of many different
/// sequences (a decode step of a big batch) never share a tile's cells, so every tile is
/// computed. Below 64 rows it walks cells per row and skips masked ones. So: a run of 64 or
/// more rows of one sequence (a prompt chunk) is one call; other rows go in groups of at most
/// 63. `seqs[i]` is row `i`'s sequence.
pub fn attn_segments(seqs: &[u32]) -> Vec<(usize, usize)> {
    const TILE: usize = 64;
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        match runs.last_mut() {
            Some((r0, len)) if seqs[*r0] == *s => *len += 1,
            _ => runs.push((i, 1)),
        }
    }
    if runs.len() <= 1 {
        return vec![];
    }
    let mut segs: Vec<(usize, usize)> = Vec::new();
    let mut group: Option<(usize, usize)> = None;
    for (r0, len) in runs {
        if len >= TILE {
            if let Some(g) = group.take() {
                segs.push(g);
            }
            segs.push((r0, len));
            continue;
        }
        group = match group {
            Some((g0, glen)) if glen + len < TILE => Some((g0, glen + len)),
            Some(g) => {
                segs.push(g);
                Some((r0, len))
            }
            None => Some((r0, len)),
        };
    }
    segs.extend(group);
    if segs.len() <= 1 {
        return vec![];
    }
    segs
}

impl Forward<'_> {
    /// A projection `w x` (`w` a weight matrix as loaded), plus the low-rank updates of the
    /// step's active LoRA adapters that adapt `w`. Every dense projection of every architecture
    /// goes through here.
    pub fn mm(&self, w: Tensor, x: Tensor) -> Tensor {
        let y = self.ctx.mul_mat(w, x);
        if w.dtype() == Some(crate::ggml::DType::F16) {
            // ggml-cuda runs F16-weight GEMMs with F16 accumulation and an F16 result unless
            // asked for F32 (HF accumulates in F32): Mamba projections held as F16 lost enough
            // there to fail the BF16 tolerance on the hybrid fixture.
            self.ctx.set_prec_f32(y);
        }
        if self.lora.is_empty() {
            return y;
        }
        crate::lora::apply(self.ctx, self.lora, self.lora_stack.as_ref(), self.n_tokens, w, x, y)
    }

    /// Record a hidden state for read-back when taps are on.
    pub fn tap(&mut self, t: Tensor) {
        if let Some(taps) = &mut self.taps {
            taps.push(t.set_output());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::attn_segments;

    #[test]
    fn long_runs_alone_short_ones_grouped_below_a_tile() {
        assert!(attn_segments(&[3; 100]).is_empty(), "one sequence: one call");
        let decode: Vec<u32> = (0..64).collect();
        assert_eq!(attn_segments(&decode), vec![(0, 63), (63, 1)]);
        let mut mixed: Vec<u32> = (0..10).collect();
        mixed.extend([99; 70]);
        mixed.push(5);
        assert_eq!(attn_segments(&mixed), vec![(0, 10), (10, 70), (80, 1)]);
        assert!(attn_segments(&[1, 2, 3]).is_empty(), "a few rows: one call");
    }
}
