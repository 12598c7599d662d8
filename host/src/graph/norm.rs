//! Normalisation blocks.

use super::Forward;
use crate::ggml::Tensor;

/// RMSNorm over dim 0 times a learned weight (HF `LlamaRMSNorm`).
pub fn rms(f: &Forward, x: Tensor, weight: Tensor, eps: f32) -> Tensor {
    let n = f.ctx.rms_norm(x, eps);
    f.ctx.mul(n, weight)
}
