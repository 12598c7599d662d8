//! One model's compute context: a KV cache shared by many sequences, a graph scheduler, and
//! [`Runner::run`], which computes one ubatch — tokens of any sequences at any positions — in
//! one graph. [`crate::Session`] (one sequence) and the [`crate::engine`] scheduler (many) both
//! drive it, so there is one forward path.

use std::sync::Arc;

use crate::ggml::{Context, DType, GgmlError, Graph, Sched, Tensor};
use crate::graph::{Forward, StepInputs};
use crate::lora::{ActiveLora, AdapterList, LoraAdapter, LoraStack, StackInputs};
use crate::memory::cells::{KvCells, SeqId, MAX_SEQ};
use crate::memory::kv::KvCache;
use crate::memory::recurrent::RecurrentCache;
use crate::model::Model;

/// Why a step failed. The cache is unchanged after an error.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("context full: {need} positions needed, the session holds {n_ctx}")]
    ContextFull { need: usize, n_ctx: usize },
    #[error("KV cache full: {need} cells needed, {free} of {n_cells} free")]
    CacheFull { need: usize, free: usize, n_cells: usize },
    #[error("token id {token} is out of range (vocabulary of {n_vocab})")]
    TokenOutOfRange { token: u32, n_vocab: usize },
    #[error("no tokens to decode")]
    Empty,
    #[error("{n} tokens exceed the batch limit of {max}")]
    BatchTooLarge { n: usize, max: usize },
    #[error("cannot truncate to {len} positions: the sequence has {n_past}")]
    Truncate { len: usize, n_past: usize },
    #[error("invalid options: {0}")]
    Options(String),
    #[error("recurrent state full: all {max} sequence slots are taken")]
    StateFull { max: usize },
    #[error(
        "sequence {seq} continues at position {pos} but its recurrent (Mamba) state is at {state_pos}: a hybrid \
         model's state cannot be rewound or shared, so it cannot be truncated, forked mid-way or take a cached prefix"
    )]
    StatePosition { seq: SeqId, pos: u32, state_pos: u32 },
    #[error(transparent)]
    Ggml(#[from] GgmlError),
    /// A call on a sequence that was closed (or never opened).
    #[error("{0} of a closed sequence")]
    Closed(&'static str),
    /// The engine stopped (shut down, or its compute thread failed).
    #[error("the engine stopped: {0}")]
    Stopped(String),
    /// Every sequence id of the cache is taken.
    #[error("all {max} sequences of the cache are in use")]
    NoSequence { max: usize },
    /// The step this sequence was part of failed as a whole.
    #[error("step failed: {0}")]
    Step(String),
}

/// What kind of failure a [`DecodeError`] is: the one mapping that the WIT host (error variant)
/// and the native policy loop (and through them the HTTP status codes) share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller's input is wrong (a token id, a truncation length, a closed sequence).
    InvalidInput,
    /// No room: the sequence's context, the cache, the recurrent slots or the sequence ids.
    ContextFull,
    /// The host could not do it (ggml, the engine stopped, a failed step).
    Internal,
}

impl DecodeError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            DecodeError::ContextFull { .. }
            | DecodeError::CacheFull { .. }
            | DecodeError::StateFull { .. }
            | DecodeError::NoSequence { .. } => ErrorKind::ContextFull,
            DecodeError::TokenOutOfRange { .. }
            | DecodeError::Empty
            | DecodeError::BatchTooLarge { .. }
            | DecodeError::Truncate { .. }
            | DecodeError::StatePosition { .. }
            | DecodeError::Closed(_)
            | DecodeError::Options(_) => ErrorKind::InvalidInput,
            DecodeError::Ggml(_) | DecodeError::Stopped(_) | DecodeError::Step(_) => ErrorKind::Internal,
        }
    }
}

/// Cache and batch geometry of a [`Runner`].
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// KV cells (positions, summed over all sequences)
    pub n_cells: usize,
    /// Most tokens in one graph
    pub n_ubatch: usize,
    /// KV cache element type (default: F32 for F32 models, F16 otherwise)
    pub kv_type: Option<DType>,
    /// Fused flash attention (default on)
    pub flash_attn: Option<bool>,
    /// Most sequences with a recurrent state at once (hybrid models)
    pub n_seq_max: usize,
}

/// What [`Runner::run_select`] returns for one output row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Want {
    /// The whole logits row
    #[default]
    Logits,
    /// The `k` largest logits (at least 1), cut on the device where the logits are, and with
    /// `norm` the row's log-normaliser: only these cross back to the host.
    Top { k: u32, norm: bool },
}

/// An output row of [`Runner::run_select`].
#[derive(Debug, Clone, PartialEq)]
pub enum RowOut {
    Logits(Vec<f32>),
    Top(TopRow),
}

/// The largest logits of a row, highest first (ties: lower id first).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TopRow {
    pub ids: Vec<u32>,
    /// Raw logits of `ids`
    pub logits: Vec<f32>,
    /// log(sum(exp(logits))) over the whole vocabulary, when asked for
    pub log_norm: Option<f32>,
}

impl TopRow {
    /// The candidates whose probability is at least `min_p` times the best one's (0: all), in
    /// order: what `decode-top` hands a guest and what a run samples from.
    pub fn candidates(&self, min_p: f32) -> Vec<crate::sampling::Candidate> {
        let floor = self.logits.first().map_or(f32::NEG_INFINITY, |&b| stllm_policy::sampling::min_p_floor(b, min_p));
        self.ids
            .iter()
            .zip(&self.logits)
            .filter(|(_, &l)| l >= floor)
            .map(|(&id, &logit)| crate::sampling::Candidate { id, logit })
            .collect()
    }
}

/// Tokens of one step: token `i` is `tokens[i]` at position `pos[i]` of sequence `seq[i]`;
/// a row is returned for the tokens with `out[i]`, in order, of the kind `want[i]` says.
#[derive(Debug, Clone, Default)]
pub struct UBatch {
    pub tokens: Vec<u32>,
    pub pos: Vec<u32>,
    pub seq: Vec<SeqId>,
    pub out: Vec<bool>,
    pub want: Vec<Want>,
}

impl UBatch {
    pub fn push(&mut self, token: u32, pos: u32, seq: SeqId, out: bool) {
        self.push_want(token, pos, seq, out, Want::Logits);
    }

    /// [`UBatch::push`] with what the output row (if `out`) should hold.
    pub fn push_want(&mut self, token: u32, pos: u32, seq: SeqId, out: bool, want: Want) {
        self.tokens.push(token);
        self.pos.push(pos);
        self.seq.push(seq);
        self.out.push(out);
        self.want.push(want);
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn n_out(&self) -> usize {
        self.out.iter().filter(|&&o| o).count()
    }
}

/// What a step returns.
pub struct StepOut {
    /// One row per output token: logits (`n_vocab`) or, for embeddings, final hidden states
    /// (empty for [`Runner::run_argmax`])
    pub rows: Vec<Vec<f32>>,
    /// [`Runner::run_select`]: one entry per output row
    pub select: Vec<RowOut>,
    /// With tracing: per layer (0 = embeddings), row-major `[n_tokens][n_embd]`
    pub hidden: Vec<Vec<Vec<f32>>>,
}

pub struct Runner {
    // Declared first: dropped before the model whose backend it uses.
    sched: Sched,
    pub(crate) kv: KvCache,
    pub(crate) cells: KvCells,
    /// Mamba layers' per-sequence state (hybrid models)
    rs: Option<RecurrentCache>,
    n_ubatch: usize,
    flash: bool,
    /// The last step's graph, allocated on the scheduler, reused while steps keep its shape
    step: Option<StepGraph>,
    /// Attention calls over gathered cells so far (see `attn_plan`)
    gathered: u64,
    /// LoRA adapters per sequence (none: the base model)
    adapters: std::collections::HashMap<SeqId, AdapterList>,
    /// The adapters of the last multi-adapter step, stacked (rebuilt when the set changes)
    lora_stack: Option<Arc<LoraStack>>,
    model: Arc<Model>,
}

/// A built and allocated step graph. The next step of the same shape only rewrites its inputs and
/// computes it again: no rebuild, no scheduler split or allocation, and the backends see the very
/// same graph (ggml-cuda then replays its captured CUDA graph instead of launching every kernel).
struct StepGraph {
    shape: StepShape,
    graph: Graph,
    inp: StepInputs,
    result: Tensor,
    /// [`Output::Select`]: the candidates' ids and logits (and probabilities with `norm`)
    sel: Option<SelectTensors>,
    /// Per active adapter: its per-token weight row (input), and the adapter kept alive
    lora: Vec<(Tensor, Arc<LoraAdapter>)>,
    /// With two or more adapters: the stack's (slot ids, weights) inputs, and the stack kept alive
    stack: Option<(Tensor, Tensor, Arc<LoraStack>)>,
    // Owns the tensor headers and the graph above; declared last.
    _ctx: Context,
}

#[derive(Clone, Copy)]
struct SelectTensors {
    /// I32 [k, n_out]: the candidates of each row, in no order
    ids: Tensor,
    /// F32 [1, k, n_out]: their logits
    logits: Tensor,
    /// F32 [1, k, n_out]: their softmax probabilities (the log-normaliser follows from them)
    probs: Option<Tensor>,
}

/// What a step returns per output row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    Logits,
    /// The final normalised hidden states
    Embeddings,
    /// Candidates cut on the device: every row's `k` largest logits (`k` = 1: the argmax op),
    /// with `norm` their softmax probabilities, with `full` the logits too (for the rows that
    /// want them). Greedy decoding reads back one integer per row instead of `n_vocab` floats
    /// (19 MB a step at 32 rows of a 152k vocabulary).
    Select {
        k: u32,
        norm: bool,
        full: bool,
    },
}

/// What fixes a step graph: tokens, cells attended, logits rows, attention segments and mode.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StepShape {
    n_tokens: usize,
    n_kv: usize,
    n_out: usize,
    segments: Vec<crate::graph::AttnSegment>,
    output: Output,
    /// Sequences of a recurrent step (1 otherwise)
    n_seqs: usize,
    /// Version ids of the LoRA adapters active in the step
    adapters: Vec<u64>,
    /// With a stack: (slot, weight) pairs per token (the longest adapter list); 0 without
    per_token: usize,
}

impl Runner {
    pub fn new(model: Arc<Model>, opts: &RunnerOptions) -> Result<Runner, DecodeError> {
        let hp = model.hparams();
        let kv_type = opts.kv_type.unwrap_or(if model.dtype == DType::F32 { DType::F32 } else { DType::F16 });
        let flash = opts.flash_attn.unwrap_or(true);
        if kv_type.is_quantized() {
            if !flash {
                return Err(DecodeError::Options(format!(
                    "a {} KV cache needs flash attention (the unfused path transposes V, which a block-quantized \
                     type cannot do)",
                    kv_type.name()
                )));
            }
            if !hp.head_dim.is_multiple_of(kv_type.block_size()) {
                return Err(DecodeError::Options(format!(
                    "a {} KV cache needs head_dim divisible by {} (the model has {})",
                    kv_type.name(),
                    kv_type.block_size(),
                    hp.head_dim
                )));
            }
        }
        let n_cells = opts.n_cells.max(1);
        let n_ubatch = opts.n_ubatch.max(1);
        if n_cells > MAX_CELLS {
            return Err(DecodeError::Options(format!("{n_cells} KV cells: at most {MAX_CELLS}")));
        }
        if n_ubatch > MAX_UBATCH {
            return Err(DecodeError::Options(format!("a batch of {n_ubatch} tokens: at most {MAX_UBATCH}")));
        }
        // Refuse up front what cannot fit, device by device: the cache of its layers plus a
        // compute buffer for a full ubatch. Sizes in checked arithmetic: an overflow is "too
        // large", never a wrapped small number that slips past the check.
        let too_large = || {
            DecodeError::Options(format!(
                "a KV cache of {n_cells} cells with batches of {n_ubatch} tokens is too large to size"
            ))
        };
        let layer_kv = n_cells.checked_mul(2 * kv_type.row_size(hp.n_embd_kv() as i64)).ok_or_else(too_large)?;
        let kv_layers = model.arch.kv_layers();
        let kv_backend: Vec<usize> = kv_layers.iter().map(|&l| model.placement.layers[l]).collect();
        let mut counts = vec![0usize; model.backends.len()];
        for &b in &kv_backend {
            counts[b] += 1;
        }
        let compute_need = compute_estimate(hp, n_cells, n_ubatch).ok_or_else(too_large)?;
        // Hybrid models: the recurrent state of every sequence slot too.
        let shape = model.arch.recurrent();
        let mut rs_need = vec![0usize; model.backends.len()];
        if let Some(r) = &shape {
            for &l in &r.layers {
                let b = model.placement.layers[l];
                rs_need[b] = (r.conv_row + r.ssm_row)
                    .checked_mul(4 * opts.n_seq_max.max(1))
                    .and_then(|x| x.checked_add(rs_need[b]))
                    .ok_or_else(too_large)?;
            }
        }
        for (b, backend) in model.backends.iter().enumerate() {
            if counts[b] > 0 || b == model.placement.output || rs_need[b] > 0 {
                backend.check_fits(
                    &format!(
                        "the KV cache ({n_cells} cells, {}, {} layers), recurrent state and compute buffers",
                        kv_type.name(),
                        counts[b]
                    ),
                    counts[b]
                        .checked_mul(layer_kv)
                        .and_then(|x| x.checked_add(rs_need[b]))
                        .and_then(|x| x.checked_add(compute_need))
                        .ok_or_else(too_large)?,
                )?;
            }
        }
        let backends = model.sched_backends();
        let kv = KvCache::new(&backends, &kv_backend, hp.n_embd_kv(), hp.n_embd_kv(), n_cells, kv_type)?;
        let rs = match shape {
            Some(shape) => {
                let rs_backend: Vec<usize> = shape.layers.iter().map(|&l| model.placement.layers[l]).collect();
                Some(RecurrentCache::new(&backends, &rs_backend, shape, opts.n_seq_max)?)
            }
            None => None,
        };
        let sched = Sched::new(&model.sched_backends(), graph_size(hp.n_layer, n_ubatch))?;
        tracing::debug!(n_cells, kv_bytes = kv.bytes(), kv_type = kv_type.name(), "KV cache allocated");
        Ok(Runner {
            sched,
            kv,
            cells: KvCells::new(n_cells),
            rs,
            n_ubatch,
            flash,
            step: None,
            gathered: 0,
            adapters: Default::default(),
            lora_stack: None,
            model,
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Memory held now: totals, the main device's free/total, and a breakdown per backend.
    pub fn memory(&self) -> MemoryUsage {
        let m = &self.model;
        let (device_free, device_total) = m.device_memory();
        let backends: Vec<BackendMemory> = m
            .backends
            .iter()
            .enumerate()
            .map(|(b, backend)| {
                let (free, total) = backend.memory();
                BackendMemory {
                    name: backend.name(),
                    layers: m.placement.counts()[b],
                    weights: m.weight_bytes_per_backend()[b],
                    kv: self.kv.bytes_per_backend()[b],
                    recurrent: self.rs.as_ref().map_or(0, |r| r.bytes_per_backend()[b]),
                    compute: self.sched.buffer_size(backend),
                    free,
                    total,
                }
            })
            .collect();
        MemoryUsage {
            device: m.device_name(),
            weights: m.weight_bytes(),
            kv: self.kv.bytes(),
            recurrent: self.rs.as_ref().map_or(0, RecurrentCache::bytes),
            lora: m.adapters().bytes() + self.lora_stack.as_ref().map_or(0, |s| s.bytes()),
            compute: backends.iter().map(|b| b.compute).sum(),
            device_free,
            device_total,
            backends,
        }
    }

    pub fn cells(&self) -> &KvCells {
        &self.cells
    }

    /// Share positions `p0..p1` of `src` with `dst` (a fork; no copy of KV cells; a hybrid
    /// model's recurrent state is copied, which only makes sense for a whole-sequence fork).
    pub fn seq_cp(&mut self, src: SeqId, dst: SeqId, p0: u32, p1: u32) -> Result<(), DecodeError> {
        self.cells.seq_cp(src, dst, p0, p1);
        if let Some(rs) = self.rs.as_mut() {
            if !rs.copy(src, dst)? {
                return Err(DecodeError::StateFull { max: rs.n_slots() });
            }
        }
        Ok(())
    }

    /// A sequence of `n_past` positions may be cut to `len` unless a recurrent state would have
    /// to be rewound (to 0 is fine: the state starts over).
    pub fn check_truncate(&self, seq: SeqId, len: usize, n_past: usize) -> Result<(), DecodeError> {
        if self.rs.is_some() && len > 0 && len < n_past {
            return Err(DecodeError::StatePosition { seq, pos: len as u32, state_pos: n_past as u32 });
        }
        Ok(())
    }

    /// Take `other`'s recurrent states (same model): a copied session continues where it was.
    pub fn copy_recurrent_from(&mut self, other: &Runner) -> Result<(), DecodeError> {
        if let (Some(a), Some(b)) = (self.rs.as_mut(), other.rs.as_ref()) {
            a.copy_all_from(b)?;
        }
        Ok(())
    }

    /// Where `seq`'s recurrent state stands (the position it continues at), for hybrid models; a
    /// cached prefix of such a model is only usable whole, at exactly this length.
    pub fn recurrent_pos(&self, seq: SeqId) -> Option<u32> {
        let rs = self.rs.as_ref()?;
        Some(if rs.slot(seq).is_some() { rs.next_pos(seq) } else { 0 })
    }

    /// Share `src`'s first `len` positions with `dst` as a prefix hit: cells, and for a hybrid
    /// model its state (only valid when `len` is where that state stands; see `recurrent_pos`).
    /// On failure nothing is shared.
    pub fn share_prefix(&mut self, src: SeqId, dst: SeqId, len: u32) -> Result<(), DecodeError> {
        if let Err(e) = self.seq_cp(src, dst, 0, len) {
            self.cells.seq_rm(dst, 0, u32::MAX);
            return Err(e);
        }
        Ok(())
    }

    /// Whether the model has recurrent (Mamba) layers, whose state cannot be rewound or shared.
    pub fn is_recurrent(&self) -> bool {
        self.rs.is_some()
    }

    /// Drop positions `p0..p1` of `seq`; returns cells freed.
    pub fn seq_rm(&mut self, seq: SeqId, p0: u32, p1: u32) -> usize {
        self.cells.seq_rm(seq, p0, p1)
    }

    pub fn kv(&self) -> &KvCache {
        &self.kv
    }

    pub fn n_ubatch(&self) -> usize {
        self.n_ubatch
    }

    /// Steps' attention calls (per step, not per layer) that read a sequence's own cells
    /// gathered out of the pool instead of the whole pool (see `attn_plan`), so far.
    pub fn gathered_segments(&self) -> u64 {
        self.gathered
    }

    pub fn flash_attn(&self) -> bool {
        self.flash
    }

    /// Check token ids against the vocabulary.
    pub fn check_tokens(&self, tokens: &[u32]) -> Result<(), DecodeError> {
        let n_vocab = self.model.hparams().n_vocab;
        match tokens.iter().find(|&&t| t as usize >= n_vocab) {
            Some(&token) => Err(DecodeError::TokenOutOfRange { token, n_vocab }),
            None => Ok(()),
        }
    }

    /// The LoRA adapters (each with its weight) sequence `seq`'s tokens are computed with from now
    /// on; empty: the base model. The caller keeps a sequence's adapters fixed while its cells
    /// are reused (its cached K/V were computed with them).
    /// An adapter loaded for another model is refused (it finds its matrices by address).
    pub fn set_adapters(&mut self, seq: SeqId, adapters: AdapterList) -> Result<(), DecodeError> {
        if let Some((a, _)) = adapters.iter().find(|(a, _)| a.model_uid() != self.model.uid()) {
            return Err(DecodeError::Options(format!(
                "LoRA adapter {:?} was loaded for another model; load it for this one",
                a.name()
            )));
        }
        if adapters.is_empty() {
            self.adapters.remove(&seq);
        } else {
            self.adapters.insert(seq, adapters);
        }
        Ok(())
    }

    /// The adapters of `seq`.
    pub fn adapters(&self, seq: SeqId) -> &[(Arc<LoraAdapter>, f32)] {
        self.adapters.get(&seq).map_or(&[], |v| v.as_slice())
    }

    /// Compute one ubatch: write its K/V into free cells (recording them for their sequences)
    /// and return the rows asked for. On error nothing is recorded.
    pub fn run(&mut self, ub: &UBatch, trace: bool, embeddings: bool) -> Result<StepOut, DecodeError> {
        self.run_as(ub, trace, if embeddings { Output::Embeddings } else { Output::Logits })
    }

    /// [`Runner::run`] for greedy decoding: the argmax of each output row's logits, computed on
    /// the device (ties may resolve to another index than [`crate::sampling::argmax`]).
    pub fn run_argmax(&mut self, ub: &UBatch) -> Result<Vec<u32>, DecodeError> {
        let mut ub = ub.clone();
        ub.want.iter_mut().for_each(|w| *w = Want::Top { k: 1, norm: false });
        self.run_select(&ub)?
            .into_iter()
            .map(|r| match r {
                RowOut::Top(t) => {
                    t.ids.first().copied().ok_or(DecodeError::Step("a row without a finite logit".into()))
                }
                RowOut::Logits(_) => Err(DecodeError::Step("a logits row where the argmax was asked".into())),
            })
            .collect()
    }

    /// [`Runner::run`] returning for each output row what `ub.want` asks: its logits, or its
    /// largest ones cut on the device (where the logits are: only those come back).
    pub fn run_select(&mut self, ub: &UBatch) -> Result<Vec<RowOut>, DecodeError> {
        if ub.want.len() != ub.len() {
            return Err(DecodeError::Options(format!("{} row kinds for {} tokens", ub.want.len(), ub.len())));
        }
        let wants = || ub.want.iter().zip(&ub.out).filter(|(_, &o)| o).map(|(w, _)| *w);
        let n_vocab = self.model.hparams().n_vocab;
        let (mut k, mut norm, mut full) = (0u32, false, false);
        for w in wants() {
            match w {
                Want::Logits => full = true,
                Want::Top { k: kw, norm: nw } => {
                    k = k.max(kw.max(1));
                    norm |= nw;
                }
            }
        }
        if k == 0 {
            let out = self.run_as(ub, false, Output::Logits)?;
            return Ok(out.rows.into_iter().map(RowOut::Logits).collect());
        }
        // A few graph shapes (the candidates' count is part of it): powers of two.
        let k = k.checked_next_power_of_two().unwrap_or(u32::MAX).min(n_vocab as u32);
        Ok(self.run_as(ub, false, Output::Select { k, norm, full })?.select)
    }

    fn run_as(&mut self, ub: &UBatch, trace: bool, output: Output) -> Result<StepOut, DecodeError> {
        let embeddings = output == Output::Embeddings;
        let n = ub.len();
        if n == 0 {
            return Err(DecodeError::Empty);
        }
        if n > self.n_ubatch && !embeddings {
            return Err(DecodeError::BatchTooLarge { n, max: self.n_ubatch });
        }
        self.check_tokens(&ub.tokens)?;
        debug_assert!(ub.seq.iter().all(|&s| (s as usize) < MAX_SEQ));
        if self.rs.is_none() {
            return self.run_one(ub, trace, output, (1, n));
        }
        self.run_recurrent(ub, trace, output)
    }

    /// A hybrid model's step: the Mamba layers need each computation to hold `n_seqs` sequences
    /// of equally many tokens, in sequence order, each continuing where its state stands. So the
    /// tokens are grouped by sequence: all one-token sequences (decoding) go together, longer
    /// runs (prompt chunks) one by one; the rows come back in the ubatch's order.
    fn run_recurrent(&mut self, ub: &UBatch, trace: bool, output: Output) -> Result<StepOut, DecodeError> {
        let rs = self.rs.as_mut().expect("recurrent");
        // Sequences whose cells are all gone (finished, reset) give their state back.
        for seq in rs.seqs() {
            if self.cells.seq_len(seq) == 0 {
                rs.release(seq);
            }
        }
        let mut groups: Vec<(SeqId, Vec<usize>)> = Vec::new();
        for i in 0..ub.len() {
            match groups.iter_mut().find(|(s, _)| *s == ub.seq[i]) {
                Some((_, idx)) => idx.push(i),
                None => groups.push((ub.seq[i], vec![i])),
            }
        }
        for (seq, idx) in &groups {
            // A sequence without state starts wherever its first token is.
            let state_pos = if rs.slot(*seq).is_some() { rs.next_pos(*seq) } else { ub.pos[idx[0]] };
            for (k, &i) in idx.iter().enumerate() {
                if ub.pos[i] != state_pos + k as u32 {
                    return Err(DecodeError::StatePosition {
                        seq: *seq,
                        pos: ub.pos[i],
                        state_pos: state_pos + k as u32,
                    });
                }
            }
        }
        let (singles, runs): (Vec<_>, Vec<_>) = groups.into_iter().partition(|(_, idx)| idx.len() == 1);
        let mut parts: Vec<(usize, Vec<usize>)> = Vec::new();
        if !singles.is_empty() {
            parts.push((singles.len(), singles.into_iter().flat_map(|(_, i)| i).collect()));
        }
        parts.extend(runs.into_iter().map(|(_, i)| (1, i)));
        if trace && parts.len() > 1 {
            return Err(DecodeError::Options("a traced step must hold one sequence".into()));
        }
        let mut rows: Vec<(usize, Vec<f32>)> = Vec::new();
        let mut select: Vec<(usize, RowOut)> = Vec::new();
        let mut hidden = Vec::new();
        for (n_seqs, idx) in parts {
            let mut sub = UBatch::default();
            for &i in &idx {
                sub.push_want(
                    ub.tokens[i],
                    ub.pos[i],
                    ub.seq[i],
                    ub.out[i],
                    ub.want.get(i).copied().unwrap_or_default(),
                );
            }
            let out = self.run_one(&sub, trace, output, (n_seqs, idx.len() / n_seqs))?;
            let outs = idx.iter().copied().filter(|&i| ub.out[i]);
            rows.extend(outs.clone().zip(out.rows));
            select.extend(outs.zip(out.select));
            hidden = out.hidden;
            let rs = self.rs.as_mut().expect("recurrent");
            for &i in &idx {
                rs.set_next_pos(ub.seq[i], ub.pos[i] + 1);
            }
        }
        rows.sort_by_key(|(i, _)| *i);
        select.sort_by_key(|(i, _)| *i);
        Ok(StepOut {
            rows: rows.into_iter().map(|(_, r)| r).collect(),
            select: select.into_iter().map(|(_, t)| t).collect(),
            hidden,
        })
    }

    /// One computation; `(n_seqs, n_seq_tokens)`: its shape for the recurrent layers.
    fn run_one(
        &mut self,
        ub: &UBatch,
        trace: bool,
        output: Output,
        seqs: (usize, usize),
    ) -> Result<StepOut, DecodeError> {
        let n = ub.len();
        let n_cells = self.cells.n_cells();
        let slots =
            self.cells.find_slots(n).ok_or(DecodeError::CacheFull { need: n, free: self.cells.free(), n_cells })?;
        for (i, &slot) in slots.iter().enumerate() {
            self.cells.occupy(slot, ub.seq[i], ub.pos[i]);
        }
        let r = self.compute(ub, &slots, trace, output, seqs);
        if r.is_err() {
            for &slot in &slots {
                self.cells.release(slot);
            }
        }
        r
    }

    fn compute(
        &mut self,
        ub: &UBatch,
        slots: &[u32],
        trace: bool,
        output: Output,
        (n_seqs, n_seq_tokens): (usize, usize),
    ) -> Result<StepOut, DecodeError> {
        let hp = self.model.hparams().clone();
        let n = ub.len();
        // Attend over a multiple of 256 cells (masked beyond the used ones): the graph keeps its
        // shapes from step to step, so a GPU backend can replay its captured graph (CUDA graphs).
        // With many sequences the used cells grow by one per sequence a step, so the padding
        // grows with the number of sequences in the step (a change of shape rebuilds the graph
        // and makes the GPU capture its CUDA graph again: with 32 sequences and 256 cells that
        // was every 8th step); a prompt chunk of one sequence keeps 256.
        // On the CPU there is no captured graph to keep, and masked cells still cost: 256 there.
        let on_device = self.model.on_device();
        let pad = if on_device { kv_pad(&ub.seq) } else { KV_PAD };
        let n_kv = self.cells.n_kv().next_multiple_of(pad).min(self.cells.n_cells());
        let out: Vec<i32> = (0..n as i32).filter(|&i| ub.out[i as usize]).collect();
        let n_out = out.len().max(1);
        // The adapters of the step's sequences, by version, and each one's weight per token.
        let mut active: Vec<Arc<LoraAdapter>> = Vec::new();
        for &seq in &ub.seq {
            for (a, _) in self.adapters(seq) {
                if !active.iter().any(|x| x.id() == a.id()) {
                    active.push(a.clone());
                }
            }
        }
        active.sort_by_key(|a| a.id());
        if active.len() > crate::lora::MAX_STEP_ADAPTERS {
            return Err(DecodeError::Options(format!(
                "{} LoRA adapters in one step; at most {} (the engine spreads more over several steps)",
                active.len(),
                crate::lora::MAX_STEP_ADAPTERS
            )));
        }
        let lora_w: Vec<Vec<f32>> = active
            .iter()
            .map(|a| {
                ub.seq
                    .iter()
                    .map(|&seq| self.adapters(seq).iter().filter(|(x, _)| x.id() == a.id()).map(|(_, w)| w).sum())
                    .collect()
            })
            .collect();
        // Two or more adapters: their low-rank matrices stacked by slot (slot i = active[i],
        // slot active.len() = zeros), each token gathering its own (see `LoraStack`).
        let mut per_token = 0;
        let (mut stack_ids, mut stack_w) = (Vec::new(), Vec::new());
        if active.len() >= 2 {
            let ids: Vec<u64> = active.iter().map(|a| a.id()).collect();
            if self.lora_stack.as_ref().is_none_or(|s| s.ids() != ids.as_slice()) {
                self.step = None; // the kept graph refers to the old stack
                self.lora_stack = None;
                let stack = LoraStack::build(&self.model, &active).map_err(|e| DecodeError::Options(e.to_string()))?;
                self.lora_stack = Some(Arc::new(stack));
            }
            per_token = ub.seq.iter().map(|&s| self.adapters(s).len()).max().unwrap_or(0).max(1);
            for &seq in &ub.seq {
                let list = self.adapters(seq);
                for j in 0..per_token {
                    match list.get(j) {
                        Some((a, w)) => {
                            stack_ids.push(active.iter().position(|x| x.id() == a.id()).expect("active") as i32);
                            stack_w.push(*w);
                        }
                        None => {
                            stack_ids.push(active.len() as i32);
                            stack_w.push(0.0);
                        }
                    }
                }
            }
        }
        let plan = self.attn_plan(ub, n_kv);
        self.gathered += plan.gathered.len() as u64;
        let shape = StepShape {
            n_tokens: n,
            n_kv,
            n_out,
            segments: plan.segments.clone(),
            output,
            n_seqs,
            adapters: active.iter().map(|a| a.id()).collect(),
            per_token,
        };
        // The state slot of each sequence of a recurrent step, in order.
        let rs_slots: Vec<i32> = match self.rs.as_mut() {
            Some(rs) => {
                let mut v = Vec::with_capacity(n_seqs);
                for k in 0..n_seqs {
                    let seq = ub.seq[k * n_seq_tokens];
                    let slot = rs.ensure(seq)?.ok_or(DecodeError::StateFull { max: rs.n_slots() })?;
                    v.push(slot as i32);
                }
                v
            }
            None => Vec::new(),
        };
        // Flash attention wants an F16 mask.
        let mask_type = if self.flash { DType::F16 } else { DType::F32 };
        let t_build = std::time::Instant::now();
        let _guard = self.model.compute_lock.lock().unwrap_or_else(|p| p.into_inner());
        // A traced step (hidden-state taps) is built for itself and not kept.
        let reuse = !trace && self.step.as_ref().is_some_and(|g| g.shape == shape);
        let mut taps = Vec::new();
        let t_alloc;
        if !reuse {
            // The scheduler's allocation is about to change: the kept graph is no longer valid.
            self.step = None;
            let gsize = graph_size(hp.n_layer, self.n_ubatch.max(n));
            let ctx = Context::new(2 * gsize, gsize)?;
            let mut graph = ctx.new_graph(gsize);
            let inp = StepInputs {
                tokens: ctx.new_tensor(DType::I32, &[n as i64], "inp_tokens").set_input(),
                pos: ctx.new_tensor(DType::I32, &[n as i64], "inp_pos").set_input(),
                mask: ctx
                    .new_tensor(mask_type, &[n_kv as i64, plan.mask_rows.len().max(1) as i64], "inp_mask")
                    .set_input(),
                mask_swa: hp.sliding_window.map(|_| {
                    ctx.new_tensor(mask_type, &[n_kv as i64, plan.mask_rows.len().max(1) as i64], "inp_mask_swa")
                        .set_input()
                }),
                gather_idx: (!plan.gathered.is_empty())
                    .then(|| ctx.new_tensor(DType::I32, &[plan.n_gather_cells() as i64], "inp_gather_idx").set_input()),
                gather_mask: (!plan.gathered.is_empty())
                    .then(|| ctx.new_tensor(DType::F16, &[plan.n_gather_mask() as i64], "inp_gather_mask").set_input()),
                gather_mask_swa: (!plan.gathered.is_empty() && hp.sliding_window.is_some()).then(|| {
                    ctx.new_tensor(DType::F16, &[plan.n_gather_mask() as i64], "inp_gather_mask_swa").set_input()
                }),
                out_ids: ctx.new_tensor(DType::I32, &[n_out as i64], "inp_out_ids").set_input(),
                kv_idxs: ctx.new_tensor(DType::I64, &[n as i64], "inp_kv_idxs").set_input(),
                rs_ids: self
                    .rs
                    .as_ref()
                    .map(|_| ctx.new_tensor(DType::I32, &[n_seqs as i64], "inp_rs_ids").set_input()),
            };
            let lora_inputs: Vec<Tensor> = (0..active.len())
                .map(|k| ctx.new_tensor(DType::F32, &[1, n as i64], &format!("inp_lora_w{k}")).set_input())
                .collect();
            let lora: Vec<ActiveLora> = active
                .iter()
                .zip(&lora_inputs)
                .map(|(a, &w)| ActiveLora { adapter: a, w_tokens: w, w_out: ctx.get_rows(w, inp.out_ids) })
                .collect();
            let stack_keep = if per_token > 0 { self.lora_stack.clone() } else { None };
            let stack_inputs = stack_keep.as_ref().map(|st| {
                let pt = per_token as i64;
                let ids = ctx.new_tensor(DType::I32, &[pt, n as i64], "inp_lora_slots").set_input();
                let w = ctx.new_tensor(DType::F32, &[pt, n as i64], "inp_lora_slot_w").set_input();
                StackInputs {
                    stack: st,
                    per_token,
                    ids,
                    w,
                    ids_out: ctx.get_rows(ids, inp.out_ids),
                    w_out: ctx.get_rows(w, inp.out_ids),
                }
            });
            let mut f = Forward {
                ctx: &ctx,
                graph: &mut graph,
                inp,
                kv: &self.kv,
                n_kv,
                n_tokens: n,
                taps: trace.then(Vec::new),
                embeddings: output == Output::Embeddings,
                flash_attn: self.flash,
                attn_segments: shape.segments.clone(),
                rs: self.rs.as_ref().zip(inp.rs_ids).map(|(cache, ids)| crate::graph::RsInputs {
                    cache,
                    ids,
                    n_seqs,
                    n_seq_tokens,
                }),
                lora: &lora,
                lora_stack: stack_inputs,
            };
            let mut result = self.model.arch.build(&mut f);
            taps = f.taps.take().unwrap_or_default();
            let mut sel = None;
            if let Output::Select { k, norm, full } = output {
                if !result.is_contiguous() {
                    result = ctx.cont(result);
                }
                let (nv, no) = (hp.n_vocab as i64, n_out as i64);
                // k <= n_vocab (run_select); the argmax op for one candidate is the cheaper one.
                let ids = if k == 1 { ctx.reshape_2d(ctx.argmax(result), 1, no) } else { ctx.top_k(result, k as i32) };
                let pick = |t: Tensor| ctx.get_rows(ctx.reshape_3d(t, 1, nv, no), ids).set_output();
                let s = SelectTensors {
                    ids: ids.set_output(),
                    logits: pick(result),
                    probs: norm.then(|| pick(ctx.soft_max_ext(result, None, 1.0))),
                };
                for t in [Some(s.ids), Some(s.logits), s.probs].into_iter().flatten() {
                    graph.expand(t);
                }
                sel = Some(s);
                if full {
                    result = result.set_output();
                }
            } else {
                result = result.set_output();
            }
            graph.expand(result);
            t_alloc = std::time::Instant::now();
            self.sched.reset();
            self.sched.alloc(&graph)?;
            let lora = lora_inputs.into_iter().zip(active.iter().cloned()).collect();
            let stack = stack_inputs.zip(stack_keep.clone()).map(|(si, st)| (si.ids, si.w, st));
            self.step = Some(StepGraph { shape, graph, inp, result, sel, lora, stack, _ctx: ctx });
        } else {
            t_alloc = std::time::Instant::now();
        }
        let step = self.step.as_ref().expect("built above");
        let (inp, result, sel) = (step.inp, step.result, step.sel);
        let t_inputs = std::time::Instant::now();
        let ids: Vec<i32> = ub.tokens.iter().map(|&t| t as i32).collect();
        let pos: Vec<i32> = ub.pos.iter().map(|&p| p as i32).collect();
        let out_ids: Vec<i32> = if out.is_empty() { vec![n as i32 - 1] } else { out.clone() };
        let idxs: Vec<i64> = slots.iter().map(|&s| s as i64).collect();
        write_input(inp.tokens, |t| t.write_i32(&ids))?;
        write_input(inp.pos, |t| t.write_i32(&pos))?;
        write_input(inp.out_ids, |t| t.write_i32(&out_ids))?;
        write_input(inp.kv_idxs, |t| t.write_i64(&idxs))?;
        if let Some(ids) = inp.rs_ids {
            write_input(ids, |t| t.write_i32(&rs_slots))?;
        }
        for ((t, _), w) in step.lora.iter().zip(&lora_w) {
            write_input(*t, |t| t.write_f32(w))?;
        }
        if let Some((ids, w, _)) = &step.stack {
            write_input(*ids, |t| t.write_i32(&stack_ids))?;
            write_input(*w, |t| t.write_f32(&stack_w))?;
        }
        let who: Vec<(SeqId, u32)> = plan.mask_rows.iter().map(|&r| (ub.seq[r], ub.pos[r])).collect();
        if !who.is_empty() {
            write_input(inp.mask, |t| write_mask(t, &self.cells, &who, n_kv, None))?;
        }
        if let Some(m) = inp.mask_swa.filter(|_| !who.is_empty()) {
            write_input(m, |t| write_mask(t, &self.cells, &who, n_kv, hp.sliding_window))?;
        }
        if let Some(t) = inp.gather_idx {
            write_input(t, |t| t.write_i32(&plan.gather_idx()))?;
        }
        if let Some(t) = inp.gather_mask {
            write_input(t, |t| t.write_f16(&plan.gather_mask(ub, None)))?;
        }
        if let Some(t) = inp.gather_mask_swa {
            write_input(t, |t| t.write_f16(&plan.gather_mask(ub, hp.sliding_window)))?;
        }
        let t_compute = std::time::Instant::now();
        if tracing::enabled!(target: "stllm::ops", tracing::Level::TRACE) {
            // A per-op profile (STLLM_LOG=stllm::ops=trace; slows every step down).
            let nodes = self.sched.compute_profiled(&step.graph)?;
            trace_ops(&nodes, n, n_kv);
        } else {
            self.sched.compute(&step.graph)?;
        }
        let t_read = std::time::Instant::now();

        let rows = |t: Tensor, width: usize| -> Result<Vec<Vec<f32>>, GgmlError> {
            Ok(t.read_f32()?.chunks(width).map(<[f32]>::to_vec).collect())
        };
        let (mut rows_out, mut select) = (vec![], vec![]);
        match output {
            _ if out.is_empty() => {}
            Output::Select { .. } => {
                let sel = sel.expect("a select step has its tensors");
                let wants: Vec<Want> =
                    out.iter().map(|&i| ub.want.get(i as usize).copied().unwrap_or_default()).collect();
                select = read_select(sel, result, &wants, hp.n_vocab)?;
            }
            Output::Embeddings => rows_out = rows(result, hp.n_embd)?,
            Output::Logits => rows_out = rows(result, hp.n_vocab)?,
        }
        let hidden = taps.into_iter().map(|t| rows(t, hp.n_embd)).collect::<Result<Vec<_>, _>>()?;
        if trace {
            // Taps are outputs of this graph alone: the next step builds a plain one.
            self.step = None;
        }
        // Where a step's time goes (STLLM_LOG=stllm::step=trace).
        tracing::trace!(
            target: "stllm::step",
            n_tokens = n,
            n_kv,
            splits = self.sched.n_splits(),
            build_us = (t_alloc - t_build).as_micros() as u64,
            alloc_us = (t_inputs - t_alloc).as_micros() as u64,
            inputs_us = (t_compute - t_inputs).as_micros() as u64,
            compute_us = (t_read - t_compute).as_micros() as u64,
            read_us = t_read.elapsed().as_micros() as u64,
        );
        Ok(StepOut { rows: rows_out, select, hidden })
    }

    /// The tokens' cells of `seq`, in position order, as bytes (for a prompt-cache file).
    pub fn read_seq(&self, seq: SeqId) -> Result<(Vec<u32>, Vec<u8>), GgmlError> {
        let cells: Vec<u32> = self.cells.seq_cells(seq).into_iter().map(|(c, _)| c).collect();
        let data = self.kv.read_cells(&cells)?;
        Ok((cells, data))
    }

    /// Bytes of one sequence's recurrent state (0 without Mamba layers).
    pub fn state_bytes(&self) -> usize {
        self.rs.as_ref().map_or(0, RecurrentCache::slot_bytes)
    }

    /// `seq`'s recurrent state as bytes (empty without Mamba layers; for a prompt-cache file).
    pub fn read_state(&self, seq: SeqId) -> Result<Vec<u8>, GgmlError> {
        self.rs.as_ref().map_or(Ok(vec![]), |rs| rs.read_slot(seq))
    }

    /// Give `seq` a saved recurrent state (from [`Runner::read_state`]) that has consumed
    /// positions `0..n`.
    pub fn write_state(&mut self, seq: SeqId, data: &[u8], n: usize) -> Result<(), DecodeError> {
        let Some(rs) = self.rs.as_mut() else {
            return Ok(());
        };
        if !rs.write_slot(seq, data, n as u32)? {
            return Err(DecodeError::StateFull { max: rs.n_slots() });
        }
        Ok(())
    }

    /// Put `n` positions `0..n` of `seq` (bytes from [`Runner::read_seq`] of a cache with the
    /// same geometry) into free cells.
    pub fn write_seq(&mut self, seq: SeqId, n: usize, data: &[u8]) -> Result<(), DecodeError> {
        let n_cells = self.cells.n_cells();
        let slots =
            self.cells.find_slots(n).ok_or(DecodeError::CacheFull { need: n, free: self.cells.free(), n_cells })?;
        self.kv.write_cells(&slots, data)?;
        for (p, &slot) in slots.iter().enumerate() {
            self.cells.occupy(slot, seq, p as u32);
        }
        Ok(())
    }
}

/// Read a select step's rows back: the candidates of each row, sorted and cut to what the row
/// asked for, and the logits rows of those that want them.
fn read_select(sel: SelectTensors, logits: Tensor, wants: &[Want], n_vocab: usize) -> Result<Vec<RowOut>, GgmlError> {
    let ids = sel.ids.read_i32()?;
    let vals = sel.logits.read_f32()?;
    let probs = sel.probs.map(|p| p.read_f32()).transpose()?;
    let kk = ids.len() / wants.len().max(1);
    let mut out = Vec::with_capacity(wants.len());
    for (j, want) in wants.iter().enumerate() {
        match *want {
            Want::Logits => out.push(RowOut::Logits(logits.read_f32_at(j * n_vocab, n_vocab)?)),
            Want::Top { k, norm } => {
                let r = j * kk..(j + 1) * kk;
                let mut c: Vec<(u32, f32, f32)> = ids[r.clone()]
                    .iter()
                    .zip(&vals[r.clone()])
                    .enumerate()
                    .filter(|(_, (&id, v))| id >= 0 && (id as usize) < n_vocab && v.is_finite())
                    .map(|(i, (&id, &v))| (id as u32, v, probs.as_ref().map_or(0.0, |p| p[r.start + i])))
                    .collect();
                c.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                // logsumexp = l - ln(p) for any candidate; the top one is the most precise.
                let log_norm = (norm && probs.is_some())
                    .then(|| c.first().map_or(f32::INFINITY, |&(_, l, p)| if p > 0.0 { l - p.ln() } else { l }));
                c.truncate(k.max(1) as usize);
                out.push(RowOut::Top(TopRow {
                    ids: c.iter().map(|x| x.0).collect(),
                    logits: c.iter().map(|x| x.1).collect(),
                    log_norm,
                }));
            }
        }
    }
    Ok(out)
}

fn write_input(t: Tensor, f: impl FnOnce(Tensor) -> Result<(), GgmlError>) -> Result<(), GgmlError> {
    // An input the graph never reads (e.g. the full mask of an all-sliding model) gets no memory.
    if t.has_memory() {
        f(t)
    } else {
        Ok(())
    }
}

/// Log a step's per-op profile (target `stllm::ops`): one line per op and operand shape, with
/// the nodes of that kind and their total time (`scripts/gpu/op_profile.py` sums them up).
fn trace_ops(nodes: &[crate::ggml::NodeTime], n_tokens: usize, n_kv: usize) {
    let mut by: Vec<(String, usize, std::time::Duration)> = Vec::new();
    for t in nodes {
        let key = match (t.op.as_str(), t.src0) {
            ("MUL_MAT" | "MUL_MAT_ID" | "GET_ROWS" | "FLASH_ATTN_EXT" | "SSM_SCAN" | "SSM_CONV", Some(s)) => {
                format!("{}[{}x{}x{}x{}]", t.op, s[0], s[1], s[2], s[3])
            }
            _ => t.op.clone(),
        };
        match by.iter_mut().find(|(k, _, _)| *k == key) {
            Some((_, c, d)) => {
                *c += 1;
                *d += t.elapsed;
            }
            None => by.push((key, 1, t.elapsed)),
        }
    }
    by.sort_by_key(|b| std::cmp::Reverse(b.2));
    for (op, nodes, d) in by {
        tracing::trace!(target: "stllm::ops", n_tokens, n_kv, op = %op, nodes, us = d.as_micros() as u64);
    }
}

fn write_mask(
    t: Tensor,
    cells: &KvCells,
    who: &[(SeqId, u32)],
    n_kv: usize,
    window: Option<usize>,
) -> Result<(), GgmlError> {
    if t.dtype() == Some(DType::F16) {
        t.write_f16(&cells.mask_as(who, n_kv, window, half::f16::ZERO, half::f16::NEG_INFINITY))
    } else {
        t.write_f32(&cells.mask(who, n_kv, window))
    }
}

/// Bytes held by the model and its cache: totals over all backends, what the main device (the
/// one with the output head) reports, and the breakdown per backend.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct MemoryUsage {
    /// The main device's name
    pub device: String,
    pub weights: usize,
    pub kv: usize,
    /// Recurrent (Mamba) state of hybrid models: conv + SSM state per sequence slot
    pub recurrent: usize,
    /// LoRA adapters loaded (current versions; replaced ones live until their requests end),
    /// plus the stack of the last multi-adapter step
    pub lora: usize,
    /// The scheduler's compute buffers (grow to the largest step so far, then stay: this is also
    /// their peak)
    pub compute: usize,
    pub device_free: usize,
    pub device_total: usize,
    /// Per backend: the devices in split order, then the CPU
    pub backends: Vec<BackendMemory>,
}

/// One backend's share of [`MemoryUsage`].
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct BackendMemory {
    pub name: String,
    /// Repeating layers it holds
    pub layers: usize,
    pub weights: usize,
    pub kv: usize,
    pub recurrent: usize,
    pub compute: usize,
    /// What the device reports (the CPU: system memory)
    pub free: usize,
    pub total: usize,
}

/// A generous estimate of the compute buffer for ubatches of `n_ubatch` tokens over `n_cells`
/// cells: the activations of one layer (kept alive at once), the masks, and a logits row per token.
/// `None` when it overflows.
pub fn compute_estimate(hp: &crate::models::HParams, n_cells: usize, n_ubatch: usize) -> Option<usize> {
    let f = 4; // F32 activations
    let per_token = hp.n_embd * 8 + hp.n_ff * 3 + (hp.n_head + 2 * hp.n_head_kv) * hp.head_dim * 2;
    let acts = n_ubatch.checked_mul(per_token)?.checked_mul(f)?;
    let masks = n_cells.checked_mul(n_ubatch)?.checked_mul(4)?;
    let logits = n_ubatch.checked_mul(hp.n_vocab)?.checked_mul(f)?;
    acts.checked_add(masks)?.checked_add(logits)
}

/// Most KV cells one runner holds (cells are addressed with 32-bit indices in the masks' rows).
pub const MAX_CELLS: usize = 1 << 31;
/// Most tokens in one ubatch.
pub const MAX_UBATCH: usize = 1 << 20;

/// Cells attended to are padded to a multiple of this.
const KV_PAD: usize = 256;

/// The padding of the attended cells for a step of these tokens' sequences: [`KV_PAD`] per four
/// distinct sequences (at least one), so a decode step of N sequences keeps its shape for about
/// 64 steps whatever N.
/// A gathered segment's rows, its sequence's cells as `(cell, position)`, and their count
/// padded to [`KV_PAD`].
type Gathered = (std::ops::Range<usize>, Vec<(u32, u32)>, usize);

/// How a step's rows attend (see [`crate::graph::attn_segments`]): its flash-attention calls,
/// the rows under the pool mask, and the cells each gathered call reads.
struct AttnPlan {
    segments: Vec<crate::graph::AttnSegment>,
    /// Rows of the step whose mask rows are in the pool mask, in mask order (all of them when
    /// nothing is gathered)
    mask_rows: Vec<usize>,
    /// Per gathered segment, in segment order: its rows, and its sequence's cells (padded to
    /// [`KV_PAD`] with the first cell, masked) as `(cell, position)`
    gathered: Vec<Gathered>,
}

impl AttnPlan {
    fn n_gather_cells(&self) -> usize {
        self.gathered.iter().map(|g| g.2).sum()
    }

    fn n_gather_mask(&self) -> usize {
        self.gathered.iter().map(|g| g.2 * g.0.len()).sum()
    }

    fn gather_idx(&self) -> Vec<i32> {
        let mut v = Vec::with_capacity(self.n_gather_cells());
        for (_, cells, n_pad) in &self.gathered {
            v.extend(cells.iter().map(|&(c, _)| c as i32));
            v.extend(std::iter::repeat_n(cells[0].0 as i32, n_pad - cells.len()));
        }
        v
    }

    /// The gathered segments' masks: row `(seq, pos)` sees a gathered cell at a position `<= pos`
    /// (and, with a window `w`, `> pos - w`), as [`KvCells::mask`] decides for the pool.
    fn gather_mask(&self, ub: &UBatch, window: Option<usize>) -> Vec<half::f16> {
        let w = window.map_or(u32::MAX, |w| w.min(u32::MAX as usize) as u32);
        let mut m = Vec::with_capacity(self.n_gather_mask());
        for (rows, cells, n_pad) in &self.gathered {
            for r in rows.clone() {
                let pos = ub.pos[r];
                m.extend(cells.iter().map(|&(_, p)| {
                    if crate::memory::cells::visible(p, pos, w) {
                        half::f16::ZERO
                    } else {
                        half::f16::NEG_INFINITY
                    }
                }));
                m.extend(std::iter::repeat_n(half::f16::NEG_INFINITY, n_pad - cells.len()));
            }
        }
        m
    }
}

impl Runner {
    /// Split the step's rows into flash-attention calls: a prompt chunk attends over its own
    /// sequence's cells, gathered out of the cache, when they are fewer than the pool's `n_kv`
    /// (after padding) — with one unified pool, every other row attends over all `n_kv` cells
    /// and its mask row is `n_kv` wide, so a chunk's cost would grow with the whole pool (the
    /// other sequences and the cached prefixes) instead of its own length. Gathering copies the
    /// cells exactly (an F16 or F32 cache), so the result is the pool path's up to summation
    /// order.
    fn attn_plan(&self, ub: &UBatch, n_kv: usize) -> AttnPlan {
        use crate::graph::{AttnSegment, SegmentKv};
        let all_rows = || AttnPlan { segments: vec![], mask_rows: (0..ub.len()).collect(), gathered: vec![] };
        if !self.flash {
            return all_rows();
        }
        let segs = crate::graph::attn_segments(&ub.seq);
        if segs.is_empty() {
            return all_rows();
        }
        let can_gather = matches!(self.kv.dtype(), DType::F16 | DType::F32);
        let wanted: Vec<SeqId> = segs.iter().filter(|s| s.2 && can_gather).map(|s| ub.seq[s.0]).collect();
        let mut cells = if wanted.is_empty() { vec![] } else { self.cells.cells_of(&wanted, n_kv) }.into_iter();
        let mut plan = AttnPlan { segments: Vec::with_capacity(segs.len()), mask_rows: vec![], gathered: vec![] };
        let (mut idx_off, mut mask_off) = (0, 0);
        for (first, len, gatherable) in segs {
            let own = if gatherable && can_gather { cells.next() } else { None };
            let kv = match own {
                Some(c) if !c.is_empty() && c.len().next_multiple_of(KV_PAD) < n_kv => {
                    let n_pad = c.len().next_multiple_of(KV_PAD);
                    let kv = SegmentKv::Gathered { idx_off, n_cells: n_pad, mask_off };
                    idx_off += n_pad;
                    mask_off += n_pad * len;
                    plan.gathered.push((first..first + len, c, n_pad));
                    kv
                }
                _ => {
                    let kv = SegmentKv::Pool { mask_row: plan.mask_rows.len() };
                    plan.mask_rows.extend(first..first + len);
                    kv
                }
            };
            plan.segments.push(AttnSegment { first, len, kv });
        }
        if plan.gathered.is_empty() && plan.segments.len() == 1 {
            return all_rows();
        }
        plan
    }
}

fn kv_pad(seqs: &[SeqId]) -> usize {
    let mut distinct = seqs.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    KV_PAD * (distinct.len() / 4).max(1)
}

/// Graph nodes needed for a model of `n_layer` layers and ubatches of `n_ubatch` tokens
/// (generous; nodes are cheap). Attention split into segments (`graph::attn_segments`: at most
/// about one per 32 rows) adds a few nodes per segment and layer; each active LoRA adapter four
/// per adapted projection (at most a dozen a layer).
fn graph_size(n_layer: usize, n_ubatch: usize) -> usize {
    let segments = n_ubatch / 32 + 2;
    let gathered = 12 * crate::graph::MAX_GATHERED;
    let lora = 12 * 4 * crate::lora::MAX_STEP_ADAPTERS;
    (n_layer * (64 + 6 * segments + gathered + lora) + 512).max(2048)
}

#[cfg(test)]
mod tests {
    use super::{kv_pad, KV_PAD};

    #[test]
    fn kv_padding_grows_with_the_sequences_of_a_step() {
        assert_eq!(kv_pad(&[3; 512]), KV_PAD, "a prompt chunk of one sequence");
        assert_eq!(kv_pad(&[0, 1, 2]), KV_PAD);
        let decode: Vec<u32> = (0..32).collect();
        assert_eq!(kv_pad(&decode), 8 * KV_PAD, "32 sequences: 2048 cells, a new shape every ~64 steps");
    }
}
