//! The OpenAI endpoints: request fields parsed and validated one by one (an error names its
//! field), turned into a policy [`GenerateRequest`], run as `n` choices on the model's engine,
//! and answered as OpenAI's objects (or SSE chunks).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::{arrival, now_secs, parse_body, ApiError, AppState, CancelOnDrop, ServedModel};
use crate::runtime::{
    Adapter, Chunk, FinishReason, GenerateRequest, GenerateResult, LogprobEntry, Prompt, Runtime, RuntimeError,
    Sampling,
};

type Obj = Map<String, Value>;

/// Most `stop` strings.
const MAX_STOP: usize = 16;
/// Most inputs of one embeddings or completions request.
const MAX_INPUTS: usize = 2048;

// ---------------------------------------------------------------------------------------------
// Field access with errors that name the field.

fn field<'a>(b: &'a Obj, key: &str) -> Option<&'a Value> {
    b.get(key).filter(|v| !v.is_null())
}

fn opt_f32(b: &Obj, key: &str, lo: f32, hi: f32) -> Result<Option<f32>, ApiError> {
    match field(b, key) {
        None => Ok(None),
        Some(v) => {
            let x =
                v.as_f64().ok_or_else(|| ApiError::invalid(Some(key.into()), format!("`{key}` must be a number")))?;
            if !(x.is_finite() && x >= lo as f64 && x <= hi as f64) {
                return Err(ApiError::invalid(Some(key.into()), format!("`{key}` must be in [{lo}, {hi}], got {x}")));
            }
            Ok(Some(x as f32))
        }
    }
}

fn opt_u64(b: &Obj, key: &str, lo: u64, hi: u64) -> Result<Option<u64>, ApiError> {
    match field(b, key) {
        None => Ok(None),
        Some(v) => {
            let x = v
                .as_u64()
                .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1.8e19).map(|f| f as u64));
            let x = x.ok_or_else(|| {
                ApiError::invalid(Some(key.into()), format!("`{key}` must be a non-negative integer, got {v}"))
            })?;
            if x < lo || x > hi {
                return Err(ApiError::invalid(Some(key.into()), format!("`{key}` must be in [{lo}, {hi}], got {x}")));
            }
            Ok(Some(x))
        }
    }
}

fn opt_bool(b: &Obj, key: &str) -> Result<Option<bool>, ApiError> {
    match field(b, key) {
        None => Ok(None),
        Some(Value::Bool(x)) => Ok(Some(*x)),
        Some(_) => Err(ApiError::invalid(Some(key.into()), format!("`{key}` must be a boolean"))),
    }
}

fn opt_str<'a>(b: &'a Obj, key: &str) -> Result<Option<&'a str>, ApiError> {
    match field(b, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::invalid(Some(key.into()), format!("`{key}` must be a string"))),
    }
}

/// Token ids from a JSON array, checked against the vocabulary.
fn token_list(v: &Value, key: &str, n_vocab: usize) -> Result<Vec<u32>, ApiError> {
    let arr = v
        .as_array()
        .ok_or_else(|| ApiError::invalid(Some(key.into()), format!("`{key}` must be an array of token ids")))?;
    arr.iter()
        .map(|t| match t.as_u64() {
            Some(id) if (id as usize) < n_vocab => Ok(id as u32),
            _ => Err(ApiError::invalid(
                Some(key.into()),
                format!("`{key}`: {t} is not a token id of this model (vocabulary of {n_vocab})"),
            )),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// What chat and completions share: sampling, stopping, choices, log-probabilities, adapters.

struct Common {
    max_tokens: Option<u32>,
    sampling: Sampling,
    stop: Vec<String>,
    n: usize,
    stream: bool,
    include_usage: bool,
    adapters: Option<Vec<Adapter>>,
    policy: Option<String>,
    ignore_eos: bool,
    seed_given: bool,
}

/// Sampling defaults for fields a request leaves out: the model's generation_config.json (as
/// vLLM does), else OpenAI's (temperature 1, top_p 1).
fn defaults(m: &ServedModel) -> Sampling {
    let gc: Value =
        m.handle.generation_config_json.as_deref().and_then(|s| serde_json::from_str(s).ok()).unwrap_or_default();
    let f = |k: &str| gc.get(k).and_then(Value::as_f64).map(|v| v as f32);
    let do_sample = gc.get("do_sample").and_then(Value::as_bool);
    Sampling {
        temperature: match do_sample {
            Some(false) => 0.0,
            _ => f("temperature").unwrap_or(1.0),
        },
        top_k: f("top_k").map_or(0, |k| k.max(0.0) as u32),
        top_p: f("top_p").filter(|p| *p > 0.0 && *p <= 1.0).unwrap_or(1.0),
        min_p: f("min_p").filter(|p| (0.0..=1.0).contains(p)).unwrap_or(0.0),
        repetition_penalty: f("repetition_penalty").filter(|p| *p > 0.0).unwrap_or(1.0),
        ..Sampling::default()
    }
}

fn common(b: &Obj, m: &ServedModel, max_n: usize, default_max: Option<u32>) -> Result<Common, ApiError> {
    let n_vocab = m.handle.model.as_ref().map_or(0, |x| x.hparams().n_vocab);
    let mut s = defaults(m);
    if let Some(t) = opt_f32(b, "temperature", 0.0, 2.0)? {
        s.temperature = t;
    }
    if let Some(p) = opt_f32(b, "top_p", 0.0, 1.0)? {
        if p == 0.0 {
            return Err(ApiError::invalid(Some("top_p".into()), "`top_p` must be greater than 0"));
        }
        s.top_p = p;
    }
    if let Some(k) = field(b, "top_k") {
        // vLLM and llama-server take -1 / 0 for "off".
        s.top_k = match k.as_i64() {
            Some(k) if k <= 0 => 0,
            Some(k) if k <= u32::MAX as i64 => k as u32,
            _ => return Err(ApiError::invalid(Some("top_k".into()), format!("`top_k` must be an integer, got {k}"))),
        };
    }
    if let Some(p) = opt_f32(b, "min_p", 0.0, 1.0)? {
        s.min_p = p;
    }
    if let Some(p) = opt_f32(b, "repetition_penalty", 0.01, 100.0)? {
        s.repetition_penalty = p;
    }
    s.presence_penalty = opt_f32(b, "presence_penalty", -2.0, 2.0)?.unwrap_or(0.0);
    s.frequency_penalty = opt_f32(b, "frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0);
    let seed = match field(b, "seed") {
        None => None,
        Some(v) => Some(
            v.as_i64()
                .map(|x| x as u64)
                .or_else(|| v.as_u64())
                .ok_or_else(|| ApiError::invalid(Some("seed".into()), "`seed` must be an integer"))?,
        ),
    };
    s.seed = seed.unwrap_or_else(rand::random);
    if let Some(lb) = field(b, "logit_bias") {
        let o = lb.as_object().ok_or_else(|| {
            ApiError::invalid(Some("logit_bias".into()), "`logit_bias` must map token ids (as strings) to numbers")
        })?;
        for (k, v) in o {
            let id: u32 = k.trim().parse().ok().filter(|&i: &u32| (i as usize) < n_vocab).ok_or_else(|| {
                ApiError::invalid(
                    Some("logit_bias".into()),
                    format!("`logit_bias`: {k:?} is not a token id of this model"),
                )
            })?;
            let bias = v.as_f64().filter(|x| (-100.0..=100.0).contains(x)).ok_or_else(|| {
                ApiError::invalid(
                    Some("logit_bias".into()),
                    format!("`logit_bias`: the bias of {k} must be in [-100, 100]"),
                )
            })?;
            s.logit_bias.push((id, bias as f32));
        }
    }
    let max_tokens =
        match (opt_u64(b, "max_completion_tokens", 1, u32::MAX as u64)?, opt_u64(b, "max_tokens", 1, u32::MAX as u64)?)
        {
            (Some(x), _) | (None, Some(x)) => Some(x as u32),
            (None, None) => default_max,
        };
    if let Some(mt) = max_tokens {
        if mt as usize >= m.max_seq_len {
            let key = if field(b, "max_completion_tokens").is_some() { "max_completion_tokens" } else { "max_tokens" };
            return Err(ApiError::invalid(
                Some(key.into()),
                format!("`{key}` is {mt}, but this model's context is {} tokens (prompt included)", m.max_seq_len),
            ));
        }
    }
    let stop = match field(b, "stop") {
        None => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::invalid(Some("stop".into()), "`stop` must be a string or a list of strings")
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::invalid(Some("stop".into()), "`stop` must be a string or a list of strings")),
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid(Some("stop".into()), format!("at most {MAX_STOP} stop strings")));
    }
    let n = opt_u64(b, "n", 1, max_n as u64)?.unwrap_or(1) as usize;
    let stream = opt_bool(b, "stream")?.unwrap_or(false);
    let include_usage = match field(b, "stream_options") {
        None => false,
        Some(o) => {
            if !stream {
                return Err(ApiError::invalid(
                    Some("stream_options".into()),
                    "`stream_options` is only allowed with `stream: true`",
                ));
            }
            o.get("include_usage").and_then(Value::as_bool).unwrap_or(false)
        }
    };
    let adapters = match field(b, "lora") {
        None => None,
        Some(Value::String(name)) => Some(vec![Adapter { name: name.clone(), weight: 1.0 }]),
        Some(Value::Array(list)) => Some(
            list.iter()
                .map(|x| match x {
                    Value::String(name) => Ok(Adapter { name: name.clone(), weight: 1.0 }),
                    Value::Object(o) => {
                        let name = o.get("name").and_then(Value::as_str).ok_or_else(|| {
                            ApiError::invalid(Some("lora".into()), "each `lora` entry needs a `name`")
                        })?;
                        let weight =
                            o.get("weight").map_or(Some(1.0), Value::as_f64).filter(|w| w.is_finite()).ok_or_else(
                                || ApiError::invalid(Some("lora".into()), "a `lora` weight must be a finite number"),
                            )?;
                        Ok(Adapter { name: name.to_string(), weight: weight as f32 })
                    }
                    _ => Err(ApiError::invalid(Some("lora".into()), "`lora` entries are names or {name, weight}")),
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(_) => return Err(ApiError::invalid(Some("lora".into()), "`lora` is an adapter name or a list")),
    };
    if let Some(list) = &adapters {
        if let Some(a) = list.iter().find(|a| !m.adapters.contains(&a.name)) {
            return Err(ApiError::invalid(
                Some("lora".into()),
                format!("no LoRA adapter named {:?} is loaded (loaded: {})", a.name, m.adapters.join(", ")),
            ));
        }
    }
    let policy = opt_str(b, "policy")?.map(str::to_string);
    m.policy(policy.as_deref())?;
    Ok(Common {
        max_tokens,
        sampling: s,
        stop,
        n,
        stream,
        include_usage,
        adapters,
        policy,
        ignore_eos: opt_bool(b, "ignore_eos")?.unwrap_or(false),
        seed_given: seed.is_some(),
    })
}

/// Fields stllm refuses rather than ignore.
fn refuse(b: &Obj, keys: &[(&str, &str)]) -> Result<(), ApiError> {
    for (k, why) in keys {
        if field(b, k).is_some() {
            return Err(ApiError::unsupported(k, format!("`{k}` is not supported: {why}")));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Running choices.

/// What a choice's task reports.
enum Ev {
    Piece { choice: usize, text: String, n_tokens: usize, logprobs: Vec<LogprobEntry> },
    Done { choice: usize, result: Result<GenerateResult, RuntimeError> },
}

/// Run `n` choices of `req` (choice i seeded with seed + i); events arrive on the receiver. With
/// several choices the prompt is computed once first and left in the prefix cache, so the
/// choices share its cells instead of each computing it.
async fn start(
    st: &Arc<AppState>,
    rt: &Arc<Runtime>,
    reqs: Vec<GenerateRequest>,
    n: usize,
    seed_given: bool,
    cancel: &Arc<AtomicBool>,
) -> Result<(mpsc::UnboundedReceiver<Ev>, super::Slot), ApiError> {
    let slot = st.slot_n(reqs.len() * n).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut choice = 0;
    for req in reqs {
        if n > 1 {
            let warm = GenerateRequest { max_tokens: 1, logprobs: None, parse_tool_calls: false, ..req.clone() };
            // Its error (a prompt too long, ...) is the choices' error too: they report it.
            let _ = rt.generate(&warm, |_, _| true, cancel.clone()).await;
        }
        for i in 0..n {
            let mut r = req.clone();
            if i > 0 || !seed_given {
                r.sampling.seed = r.sampling.seed.wrapping_add(i as u64);
            }
            let (tx, rt, cancel) = (tx.clone(), rt.clone(), cancel.clone());
            let c = choice;
            choice += 1;
            tokio::spawn(async move {
                let tx2 = tx.clone();
                let result = rt
                    .generate_chunks(
                        &r,
                        move |ch: Chunk<'_>| {
                            tx2.send(Ev::Piece {
                                choice: c,
                                text: ch.text.to_string(),
                                n_tokens: ch.tokens.len(),
                                logprobs: ch.logprobs.to_vec(),
                            })
                            .is_ok()
                        },
                        cancel,
                    )
                    .await;
                let _ = tx.send(Ev::Done { choice: c, result });
            });
        }
    }
    Ok((rx, slot))
}

impl AppState {
    /// `k` slots at once (a request's choices each hold a policy instance).
    async fn slot_n(&self, k: usize) -> Result<super::Slot, ApiError> {
        if k <= 1 {
            return self.slot().await;
        }
        if k > self.opts.max_concurrent {
            return Err(ApiError::invalid(
                Some("n".into()),
                format!("{k} choices exceed this server's --max-concurrent {}", self.opts.max_concurrent),
            ));
        }
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(ApiError::shutting_down());
        }
        let p = self.slots.clone().acquire_many_owned(k as u32).await.map_err(|_| ApiError::shutting_down())?;
        Ok(super::Slot { _permit: p })
    }
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::Cancelled => "stop",
    }
}

fn request_id(prefix: &str) -> String {
    const A: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let s: String = (0..24).map(|_| A[(rand::random::<u32>() as usize) % A.len()] as char).collect();
    format!("{prefix}-{s}")
}

/// Token strings and bytes for log-probability entries, in entry order (each entry, then its
/// top alternatives). The strings come from the policy (one call for all of them); the bytes are
/// the vocabulary's exact bytes (a token that is part of a character decodes to U+FFFD as text,
/// but its bytes are its own), or the string's when the model folder has no usable
/// tokenizer.json.
async fn token_texts(rt: &Runtime, entries: &[LogprobEntry]) -> Vec<(String, Vec<u8>)> {
    let mut ids: Vec<u32> = Vec::new();
    for e in entries {
        ids.push(e.id);
        ids.extend(e.top.iter().map(|t| t.id));
    }
    let texts = rt.token_strings(&ids).await.unwrap_or_else(|_| ids.iter().map(|i| format!("<{i}>")).collect());
    let handle = rt.handle().clone();
    let bytes = tokio::task::spawn_blocking(move || handle.token_bytes(&ids)).await.ok().flatten();
    match bytes {
        Some(b) if b.len() == texts.len() => texts.into_iter().zip(b).collect(),
        _ => texts.into_iter().map(|t| (t.clone(), t.into_bytes())).collect(),
    }
}

/// A legacy completions token: its text, or, for bytes that are not UTF-8 on their own (part of
/// a character), `bytes:\xNN...` as OpenAI writes them.
fn legacy_token(text: String, bytes: &[u8]) -> String {
    if std::str::from_utf8(bytes).is_ok() {
        return text;
    }
    let mut s = String::from("bytes:");
    for b in bytes {
        s.push_str(&format!("\\x{b:02x}"));
    }
    s
}

/// Chat `logprobs.content` entries.
async fn chat_logprobs(rt: &Runtime, entries: &[LogprobEntry], top: bool) -> Value {
    let texts = token_texts(rt, entries).await;
    let mut it = texts.into_iter();
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            let (tok, tok_bytes) = it.next().unwrap_or_default();
            let tops: Vec<Value> = e
                .top
                .iter()
                .map(|t| {
                    let (s, b) = it.next().unwrap_or_default();
                    json!({"token": s, "logprob": t.logprob, "bytes": b})
                })
                .collect();
            json!({"token": tok, "logprob": e.logprob, "bytes": tok_bytes, "top_logprobs": if top { tops } else { vec![] }})
        })
        .collect();
    json!({"content": content})
}

/// Legacy completions `logprobs` object; `offset` is where this text starts in the choice.
async fn completion_logprobs(rt: &Runtime, entries: &[LogprobEntry], mut offset: usize) -> Value {
    let texts = token_texts(rt, entries).await;
    let mut it = texts.into_iter();
    let (mut tokens, mut lps, mut tops, mut offs) = (vec![], vec![], vec![], vec![]);
    for e in entries {
        let (tok, bytes) = it.next().unwrap_or_default();
        let mut m = Map::new();
        for t in &e.top {
            let (s, b) = it.next().unwrap_or_default();
            m.insert(legacy_token(s, &b), json!(t.logprob));
        }
        offs.push(offset);
        // Byte offsets, as the streamed text's (a part of a character counts its own bytes).
        offset += bytes.len();
        tokens.push(legacy_token(tok, &bytes));
        lps.push(e.logprob);
        tops.push(Value::Object(m));
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs})
}

/// Usage of finished choices: the prompt counted once per prompt, every choice's tokens.
fn usage(results: &[GenerateResult], prompts: usize, n: usize) -> Value {
    let prompt: u64 = results.iter().step_by(n.max(1)).take(prompts).map(|r| r.prompt_tokens as u64).sum();
    let cached: u64 = results.iter().step_by(n.max(1)).take(prompts).map(|r| r.cached_tokens as u64).sum();
    let completion: u64 = results.iter().map(|r| r.tokens.len() as u64).sum();
    json!({
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// The streamed usage chunk (`choices: []` plus `usage`), when the request asked for it.
fn usage_chunk(include: bool, mut empty: Value, results: &[GenerateResult], prompts: usize, n: usize) -> Vec<Value> {
    if !include {
        return vec![];
    }
    empty["usage"] = usage(results, prompts, n);
    vec![empty]
}

/// Wait for every choice; the first error ends the request (a prompt too long, a guest fault).
async fn collect(
    st: &AppState,
    model: &str,
    rx: &mut mpsc::UnboundedReceiver<Ev>,
    choices: usize,
    t0: Instant,
    param: &str,
    id: &str,
) -> Result<Vec<GenerateResult>, ApiError> {
    let mut out: Vec<Option<GenerateResult>> = (0..choices).map(|_| None).collect();
    let mut first = vec![None; choices];
    let mut last = vec![t0; choices];
    let mut done = 0;
    while done < choices {
        match rx.recv().await {
            Some(Ev::Piece { choice, n_tokens, .. }) => {
                observe(st, model, &mut first[choice], &mut last[choice], t0, n_tokens)
            }
            Some(Ev::Done { choice, result }) => {
                let r = result.map_err(|e| ApiError::from_runtime(e, param))?;
                account(st, model, id, &r, choice, t0, first[choice]);
                out[choice] = Some(r);
                done += 1;
            }
            None => return Err(ApiError::internal("a choice's task ended without a result")),
        }
    }
    Ok(out.into_iter().map(|r| r.expect("every choice reported")).collect())
}

/// Record a piece in the latency histograms; `first` is set to the time to the first piece.
fn observe(st: &AppState, model: &str, first: &mut Option<Duration>, last: &mut Instant, t0: Instant, n_tokens: usize) {
    let now = Instant::now();
    if first.is_none() {
        st.metrics.ttft.with_label_values(&[model]).observe((now - t0).as_secs_f64());
        *first = Some(now - t0);
    } else if n_tokens > 0 {
        let per = (now - *last).as_secs_f64() / n_tokens as f64;
        for _ in 0..n_tokens {
            st.metrics.itl.with_label_values(&[model]).observe(per);
        }
    }
    *last = now;
}

/// Count a finished choice in the metrics and log it (target `stllm::request`: one line per
/// choice with the response's id, its token counts, time to first piece and total time since
/// the request arrived).
fn account(
    st: &AppState,
    model: &str,
    id: &str,
    r: &GenerateResult,
    choice: usize,
    t0: Instant,
    ttft: Option<Duration>,
) {
    if choice == 0 {
        st.metrics.prompt_tokens.with_label_values(&[model]).inc_by(r.prompt_tokens as u64);
    }
    st.metrics.generated_tokens.with_label_values(&[model]).inc_by(r.tokens.len() as u64);
    tracing::info!(
        target: "stllm::request",
        model,
        id,
        choice,
        prompt_tokens = r.prompt_tokens,
        cached_tokens = r.cached_tokens,
        completion_tokens = r.tokens.len(),
        finish = finish_str(r.finish),
        ttft_ms = ttft.map(|d| d.as_secs_f64() * 1e3),
        total_ms = t0.elapsed().as_secs_f64() * 1e3,
        "choice finished"
    );
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// An SSE response from a stream of already framed events.
fn sse_response(stream: impl futures_util::Stream<Item = Bytes> + Send + 'static) -> Response {
    use futures_util::StreamExt;
    let body = Body::from_stream(stream.map(Ok::<_, std::convert::Infallible>));
    ([(axum::http::header::CONTENT_TYPE, "text/event-stream"), (axum::http::header::CACHE_CONTROL, "no-cache")], body)
        .into_response()
}

/// Wait for the first event so that an error before any output (a prompt too long) still gets
/// its HTTP status instead of a 200 stream.
async fn first_event(rx: &mut mpsc::UnboundedReceiver<Ev>, param: &str) -> Result<Ev, ApiError> {
    match rx.recv().await {
        Some(Ev::Done { result: Err(e), .. }) => Err(ApiError::from_runtime(e, param)),
        Some(ev) => Ok(ev),
        None => Err(ApiError::internal("the request ended without a result")),
    }
}

// ---------------------------------------------------------------------------------------------
// /v1/chat/completions

/// OpenAI messages → the JSON the chat template gets: text content parts joined, tool-call
/// arguments given as objects (what HF templates expect), roles checked.
fn template_messages(v: &Value) -> Result<Value, ApiError> {
    let bad = |m: String| ApiError::invalid(Some("messages".into()), m);
    let list = v.as_array().ok_or_else(|| bad("`messages` must be an array".into()))?;
    if list.is_empty() {
        return Err(bad("`messages` must not be empty".into()));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let o = m.as_object().ok_or_else(|| bad(format!("messages[{i}] must be an object")))?;
        let role = o.get("role").and_then(Value::as_str).ok_or_else(|| bad(format!("messages[{i}] has no `role`")))?;
        let role = match role {
            "system" | "user" | "assistant" | "tool" => role,
            "developer" => "system",
            other => return Err(bad(format!("messages[{i}]: unknown role {other:?}"))),
        };
        let content = match o.get("content") {
            None | Some(Value::Null) => {
                if role == "assistant" && o.get("tool_calls").is_some() {
                    Value::String(String::new())
                } else {
                    return Err(bad(format!("messages[{i}] ({role}) has no `content`")));
                }
            }
            Some(Value::String(s)) => Value::String(s.clone()),
            Some(Value::Array(parts)) => {
                let mut texts = Vec::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => texts.push(t),
                        (Some(other), _) if other != "text" => {
                            return Err(ApiError::unsupported(
                                "messages",
                                format!(
                                "messages[{i}].content[{j}]: content of type {other:?} is not supported (text only)"
                            ),
                            ))
                        }
                        _ => {
                            return Err(bad(format!(
                                "messages[{i}].content[{j}] must be {{\"type\": \"text\", \"text\": ...}}"
                            )))
                        }
                    }
                }
                Value::String(texts.join("\n"))
            }
            Some(_) => return Err(bad(format!("messages[{i}].content must be a string or an array of parts"))),
        };
        let mut msg = Map::new();
        msg.insert("role".into(), json!(role));
        msg.insert("content".into(), content);
        if let Some(Value::Array(calls)) = o.get("tool_calls") {
            let mut tc = Vec::new();
            for c in calls {
                let mut c = c.clone();
                if let Some(args) = c.pointer_mut("/function/arguments") {
                    if let Value::String(s) = args {
                        if let Ok(obj @ Value::Object(_)) = serde_json::from_str::<Value>(s) {
                            *args = obj;
                        }
                    }
                }
                tc.push(c);
            }
            msg.insert("tool_calls".into(), Value::Array(tc));
        }
        for key in ["name", "tool_call_id", "reasoning_content"] {
            if let Some(x) = o.get(key) {
                msg.insert(key.into(), x.clone());
            }
        }
        out.push(Value::Object(msg));
    }
    Ok(Value::Array(out))
}

/// `tools` and `tool_choice` → the tools the template sees, and whether to parse calls.
fn tools_for(b: &Obj) -> Result<(Option<String>, bool), ApiError> {
    let Some(tools) = field(b, "tools") else {
        return match field(b, "tool_choice") {
            None => Ok((None, false)),
            Some(Value::String(c)) if c == "none" || c == "auto" => Ok((None, false)),
            Some(_) => Err(ApiError::invalid(Some("tool_choice".into()), "`tool_choice` needs `tools`")),
        };
    };
    let list = tools
        .as_array()
        .filter(|l| !l.is_empty())
        .ok_or_else(|| ApiError::invalid(Some("tools".into()), "`tools` must be a non-empty array"))?;
    for (i, t) in list.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function")
            || t.pointer("/function/name").and_then(Value::as_str).is_none()
        {
            return Err(ApiError::invalid(
                Some("tools".into()),
                format!("tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"),
            ));
        }
    }
    match field(b, "tool_choice") {
        None => Ok((Some(tools.to_string()), true)),
        Some(Value::String(c)) => match c.as_str() {
            "none" => Ok((None, false)),
            // Not enforced until constrained decoding exists: the template asks for a call and
            // what the model writes is parsed.
            "auto" | "required" => Ok((Some(tools.to_string()), true)),
            other => Err(ApiError::invalid(Some("tool_choice".into()), format!("unknown `tool_choice` {other:?}"))),
        },
        Some(Value::Object(o)) => {
            let name =
                o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str).ok_or_else(|| {
                    ApiError::invalid(Some("tool_choice".into()), "`tool_choice` must name a function")
                })?;
            let one: Vec<&Value> =
                list.iter().filter(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(name)).collect();
            if one.is_empty() {
                return Err(ApiError::invalid(
                    Some("tool_choice".into()),
                    format!("`tool_choice` names {name:?}, which is not in `tools`"),
                ));
            }
            Ok((Some(Value::Array(one.into_iter().cloned().collect()).to_string()), true))
        }
        Some(_) => Err(ApiError::invalid(Some("tool_choice".into()), "`tool_choice` must be a string or an object")),
    }
}

pub async fn chat_completions(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match chat(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat(st: Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let t0 = arrival();
    let b = parse_body(body)?;
    let m = st.model(opt_str(&b, "model")?)?;
    refuse(
        &b,
        &[
            ("audio", "stllm generates text only"),
            ("prediction", "predicted outputs are not implemented"),
            ("functions", "use `tools`"),
            ("function_call", "use `tool_choice`"),
            ("web_search_options", "stllm has no web search"),
        ],
    )?;
    if let Some(rf) = field(&b, "response_format") {
        match rf.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some(t @ ("json_object" | "json_schema")) => {
                return Err(ApiError::unsupported(
                    "response_format",
                    format!("`response_format` {t:?} is not supported yet (constrained decoding is not implemented); stllm will not ignore it silently"),
                ))
            }
            _ => return Err(ApiError::invalid(Some("response_format".into()), "`response_format.type` must be text, json_object or json_schema")),
        }
    }
    let messages = template_messages(
        field(&b, "messages").ok_or_else(|| ApiError::invalid(Some("messages".into()), "`messages` is required"))?,
    )?;
    let (tools_json, parse_tools) = tools_for(&b)?;
    let c = common(&b, m, st.opts.max_n, None)?;
    let logprobs = opt_bool(&b, "logprobs")?.unwrap_or(false);
    let top = opt_u64(&b, "top_logprobs", 0, 20)?;
    if top.is_some() && !logprobs {
        return Err(ApiError::invalid(Some("top_logprobs".into()), "`top_logprobs` needs `logprobs: true`"));
    }
    let rt = m.policy(c.policy.as_deref())?.clone();
    let req = GenerateRequest {
        prompt: Prompt::Chat(messages.to_string()),
        tools_json,
        max_tokens: c.max_tokens.unwrap_or(u32::MAX),
        stop: c.stop.clone(),
        ignore_eos: c.ignore_eos,
        sampling: c.sampling.clone(),
        adapters: c.adapters.clone(),
        logprobs: logprobs.then_some(top.unwrap_or(0) as u32),
        parse_tool_calls: parse_tools,
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let guard = CancelOnDrop(cancel.clone());
    let (mut rx, slot) = start(&st, &rt, vec![req], c.n, c.seed_given, &cancel).await?;
    let id = request_id("chatcmpl");
    let created = now_secs();
    let name = m.name.clone();
    if !c.stream {
        let results = collect(&st, &name, &mut rx, c.n, t0, "messages", &id).await?;
        drop(slot);
        let mut choices = Vec::new();
        for (i, r) in results.iter().enumerate() {
            let mut msg = json!({"role": "assistant", "content": r.text});
            if !r.tool_calls.is_empty() {
                msg["tool_calls"] = tool_calls_json(r);
                if r.text.trim().is_empty() {
                    msg["content"] = Value::Null;
                }
            }
            let lp = if logprobs { chat_logprobs(&rt, &r.logprobs, top.unwrap_or(0) > 0).await } else { Value::Null };
            choices.push(json!({"index": i, "message": msg, "logprobs": lp, "finish_reason": finish_str(r.finish)}));
        }
        drop(guard);
        return Ok(axum::Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": name,
            "choices": choices, "usage": usage(&results, 1, c.n), "system_fingerprint": Value::Null,
        }))
        .into_response());
    }
    let first = first_event(&mut rx, "messages").await?;
    let n = c.n;
    let log_id = id.clone();
    let chunk = move |choices: Value| json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": name, "system_fingerprint": Value::Null, "choices": choices});
    let stream = async_stream(
        st.clone(),
        rt,
        rx,
        first,
        n,
        t0,
        m.name.clone(),
        log_id,
        move |ctx| {
            let chunk = chunk.clone();
            Box::pin(async move {
                match ctx {
                    Framed::Start { choice } => vec![chunk(
                        json!([{"index": choice, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
                    )],
                    Framed::Text { choice, text, lp, rt } => {
                        let lp = match (&lp, logprobs) {
                            (Some(e), true) => chat_logprobs(&rt, e, top.unwrap_or(0) > 0).await,
                            _ => Value::Null,
                        };
                        vec![chunk(
                            json!([{"index": choice, "delta": {"content": text}, "logprobs": lp, "finish_reason": null}]),
                        )]
                    }
                    Framed::End { choice, result } => {
                        let mut v = Vec::new();
                        if !result.tool_calls.is_empty() {
                            let calls: Vec<Value> = result
                            .tool_calls
                            .iter()
                            .enumerate()
                            .map(|(i, t)| json!({"index": i, "id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}))
                            .collect();
                            v.push(chunk(json!([{"index": choice, "delta": {"tool_calls": calls}, "logprobs": null, "finish_reason": null}])));
                        }
                        v.push(chunk(json!([{"index": choice, "delta": {}, "logprobs": null, "finish_reason": finish_str(result.finish)}])));
                        v
                    }
                    Framed::Usage { results } => usage_chunk(c.include_usage, chunk(json!([])), &results, 1, n),
                }
            })
        },
        guard,
        slot,
    );
    Ok(sse_response(stream))
}

fn tool_calls_json(r: &GenerateResult) -> Value {
    Value::Array(
        r.tool_calls
            .iter()
            .map(|t| json!({"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}))
            .collect(),
    )
}

/// One step of a stream, for the endpoint to frame.
enum Framed {
    /// A choice's first piece is about to come (chat sends the role first).
    Start {
        choice: usize,
    },
    Text {
        choice: usize,
        text: String,
        lp: Option<Vec<LogprobEntry>>,
        rt: Arc<Runtime>,
    },
    End {
        choice: usize,
        result: GenerateResult,
    },
    /// After every choice ended.
    Usage {
        results: Vec<GenerateResult>,
    },
}

type Framer =
    Box<dyn Fn(Framed) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<Value>> + Send>> + Send + Sync>;

/// Turn a request's events into SSE bytes: `frame` makes the endpoint's chunks; an error after
/// the stream began is sent as an `error` event; `[DONE]` ends it. The guard and slot live as
/// long as the stream: a client that goes away drops them, cancelling the request.
#[allow(clippy::too_many_arguments)]
fn async_stream(
    st: Arc<AppState>,
    rt: Arc<Runtime>,
    rx: mpsc::UnboundedReceiver<Ev>,
    first: Ev,
    choices: usize,
    t0: Instant,
    model: String,
    id: String,
    frame: impl Fn(Framed) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<Value>> + Send>>
        + Send
        + Sync
        + 'static,
    guard: CancelOnDrop,
    slot: super::Slot,
) -> impl futures_util::Stream<Item = Bytes> + Send {
    struct S {
        st: Arc<AppState>,
        rt: Arc<Runtime>,
        rx: mpsc::UnboundedReceiver<Ev>,
        pending: Option<Ev>,
        started: Vec<bool>,
        /// Time to each choice's first piece
        ttft: Vec<Option<Duration>>,
        last: Vec<Instant>,
        results: Vec<Option<GenerateResult>>,
        done: usize,
        finished: bool,
        t0: Instant,
        model: String,
        /// The response's id (for the request log)
        id: String,
        frame: Framer,
        _guard: CancelOnDrop,
        _slot: Option<super::Slot>,
    }
    let s = S {
        st,
        rt,
        rx,
        pending: Some(first),
        started: vec![false; choices],
        ttft: vec![None; choices],
        last: vec![t0; choices],
        results: (0..choices).map(|_| None).collect(),
        done: 0,
        finished: false,
        t0,
        model,
        id,
        frame: Box::new(frame),
        _guard: guard,
        _slot: Some(slot),
    };
    futures_util::stream::unfold(s, |mut s| async move {
        if s.finished {
            return None;
        }
        let ev = match s.pending.take() {
            Some(ev) => Some(ev),
            None => s.rx.recv().await,
        };
        let mut out: Vec<Value> = Vec::new();
        match ev {
            Some(Ev::Piece { choice, text, n_tokens, logprobs }) => {
                if !s.started[choice] {
                    s.started[choice] = true;
                    out.extend((s.frame)(Framed::Start { choice }).await);
                }
                observe(&s.st, &s.model, &mut s.ttft[choice], &mut s.last[choice], s.t0, n_tokens);
                if !text.is_empty() || !logprobs.is_empty() {
                    let lp = (!logprobs.is_empty()).then_some(logprobs);
                    out.extend((s.frame)(Framed::Text { choice, text, lp, rt: s.rt.clone() }).await);
                }
            }
            Some(Ev::Done { choice, result: Ok(r) }) => {
                account(&s.st, &s.model, &s.id, &r, choice, s.t0, s.ttft[choice]);
                if !s.started[choice] {
                    s.started[choice] = true;
                    out.extend((s.frame)(Framed::Start { choice }).await);
                }
                out.extend((s.frame)(Framed::End { choice, result: r.clone() }).await);
                s.results[choice] = Some(r);
                s.done += 1;
            }
            Some(Ev::Done { choice: _, result: Err(e) }) => {
                let e = ApiError::from_runtime(e, "messages");
                let mut bytes = sse(&e.body()).to_vec();
                bytes.extend_from_slice(b"data: [DONE]\n\n");
                s.finished = true;
                return Some((Bytes::from(bytes), s));
            }
            None => {
                s.finished = true;
                return Some((Bytes::from_static(b"data: [DONE]\n\n"), s));
            }
        }
        let mut bytes: Vec<u8> = Vec::new();
        for v in &out {
            bytes.extend_from_slice(&sse(v));
        }
        if s.done == s.results.len() {
            s._slot = None;
            let results: Vec<GenerateResult> =
                s.results.iter_mut().map(|r| r.take().expect("every choice ended")).collect();
            for v in (s.frame)(Framed::Usage { results }).await {
                bytes.extend_from_slice(&sse(&v));
            }
            bytes.extend_from_slice(b"data: [DONE]\n\n");
            s.finished = true;
        }
        Some((Bytes::from(bytes), s))
    })
}

// ---------------------------------------------------------------------------------------------
// /v1/completions

pub async fn completions(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match complete(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// The prompts of a completions or embeddings request: a string, token ids, or a list of either.
fn prompts(v: &Value, key: &str, n_vocab: usize) -> Result<Vec<Prompt>, ApiError> {
    let bad = || {
        ApiError::invalid(
            Some(key.into()),
            format!("`{key}` must be a string, a list of strings, token ids, or a list of token-id lists"),
        )
    };
    let out = match v {
        Value::String(s) => vec![Prompt::Text(s.clone())],
        Value::Array(a) if a.is_empty() => {
            return Err(ApiError::invalid(Some(key.into()), format!("`{key}` is empty")))
        }
        Value::Array(a) if a[0].is_number() => vec![Prompt::Tokens(token_list(v, key, n_vocab)?)],
        Value::Array(a) => a
            .iter()
            .map(|x| match x {
                Value::String(s) => Ok(Prompt::Text(s.clone())),
                Value::Array(_) => Ok(Prompt::Tokens(token_list(x, key, n_vocab)?)),
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    if out.len() > MAX_INPUTS {
        return Err(ApiError::invalid(Some(key.into()), format!("at most {MAX_INPUTS} inputs per request")));
    }
    if out
        .iter()
        .any(|p| matches!(p, Prompt::Text(s) if s.is_empty()) || matches!(p, Prompt::Tokens(t) if t.is_empty()))
    {
        return Err(ApiError::invalid(Some(key.into()), format!("`{key}` holds an empty prompt")));
    }
    Ok(out)
}

async fn complete(st: Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let t0 = arrival();
    let b = parse_body(body)?;
    let m = st.model(opt_str(&b, "model")?)?;
    refuse(&b, &[("suffix", "fill-in-the-middle is not implemented")])?;
    if field(&b, "best_of").is_some_and(|v| v.as_u64() != Some(1)) {
        return Err(ApiError::unsupported("best_of", "`best_of` other than 1 is not supported (use `n`)"));
    }
    let n_vocab = m.handle.model.as_ref().map_or(0, |x| x.hparams().n_vocab);
    let ps = prompts(
        field(&b, "prompt").ok_or_else(|| ApiError::invalid(Some("prompt".into()), "`prompt` is required"))?,
        "prompt",
        n_vocab,
    )?;
    // OpenAI's default for this endpoint.
    let c = common(&b, m, st.opts.max_n, Some(16))?;
    let echo = opt_bool(&b, "echo")?.unwrap_or(false);
    let logprobs = opt_u64(&b, "logprobs", 0, 20)?.map(|x| x as u32);
    if echo && logprobs.is_some() {
        return Err(ApiError::unsupported(
            "echo",
            "`echo` with `logprobs` (log-probabilities of the prompt) is not supported",
        ));
    }
    let rt = m.policy(c.policy.as_deref())?.clone();
    let mut echoes = Vec::new();
    for p in &ps {
        echoes.push(if !echo {
            String::new()
        } else {
            match p {
                Prompt::Text(s) => s.clone(),
                Prompt::Tokens(t) => rt.detokenize(t, false).await.map_err(|e| ApiError::from_runtime(e, "prompt"))?,
                Prompt::Chat(_) => String::new(),
            }
        });
    }
    let reqs: Vec<GenerateRequest> = ps
        .iter()
        .map(|p| GenerateRequest {
            prompt: p.clone(),
            tools_json: None,
            max_tokens: c.max_tokens.unwrap_or(16),
            stop: c.stop.clone(),
            ignore_eos: c.ignore_eos,
            sampling: c.sampling.clone(),
            adapters: c.adapters.clone(),
            logprobs,
            parse_tool_calls: false,
        })
        .collect();
    let n_prompts = reqs.len();
    let cancel = Arc::new(AtomicBool::new(false));
    let guard = CancelOnDrop(cancel.clone());
    let (mut rx, slot) = start(&st, &rt, reqs, c.n, c.seed_given, &cancel).await?;
    let id = request_id("cmpl");
    let created = now_secs();
    let name = m.name.clone();
    let total = n_prompts * c.n;
    if !c.stream {
        let results = collect(&st, &name, &mut rx, total, t0, "prompt", &id).await?;
        drop(slot);
        let mut choices = Vec::new();
        for (i, r) in results.iter().enumerate() {
            let prefix = &echoes[i / c.n];
            let lp = match logprobs {
                Some(_) => completion_logprobs(&rt, &r.logprobs, prefix.len()).await,
                None => Value::Null,
            };
            choices.push(json!({"index": i, "text": format!("{prefix}{}", r.text), "logprobs": lp, "finish_reason": finish_str(r.finish)}));
        }
        drop(guard);
        return Ok(axum::Json(json!({
            "id": id, "object": "text_completion", "created": created, "model": name,
            "choices": choices, "usage": usage(&results, n_prompts, c.n), "system_fingerprint": Value::Null,
        }))
        .into_response());
    }
    let first = first_event(&mut rx, "prompt").await?;
    let n = c.n;
    let offsets = Arc::new(std::sync::Mutex::new(vec![0usize; total]));
    let log_id = id.clone();
    let chunk = move |choices: Value| json!({"id": id, "object": "text_completion", "created": created, "model": name, "system_fingerprint": Value::Null, "choices": choices});
    let stream = async_stream(
        st.clone(),
        rt,
        rx,
        first,
        total,
        t0,
        m.name.clone(),
        log_id,
        move |ctx| {
            let (chunk, echoes, offsets) = (chunk.clone(), echoes.clone(), offsets.clone());
            Box::pin(async move {
                match ctx {
                    Framed::Start { choice } => {
                        let e = &echoes[choice / n];
                        offsets.lock().unwrap_or_else(|p| p.into_inner())[choice] = e.len();
                        if e.is_empty() {
                            vec![]
                        } else {
                            vec![chunk(json!([{"index": choice, "text": e, "logprobs": null, "finish_reason": null}]))]
                        }
                    }
                    Framed::Text { choice, text, lp, rt } => {
                        let off = {
                            let mut o = offsets.lock().unwrap_or_else(|p| p.into_inner());
                            let at = o[choice];
                            o[choice] += text.len();
                            at
                        };
                        let lp = match (&lp, logprobs) {
                            (Some(e), Some(_)) => completion_logprobs(&rt, e, off).await,
                            _ => Value::Null,
                        };
                        vec![chunk(json!([{"index": choice, "text": text, "logprobs": lp, "finish_reason": null}]))]
                    }
                    Framed::End { choice, result } => {
                        vec![chunk(
                            json!([{"index": choice, "text": "", "logprobs": null, "finish_reason": finish_str(result.finish)}]),
                        )]
                    }
                    Framed::Usage { results } => usage_chunk(c.include_usage, chunk(json!([])), &results, n_prompts, n),
                }
            })
        },
        guard,
        slot,
    );
    Ok(sse_response(stream))
}

// ---------------------------------------------------------------------------------------------
// /v1/embeddings

pub async fn embeddings(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match embed(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn embed(st: Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let b = parse_body(body)?;
    let m = st.model(opt_str(&b, "model")?)?;
    let model = m.handle.model.clone().ok_or_else(|| ApiError::internal("this model has no weights loaded"))?;
    let hp = model.hparams();
    let dims = hp.n_embd;
    if let Some(d) = opt_u64(&b, "dimensions", 1, u32::MAX as u64)? {
        if d as usize != dims {
            return Err(ApiError::unsupported(
                "dimensions",
                format!(
                    "`dimensions` must be {dims} (the model's hidden size); truncated embeddings are not supported"
                ),
            ));
        }
    }
    let base64 = match opt_str(&b, "encoding_format")? {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                Some("encoding_format".into()),
                format!("`encoding_format` must be float or base64, got {other:?}"),
            ))
        }
    };
    let inputs = prompts(
        field(&b, "input").ok_or_else(|| ApiError::invalid(Some("input".into()), "`input` is required"))?,
        "input",
        hp.n_vocab,
    )?;
    let rt = m.default_policy.clone();
    let _slot = st.slot().await?;
    let mut data = Vec::new();
    let mut total = 0usize;
    for (i, p) in inputs.into_iter().enumerate() {
        let tokens = match p {
            Prompt::Text(s) => rt.tokenize(&s, true).await.map_err(|e| ApiError::from_runtime(e, "input"))?,
            Prompt::Tokens(t) => t,
            Prompt::Chat(_) => unreachable!("prompts() makes no chat prompts"),
        };
        if tokens.is_empty() {
            return Err(ApiError::invalid(Some("input".into()), format!("input {i} has no tokens")));
        }
        if tokens.len() > m.max_seq_len {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::invalid(
                    Some("input".into()),
                    format!("input {i} has {} tokens; the most is {}", tokens.len(), m.max_seq_len),
                )
            });
        }
        total += tokens.len();
        let (model, opts) = (model.clone(), embed_options(m));
        let v = tokio::task::spawn_blocking(move || crate::session::embed(&model, &opts, &tokens))
            .await
            .map_err(|e| ApiError::internal(format!("embedding task failed: {e}")))?
            .map_err(|e| ApiError::internal(format!("embedding: {e}")))?;
        // Unit length, as OpenAI's embeddings are.
        let norm = v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt().max(1e-12) as f32;
        let v: Vec<f32> = v.iter().map(|x| x / norm).collect();
        let emb = if base64 {
            use base64::Engine as _;
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            json!(base64::engine::general_purpose::STANDARD.encode(bytes))
        } else {
            json!(v)
        };
        data.push(json!({"object": "embedding", "index": i, "embedding": emb}));
    }
    Ok(axum::Json(json!({
        "object": "list", "data": data, "model": m.name,
        "usage": {"prompt_tokens": total, "total_tokens": total},
    }))
    .into_response())
}

fn embed_options(m: &ServedModel) -> crate::SessionOptions {
    let e = &m.handle.engine_options;
    crate::SessionOptions { kv_type: e.kv_type, flash_attn: e.flash_attn, n_batch: e.n_batch, ..Default::default() }
}

// ---------------------------------------------------------------------------------------------
// /tokenize, /detokenize (vLLM / llama-server style)

pub async fn tokenize(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match tokenize_inner(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn tokenize_inner(st: Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let b = parse_body(body)?;
    let m = st.model(opt_str(&b, "model")?)?;
    let rt = m.policy(opt_str(&b, "policy")?)?.clone();
    let _slot = st.slot().await?;
    let tokens = if let Some(msgs) = field(&b, "messages") {
        let msgs = template_messages(msgs)?;
        let gen_prompt = opt_bool(&b, "add_generation_prompt")?.unwrap_or(true);
        let tools = field(&b, "tools").map(Value::to_string);
        let text = rt
            .apply_chat_template(&msgs.to_string(), gen_prompt, tools.as_deref(), None)
            .await
            .map_err(|e| ApiError::from_runtime(e, "messages"))?;
        let special = opt_bool(&b, "add_special_tokens")?.unwrap_or(false);
        rt.tokenize(&text, special).await.map_err(|e| ApiError::from_runtime(e, "messages"))?
    } else {
        let prompt = opt_str(&b, "prompt")?
            .or(opt_str(&b, "content")?)
            .ok_or_else(|| ApiError::invalid(Some("prompt".into()), "`prompt` (or `messages`) is required"))?;
        let special = opt_bool(&b, "add_special_tokens")?.unwrap_or(true);
        rt.tokenize(prompt, special).await.map_err(|e| ApiError::from_runtime(e, "prompt"))?
    };
    Ok(axum::Json(json!({"tokens": tokens, "count": tokens.len(), "max_model_len": m.max_seq_len})).into_response())
}

pub async fn detokenize(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match detokenize_inner(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn detokenize_inner(st: Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let b = parse_body(body)?;
    let m = st.model(opt_str(&b, "model")?)?;
    let rt = m.policy(opt_str(&b, "policy")?)?.clone();
    let n_vocab = m.handle.model.as_ref().map_or(0, |x| x.hparams().n_vocab);
    let tokens = token_list(
        field(&b, "tokens").ok_or_else(|| ApiError::invalid(Some("tokens".into()), "`tokens` is required"))?,
        "tokens",
        n_vocab,
    )?;
    let skip = opt_bool(&b, "skip_special_tokens")?.unwrap_or(false);
    let _slot = st.slot().await?;
    let text = rt.detokenize(&tokens, skip).await.map_err(|e| ApiError::from_runtime(e, "tokens"))?;
    Ok(axum::Json(json!({"prompt": text})).into_response())
}
