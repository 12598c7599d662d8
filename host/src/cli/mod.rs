//! The `stllm` command line: `run`, `chat`, `serve`, `info`, `logits`, `generate`, `bench`, ...
//! Machine-readable output (JSON) goes to stdout; logs and errors go to stderr.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};

use crate::ggml::DType;
use crate::runtime::{ModelHandle, Prompt, Runtime, RuntimeConfig};
use crate::sampling::{Sampler, SamplingParams};
use crate::session::Logits;
use crate::{Model, ModelOptions, Session, SessionOptions};

mod demo;
mod opcheck;
mod serve;

#[derive(Parser, Debug)]
#[command(name = "stllm", version, about = "Run HuggingFace safetensors models on ggml")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// No progress bars or informational lines on stderr (errors still go there)
    #[arg(long, global = true)]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// HuggingFace model folder (config.json + *.safetensors), or a Hugging Face repo id
    /// (ORG/NAME) found in the local Hugging Face cache. `run`, `chat` and `serve` use the
    /// built-in demo model when it is left out
    #[arg(long)]
    pub model: Option<String>,
    /// With a repo id: the branch, tag or commit in the cache (default: main)
    #[arg(long)]
    pub revision: Option<String>,
    /// The folder `--model` resolved to (set by `resolve`)
    #[arg(skip)]
    pub dir: PathBuf,
    /// A LoRA adapter folder as peft saves it, with an optional weight (default 1): DIR or
    /// DIR:WEIGHT. Repeatable: the adapters apply together (bench --concurrent: request i uses
    /// the i-th modulo their number)
    #[arg(long = "lora", value_name = "DIR[:WEIGHT]")]
    pub lora: Vec<String>,
    #[command(flatten)]
    pub e: EngineArgs,
}

/// How a model is loaded and computed: threads, cache, batch, quantization, devices (shared by
/// the commands that take one model and by `serve`).
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// CPU threads (default: all cores)
    #[arg(long)]
    pub threads: Option<usize>,
    /// Context size (positions held by the KV cache)
    #[arg(long)]
    pub ctx_size: Option<usize>,
    /// KV cache type: f32, f16, bf16, q8_0 (8-bit), q4_0 (default: f32 for F32 models, f16 otherwise)
    #[arg(long)]
    pub kv_type: Option<String>,
    /// Most tokens per graph during prefill
    #[arg(long, default_value_t = 512)]
    pub batch: usize,
    /// Fused flash attention: on, off, auto (= on)
    #[arg(long, default_value = "auto")]
    pub flash_attn: String,
    /// Quantize the large matrices at load: q8_0, q4_0 or q4_k (embeddings, routers and norms stay
    /// as stored)
    #[arg(long)]
    pub quantize: Option<String>,
    #[command(flatten)]
    pub dev: DeviceArgs,
}

impl EngineArgs {
    /// Where and how to load the model.
    fn model_options(&self, threads: Option<usize>) -> Result<ModelOptions> {
        use crate::runner::{MAX_CELLS, MAX_UBATCH};
        if let Some(c) = self.ctx_size {
            if !(1..=MAX_CELLS).contains(&c) {
                bail!("--ctx-size must be in 1..={MAX_CELLS}, got {c}");
            }
        }
        if !(1..=MAX_UBATCH).contains(&self.batch) {
            bail!("--batch must be in 1..={MAX_UBATCH}, got {}", self.batch);
        }
        let mut opts = self.dev.model_options(threads)?;
        opts.quantize = match self.quantize.as_deref() {
            None => None,
            Some("q8_0") => Some(DType::Q8_0),
            Some("q4_0") => Some(DType::Q4_0),
            Some("q4_k") => Some(DType::Q4_K),
            Some(other) => bail!("--quantize must be q8_0, q4_0 or q4_k, got {other:?}"),
        };
        Ok(opts)
    }

    /// --kv-type, parsed.
    fn kv_type(&self) -> Result<Option<DType>> {
        self.kv_type.as_deref().map(parse_kv_type).transpose()
    }

    /// --flash-attn: on, off, or auto (None).
    fn flash_attn(&self) -> Result<Option<bool>> {
        match self.flash_attn.as_str() {
            "on" => Ok(Some(true)),
            "off" => Ok(Some(false)),
            "auto" => Ok(None),
            other => bail!("--flash-attn must be on, off or auto, got {other:?}"),
        }
    }
}

impl ModelArgs {
    /// Resolve `--model` (a folder or a cached repo id) into `dir`; without it, the demo model
    /// when `demo` allows (saying so on stderr).
    pub fn resolve(&mut self, demo: bool) -> Result<()> {
        self.dir = match &self.model {
            Some(spec) => crate::hub::resolve(spec, self.revision.as_deref())?,
            None if demo => {
                let d = demo::dir()?;
                if !crate::progress::quiet() {
                    eprintln!("stllm: no --model given: using the built-in demo model (a small Llama trained on fortune-cookie quotes; see models/demo/README.md)");
                }
                d
            }
            None => bail!("--model is required (a model folder or a Hugging Face repo id such as Qwen/Qwen3-0.6B)"),
        };
        Ok(())
    }

    /// Where and how to load the model.
    fn model_options(&self, threads: Option<usize>) -> Result<ModelOptions> {
        self.e.model_options(threads)
    }
}

impl ModelArgs {
    /// Load the --lora adapters into `model` (each named by its folder as given); returns the
    /// names with their weights.
    fn load_adapters(&self, model: &Model) -> Result<Vec<(String, f32)>> {
        let specs = self.adapter_specs();
        for ((dir, _), spec) in specs.iter().zip(&self.lora) {
            model.load_adapter(dir, std::path::Path::new(dir)).with_context(|| format!("--lora {spec}"))?;
        }
        Ok(specs)
    }

    /// The --lora folders with their weights: DIR:WEIGHT when what follows the last ':' is a
    /// number (a folder may contain ':'), else DIR with weight 1.
    fn adapter_specs(&self) -> Vec<(String, f32)> {
        self.lora
            .iter()
            .map(|spec| match spec.rsplit_once(':').map(|(d, w)| (d, w.parse::<f32>())) {
                Some((d, Ok(w))) if w.is_finite() => (d.to_string(), w),
                _ => (spec.clone(), 1.0),
            })
            .collect()
    }
}

/// Where to compute.
#[derive(Args, Debug, Clone, Default)]
pub struct DeviceArgs {
    /// Device for weights, KV cache and compute: cpu, cuda[:N], gpu[:N] or a ggml device name (see
    /// `stllm devices`); default: the first GPU of the backend modules found, else the CPU
    #[arg(long)]
    pub device: Option<String>,
    /// Folder of ggml backend modules (libggml-cuda.so, ...) to load; default: the binary's folder
    #[arg(long)]
    pub backend_dir: Option<PathBuf>,
    /// Devices to split the layers over (pipeline parallelism), e.g. cuda:0,cuda:1
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// With several devices: `layer` splits the layers among them, `none` uses the first alone
    #[arg(long, default_value = "layer")]
    pub split: String,
    /// Relative share of layers per device, e.g. 3,1 (default: each device's free memory)
    #[arg(long, value_delimiter = ',')]
    pub tensor_split: Vec<f64>,
    /// How many of the last layers go to the device(s), as llama.cpp's -ngl: default all (and the
    /// output head); the layer count: every layer but the head; fewer: the first layers stay on
    /// the CPU
    #[arg(long, alias = "n-gpu-layers")]
    pub gpu_layers: Option<usize>,
    /// Do not say on stderr which device was picked (as `--quiet` does).
    #[arg(skip)]
    pub quiet: bool,
}

impl DeviceArgs {
    /// Load backend modules as asked and say where the model goes.
    pub fn model_options(&self, threads: Option<usize>) -> Result<ModelOptions> {
        let device = self.prepare()?;
        let mut devices = self.devices.clone();
        match self.split.as_str() {
            "layer" => {}
            "none" => devices.truncate(1),
            other => bail!("--split must be layer or none, got {other:?}"),
        }
        if !self.tensor_split.is_empty() {
            let n = if devices.is_empty() { device.iter().flat_map(|d| d.split(',')).count() } else { devices.len() };
            if self.tensor_split.len() != n || self.tensor_split.iter().any(|x| !x.is_finite() || *x < 0.0) {
                bail!("--tensor-split needs {n} non-negative shares, one per device, got {:?}", self.tensor_split);
            }
        }
        let mut opts = ModelOptions {
            device,
            devices,
            gpu_layers: self.gpu_layers,
            split: self.tensor_split.clone(),
            ..Default::default()
        };
        if let Some(t) = threads {
            if !(1..=1024).contains(&t) {
                bail!("--threads must be in 1..=1024, got {t}");
            }
            opts.threads = t;
        }
        Ok(opts)
    }

    /// Load backend modules as asked; returns the device to use (None: the CPU). With neither
    /// --device nor --devices, the modules of --backend-dir (default: the binary's folder) are
    /// loaded if any are there and the first GPU is used, else the CPU; a module that cannot be
    /// loaded is then no error (the CPU is used and the reason said). The choice is said on stderr.
    pub fn prepare(&self) -> Result<Option<String>> {
        let exe_dir = || std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf));
        if self.device.is_none() && self.devices.is_empty() {
            let (device, line) = self.pick_default(self.backend_dir.clone().or_else(exe_dir));
            if !self.quiet && !crate::progress::quiet() {
                eprintln!("stllm: {line}");
            }
            return Ok(device);
        }
        let wants_device = self.device.as_deref().is_some_and(|d| !d.eq_ignore_ascii_case("cpu"))
            || self.devices.iter().any(|d| !d.eq_ignore_ascii_case("cpu"));
        // --device cpu forces the CPU: no module is loaded, not even from --backend-dir.
        let dir = if wants_device { self.backend_dir.clone().or_else(exe_dir) } else { None };
        if let Some(dir) = dir {
            let loaded = crate::ggml::load_backends_from(&dir)?;
            tracing::info!(dir = %dir.display(), ?loaded, "backend modules loaded");
        }
        Ok(self.device.clone())
    }

    /// The device when none was asked for, and the stderr line that says so: the first GPU (then
    /// integrated GPU) of the modules in `dir`, else the CPU with the reason.
    fn pick_default(&self, dir: Option<PathBuf>) -> (Option<String>, String) {
        let mut failed = Vec::new();
        if let Some(dir) = &dir {
            let (loaded, errors) = crate::ggml::try_load_backends_from(dir);
            tracing::info!(dir = %dir.display(), ?loaded, ?errors, "backend modules loaded");
            failed = errors;
        }
        let all = crate::ggml::devices();
        let gpu = ["gpu", "igpu"].iter().find_map(|k| all.iter().find(|d| d.kind == *k));
        if let Some(d) = gpu {
            return (Some(d.name.clone()), format!("using {} ({})", d.name, d.description));
        }
        let why = match failed.first() {
            Some(e) if failed.len() == 1 => format!("a GPU backend failed to load: {e}"),
            Some(e) => format!("{} GPU backends failed to load; first: {e}", failed.len()),
            None => match &dir {
                Some(d) => format!("no GPU backend found in {}", d.display()),
                None => "no GPU backend found".into(),
            },
        };
        (None, format!("using the CPU ({why})"))
    }
}

/// Sampling and stopping for text generation (defaults: the model's generation_config.json,
/// else greedy).
#[derive(Args, Debug, Clone)]
pub struct GenArgs {
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_k: Option<u32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub min_p: Option<f32>,
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Random seed (default: from the clock)
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the output ends with this string (repeatable)
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long)]
    pub ignore_eos: bool,
}

/// Which components run the policy, and their sandbox limits.
#[derive(Args, Debug, Clone)]
pub struct PolicyArgs {
    /// A policy component (.wasm) to use instead of the built-in one
    #[arg(long)]
    pub policy: Option<PathBuf>,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

impl PolicyArgs {
    fn config(&self) -> Result<RuntimeConfig> {
        self.sandbox.config(self.policy.clone())
    }
}

/// The sampler plug-in and the guests' limits (shared by the text commands and `serve`).
#[derive(Args, Debug, Clone)]
pub struct SandboxArgs {
    /// A sampler plug-in component (.wasm), e.g. guest/examples/mirostat
    #[arg(long)]
    pub sampler: Option<PathBuf>,
    /// Memory limit of each guest instance, MiB
    #[arg(long, default_value_t = 1024)]
    pub guest_memory_mib: usize,
    /// Longest a guest may compute between two engine calls, milliseconds
    #[arg(long, default_value_t = 10_000)]
    pub guest_step_timeout_ms: u64,
    /// Most WebAssembly instructions a guest may execute for one request, however often it
    /// calls the host (0: no limit)
    #[arg(long, default_value_t = crate::runtime::DEFAULT_REQUEST_FUEL)]
    pub guest_request_fuel: u64,
    /// Whether a policy instance serves one request or many: `pooled` (reused: what the
    /// component keeps in its globals outlives a request) or `per-request` (a fresh instance each
    /// request, nothing one leaves in guest memory reaches the next). Default: pooled for the
    /// built-in policy (its only global state is the parsed tokenizer), per-request for a
    /// component given with --policy
    #[arg(long, value_enum)]
    pub guest_isolation: Option<IsolationArg>,
}

/// `--guest-isolation` values.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsolationArg {
    Pooled,
    PerRequest,
}

impl SandboxArgs {
    /// The runtime's configuration with `policy` (None: the embedded one), the limits checked.
    fn config(&self, policy: Option<PathBuf>) -> Result<RuntimeConfig> {
        let mib = self.guest_memory_mib;
        if !(1..=1 << 20).contains(&mib) {
            bail!("--guest-memory-mib must be in 1..=1048576, got {mib}");
        }
        if self.guest_step_timeout_ms == 0 || self.guest_step_timeout_ms > 24 * 3600 * 1000 {
            bail!("--guest-step-timeout-ms must be in 1..=86400000, got {}", self.guest_step_timeout_ms);
        }
        Ok(RuntimeConfig {
            policy,
            sampler: self.sampler.clone(),
            memory_limit: mib << 20,
            step_timeout: std::time::Duration::from_millis(self.guest_step_timeout_ms),
            request_fuel: self.guest_request_fuel,
            isolation: self.guest_isolation.map(|i| match i {
                IsolationArg::Pooled => crate::runtime::Isolation::Pooled,
                IsolationArg::PerRequest => crate::runtime::Isolation::PerRequest,
            }),
            ..RuntimeConfig::default()
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate text for a prompt (the chat template is applied when the model has one)
    Run {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long)]
        prompt: String,
        /// Use the prompt as raw text, without the chat template
        #[arg(long)]
        raw: bool,
        /// A system message (chat mode)
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        g: GenArgs,
        #[command(flatten)]
        p: PolicyArgs,
        /// Print {"text", "tokens", "finish", "prompt_tokens"} at the end instead of streaming
        #[arg(long)]
        json: bool,
    },
    /// Interactive multi-turn chat on stdin/stdout (/exit or end of input to quit)
    Chat {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        g: GenArgs,
        #[command(flatten)]
        p: PolicyArgs,
    },
    /// Token ids of a text, as JSON: {"ids": [...]}
    Tokenize {
        /// Folder with tokenizer.json (+ tokenizer_config.json); a model folder or a cached
        /// Hugging Face repo id (ORG/NAME) works
        #[arg(long)]
        tokenizer: String,
        #[arg(long)]
        revision: Option<String>,
        #[arg(long)]
        text: String,
        /// Add special tokens (BOS...) like add_special_tokens=True
        #[arg(long)]
        special: bool,
        #[command(flatten)]
        p: PolicyArgs,
    },
    /// Text of token ids, as JSON: {"text": "..."} (special tokens kept unless --skip-special)
    Detokenize {
        #[arg(long)]
        tokenizer: String,
        #[arg(long)]
        revision: Option<String>,
        /// Comma-separated token ids (may be empty)
        #[arg(long)]
        ids: String,
        #[arg(long)]
        skip_special: bool,
        #[command(flatten)]
        p: PolicyArgs,
    },
    /// Render chat messages (a JSON file) with the chat template, as JSON: {"text": "..."}
    Template {
        #[arg(long)]
        tokenizer: String,
        #[arg(long)]
        revision: Option<String>,
        #[arg(long)]
        messages: PathBuf,
        #[arg(long)]
        no_generation_prompt: bool,
        /// Tools (a JSON file with an array)
        #[arg(long)]
        tools: Option<PathBuf>,
        /// Extra template variables as a JSON object, e.g. '{"date_string": "26 Jul 2024"}'
        #[arg(long)]
        vars: Option<String>,
        #[command(flatten)]
        p: PolicyArgs,
    },
    /// Serve models over an OpenAI-compatible HTTP API (chat, completions, embeddings, ...)
    Serve(serve::ServeArgs),
    /// Print architecture, sizes, dtype and parameter count as JSON
    Info {
        #[command(flatten)]
        m: ModelArgs,
    },
    /// List compute devices (the CPU, plus those of loaded backend modules) as JSON
    Devices {
        #[command(flatten)]
        dev: DeviceArgs,
    },
    /// Check every op x dtype the models use on a device against an f64 reference (and the CPU)
    OpCheck {
        #[command(flatten)]
        dev: DeviceArgs,
        /// Print JSON instead of the table
        #[arg(long)]
        json: bool,
        /// Also the cases at real model sizes (expert matrices of Nemotron 3 Nano's shapes:
        /// slow against the f64 reference; for GPU runs)
        #[arg(long)]
        large: bool,
    },
    /// Print logits of every input position as JSON: {"logits": [[...], ...]}
    Logits {
        #[command(flatten)]
        m: ModelArgs,
        /// Comma-separated token ids
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
    },
    /// Generate tokens after a prompt of token ids
    Generate {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// 0 = greedy
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        top_k: u32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Keep going after end-of-sequence tokens
        #[arg(long)]
        ignore_eos: bool,
        /// Print {"tokens": [...]} (the new ids only) instead of one id per line as they come
        #[arg(long)]
        json: bool,
        /// Prompt-cache file: reused when it holds a prefix of the prompt (the rest is computed),
        /// else the prompt is computed and saved there
        #[arg(long)]
        prompt_cache: Option<PathBuf>,
    },
    /// Measure prefill and decode speed on random token ids
    Bench {
        #[command(flatten)]
        m: ModelArgs,
        /// Prompt length
        #[arg(long, default_value_t = 512)]
        prompt: usize,
        /// Tokens to decode after the prompt
        #[arg(long, default_value_t = 128)]
        gen: usize,
        /// Repetitions (the best is reported)
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Print JSON
        #[arg(long)]
        json: bool,
        /// Instead: aggregate decode speed of this many concurrent requests through the engine
        /// (continuous batching), e.g. 1,8,32; each has its own --prompt random tokens and
        /// decodes --gen tokens
        #[arg(long, value_delimiter = ',')]
        concurrent: Vec<usize>,
        /// With --concurrent: run the requests through the default policy component (what
        /// `stllm serve` does: tokenizer-free token prompts, the guest's loop and sampler) on the
        /// same engine, instead of `Engine::generate`
        #[arg(long)]
        through_policy: bool,
        /// With --concurrent: sampling temperature of every request (0 = greedy)
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// With --concurrent: top-k of every request (0 = off)
        #[arg(long, default_value_t = 0)]
        top_k: u32,
        /// With --concurrent: request i samples with seed SEED + i
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Long contexts: prefill the prompt in chunks of this many tokens, reporting the speed
        /// of each over depth, then decode --gen tokens at the prompt's depth (one run)
        #[arg(long)]
        chunk: Option<usize>,
        /// With --chunk: resume from this prompt-cache file when it exists (it must hold the
        /// start of this bench's prompt) and save the sequence to it when the run stops — a
        /// prompt too long for one sitting is computed over several (hybrid models' recurrent
        /// state included)
        #[arg(long)]
        state: Option<PathBuf>,
        /// With --chunk: stop prefilling after this many seconds (checked between chunks),
        /// saving to --state
        #[arg(long)]
        deadline: Option<f64>,
        /// With --chunk: stop prefilling after this many chunks, saving to --state
        #[arg(long)]
        stop_after: Option<usize>,
    },
}

fn parse_kv_type(s: &str) -> Result<DType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        "q8_0" | "int8" => DType::Q8_0,
        "q4_0" => DType::Q4_0,
        "fp8" | "f8" | "f8_e4m3" | "f8_e5m2" => bail!(
            "--kv-type {s}: FP8 KV caches are not supported: ggml has no FP8 tensor type (use q8_0 for 8-bit; see ARCHITECTURE.md)"
        ),
        other => bail!("unsupported --kv-type {other:?} (supported: f32, f16, bf16, q8_0, q4_0)"),
    })
}

/// Bytes the model needs on its device at the chosen context (--ctx-size, default the training
/// context capped at 4096), before any cache is allocated: weights (loaded), KV cache, compute.
fn memory_estimate(model: &Model, m: &ModelArgs) -> Result<serde_json::Value> {
    let hp = model.hparams();
    let n_ctx = m.e.ctx_size.unwrap_or_else(|| hp.n_ctx_train.min(4096));
    let kv_type = match m.e.kv_type.as_deref() {
        Some(t) => parse_kv_type(t)?,
        None if model.dtype == DType::F32 => DType::F32,
        None => DType::F16,
    };
    // Only attention layers hold KV; hybrid models add a recurrent state per sequence (one here).
    let kv_layers = model.arch.kv_layers();
    let layer_kv_per_token = 2 * kv_type.row_size(hp.n_embd_kv() as i64);
    let kv_per_token = kv_layers.len() * layer_kv_per_token;
    let too_large = || anyhow::anyhow!("a context of {n_ctx} positions is too large to size");
    let kv = kv_per_token.checked_mul(n_ctx).ok_or_else(too_large)?;
    let rs = model.arch.recurrent();
    let rs_per_layer = rs.as_ref().map_or(0, |r| 4 * (r.conv_row + r.ssm_row));
    let recurrent = rs.as_ref().map_or(0, |r| r.layers.len() * rs_per_layer);
    let compute = crate::runner::compute_estimate(hp, n_ctx, m.e.batch.max(1)).ok_or_else(too_large)?;
    let weights = model.weight_bytes();
    let (free, total) = model.device_memory();
    // Per backend: its layers' weights, cache and state, and a compute buffer where any layer or
    // the head runs.
    let counts = model.placement.counts();
    let backends: Vec<serde_json::Value> = model
        .backend_memory()
        .into_iter()
        .enumerate()
        .map(|(b, (name, (free, total)))| {
            let w = model.weight_bytes_per_backend()[b];
            let on_b = |layers: &[usize]| layers.iter().filter(|&&l| model.placement.layers[l] == b).count();
            let kv_b = on_b(&kv_layers).saturating_mul(layer_kv_per_token).saturating_mul(n_ctx);
            let rs_b = rs.as_ref().map_or(0, |r| on_b(&r.layers) * rs_per_layer);
            let c = if counts[b] > 0 || b == model.placement.output { compute } else { 0 };
            serde_json::json!({
                "name": name, "layers": counts[b], "weights": w, "kv": kv_b, "recurrent": rs_b, "compute_estimate": c,
                "total": w.saturating_add(kv_b).saturating_add(rs_b).saturating_add(c), "free": free, "device_total": total,
            })
        })
        .collect();
    Ok(serde_json::json!({
        "ctx_size": n_ctx, "kv_type": kv_type.name(), "weights": weights, "kv_per_token": kv_per_token,
        "kv": kv, "recurrent_per_sequence": recurrent, "compute_estimate": compute,
        "total": weights.saturating_add(kv).saturating_add(recurrent).saturating_add(compute),
        "device_free": free, "device_total": total, "backends": backends,
    }))
}

fn open(m: &ModelArgs, min_ctx: usize) -> Result<Session> {
    let opts = m.model_options(m.e.threads)?;
    let model = Model::load(&m.dir, &opts).with_context(|| format!("loading {}", m.dir.display()))?;
    let kv_type = m.e.kv_type()?;
    let adapters = m.load_adapters(&model)?;
    let n_ctx = m.e.ctx_size.unwrap_or_else(|| model.hparams().n_ctx_train.min(4096).max(min_ctx));
    let sopts = SessionOptions { n_ctx: Some(n_ctx), n_batch: m.e.batch, kv_type, flash_attn: m.e.flash_attn()? };
    let mut s = Session::new(Arc::new(model), &sopts)?;
    let list = adapters
        .iter()
        .map(|(name, w)| Ok((s.model().adapter(name)?, *w)))
        .collect::<Result<Vec<_>, crate::lora::LoraError>>()?;
    s.set_adapters(list)?;
    Ok(s)
}

/// Comma-separated token ids; an empty string is an empty list.
fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<u32>().with_context(|| format!("--ids: {t:?} is not a token id")))
        .collect()
}

pub fn run(mut cli: Cli) -> Result<()> {
    crate::progress::set_quiet(cli.quiet);
    match &mut cli.command {
        Command::Run { m, .. } | Command::Chat { m, .. } => m.resolve(true)?,
        Command::Serve(s) => s.resolve()?,
        Command::Info { m } | Command::Logits { m, .. } | Command::Generate { m, .. } | Command::Bench { m, .. } => {
            m.resolve(false)?
        }
        _ => {}
    }
    match cli.command {
        Command::Serve(s) => serve::run(s)?,
        Command::Devices { dev } => {
            // Listing devices is about the modules: one in a named folder that fails to load is
            // an error here (other commands fall back to the CPU and say why).
            if let Some(dir) = &dev.backend_dir {
                crate::ggml::load_backends_from(dir)?;
            }
            dev.prepare()?;
            let out = serde_json::json!({ "ggml": crate::ggml::version(), "ggml_abi": crate::ggml::abi_fingerprint(), "devices": crate::ggml::devices() });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Command::OpCheck { dev, json, large } => opcheck::run(&dev, json, large)?,
        Command::Info { m } => {
            let opts = m.model_options(Some(m.e.threads.unwrap_or(1).max(1)))?;
            let model = Model::load(&m.dir, &opts).with_context(|| format!("loading {}", m.dir.display()))?;
            let hp = model.hparams();
            let out = serde_json::json!({
                "architecture": hp.arch,
                "dtype": model.dtype.name(),
                "parameters": model.n_params(),
                "weight_bytes": model.weight_bytes(),
                "vocab_size": hp.n_vocab,
                "hidden_size": hp.n_embd,
                "layers": hp.n_layer,
                "heads": hp.n_head,
                "kv_heads": hp.n_head_kv,
                "head_dim": hp.head_dim,
                "intermediate_size": hp.n_ff,
                "context_length": hp.n_ctx_train,
                "sliding_window": hp.sliding_window,
                "tied_embeddings": hp.tied_embeddings,
                "eos_token_ids": model.eos_tokens(),
                "device": model.device_name(),
                "memory": memory_estimate(&model, &m)?,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Command::Logits { m, tokens } => {
            let mut s = open(&m, tokens.len())?;
            let rows = s.decode(&tokens, Logits::All)?;
            println!("{}", serde_json::to_string(&serde_json::json!({ "logits": rows }))?);
        }
        Command::Generate {
            m,
            tokens,
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            ignore_eos,
            json,
            prompt_cache,
        } => {
            if !(0.0..=1.0).contains(&top_p) || top_p == 0.0 {
                bail!("--top-p must be in (0, 1], got {top_p}");
            }
            if !temperature.is_finite() || temperature < 0.0 {
                bail!("--temperature must be >= 0, got {temperature}");
            }
            let mut s = open(&m, tokens.len() + max_tokens)?;
            let stop = if ignore_eos { vec![] } else { s.model().eos_tokens() };
            let mut sampler = Sampler::new(SamplingParams { temperature, top_k, top_p, seed, ..Default::default() });
            // With a prompt cache, `done` positions come from the file (or are computed and saved).
            let mut done = 0;
            if let Some(pc) = &prompt_cache {
                let reusable = pc.exists() && {
                    let cached = s.load_state(pc)?;
                    cached.len() < tokens.len() && tokens.starts_with(&cached)
                };
                if reusable {
                    done = s.n_past();
                    tracing::info!(reused = done, "prompt cache hit");
                } else {
                    s.reset();
                    done = tokens.len() - 1;
                    if done > 0 {
                        s.decode(&tokens[..done], Logits::Last)?;
                        s.save_state(pc)?;
                    }
                }
            }
            let out = s.generate(&tokens[done..], max_tokens, &mut sampler, &stop, |t| {
                if !json {
                    println!("{t}");
                }
            })?;
            if json {
                println!("{}", serde_json::to_string(&serde_json::json!({ "tokens": out }))?);
            }
        }
        Command::Bench { m, prompt, gen, json, concurrent, through_policy, temperature, top_k, seed, .. }
            if !concurrent.is_empty() =>
        {
            let sampling = SamplingParams { temperature, top_k, seed, ..Default::default() };
            sampling.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
            bench_concurrent(&m, &concurrent, prompt, gen, json, through_policy, &sampling)?
        }
        Command::Bench { m, prompt, gen, repeat, json, chunk, state, deadline, stop_after, .. }
            if chunk.is_some() || state.is_some() || deadline.is_some() || stop_after.is_some() =>
        {
            if repeat > 1 {
                bail!("--repeat does not go with --chunk/--state/--deadline/--stop-after (one run, resumable)");
            }
            let plan = DepthPlan { chunk: chunk.unwrap_or(prompt), state, deadline, stop_after };
            bench_depth(&m, prompt, gen, &plan, json)?
        }
        Command::Bench { m, prompt, gen, repeat, json, .. } => bench(&m, prompt, gen, repeat.max(1), json)?,
        Command::Run { m, prompt, raw, system, g, p, json } => {
            let (rt, chat) = runtime_with_model(&m, &p)?;
            let prompt = if chat && !raw {
                Prompt::Chat(messages_json(system.as_deref(), &[("user", &prompt)]))
            } else {
                Prompt::Text(prompt)
            };
            let r = tokio_rt()?.block_on(run_one(&rt, prompt, &g, !json))?;
            if json {
                let out = serde_json::json!({
                    "text": r.text, "tokens": r.tokens, "prompt_tokens": r.prompt_tokens,
                    "finish": match r.finish {
                        crate::runtime::FinishReason::Stop => "stop",
                        crate::runtime::FinishReason::Length => "length",
                        crate::runtime::FinishReason::Cancelled => "cancelled",
                        crate::runtime::FinishReason::ToolCalls => "tool_calls",
                    },
                });
                println!("{}", serde_json::to_string(&out)?);
            } else {
                println!();
            }
        }
        Command::Chat { m, system, g, p } => chat(&m, &p, &g, system.as_deref())?,
        Command::Tokenize { tokenizer, revision, text, special, p } => {
            let rt = runtime_tokenizer_only(&crate::hub::resolve(&tokenizer, revision.as_deref())?, &p)?;
            let ids = tokio_rt()?.block_on(rt.tokenize(&text, special))?;
            println!("{}", serde_json::to_string(&serde_json::json!({ "ids": ids }))?);
        }
        Command::Detokenize { tokenizer, revision, ids, skip_special, p } => {
            let ids = parse_ids(&ids)?;
            let rt = runtime_tokenizer_only(&crate::hub::resolve(&tokenizer, revision.as_deref())?, &p)?;
            let text = tokio_rt()?.block_on(rt.detokenize(&ids, skip_special))?;
            println!("{}", serde_json::to_string(&serde_json::json!({ "text": text }))?);
        }
        Command::Template { tokenizer, revision, messages, no_generation_prompt, tools, vars, p } => {
            let rt = runtime_tokenizer_only(&crate::hub::resolve(&tokenizer, revision.as_deref())?, &p)?;
            let msgs = crate::files::read_string_capped(&messages, crate::files::MAX_JSON)
                .with_context(|| format!("reading {}", messages.display()))?;
            let tools = tools
                .map(|t| {
                    crate::files::read_string_capped(&t, crate::files::MAX_JSON)
                        .with_context(|| format!("reading {}", t.display()))
                })
                .transpose()?;
            let text = tokio_rt()?.block_on(rt.apply_chat_template(
                &msgs,
                !no_generation_prompt,
                tools.as_deref(),
                vars.as_deref(),
            ))?;
            println!("{}", serde_json::to_string(&serde_json::json!({ "text": text }))?);
        }
    }
    Ok(())
}

fn bench(m: &ModelArgs, prompt: usize, gen: usize, repeat: usize, json: bool) -> Result<()> {
    if prompt == 0 {
        bail!("--prompt must be at least 1");
    }
    let mut s = open(m, prompt + gen)?;
    let n_vocab = s.model().hparams().n_vocab as u32;
    let tokens = random_tokens(0, prompt, n_vocab);
    let (mut best_pp, mut best_tg) = (f64::MAX, f64::MAX);
    // On a terminal: a bar over the runs' tokens (the time it costs is outside the timed parts).
    let bar = progress_bar((repeat * (prompt + gen)) as u64, "bench");
    for _ in 0..repeat {
        s.reset();
        // Greedy, as the engine decodes it: the argmax is taken on the device.
        let t0 = Instant::now();
        let mut t = s.decode_greedy(&tokens)?;
        best_pp = best_pp.min(t0.elapsed().as_secs_f64());
        if let Some(b) = &bar {
            b.inc(prompt as u64);
        }
        let t1 = Instant::now();
        for _ in 0..gen {
            t = s.decode_greedy(&[t])?;
        }
        best_tg = best_tg.min(t1.elapsed().as_secs_f64());
        if let Some(b) = &bar {
            b.inc(gen as u64);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let model = s.model();
    let pp = prompt as f64 / best_pp;
    let tg = if gen > 0 { gen as f64 / best_tg } else { 0.0 };
    // The buffers stay allocated after the run, so the device's use now is its peak (up to what
    // the backend frees by itself). Only meaningful for a device that is not the CPU.
    let mem = s.memory();
    if json {
        let out = serde_json::json!({
            "engine": "stllm", "model": m.dir, "architecture": model.hparams().arch, "dtype": model.dtype.name(),
            "device": model.device_name(), "threads": model.threads(), "prompt": prompt, "gen": gen,
            "prefill_tok_s": pp, "decode_tok_s": tg, "ttft_ms": best_pp * 1e3,
            "device_used_mib": (mem.device_total - mem.device_free) as f64 / 1048576.0,
            "memory": mem,
        });
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!(
            "{} {} ({} threads): prefill {prompt} tokens {pp:.1} tok/s ({:.1} ms), decode {gen} tokens {tg:.2} tok/s",
            model.hparams().arch,
            model.dtype.name(),
            model.threads(),
            best_pp * 1e3
        );
    }
    Ok(())
}

/// How `stllm bench --chunk` computes its prompt.
struct DepthPlan {
    chunk: usize,
    state: Option<PathBuf>,
    deadline: Option<f64>,
    stop_after: Option<usize>,
}

/// `stllm bench --chunk N [--state FILE] [--deadline S | --stop-after K]`: the prompt's first
/// `prompt - 1` random tokens in chunks (speed per chunk over depth), resumable through a
/// prompt-cache file; once they are all in, the last prompt token and `gen - 1` more are decoded
/// greedily at that depth (decode speed, the tokens, memory). One JSON line per chunk and one
/// at the end with `--json`.
fn bench_depth(m: &ModelArgs, prompt: usize, gen: usize, plan: &DepthPlan, json: bool) -> Result<()> {
    if prompt < 2 {
        bail!("--prompt must be at least 2 with --chunk");
    }
    if plan.chunk == 0 {
        bail!("--chunk must be at least 1");
    }
    if let Some(d) = plan.deadline.filter(|d| !d.is_finite() || *d < 0.0) {
        bail!("--deadline must be a number of seconds >= 0, got {d}");
    }
    let mut s = open(m, prompt + gen)?;
    let n_vocab = s.model().hparams().n_vocab as u32;
    let tokens = random_tokens(0, prompt, n_vocab);
    let target = prompt - 1;
    let mut done = 0;
    if let Some(f) = plan.state.as_deref().filter(|f| f.exists()) {
        let cached = s.load_state(f)?;
        if cached.len() > target || tokens[..cached.len()] != cached[..] {
            bail!(
                "{}: holds {} tokens that are not the start of this bench's prompt (another --prompt or model?)",
                f.display(),
                cached.len()
            );
        }
        done = cached.len();
        tracing::info!(resumed = done, "prompt-cache state loaded");
    }
    let resumed = done;
    let t_start = Instant::now();
    let mut chunks = 0;
    while done < target {
        let over_time = plan.deadline.is_some_and(|d| t_start.elapsed().as_secs_f64() >= d);
        if over_time || plan.stop_after.is_some_and(|k| chunks >= k) {
            break;
        }
        let n = plan.chunk.min(target - done);
        let t0 = Instant::now();
        s.decode_greedy(&tokens[done..done + n])?;
        let dt = t0.elapsed().as_secs_f64();
        done += n;
        chunks += 1;
        if json {
            let line = serde_json::json!({"depth": done, "chunk": n, "prefill_tok_s": n as f64 / dt, "ms": dt * 1e3});
            println!("{}", serde_json::to_string(&line)?);
        } else {
            println!("depth {done}: {n} tokens at {:.1} tok/s", n as f64 / dt);
        }
    }
    if let Some(f) = &plan.state {
        if done > resumed {
            let t0 = Instant::now();
            s.save_state(f)?;
            tracing::info!(tokens = done, ms = t0.elapsed().as_millis() as u64, "prompt-cache state saved");
        }
    }
    let model = s.model().clone();
    if done < target {
        if json {
            let out = serde_json::json!({
                "engine": "stllm", "bench": "depth", "model": m.dir, "architecture": model.hparams().arch,
                "prompt": prompt, "stopped_at": done, "resumed_from": resumed, "state": plan.state, "memory": s.memory(),
            });
            println!("{}", serde_json::to_string(&out)?);
        } else {
            println!("stopped at depth {done} of {target} (resume with the same command and --state)");
        }
        return Ok(());
    }
    let t0 = Instant::now();
    let mut out = Vec::with_capacity(gen);
    let mut t = tokens[target];
    for _ in 0..gen {
        t = s.decode_greedy(&[t])?;
        out.push(t);
    }
    let dt = t0.elapsed().as_secs_f64();
    let tg = if gen > 0 { gen as f64 / dt } else { 0.0 };
    let mem = s.memory();
    if json {
        let line = serde_json::json!({
            "engine": "stllm", "bench": "depth", "model": m.dir, "architecture": model.hparams().arch,
            "dtype": model.dtype.name(), "device": model.device_name(), "prompt": prompt, "gen": gen,
            "resumed_from": resumed, "decode_tok_s": tg, "tokens": out,
            "device_used_mib": (mem.device_total - mem.device_free) as f64 / 1048576.0, "memory": mem,
        });
        println!("{}", serde_json::to_string(&line)?);
    } else {
        println!("decode {gen} tokens at depth {prompt}: {tg:.2} tok/s");
    }
    Ok(())
}

/// Deterministic pseudo-random token ids (an LCG per `seed`), avoiding the first 100 ids (often
/// special tokens).
fn random_tokens(seed: u64, n: usize, n_vocab: u32) -> Vec<u32> {
    let mut x: u64 = 0x9e3779b97f4a7c15 ^ seed.wrapping_mul(0xbf58476d1ce4e5b9);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (((x >> 33) as u32) % (n_vocab - n_vocab.min(100)).max(1)) + n_vocab.min(100)
        })
        .collect()
}

/// `stllm bench --concurrent N,...`: for each N, N requests of `prompt` random tokens submitted at
/// once to an engine, each decoding `gen` tokens. Reports the aggregate decode rate once every
/// request has its first token, the mean time to first token, and the device's peak use
/// (sampled every 20 ms while it runs).
fn bench_concurrent(
    m: &ModelArgs,
    ns: &[usize],
    prompt: usize,
    gen: usize,
    json: bool,
    through_policy: bool,
    sampling: &SamplingParams,
) -> Result<()> {
    use crate::engine::{Engine, EngineOptions, Event, GenerateRequest};
    if prompt == 0 || gen < 2 {
        bail!("--prompt must be at least 1 and --gen at least 2");
    }
    let opts = m.model_options(m.e.threads)?;
    let model = Arc::new(Model::load(&m.dir, &opts).with_context(|| format!("loading {}", m.dir.display()))?);
    let adapter_names = m.load_adapters(&model)?;
    let n_vocab = model.hparams().n_vocab as u32;
    for &n in ns {
        if n == 0 {
            bail!("--concurrent takes counts of at least 1");
        }
        let engine = Engine::new(
            model.clone(),
            EngineOptions {
                n_cells: n * (prompt + gen) + 64,
                max_seqs: n,
                n_batch: m.e.batch,
                prefix_cache: false,
                kv_type: m.e.kv_type()?,
                flash_attn: m.e.flash_attn()?,
                ..Default::default()
            },
        )?;
        let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        // Stopped and joined when this iteration ends, errors included: a thread still asking
        // the device for its memory while the process exits would call into a shut-down driver.
        let sampler = MemorySampler::start(&model, peak.clone());
        let t0 = Instant::now();
        let engine = Arc::new(engine);
        let (t0, times): (Instant, Vec<Vec<Instant>>) = if through_policy {
            policy_times(m, &engine, n, prompt, gen, n_vocab, &adapter_names, sampling)?
        } else {
            let gens = (0..n)
                .map(|i| {
                    let req = GenerateRequest {
                        stop_tokens: Some(vec![]),
                        // With --lora: request i uses adapter i mod (number of adapters).
                        adapters: adapter_names
                            .get(i % adapter_names.len().max(1))
                            .map(|(name, w)| vec![(name.clone(), *w)])
                            .unwrap_or_default(),
                        sampling: SamplingParams { seed: sampling.seed.wrapping_add(i as u64), ..sampling.clone() },
                        ..GenerateRequest::greedy(random_tokens(i as u64 + 1, prompt, n_vocab), gen)
                    };
                    engine.generate(req)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let handles: Vec<_> = gens
                .into_iter()
                .map(|g| {
                    std::thread::spawn(move || {
                        g.filter_map(|ev| matches!(ev, Event::Token(_)).then(Instant::now)).collect::<Vec<_>>()
                    })
                })
                .collect();
            let times: Vec<Vec<Instant>> = handles
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow::anyhow!("a reader thread panicked")))
                .collect::<Result<_>>()?;
            (t0, times)
        };
        let end = Instant::now();
        drop(sampler);
        if times.iter().any(|t| t.len() != gen) {
            bail!("a request ended early ({:?} tokens of {gen})", times.iter().map(Vec::len).collect::<Vec<_>>());
        }
        // Decode rate: tokens that arrived after every request had its first one.
        let all_first = times.iter().map(|t| t[0]).max().unwrap_or(t0);
        let after: usize = times.iter().map(|t| t.iter().filter(|&&x| x > all_first).count()).sum();
        let decode = after as f64 / (end - all_first).as_secs_f64().max(1e-9);
        let ttft_ms = times.iter().map(|t| (t[0] - t0).as_secs_f64() * 1e3).sum::<f64>() / n as f64;
        let st = engine.stats();
        let mem = st.memory.clone();
        let peak_mib =
            peak.load(std::sync::atomic::Ordering::Relaxed).max(mem.device_total - mem.device_free) as f64 / 1048576.0;
        if json {
            let out = serde_json::json!({
                "engine": "stllm", "bench": "concurrent", "through_policy": through_policy, "model": m.dir, "architecture": model.hparams().arch,
                "temperature": sampling.temperature, "top_k": sampling.top_k,
                "dtype": model.dtype.name(), "device": model.device_name(), "seqs": n, "concurrent": n, "prompt": prompt, "gen": gen,
                "decode_tok_s": decode, "mean_ttft_ms": ttft_ms, "steps": st.steps,
                "busy_ms": st.busy.as_secs_f64() * 1e3, "gather_wait_ms": st.gather_wait.as_secs_f64() * 1e3,
                "mean_turnaround_us": st.ext_turnaround.as_secs_f64() * 1e6 / st.ext_turnarounds.max(1) as f64,
                "vram_peak_mib": peak_mib, "memory": mem,
            });
            println!("{}", serde_json::to_string(&out)?);
        } else {
            println!(
                "{n} concurrent: decode {decode:.1} tok/s aggregate, mean TTFT {ttft_ms:.1} ms, {} steps ({:.0} ms computing, \
                 {:.0} ms waiting for guests), device peak {peak_mib:.0} MiB",
                st.steps,
                st.busy.as_secs_f64() * 1e3,
                st.gather_wait.as_secs_f64() * 1e3
            );
            if st.ext_turnarounds > 0 {
                println!(
                    "  guests' mean turnaround (reply to next decode): {:.0} µs over {}",
                    st.ext_turnaround.as_secs_f64() * 1e6 / st.ext_turnarounds as f64,
                    st.ext_turnarounds
                );
            }
        }
    }
    Ok(())
}

/// Samples the device memory in use every 20 ms into `peak` until dropped (then joined).
struct MemorySampler {
    done: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MemorySampler {
    fn start(model: &Arc<Model>, peak: Arc<std::sync::atomic::AtomicUsize>) -> MemorySampler {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (model, stop) = (model.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (free, total) = model.device_memory();
                peak.fetch_max(total.saturating_sub(free), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
        MemorySampler { done, thread: Some(thread) }
    }
}

impl Drop for MemorySampler {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `bench --concurrent --through-policy`: the requests run through the default policy component
/// on `engine` (token prompts, the bench's sampling, no stop), as `stllm serve` runs them; the arrival time of
/// every generated token and when the requests started. Instances are created (and their
/// tokenizers parsed) before that.
#[allow(clippy::too_many_arguments)]
fn policy_times(
    m: &ModelArgs,
    engine: &Arc<crate::engine::Engine>,
    n: usize,
    prompt: usize,
    gen: usize,
    n_vocab: u32,
    adapters: &[(String, f32)],
    sampling: &SamplingParams,
) -> Result<(Instant, Vec<Vec<Instant>>)> {
    use std::sync::Mutex;
    let handle = ModelHandle::from_dir(&m.dir, None)?.with_engine(engine.clone());
    let rt = Arc::new(Runtime::new(Arc::new(handle), RuntimeConfig { pool_size: n, ..RuntimeConfig::default() })?);
    let trt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // Every request gets a ready instance (created, its tokenizer parsed) before the clock starts.
    trt.block_on(rt.prewarm(n))?;
    let t0 = Instant::now();
    let times: Vec<Arc<Mutex<Vec<Instant>>>> = (0..n).map(|_| Arc::default()).collect();
    trt.block_on(async {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let rt = rt.clone();
                let t = times[i].clone();
                let req = crate::runtime::GenerateRequest {
                    prompt: Prompt::Tokens(random_tokens(i as u64 + 1, prompt, n_vocab)),
                    tools_json: None,
                    max_tokens: gen as u32,
                    stop: vec![],
                    ignore_eos: true,
                    sampling: crate::runtime::Sampling {
                        temperature: sampling.temperature,
                        top_k: sampling.top_k,
                        seed: sampling.seed.wrapping_add(i as u64),
                        ..crate::runtime::Sampling::default()
                    },
                    adapters: adapters
                        .get(i % adapters.len().max(1))
                        .map(|(name, w)| vec![crate::runtime::Adapter { name: name.clone(), weight: *w }]),
                    logprobs: None,
                    parse_tool_calls: false,
                };
                tokio::spawn(async move {
                    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    rt.generate(
                        &req,
                        move |_, toks| {
                            let now = Instant::now();
                            t.lock().unwrap_or_else(|p| p.into_inner()).extend(toks.iter().map(|_| now));
                            true
                        },
                        cancel,
                    )
                    .await
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        anyhow::Ok(())
    })?;
    Ok((t0, times.into_iter().map(|t| std::mem::take(&mut *t.lock().unwrap_or_else(|p| p.into_inner()))).collect()))
}

fn tokio_rt() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

fn runtime_tokenizer_only(dir: &std::path::Path, p: &PolicyArgs) -> Result<Runtime> {
    let handle = ModelHandle::from_dir(dir, None).with_context(|| format!("reading {}", dir.display()))?;
    if handle.tokenizer_json.is_none() {
        bail!("{}: no tokenizer.json", dir.display());
    }
    Ok(Runtime::new(Arc::new(handle), p.config()?)?)
}

/// A runtime over a loaded model; also says whether the model has a chat template.
fn runtime_with_model(m: &ModelArgs, p: &PolicyArgs) -> Result<(Runtime, bool)> {
    let s = open(m, 1)?;
    let model = s.model().clone();
    let n_cells = s.n_ctx();
    drop(s);
    let mut handle =
        ModelHandle::from_dir(&m.dir, Some(model)).with_context(|| format!("reading {}", m.dir.display()))?;
    if handle.tokenizer_json.is_none() {
        bail!("{}: no tokenizer.json (needed for text; `stllm generate` takes token ids)", m.dir.display());
    }
    // The guests' sequences share one engine; its cache holds --ctx-size cells.
    handle.engine_options.n_cells = n_cells;
    // --lora (loaded into the model by `open`): every sequence of the guests uses them.
    handle.engine_options.adapters = m.adapter_specs();
    handle.engine_options.kv_type = m.e.kv_type()?;
    handle.engine_options.n_batch = m.e.batch;
    handle.engine_options.flash_attn = m.e.flash_attn()?;
    let chat = handle
        .tokenizer_config_json
        .as_deref()
        .and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok())
        .is_some_and(|c| c.get("chat_template").is_some());
    Ok((Runtime::new(Arc::new(handle), p.config()?)?, chat))
}

fn messages_json(system: Option<&str>, turns: &[(&str, &str)]) -> String {
    let mut v = Vec::new();
    if let Some(s) = system {
        v.push(serde_json::json!({"role": "system", "content": s}));
    }
    for (role, content) in turns {
        v.push(serde_json::json!({"role": role, "content": content}));
    }
    serde_json::Value::Array(v).to_string()
}

/// Sampling from the flags, falling back to generation_config.json, then greedy.
fn sampling(rt: &Runtime, g: &GenArgs) -> crate::runtime::Sampling {
    let gc: serde_json::Value =
        rt.handle().generation_config_json.as_deref().and_then(|s| serde_json::from_str(s).ok()).unwrap_or_default();
    let f = |k: &str| gc.get(k).and_then(|v| v.as_f64()).map(|v| v as f32);
    let do_sample = gc.get("do_sample").and_then(|v| v.as_bool()).unwrap_or(false);
    let seed = g.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
    });
    crate::runtime::Sampling {
        temperature: g.temperature.unwrap_or(if do_sample { f("temperature").unwrap_or(1.0) } else { 0.0 }),
        top_k: g.top_k.unwrap_or(if do_sample { f("top_k").unwrap_or(0.0) as u32 } else { 0 }),
        top_p: g.top_p.unwrap_or(if do_sample { f("top_p").unwrap_or(1.0) } else { 1.0 }),
        min_p: g.min_p.unwrap_or(if do_sample { f("min_p").unwrap_or(0.0) } else { 0.0 }),
        repetition_penalty: g.repetition_penalty.unwrap_or(f("repetition_penalty").unwrap_or(1.0)),
        presence_penalty: g.presence_penalty,
        frequency_penalty: g.frequency_penalty,
        seed,
        logit_bias: vec![],
    }
}

/// A progress bar of `total` units on stderr, or `None` when not on a terminal or `--quiet`.
fn progress_bar(total: u64, what: &str) -> Option<indicatif::ProgressBar> {
    if !crate::progress::bars() {
        return None;
    }
    let b = indicatif::ProgressBar::new(total);
    b.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:40}} {{pos}}/{{len}} tokens {{per_sec}} eta {{eta}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(b)
}

/// Prompts longer than this show their prefill's progress (on a terminal).
const PREFILL_BAR_TOKENS: usize = 2048;

/// For a long prompt on a terminal: a bar that follows the engine's count of computed prompt
/// tokens until `first` is set (the first text came) or the returned guard is dropped.
async fn prefill_bar(rt: &Runtime, prompt: &Prompt, first: Arc<std::sync::atomic::AtomicBool>) -> Option<impl Drop> {
    if !crate::progress::bars() {
        return None;
    }
    let n = match prompt {
        Prompt::Tokens(t) => t.len(),
        Prompt::Text(s) => rt.tokenize(s, true).await.ok()?.len(),
        Prompt::Chat(m) => {
            let text = rt.apply_chat_template(m, true, None, None).await.ok()?;
            rt.tokenize(&text, false).await.ok()?.len()
        }
    };
    if n < PREFILL_BAR_TOKENS {
        return None;
    }
    let bar = progress_bar(n as u64, "prefill")?;
    let handle = rt.handle().clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    let thread = std::thread::spawn(move || {
        use std::sync::atomic::Ordering::Relaxed;
        // Guests drive their sequences themselves: their prompts count as caller-driven tokens.
        let count = |h: &ModelHandle| h.started_engine().map_or(0, |e| e.stats().ext_tokens_computed);
        let base = count(&handle);
        while !st.load(Relaxed) && !first.load(Relaxed) {
            bar.set_position(count(&handle).saturating_sub(base).min(n as u64));
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        bar.finish_and_clear();
    });
    struct Guard(Arc<std::sync::atomic::AtomicBool>, Option<std::thread::JoinHandle<()>>);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(t) = self.1.take() {
                let _ = t.join();
            }
        }
    }
    Some(Guard(stop, Some(thread)))
}

async fn run_one(rt: &Runtime, prompt: Prompt, g: &GenArgs, stream: bool) -> Result<crate::runtime::GenerateResult> {
    let first = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _bar = prefill_bar(rt, &prompt, first.clone()).await;
    let req = crate::runtime::GenerateRequest {
        prompt,
        tools_json: None,
        max_tokens: g.max_tokens,
        stop: g.stop.clone(),
        ignore_eos: g.ignore_eos,
        sampling: sampling(rt, g),
        adapters: None, // the engine's (--lora)
        logprobs: None,
        parse_tool_calls: false,
    };
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r = rt
        .generate(
            &req,
            move |text, _| {
                first.store(true, std::sync::atomic::Ordering::Relaxed);
                if stream {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    // A closed stdout (e.g. `| head`) cancels the request.
                    out.write_all(text.as_bytes()).is_ok() && out.flush().is_ok()
                } else {
                    true
                }
            },
            cancel,
        )
        .await?;
    Ok(r)
}

fn is_context_full(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<crate::runtime::RuntimeError>(),
        Some(crate::runtime::RuntimeError::Guest { kind: crate::runtime::GuestErrorKind::ContextFull, .. })
    )
}

fn chat(m: &ModelArgs, p: &PolicyArgs, g: &GenArgs, system: Option<&str>) -> Result<()> {
    use std::io::BufRead;
    let (rt, has_template) = runtime_with_model(m, p)?;
    if !has_template {
        bail!("{}: the model has no chat template (use `stllm run --raw`)", m.dir.display());
    }
    let trt = tokio_rt()?;
    let mut turns: Vec<(String, String)> = Vec::new();
    let stdin = std::io::stdin();
    eprint!("> ");
    for line in stdin.lock().lines() {
        let line = line?;
        let line = line.trim_end().to_string();
        if line == "/exit" {
            break;
        }
        if line.is_empty() {
            eprint!("> ");
            continue;
        }
        turns.push(("user".into(), line));
        // When the conversation no longer fits the context, the oldest turns are dropped (and
        // said so); a message that alone does not fit is refused, and the chat goes on.
        let r = loop {
            let refs: Vec<(&str, &str)> = turns.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
            let prompt = Prompt::Chat(messages_json(system, &refs));
            match trt.block_on(run_one(&rt, prompt, g, true)) {
                Err(e) if is_context_full(&e) && turns.len() > 1 => {
                    turns.drain(..2.min(turns.len() - 1));
                    eprintln!("[the conversation exceeds the context: the oldest turn was dropped]");
                }
                other => break other,
            }
        };
        let r = match r {
            Ok(r) => r,
            Err(e) if is_context_full(&e) => {
                turns.pop();
                eprintln!("[this message does not fit the context ({e:#}); try a shorter one]");
                eprint!("> ");
                continue;
            }
            Err(e) => return Err(e),
        };
        println!();
        if r.finish == crate::runtime::FinishReason::Length {
            eprintln!("[reply cut at the length limit]");
        }
        turns.push(("assistant".into(), r.text));
        eprint!("> ");
    }
    Ok(())
}
