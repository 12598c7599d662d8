//! Feed-forward blocks.

use super::moe::Moe;
use super::Forward;
use crate::ggml::Tensor;
use crate::loader::{LoadError, WeightBuilder};

/// A gated SiLU MLP: `down(silu(gate(x)) * up(x))` (Llama, Mistral, Qwen).
pub struct SwigluMlp {
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
}

impl SwigluMlp {
    /// Load `{prefix}.gate_proj/up_proj/down_proj.weight`.
    pub fn load(w: &mut WeightBuilder, prefix: &str, n_embd: usize, n_ff: usize) -> Result<Self, LoadError> {
        Ok(SwigluMlp {
            gate: w.get(&format!("{prefix}.gate_proj.weight"), &[n_ff, n_embd])?,
            up: w.get(&format!("{prefix}.up_proj.weight"), &[n_ff, n_embd])?,
            down: w.get(&format!("{prefix}.down_proj.weight"), &[n_embd, n_ff])?,
        })
    }

    pub fn forward(&self, f: &Forward, x: Tensor) -> Tensor {
        let g = f.mm(self.gate, x);
        let u = f.mm(self.up, x);
        let h = f.ctx.swiglu_split(g, u);
        f.mm(self.down, h)
    }
}

/// A decoder layer's feed-forward block: a dense MLP or a mixture of experts.
pub enum Ffn {
    Dense(SwigluMlp),
    Moe(Moe),
}

impl Ffn {
    pub fn forward(&self, f: &mut Forward, x: Tensor) -> Tensor {
        match self {
            Ffn::Dense(m) => m.forward(f, x),
            Ffn::Moe(m) => m.forward(f, x),
        }
    }
}
