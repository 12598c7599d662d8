//! `stllm serve`: an OpenAI-compatible HTTP server (axum on tokio).
//!
//! Every request is a call of a policy component (the embedded default or one loaded with
//! `--policy NAME=FILE.wasm`) on the model's shared [`crate::Engine`], so concurrent requests are
//! batched in one step by its scheduler and reuse each other's prompt prefixes. The server owns
//! only HTTP: parsing and validating requests ([`openai`]), admission (`--max-concurrent` slots,
//! which also bound the policy instances, and a bounded wait queue answered with 429 beyond it),
//! streaming (SSE exactly as OpenAI frames it), auth, metrics and graceful shutdown.
//!
//! A client that disconnects cancels its request: the policy's next `emit` returns false and the
//! sequence is closed, freeing its cells (or leaving them to the prefix cache).

mod error;
mod metrics;
mod openai;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use tokio::sync::Semaphore;

pub use error::ApiError;

use crate::engine::EngineStats;
use crate::runtime::{ModelHandle, Runtime};

/// One model the server serves, with its policy components (all on one engine).
pub struct ServedModel {
    /// The name clients use in `model`.
    pub name: String,
    pub handle: Arc<ModelHandle>,
    /// The default policy first, then `--policy NAME=FILE` ones by name.
    pub default_policy: Arc<Runtime>,
    pub policies: HashMap<String, Arc<Runtime>>,
    /// Longest sequence (prompt + output) a request may reach.
    pub max_seq_len: usize,
    /// Seconds since the epoch when it was loaded (`created` of `/v1/models`).
    pub created: u64,
    /// LoRA adapters loaded under a name (the `lora` field).
    pub adapters: Vec<String>,
}

impl ServedModel {
    fn engine_stats(&self) -> Option<EngineStats> {
        self.handle.started_engine().map(|e| e.stats())
    }

    fn policy(&self, name: Option<&str>) -> Result<&Arc<Runtime>, ApiError> {
        match name {
            None | Some("default") => Ok(&self.default_policy),
            Some(n) => self.policies.get(n).ok_or_else(|| {
                let mut known: Vec<&str> = self.policies.keys().map(String::as_str).collect();
                known.sort();
                ApiError::invalid(
                    Some("policy".into()),
                    format!("no policy component named {n:?} is loaded (loaded: default{})", {
                        known.iter().map(|k| format!(", {k}")).collect::<String>()
                    }),
                )
            }),
        }
    }
}

/// How the server listens and admits requests.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    /// Clients must send `Authorization: Bearer KEY` (checked in constant time).
    pub api_key: Option<String>,
    /// Requests computing at once (each holds a policy instance).
    pub max_concurrent: usize,
    /// Requests waiting for a slot beyond which new ones get 429.
    pub max_queue: usize,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// How long shutdown waits for requests in flight.
    pub shutdown_timeout: Duration,
    /// Largest `n` (choices per request).
    pub max_n: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            max_concurrent: 64,
            max_queue: 256,
            max_body_bytes: 16 << 20,
            shutdown_timeout: Duration::from_secs(30),
            max_n: 16,
        }
    }
}

/// Shared by every handler.
pub struct AppState {
    pub models: Vec<ServedModel>,
    pub opts: ServeOptions,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    pub(crate) metrics: metrics::Metrics,
    shutting_down: AtomicBool,
}

/// A slot of `--max-concurrent`, held while a request runs its policy.
pub(crate) struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl AppState {
    fn model(&self, name: Option<&str>) -> Result<&ServedModel, ApiError> {
        match name {
            // One model: `model` may be left out (as llama-server allows).
            None if self.models.len() == 1 => Ok(&self.models[0]),
            None => Err(ApiError::invalid(Some("model".into()), "`model` is required: this server has several")),
            Some(n) => self.models.iter().find(|m| m.name == n).ok_or_else(|| {
                ApiError::not_found(
                    format!(
                        "The model `{n}` does not exist (served: {})",
                        self.models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                    "model_not_found",
                )
            }),
        }
    }

    /// Wait for a slot, or refuse at once when too many requests already wait.
    async fn slot(&self) -> Result<Slot, ApiError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(ApiError::shutting_down());
        }
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(Slot { _permit: p });
        }
        let before = self.waiting.fetch_add(1, Ordering::SeqCst);
        if before >= self.opts.max_queue {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::overloaded(before));
        }
        self.metrics.queue.inc();
        // Leaves the queue whether the wait ends or the client goes away.
        struct Waiting<'a>(&'a AppState);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.waiting.fetch_sub(1, Ordering::SeqCst);
                self.0.metrics.queue.dec();
            }
        }
        let _w = Waiting(self);
        let p = self.slots.clone().acquire_owned().await.map_err(|_| ApiError::shutting_down())?;
        Ok(Slot { _permit: p })
    }
}

/// Sets a request's cancel flag when dropped: the handler's future is dropped when the client
/// disconnects, and the policy stops at its next `emit`.
pub(crate) struct CancelOnDrop(pub Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Build the router over `state` (exposed for embedders and tests).
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.opts.max_body_bytes;
    let api = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/tokenize", post(openai::tokenize))
        .route("/detokenize", post(openai::detokenize))
        .layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

impl AppState {
    pub fn new(models: Vec<ServedModel>, opts: ServeOptions) -> anyhow::Result<AppState> {
        anyhow::ensure!(!models.is_empty(), "no model to serve");
        anyhow::ensure!(opts.max_concurrent >= 1, "--max-concurrent must be at least 1");
        let mut names = std::collections::HashSet::new();
        for m in &models {
            anyhow::ensure!(
                names.insert(m.name.clone()),
                "two models are named {:?}: name them (--model NAME=DIR)",
                m.name
            );
        }
        Ok(AppState {
            slots: Arc::new(Semaphore::new(opts.max_concurrent)),
            waiting: AtomicUsize::new(0),
            metrics: metrics::Metrics::new()?,
            shutting_down: AtomicBool::new(false),
            models,
            opts,
        })
    }
}

/// Listen and serve until SIGINT/SIGTERM; then refuse new requests and wait (at most
/// `shutdown_timeout`) for those in flight, streams included.
pub async fn serve(state: Arc<AppState>) -> anyhow::Result<()> {
    // The signal handlers exist before the address is printed: a SIGTERM sent as soon as the
    // server says it listens is a graceful shutdown, not the default kill.
    let signals = Signals::install()?;
    let addr = format!("{}:{}", state.opts.host, state.opts.port);
    let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
    let local: SocketAddr = listener.local_addr()?;
    // Stream chunks are small writes: without TCP_NODELAY, Nagle's algorithm holds one back
    // until the client acknowledges the previous (which a delayed ACK can put off by tens of
    // milliseconds) — on a kept-alive connection, the first chunk of the next response too.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY not set on a connection: {e}");
        }
    });
    eprintln!("stllm serve: listening on http://{local}");
    for m in &state.models {
        eprintln!(
            "  model {:?}: {} ({} parameters), context {} per request, policies: default{}{}",
            m.name,
            m.handle.model.as_ref().map_or(String::new(), |x| x.hparams().arch.clone()),
            m.handle.model.as_ref().map_or(0, |x| x.n_params()),
            m.max_seq_len,
            m.policies.keys().map(|k| format!(", {k}")).collect::<String>(),
            if m.adapters.is_empty() { String::new() } else { format!(", LoRA: {}", m.adapters.join(", ")) }
        );
    }
    let app = router(state.clone());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let st = state.clone();
    let timeout = state.opts.shutdown_timeout;
    tokio::spawn(async move {
        signals.wait().await;
        st.shutting_down.store(true, Ordering::SeqCst);
        eprintln!("stllm serve: shutting down (waiting up to {timeout:?} for requests in flight)");
        let _ = tx.send(());
        // Bounded wait: whatever is still running then is cut off.
        tokio::time::sleep(timeout).await;
        eprintln!("stllm serve: requests still in flight after {timeout:?}: exiting");
        std::process::exit(1);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = rx.await;
        })
        .await?;
    eprintln!("stllm serve: stopped");
    Ok(())
}

/// SIGINT and SIGTERM listeners, registered when created.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn wait(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.int.recv() => {},
        }
        #[cfg(not(unix))]
        {
            let _ = &mut self;
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `Authorization: Bearer KEY` when a key is set, compared in constant time.
async fn auth(State(st): State<Arc<AppState>>, headers: HeaderMap, req: Request, next: Next) -> Response {
    if let Some(key) = &st.opts.api_key {
        use subtle::ConstantTimeEq;
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Equal lengths are compared byte by byte in constant time; the length itself is not
        // secret enough to matter (as in most servers).
        let ok = given.len() == key.len() && bool::from(given.as_bytes().ct_eq(key.as_bytes()));
        if !ok {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// Count every request by endpoint and status.
async fn count(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let endpoint = match path.as_str() {
        "/v1/chat/completions"
        | "/v1/completions"
        | "/v1/embeddings"
        | "/v1/models"
        | "/tokenize"
        | "/detokenize"
        | "/health"
        | "/metrics" => path.as_str(),
        p if p.starts_with("/v1/models/") => "/v1/models/{id}",
        _ => "other",
    }
    .to_string();
    let r = next.run(req).await;
    st.metrics.requests.with_label_values(&[&endpoint, r.status().as_str()]).inc();
    r
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("no route for {} {}", req.method(), req.uri().path()), "unknown_url")
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    if st.shutting_down.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({"status": "shutting down"})))
            .into_response();
    }
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    let body = st.metrics.render(&st.models);
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

fn model_object(m: &ServedModel) -> serde_json::Value {
    serde_json::json!({
        "id": m.name, "object": "model", "created": m.created, "owned_by": "stllm",
        "max_model_len": m.max_seq_len,
    })
}

async fn list_models(State(st): State<Arc<AppState>>) -> Response {
    let data: Vec<_> = st.models.iter().map(model_object).collect();
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

async fn get_model(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let m = st.model(Some(&id))?;
    Ok(axum::Json(model_object(m)).into_response())
}

/// Parse a JSON body, naming what is wrong.
pub(crate) fn parse_body(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    let bytes = body.map_err(|e| ApiError {
        status: e.status(),
        ..ApiError::invalid(None, format!("reading the request body: {}", e.body_text()))
    })?;
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::invalid(None, "the request body must be a JSON object")),
        Err(e) => Err(ApiError::invalid(None, format!("the request body is not valid JSON: {e}"))),
    }
}

/// Seconds since the epoch.
pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// When a request arrived (for time to first token).
pub(crate) fn arrival() -> Instant {
    Instant::now()
}

/// Seconds since the epoch (for `created` fields).
pub fn now_secs_pub() -> u64 {
    now_secs()
}
