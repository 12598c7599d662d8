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
    /// With [`SegmentKv::Gathered`] segments: I32, the cells each one gathers, one after another
    pub gather_idx: Option<Tensor>,
    /// F16, their masks one after another (`n_cells x len` each), and those of sliding-window
    /// layers
    pub gather_mask: Option<Tensor>,
    pub gather_mask_swa: Option<Tensor>,
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
    /// The separate flash-attention calls over the step's rows (see [`attn_segments`]); empty:
    /// one call for all rows.
    pub attn_segments: Vec<AttnSegment>,
    /// Recurrent state inputs, for models with Mamba layers
    pub rs: Option<RsInputs<'a>>,
    /// LoRA adapters active in this step (see [`crate::lora`])
    pub lora: &'a [crate::lora::ActiveLora<'a>],
    /// With two or more adapters: their matrices stacked, gathered per token
    pub lora_stack: Option<crate::lora::StackInputs<'a>>,
}

/// A flash-attention call over rows `first..first + len` of a step (see [`attn_segments`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnSegment {
    pub first: usize,
    pub len: usize,
    pub kv: SegmentKv,
}

/// What a segment's rows attend over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentKv {
    /// Cells `0..n_kv` of the cache under rows `mask_row..mask_row + len` of the step's mask.
    Pool { mask_row: usize },
    /// One sequence's own cells, gathered from the cache: the `n_cells` cell indices at
    /// `idx_off` of the step's gather index, under the `n_cells x len` mask at `mask_off` of the
    /// step's gathered mask. Its cost follows the sequence's length, not the pool's.
    Gathered { idx_off: usize, n_cells: usize, mask_off: usize },
}

/// Runs of one sequence with at least this many rows (a prompt chunk) may attend over their
/// own gathered cells (see [`SegmentKv::Gathered`]).
pub const GATHER_MIN_ROWS: usize = 16;
/// At most this many gathered segments in a step (each adds a dozen nodes per layer); further
/// runs attend over the pool.
pub const MAX_GATHERED: usize = 16;

/// How to split a batch's rows for flash attention: `(first, len, gatherable)`, empty for one
/// call over all rows. ggml's CPU kernel tiles 64 query rows at a time and skips a KV tile only
/// when it is masked for all of them; rows of many different sequences (a decode step of a big
/// batch) never share a tile's cells, so every tile is computed. Below 64 rows it walks cells per
/// row and skips masked ones. So: a run of [`GATHER_MIN_ROWS`] or more rows of one sequence (a
/// prompt chunk; at most [`MAX_GATHERED`] of them) is a call of its own that may gather its
/// sequence's cells (`gatherable`), as is any other run of 64 rows or more; other rows go in
/// groups of at most 63. `seqs[i]` is row `i`'s sequence.
pub fn attn_segments(seqs: &[u32]) -> Vec<(usize, usize, bool)> {
    const TILE: usize = 64;
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        match runs.last_mut() {
            Some((r0, len)) if seqs[*r0] == *s => *len += 1,
            _ => runs.push((i, 1)),
        }
    }
    if runs.len() == 1 && runs[0].1 >= GATHER_MIN_ROWS {
        return vec![(0, runs[0].1, true)];
    }
    if runs.len() <= 1 {
        return vec![];
    }
    let mut segs: Vec<(usize, usize, bool)> = Vec::new();
    let mut group: Option<(usize, usize)> = None;
    let mut gathered = 0;
    for (r0, len) in runs {
        let gather = len >= GATHER_MIN_ROWS && gathered < MAX_GATHERED;
        if gather || len >= TILE {
            if let Some((g0, glen)) = group.take() {
                segs.push((g0, glen, false));
            }
            segs.push((r0, len, gather));
            gathered += gather as usize;
            continue;
        }
        group = match group {
            Some((g0, glen)) if glen + len < TILE => Some((g0, glen + len)),
            Some((g0, glen)) => {
                segs.push((g0, glen, false));
                Some((r0, len))
            }
            None => Some((r0, len)),
        };
    }
    segs.extend(group.map(|(g0, glen)| (g0, glen, false)));
    if segs.len() <= 1 && !segs.iter().any(|s| s.2) {
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
        assert_eq!(attn_segments(&[3; 100]), vec![(0, 100, true)], "one sequence: one call, gatherable");
        assert!(attn_segments(&[3; 5]).is_empty(), "a short run alone: one call over the pool");
        let decode: Vec<u32> = (0..64).collect();
        assert_eq!(attn_segments(&decode), vec![(0, 63, false), (63, 1, false)]);
        let mut mixed: Vec<u32> = (0..10).collect();
        mixed.extend([99; 70]);
        mixed.push(5);
        assert_eq!(attn_segments(&mixed), vec![(0, 10, false), (10, 70, true), (80, 1, false)]);
        assert!(attn_segments(&[1, 2, 3]).is_empty(), "a few rows: one call");
    }

    #[test]
    fn prompt_chunks_of_many_sequences_are_gathered_up_to_the_cap() {
        // 32 decode rows, then 20 chunks of 20 rows each.
        let mut seqs: Vec<u32> = (0..32).collect();
        for s in 100..120 {
            seqs.extend([s; 20]);
        }
        let segs = attn_segments(&seqs);
        assert_eq!(segs[0], (0, 32, false));
        assert_eq!(segs.iter().filter(|s| s.2).count(), super::MAX_GATHERED);
        // The chunks past the cap are grouped (below a tile) and every row is covered once.
        let mut next = 0;
        for &(first, len, _) in &segs {
            assert_eq!(first, next);
            next += len;
        }
        assert_eq!(next, seqs.len());
        assert!(segs.iter().all(|s| s.2 || s.1 < 64));
    }
}
