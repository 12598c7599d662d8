//! The compute loop of an [`super::Engine`]: one thread owns the [`Runner`]; each step it
//!
//! 1. takes new requests and drops cancelled ones (freeing their cells);
//! 2. admits waiting requests while sequences and cells allow, sharing the longest cached
//!    prefix of each prompt (see [`super::prefix`]);
//! 3. packs one token of every decoding sequence, then chunks of pending prompts, into one
//!    ubatch of at most `n_batch` tokens — evicting cached prefixes, then pre-empting the
//!    youngest sequence (to be recomputed later), when cells run short;
//! 4. runs the graph and hands each sequence its token.
//!
//! Sequences only see their own cells (the mask), so a sequence's logits do not depend on what
//! it was batched with.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::HashMap;

use super::prefix::PrefixCache;
use super::{Event, ExtOp, FinishReason, Finished, Reply, RunMsg, RunPlan, Shared, Submit};
use crate::memory::cells::{SeqId, MAX_SEQ};
use crate::runner::{DecodeError, RowOut, Runner, UBatch, Want};
use crate::sampling::{sample_logits, Candidate, Sampler};

pub(super) struct Config {
    pub max_seqs: usize,
    pub max_seq_len: usize,
    pub prefix_entries: usize,
}

/// A request, waiting (no `seq`) or active.
struct Req {
    sub: Submit,
    sampler: Sampler,
    /// The sequence's cache id while active
    seq: Option<SeqId>,
    /// Tokens whose K/V are in the cache (positions `0..cached.len()`)
    cached: Vec<u32>,
    /// Tokens to compute next: the rest of the prompt, or the last sampled token
    pending: Vec<u32>,
    /// Prompt and output so far (penalties)
    history: Vec<u32>,
    generated: usize,
    prompt_len: usize,
    cached_tokens: usize,
    first_token: Option<Duration>,
    preemptions: usize,
    /// Admission order (the youngest is pre-empted first)
    admitted: u64,
}

impl Req {
    fn decoding(&self) -> bool {
        self.generated > 0 && self.pending.len() == 1
    }

    fn finish(&self, reason: FinishReason) {
        let _ = self.sub.tx.send(Event::Done(Finished {
            reason,
            prompt_tokens: self.prompt_len,
            cached_tokens: self.cached_tokens,
            generated: self.generated,
            time_to_first_token: self.first_token,
            elapsed: self.sub.submitted.elapsed(),
            preemptions: self.preemptions,
        }));
    }
}

/// A sequence driven from outside (a guest's `sequence`, or [`super::Sequence`]): it computes
/// what it is given, joins steps like any request, and keeps its cells between calls.
struct Ext {
    seq: SeqId,
    cached: Vec<u32>,
    pending: Vec<u32>,
    /// Return a logits row per pending token (else only the last's `want`)
    all: bool,
    want: Want,
    rows: Vec<RowOut>,
    reply: Option<Reply<Vec<RowOut>>>,
    admitted: u64,
    /// LoRA adapters its tokens are computed with (fixed for its life; a fork inherits them)
    adapters: crate::lora::AdapterList,
    /// When its last decode was answered, until its next one arrives (a caller answers within a
    /// round trip: see `gather`)
    replied_at: Option<Instant>,
    /// Generating on by a plan ([`super::Sequence::run`]): each completed row is sampled here
    /// and the token computed next step
    run: Option<ExtRun>,
}

/// A caller-driven sequence's run.
struct ExtRun {
    plan: Box<RunPlan>,
    sampler: Sampler,
    /// Tokens still to yield
    left: usize,
    /// The sequence's cap on positions
    max_len: usize,
    tx: tokio::sync::mpsc::UnboundedSender<RunMsg>,
}

impl ExtRun {
    /// The candidates of a completed row (cut and min-p floored as the plan says) and its
    /// log-normaliser.
    fn candidates(&self, row: RowOut) -> (Vec<Candidate>, f32) {
        match row {
            RowOut::Top(top) => (top.candidates(self.plan.row.min_p), top.log_norm.unwrap_or(0.0)),
            RowOut::Logits(l) => {
                let norm = if self.plan.row.logprobs.is_some() { stllm_policy::generate::log_sum_exp(&l) } else { 0.0 };
                (l.iter().enumerate().map(|(i, &logit)| Candidate { id: i as u32, logit }).collect(), norm)
            }
        }
    }
}

/// The rows a run's plan samples from.
fn run_want(plan: &RunPlan) -> Want {
    if plan.row.full {
        Want::Logits
    } else {
        Want::Top { k: plan.row.k.max(1), norm: plan.row.logprobs.is_some() }
    }
}

/// Who a part of a ubatch belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Who {
    Gen(usize),
    Ext(u64),
}

struct Sched {
    runner: Runner,
    cfg: Config,
    shared: Arc<Shared>,
    waiting: VecDeque<Req>,
    active: Vec<Req>,
    prefix: PrefixCache,
    free_ids: Vec<SeqId>,
    admitted: u64,
    ext: HashMap<u64, Ext>,
    /// How long the last step that computed something took
    last_step: Duration,
}

/// Longest a step waits for caller-driven sequences that were answered by the previous step
/// (each is in a round trip through its caller: a guest samples, streams and asks for the next
/// token). Without it every step would take whichever of them came back first and the rest would
/// trail one step behind, halving the batch. The wait is also capped by the last step's time:
/// a sequence that misses it loses one step, a wait loses at most one step's worth of compute.
const GATHER: Duration = Duration::from_millis(3);

/// Hybrid models: a prompt's recurrent state is snapshotted (kept as a prefix-cache entry) every
/// this many tokens of prefill, so a later prompt sharing a long prefix resumes from the last
/// snapshot inside it; prompt chunks are cut to end on these boundaries.
pub const SNAPSHOT_EVERY: usize = 256;

pub(super) fn run(runner: Runner, cfg: Config, shared: Arc<Shared>) {
    let nested = runner.is_recurrent();
    let mut s = Sched {
        runner,
        cfg,
        shared: shared.clone(),
        waiting: VecDeque::new(),
        active: Vec::new(),
        prefix: if nested { PrefixCache::nested() } else { PrefixCache::default() },
        free_ids: (0..MAX_SEQ as SeqId).rev().collect(),
        admitted: 0,
        ext: HashMap::new(),
        last_step: Duration::ZERO,
    };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.main_loop()));
    if let Err(p) = r {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        let why = format!("the engine's compute thread failed: {msg}");
        tracing::error!("{why}");
        let mut inbox = shared.inbox.lock().unwrap_or_else(|p| p.into_inner());
        inbox.dead = Some(why);
        // Dropping the queued senders ends their generations with the error.
        inbox.new.clear();
    }
}

impl Sched {
    fn main_loop(&mut self) {
        loop {
            // 1. new requests, or sleep until there are some.
            {
                let mut inbox = self.shared.inbox.lock().unwrap_or_else(|p| p.into_inner());
                while !inbox.shutdown
                    && inbox.new.is_empty()
                    && inbox.ops.is_empty()
                    && self.active.is_empty()
                    && self.waiting.is_empty()
                    && !self.ext.values().any(|e| !e.pending.is_empty())
                {
                    inbox.busy = false;
                    inbox = self.shared.wake.wait(inbox).unwrap_or_else(|p| p.into_inner());
                }
                inbox.busy = true;
                if inbox.shutdown {
                    drop(inbox);
                    for r in self.active.drain(..).chain(self.waiting.drain(..)) {
                        r.finish(FinishReason::Cancelled);
                    }
                    for e in self.ext.values_mut() {
                        if let Some(tx) = e.reply.take() {
                            tx.send(Err(DecodeError::Stopped("shutting down".into())));
                        }
                        if let Some(run) = e.run.take() {
                            let _ = run.tx.send(RunMsg::End(Err(DecodeError::Stopped("shutting down".into()))));
                        }
                    }
                    return;
                }
                for sub in inbox.new.drain(..) {
                    self.waiting.push_back(new_req(sub));
                }
                let ops: Vec<ExtOp> = inbox.ops.drain(..).collect();
                drop(inbox);
                for op in ops {
                    self.ext_op(op);
                }
            }
            self.gather();
            self.reap_cancelled();
            self.admit();
            let t = Instant::now();
            // Only a step that computed something sets the gather window.
            if self.step() {
                self.last_step = t.elapsed();
            }
            self.publish_stats();
        }
    }

    /// Wait (briefly, see [`GATHER`]) for the caller-driven sequences in a round trip, so the
    /// next step computes them together: those answered within the last two steps' time that
    /// have not asked again. (Not only those the last step answered: after a step that missed
    /// some, the next would otherwise wait for the few it had and let the rest trail behind for
    /// good, two half steps per token.)
    fn gather(&mut self) {
        let limit = GATHER.min(self.last_step);
        if limit.is_zero() {
            return;
        }
        let horizon = self.last_step.max(GATHER) * 2;
        let t0 = Instant::now();
        loop {
            let missing = self.ext.values().any(|e| {
                e.pending.is_empty() && e.reply.is_none() && e.replied_at.is_some_and(|t| t.elapsed() < horizon)
            });
            let left = limit.saturating_sub(t0.elapsed());
            if !missing || left.is_zero() {
                self.shared.stats.lock().unwrap_or_else(|p| p.into_inner()).gather_wait += t0.elapsed();
                return;
            }
            let ops: Vec<ExtOp> = {
                let mut inbox = self.shared.inbox.lock().unwrap_or_else(|p| p.into_inner());
                if inbox.ops.is_empty() && !inbox.shutdown {
                    inbox = self.shared.wake.wait_timeout(inbox, left).unwrap_or_else(|p| p.into_inner()).0;
                }
                if inbox.shutdown {
                    return;
                }
                for sub in inbox.new.drain(..) {
                    self.waiting.push_back(new_req(sub));
                }
                inbox.ops.drain(..).collect()
            };
            for op in ops {
                self.ext_op(op);
            }
        }
    }

    fn reap_cancelled(&mut self) {
        let cancelled = |r: &Req| r.sub.cancel.load(Ordering::Relaxed);
        let mut i = 0;
        while i < self.active.len() {
            if cancelled(&self.active[i]) {
                let r = self.active.swap_remove(i);
                self.retire(r, FinishReason::Cancelled);
            } else {
                i += 1;
            }
        }
        self.waiting.retain(|r| {
            if cancelled(r) {
                r.finish(FinishReason::Cancelled);
                self.shared.stats.lock().unwrap_or_else(|p| p.into_inner()).requests_finished += 1;
                false
            } else {
                true
            }
        });
    }

    /// The cached prefix `tokens` can start from, computed under the same adapters (`salt`). A
    /// hybrid model's entry is only usable whole (its recurrent state stands at its end) and
    /// with at least one token left to compute.
    fn usable_hit(&self, salt: u64, tokens: &[u32]) -> Option<crate::engine::prefix::Hit> {
        if !self.runner.is_recurrent() {
            return self.prefix.lookup(salt, tokens);
        }
        let h = self.prefix.lookup_whole(salt, tokens, tokens.len())?;
        (self.runner.recurrent_pos(h.seq) == Some(h.len as u32)).then_some(h)
    }

    /// Hybrid models: keep `seq`'s state at `tokens` (its cells shared, its state slot copied)
    /// as a prefix-cache entry. A snapshot takes a free entry and id; when none is free it only
    /// replaces the previous snapshot of the same prompt (so a long prompt keeps its early
    /// boundaries and its latest one), and never evicts anything else.
    fn snapshot(&mut self, seq: SeqId, salt: u64, tokens: Vec<u32>) {
        if self.prefix.contains_whole(salt, &tokens) {
            return;
        }
        if self.prefix.len() >= self.cfg.prefix_entries || self.free_ids.is_empty() {
            let prev = tokens.len() - SNAPSHOT_EVERY;
            match self.prefix.lookup_whole(salt, &tokens, tokens.len()) {
                Some(h) if h.len == prev && prev > 0 => {
                    if let Some(old) = self.prefix.remove(h.entry) {
                        self.free_seq(old);
                    }
                }
                _ => return,
            }
        }
        let id = self.free_ids.pop().expect("checked");
        if self.runner.seq_cp(seq, id, 0, u32::MAX).is_err() {
            self.runner.cells.seq_rm(id, 0, u32::MAX);
            self.free_ids.push(id);
            return;
        }
        tracing::debug!(seq, snapshot = id, tokens = tokens.len(), "recurrent state snapshot");
        for s in self.prefix.insert(id, salt, tokens) {
            self.free_seq(s);
        }
    }

    /// Free a sequence id and every cell only it holds.
    fn free_seq(&mut self, seq: SeqId) {
        self.runner.cells.seq_rm(seq, 0, u32::MAX);
        // No adapters cannot be refused.
        let _ = self.runner.set_adapters(seq, vec![]);
        self.free_ids.push(seq);
    }

    /// End an active request: report, then keep its cells as a cached prefix or free them.
    fn retire(&mut self, mut r: Req, reason: FinishReason) {
        r.finish(reason);
        self.shared.stats.lock().unwrap_or_else(|p| p.into_inner()).requests_finished += 1;
        let Some(seq) = r.seq.take() else { return };
        let salt = adapters_salt(&r.sub.adapters);
        // No adapters cannot be refused.
        let _ = self.runner.set_adapters(seq, vec![]);
        self.cache_or_free(seq, salt, std::mem::take(&mut r.cached));
    }

    /// Evict the least recently used cached prefix; false if there is none.
    fn evict_one(&mut self, keep: Option<u64>) -> bool {
        match self.prefix.evict_lru(keep) {
            Some(seq) => {
                self.free_seq(seq);
                true
            }
            None => false,
        }
    }

    fn admit(&mut self) {
        while self.active.len() < self.cfg.max_seqs && !self.free_ids.is_empty() {
            let Some(front) = self.waiting.front() else { break };
            let salt = adapters_salt(&front.sub.adapters);
            let hit = self.usable_hit(salt, &front.pending);
            // Reuse at most all but the last prompt token: its logits must be computed.
            let reuse = hit.map_or(0, |h| h.len.min(front.pending.len() - 1));
            let need = front.pending.len() - reuse;
            // Keep a cell of headroom per active sequence so admitted work can decode.
            let headroom = self.active.len() + 1;
            while self.runner.cells.free() < need + headroom && self.evict_one(hit.map(|h| h.entry)) {}
            if self.runner.cells.free() < need + headroom && !self.active.is_empty() {
                break; // wait for memory
            }
            let mut r = self.waiting.pop_front().expect("front exists");
            let seq = self.free_ids.pop().expect("checked");
            // The engine resolves adapters from its own model; one of another is refused.
            if let Err(e) = self.runner.set_adapters(seq, r.sub.adapters.clone()) {
                self.free_ids.push(seq);
                r.finish(FinishReason::Error(e.to_string()));
                self.shared.stats.lock().unwrap_or_else(|p| p.into_inner()).requests_finished += 1;
                continue;
            }
            r.seq = Some(seq);
            self.admitted += 1;
            r.admitted = self.admitted;
            let mut st = self.shared.stats.lock().unwrap_or_else(|p| p.into_inner());
            match hit {
                Some(h) if reuse > 0 && self.runner.share_prefix(h.seq, seq, reuse as u32).is_ok() => {
                    self.prefix.touch(h.entry);
                    r.cached = r.pending.drain(..reuse).collect();
                    if r.generated == 0 {
                        r.cached_tokens = reuse;
                    }
                    st.prefix_hits += 1;
                    st.prefix_tokens_reused += reuse as u64;
                }
                _ => st.prefix_misses += 1,
            }
            drop(st);
            self.active.push(r);
        }
    }

    /// Pre-empt the youngest active request: free its cells and queue it first to be
    /// recomputed (its prompt becomes everything it has so far).
    fn preempt_youngest(&mut self) {
        let Some(i) = (0..self.active.len()).max_by_key(|&i| self.active[i].admitted) else { return };
        let mut r = self.active.swap_remove(i);
        if let Some(seq) = r.seq.take() {
            self.free_seq(seq);
        }
        let mut all = std::mem::take(&mut r.cached);
        all.append(&mut r.pending);
        r.pending = all;
        r.preemptions += 1;
        self.shared.stats.lock().unwrap_or_else(|p| p.into_inner()).preemptions += 1;
        tracing::debug!(request = r.sub.id, tokens = r.pending.len(), "pre-empted for memory");
        self.waiting.push_front(r);
    }

    /// A sequence id, evicting a cached prefix if none is free.
    fn take_id(&mut self) -> Option<SeqId> {
        if self.free_ids.is_empty() {
            self.evict_one(None);
        }
        self.free_ids.pop()
    }

    /// Register caller-driven sequence `id`, sharing every cell of `from` (a fork) when given.
    fn open_ext(
        &mut self,
        id: u64,
        from: Option<SeqId>,
        cached: Vec<u32>,
        adapters: crate::lora::AdapterList,
    ) -> Result<(), DecodeError> {
        let seq = self.take_id().ok_or(DecodeError::NoSequence { max: MAX_SEQ })?;
        if let Some(src) = from {
            if let Err(e) = self.runner.seq_cp(src, seq, 0, u32::MAX) {
                self.runner.cells.seq_rm(seq, 0, u32::MAX);
                self.free_ids.push(seq);
                return Err(e);
            }
        }
        if let Err(e) = self.runner.set_adapters(seq, adapters.clone()) {
            self.runner.cells.seq_rm(seq, 0, u32::MAX);
            self.free_ids.push(seq);
            return Err(e);
        }
        self.admitted += 1;
        let e = Ext {
            seq,
            cached,
            pending: vec![],
            all: false,
            want: Want::Logits,
            rows: vec![],
            reply: None,
            admitted: self.admitted,
            adapters,
            replied_at: None,
            run: None,
        };
        self.ext.insert(id, e);
        Ok(())
    }

    /// Queue `tokens` on caller-driven sequence `id` (a decode or a run): refused while another
    /// is in flight; a fresh sequence's first tokens may start from a cached prefix.
    fn ext_start(
        &mut self,
        id: u64,
        tokens: Vec<u32>,
        all: bool,
        reused: &std::sync::atomic::AtomicUsize,
    ) -> Result<(), DecodeError> {
        let Some(e) = self.ext.get_mut(&id) else {
            return Err(DecodeError::Closed("decode"));
        };
        if e.reply.is_some() || !e.pending.is_empty() || e.run.is_some() {
            return Err(DecodeError::Options(
                "a decode or run of this sequence is still in flight (one at a time per sequence)".into(),
            ));
        }
        if e.cached.is_empty() && !all {
            // A fresh sequence may start from a cached prefix.
            let (seq, salt) = (e.seq, adapters_salt(&e.adapters));
            let hit = self.usable_hit(salt, &tokens);
            let reuse = hit.map_or(0, |h| h.len.min(tokens.len() - 1));
            let shared = match hit {
                Some(h) if reuse > 0 => self.runner.share_prefix(h.seq, seq, reuse as u32).is_ok(),
                _ => false,
            };
            let e = self.ext.get_mut(&id).expect("checked above");
            match hit {
                Some(h) if shared => {
                    self.prefix.touch(h.entry);
                    reused.store(reuse, std::sync::atomic::Ordering::Relaxed);
                    e.cached = tokens[..reuse].to_vec();
                    e.pending = tokens[reuse..].to_vec();
                    let mut st = self.shared.stats.lock().unwrap_or_else(|p| p.into_inner());
                    st.prefix_hits += 1;
                    st.prefix_tokens_reused += reuse as u64;
                }
                _ => {
                    e.pending = tokens;
                    self.shared.stats.lock().unwrap_or_else(|p| p.into_inner()).prefix_misses += 1;
                }
            }
        } else {
            e.pending = tokens;
        }
        let e = self.ext.get_mut(&id).expect("checked above");
        if let Some(t) = e.replied_at.take() {
            let mut st = self.shared.stats.lock().unwrap_or_else(|p| p.into_inner());
            st.ext_turnaround += t.elapsed();
            st.ext_turnarounds += 1;
        }
        e.rows.clear();
        Ok(())
    }

    fn ext_op(&mut self, op: ExtOp) {
        match op {
            ExtOp::Open { id, adapters, reply } => {
                reply.send(self.open_ext(id, None, vec![], adapters));
            }
            ExtOp::Fork { src, id, reply } => {
                let r = match self.ext.get(&src).map(|e| (e.seq, e.cached.clone(), e.adapters.clone())) {
                    Some((src_seq, cached, adapters)) => self.open_ext(id, Some(src_seq), cached, adapters),
                    None => Err(DecodeError::Closed("fork")),
                };
                reply.send(r);
            }
            ExtOp::Truncate { id, len, reply } => {
                let r = match self.ext.get_mut(&id) {
                    Some(e) if len <= e.cached.len() => match self.runner.check_truncate(e.seq, len, e.cached.len()) {
                        Ok(()) => {
                            e.cached.truncate(len);
                            self.runner.seq_rm(e.seq, len as u32, u32::MAX);
                            Ok(())
                        }
                        Err(err) => Err(err),
                    },
                    Some(e) => Err(DecodeError::Truncate { len, n_past: e.cached.len() }),
                    None => Err(DecodeError::Closed("truncate")),
                };
                reply.send(r);
            }
            ExtOp::Decode { id, tokens, all, want, reused, reply } => {
                if let Err(e) = self.ext_start(id, tokens, all, &reused) {
                    reply.send(Err(e));
                    return;
                }
                let e = self.ext.get_mut(&id).expect("started above");
                e.all = all;
                e.want = want;
                e.reply = Some(reply);
            }
            ExtOp::Run { id, tokens, plan, max_len, reused, tx } => {
                if let Err(e) = self.ext_start(id, tokens, false, &reused) {
                    let _ = tx.send(RunMsg::End(Err(e)));
                    return;
                }
                let e = self.ext.get_mut(&id).expect("started above");
                e.all = false;
                e.want = run_want(&plan);
                let sampler = Sampler::new(plan.sampling.clone());
                e.run = Some(ExtRun { left: plan.max_tokens as usize, plan, sampler, max_len, tx });
            }
            ExtOp::RunStop { id, reply } => {
                let r = match self.ext.get_mut(&id) {
                    Some(e) if e.reply.is_none() => {
                        if e.run.take().is_some() {
                            // The sampled token not yet computed is dropped.
                            e.pending.clear();
                            e.rows.clear();
                        }
                        Ok(e.cached.len())
                    }
                    Some(_) => Err(DecodeError::Options("a decode of this sequence is in flight, not a run".into())),
                    None => Err(DecodeError::Closed("run-stop")),
                };
                reply.send(r);
            }
            ExtOp::Read { id, reply } => {
                let r = match self.ext.get(&id) {
                    // The cells, then a hybrid model's recurrent state (a prompt-cache file's payload).
                    Some(e) => self
                        .runner
                        .read_seq(e.seq)
                        .and_then(|(_, mut data)| {
                            data.extend(self.runner.read_state(e.seq)?);
                            Ok(data)
                        })
                        .map_err(DecodeError::from),
                    None => Err(DecodeError::Closed("read")),
                };
                reply.send(r);
            }
            ExtOp::LoadPrefix { tokens, data, reply } => {
                let n = tokens.len();
                while self.runner.cells.free() < n && self.evict_one(None) {}
                // The payload: the cells, then a hybrid model's recurrent state at `n` (the entry
                // is then a whole-prompt snapshot, as `snapshot` keeps them).
                let cells = n * self.runner.kv().cell_bytes();
                let r = match self.take_id() {
                    Some(seq) => match self
                        .runner
                        .write_seq(seq, n, &data[..cells.min(data.len())])
                        .and_then(|()| self.runner.write_state(seq, &data[cells.min(data.len())..], n))
                    {
                        Ok(()) => {
                            self.cache_or_free(seq, 0, tokens);
                            Ok(())
                        }
                        Err(e) => {
                            self.free_seq(seq);
                            Err(e)
                        }
                    },
                    None => Err(DecodeError::NoSequence { max: MAX_SEQ }),
                };
                reply.send(r);
            }
            ExtOp::Close { id } => {
                if let Some(e) = self.ext.remove(&id) {
                    if let Some(tx) = e.reply {
                        tx.send(Err(DecodeError::Closed("a pending decode")));
                    }
                    let salt = adapters_salt(&e.adapters);
                    let _ = self.runner.set_adapters(e.seq, vec![]);
                    self.cache_or_free(e.seq, salt, e.cached);
                }
            }
        }
    }

    /// Keep a finished sequence's cells as a cached prefix (when the cache is on) or free them.
    fn cache_or_free(&mut self, seq: SeqId, salt: u64, tokens: Vec<u32>) {
        if self.cfg.prefix_entries == 0 {
            self.free_seq(seq);
            return;
        }
        while self.prefix.len() >= self.cfg.prefix_entries {
            match self.prefix.evict_lru(None) {
                Some(old) => self.free_seq(old),
                None => break,
            }
        }
        for s in self.prefix.insert(seq, salt, tokens) {
            self.free_seq(s);
        }
    }

    /// Fail an external sequence's pending call.
    fn fail_ext(&mut self, id: u64, e: DecodeError) {
        if let Some(x) = self.ext.get_mut(&id) {
            x.pending.clear();
            x.rows.clear();
            if let Some(tx) = x.reply.take() {
                tx.send(Err(e));
            } else if let Some(run) = x.run.take() {
                let _ = run.tx.send(RunMsg::End(Err(e)));
            }
        }
    }

    /// (who, pending tokens, decoding, admission order) of everything that wants compute.
    fn participants(&self) -> Vec<(Who, usize, bool, u64)> {
        let gens =
            self.active.iter().enumerate().map(|(i, r)| (Who::Gen(i), r.pending.len(), r.decoding(), r.admitted));
        let exts = self
            .ext
            .iter()
            .filter(|(_, e)| !e.pending.is_empty())
            .map(|(&id, e)| (Who::Ext(id), e.pending.len(), e.pending.len() == 1, e.admitted));
        gens.chain(exts).collect()
    }

    /// One step; whether it computed anything.
    fn step(&mut self) -> bool {
        // Sequences at the length limit end here.
        let mut i = 0;
        while i < self.active.len() {
            let r = &self.active[i];
            if r.cached.len() + r.pending.len() > self.cfg.max_seq_len {
                let r = self.active.swap_remove(i);
                self.retire(r, FinishReason::Length);
            } else {
                i += 1;
            }
        }
        if self.participants().is_empty() {
            return false;
        }
        // Room for one token per decoding sequence: evict cached prefixes, then pre-empt.
        loop {
            let parts = self.participants();
            let decoding = parts.iter().filter(|p| p.2).count();
            if parts.is_empty() || self.runner.cells.free() >= decoding.max(1) {
                break;
            }
            if self.evict_one(None) {
                continue;
            }
            if self.active.len() > 1 || (self.active.len() == 1 && parts.len() > 1) {
                self.preempt_youngest();
                continue;
            }
            // Nothing left to give way: the cache cannot hold what is asked.
            let need = decoding.max(1);
            let err =
                DecodeError::CacheFull { need, free: self.runner.cells.free(), n_cells: self.runner.cells.n_cells() };
            if let Some(r) = self.active.pop() {
                self.retire(r, FinishReason::Error("the KV cache is too small for this sequence".into()));
            }
            let ids: Vec<u64> = self.ext.iter().filter(|(_, e)| !e.pending.is_empty()).map(|(&id, _)| id).collect();
            for id in ids {
                self.fail_ext(
                    id,
                    DecodeError::CacheFull {
                        need,
                        free: self.runner.cells.free(),
                        n_cells: self.runner.cells.n_cells(),
                    },
                );
            }
            tracing::warn!(error = %err, "KV cache exhausted");
            return false;
        }
        // Prefill wants more cells: evict cached prefixes (never pre-empt for prefill).
        let want: usize = self.participants().iter().map(|p| p.1).sum::<usize>().min(self.runner.n_ubatch());
        while self.runner.cells.free() < want && self.evict_one(None) {}

        let budget = self.runner.n_ubatch().min(self.runner.cells.free());
        // Decode tokens first (latency), then prompt chunks in admission order.
        let mut order = self.participants();
        order.sort_by_key(|p| (!p.2, p.3));
        let mut ub = UBatch::default();
        // (who, tokens taken, whether its pending tokens are all taken)
        let mut parts: Vec<(Who, usize, bool)> = Vec::new();
        // LoRA adapter versions in the step: a sequence that would bring it past the most one
        // graph computes waits for a later step.
        let mut step_adapters: Vec<u64> = Vec::new();
        for (who, _, _, _) in order {
            let room = budget - ub.len();
            if room == 0 {
                break;
            }
            if let Who::Gen(i) = who {
                let ids = self.active[i].sub.adapters.iter().map(|(a, _)| a.id());
                let new: Vec<u64> = ids.filter(|id| !step_adapters.contains(id)).collect();
                if step_adapters.len() + new.len() > crate::lora::MAX_STEP_ADAPTERS && !parts.is_empty() {
                    continue;
                }
                step_adapters.extend(new);
            }
            // What the last token's row holds: greedy requests (no penalties) and guests asking
            // for candidates get them cut on the device, one integer per row for the argmax.
            let (seq, cached, pending, all, want) = match who {
                Who::Gen(i) => {
                    let r = &self.active[i];
                    let p = &r.sampler.params;
                    // Penalties reach beyond any cut; top-k sorts, so its k candidates give the
                    // very draw the whole row would.
                    let want = if p.has_penalties() {
                        Want::Logits
                    } else if p.greedy() {
                        Want::Top { k: 1, norm: false }
                    } else if p.top_k > 0 {
                        Want::Top { k: p.top_k, norm: false }
                    } else {
                        Want::Logits
                    };
                    (r.seq.expect("active"), r.cached.len(), &r.pending, false, want)
                }
                Who::Ext(id) => {
                    let e = &self.ext[&id];
                    (e.seq, e.cached.len(), &e.pending, e.all, if e.all { Want::Logits } else { e.want })
                }
            };
            let mut take = pending.len().min(room);
            // A hybrid's prompt chunks end on every snapshot boundary.
            let prefill = matches!(who, Who::Gen(i) if self.active[i].generated == 0);
            if self.prefix.is_nested() && self.cfg.prefix_entries > 0 && prefill {
                take = take.min(SNAPSHOT_EVERY - cached % SNAPSHOT_EVERY);
            }
            let completes = take == pending.len();
            for (j, &t) in pending[..take].iter().enumerate() {
                ub.push_want(t, (cached + j) as u32, seq, all || (completes && j + 1 == take), want);
            }
            parts.push((who, take, completes));
        }
        if ub.is_empty() {
            return false;
        }
        let t0 = Instant::now();
        let out = self.runner.run_select(&ub);
        let dt = t0.elapsed();
        let rows = match out {
            Ok(o) => o,
            Err(e) => {
                // The step failed as a whole: fail the requests in it, keep serving the rest.
                tracing::error!(error = %e, "step failed");
                let mut gens: Vec<usize> = Vec::new();
                for (who, _, _) in &parts {
                    match *who {
                        Who::Gen(i) => gens.push(i),
                        Who::Ext(id) => self.fail_ext(id, DecodeError::Step(e.to_string())),
                    }
                }
                gens.sort_unstable_by_key(|&i| std::cmp::Reverse(i));
                for i in gens {
                    let r = self.active.swap_remove(i);
                    self.retire(r, FinishReason::Error(e.to_string()));
                }
                return true;
            }
        };
        let mut rows = rows.into_iter();
        let mut snapshots: Vec<(SeqId, u64, Vec<u32>)> = Vec::new();
        let mut finished: Vec<(usize, FinishReason)> = Vec::new();
        let (mut n_prompt, mut n_gen, mut n_ext, mut n_run) = (0u64, 0u64, 0u64, 0u64);
        for (who, take, completes) in parts {
            let i = match who {
                Who::Gen(i) => i,
                Who::Ext(id) => {
                    let e = self.ext.get_mut(&id).expect("ext in step");
                    n_ext += take as u64;
                    let computed: Vec<u32> = e.pending.drain(..take).collect();
                    e.cached.extend(computed);
                    if completes && e.run.is_some() {
                        let row = rows.next().expect("row for a completing sequence");
                        let run = e.run.as_mut().expect("checked");
                        let (cands, norm) = run.candidates(row);
                        let (bias, lp) = (&run.plan.logit_bias, run.plan.row.logprobs);
                        match stllm_policy::generate::pick(&mut run.sampler, cands, norm, &e.cached, bias, lp, None) {
                            Ok((t, lp)) => {
                                run.left -= 1;
                                let sent = run.tx.send(RunMsg::Token((t, lp))).is_ok();
                                n_run += 1;
                                let over = !sent
                                    || run.left == 0
                                    || run.plan.stop_tokens.contains(&t)
                                    || e.cached.len() >= run.max_len;
                                if over {
                                    let run = e.run.take().expect("checked");
                                    let _ = run.tx.send(RunMsg::End(Ok(e.cached.len())));
                                } else {
                                    e.pending.push(t);
                                }
                            }
                            Err(err) => {
                                let run = e.run.take().expect("checked");
                                let _ = run.tx.send(RunMsg::End(Err(DecodeError::Step(err.to_string()))));
                            }
                        }
                        continue;
                    }
                    if e.all {
                        e.rows.extend(rows.by_ref().take(take));
                    } else if completes {
                        e.rows.push(rows.next().expect("row for a completing sequence"));
                    }
                    if completes {
                        if let Some(tx) = e.reply.take() {
                            tx.send(Ok(std::mem::take(&mut e.rows)));
                        }
                        // This step's number once `main_loop` counts it.
                        e.replied_at = Some(Instant::now());
                    }
                    continue;
                }
            };
            let r = &mut self.active[i];
            let computed: Vec<u32> = r.pending.drain(..take).collect();
            if r.generated == 0 {
                n_prompt += take as u64;
            }
            r.cached.extend(computed);
            if !completes {
                if self.prefix.is_nested() && r.generated == 0 && r.cached.len().is_multiple_of(SNAPSHOT_EVERY) {
                    snapshots.push((r.seq.expect("active"), adapters_salt(&r.sub.adapters), r.cached.clone()));
                }
                continue;
            }
            let t = match rows.next().expect("one row per completing sequence") {
                RowOut::Top(top) if top.ids.len() <= 1 => top.ids.first().copied().unwrap_or(0),
                RowOut::Top(top) => {
                    let cands = top.ids.iter().zip(&top.logits).map(|(&id, &logit)| Candidate { id, logit }).collect();
                    r.sampler.sample(cands, &r.history).unwrap_or(top.ids[0])
                }
                RowOut::Logits(logits) => sample_logits(&mut r.sampler, &logits, &r.history),
            };
            r.history.push(t);
            r.generated += 1;
            n_gen += 1;
            if r.first_token.is_none() {
                r.first_token = Some(r.sub.submitted.elapsed());
            }
            r.pending.push(t);
            let listening = r.sub.tx.send(Event::Token(t)).is_ok();
            if !listening {
                finished.push((i, FinishReason::Cancelled));
            } else if r.sub.stop.contains(&t) {
                finished.push((i, FinishReason::Stop));
            } else if r.generated >= r.sub.req.max_tokens {
                finished.push((i, FinishReason::Length));
            }
        }
        {
            let mut st = self.shared.stats.lock().unwrap_or_else(|p| p.into_inner());
            st.steps += 1;
            st.busy += dt;
            st.prompt_tokens_computed += n_prompt;
            st.tokens_generated += n_gen;
            st.ext_tokens_computed += n_ext;
            st.run_tokens_sampled += n_run;
        }
        if self.cfg.prefix_entries > 0 {
            for (seq, salt, tokens) in snapshots {
                self.snapshot(seq, salt, tokens);
            }
        }
        finished.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        for (i, reason) in finished {
            let r = self.active.swap_remove(i);
            self.retire(r, reason);
        }
        true
    }

    fn publish_stats(&self) {
        let cells = &self.runner.cells;
        let active_seqs: Vec<SeqId> =
            self.active.iter().filter_map(|r| r.seq).chain(self.ext.values().map(|e| e.seq)).collect();
        let active_cells = cells.used_by(&active_seqs);
        let mut st = self.shared.stats.lock().unwrap_or_else(|p| p.into_inner());
        st.kv_cells_used = cells.used();
        st.kv_cells_cached = cells.used() - active_cells;
        st.kv_utilisation = cells.used() as f64 / cells.n_cells() as f64;
        st.active = self.active.len();
        st.sequences = self.ext.len();
        st.waiting = self.waiting.len();
        st.prefix_entries = self.prefix.len();
        let busy = st.busy.as_secs_f64();
        st.decode_tokens_per_s = if busy > 0.0 { st.tokens_generated as f64 / busy } else { 0.0 };
        st.memory = self.runner.memory();
    }
}

fn new_req(sub: Submit) -> Req {
    let sampler = Sampler::new(sub.req.sampling.clone());
    let prompt = sub.req.prompt.clone();
    Req {
        sampler,
        seq: None,
        cached: Vec::new(),
        pending: prompt.clone(),
        history: prompt.clone(),
        generated: 0,
        prompt_len: prompt.len(),
        cached_tokens: 0,
        first_token: None,
        preemptions: 0,
        admitted: 0,
        sub,
    }
}

/// What names the K/V a request's adapters compute, for the prefix cache: 0 for the base model,
/// else a hash of the adapter versions and weights (a reloaded adapter is another salt).
fn adapters_salt(adapters: &crate::lora::AdapterList) -> u64 {
    adapters.iter().fold(0, |h: u64, (a, w)| {
        (h ^ a.id().wrapping_mul(0x9e3779b97f4a7c15) ^ (w.to_bits() as u64) << 17).wrapping_mul(0x100000001b3).max(1)
    })
}
