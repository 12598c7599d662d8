//! Qwen3: Llama's layout with RMSNorm over each head of q and k before RoPE (`q_norm`, `k_norm`),
//! an explicit `head_dim` that need not equal hidden / heads, optional `attention_bias`, and the
//! Qwen2 sliding-window switches.

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
    let bias = cfg.attention_bias.unwrap_or(false);
    let opts = AttnOptions { qkv_bias: bias, o_bias: bias, qk_norm: true };
    Ok(Box::new(DenseDecoder::load("qwen3", dir, w, &cfg, opts, sliding)?))
}
