//! Incremental decoding of one sequence: a KV cache, a graph scheduler, and the number of
//! positions already processed. Prefill runs once (in chunks of `n_batch`), then one token a step.

use std::sync::Arc;

use crate::ggml::{Context, DType, GgmlError, Sched, Tensor};
use crate::graph::{Forward, StepInputs};
use crate::memory::kv::KvCache;
use crate::model::Model;
use crate::sampling::{sample_logits, Sampler};

/// Why a decode step failed. The session is unchanged after an error.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("context full: {need} positions needed, the session holds {n_ctx}")]
    ContextFull { need: usize, n_ctx: usize },
    #[error("token id {token} is out of range (vocabulary of {n_vocab})")]
    TokenOutOfRange { token: u32, n_vocab: usize },
    #[error("no tokens to decode")]
    Empty,
    #[error("cannot truncate to {len} positions: the sequence has {n_past}")]
    Truncate { len: usize, n_past: usize },
    #[error("invalid session options: {0}")]
    Options(String),
    #[error(transparent)]
    Ggml(#[from] GgmlError),
}

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
    // Declared first: dropped before the model whose backend it uses.
    sched: Sched,
    kv: KvCache,
    /// The sequence so far (its K/V are in cells 0..tokens.len())
    tokens: Vec<u32>,
    n_batch: usize,
    opts: SessionOptions,
    model: Arc<Model>,
}

impl Session {
    pub fn new(model: Arc<Model>, opts: &SessionOptions) -> Result<Session, DecodeError> {
        let hp = model.hparams();
        let n_ctx = opts.n_ctx.unwrap_or(hp.n_ctx_train.min(4096)).max(1);
        let kv_type = opts.kv_type.unwrap_or(if model.dtype == DType::F32 { DType::F32 } else { DType::F16 });
        let flash = opts.flash_attn.unwrap_or(true);
        if kv_type.is_quantized() {
            if !flash {
                return Err(DecodeError::Options(format!(
                    "a {} KV cache needs flash attention (V is read by rows; the unfused path stores it transposed)",
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
        let kv = KvCache::new(&model.backend, hp.n_layer, hp.n_embd_kv(), hp.n_embd_kv(), n_ctx, kv_type, !flash)?;
        let sched = Sched::new(&[&model.backend], graph_size(hp.n_layer))?;
        tracing::debug!(n_ctx, kv_bytes = kv.bytes(), kv_type = kv_type.name(), "session created");
        Ok(Session {
            sched,
            kv,
            tokens: Vec::new(),
            n_batch: opts.n_batch.max(1),
            opts: SessionOptions { n_ctx: Some(n_ctx), ..opts.clone() },
            model,
        })
    }

    /// A new session holding a copy of this one's sequence.
    pub fn fork(&self) -> Result<Session, DecodeError> {
        let mut s = Session::new(self.model.clone(), &self.opts)?;
        s.kv.copy_from(&self.kv)?;
        s.tokens = self.tokens.clone();
        Ok(s)
    }

    fn state_header(&self) -> crate::memory::state::StateHeader {
        crate::memory::state::StateHeader {
            model: self.model.fingerprint(),
            architecture: self.model.hparams().arch.clone(),
            kv_type: self.kv.dtype().name().to_string(),
            tokens: self.tokens.clone(),
            data_bytes: 0,
        }
    }

    /// Save the sequence (tokens and KV cells) to a prompt-cache file.
    pub fn save_state(&self, path: &std::path::Path) -> Result<(), crate::memory::state::StateError> {
        crate::memory::state::save(path, &self.state_header(), &self.kv)
    }

    /// Replace the sequence with the one saved in a prompt-cache file; returns its tokens. On
    /// error the session is left empty (its cells may have been partly overwritten).
    pub fn load_state(&mut self, path: &std::path::Path) -> Result<Vec<u32>, crate::memory::state::StateError> {
        self.tokens.clear();
        let tokens = crate::memory::state::load(path, &self.state_header(), &self.kv)?;
        self.tokens = tokens.clone();
        Ok(tokens)
    }

    /// Keep the first `len` positions (later ones are overwritten by the next decode).
    pub fn truncate(&mut self, len: usize) -> Result<(), DecodeError> {
        if len > self.tokens.len() {
            return Err(DecodeError::Truncate { len, n_past: self.tokens.len() });
        }
        self.tokens.truncate(len);
        Ok(())
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
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
        self.kv.n_ctx()
    }

    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes()
    }

    /// Forget the sequence (the cache is reused from position 0).
    pub fn reset(&mut self) {
        self.tokens.clear();
    }

    fn check(&self, tokens: &[u32]) -> Result<(), DecodeError> {
        if tokens.is_empty() {
            return Err(DecodeError::Empty);
        }
        let n_vocab = self.model.hparams().n_vocab;
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(DecodeError::TokenOutOfRange { token, n_vocab });
        }
        let need = self.tokens.len() + tokens.len();
        if need > self.kv.n_ctx() {
            return Err(DecodeError::ContextFull { need, n_ctx: self.kv.n_ctx() });
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

    /// Run one graph over `tokens` (at most n_batch), returning the logits rows of `out` and,
    /// if `trace`, the hidden states of all rows.
    #[allow(clippy::type_complexity)]
    fn step(
        &mut self,
        tokens: &[u32],
        out: &[i32],
        trace: bool,
        embeddings: bool,
    ) -> Result<(Vec<Vec<f32>>, Vec<Vec<Vec<f32>>>), DecodeError> {
        let hp = self.model.hparams().clone();
        let n = tokens.len();
        let n_past = self.tokens.len();
        let n_kv = n_past + n;
        let n_out = out.len().max(1);
        let gsize = graph_size(hp.n_layer);
        // Flash attention wants an F16 mask.
        let mask_type = if self.kv.v_trans() { DType::F32 } else { DType::F16 };
        let ctx = Context::new(2 * gsize, gsize)?;
        let mut graph = ctx.new_graph(gsize);
        let inp = StepInputs {
            tokens: ctx.new_tensor(DType::I32, &[n as i64], "inp_tokens").set_input(),
            pos: ctx.new_tensor(DType::I32, &[n as i64], "inp_pos").set_input(),
            mask: ctx.new_tensor(mask_type, &[n_kv as i64, n as i64], "inp_mask").set_input(),
            mask_swa: hp
                .sliding_window
                .map(|_| ctx.new_tensor(mask_type, &[n_kv as i64, n as i64], "inp_mask_swa").set_input()),
            out_ids: ctx.new_tensor(DType::I32, &[n_out as i64], "inp_out_ids").set_input(),
        };
        let mut f = Forward {
            ctx: &ctx,
            graph: &mut graph,
            inp,
            kv: &self.kv,
            n_past,
            n_tokens: n,
            taps: trace.then(Vec::new),
            embeddings,
        };
        let logits = self.model.arch.build(&mut f).set_output();
        let taps = f.taps.take().unwrap_or_default();
        graph.expand(logits);

        let _guard = self.model.compute_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.sched.reset();
        self.sched.alloc(&graph)?;
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let pos: Vec<i32> = (n_past as i32..n_kv as i32).collect();
        let out_ids: Vec<i32> = if out.is_empty() { vec![n as i32 - 1] } else { out.to_vec() };
        write_input(inp.tokens, |t| t.write_i32(&ids))?;
        write_input(inp.pos, |t| t.write_i32(&pos))?;
        write_input(inp.out_ids, |t| t.write_i32(&out_ids))?;
        write_input(inp.mask, |t| write_mask(t, &causal_mask(n_past, n, None)))?;
        if let Some(m) = inp.mask_swa {
            write_input(m, |t| write_mask(t, &causal_mask(n_past, n, hp.sliding_window)))?;
        }
        self.sched.compute(&graph)?;
        self.tokens.extend_from_slice(tokens);

        let rows = |t: Tensor, width: usize| -> Result<Vec<Vec<f32>>, GgmlError> {
            Ok(t.read_f32()?.chunks(width).map(<[f32]>::to_vec).collect())
        };
        let width = if embeddings { hp.n_embd } else { hp.n_vocab };
        let logits = if out.is_empty() { vec![] } else { rows(logits, width)? };
        let hidden = taps.into_iter().map(|t| rows(t, hp.n_embd)).collect::<Result<Vec<_>, _>>()?;
        Ok((logits, hidden))
    }
}

/// Mean-pooled final (normalised) hidden state of `tokens`, computed in a scratch session.
pub fn embed(model: &Arc<Model>, opts: &SessionOptions, tokens: &[u32]) -> Result<Vec<f32>, DecodeError> {
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

fn write_input(t: Tensor, f: impl FnOnce(Tensor) -> Result<(), GgmlError>) -> Result<(), GgmlError> {
    // An input the graph never reads (e.g. the full mask of an all-sliding model) gets no memory.
    if t.has_memory() {
        f(t)
    } else {
        Ok(())
    }
}

fn write_mask(t: Tensor, m: &[f32]) -> Result<(), GgmlError> {
    if t.dtype() == Some(DType::F16) {
        t.write_f16(&m.iter().map(|&x| half::f16::from_f32(x)).collect::<Vec<_>>())
    } else {
        t.write_f32(m)
    }
}

/// Graph nodes needed for a model of `n_layer` layers (generous; nodes are cheap).
fn graph_size(n_layer: usize) -> usize {
    (n_layer * 64 + 512).max(2048)
}

/// Row-major [n_tokens][n_past + n_tokens]: token i (position n_past + i) sees cell j when
/// j <= n_past + i, and, with a window w, when n_past + i - j < w.
pub fn causal_mask(n_past: usize, n: usize, window: Option<usize>) -> Vec<f32> {
    let n_kv = n_past + n;
    let mut m = vec![f32::NEG_INFINITY; n_kv * n];
    for i in 0..n {
        let p = n_past + i;
        let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
        for j in lo..=p {
            m[i * n_kv + j] = 0.0;
        }
    }
    m
}

/// The policy crate's generation loop runs natively over a session (the same code the wasm
/// component runs), for Rust apps that want tokenizer, template and samplers without wasm.
impl stllm_policy::generate::Engine for Session {
    fn decode(&mut self, tokens: &[u32]) -> Result<Vec<f32>, stllm_policy::Error> {
        let rows = Session::decode(self, tokens, Logits::Last).map_err(|e| match e {
            DecodeError::ContextFull { .. } => stllm_policy::Error::ContextFull(e.to_string()),
            DecodeError::TokenOutOfRange { .. } | DecodeError::Empty => {
                stllm_policy::Error::InvalidInput(e.to_string())
            }
            _ => stllm_policy::Error::Internal(e.to_string()),
        })?;
        rows.into_iter().next_back().ok_or_else(|| stllm_policy::Error::Internal("no logits".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::causal_mask;

    #[test]
    fn mask_is_causal_and_windowed() {
        let m = causal_mask(1, 2, None);
        let inf = f32::NEG_INFINITY;
        assert_eq!(m, vec![0.0, 0.0, inf, 0.0, 0.0, 0.0]);
        let w = causal_mask(3, 1, Some(2));
        assert_eq!(w, vec![inf, inf, 0.0, 0.0]);
    }
}
