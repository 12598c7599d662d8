//! The serving core Rust applications embed: an [`Engine`] owns one model's KV cache and a
//! compute thread that batches every active request into each step (continuous batching), and
//! reuses cached prompt prefixes across requests.
//!
//! `Engine` is `Send + Sync`; share it with `Arc` and call [`Engine::generate`] from any number
//! of threads. Each call returns a [`Generation`]: a stream of [`Event`]s (tokens, then one
//! `Done`), cancellable from any thread. [`Engine::stats`] reports KV use, queue lengths,
//! prefix-cache counters and throughput.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use stllm::{Model, ModelOptions};
//! # use stllm::engine::{Engine, EngineOptions, Event, GenerateRequest};
//! let model = Arc::new(Model::load("path/to/model".as_ref(), &ModelOptions::default())?);
//! let engine = Arc::new(Engine::new(model, EngineOptions::default())?);
//! let g = engine.generate(GenerateRequest::greedy(vec![1, 2, 3], 16))?;
//! for ev in g {
//!     if let Event::Token(t) = ev { println!("{t}") }
//! }
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod prefix;
mod scheduler;

pub use scheduler::SNAPSHOT_EVERY;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::ggml::DType;
use crate::memory::cells::MAX_SEQ;
use crate::model::Model;
use crate::runner::{DecodeError, Runner, RunnerOptions};
use crate::sampling::SamplingParams;

/// How an engine is set up.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// KV cells shared by all sequences (positions in flight plus cached prefixes)
    pub n_cells: usize,
    /// Most tokens in one step (decode tokens plus prefill chunks)
    pub n_batch: usize,
    /// Most sequences computing at once; more requests wait in the queue
    pub max_seqs: usize,
    /// Longest sequence (prompt + output); default: the model's training context, capped by
    /// `n_cells`
    pub max_seq_len: Option<usize>,
    /// KV cache element type (default: F32 for F32 models, F16 otherwise)
    pub kv_type: Option<DType>,
    /// Fused flash attention (default on)
    pub flash_attn: Option<bool>,
    /// Keep finished sequences' cells to reuse their prefixes
    pub prefix_cache: bool,
    /// Most cached prefixes kept (each is a sequence id of the cache)
    pub prefix_cache_entries: usize,
    /// LoRA adapters (loaded names, weights) for requests that name none and for caller-driven
    /// sequences (the WIT `engine`'s); resolved at each submission / opening
    pub adapters: Vec<(String, f32)>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            n_cells: 8192,
            n_batch: 512,
            max_seqs: 64,
            max_seq_len: None,
            kv_type: None,
            flash_attn: None,
            prefix_cache: true,
            prefix_cache_entries: 64,
            adapters: vec![],
        }
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    /// Most tokens to generate
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Tokens that end the generation (included in the output); `None`: the model's EOS tokens
    pub stop_tokens: Option<Vec<u32>>,
    /// LoRA adapters (names loaded with [`Model::load_adapter`](crate::Model::load_adapter)) and
    /// their weights; empty: the base model. Resolved when the request is submitted: a reload
    /// afterwards does not change this request.
    pub adapters: Vec<(String, f32)>,
}

impl GenerateRequest {
    /// Greedy decoding of up to `max_tokens` after `prompt`, stopping at the model's EOS.
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
        GenerateRequest { prompt, max_tokens, sampling: SamplingParams::default(), stop_tokens: None, adapters: vec![] }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was generated
    Stop,
    /// `max_tokens`, or the sequence reached the engine's length limit
    Length,
    Cancelled,
    /// The step computing it failed; the message says why
    Error(String),
}

/// The summary sent with [`Event::Done`].
#[derive(Debug, Clone)]
pub struct Finished {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens taken from the prefix cache instead of computed
    pub cached_tokens: usize,
    pub generated: usize,
    /// From submission to the first generated token
    pub time_to_first_token: Option<Duration>,
    pub elapsed: Duration,
    /// Times the request was pre-empted (its cells freed, recomputed later) for memory
    pub preemptions: usize,
}

impl Finished {
    /// A request that ended before computing anything.
    fn without_work(reason: FinishReason, prompt_tokens: usize) -> Finished {
        Finished {
            reason,
            prompt_tokens,
            cached_tokens: 0,
            generated: 0,
            time_to_first_token: None,
            elapsed: Duration::ZERO,
            preemptions: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Event {
    Token(u32),
    Done(Finished),
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("the prompt has {prompt} tokens; this engine's sequences hold at most {max} (prompt + output)")]
    PromptTooLong { prompt: usize, max: usize },
    #[error("the engine has stopped: {0}")]
    Stopped(String),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    State(#[from] crate::memory::state::StateError),
    #[error(transparent)]
    Lora(#[from] crate::lora::LoraError),
}

/// A snapshot of the engine's state and counters.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub kv_cells: usize,
    /// Cells holding any sequence (active or cached)
    pub kv_cells_used: usize,
    /// Cells held only by cached prefixes (freed first under memory pressure)
    pub kv_cells_cached: usize,
    pub kv_bytes: usize,
    /// kv_cells_used / kv_cells
    pub kv_utilisation: f64,
    /// Requests being computed
    pub active: usize,
    pub waiting: usize,
    /// Open externally driven sequences ([`Sequence`], e.g. guests' `sequence`s)
    pub sequences: usize,
    pub prefix_entries: usize,
    pub prefix_hits: u64,
    pub prefix_misses: u64,
    /// Prompt tokens reused from the prefix cache
    pub prefix_tokens_reused: u64,
    /// Prompt tokens computed
    pub prompt_tokens_computed: u64,
    /// Tokens computed for caller-driven sequences (guests' prompts and outputs alike)
    pub ext_tokens_computed: u64,
    /// Tokens sampled by caller-driven sequences' runs ([`Sequence::run`]) on the compute thread
    pub run_tokens_sampled: u64,
    pub tokens_generated: u64,
    pub requests_finished: u64,
    pub steps: u64,
    pub preemptions: u64,
    /// Time spent computing steps
    pub busy: Duration,
    /// Caller-driven sequences' turnarounds: from the reply to a decode until the next decode
    /// of the same sequence arrived (a guest's sampling, detokenizing and streaming), summed,
    /// and how many
    pub ext_turnaround: Duration,
    pub ext_turnarounds: u64,
    /// Time steps waited for caller-driven sequences to come back (see the gather window)
    pub gather_wait: Duration,
    /// Generated tokens per second of busy time
    pub decode_tokens_per_s: f64,
    /// Weights, KV cache and compute buffer on the model's device, and the device's free memory
    pub memory: crate::runner::MemoryUsage,
}

/// A request queued for the compute thread.
struct Submit {
    id: u64,
    req: GenerateRequest,
    stop: Vec<u32>,
    /// The request's adapters, resolved to the versions current at submission
    adapters: crate::lora::AdapterList,
    tx: std::sync::mpsc::Sender<Event>,
    cancel: Arc<AtomicBool>,
    submitted: Instant,
}

/// Where the compute thread answers an operation: a thread blocked on it, or an async task
/// (a guest's host call awaits its step without a thread of its own).
pub(super) enum Reply<T> {
    Blocking(std::sync::mpsc::Sender<Result<T, DecodeError>>),
    Async(tokio::sync::oneshot::Sender<Result<T, DecodeError>>),
}

impl<T> Reply<T> {
    /// Answer; a caller that went away is no error.
    pub(super) fn send(self, r: Result<T, DecodeError>) {
        match self {
            Reply::Blocking(tx) => drop(tx.send(r)),
            Reply::Async(tx) => drop(tx.send(r)),
        }
    }
}

/// Operations on externally driven sequences ([`Sequence`]).
enum ExtOp {
    Open {
        id: u64,
        adapters: crate::lora::AdapterList,
        reply: Reply<()>,
    },
    Fork {
        src: u64,
        id: u64,
        reply: Reply<()>,
    },
    Truncate {
        id: u64,
        len: usize,
        reply: Reply<()>,
    },
    Decode {
        id: u64,
        tokens: Vec<u32>,
        /// Rows wanted: every token's logits, else the last token's `want`
        all: bool,
        want: crate::runner::Want,
        /// Set to the prompt positions taken from the prefix cache (a fresh sequence's first
        /// decode).
        reused: Arc<std::sync::atomic::AtomicUsize>,
        reply: Reply<Vec<crate::runner::RowOut>>,
    },
    Close {
        id: u64,
    },
    /// Append tokens and generate on by a plan ([`Sequence::run`])
    Run {
        id: u64,
        tokens: Vec<u32>,
        plan: Box<RunPlan>,
        /// The sequence's cap on positions
        max_len: usize,
        reused: Arc<std::sync::atomic::AtomicUsize>,
        tx: tokio::sync::mpsc::UnboundedSender<RunMsg>,
    },
    /// End a run; the positions held after it
    RunStop {
        id: u64,
        reply: Reply<usize>,
    },
    /// The cells of a sequence, in position order (for a prompt-cache file)
    Read {
        id: u64,
        reply: Reply<Vec<u8>>,
    },
    /// Put saved cells into the prefix cache
    LoadPrefix {
        tokens: Vec<u32>,
        data: Vec<u8>,
        reply: Reply<()>,
    },
}

#[derive(Default)]
struct Inbox {
    new: Vec<Submit>,
    ops: Vec<ExtOp>,
    shutdown: bool,
    /// Set when the compute thread died; new requests are refused with it.
    dead: Option<String>,
    /// The compute thread has work in hand (false only while it sleeps with nothing to do,
    /// after publishing its stats)
    busy: bool,
}

struct Shared {
    inbox: Mutex<Inbox>,
    wake: Condvar,
    stats: Mutex<EngineStats>,
    cancels: Mutex<HashMap<u64, Arc<AtomicBool>>>,
    next_id: AtomicU64,
}

impl Shared {
    fn notify(&self) {
        let _g = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
        self.wake.notify_all();
    }
}

/// One model served to many concurrent requests.
pub struct Engine {
    shared: Arc<Shared>,
    model: Arc<Model>,
    max_seq_len: usize,
    /// KV cache type name and bytes per cell (prompt-cache files)
    kv_type: &'static str,
    cell_bytes: usize,
    /// Bytes of a sequence's recurrent state (hybrid models; prompt-cache files)
    state_bytes: usize,
    prefix_cache: bool,
    eos: Vec<u32>,
    /// Adapters of requests that name none ([`EngineOptions::adapters`])
    default_adapters: Vec<(String, f32)>,
    worker: Option<JoinHandle<()>>,
}

impl Engine {
    /// Allocate the KV cache and start the compute thread.
    pub fn new(model: Arc<Model>, opts: EngineOptions) -> Result<Engine, EngineError> {
        let hp = model.hparams();
        let max_seqs = opts.max_seqs.max(1);
        // A hybrid model's cached prefixes each keep a recurrent-state slot (tens of MB for real
        // models), so it caches at most 8 of them; they are usable whole only (see `usable_hit`).
        let recurrent = model.arch.recurrent().is_some();
        let entries = match (opts.prefix_cache, recurrent) {
            (false, _) => 0,
            (true, false) => opts.prefix_cache_entries,
            (true, true) => opts.prefix_cache_entries.min(8),
        };
        if max_seqs + entries > MAX_SEQ {
            return Err(EngineError::InvalidRequest(format!(
                "max_seqs ({max_seqs}) + prefix_cache_entries ({entries}) exceed the {MAX_SEQ} sequences a cache tracks"
            )));
        }
        for (name, _) in &opts.adapters {
            model.adapter(name)?;
        }
        let n_cells = opts.n_cells.max(1);
        let max_seq_len = opts.max_seq_len.unwrap_or(hp.n_ctx_train).min(n_cells);
        let runner = Runner::new(
            model.clone(),
            &RunnerOptions {
                n_cells,
                n_ubatch: opts.n_batch,
                kv_type: opts.kv_type,
                flash_attn: opts.flash_attn,
                n_seq_max: max_seqs + entries + 2,
            },
        )?;
        let shared = Arc::new(Shared {
            inbox: Mutex::new(Inbox::default()),
            wake: Condvar::new(),
            stats: Mutex::new(EngineStats {
                kv_cells: n_cells,
                kv_bytes: runner.kv().bytes(),
                memory: runner.memory(),
                ..Default::default()
            }),
            cancels: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        });
        let cfg = scheduler::Config { max_seqs, max_seq_len, prefix_entries: entries };
        let (kv_type, cell_bytes, state_bytes) =
            (runner.kv().dtype().name(), runner.kv().cell_bytes(), runner.state_bytes());
        let sh = shared.clone();
        let worker = std::thread::Builder::new()
            .name("stllm-engine".into())
            .spawn(move || scheduler::run(runner, cfg, sh))
            .map_err(|e| EngineError::Stopped(format!("cannot start the compute thread: {e}")))?;
        tracing::info!(n_cells, max_seqs, max_seq_len, prefix_entries = entries, "engine started");
        let eos = model.eos_tokens();
        Ok(Engine {
            shared,
            model,
            max_seq_len,
            kv_type,
            cell_bytes,
            state_bytes,
            prefix_cache: entries > 0,
            eos,
            default_adapters: opts.adapters,
            worker: Some(worker),
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The current versions of adapters named with weights (hot reload happens here); at most
    /// [`crate::lora::MAX_STEP_ADAPTERS`] of them.
    fn resolve(&self, names: &[(String, f32)]) -> Result<crate::lora::AdapterList, EngineError> {
        if names.len() > crate::lora::MAX_STEP_ADAPTERS {
            return Err(EngineError::InvalidRequest(format!(
                "{} adapters in one request; at most {}",
                names.len(),
                crate::lora::MAX_STEP_ADAPTERS
            )));
        }
        names
            .iter()
            .map(|(name, w)| {
                if !w.is_finite() {
                    return Err(EngineError::InvalidRequest(format!("adapter {name:?}: weight {w} is not finite")));
                }
                Ok((self.model.adapter(name)?, *w))
            })
            .collect()
    }

    /// Longest sequence (prompt + output) a request may reach.
    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    /// Queue a request; tokens stream from the returned [`Generation`].
    pub fn generate(&self, req: GenerateRequest) -> Result<Generation, EngineError> {
        if req.prompt.is_empty() {
            return Err(EngineError::InvalidRequest("empty prompt".into()));
        }
        let n_vocab = self.model.hparams().n_vocab;
        if let Some(t) = req.prompt.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(EngineError::InvalidRequest(format!("token id {t} is out of range (vocabulary of {n_vocab})")));
        }
        if req.prompt.len() >= self.max_seq_len {
            return Err(EngineError::PromptTooLong { prompt: req.prompt.len(), max: self.max_seq_len });
        }
        req.sampling.validate().map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
        let names = if req.adapters.is_empty() { &self.default_adapters } else { &req.adapters };
        let adapters = self.resolve(names)?;
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = req.stop_tokens.clone().unwrap_or_else(|| self.eos.clone());
        if req.max_tokens == 0 {
            let _ = tx.send(Event::Done(Finished::without_work(FinishReason::Length, req.prompt.len())));
            return Ok(Generation { id, rx, cancel, shared: self.shared.clone(), done: false });
        }
        {
            let mut inbox = self.shared.inbox.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(why) = &inbox.dead {
                return Err(EngineError::Stopped(why.clone()));
            }
            self.shared.cancels.lock().unwrap_or_else(|p| p.into_inner()).insert(id, cancel.clone());
            inbox.new.push(Submit { id, req, stop, adapters, tx, cancel: cancel.clone(), submitted: Instant::now() });
            self.shared.wake.notify_all();
        }
        Ok(Generation { id, rx, cancel, shared: self.shared.clone(), done: false })
    }

    /// Cancel a request by id (no-op if it has finished). Its cells are freed at the next step.
    pub fn cancel(&self, id: u64) -> bool {
        let flag = self.shared.cancels.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned();
        match flag {
            Some(f) => {
                f.store(true, Ordering::Relaxed);
                self.shared.notify();
                true
            }
            None => false,
        }
    }

    pub fn stats(&self) -> EngineStats {
        self.shared.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Block until the compute thread has nothing to do and has published its stats (or
    /// `timeout` passes); true if idle.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let t0 = Instant::now();
        loop {
            {
                let inbox = self.shared.inbox.lock().unwrap_or_else(|p| p.into_inner());
                if inbox.dead.is_some() || (!inbox.busy && inbox.new.is_empty() && inbox.ops.is_empty()) {
                    return true;
                }
            }
            if t0.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Engine {
    fn send_op(&self, op: ExtOp) -> Result<(), DecodeError> {
        let mut inbox = self.shared.inbox.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &inbox.dead {
            return Err(DecodeError::Stopped(why.clone()));
        }
        inbox.ops.push(op);
        self.shared.wake.notify_all();
        Ok(())
    }

    fn call<T>(&self, op: impl FnOnce(Reply<T>) -> ExtOp) -> Result<T, DecodeError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.send_op(op(Reply::Blocking(tx)))?;
        rx.recv().unwrap_or_else(|_| Err(DecodeError::Stopped("its compute thread ended".into())))
    }

    /// [`Engine::call`] for async callers: the op is queued now, the returned future waits
    /// for its answer.
    fn call_async<T>(
        &self,
        op: impl FnOnce(Reply<T>) -> ExtOp,
    ) -> Result<impl std::future::Future<Output = Result<T, DecodeError>> + Send + 'static, DecodeError>
    where
        T: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send_op(op(Reply::Async(tx)))?;
        Ok(async move { rx.await.unwrap_or_else(|_| Err(DecodeError::Stopped("its compute thread ended".into()))) })
    }

    /// Open a sequence driven by the caller (decode / fork / truncate), as guests' `sequence`
    /// resources are: its steps are batched with every other request's. `max_len` caps its
    /// positions (0: the engine's limit).
    pub fn open_sequence(self: &Arc<Self>, max_len: usize) -> Result<Sequence, DecodeError> {
        self.open_sequence_with(max_len, None).map_err(|e| match e {
            EngineError::Decode(d) => d,
            other => DecodeError::Options(other.to_string()),
        })
    }

    /// [`Engine::open_sequence`] computed with LoRA `adapters` (loaded names and weights; `None`:
    /// [`EngineOptions::adapters`], empty: the base model).
    pub fn open_sequence_with(
        self: &Arc<Self>,
        max_len: usize,
        adapters: Option<&[(String, f32)]>,
    ) -> Result<Sequence, EngineError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let adapters = self.resolve(adapters.unwrap_or(&self.default_adapters))?;
        self.call(|reply| ExtOp::Open { id, adapters, reply })?;
        let max_len = if max_len == 0 { self.max_seq_len } else { max_len.min(self.max_seq_len) };
        Ok(Sequence {
            id,
            engine: self.clone(),
            len: Default::default(),
            in_flight: Default::default(),
            max_len,
            reused: Default::default(),
        })
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.model.hparams().arch)
            .field("max_seq_len", &self.max_seq_len)
            .finish()
    }
}

impl Engine {
    fn state_header(&self, tokens: Vec<u32>) -> crate::memory::state::StateHeader {
        crate::memory::state::StateHeader {
            model: self.model.fingerprint(),
            architecture: self.model.hparams().arch.clone(),
            kv_type: self.kv_type.to_string(),
            tokens,
            recurrent_bytes: self.state_bytes as u64,
            data_bytes: 0,
            checksum: 0,
        }
    }

    /// Compute `tokens` (or take them from the prefix cache) and save their KV cells (and a
    /// hybrid model's recurrent state after them) to a prompt-cache file (the seed's
    /// `prompt_cache_save`); they stay in the prefix cache too.
    pub fn save_prompt(self: &Arc<Self>, tokens: &[u32], path: &std::path::Path) -> Result<(), EngineError> {
        let mut seq = self.open_sequence(0)?;
        seq.decode(tokens, crate::session::Logits::Last)?;
        let id = seq.id;
        let data = self.call(|reply| ExtOp::Read { id, reply })?;
        crate::memory::state::save(path, &self.state_header(tokens.to_vec()), &data)?;
        Ok(())
    }

    /// Load a prompt-cache file into the prefix cache (the seed's `prompt_cache_load`): later
    /// requests starting with its tokens skip computing them. A file made for another model or
    /// cache type is refused. Returns its tokens.
    pub fn load_prompt(&self, path: &std::path::Path) -> Result<Vec<u32>, EngineError> {
        if !self.prefix_cache {
            return Err(EngineError::InvalidRequest(
                "the prefix cache is off: a loaded prompt would be dropped".into(),
            ));
        }
        let expect = self.state_header(vec![]);
        let (tokens, data) = crate::memory::state::load(path, &expect, self.cell_bytes, self.max_seq_len)?;
        let t = tokens.clone();
        self.call(|reply| ExtOp::LoadPrefix { tokens: t, data, reply })?;
        Ok(tokens)
    }
}

/// A sequence the caller drives one call at a time (see [`Engine::open_sequence`]). Its cells
/// stay in the engine's cache between calls; dropping it frees them (or leaves them to the
/// prefix cache).
pub struct Sequence {
    id: u64,
    engine: Arc<Engine>,
    /// Positions held, counting a decode in flight (put back if it fails)
    len: Arc<AtomicUsize>,
    /// An async decode is queued and its future has not ended
    in_flight: Arc<AtomicBool>,
    max_len: usize,
    reused: Arc<std::sync::atomic::AtomicUsize>,
}

impl std::fmt::Debug for Sequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequence").field("id", &self.id).field("len", &self.len()).finish()
    }
}

impl Sequence {
    /// Append `tokens`; the logits of the last one, or of each with `Logits::All`. Blocks until
    /// the engine's step that completes them.
    pub fn decode(&mut self, tokens: &[u32], which: crate::session::Logits) -> Result<Vec<Vec<f32>>, DecodeError> {
        logits_rows(self.decode_blocking(tokens, which == crate::session::Logits::All, crate::runner::Want::Logits)?)
    }

    /// Append `tokens`; the `k` largest logits of the last one (at least one, highest first),
    /// cut where the logits are (on the GPU: only the candidates cross back), and with `norm`
    /// the log-normaliser of its whole row. Blocks like [`Sequence::decode`].
    pub fn decode_top(&mut self, tokens: &[u32], k: u32, norm: bool) -> Result<crate::runner::TopRow, DecodeError> {
        top_row(self.decode_blocking(tokens, false, crate::runner::Want::Top { k: k.max(1), norm })?)
    }

    fn decode_blocking(
        &mut self,
        tokens: &[u32],
        all: bool,
        want: crate::runner::Want,
    ) -> Result<Vec<crate::runner::RowOut>, DecodeError> {
        let need = self.check(tokens)?;
        let id = self.id;
        let (tokens, reused) = (tokens.to_vec(), self.reused.clone());
        let rows = self.engine.call(|reply| ExtOp::Decode { id, tokens, all, want, reused, reply })?;
        self.len.store(need, Ordering::Relaxed);
        Ok(rows)
    }

    /// [`Sequence::decode`] for async callers: checks and queues the tokens now, and returns a
    /// future of the rows that no thread blocks on (a guest's `decode`). Queue one at a time
    /// per sequence: a second one before the first completes is refused.
    pub fn decode_async(
        &mut self,
        tokens: &[u32],
        which: crate::session::Logits,
    ) -> Result<impl std::future::Future<Output = Result<Vec<Vec<f32>>, DecodeError>> + Send + 'static, DecodeError>
    {
        let all = which == crate::session::Logits::All;
        let f = self.queue(tokens, all, crate::runner::Want::Logits)?;
        Ok(async move { logits_rows(f.await?) })
    }

    /// [`Sequence::decode_top`] for async callers (a guest's `decode-top`), as
    /// [`Sequence::decode_async`].
    pub fn decode_top_async(
        &mut self,
        tokens: &[u32],
        k: u32,
        norm: bool,
    ) -> Result<
        impl std::future::Future<Output = Result<crate::runner::TopRow, DecodeError>> + Send + 'static,
        DecodeError,
    > {
        let f = self.queue(tokens, false, crate::runner::Want::Top { k: k.max(1), norm })?;
        Ok(async move { top_row(f.await?) })
    }

    fn queue(
        &mut self,
        tokens: &[u32],
        all: bool,
        want: crate::runner::Want,
    ) -> Result<
        impl std::future::Future<Output = Result<Vec<crate::runner::RowOut>, DecodeError>> + Send + 'static,
        DecodeError,
    > {
        let need = self.check(tokens)?;
        let id = self.id;
        let (tokens, reused) = (tokens.to_vec(), self.reused.clone());
        let f = self.engine.call_async(move |reply| ExtOp::Decode { id, tokens, all, want, reused, reply })?;
        // The length counts the tokens from now on (a second decode checks against it) and is
        // put back if the step fails; until the future ends (or is dropped) no other decode is
        // queued.
        let old = self.len.swap(need, Ordering::Relaxed);
        self.in_flight.store(true, Ordering::Relaxed);
        let guard = InFlight(self.in_flight.clone());
        let len = self.len.clone();
        Ok(async move {
            let _guard = guard;
            let r = f.await;
            if r.is_err() {
                len.store(old, Ordering::Relaxed);
            }
            r
        })
    }

    /// Append `tokens` and let the engine generate on: each next token is sampled by `plan`
    /// where its row is (the candidates cut on the device, as for `decode_top`) and computed in
    /// the next step, without waiting for the caller, until a stop token, `plan.max_tokens`
    /// or the sequence's end. Read the tokens from the returned [`RunTokens`]; end the run
    /// early with [`Sequence::run_stop`]. Other operations are refused until the run has ended
    /// or is stopped; [`Sequence::len`] counts the positions before the run until then.
    pub fn run(&mut self, tokens: &[u32], plan: RunPlan) -> Result<RunTokens, DecodeError> {
        self.check(tokens)?;
        if plan.max_tokens == 0 {
            return Err(DecodeError::Options("a run needs max-tokens of at least 1".into()));
        }
        plan.sampling.validate().map_err(|e| DecodeError::Options(e.to_string()))?;
        let n_vocab = self.engine.model.hparams().n_vocab;
        if let Some((id, b)) = plan.logit_bias.iter().find(|(id, b)| *id as usize >= n_vocab || !b.is_finite()) {
            return Err(DecodeError::Options(format!("logit bias {b} of token {id} (vocabulary {n_vocab})")));
        }
        if !(0.0..=1.0).contains(&plan.row.min_p) {
            return Err(DecodeError::Options(format!("min-p must be in [0, 1], got {}", plan.row.min_p)));
        }
        if plan.row.logprobs.is_some_and(|n| n > stllm_policy::generate::MAX_TOP_LOGPROBS) {
            return Err(DecodeError::Options(format!(
                "at most {} log-probability alternatives",
                stllm_policy::generate::MAX_TOP_LOGPROBS
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (id, tokens, reused, max_len) = (self.id, tokens.to_vec(), self.reused.clone(), self.max_len);
        self.engine.send_op(ExtOp::Run { id, tokens, plan: Box::new(plan), max_len, reused, tx })?;
        self.in_flight.store(true, Ordering::Relaxed);
        Ok(RunTokens { rx, len: self.len.clone(), in_flight: self.in_flight.clone(), ended: false, failed: None })
    }

    /// End this sequence's run (tokens sampled and not yet computed are dropped); the
    /// positions held after it. No run going: a no-op.
    pub fn run_stop(&mut self) -> Result<usize, DecodeError> {
        let id = self.id;
        let len = self.engine.call(|reply| ExtOp::RunStop { id, reply })?;
        self.len.store(len, Ordering::Relaxed);
        self.in_flight.store(false, Ordering::Relaxed);
        Ok(len)
    }

    /// [`Sequence::run_stop`] for async callers.
    pub fn run_stop_async(
        &mut self,
    ) -> Result<impl std::future::Future<Output = Result<usize, DecodeError>> + Send + 'static, DecodeError> {
        let id = self.id;
        let f = self.engine.call_async(move |reply| ExtOp::RunStop { id, reply })?;
        let (len, in_flight) = (self.len.clone(), self.in_flight.clone());
        Ok(async move {
            let n = f.await?;
            len.store(n, Ordering::Relaxed);
            in_flight.store(false, Ordering::Relaxed);
            Ok(n)
        })
    }

    /// Refuse what no step could compute; the length after appending `tokens`.
    fn check(&self, tokens: &[u32]) -> Result<usize, DecodeError> {
        self.idle()?;
        if tokens.is_empty() {
            return Err(DecodeError::Empty);
        }
        let n_vocab = self.engine.model.hparams().n_vocab;
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(DecodeError::TokenOutOfRange { token, n_vocab });
        }
        let need = self.len() + tokens.len();
        if need > self.max_len {
            return Err(DecodeError::ContextFull { need, n_ctx: self.max_len });
        }
        Ok(need)
    }

    /// Refuse an operation while an async decode of this sequence is in flight.
    fn idle(&self) -> Result<(), DecodeError> {
        if self.in_flight.load(Ordering::Relaxed) {
            return Err(DecodeError::Options(
                "a decode of this sequence is still in flight (one operation at a time per sequence)".into(),
            ));
        }
        Ok(())
    }

    /// A new sequence sharing this one's cells (no copy).
    pub fn fork(&self) -> Result<Sequence, DecodeError> {
        self.idle()?;
        let id = self.engine.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let src = self.id;
        self.engine.call(|reply| ExtOp::Fork { src, id, reply })?;
        Ok(Sequence {
            id,
            engine: self.engine.clone(),
            len: Arc::new(AtomicUsize::new(self.len())),
            in_flight: Default::default(),
            max_len: self.max_len,
            reused: Default::default(),
        })
    }

    /// Keep the first `len` positions.
    pub fn truncate(&mut self, len: usize) -> Result<(), DecodeError> {
        self.idle()?;
        let id = self.id;
        self.engine.call(|reply| ExtOp::Truncate { id, len, reply })?;
        self.len.store(len, Ordering::Relaxed);
        Ok(())
    }

    /// Positions of the first decode that were taken from the prefix cache, not computed.
    pub fn cached_tokens(&self) -> usize {
        self.reused.load(Ordering::Relaxed)
    }

    /// Positions so far.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }
}

/// What a sequence's run samples with: the policy crate's rule (rows, sampler, logit bias, stop
/// tokens, most tokens), so a run gives the tokens the guest's own loop would.
pub type RunPlan = stllm_policy::generate::Run;

/// A token a run sampled, and its log-probability entry when the plan asked for them.
pub type Sampled = (u32, Option<stllm_policy::generate::LogprobEntry>);

/// What the compute thread sends a run's reader.
pub(super) enum RunMsg {
    Token(Sampled),
    /// The run ended (a stop token, its most tokens, the sequence's end, or a failure), with
    /// the positions held
    End(Result<usize, DecodeError>),
}

/// The tokens of a run ([`Sequence::run`]), as the compute thread samples them. Dropping it
/// ends the run at its next token; [`Sequence::run_stop`] then makes the sequence usable again.
#[derive(Debug)]
pub struct RunTokens {
    rx: tokio::sync::mpsc::UnboundedReceiver<RunMsg>,
    len: Arc<AtomicUsize>,
    in_flight: Arc<AtomicBool>,
    ended: bool,
    /// A failure that came after tokens, reported by the next call
    failed: Option<DecodeError>,
}

impl std::fmt::Debug for RunMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunMsg::Token((t, _)) => write!(f, "Token({t})"),
            RunMsg::End(r) => write!(f, "End({r:?})"),
        }
    }
}

impl RunTokens {
    /// The tokens sampled since the last call, waiting for at least one; empty once the run has
    /// ended. A failure is reported once, after the tokens before it.
    pub async fn next(&mut self) -> Result<Vec<Sampled>, DecodeError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if self.ended {
            return Ok(vec![]);
        }
        let first = self.rx.recv().await;
        self.take(first)
    }

    /// [`RunTokens::next`] for threads outside an async runtime.
    pub fn next_blocking(&mut self) -> Result<Vec<Sampled>, DecodeError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if self.ended {
            return Ok(vec![]);
        }
        let first = self.rx.blocking_recv();
        self.take(first)
    }

    /// Whether the run has ended (its last tokens may still be unread).
    pub fn ended(&self) -> bool {
        self.ended
    }

    fn take(&mut self, first: Option<RunMsg>) -> Result<Vec<Sampled>, DecodeError> {
        let mut out = Vec::new();
        let mut msg = first;
        loop {
            match msg {
                Some(RunMsg::Token(t)) => out.push(t),
                Some(RunMsg::End(r)) => {
                    self.end();
                    match r {
                        Ok(len) => self.len.store(len, Ordering::Relaxed),
                        Err(e) if out.is_empty() => return Err(e),
                        Err(e) => self.failed = Some(e),
                    }
                    return Ok(out);
                }
                // The sequence was closed or the engine stopped under the run.
                None => {
                    self.end();
                    let e = DecodeError::Stopped("the run's sequence was closed".into());
                    if out.is_empty() {
                        return Err(e);
                    }
                    self.failed = Some(e);
                    return Ok(out);
                }
            }
            match self.rx.try_recv() {
                Ok(m) => msg = Some(m),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => return Ok(out),
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => msg = None,
            }
        }
    }

    fn end(&mut self) {
        if !self.ended {
            self.ended = true;
            self.in_flight.store(false, Ordering::Relaxed);
        }
    }
}

/// Clears a sequence's in-flight flag when an async decode's future ends or is dropped.
struct InFlight(Arc<AtomicBool>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

fn logits_rows(rows: Vec<crate::runner::RowOut>) -> Result<Vec<Vec<f32>>, DecodeError> {
    rows.into_iter()
        .map(|r| match r {
            crate::runner::RowOut::Logits(l) => Ok(l),
            crate::runner::RowOut::Top(_) => Err(DecodeError::Step("candidates where logits were asked".into())),
        })
        .collect()
}

fn top_row(mut rows: Vec<crate::runner::RowOut>) -> Result<crate::runner::TopRow, DecodeError> {
    match rows.pop() {
        Some(crate::runner::RowOut::Top(t)) => Ok(t),
        _ => Err(DecodeError::Step("no candidates came back".into())),
    }
}

impl Drop for Sequence {
    fn drop(&mut self) {
        let _ = self.engine.send_op(ExtOp::Close { id: self.id });
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        {
            let mut inbox = self.shared.inbox.lock().unwrap_or_else(|p| p.into_inner());
            inbox.shutdown = true;
            self.shared.wake.notify_all();
        }
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// A request in flight: iterate it for [`Event`]s (the last is `Done`).
pub struct Generation {
    id: u64,
    rx: Receiver<Event>,
    cancel: Arc<AtomicBool>,
    shared: Arc<Shared>,
    done: bool,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation").field("id", &self.id).field("done", &self.done).finish()
    }
}

impl Generation {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Ask the engine to stop this request; a `Done` with `Cancelled` follows.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
        self.shared.notify();
    }

    /// Next event, waiting at most `timeout`; `None` on timeout or after `Done`.
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<Event> {
        if self.done {
            return None;
        }
        match self.rx.recv_timeout(timeout) {
            Ok(ev) => {
                self.done = matches!(ev, Event::Done(_));
                Some(ev)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => self.engine_gone(),
        }
    }

    fn engine_gone(&mut self) -> Option<Event> {
        self.done = true;
        let why = self.shared.inbox.lock().unwrap_or_else(|p| p.into_inner()).dead.clone();
        let reason = FinishReason::Error(why.unwrap_or_else(|| "the engine stopped".into()));
        Some(Event::Done(Finished::without_work(reason, 0)))
    }

    /// Wait for the end; the generated tokens and the summary.
    pub fn wait(self) -> (Vec<u32>, Finished) {
        let mut tokens = Vec::new();
        for ev in self {
            match ev {
                Event::Token(t) => tokens.push(t),
                Event::Done(f) => return (tokens, f),
            }
        }
        unreachable!("a generation always ends with Done")
    }
}

impl Iterator for Generation {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        match self.rx.recv() {
            Ok(ev) => {
                self.done = matches!(ev, Event::Done(_));
                Some(ev)
            }
            Err(_) => self.engine_gone(),
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        // Nobody listens any more: free the request's cells.
        if !self.done {
            self.cancel();
        }
        self.shared.cancels.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}
