//! The host side of the WIT contract: `engine` (models, and sequences of the model's
//! [`crate::Engine`], so every guest's steps are batched together by its scheduler),
//! `streaming` (the sink a policy writes to) and `plugin-sampler` (forwarding to a sampler
//! plug-in), implemented for any store data that is an [`EngineView`].

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use wasmtime::component::Resource;

use super::bindings::policy::stllm::inference::{engine, plugin_sampler, streaming, types};
use super::EngineHost;
use crate::engine::{Engine, EngineError, EngineOptions, RunTokens, Sequence};
use crate::runner::ErrorKind;
use crate::session::{DecodeError, Logits, SessionOptions};
use crate::Model;

/// A model as guests see it: its tokenizer files, and its weights when loaded (tokenizer-only
/// handles serve `tokenize`/`detokenize`/`template` without weights).
pub struct ModelHandle {
    pub model: Option<Arc<Model>>,
    pub tokenizer_json: Option<String>,
    pub tokenizer_config_json: Option<String>,
    pub generation_config_json: Option<String>,
    /// Options of the engine guests' sequences run on (created on the first sequence).
    pub engine_options: EngineOptions,
    engine: OnceLock<Arc<Engine>>,
    /// The tokenizer parsed natively, for [`ModelHandle::token_bytes`] (on first use)
    native_tokenizer: OnceLock<Option<stllm_policy::tokenizer::Tokenizer>>,
}

fn read_opt(path: &Path, max: u64) -> std::io::Result<Option<String>> {
    match crate::files::read_string_capped(path, max) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl ModelHandle {
    /// Read the tokenizer files of a folder (tokenizer.json, tokenizer_config.json,
    /// generation_config.json; a separate chat_template.jinja is folded into the config as
    /// transformers does).
    pub fn from_dir(dir: &Path, model: Option<Arc<Model>>) -> std::io::Result<ModelHandle> {
        let tokenizer_json = read_opt(&dir.join("tokenizer.json"), crate::files::MAX_TOKENIZER)?;
        let mut tokenizer_config_json = read_opt(&dir.join("tokenizer_config.json"), crate::files::MAX_JSON)?;
        if let Some(tmpl) = read_opt(&dir.join("chat_template.jinja"), crate::files::MAX_JSON)? {
            let mut cfg: serde_json::Value = tokenizer_config_json
                .as_deref()
                .and_then(|s| serde_json::from_str(s).ok())
                .unwrap_or_else(|| serde_json::json!({}));
            if cfg.get("chat_template").is_none() {
                cfg["chat_template"] = serde_json::Value::String(tmpl);
                tokenizer_config_json = Some(cfg.to_string());
            }
        }
        let generation_config_json = read_opt(&dir.join("generation_config.json"), crate::files::MAX_JSON)?;
        Ok(ModelHandle {
            model,
            tokenizer_json,
            tokenizer_config_json,
            generation_config_json,
            engine_options: EngineOptions { n_cells: 4096, max_seqs: 32, ..Default::default() },
            engine: OnceLock::new(),
            native_tokenizer: OnceLock::new(),
        })
    }

    /// The bytes each token stands for (see [`stllm_policy::tokenizer::Tokenizer::token_bytes`]),
    /// from the folder's tokenizer.json parsed natively once (tens to hundreds of milliseconds
    /// for a large vocabulary: call off the async executor). `None` without a usable
    /// tokenizer.json or for an id outside it. The bytes of a token are the model's vocabulary's,
    /// whatever policy runs the request; partial characters are why this exists: a guest's
    /// `detokenize` answers text, which cannot hold them.
    pub fn token_bytes(&self, ids: &[u32]) -> Option<Vec<Vec<u8>>> {
        let tok = self
            .native_tokenizer
            .get_or_init(|| {
                let json = self.tokenizer_json.as_deref()?;
                stllm_policy::tokenizer::Tokenizer::new(json, None)
                    .map_err(|e| tracing::warn!("tokenizer.json for token bytes: {e}"))
                    .ok()
            })
            .as_ref()?;
        ids.iter().map(|&id| tok.token_bytes(id).ok()).collect()
    }

    /// Serve guests from an existing engine (shared with the application's own requests).
    pub fn with_engine(mut self, engine: Arc<Engine>) -> ModelHandle {
        self.model = Some(engine.model().clone());
        self.engine = OnceLock::from(engine);
        self
    }

    /// The engine guests' sequences run on, started on first use.
    pub fn engine(&self) -> Result<&Arc<Engine>, types::Error> {
        let model = self.model()?;
        if let Some(e) = self.engine.get() {
            return Ok(e);
        }
        let e = Engine::new(model.clone(), self.engine_options.clone())
            .map_err(|e| types::Error::Internal(format!("starting the engine: {e}")))?;
        // Another thread may have won the race; its engine is used and ours dropped.
        Ok(self.engine.get_or_init(|| Arc::new(e)))
    }

    /// The engine, if a sequence has started it (or [`ModelHandle::with_engine`] gave it).
    pub fn started_engine(&self) -> Option<&Arc<Engine>> {
        self.engine.get()
    }

    fn model(&self) -> Result<&Arc<Model>, types::Error> {
        self.model
            .as_ref()
            .ok_or_else(|| types::Error::Internal("this runtime has a tokenizer but no model weights".into()))
    }
}

/// The `model` resource.
pub struct ModelRes(pub Arc<ModelHandle>);

/// The `sequence` resource: one sequence of the engine (its cells live in the shared cache).
pub struct SequenceRes {
    session: Arc<Mutex<Sequence>>,
    /// The tokens of its run, while one is going (`run` / `run-next`)
    run: Option<RunTokens>,
}

/// Most bytes of logits one `decode-all` call returns to a guest.
pub const MAX_DECODE_ALL_BYTES: usize = 256 << 20;

/// Receives each piece of generated text with its tokens (and their log-probabilities when the
/// request asked for them); returns false to cancel.
pub type OnText = Box<dyn FnMut(Chunk<'_>) -> bool + Send>;

/// A piece of a policy's streamed output.
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    pub text: &'a str,
    pub tokens: &'a [u32],
    /// One entry per token, or empty when the request did not ask for log-probabilities.
    pub logprobs: &'a [types::LogprobEntry],
}

/// The `sink` resource: where a policy's text goes.
pub struct SinkRes {
    pub on_text: OnText,
    pub cancel: Arc<AtomicBool>,
}

fn decode_err(e: DecodeError) -> types::Error {
    match e.kind() {
        ErrorKind::ContextFull => types::Error::ContextFull(e.to_string()),
        ErrorKind::InvalidInput => types::Error::InvalidInput(e.to_string()),
        ErrorKind::Internal => types::Error::Internal(e.to_string()),
    }
}

/// Run blocking engine work off the async executor.
async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> wasmtime::Result<R> {
    tokio::task::spawn_blocking(f).await.map_err(|e| wasmtime::format_err!("engine task failed: {e}"))
}

impl types::Host for EngineHost<'_> {}

impl engine::Host for EngineHost<'_> {
    async fn current_model(&mut self) -> wasmtime::Result<Resource<ModelRes>> {
        let h = self.handle.clone();
        Ok(self.table.push(ModelRes(h))?)
    }
}

impl engine::HostModel for EngineHost<'_> {
    async fn info(&mut self, m: Resource<ModelRes>) -> wasmtime::Result<engine::ModelInfo> {
        let h = self.table.get(&m)?.0.clone();
        let info = match &h.model {
            Some(model) => {
                let hp = model.hparams();
                engine::ModelInfo {
                    architecture: hp.arch.clone(),
                    vocab_size: hp.n_vocab as u32,
                    context_length: hp.n_ctx_train as u32,
                    hidden_size: hp.n_embd as u32,
                    layers: hp.n_layer as u32,
                    dtype: model.dtype.name().to_string(),
                    parameters: model.n_params(),
                }
            }
            None => engine::ModelInfo {
                architecture: String::new(),
                vocab_size: 0,
                context_length: 0,
                hidden_size: 0,
                layers: 0,
                dtype: String::new(),
                parameters: 0,
            },
        };
        self.returned_to_guest();
        Ok(info)
    }

    async fn special_tokens(&mut self, m: Resource<ModelRes>) -> wasmtime::Result<engine::SpecialTokens> {
        let h = self.table.get(&m)?.0.clone();
        let gen: Option<serde_json::Value> =
            h.generation_config_json.as_deref().and_then(|s| serde_json::from_str(s).ok());
        let cfg = h.model.as_ref().map(|m| m.config.clone());
        let id = |key: &str| -> Option<u32> {
            gen.as_ref()
                .and_then(|g| g.get(key))
                .or_else(|| cfg.as_ref().and_then(|c| c.get(key)))
                .and_then(|v| v.as_u64())
                .and_then(|v| u32::try_from(v).ok())
        };
        let eos = match &h.model {
            Some(model) => model.eos_tokens(),
            None => gen.as_ref().map(crate::model::eos_token_ids).unwrap_or_default(),
        };
        let out = engine::SpecialTokens { bos: id("bos_token_id"), eos, pad: id("pad_token_id") };
        self.returned_to_guest();
        Ok(out)
    }

    async fn tokenizer_json(&mut self, m: Resource<ModelRes>) -> wasmtime::Result<Option<String>> {
        let s = self.table.get(&m)?.0.tokenizer_json.clone();
        self.returned_to_guest();
        Ok(s)
    }

    async fn tokenizer_config_json(&mut self, m: Resource<ModelRes>) -> wasmtime::Result<Option<String>> {
        let s = self.table.get(&m)?.0.tokenizer_config_json.clone();
        self.returned_to_guest();
        Ok(s)
    }

    async fn generation_config_json(&mut self, m: Resource<ModelRes>) -> wasmtime::Result<Option<String>> {
        let s = self.table.get(&m)?.0.generation_config_json.clone();
        self.returned_to_guest();
        Ok(s)
    }

    async fn new_sequence(
        &mut self,
        m: Resource<ModelRes>,
        max_len: u32,
    ) -> wasmtime::Result<Result<Resource<SequenceRes>, types::Error>> {
        self.new_sequence_with(m, max_len, None).await
    }

    async fn new_sequence_with(
        &mut self,
        m: Resource<ModelRes>,
        max_len: u32,
        adapters: Option<Vec<types::Adapter>>,
    ) -> wasmtime::Result<Result<Resource<SequenceRes>, types::Error>> {
        let h = self.table.get(&m)?.0.clone();
        // A name the guest gave that is not loaded is its bad input; the host's defaults failing
        // to resolve is the host's problem.
        let guest_named = adapters.is_some();
        let adapters: Option<Vec<(String, f32)>> =
            adapters.map(|v| v.into_iter().map(|a| (a.name, a.weight)).collect());
        // The first sequence starts the engine (allocates the KV cache): off the executor.
        let r = blocking(move || {
            let engine = h.engine()?;
            engine.open_sequence_with(max_len as usize, adapters.as_deref()).map_err(|e| match e {
                EngineError::Decode(d) => decode_err(d),
                EngineError::Lora(_) | EngineError::InvalidRequest(_) if guest_named => {
                    types::Error::InvalidInput(e.to_string())
                }
                other => types::Error::Internal(other.to_string()),
            })
        })
        .await?;
        let out = match r {
            Ok(s) => {
                let r = self.table.push(SequenceRes { session: Arc::new(Mutex::new(s)), run: None })?;
                self.opened(r.rep());
                Ok(r)
            }
            Err(e) => Err(e),
        };
        self.returned_to_guest();
        Ok(out)
    }

    async fn embed(
        &mut self,
        m: Resource<ModelRes>,
        tokens: Vec<u32>,
    ) -> wasmtime::Result<Result<Vec<f32>, types::Error>> {
        let h = self.table.get(&m)?.0.clone();
        let model = match h.model() {
            Ok(m) => m.clone(),
            Err(e) => return Ok(Err(e)),
        };
        let opts = SessionOptions {
            kv_type: h.engine_options.kv_type,
            flash_attn: h.engine_options.flash_attn,
            n_batch: h.engine_options.n_batch,
            ..Default::default()
        };
        let r = blocking(move || crate::session::embed(&model, &opts, &tokens)).await?;
        self.returned_to_guest();
        Ok(r.map_err(decode_err))
    }

    async fn drop(&mut self, m: Resource<ModelRes>) -> wasmtime::Result<()> {
        self.table.delete(m)?;
        Ok(())
    }
}

impl EngineHost<'_> {
    /// `decode-top` (and, with `norm`, the log-normaliser of the whole row).
    async fn top(
        &mut self,
        s: Resource<SequenceRes>,
        tokens: Vec<u32>,
        k: u32,
        min_p: f32,
        norm: bool,
    ) -> wasmtime::Result<Result<engine::TopCandidates, types::Error>> {
        if !(0.0..=1.0).contains(&min_p) {
            return Ok(Err(types::Error::InvalidInput(format!("min-p must be in [0, 1], got {min_p}"))));
        }
        let sess = self.table.get(&s)?.session.clone();
        // The candidates are cut where the logits are (on the GPU only they cross back); the
        // min-p floor is applied to them here. The step is awaited, not blocked on.
        let queued = sess.lock().unwrap_or_else(|p| p.into_inner()).decode_top_async(&tokens, k, norm);
        let r = match queued {
            Ok(f) => f.await,
            Err(e) => Err(e),
        }
        .map(|top| {
            let candidates =
                top.candidates(min_p).into_iter().map(|c| types::Candidate { id: c.id, logit: c.logit }).collect();
            engine::TopCandidates { candidates, log_norm: top.log_norm.unwrap_or(0.0) }
        });
        self.returned_to_guest();
        Ok(r.map_err(decode_err))
    }
}

impl engine::HostSequence for EngineHost<'_> {
    async fn decode(
        &mut self,
        s: Resource<SequenceRes>,
        tokens: Vec<u32>,
    ) -> wasmtime::Result<Result<Vec<f32>, types::Error>> {
        let sess = self.table.get(&s)?.session.clone();
        let queued = sess.lock().unwrap_or_else(|p| p.into_inner()).decode_async(&tokens, Logits::Last);
        let r = match queued {
            Ok(f) => f.await,
            Err(e) => Err(e),
        }
        .map(|mut rows| rows.pop().unwrap_or_default());
        self.returned_to_guest();
        Ok(r.map_err(decode_err))
    }

    async fn decode_all(
        &mut self,
        s: Resource<SequenceRes>,
        tokens: Vec<u32>,
    ) -> wasmtime::Result<Result<Vec<Vec<f32>>, types::Error>> {
        let sess = self.table.get(&s)?.session.clone();
        // Every row crosses into the guest's memory: bounded.
        let n_vocab = self.handle.model.as_ref().map_or(1, |m| m.hparams().n_vocab);
        let bytes = tokens.len().saturating_mul(n_vocab).saturating_mul(4);
        if bytes > MAX_DECODE_ALL_BYTES {
            self.returned_to_guest();
            return Ok(Err(types::Error::InvalidInput(format!(
                "decode-all of {} tokens returns {} MiB of logits; at most {} MiB in one call (decode fewer tokens at once)",
                tokens.len(),
                bytes >> 20,
                MAX_DECODE_ALL_BYTES >> 20
            ))));
        }
        let queued = sess.lock().unwrap_or_else(|p| p.into_inner()).decode_async(&tokens, Logits::All);
        let r = match queued {
            Ok(f) => f.await,
            Err(e) => Err(e),
        };
        self.returned_to_guest();
        Ok(r.map_err(decode_err))
    }

    async fn decode_top(
        &mut self,
        s: Resource<SequenceRes>,
        tokens: Vec<u32>,
        k: u32,
        min_p: f32,
    ) -> wasmtime::Result<Result<Vec<types::Candidate>, types::Error>> {
        let r = self.top(s, tokens, k, min_p, false).await?;
        Ok(r.map(|t| t.candidates))
    }

    async fn decode_top_norm(
        &mut self,
        s: Resource<SequenceRes>,
        tokens: Vec<u32>,
        k: u32,
        min_p: f32,
    ) -> wasmtime::Result<Result<engine::TopCandidates, types::Error>> {
        self.top(s, tokens, k, min_p, true).await
    }

    async fn run(
        &mut self,
        s: Resource<SequenceRes>,
        tokens: Vec<u32>,
        plan: engine::RunPlan,
    ) -> wasmtime::Result<Result<(), types::Error>> {
        let sess = self.table.get(&s)?.session.clone();
        let plan = stllm_policy::generate::Run {
            row: stllm_policy::generate::RowPlan {
                k: plan.candidates,
                full: plan.full_row,
                min_p: plan.cut_min_p,
                logprobs: plan.logprobs,
            },
            sampling: crate::sampling::SamplingParams {
                temperature: plan.temperature,
                top_k: plan.top_k,
                top_p: plan.top_p,
                min_p: plan.min_p,
                repetition_penalty: plan.repetition_penalty,
                presence_penalty: plan.presence_penalty,
                frequency_penalty: plan.frequency_penalty,
                seed: plan.seed,
            },
            logit_bias: plan.logit_bias,
            stop_tokens: plan.stop_tokens,
            max_tokens: plan.max_tokens,
        };
        let r = sess.lock().unwrap_or_else(|p| p.into_inner()).run(&tokens, plan);
        let out = match r {
            Ok(run) => {
                self.table.get_mut(&s)?.run = Some(run);
                Ok(())
            }
            Err(e) => Err(decode_err(e)),
        };
        self.returned_to_guest();
        Ok(out)
    }

    async fn run_next(
        &mut self,
        s: Resource<SequenceRes>,
    ) -> wasmtime::Result<Result<Vec<engine::Sampled>, types::Error>> {
        let Some(mut run) = self.table.get_mut(&s)?.run.take() else {
            self.returned_to_guest();
            return Ok(Ok(vec![]));
        };
        // Awaited, not blocked on: the compute thread sends the tokens as it samples them.
        let r = run.next().await;
        if matches!(&r, Ok(v) if !v.is_empty()) {
            self.table.get_mut(&s)?.run = Some(run);
        }
        self.returned_to_guest();
        Ok(r.map_err(decode_err).map(|v| {
            v.into_iter()
                .map(|(id, lp)| engine::Sampled {
                    id,
                    logprob: lp.map(|e| types::LogprobEntry {
                        id: e.id,
                        logprob: e.logprob,
                        top: e.top.into_iter().map(|(id, logprob)| types::TokenLogprob { id, logprob }).collect(),
                    }),
                })
                .collect()
        }))
    }

    async fn run_stop(&mut self, s: Resource<SequenceRes>) -> wasmtime::Result<u32> {
        let res = self.table.get_mut(&s)?;
        // Its reader goes first: the compute thread ends a run nobody reads at its next token.
        res.run = None;
        let sess = res.session.clone();
        let queued = sess.lock().unwrap_or_else(|p| p.into_inner()).run_stop_async();
        let n = match queued {
            Ok(f) => f.await.ok(),
            Err(_) => None,
        };
        let n = n.unwrap_or_else(|| sess.lock().unwrap_or_else(|p| p.into_inner()).len());
        self.returned_to_guest();
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    async fn cached_tokens(&mut self, s: Resource<SequenceRes>) -> wasmtime::Result<u32> {
        let sess = self.table.get(&s)?.session.clone();
        let n = sess.lock().unwrap_or_else(|p| p.into_inner()).cached_tokens();
        self.returned_to_guest();
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    async fn fork(
        &mut self,
        s: Resource<SequenceRes>,
    ) -> wasmtime::Result<Result<Resource<SequenceRes>, types::Error>> {
        let sess = self.table.get(&s)?.session.clone();
        let r = blocking(move || sess.lock().unwrap_or_else(|p| p.into_inner()).fork()).await?;
        let out = match r {
            Ok(f) => {
                let r = self.table.push(SequenceRes { session: Arc::new(Mutex::new(f)), run: None })?;
                self.opened(r.rep());
                Ok(r)
            }
            Err(e) => Err(decode_err(e)),
        };
        self.returned_to_guest();
        Ok(out)
    }

    async fn truncate(&mut self, s: Resource<SequenceRes>, len: u32) -> wasmtime::Result<Result<(), types::Error>> {
        let sess = self.table.get(&s)?.session.clone();
        let r = blocking(move || sess.lock().unwrap_or_else(|p| p.into_inner()).truncate(len as usize))
            .await?
            .map_err(decode_err);
        self.returned_to_guest();
        Ok(r)
    }

    async fn len(&mut self, s: Resource<SequenceRes>) -> wasmtime::Result<u32> {
        let sess = self.table.get(&s)?.session.clone();
        let n = sess.lock().unwrap_or_else(|p| p.into_inner()).len() as u32;
        self.returned_to_guest();
        Ok(n)
    }

    async fn drop(&mut self, s: Resource<SequenceRes>) -> wasmtime::Result<()> {
        self.table.delete(s)?;
        Ok(())
    }
}

impl streaming::Host for EngineHost<'_> {}

impl streaming::HostSink for EngineHost<'_> {
    async fn emit(&mut self, s: Resource<streaming::Sink>, text: String, tokens: Vec<u32>) -> wasmtime::Result<bool> {
        self.emit_logprobs(s, text, tokens, vec![]).await
    }

    async fn emit_logprobs(
        &mut self,
        s: Resource<streaming::Sink>,
        text: String,
        tokens: Vec<u32>,
        logprobs: Vec<types::LogprobEntry>,
    ) -> wasmtime::Result<bool> {
        let sink = self.table.get_mut(&s)?;
        let chunk = Chunk { text: &text, tokens: &tokens, logprobs: &logprobs };
        let go_on = !sink.cancel.load(Ordering::Relaxed) && (sink.on_text)(chunk);
        if !go_on {
            sink.cancel.store(true, Ordering::Relaxed);
        }
        self.returned_to_guest();
        Ok(go_on)
    }

    async fn cancelled(&mut self, s: Resource<streaming::Sink>) -> wasmtime::Result<bool> {
        let c = self.table.get(&s)?.cancel.load(Ordering::Relaxed);
        self.returned_to_guest();
        Ok(c)
    }

    async fn drop(&mut self, s: Resource<streaming::Sink>) -> wasmtime::Result<()> {
        // Sinks are lent to the guest (borrow); an owned handle would be ours to drop.
        if s.owned() {
            self.table.delete(s)?;
        }
        Ok(())
    }
}

impl plugin_sampler::Host for EngineHost<'_> {
    async fn active(&mut self) -> wasmtime::Result<bool> {
        let a = self.plugin.is_some();
        self.returned_to_guest();
        Ok(a)
    }

    async fn sample(&mut self, candidates: Vec<types::Candidate>, history: Vec<u32>) -> wasmtime::Result<u32> {
        let Some(p) = self.plugin.as_deref_mut() else {
            wasmtime::bail!("plugin-sampler.sample called but no sampler plug-in is configured");
        };
        p.store.data_mut().last_return = Instant::now();
        let c: Vec<_> = candidates
            .into_iter()
            .map(|c| super::bindings::sampler::stllm::inference::types::Candidate { id: c.id, logit: c.logit })
            .collect();
        let r = p.bindings.stllm_inference_sampler().call_sample(&mut p.store, &c, &history).await;
        match r {
            Ok(t) => {
                self.returned_to_guest();
                Ok(t)
            }
            Err(e) => {
                let d = p.store.data();
                let err = super::classify(&e, d.limits.refused, "sampler", d.limits.max_memory, p.step_timeout, p.fuel);
                let msg = err.to_string();
                if let Some(slot) = self.plugin_error.as_deref_mut() {
                    *slot = Some(err);
                }
                // Trap the policy too: its request cannot go on without its sampler.
                Err(wasmtime::format_err!("{msg}"))
            }
        }
    }
}
