//! A loaded model: the architecture's graph builder, its weights in a backend buffer, and the
//! backend that computes on them.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::ggml::{self, Backend, DType};
use crate::loader::{LoadError, ModelDir, WeightBuilder, Weights};
use crate::models::{self, Architecture, HParams};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// CPU threads (default: all cores)
    pub threads: usize,
    /// Where weights, KV cache and compute go: `cpu` (default), `cuda[:N]`, `gpu[:N]` or a ggml
    /// device name; GPU devices need their backend module loaded first ([`ggml::load_backend`])
    pub device: Option<String>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions { threads: ggml::default_threads(), device: None }
    }
}

pub struct Model {
    pub(crate) arch: Box<dyn Architecture>,
    weights: Weights,
    pub dir: PathBuf,
    /// dtype holding most of the weight bytes
    pub dtype: DType,
    pub config: serde_json::Value,
    pub generation_config: Option<serde_json::Value>,
    /// Serialises graph computations on the shared backend.
    pub(crate) compute_lock: Mutex<()>,
    // Declared last: freed after the weights that live on it.
    pub(crate) backend: Backend,
    /// The CPU backend, when `backend` is a device (the scheduler's fallback)
    pub(crate) cpu: Option<Backend>,
}

impl Model {
    /// Load and validate a HuggingFace model folder.
    pub fn load(dir: &Path, opts: &ModelOptions) -> Result<Model, LoadError> {
        let md = ModelDir::open(dir)?;
        let (name, loader) = models::resolve(&md)?;
        let mut wb = WeightBuilder::new(&md, name)?;
        let arch = loader(&md, &mut wb)?;
        // The CPU backend always exists: the scheduler runs what a device cannot on it.
        let cpu = Backend::cpu(opts.threads)?;
        let (backend, cpu) = match opts.device.as_deref() {
            None | Some("cpu") | Some("CPU") => (cpu, None),
            Some(spec) => (Backend::device(spec)?, Some(cpu)),
        };
        let weights = wb.finish(&backend)?;
        let dtype = match md.main_dtype() {
            crate::loader::safetensors::StDtype::F16 => DType::F16,
            crate::loader::safetensors::StDtype::BF16 => DType::BF16,
            _ => DType::F32,
        };
        tracing::info!(arch = name, dir = %dir.display(), backend = %backend.name(), threads = backend.n_threads(), "model loaded");
        Ok(Model {
            arch,
            weights,
            dir: dir.to_path_buf(),
            dtype,
            config: md.config,
            generation_config: md.generation_config,
            compute_lock: Mutex::new(()),
            backend,
            cpu,
        })
    }

    pub fn hparams(&self) -> &HParams {
        self.arch.hparams()
    }

    /// Number of parameters stored in the files.
    pub fn n_params(&self) -> u64 {
        self.weights.n_params
    }

    /// Bytes of backend memory the weights take.
    pub fn weight_bytes(&self) -> usize {
        self.weights.buffer.size()
    }

    pub fn threads(&self) -> usize {
        self.cpu.as_ref().unwrap_or(&self.backend).n_threads()
    }

    /// Free and total bytes of the device holding the weights.
    pub fn device_memory(&self) -> (usize, usize) {
        self.backend.memory()
    }

    /// The backend holding the weights ("CPU", "CUDA0", ...).
    pub fn device_name(&self) -> String {
        self.backend.name()
    }

    /// Backends for a scheduler: the model's device first, the CPU last.
    pub(crate) fn sched_backends(&self) -> Vec<&Backend> {
        std::iter::once(&self.backend).chain(self.cpu.as_ref()).collect()
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
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => vec![],
    }
}
