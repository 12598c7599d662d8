//! Mixture-of-experts feed-forward: a router picks `n_used` of `n_expert` SwiGLU experts per
//! token and mixes their outputs. The experts of a layer are stacked into 3-D tensors at load time
//! and run with `mul_mat_id` (each token's rows go through its chosen experts only).
//!
//! Routing follows HF: router logits in F32, softmax over all experts, top-k of the
//! probabilities (largest first), optionally renormalised to sum to 1 over the chosen ones
//! (Mixtral always; Qwen3-MoE when `norm_topk_prob`), times `scale`.

use serde::Deserialize;

use super::Forward;
use crate::ggml::{Context, DType, Tensor};
use crate::loader::{LoadError, ModelDir, WeightBuilder};

/// Most experts a MoE layer may have (published models have up to a few hundred).
pub const MAX_EXPERTS: usize = 1 << 14;

/// The expert-count keys MoE configs share. The Hub's Qwen3-MoE configs say `num_experts`,
/// Mixtral's and transformers 5's `num_local_experts`; either is accepted.
#[derive(Debug, Clone, Deserialize)]
pub struct MoeConfig {
    #[serde(default)]
    pub num_experts: Option<usize>,
    #[serde(default)]
    pub num_local_experts: Option<usize>,
    #[serde(default)]
    pub num_experts_per_tok: Option<usize>,
}

impl MoeConfig {
    fn invalid(dir: &ModelDir, field: &str, msg: String) -> LoadError {
        LoadError::InvalidConfig { file: dir.config_path.clone(), field: field.into(), msg }
    }

    /// Parse an architecture's config struct (which flattens a `MoeConfig`) from config.json.
    pub fn parse_full<T: for<'de> Deserialize<'de>>(dir: &ModelDir) -> Result<T, LoadError> {
        serde_path_to_error::deserialize(&dir.config)
            .map_err(|e| Self::invalid(dir, &e.path().to_string(), e.inner().to_string()))
    }

    /// Parse `T` and hand back its `MoeConfig`.
    pub fn parse<T: for<'de> Deserialize<'de>>(
        dir: &ModelDir,
        get: impl Fn(&T) -> &MoeConfig,
    ) -> Result<MoeConfig, LoadError> {
        let t: T = Self::parse_full(dir)?;
        Ok(get(&t).clone())
    }

    pub fn n_expert(&self, dir: &ModelDir) -> Result<usize, LoadError> {
        match self.num_experts.or(self.num_local_experts) {
            Some(n) if n > MAX_EXPERTS => {
                Err(Self::invalid(dir, "num_experts", format!("{n} is beyond the supported maximum of {MAX_EXPERTS}")))
            }
            Some(n) if n > 0 => Ok(n),
            _ => Err(Self::invalid(
                dir,
                "num_experts",
                "a MoE model needs num_experts (or num_local_experts) > 0".into(),
            )),
        }
    }

    /// Experts per token: positive and at most the expert count.
    pub fn n_used(&self, dir: &ModelDir) -> Result<usize, LoadError> {
        let n = self.n_expert(dir)?;
        match self.num_experts_per_tok {
            Some(k) if k > 0 && k <= n => Ok(k),
            other => Err(Self::invalid(
                dir,
                "num_experts_per_tok",
                format!("must be between 1 and the {n} experts, got {other:?}"),
            )),
        }
    }
}

/// Expert weight names of one checkpoint family (`{prefix}.experts.{e}.{gate}.weight`, ...).
#[derive(Debug, Clone, Copy)]
pub struct ExpertNames {
    /// The router, relative to the block prefix (`gate`)
    pub router: &'static str,
    pub gate: &'static str,
    pub up: &'static str,
    pub down: &'static str,
}

/// Mixtral: `block_sparse_moe.{gate, experts.E.w1/w3/w2}`.
pub const MIXTRAL: ExpertNames = ExpertNames { router: "gate", gate: "w1", up: "w3", down: "w2" };
/// Qwen3-MoE (and Qwen2-MoE): `mlp.{gate, experts.E.gate_proj/up_proj/down_proj}`.
pub const QWEN: ExpertNames = ExpertNames { router: "gate", gate: "gate_proj", up: "up_proj", down: "down_proj" };

/// One MoE block's weights and routing settings.
pub struct Moe {
    /// [n_embd, n_expert] (ggml order): router logits = router · x
    router: Tensor,
    /// [n_embd, n_ff, n_expert]; `None`: non-gated experts `down(relu(up x)²)` (Nemotron-H)
    gate: Option<Tensor>,
    up: Tensor,
    /// [n_ff, n_embd, n_expert]
    down: Tensor,
    n_used: usize,
    norm_topk: bool,
    scale: f32,
    /// Sigmoid scores instead of a softmax, with a bias added for the choice only (DeepSeek-V3
    /// style "correction bias"; the weights are the unbiased scores)
    sigmoid: Option<Option<Tensor>>,
    /// A shared expert every token goes through: (up, down), ReLU² (Nemotron-H)
    shared: Option<(Tensor, Tensor)>,
    /// Group-limited choice (DeepSeek-V3 style): experts in `n_group` equal groups, a group's
    /// score the sum of its best two, only the best `topk_group` groups eligible
    groups: Option<(usize, usize)>,
    /// gpt-oss: a router bias, top-k of the logits then a softmax over those k, biased experts
    /// with the clamped SwiGLU
    oai: Option<OaiParts>,
}

/// What gpt-oss's MoE adds (F32 biases, ggml order `[n, n_expert]`).
struct OaiParts {
    router_bias: Tensor,
    gate_bias: Tensor,
    up_bias: Tensor,
    down_bias: Tensor,
    alpha: f32,
    limit: f32,
}

/// Nemotron-H's MoE weights (`{prefix}.gate.weight`, `gate.e_score_correction_bias`,
/// `experts.E.up_proj/down_proj`, `shared_experts.up_proj/down_proj`).
pub struct SigmoidMoeWeights {
    pub router: Tensor,
    pub bias: Option<Tensor>,
    pub up: Tensor,
    pub down: Tensor,
    pub shared: Option<(Tensor, Tensor)>,
    /// `(n_group, topk_group)` when the choice is group-limited
    pub groups: Option<(usize, usize)>,
}

/// How a MoE block routes.
#[derive(Debug, Clone, Copy)]
pub struct MoeOptions {
    pub n_expert: usize,
    /// Experts per token
    pub n_used: usize,
    /// Expert hidden size
    pub n_ff: usize,
    /// Renormalise the chosen experts' weights to sum to 1
    pub norm_topk: bool,
    /// Multiply the mixed output (routed scaling factor; 1 for Mixtral and Qwen3-MoE)
    pub scale: f32,
}

impl Moe {
    /// Load a MoE block at the first of `prefixes` the files have, in either layout: the Hub's
    /// per-expert tensors (`{prefix}.{router}.weight`, `{prefix}.experts.E.{gate,up,down}.weight`,
    /// stacked here) or transformers 5's fused ones (`{prefix}.gate.weight`,
    /// `{prefix}.experts.gate_up_proj` [E, 2·n_ff, n_embd] with the gate rows first, and
    /// `{prefix}.experts.down_proj` [E, n_embd, n_ff]).
    pub fn load(
        w: &mut WeightBuilder,
        prefixes: &[&str],
        names: ExpertNames,
        n_embd: usize,
        o: MoeOptions,
    ) -> Result<Moe, LoadError> {
        let (e, ff) = (o.n_expert, o.n_ff);
        for prefix in prefixes {
            let fused = format!("{prefix}.experts.gate_up_proj");
            if w.has(&fused) {
                let router = w.get(&format!("{prefix}.gate.weight"), &[e, n_embd])?;
                let parts = w.get_split_rows(&fused, [e, 2 * ff, n_embd], &[(0, ff), (ff, ff)])?.expect("present");
                let down = w.get(&format!("{prefix}.experts.down_proj"), &[e, n_embd, ff])?;
                return Ok(Moe::new(router, parts[0], parts[1], down, o));
            }
        }
        let prefix = prefixes.iter().find(|p| w.has(&format!("{p}.{}.weight", names.router))).unwrap_or(&prefixes[0]);
        let router = w.get(&format!("{prefix}.{}.weight", names.router), &[e, n_embd])?;
        let expert =
            |part: &str| -> Vec<String> { (0..e).map(|i| format!("{prefix}.experts.{i}.{part}.weight")).collect() };
        let gate = w.get_stacked(&expert(names.gate), [ff, n_embd])?;
        let up = w.get_stacked(&expert(names.up), [ff, n_embd])?;
        let down = w.get_stacked(&expert(names.down), [n_embd, ff])?;
        Ok(Moe::new(router, gate, up, down, o))
    }

    fn new(router: Tensor, gate: Tensor, up: Tensor, down: Tensor, o: MoeOptions) -> Moe {
        Moe {
            router,
            gate: Some(gate),
            up,
            down,
            n_used: o.n_used,
            norm_topk: o.norm_topk,
            scale: o.scale,
            sigmoid: None,
            shared: None,
            groups: None,
            oai: None,
        }
    }

    /// A sigmoid-routed block of non-gated ReLU² experts with an optional shared expert.
    pub fn sigmoid(w: SigmoidMoeWeights, o: MoeOptions) -> Moe {
        Moe {
            router: w.router,
            gate: None,
            up: w.up,
            down: w.down,
            n_used: o.n_used,
            norm_topk: o.norm_topk,
            scale: o.scale,
            sigmoid: Some(w.bias),
            shared: w.shared,
            groups: w.groups.filter(|&(g, k)| g > 1 && k < g),
            oai: None,
        }
    }

    /// gpt-oss's MoE block at `{prefix}` (`router.weight/bias`; `experts.gate_up_proj` [E, n_embd,
    /// 2·n_ff] in x·W orientation with gate and up columns alternating, `experts.down_proj` [E,
    /// n_ff, n_embd], and their `_bias` vectors): the experts are transposed and de-interleaved
    /// at load into `mul_mat_id`'s layout. `alpha` and `limit` are the clamped SwiGLU's.
    pub fn load_oai(
        w: &mut WeightBuilder,
        prefix: &str,
        n_embd: usize,
        o: MoeOptions,
        alpha: f32,
        limit: f32,
    ) -> Result<Moe, LoadError> {
        let (e, ff) = (o.n_expert, o.n_ff);
        // F16 for a BF16 router: its logits decide and weight the experts (see get_f16_for_bf16).
        let router = w.get_f16_for_bf16(&format!("{prefix}.router.weight"), &[e, n_embd])?;
        let router_bias = w.get(&format!("{prefix}.router.bias"), &[e])?;
        let p = |name: &str| format!("{prefix}.experts.{name}");
        let (gu, down) = if w.has(&p("gate_up_proj_blocks")) {
            // The Hub's MXFP4 form: output rows (gate and up alternating), loaded as stored.
            let groups = |n: usize, what: &str| -> Result<usize, LoadError> {
                if n.is_multiple_of(32) {
                    Ok(n / 32)
                } else {
                    Err(LoadError::InvalidConfig {
                        file: std::path::PathBuf::from(prefix),
                        field: what.into(),
                        msg: format!("MXFP4 experts need rows of whole 32-value blocks, got {n}"),
                    })
                }
            };
            let (gh, gf) = (groups(n_embd, "hidden_size")?, groups(ff, "intermediate_size")?);
            let gu =
                w.get_mxfp4(&p("gate_up_proj_blocks"), &p("gate_up_proj_scales"), [e, 2 * ff, gh], &[(0, 2), (1, 2)])?;
            let down = w.get_mxfp4(&p("down_proj_blocks"), &p("down_proj_scales"), [e, n_embd, gf], &[(0, 1)])?;
            (gu, down)
        } else {
            let gu = w.get_transposed(&p("gate_up_proj"), [e, n_embd, 2 * ff], &[(0, 2), (1, 2)])?;
            let down = w.get_transposed(&p("down_proj"), [e, ff, n_embd], &[(0, 1)])?;
            (gu, down)
        };
        let gub = w.read_f32(&format!("{prefix}.experts.gate_up_proj_bias"), &[e, 2 * ff])?;
        let every_other = |from: usize| -> Vec<f32> { gub.iter().skip(from).step_by(2).copied().collect() };
        let ne = [ff as i64, e as i64];
        let gate_bias = w.derived(&format!("{prefix}.experts.gate_bias"), &ne, every_other(0))?;
        let up_bias = w.derived(&format!("{prefix}.experts.up_bias"), &ne, every_other(1))?;
        let db = w.read_f32(&format!("{prefix}.experts.down_proj_bias"), &[e, n_embd])?;
        let down_bias = w.derived(&format!("{prefix}.experts.down_bias"), &[n_embd as i64, e as i64], db)?;
        let mut m = Moe::new(router, gu[0], gu[1], down[0], MoeOptions { norm_topk: false, scale: 1.0, ..o });
        m.oai = Some(OaiParts { router_bias, gate_bias, up_bias, down_bias, alpha, limit });
        Ok(m)
    }

    /// gpt-oss: the k largest (biased) logits, a softmax over just those, biased experts with the
    /// clamped SwiGLU, the down bias weighted along with the expert's output.
    fn forward_oai(&self, f: &mut Forward, x: Tensor, logits: Tensor, oai: &OaiParts) -> Tensor {
        let c = f.ctx;
        let [n_embd, n_tokens, ..] = x.ne();
        let (k, n_expert) = (self.n_used as i64, logits.ne()[0]);
        let chosen = c.argsort_top_k(logits, k as i32); // I32 [k, n_tokens]
        let top = c.get_rows(c.reshape_3d(logits, 1, n_expert, n_tokens), chosen); // [1, k, n_tokens]
        let weights = c.reshape_3d(c.soft_max_ext(c.reshape_2d(top, k, n_tokens), None, 1.0), 1, k, n_tokens);
        // Routing first, in one run of nodes: llama.cpp's order, fused by ggml-cuda.
        f.graph.expand(weights);
        let x3 = c.reshape_3d(x, n_embd, 1, n_tokens);
        let gate = self.gate.expect("gpt-oss experts are gated");
        let g = c.add_id(mul_mat_id(f, gate, x3, chosen), oai.gate_bias, chosen); // [n_ff, k, n_tokens]
        let u = c.add_id(mul_mat_id(f, self.up, x3, chosen), oai.up_bias, chosen);
        let h = c.swiglu_oai(g, u, oai.alpha, oai.limit);
        let y = c.add_id(mul_mat_id(f, self.down, h, chosen), oai.down_bias, chosen); // [n_embd, k, n_tokens]
        sum_slots(f, c.mul(y, weights))
    }

    /// `x` [n_embd, n_tokens] -> [n_embd, n_tokens].
    ///
    /// The routing is built op for op as llama.cpp's `build_moe_ffn` builds it (gating, a
    /// reshape, the selection bias, top-k, the weights gathered from the unbiased scores, the
    /// renormalisation through a clamped sum, the scale) and put in the graph before the experts,
    /// so ggml-cuda recognises the sequence and runs it as one fused top-k kernel; the weighted
    /// sum over the k slots likewise matches its fused reduction (see [`sum_slots`]).
    pub fn forward(&self, f: &mut Forward, x: Tensor) -> Tensor {
        let c = f.ctx;
        let [n_embd, n_tokens, ..] = x.ne();
        let k = self.n_used as i64;
        let logits = c.mul_mat(self.router, x); // [n_expert, n_tokens]
        c.set_prec_f32(logits);
        if let Some(oai) = &self.oai {
            let logits = c.add(logits, oai.router_bias);
            return self.forward_oai(f, x, logits, oai);
        }
        let groups = self.groups.map(|(g, k)| (g as i64, k as i32));
        let (chosen, weights) = route(c, logits, self.sigmoid, groups, k, self.norm_topk, self.scale);
        // Routing first in the graph, in one run of nodes (see above).
        f.graph.expand(weights);
        let x3 = c.reshape_3d(x, n_embd, 1, n_tokens);
        let u = mul_mat_id(f, self.up, x3, chosen); // [n_ff, k, n_tokens]
        let h = match self.gate {
            Some(gate) => c.swiglu_split(mul_mat_id(f, gate, x3, chosen), u),
            None => c.sqr(c.relu(u)),
        };
        let y = mul_mat_id(f, self.down, h, chosen); // [n_embd, k, n_tokens]
        let mut out = sum_slots(f, c.mul(y, weights));
        if let Some((up, down)) = self.shared {
            out = c.add(out, f.mm(down, c.sqr(c.relu(f.mm(up, x)))));
        }
        out
    }
}

/// The experts each token uses and their weights, from router `logits` [n_expert, n_tokens]:
/// `(chosen` I32 [k, n_tokens]`, weights` [1, k, n_tokens]`)`. `sigmoid`: `None` for a softmax
/// over all experts, else sigmoid scores with an optional selection bias (the weights stay the
/// unbiased scores); `groups`: `(n_group, topk_group)` for a group-limited choice; `norm_topk`:
/// the k weights renormalised to sum to 1; then times `scale`.
///
/// Built op for op as llama.cpp's `build_moe_ffn` builds it, so ggml-cuda runs the whole
/// sequence as one fused top-k kernel when the caller puts it in the graph before the experts.
pub fn route(
    c: &Context,
    logits: Tensor,
    sigmoid: Option<Option<Tensor>>,
    groups: Option<(i64, i32)>,
    k: i64,
    norm_topk: bool,
    scale: f32,
) -> (Tensor, Tensor) {
    let [n_expert, n_tokens, ..] = logits.ne();
    let (probs, chosen) = match sigmoid {
        None => {
            let p = c.soft_max_ext(logits, None, 1.0);
            (p, c.argsort_top_k(p, k as i32))
        }
        Some(bias) => {
            let p = c.sigmoid(logits);
            let mut choice = match bias {
                Some(b) => c.add(p, b),
                None => p,
            };
            if let Some((n_group, topk_group)) = groups {
                choice = mask_groups(c, choice, n_group, topk_group);
            }
            (p, c.argsort_top_k(choice, k as i32))
        }
    };
    // The chosen experts' probabilities: rows of [1, n_expert, n_tokens] picked per token.
    let mut weights = c.get_rows(c.reshape_3d(probs, 1, n_expert, n_tokens), chosen);
    if norm_topk {
        let w2 = c.reshape_2d(weights, k, n_tokens);
        // The sum is at least F16's smallest normal (llama.cpp's clamp, which its fused
        // kernel expects). Softmax weights: the k largest of n_expert <= MAX_EXPERTS
        // probabilities sum to at least k / n_expert, never below it, so this is exact.
        // Sigmoid scores (HF adds 1e-20 instead) differ only when all k chosen scores are
        // below ~1e-5, i.e. logits under -11 for every chosen expert.
        let sum = c.clamp(c.sum_rows(w2), NORM_MIN_SUM, f32::INFINITY); // [1, n_tokens]
        weights = c.reshape_3d(c.div(w2, sum), 1, k, n_tokens);
    }
    if scale != 1.0 {
        weights = c.scale(weights, scale);
    }
    (chosen, weights)
}

/// `choice` [n_expert, n_tokens] with every expert outside each token's best `topk_group`
/// groups set to -inf (a group's score: the sum of its two best experts).
fn mask_groups(c: &Context, choice: Tensor, n_group: i64, topk_group: i32) -> Tensor {
    let [n_expert, n_tokens, ..] = choice.ne();
    let per = n_expert / n_group;
    let groups = c.reshape_3d(choice, per, n_group, n_tokens); // [per, n_group, T]
    let best2 = c.argsort_top_k(groups, 2); // [2, n_group, T]
    let vals = c.get_rows(c.reshape_4d(groups, 1, per, n_group, n_tokens), best2); // [1, 2, n_group, T]
    let score = c.sum_rows(c.reshape_3d(vals, 2, n_group, n_tokens)); // [1, n_group, T]
    let score = c.reshape_2d(score, n_group, n_tokens);
    let keep = c.argsort_top_k(score, topk_group); // [topk_group, T]
    let kept = c.get_rows(groups, keep); // [per, topk_group, T]
    let masked = c.set_rows(c.fill(groups, f32::NEG_INFINITY), kept, keep);
    c.reshape_2d(masked, n_expert, n_tokens)
}

/// The renormalised routing weights' sum is clamped to at least this (F16's smallest normal
/// number, as llama.cpp does; see [`Moe::forward`]).
const NORM_MIN_SUM: f32 = 6.103_515_6e-5;

/// ggml-cuda's `mul_mat_id` for F32/F16/BF16 weights has a tensor-core kernel (mmf) that groups
/// each expert's tokens on the device, but takes it only up to [`MMF_MAX_TOKENS`] tokens for
/// matrices of at most [`MMF_MAX_ROWS`] output rows (128 tokens for larger ones); otherwise it
/// falls back to a loop that synchronises with the host twice, copies each expert's rows out and
/// runs one cuBLAS GEMM per expert (128 small GEMMs a matrix for Nemotron 3 Nano's 128 experts).
const MMF_MAX_ROWS: i64 = 1024;
const MMF_MAX_TOKENS: i64 = 512;
/// Above this many tokens a matrix of more than [`MMF_MAX_ROWS`] rows leaves mmf.
const MMF_MAX_TOKENS_WIDE: i64 = 128;
/// Smallest K (the weights' row length) split: with K = 128 (one warp per block) ggml-cuda's
/// grouped kernel read out of bounds under op-check on an H200 (ggml 0.26.0); K >= 1024 (more
/// warps) is what op-check and the Nemotron 3 Nano runs cover (`op-check --large`: its shapes).
const MMF_MIN_K: i64 = 1024;
/// Row split granularity: mmf's rows per block (32 on NVIDIA, 64 on AMD CDNA) must divide a
/// part, and its K must be a multiple of 64 for 16-bit weights.
const MMF_ALIGN: i64 = 64;

/// Whether [`mul_mat_id`] splits the expert matrices (default on; `STLLM_MOE_SPLIT=0` turns it
/// off, for comparing the two paths on a GPU).
fn moe_split_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("STLLM_MOE_SPLIT").map_or(true, |v| v != "0"))
}

/// `mul_mat_id(w, x, ids)`, with a wide F16/BF16/F32 expert matrix on a GPU split by output rows
/// into parts of at most [`MMF_MAX_ROWS`] when the step has more tokens than mmf takes for the
/// whole matrix but no more than it takes for the parts: each part then runs as one grouped
/// kernel (no host synchronisation, no per-expert GEMMs, capturable in a CUDA graph), reading
/// its rows of the weights once; the parts' outputs are joined. Exact: each output row is the
/// same dot product.
fn mul_mat_id(f: &Forward, w: Tensor, x: Tensor, ids: Tensor) -> Tensor {
    let c = f.ctx;
    let [k, n, ..] = w.ne();
    let n_tokens = x.ne()[2];
    let float = matches!(w.dtype(), Some(DType::F16 | DType::BF16 | DType::F32));
    if !moe_split_enabled()
        || !float
        || !w.on_device()
        || n <= MMF_MAX_ROWS
        || n_tokens <= MMF_MAX_TOKENS_WIDE
        || n_tokens > MMF_MAX_TOKENS
        || k < MMF_MIN_K
        || k % MMF_ALIGN != 0
        || n % MMF_ALIGN != 0
    {
        return c.mul_mat_id(w, x, ids);
    }
    mul_mat_id_split_rows(c, w, x, ids, MMF_MAX_ROWS, MMF_ALIGN)
}

/// `mul_mat_id(w, x, ids)` computed in parts of at most `max_rows` output rows of `w` (each a
/// multiple of `align` but the last), joined along the rows.
pub fn mul_mat_id_split_rows(c: &Context, w: Tensor, x: Tensor, ids: Tensor, max_rows: i64, align: i64) -> Tensor {
    let [k, n, n_expert, _] = w.ne();
    let (max_rows, align) = (max_rows.max(1), align.max(1));
    let parts = (n + max_rows - 1) / max_rows;
    let rows = (n / parts + align - 1) / align * align;
    let [_, nb1, nb2, _] = w.nb();
    let mut out: Option<Tensor> = None;
    let mut r0 = 0;
    while r0 < n {
        let r = rows.min(n - r0);
        let part = c.view_3d(w, k, r, n_expert, nb1, nb2, r0 as usize * nb1);
        let y = c.mul_mat_id(part, x, ids);
        out = Some(match out {
            None => y,
            Some(o) => c.concat(o, y, 0),
        });
        r0 += r;
    }
    out.expect("a matrix has rows")
}

/// The sum over each token's k expert outputs: `y` [n_embd, k, n_tokens] -> [n_embd, n_tokens].
fn sum_slots(f: &Forward, y: Tensor) -> Tensor {
    let c = f.ctx;
    let [n_embd, k, n_tokens, ..] = y.ne();
    let row = y.nb()[1];
    let mut out = c.view_2d(y, n_embd, n_tokens, y.nb()[2], 0);
    for i in 1..k as usize {
        out = c.add(out, c.view_2d(y, n_embd, n_tokens, y.nb()[2], i * row));
    }
    if k == 1 {
        out = c.cont(out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The op names of `g`'s nodes, in execution order.
    fn ops(g: &crate::ggml::Graph) -> Vec<String> {
        (0..g.n_nodes() as usize).map(|i| g.node(i).expect("below the count").op_name()).collect()
    }

    /// ggml-cuda fuses the routing only when its nodes run consecutively in llama.cpp's order
    /// (ggml_cuda_topk_moe_fusion); expanded before the experts, as `Moe::forward` does, they
    /// must, for each gating.
    #[test]
    fn routing_nodes_run_in_the_order_ggml_cuda_fuses() {
        let sigmoid_norm_scale = [
            "MUL_MAT", "SIGMOID", "RESHAPE", "ADD", "ARGSORT", "VIEW", "GET_ROWS", "RESHAPE", "SUM_ROWS", "CLAMP",
            "DIV", "RESHAPE", "SCALE",
        ];
        let softmax_norm = [
            "MUL_MAT", "SOFT_MAX", "RESHAPE", "ARGSORT", "VIEW", "GET_ROWS", "RESHAPE", "SUM_ROWS", "CLAMP", "DIV",
            "RESHAPE",
        ];
        for (sigmoid, scale, want) in [(true, 2.5, &sigmoid_norm_scale[..]), (false, 1.0, &softmax_norm[..])] {
            let c = Context::new(64, 256).unwrap();
            let (n_embd, n_expert, n_tokens, k) = (64i64, 16i64, 3i64, 4i64);
            let router = c.new_tensor(DType::F32, &[n_embd, n_expert], "router");
            let experts = c.new_tensor(DType::F32, &[n_embd, 32, n_expert], "experts");
            let bias = c.new_tensor(DType::F32, &[n_expert], "bias");
            let x = c.new_tensor(DType::F32, &[n_embd, n_tokens], "x");
            let mut g = c.new_graph(256);
            let logits = c.mul_mat(router, x);
            let gating = sigmoid.then_some(Some(bias));
            let (chosen, weights) = route(&c, logits, gating, None, k, true, scale);
            g.expand(weights);
            let y = c.mul_mat_id(experts, c.reshape_3d(x, n_embd, 1, n_tokens), chosen);
            g.expand(c.mul(y, weights));
            let got = ops(&g);
            assert_eq!(&got[..want.len()], want, "sigmoid: {sigmoid}; all: {got:?}");
            assert!(!got[want.len()..].iter().any(|o| o == "ARGSORT" || o == "GET_ROWS"));
        }
    }
}
