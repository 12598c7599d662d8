//! Model architectures, one file per HF `model_type`, and the registry that picks one from
//! `config.json`.

pub mod gpt_oss;
pub mod llama;
pub mod mistral;
pub mod mixtral;
pub mod nemotron_h;
pub mod qwen2;
pub mod qwen3;
pub mod qwen3_moe;

use crate::ggml::Tensor;
use crate::graph::Forward;
use crate::loader::{LoadError, ModelDir, WeightBuilder};

/// Sizes every architecture reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HParams {
    pub arch: String,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_ctx_train: usize,
    /// Window of the sliding-window layers, if any layer has one
    pub sliding_window: Option<usize>,
    pub tied_embeddings: bool,
}

impl HParams {
    pub fn n_embd_kv(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}

/// A loaded architecture: builds the graph of one forward step.
pub trait Architecture: Send + Sync {
    fn hparams(&self) -> &HParams;

    /// Build the step's graph and return the logits `[n_vocab, n_out]` (or, when
    /// `f.embeddings`, the final normalised hidden states `[n_embd, n_out]`).
    fn build(&self, f: &mut Forward) -> Tensor;

    /// The layers with a KV cache, in cache order (default: all).
    fn kv_layers(&self) -> Vec<usize> {
        (0..self.hparams().n_layer).collect()
    }

    /// The recurrent (Mamba) layers and their state sizes, for hybrid models.
    fn recurrent(&self) -> Option<crate::memory::recurrent::RecurrentShape> {
        None
    }
}

type Loader = fn(&ModelDir, &mut WeightBuilder) -> Result<Box<dyn Architecture>, LoadError>;

/// `model_type` -> loader. The `architectures` list of config.json is the fallback key.
const REGISTRY: &[(&str, &str, Loader)] = &[
    ("llama", "LlamaForCausalLM", llama::load),
    ("mistral", "MistralForCausalLM", mistral::load),
    ("qwen2", "Qwen2ForCausalLM", qwen2::load),
    ("qwen3", "Qwen3ForCausalLM", qwen3::load),
    ("mixtral", "MixtralForCausalLM", mixtral::load),
    ("qwen3_moe", "Qwen3MoeForCausalLM", qwen3_moe::load),
    ("nemotron_h", "NemotronHForCausalLM", nemotron_h::load),
    ("gpt_oss", "GptOssForCausalLM", gpt_oss::load),
];

pub fn supported() -> String {
    REGISTRY.iter().map(|(m, _, _)| *m).collect::<Vec<_>>().join(", ")
}

/// Find the architecture of a model folder (by `model_type`, else by `architectures[0]`).
pub fn resolve(dir: &ModelDir) -> Result<(&'static str, Loader), LoadError> {
    let model_type = dir.config.get("model_type").and_then(|v| v.as_str());
    let archs: Vec<&str> = dir
        .config
        .get("architectures")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    for (mt, class, load) in REGISTRY {
        if model_type == Some(*mt) || (model_type.is_none() && archs.contains(class)) {
            return Ok((mt, *load));
        }
    }
    Err(LoadError::UnknownArchitecture {
        name: model_type
            .map(str::to_string)
            .or_else(|| archs.first().map(|s| s.to_string()))
            .unwrap_or_else(|| "<no model_type>".into()),
        file: dir.config_path.clone(),
        supported: supported(),
    })
}
