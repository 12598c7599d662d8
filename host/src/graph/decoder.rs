//! The dense decoder-only transformer shared by the Llama family (Llama, Mistral, Qwen2, Qwen3):
//! embeddings, N x (RMSNorm, attention, residual, RMSNorm, SwiGLU MLP, residual), final RMSNorm,
//! LM head. Model files read their config, pick the [`AttnOptions`] and sliding-window layers, and
//! hand over to [`DenseDecoder`].

use serde::Deserialize;

use super::attention::{Attention, AttnDims, AttnOptions};
use super::ffn::{Ffn, SwigluMlp};
use super::rope::{Rope, RopeConfig};
use super::{norm, Forward};
use crate::ggml::Tensor;
use crate::loader::{LoadError, ModelDir, WeightBuilder};
use crate::models::{Architecture, HParams};

/// The config fields the Llama family shares, with HF's names.
#[derive(Debug, Clone, Deserialize)]
pub struct DecoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// transformers 5: "full_attention" / "sliding_attention" per layer
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
}

/// Most decoder layers a config may declare.
pub const MAX_LAYERS: usize = 4096;

fn default_eps() -> f64 {
    1e-6
}

impl DecoderConfig {
    pub fn parse(dir: &ModelDir) -> Result<DecoderConfig, LoadError> {
        let cfg: DecoderConfig =
            serde_path_to_error::deserialize(&dir.config).map_err(|e| LoadError::InvalidConfig {
                file: dir.config_path.clone(),
                field: e.path().to_string(),
                msg: e.inner().to_string(),
            })?;
        cfg.validate(dir)?;
        Ok(cfg)
    }

    fn validate(&self, dir: &ModelDir) -> Result<(), LoadError> {
        let bad = |field: &str, msg: String| {
            Err(LoadError::InvalidConfig { file: dir.config_path.clone(), field: field.into(), msg })
        };
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
        ] {
            if v == 0 {
                return bad(name, "must be positive".into());
            }
        }
        // Upper bounds before anything is sized from these (far beyond any published model;
        // a layer count of 10^12 would otherwise be an allocation abort).
        for (name, v, max) in [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("hidden_size", self.hidden_size, 1 << 17),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, 1 << 12),
            ("num_key_value_heads", self.n_head_kv(), 1 << 12),
            ("head_dim", self.head_dim.unwrap_or(0), 1 << 12),
            ("max_position_embeddings", self.max_position_embeddings.unwrap_or(0), 1 << 30),
            ("sliding_window", self.sliding_window.unwrap_or(0), 1 << 30),
            ("max_window_layers", self.max_window_layers.unwrap_or(0), MAX_LAYERS),
        ] {
            if v > max {
                return bad(name, format!("{v} is beyond the supported maximum of {max}"));
            }
        }
        let nkv = self.n_head_kv();
        if nkv == 0 || !self.num_attention_heads.is_multiple_of(nkv) {
            return bad(
                "num_key_value_heads",
                format!("{nkv} must divide num_attention_heads ({})", self.num_attention_heads),
            );
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(
                "hidden_size",
                format!("{} is not divisible by num_attention_heads ({})", self.hidden_size, self.num_attention_heads),
            );
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return bad("head_dim", format!("must be positive and even, got {}", self.head_dim()));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad("rms_norm_eps", format!("must be a positive number, got {}", self.rms_norm_eps));
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" && act != "swish" {
                return bad("hidden_act", format!("{act:?} is not supported (supported: silu)"));
            }
        }
        if self.mlp_bias == Some(true) {
            return bad("mlp_bias", "MLP biases are not supported".into());
        }
        if let Some(lt) = &self.layer_types {
            if lt.len() != self.num_hidden_layers {
                return bad("layer_types", format!("has {} entries for {} layers", lt.len(), self.num_hidden_layers));
            }
            if let Some(t) = lt.iter().find(|t| *t != "full_attention" && *t != "sliding_attention") {
                return bad("layer_types", format!("unknown layer type {t:?}"));
            }
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window", "must be positive".into());
        }
        Ok(())
    }

    pub fn n_head_kv(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Which layers use the sliding window: `layer_types` when the config has it, else `fallback`.
    pub fn sliding_layers(&self, fallback: impl Fn(usize) -> bool) -> Vec<bool> {
        match (&self.layer_types, self.sliding_window) {
            (_, None) => vec![false; self.num_hidden_layers],
            (Some(lt), Some(_)) => lt.iter().map(|t| t == "sliding_attention").collect(),
            (None, Some(_)) => (0..self.num_hidden_layers).map(fallback).collect(),
        }
    }
}

struct DenseLayer {
    input_layernorm: Tensor,
    attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Ffn,
    sliding: bool,
}

/// A loaded Llama-family decoder.
pub struct DenseDecoder {
    hp: HParams,
    embed_tokens: Tensor,
    norm: Tensor,
    lm_head: Tensor,
    layers: Vec<DenseLayer>,
    rope: Rope,
    eps: f32,
}

impl DenseDecoder {
    /// Declare and check the weights (`model.*`, `lm_head.weight`), with a dense SwiGLU MLP
    /// (`model.layers.N.mlp`) in every layer.
    pub fn load(
        arch: &str,
        dir: &ModelDir,
        w: &mut WeightBuilder,
        cfg: &DecoderConfig,
        opts: AttnOptions,
        sliding: Vec<bool>,
    ) -> Result<DenseDecoder, LoadError> {
        let (n_embd, n_ff) = (cfg.hidden_size, cfg.intermediate_size);
        Self::load_with_ffn(arch, dir, w, cfg, opts, sliding, |w, il| {
            Ok(Ffn::Dense(SwigluMlp::load(w, &format!("model.layers.{il}.mlp"), n_embd, n_ff)?))
        })
    }

    /// As [`DenseDecoder::load`], with each layer's feed-forward block loaded by `ffn(w, il)`
    /// (MoE models).
    pub fn load_with_ffn(
        arch: &str,
        dir: &ModelDir,
        w: &mut WeightBuilder,
        cfg: &DecoderConfig,
        opts: AttnOptions,
        sliding: Vec<bool>,
        ffn: impl Fn(&mut WeightBuilder, usize) -> Result<Ffn, LoadError>,
    ) -> Result<DenseDecoder, LoadError> {
        let (n_embd, n_vocab) = (cfg.hidden_size, cfg.vocab_size);
        let dims =
            AttnDims { n_embd, n_head: cfg.num_attention_heads, n_head_kv: cfg.n_head_kv(), head_dim: cfg.head_dim() };
        let n_ctx_train = cfg.max_position_embeddings.unwrap_or(4096);
        let rope = RopeConfig::from_hf(&dir.config, dims.head_dim, n_ctx_train, &dir.config_path)?.build(w)?;
        let eps = cfg.rms_norm_eps as f32;
        let embed_tokens = w.get("model.embed_tokens.weight", &[n_vocab, n_embd])?;
        // transformers' default for these families is untied; a tied model may still ship a copy
        // of the embeddings as lm_head.weight, which HF ignores, so do we.
        let tied = cfg.tie_word_embeddings.unwrap_or(false);
        let lm_head = if tied {
            w.ignore("lm_head.weight");
            embed_tokens
        } else {
            w.get("lm_head.weight", &[n_vocab, n_embd])?
        };
        let norm = w.get("model.norm.weight", &[n_embd])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for (il, sliding) in sliding.iter().copied().enumerate() {
            let p = format!("model.layers.{il}");
            layers.push(DenseLayer {
                input_layernorm: w.get(&format!("{p}.input_layernorm.weight"), &[n_embd])?,
                attn: Attention::load(w, &format!("{p}.self_attn"), dims, opts, eps)?,
                post_attention_layernorm: w.get(&format!("{p}.post_attention_layernorm.weight"), &[n_embd])?,
                mlp: ffn(w, il)?,
                sliding,
            });
        }
        let hp = HParams {
            arch: arch.to_string(),
            n_vocab,
            n_embd,
            n_layer: cfg.num_hidden_layers,
            n_head: dims.n_head,
            n_head_kv: dims.n_head_kv,
            head_dim: dims.head_dim,
            n_ff: cfg.intermediate_size,
            n_ctx_train,
            sliding_window: if sliding.iter().any(|&s| s) { cfg.sliding_window } else { None },
            tied_embeddings: tied,
        };
        Ok(DenseDecoder { hp, embed_tokens, norm, lm_head, layers, rope, eps })
    }
}

impl Architecture for DenseDecoder {
    fn hparams(&self) -> &HParams {
        &self.hp
    }

    fn build(&self, f: &mut Forward) -> Tensor {
        let mut x = f.ctx.get_rows(self.embed_tokens, f.inp.tokens);
        f.tap(x);
        let last = self.layers.len() - 1;
        for (il, l) in self.layers.iter().enumerate() {
            let h = norm::rms(f, x, l.input_layernorm, self.eps);
            let mut h = l.attn.forward(f, il, h, Some(&self.rope), l.sliding);
            if il == last {
                // Only the rows whose logits were asked for go through the last FFN and the head.
                h = f.ctx.get_rows(h, f.inp.out_ids);
                x = f.ctx.get_rows(x, f.inp.out_ids);
            }
            x = f.ctx.add(x, h);
            let h = norm::rms(f, x, l.post_attention_layernorm, self.eps);
            let h = l.mlp.forward(f, h);
            x = f.ctx.add(x, h);
            f.tap(x);
        }
        let x = norm::rms(f, x, self.norm, self.eps);
        if f.embeddings {
            return x;
        }
        f.mm(self.lm_head, x)
    }
}
