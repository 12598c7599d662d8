//! A loaded model: the architecture's graph builder, its weights in a backend buffer, and the
//! backend that computes on them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::ggml::{self, Backend, DType};
use crate::loader::{LoadError, ModelDir, WeightBuilder, Weights};
use crate::models::{self, Architecture, HParams};
use crate::placement::Placement;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// CPU threads (default: all cores)
    pub threads: usize,
    /// Where weights, KV cache and compute go: `cpu` (default), `cuda[:N]`, `gpu[:N]` or a ggml
    /// device name; GPU devices need their backend module loaded first ([`ggml::load_backend`]).
    /// Several (comma-separated, or in `devices`) split the layers among them.
    pub device: Option<String>,
    /// Devices to split the layers over, in order (pipeline parallelism); overrides `device`
    pub devices: Vec<String>,
    /// How many of the last layers go to the devices (llama.cpp's `-ngl`): `None` = all, and
    /// the output head too; `n_layer` = every layer but the head; fewer keep the first layers on
    /// the CPU
    pub gpu_layers: Option<usize>,
    /// Relative share of layers per device (default: each device's free memory)
    pub split: Vec<f64>,
    /// Quantize the large matrices at load (Q8_0, Q4_0 or Q4_K); embeddings, routers and norms
    /// stay as stored
    pub quantize: Option<DType>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            threads: ggml::default_threads(),
            device: None,
            devices: vec![],
            gpu_layers: None,
            split: vec![],
            quantize: None,
        }
    }
}

impl ModelOptions {
    /// The device specs asked for, CPU-only as an empty list.
    fn device_specs(&self) -> Vec<String> {
        let list: Vec<String> = if self.devices.is_empty() {
            self.device.iter().flat_map(|d| d.split(',')).map(|d| d.trim().to_string()).collect()
        } else {
            self.devices.clone()
        };
        if list.len() == 1 && list[0].eq_ignore_ascii_case("cpu") {
            return vec![];
        }
        list.into_iter().filter(|d| !d.is_empty()).collect()
    }
}

pub struct Model {
    pub(crate) arch: Box<dyn Architecture>,
    pub(crate) weights: Weights,
    pub dir: PathBuf,
    /// dtype holding most of the weight bytes
    pub dtype: DType,
    pub config: serde_json::Value,
    pub generation_config: Option<serde_json::Value>,
    /// Serialises graph computations on the shared backends.
    pub(crate) compute_lock: Mutex<()>,
    /// Which backend holds each layer, the embedding and the head
    pub placement: Placement,
    /// LoRA adapters loaded for this model (their buffers are on the backends below)
    lora: crate::lora::LoraRegistry,
    /// Unique over the process: what an adapter loaded for this model is tied to
    uid: u64,
    // Declared last: freed after the weights that live on them. The devices in split order,
    // then the CPU (always there: the scheduler runs what a device cannot on it).
    pub(crate) backends: Vec<Backend>,
}

impl Model {
    /// Load and validate a HuggingFace model folder.
    pub fn load(dir: &Path, opts: &ModelOptions) -> Result<Model, LoadError> {
        let md = ModelDir::open(dir)?;
        let (name, loader) = models::resolve(&md)?;
        let mut wb = WeightBuilder::new(&md, name)?;
        wb.set_quantize(opts.quantize);
        let arch = loader(&md, &mut wb)?;
        let specs = opts.device_specs();
        let mut backends = Vec::with_capacity(specs.len() + 1);
        for spec in &specs {
            // A CPU named among devices is a CPU backend of its own (tests split layers over two).
            backends.push(if spec.eq_ignore_ascii_case("cpu") {
                Backend::cpu(opts.threads)?
            } else {
                Backend::device(spec)?
            });
        }
        // The CPU backend always exists: the scheduler runs what a device cannot on it.
        backends.push(Backend::cpu(opts.threads)?);
        let n_layer = arch.hparams().n_layer;
        let placement = if specs.is_empty() {
            Placement::single(n_layer)
        } else {
            let split = if opts.split.is_empty() {
                backends[..specs.len()].iter().map(|b| b.memory().0 as f64).collect()
            } else {
                opts.split.clone()
            };
            Placement::plan(n_layer, specs.len(), opts.gpu_layers, &split)
        };
        let refs: Vec<&Backend> = backends.iter().collect();
        let weights = wb.finish(&refs, &placement)?;
        let counts = placement.counts();
        for (b, n) in backends.iter().zip(&counts) {
            tracing::info!(backend = %b.name(), layers = n, "placement");
        }
        let dtype = match md.main_dtype() {
            crate::loader::safetensors::StDtype::F16 => DType::F16,
            crate::loader::safetensors::StDtype::BF16 => DType::BF16,
            _ => DType::F32,
        };
        let main = &backends[placement.output];
        tracing::info!(arch = name, dir = %dir.display(), backend = %main.name(), threads = opts.threads, "model loaded");
        Ok(Model {
            arch,
            weights,
            dir: dir.to_path_buf(),
            dtype,
            config: md.config,
            generation_config: md.generation_config,
            compute_lock: Mutex::new(()),
            placement,
            backends,
            lora: Default::default(),
            uid: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
        })
    }

    /// Unique over the process (adapters loaded for this model carry it).
    pub fn uid(&self) -> u64 {
        self.uid
    }

    /// Whether any of the model's backends is a device (a GPU), not only CPUs: the one answer
    /// to "is this on a GPU?" (graph padding, LoRA rank padding).
    pub fn on_device(&self) -> bool {
        self.backends.iter().any(|b| !b.is_cpu())
    }

    /// The LoRA adapters loaded for this model.
    pub fn adapters(&self) -> &crate::lora::LoraRegistry {
        &self.lora
    }

    /// Load (or replace) LoRA adapter `name` from a PEFT folder.
    pub fn load_adapter(
        &self,
        name: &str,
        dir: &Path,
    ) -> Result<Arc<crate::lora::LoraAdapter>, crate::lora::LoraError> {
        self.lora.load(self, name, dir)
    }

    /// The current version of adapter `name` (read again first if its files changed on disk).
    pub fn adapter(&self, name: &str) -> Result<Arc<crate::lora::LoraAdapter>, crate::lora::LoraError> {
        self.lora.get(self, name)
    }

    pub fn hparams(&self) -> &HParams {
        self.arch.hparams()
    }

    /// Number of parameters stored in the files.
    pub fn n_params(&self) -> u64 {
        self.weights.n_params
    }

    /// Bytes of backend memory the weights take (all backends).
    pub fn weight_bytes(&self) -> usize {
        self.weights.per_backend.iter().sum()
    }

    /// Bytes of weights on each backend (indexed like [`Model::backend_names`]).
    pub fn weight_bytes_per_backend(&self) -> &[usize] {
        &self.weights.per_backend
    }

    pub fn threads(&self) -> usize {
        self.cpu().n_threads()
    }

    /// The CPU backend (the last).
    pub(crate) fn cpu(&self) -> &Backend {
        self.backends.last().expect("the CPU backend is always there")
    }

    /// The backend holding the output head: the model's "device".
    pub(crate) fn main_backend(&self) -> &Backend {
        &self.backends[self.placement.output]
    }

    /// Free and total bytes of the device holding the output head.
    pub fn device_memory(&self) -> (usize, usize) {
        self.main_backend().memory()
    }

    /// The backend holding the output head ("CPU", "CUDA0", ...).
    pub fn device_name(&self) -> String {
        self.main_backend().name()
    }

    /// Every backend's name: the devices in split order, then the CPU.
    pub fn backend_names(&self) -> Vec<String> {
        self.backends.iter().map(Backend::name).collect()
    }

    /// Each backend's name with its free and total memory.
    pub fn backend_memory(&self) -> Vec<(String, (usize, usize))> {
        self.backends.iter().map(|b| (b.name(), b.memory())).collect()
    }

    /// Backends for a scheduler: the devices first, the CPU last.
    pub(crate) fn sched_backends(&self) -> Vec<&Backend> {
        self.backends.iter().collect()
    }

    /// A fingerprint of the model: its config, weight dtype and parameter count (FNV-1a), so a
    /// prompt cache made for another model is refused.
    pub fn fingerprint(&self) -> String {
        let mut h: u64 = 0xcbf29ce484222325;
        let text = format!("{}|{}|{}|{}", self.config, self.dtype.name(), self.n_params(), self.weight_bytes());
        for b in text.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        format!("{}-{h:016x}", self.hparams().arch)
    }

    /// End-of-sequence token ids (generation_config.json, else config.json).
    pub fn eos_tokens(&self) -> Vec<u32> {
        let from_gen = self.generation_config.as_ref().map(eos_token_ids).unwrap_or_default();
        if from_gen.is_empty() {
            eos_token_ids(&self.config)
        } else {
            from_gen
        }
    }
}

/// `eos_token_id` of a config object, written as one id or a list of ids.
pub fn eos_token_ids(config: &serde_json::Value) -> Vec<u32> {
    match config.get("eos_token_id") {
        // An id beyond u32 is no token (never truncated into one).
        Some(serde_json::Value::Number(n)) => n.as_u64().and_then(|x| u32::try_from(x).ok()).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => {
            a.iter().filter_map(|x| x.as_u64()).filter_map(|x| u32::try_from(x).ok()).collect()
        }
        _ => vec![],
    }
}
