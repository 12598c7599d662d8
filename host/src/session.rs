//! Incremental decoding of one sequence: a KV cache, a graph scheduler, and the number of
//! positions already processed. Prefill runs once (in chunks of `n_batch`), then one token a step.

use std::sync::Arc;

use crate::ggml::DType;
use crate::memory::cells::SeqId;
use crate::model::Model;
pub use crate::runner::DecodeError;
use crate::runner::{Runner, RunnerOptions, UBatch};
use crate::sampling::{sample_logits, Sampler};

/// The one sequence id a session uses in its cache.
const SEQ: SeqId = 0;

#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Positions the KV cache holds (default: the model's training context, at most 4096)
    pub n_ctx: Option<usize>,
    /// Most tokens per graph (prefill chunk size)
    pub n_batch: usize,
    /// KV cache element type (default: F32 for F32 models, F16 otherwise)
    pub kv_type: Option<DType>,
    /// Use ggml's fused flash attention (default: on); off computes softmax(KQ)·V unfused
    pub flash_attn: Option<bool>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions { n_ctx: None, n_batch: 512, kv_type: None, flash_attn: None }
    }
}

/// Which logits a step returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    Last,
    All,
}

/// Output of one [`Session::decode_traced`] call.
pub struct Traced {
    /// Row-major [n_tokens][n_vocab]
    pub logits: Vec<Vec<f32>>,
    /// hidden[i] is row-major [n_tokens][n_embd]: i = 0 embeddings, i >= 1 output of layer i-1
    pub hidden: Vec<Vec<Vec<f32>>>,
}

pub struct Session {
    runner: Runner,
    /// The sequence so far (its K/V are in the cache, one cell per position)
    tokens: Vec<u32>,
    n_batch: usize,
    opts: SessionOptions,
}

impl Session {
    pub fn new(model: Arc<Model>, opts: &SessionOptions) -> Result<Session, DecodeError> {
        let n_ctx = opts.n_ctx.unwrap_or(model.hparams().n_ctx_train.min(4096)).max(1);
        let n_batch = opts.n_batch.max(1);
        let runner = Runner::new(
            model,
            &RunnerOptions {
                n_cells: n_ctx,
                n_ubatch: n_batch,
                kv_type: opts.kv_type,
                flash_attn: opts.flash_attn,
                n_seq_max: 4,
            },
        )?;
        Ok(Session { runner, tokens: Vec::new(), n_batch, opts: SessionOptions { n_ctx: Some(n_ctx), ..opts.clone() } })
    }

    /// A new session holding a copy of this one's sequence.
    pub fn fork(&self) -> Result<Session, DecodeError> {
        let mut s = Session::new(self.runner.model().clone(), &self.opts)?;
        s.runner.kv.copy_from(&self.runner.kv)?;
        s.runner.cells = self.runner.cells.clone();
        s.runner.copy_recurrent_from(&self.runner)?;
        s.tokens = self.tokens.clone();
        Ok(s)
    }

    fn state_header(&self) -> crate::memory::state::StateHeader {
        crate::memory::state::StateHeader {
            model: self.model().fingerprint(),
            architecture: self.model().hparams().arch.clone(),
            kv_type: self.runner.kv().dtype().name().to_string(),
            tokens: self.tokens.clone(),
            recurrent_bytes: self.runner.state_bytes() as u64,
            data_bytes: 0,
            checksum: 0,
        }
    }

    /// Save the sequence (tokens, KV cells and, for a hybrid model, its recurrent state) to a
    /// prompt-cache file.
    pub fn save_state(&self, path: &std::path::Path) -> Result<(), crate::memory::state::StateError> {
        let (_, mut data) = self.runner.read_seq(SEQ)?;
        data.extend(self.runner.read_state(SEQ)?);
        crate::memory::state::save(path, &self.state_header(), &data)
    }

    /// Replace the sequence with the one saved in a prompt-cache file; returns its tokens. On
    /// error the session is left empty.
    pub fn load_state(&mut self, path: &std::path::Path) -> Result<Vec<u32>, crate::memory::state::StateError> {
        self.reset();
        let (tokens, data) =
            crate::memory::state::load(path, &self.state_header(), self.runner.kv().cell_bytes(), self.n_ctx())?;
        let cells = tokens.len() * self.runner.kv().cell_bytes();
        let bad =
            |e: DecodeError| crate::memory::state::StateError::Format { path: path.to_path_buf(), msg: e.to_string() };
        let put = self
            .runner
            .write_seq(SEQ, tokens.len(), &data[..cells])
            .and_then(|()| self.runner.write_state(SEQ, &data[cells..], tokens.len()));
        if let Err(e) = put {
            self.reset();
            return Err(bad(e));
        }
        self.tokens = tokens.clone();
        Ok(tokens)
    }

    /// Keep the first `len` positions.
    pub fn truncate(&mut self, len: usize) -> Result<(), DecodeError> {
        if len > self.tokens.len() {
            return Err(DecodeError::Truncate { len, n_past: self.tokens.len() });
        }
        self.runner.check_truncate(SEQ, len, self.tokens.len())?;
        self.runner.cells.seq_rm(SEQ, len as u32, u32::MAX);
        self.tokens.truncate(len);
        Ok(())
    }

    pub fn model(&self) -> &Arc<Model> {
        self.runner.model()
    }

    /// Positions processed so far.
    pub fn n_past(&self) -> usize {
        self.tokens.len()
    }

    /// The tokens of the sequence so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn n_ctx(&self) -> usize {
        self.runner.kv().n_cells()
    }

    /// Weights, KV cache and compute buffer on the model's device.
    pub fn memory(&self) -> crate::runner::MemoryUsage {
        self.runner.memory()
    }

    pub fn kv_bytes(&self) -> usize {
        self.runner.kv().bytes()
    }

    /// The LoRA adapters (with weights) this session's tokens are computed with from now on;
    /// empty: the base model. Set them before decoding (or after [`Session::reset`]): tokens
    /// already in the cache keep what they were computed with.
    /// Adapters loaded for another model are refused.
    pub fn set_adapters(&mut self, adapters: crate::lora::AdapterList) -> Result<(), DecodeError> {
        self.runner.set_adapters(SEQ, adapters)
    }

    /// Forget the sequence (its cells are freed).
    pub fn reset(&mut self) {
        self.runner.cells.seq_rm(SEQ, 0, u32::MAX);
        self.tokens.clear();
    }

    fn check(&self, tokens: &[u32]) -> Result<(), DecodeError> {
        if tokens.is_empty() {
            return Err(DecodeError::Empty);
        }
        self.runner.check_tokens(tokens)?;
        let need = self.tokens.len() + tokens.len();
        if need > self.n_ctx() {
            return Err(DecodeError::ContextFull { need, n_ctx: self.n_ctx() });
        }
        Ok(())
    }

    /// Append `tokens` to the sequence; return logits of the last position or of all of them
    /// (rows of `n_vocab`).
    pub fn decode(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<Vec<f32>>, DecodeError> {
        self.check(tokens)?;
        let mut rows = Vec::new();
        let n_chunks = tokens.len().div_ceil(self.n_batch);
        for (ci, chunk) in tokens.chunks(self.n_batch).enumerate() {
            let last_chunk = ci + 1 == n_chunks;
            let out: Vec<i32> = match which {
                Logits::All => (0..chunk.len() as i32).collect(),
                Logits::Last if last_chunk => vec![chunk.len() as i32 - 1],
                Logits::Last => vec![],
            };
            let (logits, _) = self.step(chunk, &out, false, false)?;
            rows.extend(logits);
        }
        Ok(rows)
    }

    /// Append `tokens` and return the most likely next token, the argmax taken on the device
    /// (one integer read back instead of a logits row; what greedy decoding needs).
    pub fn decode_greedy(&mut self, tokens: &[u32]) -> Result<u32, DecodeError> {
        self.check(tokens)?;
        let chunks: Vec<&[u32]> = tokens.chunks(self.n_batch).collect();
        let (last, init) = chunks.split_last().expect("checked: not empty");
        for chunk in init {
            self.step(chunk, &[], false, false)?;
        }
        let ub = self.ubatch(last, &[last.len() as i32 - 1]);
        let t = self.runner.run_argmax(&ub)?;
        self.tokens.extend_from_slice(last);
        t.first().copied().ok_or(DecodeError::Empty)
    }

    /// Like `decode(.., Logits::All)` in one graph, also returning every layer's hidden states.
    pub fn decode_traced(&mut self, tokens: &[u32]) -> Result<Traced, DecodeError> {
        self.check(tokens)?;
        let out: Vec<i32> = (0..tokens.len() as i32).collect();
        let (logits, hidden) = self.step(tokens, &out, true, false)?;
        Ok(Traced { logits, hidden })
    }

    /// Generate up to `max_tokens` after `prompt`, stopping after an end-of-sequence token
    /// (unless `stop` is empty). Returns the new tokens; calls `on_token` for each.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        sampler: &mut Sampler,
        stop: &[u32],
        mut on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>, DecodeError> {
        let mut out = Vec::new();
        if max_tokens == 0 {
            return Ok(out);
        }
        if sampler.params.greedy() && !sampler.params.has_penalties() {
            // Greedy: the argmax is taken on the device.
            let mut t = self.decode_greedy(prompt)?;
            loop {
                out.push(t);
                on_token(t);
                if out.len() >= max_tokens || stop.contains(&t) {
                    return Ok(out);
                }
                t = self.decode_greedy(&[t])?;
            }
        }
        let mut logits = self.decode(prompt, Logits::Last)?.pop().ok_or(DecodeError::Empty)?;
        // Prompt and output so far, for the penalties.
        let mut history = prompt.to_vec();
        loop {
            let t = sample_logits(sampler, &logits, &history);
            history.push(t);
            out.push(t);
            on_token(t);
            if out.len() >= max_tokens || stop.contains(&t) {
                return Ok(out);
            }
            logits = self.decode(&[t], Logits::Last)?.pop().ok_or(DecodeError::Empty)?;
        }
    }

    /// Run one graph over `tokens` (at most n_batch, appended to the sequence), returning the
    /// rows of `out` and, if `trace`, the hidden states of all rows.
    #[allow(clippy::type_complexity)]
    fn step(
        &mut self,
        tokens: &[u32],
        out: &[i32],
        trace: bool,
        embeddings: bool,
    ) -> Result<(Vec<Vec<f32>>, Vec<Vec<Vec<f32>>>), DecodeError> {
        let ub = self.ubatch(tokens, out);
        let r = self.runner.run(&ub, trace, embeddings)?;
        self.tokens.extend_from_slice(tokens);
        Ok((r.rows, r.hidden))
    }
}

impl Session {
    /// `tokens` appended after the sequence so far; rows `out` produce output.
    fn ubatch(&self, tokens: &[u32], out: &[i32]) -> UBatch {
        let n_past = self.tokens.len() as u32;
        let mut ub = UBatch::default();
        for (i, &t) in tokens.iter().enumerate() {
            ub.push(t, n_past + i as u32, SEQ, out.contains(&(i as i32)));
        }
        ub
    }
}

/// Mean-pooled final (normalised) hidden state of `tokens`, computed in a scratch session.
pub fn embed(model: &Arc<Model>, opts: &SessionOptions, tokens: &[u32]) -> Result<Vec<f32>, DecodeError> {
    // One graph over all the tokens (its mask is quadratic in them): at most the model's
    // training context and MAX_EMBED_TOKENS.
    let n_ctx = model.hparams().n_ctx_train.clamp(1, MAX_EMBED_TOKENS);
    if tokens.len() > n_ctx {
        return Err(DecodeError::ContextFull { need: tokens.len(), n_ctx });
    }
    let mut opts = opts.clone();
    opts.n_ctx = Some(tokens.len().max(1));
    opts.n_batch = opts.n_batch.max(tokens.len());
    let mut s = Session::new(model.clone(), &opts)?;
    s.check(tokens)?;
    let out: Vec<i32> = (0..tokens.len() as i32).collect();
    let (rows, _) = s.step(tokens, &out, false, true)?;
    let n = rows.len().max(1) as f32;
    let mut mean = vec![0f32; model.hparams().n_embd];
    for r in &rows {
        mean.iter_mut().zip(r).for_each(|(m, x)| *m += x / n);
    }
    Ok(mean)
}

/// Most tokens [`embed`] takes at once.
pub const MAX_EMBED_TOKENS: usize = 32768;

/// The policy crate's generation loop runs natively over a session (the same code the wasm
/// component runs), for Rust apps that want tokenizer, template and samplers without wasm.
impl stllm_policy::generate::Engine for Session {
    fn decode(&mut self, tokens: &[u32]) -> Result<Vec<f32>, stllm_policy::Error> {
        let rows = Session::decode(self, tokens, Logits::Last).map_err(|e| match e.kind() {
            crate::runner::ErrorKind::ContextFull => stllm_policy::Error::ContextFull(e.to_string()),
            crate::runner::ErrorKind::InvalidInput => stllm_policy::Error::InvalidInput(e.to_string()),
            crate::runner::ErrorKind::Internal => stllm_policy::Error::Internal(e.to_string()),
        })?;
        rows.into_iter().next_back().ok_or_else(|| stllm_policy::Error::Internal("no logits".into()))
    }
}
