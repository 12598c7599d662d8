//! Qwen2 / Qwen2.5: Llama's layout with biases on q/k/v (not o). The sliding window applies only
//! when `use_sliding_window` is true, to layers from `max_window_layers` on (or per `layer_types`).

use crate::graph::attention::AttnOptions;
use crate::graph::decoder::{DecoderConfig, DenseDecoder};
use crate::loader::{LoadError, ModelDir, WeightBuilder};
use crate::models::Architecture;

pub fn load(dir: &ModelDir, w: &mut WeightBuilder) -> Result<Box<dyn Architecture>, LoadError> {
    let mut cfg = DecoderConfig::parse(dir)?;
    if !cfg.use_sliding_window.unwrap_or(false) {
        cfg.sliding_window = None;
    }
    let from = cfg.max_window_layers.unwrap_or(cfg.num_hidden_layers);
    let sliding = cfg.sliding_layers(|il| il >= from);
    let opts = AttnOptions { qkv_bias: true, o_bias: false, qk_norm: false, sinks: false };
    Ok(Box::new(DenseDecoder::load("qwen2", dir, w, &cfg, opts, sliding)?))
}
