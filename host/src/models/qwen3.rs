//! Qwen3: Llama's layout with RMSNorm over each head of q and k before RoPE (`q_norm`, `k_norm`),
//! an explicit `head_dim` that need not equal hidden / heads, optional `attention_bias`, and the
//! Qwen2 sliding-window switches.

use crate::graph::attention::AttnOptions;
use crate::graph::decoder::{DecoderConfig, DenseDecoder};
use crate::loader::{LoadError, ModelDir, WeightBuilder};
use crate::models::Architecture;

pub fn load(dir: &ModelDir, w: &mut WeightBuilder) -> Result<Box<dyn Architecture>, LoadError> {
    let mut cfg = DecoderConfig::parse(dir)?;
    let (opts, sliding) = attention(&mut cfg);
    Ok(Box::new(DenseDecoder::load("qwen3", dir, w, &cfg, opts, sliding)?))
}

/// Qwen3's attention settings (shared with Qwen3-MoE): q/k norm, `attention_bias`, and the
/// sliding window only with `use_sliding_window`, from `max_window_layers` on.
pub fn attention(cfg: &mut DecoderConfig) -> (AttnOptions, Vec<bool>) {
    if !cfg.use_sliding_window.unwrap_or(false) {
        cfg.sliding_window = None;
    }
    let from = cfg.max_window_layers.unwrap_or(cfg.num_hidden_layers);
    let sliding = cfg.sliding_layers(|il| il >= from);
    let bias = cfg.attention_bias.unwrap_or(false);
    (AttnOptions { qkv_bias: bias, o_bias: bias, qk_norm: true, sinks: false }, sliding)
}
