//! `stllm serve`: load the models, their policy components and LoRA adapters, start each model's
//! engine, and hand them to [`crate::server`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::Args;

use super::{open, EngineArgs, ModelArgs, SandboxArgs};
use crate::memory::cells::MAX_SEQ;
use crate::runtime::{ModelHandle, Runtime, RuntimeConfig};
use crate::server::{AppState, ServeOptions, ServedModel};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// A model to serve: [NAME=]DIR or [NAME=]ORG/NAME (a cached Hugging Face repo id);
    /// repeatable. NAME (what clients put in `model`) defaults to the folder's name or the repo
    /// id. Default: the built-in demo model, named stllm-demo
    #[arg(long = "model", value_name = "[NAME=]DIR")]
    pub models: Vec<String>,
    /// With repo ids: the branch, tag or commit in the cache (default: main)
    #[arg(long)]
    pub revision: Option<String>,
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the address is printed on stderr)
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on the API (also from STLLM_API_KEY)
    #[arg(long, env = "STLLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests computing at once, all models together (each holds a policy instance; a request
    /// with n choices holds n)
    #[arg(long, default_value_t = 64)]
    pub max_concurrent: usize,
    /// Policy instances of each model's default policy created (and their tokenizer parsed)
    /// before listening, so the first requests do not pay for it (at most --max-concurrent)
    #[arg(long, default_value_t = 1)]
    pub prewarm: usize,
    /// Idle policy instances kept ready ahead of demand for each policy (made in the background
    /// as requests take them; also made before listening): a burst of requests beyond the past
    /// peak then does not wait for instances to start up (at most --max-concurrent; 0: none;
    /// default 4, or --max-concurrent when that is smaller)
    #[arg(long)]
    pub spare_instances: Option<usize>,
    /// Requests waiting for a slot beyond which new ones are refused with 429
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// A policy component clients can pick with `"policy": NAME`: NAME=FILE.wasm (repeatable)
    #[arg(long = "policy", value_name = "NAME=FILE.wasm")]
    pub policies: Vec<String>,
    /// A LoRA adapter clients can pick with `"lora": NAME`: NAME=DIR (a peft folder; repeatable;
    /// loaded into every served model)
    #[arg(long = "lora", value_name = "NAME=DIR")]
    pub loras: Vec<String>,
    /// Largest request body, MiB
    #[arg(long, default_value_t = 16)]
    pub max_body_mib: usize,
    /// On SIGINT/SIGTERM, how long to wait for requests in flight, seconds
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
    #[command(flatten)]
    pub e: EngineArgs,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// The resolved models: (name, folder)
    #[arg(skip)]
    resolved: Vec<(String, PathBuf)>,
}

/// `NAME=VALUE` or `VALUE`.
fn split_named(spec: &str) -> (Option<&str>, &str) {
    match spec.split_once('=') {
        Some((n, v)) if !n.is_empty() && !n.contains('/') => (Some(n), v),
        _ => (None, spec),
    }
}

impl ServeArgs {
    pub fn resolve(&mut self) -> Result<()> {
        if self.models.is_empty() {
            let d = super::demo::dir()?;
            if !crate::progress::quiet() {
                eprintln!("stllm: no --model given: serving the built-in demo model as \"stllm-demo\"");
            }
            self.resolved.push(("stllm-demo".into(), d));
            return Ok(());
        }
        for spec in &self.models {
            let (name, path) = split_named(spec);
            let dir = crate::hub::resolve(path, self.revision.as_deref()).with_context(|| format!("--model {spec}"))?;
            let name = match name {
                Some(n) => n.to_string(),
                None if crate::hub::is_repo_id(path) && !std::path::Path::new(path).is_dir() => path.to_string(),
                None => std::fs::canonicalize(&dir)
                    .ok()
                    .and_then(|d| d.file_name().map(|f| f.to_string_lossy().into_owned()))
                    .unwrap_or_else(|| path.to_string()),
            };
            self.resolved.push((name, dir));
        }
        Ok(())
    }

    fn model_args(&self, dir: &std::path::Path) -> ModelArgs {
        ModelArgs {
            model: Some(dir.display().to_string()),
            revision: None,
            dir: dir.to_path_buf(),
            lora: vec![],
            e: self.e.clone(),
        }
    }
}

pub fn run(a: ServeArgs) -> Result<()> {
    let max_concurrent = a.max_concurrent;
    if max_concurrent == 0 || max_concurrent > MAX_SEQ - 64 {
        bail!("--max-concurrent must be in 1..={}, got {max_concurrent}", MAX_SEQ - 64);
    }
    let spare = match a.spare_instances {
        Some(n) if n > max_concurrent => {
            bail!("--spare-instances must be at most --max-concurrent ({max_concurrent}), got {n}")
        }
        Some(n) => n,
        None => 4.min(max_concurrent),
    };
    if a.max_body_mib == 0 || a.max_body_mib > 1024 {
        bail!("--max-body-mib must be in 1..=1024, got {}", a.max_body_mib);
    }
    // The limits are checked once, here, before any model loads.
    let base = a.sandbox.config(None)?;
    let mut policies: Vec<(String, PathBuf)> = Vec::new();
    for spec in &a.policies {
        let (Some(name), file) = split_named(spec) else { bail!("--policy takes NAME=FILE.wasm, got {spec:?}") };
        if name == "default" || policies.iter().any(|(n, _)| n == name) {
            bail!("--policy {spec}: the name {name:?} is taken");
        }
        policies.push((name.to_string(), PathBuf::from(file)));
    }
    let mut loras: Vec<(String, PathBuf)> = Vec::new();
    for spec in &a.loras {
        let (Some(name), dir) = split_named(spec) else { bail!("--lora takes NAME=DIR, got {spec:?}") };
        loras.push((name.to_string(), PathBuf::from(dir)));
    }
    let rt_cfg = |policy: Option<PathBuf>| RuntimeConfig { policy, pool_size: max_concurrent, spare, ..base.clone() };
    let mut served = Vec::new();
    for (name, dir) in &a.resolved {
        let m = a.model_args(dir);
        let s = open(&m, 1).with_context(|| format!("model {name:?}"))?;
        let model = s.model().clone();
        // The engine's cache: --ctx-size cells (default the training context, up to 8192).
        let n_cells = a.e.ctx_size.unwrap_or_else(|| model.hparams().n_ctx_train.clamp(1, 8192));
        drop(s);
        for (lname, ldir) in &loras {
            model.load_adapter(lname, ldir).with_context(|| format!("--lora {lname}={}", ldir.display()))?;
        }
        let mut handle =
            ModelHandle::from_dir(dir, Some(model)).with_context(|| format!("reading {}", dir.display()))?;
        if handle.tokenizer_json.is_none() {
            bail!("{}: no tokenizer.json (the server needs the tokenizer)", dir.display());
        }
        let e = &mut handle.engine_options;
        e.n_cells = n_cells;
        e.max_seqs = max_concurrent;
        e.kv_type = a.e.kv_type()?;
        e.n_batch = a.e.batch;
        e.flash_attn = a.e.flash_attn()?;
        let handle = Arc::new(handle);
        // Start the engine now: its KV cache is allocated (and checked to fit) before listening.
        let engine = handle.engine().map_err(|e| anyhow::anyhow!("model {name:?}: {e:?}"))?.clone();
        let default_policy = Arc::new(Runtime::new(handle.clone(), rt_cfg(None))?);
        let mut by_name = HashMap::new();
        for (pname, file) in &policies {
            let rt = Runtime::new(handle.clone(), rt_cfg(Some(file.clone())))
                .with_context(|| format!("--policy {pname}"))?;
            by_name.insert(pname.clone(), Arc::new(rt));
        }
        served.push(ServedModel {
            name: name.clone(),
            handle,
            default_policy,
            policies: by_name,
            max_seq_len: engine.max_seq_len(),
            created: crate::server::now_secs_pub(),
            adapters: loras.iter().map(|(n, _)| n.clone()).collect(),
        });
    }
    let opts = ServeOptions {
        host: a.host.clone(),
        port: a.port,
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
        max_concurrent,
        max_queue: a.max_queue,
        max_body_bytes: a.max_body_mib << 20,
        shutdown_timeout: Duration::from_secs(a.shutdown_timeout),
        max_n: 16.min(max_concurrent),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if a.prewarm > max_concurrent {
        bail!("--prewarm must be at most --max-concurrent ({max_concurrent}), got {}", a.prewarm);
    }
    for m in &served {
        let t0 = std::time::Instant::now();
        // A policy that fails here fails its requests the same way (each answered 500, the
        // server going on): a warning, not a refusal to start.
        match rt.block_on(m.default_policy.prewarm(a.prewarm.max(spare))) {
            Ok(n) => {
                tracing::info!(model = %m.name, instances = n, ms = t0.elapsed().as_millis() as u64, "policy instances ready")
            }
            Err(e) => tracing::warn!(model = %m.name, "could not prepare policy instances: {e}"),
        }
    }
    let state = Arc::new(AppState::new(served, opts)?);
    rt.block_on(crate::server::serve(state))
}
