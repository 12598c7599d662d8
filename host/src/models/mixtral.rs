//! Mixtral: Mistral's attention (optional sliding window on every layer) with a sparse MoE in
//! every layer: `block_sparse_moe.gate` routes each token to `num_experts_per_tok` of
//! `num_local_experts` SwiGLU experts (`experts.E.w1` gate, `w3` up, `w2` down, width
//! `intermediate_size`); softmax over all experts, top-k, always renormalised. The fused layout of
//! transformers 5 (`mlp.experts.gate_up_proj` / `down_proj`) loads too.

use serde::Deserialize;

use crate::graph::attention::AttnOptions;
use crate::graph::decoder::{DecoderConfig, DenseDecoder};
use crate::graph::ffn::Ffn;
use crate::graph::moe::{Moe, MoeConfig, MoeOptions, MIXTRAL};
use crate::loader::{LoadError, ModelDir, WeightBuilder};
use crate::models::Architecture;

#[derive(Debug, Deserialize)]
struct MixtralConfig {
    #[serde(flatten)]
    moe: MoeConfig,
}

pub fn load(dir: &ModelDir, w: &mut WeightBuilder) -> Result<Box<dyn Architecture>, LoadError> {
    let cfg = DecoderConfig::parse(dir)?;
    let moe = MoeConfig::parse::<MixtralConfig>(dir, |c| &c.moe)?;
    let sliding = cfg.sliding_layers(|_| true);
    let o = MoeOptions {
        n_expert: moe.n_expert(dir)?,
        n_used: moe.n_used(dir)?,
        n_ff: cfg.intermediate_size,
        norm_topk: true,
        scale: 1.0,
    };
    let n_embd = cfg.hidden_size;
    let d = DenseDecoder::load_with_ffn("mixtral", dir, w, &cfg, AttnOptions::default(), sliding, |w, il| {
        Ok(Ffn::Moe({
            let (a, b) = (format!("model.layers.{il}.block_sparse_moe"), format!("model.layers.{il}.mlp"));
            Moe::load(w, &[&a, &b], MIXTRAL, n_embd, o)?
        }))
    })?;
    Ok(Box::new(d))
}
