//! gpt-oss (OpenAI's open-weight MoE, HF `gpt_oss`): Llama's layer stack with q/k/v/o biases,
//! learned per-head attention sinks, a sliding window on alternate layers (`layer_types`; by
//! default the even ones), YaRN RoPE (with `truncate: false` honoured), and a MoE of
//! `num_local_experts` biased experts per layer: router logits with a bias, the top
//! `num_experts_per_tok` of them, a softmax over just those; experts with gpt-oss's clamped
//! SwiGLU (`swiglu_alpha`, `swiglu_limit`) whose fused `gate_up_proj` alternates gate and up
//! columns. Experts load from the files' BF16/F32 (`gate_up_proj`, x·W orientation: transposed and
//! de-interleaved at load) or, as the Hub publishes them, from MXFP4 `*_blocks`/`*_scales`, which
//! stay MXFP4 (repacked into ggml's block layout, never dequantized; docs/design/gpt-oss.md).

use serde::Deserialize;

use crate::graph::attention::AttnOptions;
use crate::graph::decoder::{DecoderConfig, DenseDecoder};
use crate::graph::ffn::Ffn;
use crate::graph::moe::{Moe, MoeConfig, MoeOptions};
use crate::loader::{LoadError, ModelDir, WeightBuilder};
use crate::models::Architecture;

#[derive(Debug, Deserialize)]
struct GptOssConfig {
    #[serde(flatten)]
    moe: MoeConfig,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    swiglu_limit: Option<f64>,
    #[serde(default)]
    swiglu_alpha: Option<f64>,
}

pub fn load(dir: &ModelDir, w: &mut WeightBuilder) -> Result<Box<dyn Architecture>, LoadError> {
    let cfg = DecoderConfig::parse(dir)?;
    let g: GptOssConfig = MoeConfig::parse_full(dir)?;
    let bad =
        |field: &str, msg: String| LoadError::InvalidConfig { file: dir.config_path.clone(), field: field.into(), msg };
    let limit = g.swiglu_limit.unwrap_or(7.0);
    let alpha = g.swiglu_alpha.unwrap_or(1.702);
    for (k, v) in [("swiglu_limit", limit), ("swiglu_alpha", alpha)] {
        if !(v.is_finite() && v > 0.0) {
            return Err(bad(k, format!("must be a positive number, got {v}")));
        }
    }
    // transformers' GptOssConfig: attention biases unless told otherwise; without layer_types,
    // the even layers slide.
    let bias = g.attention_bias.unwrap_or(true);
    let opts = AttnOptions { qkv_bias: bias, o_bias: bias, qk_norm: false, sinks: true };
    let sliding = cfg.sliding_layers(|il| il % 2 == 0);
    let o = MoeOptions {
        n_expert: g.moe.n_expert(dir)?,
        n_used: g.moe.n_used(dir)?,
        n_ff: cfg.intermediate_size,
        norm_topk: false,
        scale: 1.0,
    };
    let n_embd = cfg.hidden_size;
    let d = DenseDecoder::load_with_ffn("gpt_oss", dir, w, &cfg, opts, sliding, |w, il| {
        Ok(Ffn::Moe(Moe::load_oai(w, &format!("model.layers.{il}.mlp"), n_embd, o, alpha as f32, limit as f32)?))
    })?;
    Ok(Box::new(d))
}
