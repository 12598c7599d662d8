//! Mistral: Llama's layout plus a sliding attention window on every layer when `sliding_window`
//! is set (v0.1; later versions set it to null), and an explicit `head_dim` (Nemo).

use crate::graph::attention::AttnOptions;
use crate::graph::decoder::{DecoderConfig, DenseDecoder};
use crate::loader::{LoadError, ModelDir, WeightBuilder};
use crate::models::Architecture;

pub fn load(dir: &ModelDir, w: &mut WeightBuilder) -> Result<Box<dyn Architecture>, LoadError> {
    let cfg = DecoderConfig::parse(dir)?;
    let sliding = cfg.sliding_layers(|_| true);
    Ok(Box::new(DenseDecoder::load("mistral", dir, w, &cfg, AttnOptions::default(), sliding)?))
}
