//! Llama (1, 2, 3.x): the reference dense decoder. RoPE scaling `linear` or `llama3` in either
//! config spelling; `attention_bias` adds biases to q/k/v/o; optional tied embeddings.

use crate::graph::attention::AttnOptions;
use crate::graph::decoder::{DecoderConfig, DenseDecoder};
use crate::loader::{LoadError, ModelDir, WeightBuilder};
use crate::models::Architecture;

pub fn load(dir: &ModelDir, w: &mut WeightBuilder) -> Result<Box<dyn Architecture>, LoadError> {
    let cfg = DecoderConfig::parse(dir)?;
    let bias = cfg.attention_bias.unwrap_or(false);
    let opts = AttnOptions { qkv_bias: bias, o_bias: bias, qk_norm: false, sinks: false };
    // Llama has no sliding window.
    let sliding = vec![false; cfg.num_hidden_layers];
    Ok(Box::new(DenseDecoder::load("llama", dir, w, &cfg, opts, sliding)?))
}
