//! The component runtime: wasmtime (component model, async) hosting policy components that
//! implement the `stllm:inference` WIT contract (`wit/inference.wit`) on top of the engine.
//!
//! - The default policy component (guest/policy) is built by `build.rs` and embedded; `--policy`
//!   loads another one. Compiled code is cached on disk (wasmtime's cache), so start-up after the
//!   first run is fast.
//! - Instances are heavy (the tokenizer is parsed inside the guest on first use), so each
//!   [`Runtime`] keeps a pool of instances. [`Isolation::Pooled`] (the embedded policy's default)
//!   reuses them across requests; [`Isolation::PerRequest`] (the default for a component given
//!   with `--policy`) gives every request one that never served another. An instance that trapped
//!   is discarded. Guests' stdout and stderr go to `tracing` (target `stllm::guest`), at most
//!   [`GUEST_LOG_CAP`] bytes a request.
//! - Each instance has its own `Store` with a memory limit and a per-step time limit (epoch
//!   interruption): a guest that loops, exhausts memory or traps ends its own request with a
//!   clear [`RuntimeError`], and the host goes on.
//! - Other wasmtime embedders can offer the same `engine` interface to their guests with
//!   [`add_to_linker`].
//!
//! Only this module knows wasmtime.

mod guest_log;
mod host;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, Linker, Resource, ResourceTable};
use wasmtime::{Config, Engine, Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

pub use guest_log::{GuestLog, GUEST_LOG_CAP};
pub use host::{Chunk, ModelHandle, ModelRes, SequenceRes, SinkRes};

/// Generated bindings of the WIT worlds.
pub mod bindings {
    /// The `policy-component` world: the host implements `engine`, `streaming`, `plugin-sampler`.
    pub mod policy {
        wasmtime::component::bindgen!({
            world: "policy-component",
            path: "wit",
            imports: { default: async | trappable },
            exports: { default: async },
            with: {
                "stllm:inference/engine.model": crate::runtime::ModelRes,
                "stllm:inference/engine.sequence": crate::runtime::SequenceRes,
                "stllm:inference/streaming.sink": crate::runtime::SinkRes,
            },
        });
    }

    /// The `sampler-component` world: a plug-in that only exports `sampler`.
    pub mod sampler {
        wasmtime::component::bindgen!({
            world: "sampler-component",
            path: "wit",
            exports: { default: async },
        });
    }
}

use bindings::policy::exports::stllm::inference::policy as wit_policy;
use bindings::policy::stllm::inference::types as wit_types;
use bindings::policy::{PolicyComponent, PolicyComponentPre};
use bindings::sampler::{SamplerComponent, SamplerComponentPre};

pub use wit_policy::{FinishReason, GenerateRequest, GenerateResult, Prompt, Sampling, ToolCall};
/// A LoRA adapter named in a [`GenerateRequest`] (loaded in the model by name) with its weight.
pub use wit_types::Adapter;
pub use wit_types::{LogprobEntry, TokenLogprob};

/// Greedy, no penalties: the identity of every sampling knob.
impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
            logit_bias: vec![],
        }
    }
}

/// The default policy component, built from guest/policy by build.rs.
pub const DEFAULT_POLICY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/stllm_policy.wasm"));
/// The example sampler plug-in (Mirostat 2.0), built from guest/examples/mirostat.
pub const MIROSTAT_SAMPLER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/stllm_sampler_mirostat.wasm"));
/// A misbehaving policy for sandbox tests (guest/examples/chaos).
pub const CHAOS_POLICY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/stllm_policy_chaos.wasm"));

/// What kind of failure a guest reported (the WIT `error` variant's cases), kept so that callers
/// (the HTTP server's status codes) can tell bad input from a full context from a guest fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestErrorKind {
    /// The request was malformed (a bad token id, template, sampling value, ...).
    InvalidInput,
    /// The prompt (or prompt + output) does not fit the context.
    ContextFull,
    /// Anything else the guest or the host behind it could not do.
    Internal,
}

/// Why a guest call failed. The runtime and its other requests are unaffected.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The guest returned an error (bad input, context full, ...).
    #[error("{}{msg}", match kind { GuestErrorKind::InvalidInput => "invalid input: ", GuestErrorKind::ContextFull => "context full: ", GuestErrorKind::Internal => "" })]
    Guest { kind: GuestErrorKind, msg: String },
    #[error("the request was cancelled")]
    Cancelled,
    #[error("the {what} component ran for more than {limit:?} without returning to the host (killed)")]
    Timeout { what: &'static str, limit: Duration },
    #[error("the {what} component used up its budget of {fuel} WebAssembly instructions for this request (killed)")]
    OutOfFuel { what: &'static str, fuel: u64 },
    #[error("the {what} component exceeded its memory limit of {limit_mib} MiB (killed)")]
    OutOfMemory { what: &'static str, limit_mib: usize },
    #[error("the {what} component trapped: {msg}")]
    Trap { what: &'static str, msg: String },
    #[error("loading component {path}: {msg}")]
    Load { path: String, msg: String },
    #[error("wasmtime: {0}")]
    Wasmtime(String),
}

impl RuntimeError {
    fn from_guest(e: wit_types::Error) -> RuntimeError {
        let guest = |kind, msg| RuntimeError::Guest { kind, msg };
        match e {
            wit_types::Error::InvalidInput(m) => guest(GuestErrorKind::InvalidInput, m),
            wit_types::Error::ContextFull(m) => guest(GuestErrorKind::ContextFull, m),
            wit_types::Error::Cancelled => RuntimeError::Cancelled,
            wit_types::Error::Internal(m) => guest(GuestErrorKind::Internal, m),
        }
    }
}

/// The default [`RuntimeConfig::request_fuel`]: ~100 s of guest computation at the usual rate of
/// ~10^9 instructions a second; a request's own work (templating, tokenizing a long prompt,
/// sampling and detokenizing thousands of tokens, a first call parsing a 150k-entry tokenizer)
/// takes a small fraction of it.
pub const DEFAULT_REQUEST_FUEL: u64 = 100_000_000_000;

/// Limits and components of a [`Runtime`].
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// A policy component to use instead of the embedded default.
    pub policy: Option<PathBuf>,
    /// A sampler plug-in component the policy should consult.
    pub sampler: Option<PathBuf>,
    /// Linear memory limit of each guest instance, in bytes.
    pub memory_limit: usize,
    /// Longest a guest may run without returning to the host (between engine calls).
    pub step_timeout: Duration,
    /// Directory for compiled components (default: `$XDG_CACHE_HOME/stllm` or `~/.cache/stllm`).
    pub cache_dir: Option<PathBuf>,
    /// Idle initialised instances kept for reuse.
    pub pool_size: usize,
    /// Idle initialised instances kept ready ahead of demand (at most `pool_size`): a request
    /// that takes one leaves fewer, and new ones are made in the background, so a burst of
    /// requests beyond the pool's past peak does not pay for the guest's start-up (the embedded
    /// policy parses its tokenizer: ~0.5 s for a 152k vocabulary) in its time to first token.
    /// 0: instances are made only when a request finds none idle.
    pub spare: usize,
    /// Most WebAssembly instructions a guest may execute for one request (its whole call,
    /// however often it returns to the host; the sampler plug-in has its own); 0: no limit.
    /// The step timeout bounds one stretch between host calls, this bounds the request.
    pub request_fuel: u64,
    /// Whether a policy instance serves one request or many (`None`: [`Isolation::Pooled`] for
    /// the embedded policy, [`Isolation::PerRequest`] for a component given in `policy`).
    pub isolation: Option<Isolation>,
}

/// How requests share policy instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// An instance goes back to the pool after a request and serves later ones: what the guest
    /// keeps in its globals outlives the request (sequences excepted: those are closed). For
    /// components you trust with every user's data; the embedded policy's only global state is
    /// its parsed tokenizer and chat template.
    Pooled,
    /// Every request gets an instance that never served another (made ahead in the pool, dropped
    /// after its request): nothing one request leaves in the guest's memory reaches the next. The
    /// guest's own start-up (parsing its tokenizer) is paid by every request.
    PerRequest,
}

impl RuntimeConfig {
    /// The isolation in force (see [`RuntimeConfig::isolation`]).
    pub fn isolation(&self) -> Isolation {
        self.isolation.unwrap_or(if self.policy.is_some() { Isolation::PerRequest } else { Isolation::Pooled })
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            policy: None,
            sampler: None,
            memory_limit: 1 << 30,
            step_timeout: Duration::from_secs(10),
            cache_dir: None,
            pool_size: 4,
            spare: 0,
            request_fuel: DEFAULT_REQUEST_FUEL,
            isolation: None,
        }
    }
}

/// Memory limiter of a store (an instance and what it instantiates): `max_memory` bounds the
/// bytes of all its linear memories together (a component with many memories gets no more),
/// and the counts of instances, memories and tables are bounded too. Remembers whether it
/// refused a growth (to name the failure).
struct Limits {
    max_memory: usize,
    refused: bool,
    /// Bytes of all the store's linear memories
    used: usize,
}

impl Limits {
    fn new(max_memory: usize) -> Limits {
        Limits { max_memory, refused: false, used: 0 }
    }
}

/// Most core instances, linear memories and tables one guest store may create (a Rust component
/// for wasm32-wasip2 uses a handful of each).
const MAX_INSTANCES: usize = 64;
const MAX_MEMORIES: usize = 8;
const MAX_TABLES: usize = 32;

impl wasmtime::ResourceLimiter for Limits {
    fn memory_growing(&mut self, current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.used.saturating_sub(current).saturating_add(desired);
        if total > self.max_memory {
            self.refused = true;
            return Ok(false);
        }
        self.used = total;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }
}

/// Store data of a policy instance.
pub struct GuestState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: Limits,
    pub(crate) handle: Arc<ModelHandle>,
    /// The sampler plug-in of the current request, if any.
    pub(crate) plugin: Option<Plugin>,
    /// When the guest last got control back from the host (for the step timeout).
    pub(crate) last_return: Instant,
    /// Why the sampler plug-in failed, if it did (reported instead of the policy's trap).
    pub(crate) plugin_error: Option<RuntimeError>,
    /// Sequences opened during the current request (resource reps)
    pub(crate) opened: Vec<u32>,
    /// Its stdout and stderr, bounded per request
    log: GuestLog,
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// What the sandbox needs of a store's data: its memory limiter and the guest's step clock.
trait Sandboxed: Send + 'static {
    fn limits(&mut self) -> &mut Limits;
    fn last_return(&self) -> Instant;
}

impl Sandboxed for GuestState {
    fn limits(&mut self) -> &mut Limits {
        &mut self.limits
    }
    fn last_return(&self) -> Instant {
        self.last_return
    }
}

impl Sandboxed for SamplerState {
    fn limits(&mut self) -> &mut Limits {
        &mut self.limits
    }
    fn last_return(&self) -> Instant {
        self.last_return
    }
}

/// Put a store under the memory limit and the step time limit: the epoch ticks every 10 ms; at
/// each tick a guest yields to the executor, or is interrupted if it has computed for longer than
/// `limit` since the host last returned to it.
fn sandbox<T: Sandboxed>(store: &mut Store<T>, limit: Duration) {
    store.limiter(|s| s.limits());
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |ctx| {
        if ctx.data().last_return().elapsed() > limit {
            Ok(UpdateDeadline::Interrupt)
        } else {
            Ok(UpdateDeadline::Yield(1))
        }
    });
}

/// Store data of a sampler plug-in instance.
pub struct SamplerState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: Limits,
    last_return: Instant,
}

impl WasiView for SamplerState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// A live sampler plug-in instance (one per request: plug-ins may keep state across tokens).
pub struct Plugin {
    pub(crate) store: Store<SamplerState>,
    pub(crate) bindings: SamplerComponent,
    pub(crate) step_timeout: Duration,
    /// Its budget for the request (see [`RuntimeConfig::request_fuel`])
    pub(crate) fuel: u64,
}

/// The host's implementation of the `engine`, `streaming` and `plugin-sampler` interfaces,
/// borrowed from a store's data for the duration of one host call.
pub struct EngineHost<'a> {
    pub table: &'a mut ResourceTable,
    pub handle: &'a Arc<ModelHandle>,
    /// Set when a host call returns to the guest (the guest's step clock restarts).
    pub last_return: Option<&'a mut Instant>,
    /// The request's sampler plug-in, if any, and where its failure is recorded.
    pub plugin: Option<&'a mut Plugin>,
    pub plugin_error: Option<&'a mut Option<RuntimeError>>,
    /// Where the sequences the guest opens are recorded (the runtime closes those still open
    /// when the request ends), when the store tracks them.
    pub opened: Option<&'a mut Vec<u32>>,
}

impl EngineHost<'_> {
    /// Record a sequence the guest opened (see [`EngineHost::opened`]).
    pub(crate) fn opened(&mut self, rep: u32) {
        if let Some(v) = self.opened.as_deref_mut() {
            v.push(rep);
        }
    }

    pub(crate) fn returned_to_guest(&mut self) {
        if let Some(t) = self.last_return.as_deref_mut() {
            *t = Instant::now();
        }
    }
}

/// Store data that can host the `engine` interface.
pub trait EngineView {
    fn engine_host(&mut self) -> EngineHost<'_>;
}

struct HasEngine;

impl wasmtime::component::HasData for HasEngine {
    type Data<'a> = EngineHost<'a>;
}

/// Add the host's `engine`, `streaming` and `plugin-sampler` interfaces to a linker, for
/// embedders who run their own guests against stllm (like `wasmtime_wasi::p2::add_to_linker_async`
/// for WASI). Add WASI too if the guests use Rust's std.
pub fn add_to_linker<T: EngineView + Send + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    bindings::policy::PolicyComponent::add_to_linker::<T, HasEngine>(linker, |s| s.engine_host())
}

impl EngineView for GuestState {
    fn engine_host(&mut self) -> EngineHost<'_> {
        EngineHost {
            table: &mut self.table,
            handle: &self.handle,
            last_return: Some(&mut self.last_return),
            plugin: self.plugin.as_mut(),
            plugin_error: Some(&mut self.plugin_error),
            opened: Some(&mut self.opened),
        }
    }
}

/// Increments the engine's epoch every tick until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

const TICK: Duration = Duration::from_millis(10);

impl EpochTicker {
    fn start(engine: Engine) -> EpochTicker {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::Builder::new()
            .name("stllm-epoch".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawning the epoch thread");
        EpochTicker { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Instance {
    store: Store<GuestState>,
    bindings: PolicyComponent,
    /// It has served a request (or been initialised by one of its calls)
    used: bool,
}

/// Runs policy components for one model. `Send + Sync`: share it with `Arc`.
pub struct Runtime {
    engine: Engine,
    policy_pre: PolicyComponentPre<GuestState>,
    sampler_pre: Option<SamplerComponentPre<SamplerState>>,
    handle: Arc<ModelHandle>,
    /// Idle instances (shared with the tasks that refill it in the background)
    pool: Arc<Mutex<Vec<Instance>>>,
    /// Instances being made in the background for the pool
    pending: Arc<AtomicUsize>,
    cfg: RuntimeConfig,
    _ticker: EpochTicker,
}

/// A new policy instance in its own sandboxed store.
async fn make_instance(
    engine: &Engine,
    pre: &PolicyComponentPre<GuestState>,
    handle: &Arc<ModelHandle>,
    cfg: &RuntimeConfig,
    fuel: u64,
) -> Result<Instance, RuntimeError> {
    let log = GuestLog::default();
    let state = GuestState {
        // No files, no environment, no network: the guest sees only what the WIT gives it; what
        // it prints goes to `tracing`, bounded (`GuestLog`).
        wasi: WasiCtx::builder().stdout(log.clone()).stderr(log.clone()).build(),
        log,
        table: ResourceTable::new(),
        limits: Limits::new(cfg.memory_limit),
        handle: handle.clone(),
        plugin: None,
        last_return: Instant::now(),
        plugin_error: None,
        opened: Vec::new(),
    };
    let mut store = Store::new(engine, state);
    sandbox(&mut store, cfg.step_timeout);
    store.set_fuel(fuel).map_err(|e| RuntimeError::Wasmtime(e.to_string()))?;
    let t0 = Instant::now();
    let bindings = pre
        .instantiate_async(&mut store)
        .await
        .map_err(|e| classify(&e, store.data().limits.refused, "policy", cfg.memory_limit, cfg.step_timeout, fuel))?;
    tracing::debug!(elapsed_us = t0.elapsed().as_micros() as u64, "policy instance created");
    Ok(Instance { store, bindings, used: false })
}

/// A new instance that has done its own start-up (a `tokenize` of nothing: the embedded policy
/// parses its tokenizer and template then) and seen no request.
async fn ready_instance(
    engine: &Engine,
    pre: &PolicyComponentPre<GuestState>,
    handle: &Arc<ModelHandle>,
    cfg: &RuntimeConfig,
    fuel: u64,
) -> Result<Instance, RuntimeError> {
    let mut i = make_instance(engine, pre, handle, cfg, fuel).await?;
    let r = i.bindings.stllm_inference_policy().call_tokenize(&mut i.store, "", false).await;
    let refused = i.store.data().limits.refused;
    match r {
        Ok(_) => {
            i.store.set_fuel(fuel).map_err(|e| RuntimeError::Wasmtime(e.to_string()))?;
            i.store.data().log.reset();
            Ok(i)
        }
        Err(e) => Err(classify(&e, refused, "policy", cfg.memory_limit, cfg.step_timeout, fuel)),
    }
}

fn wt(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Wasmtime(e.to_string())
}

fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("stllm").join("wasmtime"))
}

fn load_component(engine: &Engine, path: Option<&Path>, default: &[u8]) -> Result<Component, RuntimeError> {
    let t0 = Instant::now();
    let c = match path {
        Some(p) => {
            let bytes = crate::files::read_capped(p, crate::files::MAX_COMPONENT)
                .map_err(|e| RuntimeError::Load { path: p.display().to_string(), msg: e.to_string() })?;
            Component::new(engine, &bytes)
                .map_err(|e| RuntimeError::Load { path: p.display().to_string(), msg: format!("{e:#}") })?
        }
        None => Component::new(engine, default)
            .map_err(|e| RuntimeError::Load { path: "<embedded>".into(), msg: format!("{e:#}") })?,
    };
    tracing::debug!(elapsed_ms = t0.elapsed().as_millis() as u64, "component compiled or loaded from cache");
    Ok(c)
}

impl Runtime {
    pub fn new(handle: Arc<ModelHandle>, cfg: RuntimeConfig) -> Result<Runtime, RuntimeError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        // Fuel bounds a request's guest computation as a whole (`request_fuel`).
        config.consume_fuel(true);
        if let Some(dir) = cfg.cache_dir.clone().or_else(default_cache_dir) {
            if std::fs::create_dir_all(&dir).is_ok() {
                let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
                let mut cc = wasmtime::CacheConfig::new();
                cc.with_directory(dir);
                match wasmtime::Cache::new(cc) {
                    Ok(cache) => {
                        config.cache(Some(cache));
                    }
                    Err(e) => tracing::warn!("compiled-component cache disabled: {e}"),
                }
            }
        }
        let engine = Engine::new(&config).map_err(wt)?;
        let policy = load_component(&engine, cfg.policy.as_deref(), DEFAULT_POLICY)?;
        let mut linker: Linker<GuestState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(wt)?;
        add_to_linker(&mut linker).map_err(wt)?;
        let pre = linker.instantiate_pre(&policy).map_err(|e| RuntimeError::Load {
            path: cfg.policy.as_ref().map_or("<embedded>".into(), |p| p.display().to_string()),
            msg: version_hint(format!("{e:#}")),
        })?;
        let policy_pre = PolicyComponentPre::new(pre).map_err(|e| RuntimeError::Load {
            path: cfg.policy.as_ref().map_or("<embedded>".into(), |p| p.display().to_string()),
            msg: format!("not a stllm policy component: {e:#}"),
        })?;
        let sampler_pre = match &cfg.sampler {
            Some(path) => {
                let c = load_component(&engine, Some(path), &[])?;
                let mut l: Linker<SamplerState> = Linker::new(&engine);
                wasmtime_wasi::p2::add_to_linker_async(&mut l).map_err(wt)?;
                let pre = l
                    .instantiate_pre(&c)
                    .map_err(|e| RuntimeError::Load { path: path.display().to_string(), msg: format!("{e:#}") })?;
                Some(SamplerComponentPre::new(pre).map_err(|e| RuntimeError::Load {
                    path: path.display().to_string(),
                    msg: format!("not a stllm sampler component: {e:#}"),
                })?)
            }
            None => None,
        };
        let ticker = EpochTicker::start(engine.clone());
        Ok(Runtime {
            engine,
            policy_pre,
            sampler_pre,
            handle,
            pool: Arc::default(),
            pending: Arc::default(),
            cfg,
            _ticker: ticker,
        })
    }

    pub fn handle(&self) -> &Arc<ModelHandle> {
        &self.handle
    }

    async fn checkout(&self) -> Result<Instance, RuntimeError> {
        let popped = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        // Keep `spare` ready ones ahead of the next requests.
        self.top_up(self.cfg.spare);
        if let Some(inst) = popped {
            return Ok(inst);
        }
        make_instance(&self.engine, &self.policy_pre, &self.handle, &self.cfg, self.fuel()).await
    }

    /// Make ready instances (start-up done, no request seen) in the background until the pool
    /// holds, or will hold once those being made are in, `target` of them (at most its size).
    fn top_up(&self, target: usize) {
        let target = target.min(self.cfg.pool_size);
        if target == 0 {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        loop {
            let idle = self.pool.lock().unwrap_or_else(|p| p.into_inner()).len();
            let pending = self.pending.load(Ordering::Acquire);
            if idle + pending >= target {
                return;
            }
            if self.pending.compare_exchange(pending, pending + 1, Ordering::AcqRel, Ordering::Acquire).is_err() {
                continue;
            }
            let (engine, pre, handle, cfg, pool, pending) = (
                self.engine.clone(),
                self.policy_pre.clone(),
                self.handle.clone(),
                self.cfg.clone(),
                self.pool.clone(),
                self.pending.clone(),
            );
            let fuel = self.fuel();
            rt.spawn(async move {
                let r = ready_instance(&engine, &pre, &handle, &cfg, fuel).await;
                match r {
                    Ok(i) => {
                        let mut pool = pool.lock().unwrap_or_else(|p| p.into_inner());
                        if pool.len() < cfg.pool_size {
                            pool.push(i);
                        }
                    }
                    Err(e) => tracing::warn!("a fresh policy instance failed to start: {e}"),
                }
                pending.fetch_sub(1, Ordering::AcqRel);
            });
        }
    }

    /// [`Isolation::PerRequest`]: put a ready instance in the pool in the background, in place of
    /// one a request used, so the next request does not pay for the guest's start-up.
    fn refill(&self) {
        // One more than there is or will be: each used instance gets its own replacement, even
        // while others are still being made.
        let idle = self.pool.lock().unwrap_or_else(|p| p.into_inner()).len();
        self.top_up(idle + self.pending.load(Ordering::Acquire) + 1);
    }

    fn checkin(&self, inst: Instance) {
        if inst.used && self.cfg.isolation() == Isolation::PerRequest {
            // Served a request: never another; a ready one takes its place.
            drop(inst);
            self.refill();
            return;
        }
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < self.cfg.pool_size {
            pool.push(inst);
        }
    }

    fn classify(&self, e: &wasmtime::Error, store: &Store<GuestState>, what: &'static str) -> RuntimeError {
        classify(e, store.data().limits.refused, what, self.cfg.memory_limit, self.cfg.step_timeout, self.fuel())
    }

    async fn new_plugin(&self) -> Result<Option<Plugin>, RuntimeError> {
        let Some(pre) = &self.sampler_pre else { return Ok(None) };
        let state = SamplerState {
            // The WIT promises a sampler nothing: WASI's interfaces are there (components built
            // with Rust's std import them) but lead nowhere, not even to stderr.
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limits: Limits::new(self.cfg.memory_limit),
            last_return: Instant::now(),
        };
        let mut store = Store::new(&self.engine, state);
        let limit = self.cfg.step_timeout;
        sandbox(&mut store, limit);
        let fuel = self.fuel();
        store.set_fuel(fuel).map_err(|e| RuntimeError::Wasmtime(e.to_string()))?;
        let bindings = pre.instantiate_async(&mut store).await.map_err(|e| {
            classify(&e, store.data().limits.refused, "sampler", self.cfg.memory_limit, self.cfg.step_timeout, fuel)
        })?;
        Ok(Some(Plugin { store, bindings, step_timeout: limit, fuel }))
    }

    /// The fuel a request starts with.
    fn fuel(&self) -> u64 {
        if self.cfg.request_fuel == 0 {
            u64::MAX
        } else {
            self.cfg.request_fuel
        }
    }

    /// Idle instances in the pool now (ready for the next requests).
    pub fn idle_instances(&self) -> usize {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Take a pooled (or new) instance and reset its per-request state (its fuel too).
    async fn begin(&self) -> Result<Instance, RuntimeError> {
        let mut inst = self.checkout().await?;
        inst.used = true;
        inst.store.set_fuel(self.fuel()).map_err(|e| RuntimeError::Wasmtime(e.to_string()))?;
        let d = inst.store.data_mut();
        d.last_return = Instant::now();
        d.limits.refused = false;
        d.plugin = None;
        d.plugin_error = None;
        Ok(inst)
    }

    /// Finish a guest call: the instance goes back to the pool unless the call trapped (a trapped
    /// instance is in an undefined state and is dropped).
    fn end<R>(&self, mut inst: Instance, r: wasmtime::Result<Result<R, wit_types::Error>>) -> Result<R, RuntimeError> {
        inst.store.data_mut().plugin = None;
        // Sequences the guest kept (in its globals) past the request are closed: they would pin
        // KV cells and carry one request's context into the next. A later use of such a handle
        // traps that guest.
        let d = inst.store.data_mut();
        let mut closed = 0;
        for rep in std::mem::take(&mut d.opened) {
            if d.table.delete(wasmtime::component::Resource::<host::SequenceRes>::new_own(rep)).is_ok() {
                closed += 1;
            }
        }
        if closed > 0 {
            tracing::warn!(closed, "the policy kept sequences open past its request: closed");
        }
        let dropped = d.log.reset();
        if dropped > 0 {
            tracing::warn!(dropped, cap = GUEST_LOG_CAP, "bytes of the guest's output past its cap were dropped");
        }
        if let Ok(left) = inst.store.get_fuel() {
            tracing::debug!(fuel_used = self.fuel() - left, "guest call ended");
        }
        match r {
            Ok(v) => {
                self.checkin(inst);
                v.map_err(RuntimeError::from_guest)
            }
            Err(e) => {
                let err = match inst.store.data_mut().plugin_error.take() {
                    Some(plugin_err) => plugin_err,
                    None => self.classify(&e, &inst.store, "policy"),
                };
                tracing::warn!("guest call failed, instance discarded: {err}");
                Err(err)
            }
        }
    }

    /// Create and initialise (a first call parses the tokenizer) up to `n` pooled instances now
    /// (at most the pool's size), so that as many concurrent requests start without paying for
    /// it; returns how many the pool holds.
    pub async fn prewarm(&self, n: usize) -> Result<usize, RuntimeError> {
        let idle = self.pool.lock().unwrap_or_else(|p| p.into_inner()).len();
        let n = n.min(self.cfg.pool_size).saturating_sub(idle);
        // Ready instances that have seen no request, made side by side, as many at a time as
        // there are cores (each task initialises its own as soon as it exists; more at once
        // would only stretch every one's start-up towards the step time limit).
        let par = std::thread::available_parallelism().map_or(1, |p| p.get());
        let mut first_err = None;
        let mut left = n;
        while left > 0 && first_err.is_none() {
            let batch = left.min(par);
            left -= batch;
            let tasks: Vec<_> = (0..batch)
                .map(|_| {
                    let (engine, pre, handle, cfg) =
                        (self.engine.clone(), self.policy_pre.clone(), self.handle.clone(), self.cfg.clone());
                    let fuel = self.fuel();
                    tokio::spawn(async move { ready_instance(&engine, &pre, &handle, &cfg, fuel).await })
                })
                .collect();
            for t in tasks {
                match t.await {
                    Ok(Ok(i)) => self.checkin(i),
                    Ok(Err(e)) => first_err = first_err.or(Some(e)),
                    Err(e) => {
                        first_err = first_err.or(Some(RuntimeError::Wasmtime(format!("instance task failed: {e}"))))
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(self.pool.lock().unwrap_or_else(|p| p.into_inner()).len()),
        }
    }

    /// Token ids of `text` (`add_special`: like `add_special_tokens=True`).
    pub async fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>, RuntimeError> {
        let mut i = self.begin().await?;
        let r = i.bindings.stllm_inference_policy().call_tokenize(&mut i.store, text, add_special).await;
        self.end(i, r)
    }

    pub async fn detokenize(&self, ids: &[u32], skip_special: bool) -> Result<String, RuntimeError> {
        let mut i = self.begin().await?;
        let r = i.bindings.stllm_inference_policy().call_detokenize(&mut i.store, ids, skip_special).await;
        self.end(i, r)
    }

    /// The text of each token alone (special tokens kept), in one guest call per token on one
    /// instance: what log-probability entries show.
    pub async fn token_strings(&self, ids: &[u32]) -> Result<Vec<String>, RuntimeError> {
        let mut i = self.begin().await?;
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            let r = i.bindings.stllm_inference_policy().call_detokenize(&mut i.store, &[id], false).await;
            match r {
                Ok(Ok(s)) => out.push(s),
                Ok(Err(e)) => {
                    self.checkin(i);
                    return Err(RuntimeError::from_guest(e));
                }
                Err(e) => return self.end::<String>(i, Err(e)).map(|_| vec![]),
            }
        }
        self.checkin(i);
        Ok(out)
    }

    pub async fn apply_chat_template(
        &self,
        messages_json: &str,
        add_generation_prompt: bool,
        tools_json: Option<&str>,
        extra_json: Option<&str>,
    ) -> Result<String, RuntimeError> {
        let mut i = self.begin().await?;
        let r = i
            .bindings
            .stllm_inference_policy()
            .call_apply_chat_template(&mut i.store, messages_json, add_generation_prompt, tools_json, extra_json)
            .await;
        self.end(i, r)
    }

    /// Run the guest's generation loop; `on_text` receives each piece of text and returns false
    /// to cancel. `cancel` may also be set from another thread.
    pub async fn generate(
        &self,
        req: &GenerateRequest,
        mut on_text: impl FnMut(&str, &[u32]) -> bool + Send + 'static,
        cancel: Arc<AtomicBool>,
    ) -> Result<GenerateResult, RuntimeError> {
        self.generate_chunks(req, move |c: Chunk<'_>| on_text(c.text, c.tokens), cancel).await
    }

    /// [`Runtime::generate`] with each piece's log-probabilities (when the request asks for
    /// them).
    pub async fn generate_chunks(
        &self,
        req: &GenerateRequest,
        on_text: impl FnMut(Chunk<'_>) -> bool + Send + 'static,
        cancel: Arc<AtomicBool>,
    ) -> Result<GenerateResult, RuntimeError> {
        let t0 = Instant::now();
        let plugin = self.new_plugin().await?;
        let mut i = self.begin().await?;
        let checkout = t0.elapsed();
        i.store.data_mut().plugin = plugin;
        // When the first piece came (the request log's time to first token inside the guest).
        let first = Arc::new(std::sync::OnceLock::<Duration>::new());
        let first_set = first.clone();
        let mut on_text = on_text;
        let on_text = move |c: Chunk<'_>| {
            let _ = first_set.set(t0.elapsed());
            on_text(c)
        };
        let sink = SinkRes { on_text: Box::new(on_text), cancel };
        let sink: Resource<SinkRes> = i.store.data_mut().table.push(sink).map_err(wt)?;
        let rep = sink.rep();
        let r = i.bindings.stllm_inference_policy().call_generate(&mut i.store, req, Resource::new_borrow(rep)).await;
        // The host still owns the sink: take it back out of the table.
        let _ = i.store.data_mut().table.delete(Resource::<SinkRes>::new_own(rep));
        tracing::debug!(
            target: "stllm::request",
            checkout_us = checkout.as_micros() as u64,
            first_piece_us = first.get().map(|d| d.as_micros() as u64),
            total_us = t0.elapsed().as_micros() as u64,
            "policy generate returned"
        );
        match self.end(i, r) {
            Ok(r) if r.finish == FinishReason::Cancelled => Err(RuntimeError::Cancelled),
            other => other,
        }
    }
}

/// The WIT package version this host implements.
pub const WIT_VERSION: &str = "0.2.0";

/// Name the cause when a component was built against another version of the contract.
fn version_hint(msg: String) -> String {
    match msg.find("stllm:inference/").and_then(|i| msg[i..].find('@').map(|j| i + j + 1)) {
        Some(at) if !msg[at..].starts_with(WIT_VERSION) => {
            let theirs: String = msg[at..].chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
            format!(
                "{msg} (the component was built against stllm:inference@{theirs}; this host implements \
                 @{WIT_VERSION}: rebuild it against this version's wit/, see wit/README.md)"
            )
        }
        _ => msg,
    }
}

fn classify(
    e: &wasmtime::Error,
    refused: bool,
    what: &'static str,
    mem: usize,
    limit: Duration,
    fuel: u64,
) -> RuntimeError {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => return RuntimeError::Timeout { what, limit },
        Some(wasmtime::Trap::OutOfFuel) => return RuntimeError::OutOfFuel { what, fuel },
        _ => {}
    }
    if refused {
        return RuntimeError::OutOfMemory { what, limit_mib: mem >> 20 };
    }
    tracing::debug!("{what} component failed: {e:?}");
    let msg = match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::UnreachableCodeReached) => {
            "wasm `unreachable` executed (a panic or abort in the guest)".into()
        }
        Some(t) => t.to_string(),
        None => e.to_string(),
    };
    RuntimeError::Trap { what, msg }
}
