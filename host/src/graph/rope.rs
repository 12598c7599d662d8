//! Rotary position embeddings: reading HF's two config spellings and applying ggml's `rope_ext`.
//!
//! transformers 4 writes `rope_theta` at the top level and `rope_scaling: {"rope_type"|"type": ..}`;
//! transformers 5 writes `rope_parameters: {"rope_type": .., "rope_theta": ..}`. Both are read.
//! HF rotates halves of each head (`rotate_half`), which is ggml's NeoX mode; we load weights as
//! they are, so no q/k permutation is needed (unlike GGUF conversion).

use std::path::Path;

use serde_json::Value;

use super::Forward;
use crate::ggml::{RopeParams, Tensor};
use crate::loader::{LoadError, WeightBuilder};

/// Rotary embedding of a model: ggml parameters plus optional per-frequency divisors.
pub struct Rope {
    pub params: RopeParams,
    pub freq_factors: Option<Tensor>,
}

/// A number of the config: absent (or null) is `None`; Python's bare `NaN` / `Infinity` (read as
/// strings, see `loader::read_json`) are those numbers; anything else is an error naming the key,
/// not a silent default.
fn num(v: &Value, key: &str) -> Result<Option<f64>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .or_else(|| match x.as_str() {
                Some("NaN") => Some(f64::NAN),
                Some("Infinity") => Some(f64::INFINITY),
                Some("-Infinity") => Some(f64::NEG_INFINITY),
                _ => None,
            })
            .map(Some)
            .ok_or_else(|| format!("expected a number, got {x}")),
    }
}

/// What the config says about RoPE, before weights exist.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub n_dims: usize,
    pub n_ctx_orig: usize,
    pub freq_scale: f64,
    /// Divisors of each inverse frequency (llama3 and YaRN scaling), length n_dims / 2
    pub freq_factors: Option<Vec<f32>>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 otherwise)
    pub attn_factor: f64,
}

impl RopeConfig {
    pub fn from_hf(cfg: &Value, head_dim: usize, max_pos: usize, file: &Path) -> Result<RopeConfig, LoadError> {
        let bad = |field: &str, msg: String| LoadError::InvalidConfig {
            file: file.to_path_buf(),
            field: field.to_string(),
            msg,
        };
        let params = [cfg.get("rope_parameters"), cfg.get("rope_scaling")]
            .into_iter()
            .flatten()
            .find(|v| v.is_object())
            .cloned()
            .unwrap_or(Value::Null);
        let num = |v: &Value, key: &str| num(v, key).map_err(|msg| bad(key, msg));
        let theta = num(&params, "rope_theta")?.or(num(cfg, "rope_theta")?).unwrap_or(10000.0);
        if !(theta.is_finite() && theta > 0.0) {
            return Err(bad("rope_theta", format!("must be a positive number, got {theta}")));
        }
        let partial = num(&params, "partial_rotary_factor")?.or(num(cfg, "partial_rotary_factor")?).unwrap_or(1.0);
        if !(partial > 0.0 && partial <= 1.0) {
            return Err(bad("partial_rotary_factor", format!("must be in (0, 1], got {partial}")));
        }
        let n_dims = ((head_dim as f64 * partial) as usize) & !1;
        let kind = params.get("rope_type").or_else(|| params.get("type")).and_then(Value::as_str).unwrap_or("default");
        let factor = num(&params, "factor")?;
        let need_factor = |kind: &str| -> Result<f64, LoadError> {
            match factor {
                Some(f) if f.is_finite() && f >= 1.0 => Ok(f),
                Some(f) => Err(bad("rope_scaling.factor", format!("must be >= 1 for {kind} scaling, got {f}"))),
                None => Err(bad("rope_scaling.factor", format!("{kind} scaling needs a factor"))),
            }
        };
        let mut rc =
            RopeConfig { theta, n_dims, n_ctx_orig: max_pos, freq_scale: 1.0, freq_factors: None, attn_factor: 1.0 };
        match kind {
            "default" => {}
            "linear" => rc.freq_scale = 1.0 / need_factor(kind)?,
            "llama3" => {
                let factor = need_factor(kind)?;
                let low = num(&params, "low_freq_factor")?.unwrap_or(1.0);
                let high = num(&params, "high_freq_factor")?.unwrap_or(4.0);
                let orig = num(&params, "original_max_position_embeddings")?.unwrap_or(8192.0);
                if !(high.is_finite() && high > low && low > 0.0 && orig >= 1.0 && orig <= (1u64 << 30) as f64) {
                    return Err(bad(
                        "rope_scaling",
                        format!(
                            "llama3 needs high_freq_factor > low_freq_factor > 0 and original_max_position_embeddings \
                             in 1..=2^30, got {high}, {low} and {orig}"
                        ),
                    ));
                }
                rc.n_ctx_orig = orig as usize;
                rc.freq_factors = Some(llama3_freq_factors(theta, n_dims, factor, low, high, orig));
            }
            "yarn" => {
                // As transformers' `_compute_yarn_parameters`: a top-level
                // original_max_position_embeddings wins (Phi-3), then the dict's, then the
                // model's length; without a factor, the ratio of the model's length to it.
                let orig = num(cfg, "original_max_position_embeddings")?
                    .or(num(&params, "original_max_position_embeddings")?)
                    .unwrap_or(max_pos as f64);
                if !(orig >= 1.0 && orig <= (1u64 << 30) as f64) {
                    return Err(bad(
                        "rope_scaling.original_max_position_embeddings",
                        format!("must be in 1..=2^30, got {orig}"),
                    ));
                }
                let factor = match factor {
                    Some(_) => need_factor(kind)?,
                    None => (max_pos as f64 / orig).max(1.0),
                };
                let mscale = |s: f64, m: f64| if s <= 1.0 { 1.0 } else { 0.1 * m * s.ln() + 1.0 };
                let attn = match (
                    num(&params, "attention_factor")?,
                    num(&params, "mscale")?.filter(|&m| m != 0.0),
                    num(&params, "mscale_all_dim")?.filter(|&m| m != 0.0),
                ) {
                    (Some(a), _, _) => a,
                    (None, Some(m), Some(all)) => mscale(factor, m) / mscale(factor, all),
                    _ => mscale(factor, 1.0),
                };
                // Python's `or`: 0 (or absent) takes the default.
                let beta_fast = num(&params, "beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0);
                let beta_slow = num(&params, "beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0);
                let truncate = match params.get("truncate") {
                    None | Some(Value::Null) => true,
                    Some(Value::Bool(b)) => *b,
                    Some(x) => return Err(bad("rope_scaling.truncate", format!("expected true or false, got {x}"))),
                };
                for (k, v) in [("attention_factor", attn), ("beta_fast", beta_fast), ("beta_slow", beta_slow)] {
                    if !(v.is_finite() && v > 0.0) {
                        return Err(bad(&format!("rope_scaling.{k}"), format!("must be a positive number, got {v}")));
                    }
                }
                rc.n_ctx_orig = orig as usize;
                rc.attn_factor = attn;
                let y = Yarn { factor, orig, beta_fast, beta_slow, truncate };
                rc.freq_factors = Some(yarn_freq_factors(theta, n_dims, &y));
            }
            other => {
                return Err(bad(
                    "rope_scaling.rope_type",
                    format!("{other:?} is not supported (supported: default, linear, llama3, yarn)"),
                ))
            }
        }
        Ok(rc)
    }

    /// Make the runtime form; the llama3 divisors become a small F32 tensor in the weights.
    pub fn build(&self, w: &mut WeightBuilder) -> Result<Rope, crate::loader::LoadError> {
        let freq_factors = self
            .freq_factors
            .as_ref()
            .map(|ff| w.derived("rope_freq_factors", &[ff.len() as i64], ff.clone()))
            .transpose()?;
        Ok(Rope {
            params: RopeParams {
                n_dims: self.n_dims as i32,
                mode: crate::ggml::ROPE_NEOX,
                n_ctx_orig: self.n_ctx_orig as i32,
                freq_base: self.theta as f32,
                freq_scale: self.freq_scale as f32,
                ext_factor: 0.0,
                // ext_factor 0: ggml applies no ramp of its own (the freq factors carry YaRN's,
                // with HF's exact correction range) but still scales cos and sin by this.
                attn_factor: self.attn_factor as f32,
                beta_fast: 32.0,
                beta_slow: 1.0,
            },
            freq_factors,
        })
    }
}

/// HF's `_compute_llama3_parameters`, expressed as ggml frequency divisors:
/// ggml uses `theta_i = pos * base^(-2i/d) / ff[i]`, so `ff[i] = inv_freq[i] / inv_freq_llama3[i]`.
fn llama3_freq_factors(theta: f64, n_dims: usize, factor: f64, low: f64, high: f64, orig: f64) -> Vec<f32> {
    let low_wavelen = orig / low;
    let high_wavelen = orig / high;
    (0..n_dims / 2)
        .map(|i| {
            let inv = 1.0 / theta.powf((2 * i) as f64 / n_dims as f64);
            let wavelen = 2.0 * std::f64::consts::PI / inv;
            let scaled = if wavelen < high_wavelen {
                inv
            } else if wavelen > low_wavelen {
                inv / factor
            } else {
                let smooth = (orig / wavelen - low) / (high - low);
                (1.0 - smooth) * inv / factor + smooth * inv
            };
            (inv / scaled) as f32
        })
        .collect()
}

/// YaRN's settings (after defaults).
struct Yarn {
    factor: f64,
    orig: f64,
    beta_fast: f64,
    beta_slow: f64,
    /// Round the correction range outwards to whole dimensions (HF's default; gpt-oss: false)
    truncate: bool,
}

/// HF's YaRN inverse frequencies as ggml divisors: pair i keeps its frequency where it turns more
/// than `beta_fast` times over the original context, is divided by `factor` where it turns fewer
/// than `beta_slow` times, and is blended linearly (in i) between, so
/// `inv_freq[i] = base^(-2i/d) * (e + (1 - e) / factor)` with `e = 1 - ramp(i)` and
/// `ff[i] = 1 / (e + (1 - e) / factor)`. ggml's own YaRN always rounds the range, which gpt-oss's
/// `truncate: false` forbids; this follows HF either way.
fn yarn_freq_factors(theta: f64, n_dims: usize, y: &Yarn) -> Vec<f32> {
    let d = n_dims as f64;
    let corr = |rot: f64| d * (y.orig / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
    let (mut low, mut high) = (corr(y.beta_fast), corr(y.beta_slow));
    if y.truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
    if low == high {
        high += 0.001;
    }
    (0..n_dims / 2)
        .map(|i| {
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let e = 1.0 - ramp;
            (1.0 / (e + (1.0 - e) / y.factor)) as f32
        })
        .collect()
}

impl Rope {
    /// Rotate `x` [head_dim, n_head, n_tokens] by this step's positions.
    pub fn apply(&self, f: &Forward, x: Tensor) -> Tensor {
        f.ctx.rope_ext(x, f.inp.pos, self.freq_factors, &self.params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_spellings_agree() {
        let old = json!({"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}});
        let new = json!({"rope_parameters": {"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0}});
        let p = Path::new("config.json");
        let a = RopeConfig::from_hf(&old, 64, 4096, p).unwrap();
        let b = RopeConfig::from_hf(&new, 64, 4096, p).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.freq_scale, 0.5);
        assert_eq!(a.theta, 500000.0);
    }

    #[test]
    fn llama3_factors_span_the_three_regions() {
        let cfg = json!({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}});
        let rc = RopeConfig::from_hf(&cfg, 128, 131072, Path::new("c")).unwrap();
        let ff = rc.freq_factors.unwrap();
        assert_eq!(ff.len(), 64);
        assert!((ff[0] - 1.0).abs() < 1e-6, "high frequencies unscaled");
        assert!((ff[63] - 8.0).abs() < 1e-4, "low frequencies divided by the factor");
        assert!(ff.iter().any(|&x| x > 1.01 && x < 7.99), "a smooth middle band");
        assert_eq!(rc.n_ctx_orig, 8192);
    }

    /// Divisors and attention factors from transformers 5.24's `_compute_yarn_parameters`
    /// (base^(-2i/d) / inv_freq[i], printed to 6 decimals).
    #[test]
    fn yarn_matches_transformers() {
        // gpt-oss-20b: truncate false (the correction range 8.09..17.40 not rounded).
        let cfg = json!({"rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
            "beta_slow": 1.0, "truncate": false, "original_max_position_embeddings": 4096, "rope_theta": 150000.0}});
        let rc = RopeConfig::from_hf(&cfg, 64, 131072, Path::new("c")).unwrap();
        let want = [
            1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.1043, 1.247749, 1.434031, 1.685695, 2.044491, 2.597326,
            3.559942, 5.656254, 13.757522, 32.0,
        ];
        let ff = rc.freq_factors.as_ref().unwrap();
        assert_eq!(ff.len(), 32);
        for (i, w) in want.iter().chain(std::iter::repeat_n(&32.0, 13)).enumerate() {
            assert!((ff[i] as f64 - w).abs() < 2e-5 * w, "gpt-oss pair {i}: {} vs {w}", ff[i]);
        }
        assert!((rc.attn_factor - 1.3465735902799727).abs() < 1e-12);
        assert_eq!(rc.n_ctx_orig, 4096);
        // The same with truncate (the default) differs: the range becomes 8..18.
        let mut t = cfg.clone();
        t["rope_parameters"].as_object_mut().unwrap().remove("truncate");
        let rt = RopeConfig::from_hf(&t, 64, 131072, Path::new("c")).unwrap();
        assert!((rt.freq_factors.unwrap()[12] as f64 - 1.685695).abs() > 0.05);
        // Qwen3 long context, the old spelling: factor 4 over 32k, truncated range.
        let cfg = json!({"rope_theta": 1000000.0, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": 32768}});
        let rc = RopeConfig::from_hf(&cfg, 128, 131072, Path::new("c")).unwrap();
        let ff = rc.freq_factors.unwrap();
        let mid = [
            1.046154, 1.096774, 1.152542, 1.214286, 1.283019, 1.36, 1.446809, 1.545454, 1.658537, 1.789474, 1.942857,
            2.125, 2.344828, 2.615385, 2.956522, 3.4, 4.0,
        ];
        for (i, &f) in ff.iter().enumerate() {
            let w = if i < 24 { 1.0 } else { mid.get(i - 24).copied().unwrap_or(4.0) };
            assert!((f as f64 - w).abs() < 2e-5 * w, "qwen3 pair {i}: {f} vs {w}");
        }
        assert!((rc.attn_factor - 1.138629436111989).abs() < 1e-12);
        // Bad values name the key.
        let bad = json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "truncate": "no"}});
        let e = RopeConfig::from_hf(&bad, 64, 4096, Path::new("c")).unwrap_err().to_string();
        assert!(e.contains("truncate"), "{e}");
    }

    #[test]
    fn unknown_type_is_a_clear_error() {
        let cfg = json!({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}});
        let e = RopeConfig::from_hf(&cfg, 64, 4096, Path::new("m/config.json")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("dynamic") && msg.contains("m/config.json"), "{msg}");
    }
}
