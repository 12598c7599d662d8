//! Nemotron-H (`nemotron_h`, e.g. NVIDIA Nemotron 3 Nano): a hybrid stack where each layer is
//! `x + mixer(RMSNorm(x))` and the mixer is one of
//! - Mamba-2 (`graph::mamba`, recurrent state per sequence),
//! - attention without positional encoding (GQA, no biases; the KV cache holds only these layers),
//! - a sigmoid-routed MoE of non-gated ReLU² experts with a correction bias for the choice
//!   (group-limited when `n_group` > 1: only the best `topk_group` groups), top-k, normalised
//!   weights times `routed_scaling_factor`, plus a shared ReLU² expert,
//! - a dense ReLU² MLP.
//!
//! Both config spellings load: the published one (`hybrid_override_pattern` like "M-M*-E…" with
//! M = Mamba-2, E = MoE, * = attention, - = MLP, and `mamba_*`/`n_routed_experts` keys) and
//! transformers 5's (`layers_block_type` with "linear_attention" / "moe" / "full_attention" /
//! "mlp", `num_local_experts`, `Infinity` written as `{"__float__": "Infinity"}`).
//!
//! Not applied: HF clamps dt to at least `time_step_min` during prefill (not during decode);
//! ggml's scan takes softplus(dt + dt_bias) unclamped. Values below the floor need
//! dt + dt_bias < -6.9.

use serde_json::Value;

use crate::ggml::Tensor;
use crate::graph::attention::{Attention, AttnDims, AttnOptions};
use crate::graph::mamba::{Mamba2, MambaDims};
use crate::graph::moe::{Moe, MoeOptions, SigmoidMoeWeights};
use crate::graph::{norm, Forward};
use crate::loader::{LoadError, ModelDir, WeightBuilder};
use crate::memory::recurrent::RecurrentShape;
use crate::models::{Architecture, HParams};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Mamba,
    Attention,
    Moe,
    Mlp,
}

enum Mixer {
    Mamba(Box<Mamba2>, usize),
    Attention(Box<Attention>, usize),
    Moe(Box<Moe>),
    Mlp { up: Tensor, down: Tensor },
}

struct Layer {
    norm: Tensor,
    mixer: Mixer,
}

pub struct NemotronH {
    hp: HParams,
    embeddings: Tensor,
    norm_f: Tensor,
    lm_head: Tensor,
    layers: Vec<Layer>,
    eps: f32,
    kv_layers: Vec<usize>,
    recurrent: RecurrentShape,
}

/// config.json read with the alternative key names of both spellings.
struct Cfg<'a> {
    v: &'a Value,
    dir: &'a ModelDir,
}

impl Cfg<'_> {
    fn err(&self, field: &str, msg: String) -> LoadError {
        LoadError::InvalidConfig { file: self.dir.config_path.clone(), field: field.into(), msg }
    }

    fn get(&self, keys: &[&str]) -> Option<&Value> {
        keys.iter().find_map(|k| self.v.get(*k).filter(|x| !x.is_null()))
    }

    fn usize(&self, keys: &[&str], default: Option<usize>) -> Result<usize, LoadError> {
        // Every count of these configs (sizes, heads, experts, groups, state dims) is far below
        // this; anything above is refused before it sizes an allocation.
        const MAX: u64 = 1 << 24;
        match self.get(keys) {
            Some(x) => match x.as_u64() {
                Some(n) if n <= MAX => Ok(n as usize),
                Some(n) => Err(self.err(keys[0], format!("{n} is beyond the supported maximum of {MAX}"))),
                None => Err(self.err(keys[0], format!("expected a count, got {x}"))),
            },
            None => default.ok_or_else(|| self.err(keys[0], "missing".into())),
        }
    }

    fn pos(&self, keys: &[&str], default: Option<usize>) -> Result<usize, LoadError> {
        let n = self.usize(keys, default)?;
        if n == 0 {
            return Err(self.err(keys[0], "must be positive".into()));
        }
        Ok(n)
    }

    fn f64(&self, keys: &[&str], default: f64) -> Result<f64, LoadError> {
        match self.get(keys) {
            Some(x) => x.as_f64().ok_or_else(|| self.err(keys[0], format!("expected a number, got {x}"))),
            None => Ok(default),
        }
    }

    fn bool(&self, keys: &[&str], default: bool) -> bool {
        self.get(keys).and_then(Value::as_bool).unwrap_or(default)
    }

    fn str(&self, keys: &[&str]) -> Option<&str> {
        self.get(keys).and_then(Value::as_str)
    }

    /// Layer kinds from `layers_block_type` / `layer_types` (names) or `hybrid_override_pattern`.
    fn kinds(&self) -> Result<Vec<Kind>, LoadError> {
        if let Some(list) = self.get(&["layers_block_type", "layer_types"]) {
            let arr = list.as_array().ok_or_else(|| self.err("layers_block_type", "expected a list".into()))?;
            return arr
                .iter()
                .map(|t| match t.as_str() {
                    Some("linear_attention" | "mamba" | "mamba2") => Ok(Kind::Mamba),
                    Some("full_attention" | "attention") => Ok(Kind::Attention),
                    Some("moe") => Ok(Kind::Moe),
                    Some("mlp") => Ok(Kind::Mlp),
                    _ => Err(self.err("layers_block_type", format!("unknown layer type {t}"))),
                })
                .collect();
        }
        let Some(p) = self.str(&["hybrid_override_pattern"]) else {
            return Err(self.err("hybrid_override_pattern", "neither it nor layers_block_type is set".into()));
        };
        p.chars()
            .map(|ch| match ch {
                'M' => Ok(Kind::Mamba),
                '*' => Ok(Kind::Attention),
                'E' => Ok(Kind::Moe),
                '-' => Ok(Kind::Mlp),
                _ => {
                    Err(self
                        .err("hybrid_override_pattern", format!("unknown layer letter {ch:?} in {p:?} (M, *, E, -)")))
                }
            })
            .collect()
    }
}

pub fn load(dir: &ModelDir, w: &mut WeightBuilder) -> Result<Box<dyn Architecture>, LoadError> {
    let c = Cfg { v: &dir.config, dir };
    let kinds = c.kinds()?;
    if kinds.is_empty() {
        return Err(c.err("layers_block_type", "no layers".into()));
    }
    if kinds.len() > crate::graph::decoder::MAX_LAYERS {
        return Err(c.err(
            "layers_block_type",
            format!("{} layers are beyond the supported maximum of {}", kinds.len(), crate::graph::decoder::MAX_LAYERS),
        ));
    }
    if let Some(n) = c.get(&["num_hidden_layers"]).and_then(Value::as_u64) {
        if n as usize != kinds.len() && c.get(&["layers_block_type", "layer_types"]).is_none() {
            return Err(
                c.err("hybrid_override_pattern", format!("has {} layers, num_hidden_layers says {n}", kinds.len()))
            );
        }
    }
    let n_embd = c.pos(&["hidden_size"], None)?;
    let n_vocab = c.pos(&["vocab_size"], None)?;
    let eps = c.f64(&["layer_norm_epsilon", "rms_norm_eps"], 1e-5)? as f32;
    for (keys, want) in [(&["mlp_hidden_act"][..], "relu2"), (&["mamba_hidden_act"][..], "silu")] {
        if let Some(act) = c.str(keys) {
            if act != want {
                return Err(c.err(keys[0], format!("{act:?} is not supported (only {want})")));
            }
        }
    }
    if c.get(&["moe_latent_size"]).is_some() {
        return Err(c.err("moe_latent_size", "latent MoE projections are not supported".into()));
    }
    if c.bool(&["mlp_bias"], false) || c.bool(&["attention_bias"], false) {
        return Err(c.err("mlp_bias", "MLP / attention biases are not supported".into()));
    }
    let n_head = c.pos(&["num_attention_heads"], None)?;
    let n_head_kv = c.pos(&["num_key_value_heads"], Some(n_head))?;
    let head_dim = c.pos(&["head_dim"], Some(n_embd / n_head))?;
    if !n_head.is_multiple_of(n_head_kv) {
        return Err(c.err("num_key_value_heads", format!("{n_head_kv} must divide {n_head}")));
    }
    let mdims = MambaDims {
        n_embd,
        n_head: c.pos(&["mamba_num_heads"], None)?,
        head_dim: c.pos(&["mamba_head_dim"], None)?,
        n_group: c.pos(&["n_groups", "mamba_n_groups"], Some(1))?,
        d_state: c.pos(&["ssm_state_size", "mamba_d_state"], None)?,
        d_conv: c.pos(&["conv_kernel", "mamba_d_conv"], Some(4))?,
    };
    if !mdims.n_head.is_multiple_of(mdims.n_group) || mdims.d_conv < 2 {
        return Err(c.err(
            "n_groups",
            format!("{} groups must divide {} Mamba heads, conv kernel ≥ 2", mdims.n_group, mdims.n_head),
        ));
    }
    let n_ff = c.usize(&["intermediate_size"], Some(0))?;
    let has_moe = kinds.contains(&Kind::Moe);
    let mut groups = None;
    let moe = if has_moe {
        let n_expert = c.pos(&["n_routed_experts", "num_local_experts", "num_experts"], None)?;
        let n_used = c.pos(&["num_experts_per_tok"], None)?;
        if n_used > n_expert {
            return Err(c.err("num_experts_per_tok", format!("{n_used} exceeds the {n_expert} experts")));
        }
        let (n_group, topk_group) = (c.pos(&["n_group"], Some(1))?, c.pos(&["topk_group"], Some(1))?);
        if !n_expert.is_multiple_of(n_group) || topk_group > n_group || (n_group > 1 && n_expert / n_group < 2) {
            return Err(c.err(
                "n_group",
                format!(
                    "{n_expert} experts in {n_group} groups (at least 2 each), best {topk_group}: not a valid grouping"
                ),
            ));
        }
        groups = Some((n_group, topk_group));
        Some(MoeOptions {
            n_expert,
            n_used,
            n_ff: c.pos(&["moe_intermediate_size"], None)?,
            norm_topk: c.bool(&["norm_topk_prob"], true),
            scale: c.f64(&["routed_scaling_factor"], 1.0)? as f32,
        })
    } else {
        None
    };
    // HF builds the shared expert from its size alone (`n_shared_experts` is not read).
    let shared_ff = c.usize(&["moe_shared_expert_intermediate_size"], Some(0))?;

    let embeddings = w.get("backbone.embeddings.weight", &[n_vocab, n_embd])?;
    let tied = c.bool(&["tie_word_embeddings"], false);
    let lm_head = if tied {
        w.ignore("lm_head.weight");
        embeddings
    } else {
        w.get("lm_head.weight", &[n_vocab, n_embd])?
    };
    let norm_f = w.get("backbone.norm_f.weight", &[n_embd])?;
    let adims = AttnDims { n_embd, n_head, n_head_kv, head_dim };
    let mut layers = Vec::with_capacity(kinds.len());
    let (mut kv_layers, mut rs_layers) = (Vec::new(), Vec::new());
    for (il, kind) in kinds.iter().enumerate() {
        let p = format!("backbone.layers.{il}.mixer");
        let mixer = match kind {
            Kind::Mamba => {
                rs_layers.push(il);
                Mixer::Mamba(Box::new(Mamba2::load(w, &p, mdims, eps)?), rs_layers.len() - 1)
            }
            Kind::Attention => {
                kv_layers.push(il);
                let a = Attention::load(w, &p, adims, AttnOptions::default(), eps)?;
                Mixer::Attention(Box::new(a), kv_layers.len() - 1)
            }
            Kind::Moe => {
                let o = moe.expect("MoE options parsed when a MoE layer exists");
                Mixer::Moe(Box::new(load_moe(w, &p, n_embd, o, shared_ff, groups)?))
            }
            Kind::Mlp => {
                if n_ff == 0 {
                    return Err(c.err("intermediate_size", "an MLP layer needs intermediate_size > 0".into()));
                }
                Mixer::Mlp {
                    up: w.get(&format!("{p}.up_proj.weight"), &[n_ff, n_embd])?,
                    down: w.get(&format!("{p}.down_proj.weight"), &[n_embd, n_ff])?,
                }
            }
        };
        layers.push(Layer { norm: w.get(&format!("backbone.layers.{il}.norm.weight"), &[n_embd])?, mixer });
    }
    let hp = HParams {
        arch: "nemotron_h".into(),
        n_vocab,
        n_embd,
        n_layer: kinds.len(),
        n_head,
        n_head_kv,
        head_dim,
        n_ff: n_ff.max(moe.map_or(0, |o| o.n_ff * o.n_used)),
        n_ctx_train: c.usize(&["max_position_embeddings"], Some(4096))?,
        sliding_window: None,
        tied_embeddings: tied,
    };
    let recurrent = RecurrentShape { layers: rs_layers, conv_row: mdims.conv_row(), ssm_row: mdims.ssm_row() };
    Ok(Box::new(NemotronH { hp, embeddings, norm_f, lm_head, layers, eps, kv_layers, recurrent }))
}

/// The MoE mixer in the per-expert layout (`experts.E.up_proj/down_proj.weight`) or the fused one
/// (`experts.up_proj` [E, ff, n_embd], `experts.down_proj` [E, n_embd, ff]).
fn load_moe(
    w: &mut WeightBuilder,
    p: &str,
    n_embd: usize,
    o: MoeOptions,
    shared_ff: usize,
    groups: Option<(usize, usize)>,
) -> Result<Moe, LoadError> {
    let (e, ff) = (o.n_expert, o.n_ff);
    let router = w.get(&format!("{p}.gate.weight"), &[e, n_embd])?;
    let bias = w.get_opt(&format!("{p}.gate.e_score_correction_bias"), &[e])?;
    let (up, down) = if w.has(&format!("{p}.experts.up_proj")) {
        (
            w.get(&format!("{p}.experts.up_proj"), &[e, ff, n_embd])?,
            w.get(&format!("{p}.experts.down_proj"), &[e, n_embd, ff])?,
        )
    } else {
        let names = |part: &str| -> Vec<String> { (0..e).map(|i| format!("{p}.experts.{i}.{part}.weight")).collect() };
        (w.get_stacked(&names("up_proj"), [ff, n_embd])?, w.get_stacked(&names("down_proj"), [n_embd, ff])?)
    };
    let shared = match shared_ff {
        0 => None,
        sff => Some((
            w.get(&format!("{p}.shared_experts.up_proj.weight"), &[sff, n_embd])?,
            w.get(&format!("{p}.shared_experts.down_proj.weight"), &[n_embd, sff])?,
        )),
    };
    Ok(Moe::sigmoid(SigmoidMoeWeights { router, bias, up, down, shared, groups }, o))
}

impl Architecture for NemotronH {
    fn hparams(&self) -> &HParams {
        &self.hp
    }

    fn kv_layers(&self) -> Vec<usize> {
        self.kv_layers.clone()
    }

    fn recurrent(&self) -> Option<RecurrentShape> {
        Some(self.recurrent.clone())
    }

    fn build(&self, f: &mut Forward) -> Tensor {
        let mut x = f.ctx.get_rows(self.embeddings, f.inp.tokens);
        f.tap(x);
        for l in &self.layers {
            let h = norm::rms(f, x, l.norm, self.eps);
            let h = match &l.mixer {
                Mixer::Mamba(m, ir) => m.forward(f, *ir, h),
                Mixer::Attention(a, ikv) => a.forward(f, *ikv, h, None, false),
                Mixer::Moe(m) => m.forward(f, h),
                Mixer::Mlp { up, down } => f.mm(*down, f.ctx.sqr(f.ctx.relu(f.mm(*up, h)))),
            };
            x = f.ctx.add(x, h);
            f.tap(x);
        }
        let x = f.ctx.get_rows(x, f.inp.out_ids);
        let x = norm::rms(f, x, self.norm_f, self.eps);
        if f.embeddings {
            return x;
        }
        f.mm(self.lm_head, x)
    }
}
