//! Qwen3-MoE: Qwen3's attention (q/k RMSNorm, optional bias and sliding window) with sparse MoE
//! layers: `mlp.gate` routes each token to `num_experts_per_tok` of `num_experts` SwiGLU experts
//! (`mlp.experts.E.gate_proj/up_proj/down_proj`, width `moe_intermediate_size`); softmax over all
//! experts, top-k, renormalised when `norm_topk_prob`. Layers in `mlp_only_layers`, or off the
//! `decoder_sparse_step` grid, keep a dense MLP of width `intermediate_size`.

use serde::Deserialize;

use crate::graph::decoder::{DecoderConfig, DenseDecoder};
use crate::graph::ffn::{Ffn, SwigluMlp};
use crate::graph::moe::{Moe, MoeConfig, MoeOptions, QWEN};
use crate::loader::{LoadError, ModelDir, WeightBuilder};
use crate::models::Architecture;

#[derive(Debug, Deserialize)]
struct Qwen3MoeConfig {
    #[serde(flatten)]
    moe: MoeConfig,
    moe_intermediate_size: usize,
    #[serde(default)]
    norm_topk_prob: bool,
    #[serde(default = "one")]
    decoder_sparse_step: usize,
    #[serde(default)]
    mlp_only_layers: Vec<usize>,
}

fn one() -> usize {
    1
}

pub fn load(dir: &ModelDir, w: &mut WeightBuilder) -> Result<Box<dyn Architecture>, LoadError> {
    let mut cfg = DecoderConfig::parse(dir)?;
    let q: Qwen3MoeConfig = MoeConfig::parse_full(dir)?;
    let (opts, sliding) = crate::models::qwen3::attention(&mut cfg);
    if q.moe_intermediate_size == 0 || q.decoder_sparse_step == 0 {
        return Err(LoadError::InvalidConfig {
            file: dir.config_path.clone(),
            field: "moe_intermediate_size / decoder_sparse_step".into(),
            msg: "must be positive".into(),
        });
    }
    let o = MoeOptions {
        n_expert: q.moe.n_expert(dir)?,
        n_used: q.moe.n_used(dir)?,
        n_ff: q.moe_intermediate_size,
        norm_topk: q.norm_topk_prob,
        scale: 1.0,
    };
    let (n_embd, n_ff_dense) = (cfg.hidden_size, cfg.intermediate_size);
    let sparse = |il: usize| !q.mlp_only_layers.contains(&il) && (il + 1).is_multiple_of(q.decoder_sparse_step);
    let d = DenseDecoder::load_with_ffn("qwen3_moe", dir, w, &cfg, opts, sliding, |w, il| {
        let p = format!("model.layers.{il}.mlp");
        Ok(if sparse(il) {
            Ffn::Moe(Moe::load(w, &[&p], QWEN, n_embd, o)?)
        } else {
            Ffn::Dense(SwigluMlp::load(w, &p, n_embd, n_ff_dense)?)
        })
    })?;
    Ok(Box::new(d))
}
