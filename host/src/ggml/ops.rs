//! Graph operations: each method records one ggml op node in the context.
//!
//! ggml checks shapes with asserts that abort the process; the graph blocks that call these only
//! pass shapes the loader has validated, so an abort here is a bug in stllm, never bad input.

use super::{sys, Context, Tensor};

/// Rotary embedding parameters (ggml's `rope_ext` arguments, YaRN fields included).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeParams {
    pub n_dims: i32,
    /// ggml rope mode: 0 = normal (interleaved pairs), 2 = NeoX (rotate halves, HF's layout).
    pub mode: i32,
    pub n_ctx_orig: i32,
    pub freq_base: f32,
    pub freq_scale: f32,
    pub ext_factor: f32,
    pub attn_factor: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
}

pub const ROPE_NEOX: i32 = 2;

impl Context {
    fn c(&self) -> *mut sys::ggml_context {
        self.raw()
    }

    pub fn get_rows(&self, a: Tensor, ids: Tensor) -> Tensor {
        // SAFETY (all ops below): both tensors are alive in live contexts; ggml validates shapes.
        Tensor::from_raw(unsafe { sys::ggml_get_rows(self.c(), a.raw(), ids.raw()) })
    }

    /// `a` [k, m] x `b` [k, n] -> [m, n] (ggml's `mul_mat`: rows of `a` dotted with rows of `b`).
    pub fn mul_mat(&self, a: Tensor, b: Tensor) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_mul_mat(self.c(), a.raw(), b.raw()) })
    }

    /// Ask for F32 accumulation of a matmul / attention result where the backend can choose.
    pub fn set_prec_f32(&self, t: Tensor) {
        // SAFETY: sets an op parameter of a live tensor (a mul_mat or flash_attn_ext node).
        unsafe { sys::ggml_prec_set_acc(t.raw(), sys::GGML_PREC_F32) };
    }

    pub fn add(&self, a: Tensor, b: Tensor) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_add(self.c(), a.raw(), b.raw()) })
    }

    pub fn sub(&self, a: Tensor, b: Tensor) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_sub(self.c(), a.raw(), b.raw()) })
    }

    pub fn mul(&self, a: Tensor, b: Tensor) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_mul(self.c(), a.raw(), b.raw()) })
    }

    pub fn scale(&self, a: Tensor, s: f32) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_scale(self.c(), a.raw(), s) })
    }

    pub fn rms_norm(&self, a: Tensor, eps: f32) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_rms_norm(self.c(), a.raw(), eps) })
    }

    pub fn silu(&self, a: Tensor) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_silu(self.c(), a.raw()) })
    }

    /// silu(a) * b
    pub fn swiglu_split(&self, a: Tensor, b: Tensor) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_swiglu_split(self.c(), a.raw(), b.raw()) })
    }

    /// gpt-oss's clamped SwiGLU: with `g = min(a, limit)` and `u = clamp(b, -limit, limit)`,
    /// `g * sigmoid(alpha * g) * (u + 1)` elementwise (`a` the gate, `b` the up projection, both
    /// F32 and contiguous in their rows).
    pub fn swiglu_oai(&self, a: Tensor, b: Tensor, alpha: f32, limit: f32) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_swiglu_oai(self.c(), a.raw(), b.raw(), alpha, limit) })
    }

    /// Per-expert bias rows: `a` [n, n_used, n_tokens] + `b` [n, n_expert] at row `ids[slot,
    /// token]` (I32 [n_used, n_tokens]); `a` and `b` F32.
    pub fn add_id(&self, a: Tensor, b: Tensor, ids: Tensor) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_add_id(self.c(), a.raw(), b.raw(), ids.raw()) })
    }

    pub fn cont(&self, a: Tensor) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_cont(self.c(), a.raw()) })
    }

    pub fn transpose(&self, a: Tensor) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_transpose(self.c(), a.raw()) })
    }

    pub fn permute(&self, a: Tensor, p: [i32; 4]) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_permute(self.c(), a.raw(), p[0], p[1], p[2], p[3]) })
    }

    pub fn reshape_2d(&self, a: Tensor, n0: i64, n1: i64) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_reshape_2d(self.c(), a.raw(), n0, n1) })
    }

    pub fn reshape_3d(&self, a: Tensor, n0: i64, n1: i64, n2: i64) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_reshape_3d(self.c(), a.raw(), n0, n1, n2) })
    }

    /// A 2-D view: `n0` x `n1` elements with row stride `nb1` bytes, starting `offset` bytes in.
    pub fn view_1d(&self, a: Tensor, n0: i64, offset: usize) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_view_1d(self.c(), a.raw(), n0, offset) })
    }

    pub fn view_2d(&self, a: Tensor, n0: i64, n1: i64, nb1: usize, offset: usize) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_view_2d(self.c(), a.raw(), n0, n1, nb1, offset) })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn view_3d(&self, a: Tensor, n0: i64, n1: i64, n2: i64, nb1: usize, nb2: usize, offset: usize) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_view_3d(self.c(), a.raw(), n0, n1, n2, nb1, nb2, offset) })
    }

    /// `a` converted to `dtype` (a new tensor).
    pub fn cast(&self, a: Tensor, dtype: super::DType) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_cast(self.c(), a.raw(), dtype.raw()) })
    }

    /// Copy `a` into `b` (converting types); the result is `b` after the copy.
    pub fn cpy(&self, a: Tensor, b: Tensor) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_cpy(self.c(), a.raw(), b.raw()) })
    }

    /// Write the rows of `b` into `a` at the row indices `ids` (I64 or I32).
    pub fn set_rows(&self, a: Tensor, b: Tensor, ids: Tensor) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_set_rows(self.c(), a.raw(), b.raw(), ids.raw()) })
    }

    /// `a` and `b` joined along dimension `dim`.
    pub fn concat(&self, a: Tensor, b: Tensor, dim: i32) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_concat(self.c(), a.raw(), b.raw(), dim) })
    }

    /// softmax(a * scale + mask) over dim 0.
    pub fn soft_max_ext(&self, a: Tensor, mask: Option<Tensor>, scale: f32) -> Tensor {
        let m = mask.map_or(std::ptr::null_mut(), |m| m.raw());
        Tensor::from_raw(unsafe { sys::ggml_soft_max_ext(self.c(), a.raw(), m, scale, 0.0) })
    }

    /// Give a `soft_max_ext` node learned per-head sinks (F32 [n_head], `kq`'s dim 2): each row's
    /// softmax also counts `exp(sink[head])` in its denominator (unscaled, unmasked), with no
    /// output for it (gpt-oss).
    pub fn soft_max_add_sinks(&self, kq: Tensor, sinks: Tensor) {
        // SAFETY: sets an input of a live soft_max node (ggml checks the op, type and size).
        unsafe { sys::ggml_soft_max_add_sinks(kq.raw(), sinks.raw()) }
    }

    /// Rotary position embedding of `a` [head_dim, n_head, n_tokens] at positions `pos` (I32).
    pub fn rope_ext(&self, a: Tensor, pos: Tensor, freq_factors: Option<Tensor>, p: &RopeParams) -> Tensor {
        let ff = freq_factors.map_or(std::ptr::null_mut(), |f| f.raw());
        Tensor::from_raw(unsafe {
            sys::ggml_rope_ext(
                self.c(),
                a.raw(),
                pos.raw(),
                ff,
                p.n_dims,
                p.mode,
                p.n_ctx_orig,
                p.freq_base,
                p.freq_scale,
                p.ext_factor,
                p.attn_factor,
                p.beta_fast,
                p.beta_slow,
            )
        })
    }

    /// Fused attention. q [d, n_tokens, n_head], k/v [d, n_kv, n_head_kv], mask F16
    /// [n_kv, n_tokens_padded]; result [d_v, n_head, n_tokens].
    pub fn flash_attn_ext(&self, q: Tensor, k: Tensor, v: Tensor, mask: Option<Tensor>, scale: f32) -> Tensor {
        let m = mask.map_or(std::ptr::null_mut(), |m| m.raw());
        Tensor::from_raw(unsafe { sys::ggml_flash_attn_ext(self.c(), q.raw(), k.raw(), v.raw(), m, scale, 0.0, 0.0) })
    }

    /// Give a `flash_attn_ext` node learned per-head sinks (F32 [n_head]), as
    /// [`Context::soft_max_add_sinks`] does for the softmax path.
    pub fn flash_attn_ext_add_sinks(&self, o: Tensor, sinks: Tensor) {
        // SAFETY: sets an input of a live flash_attn_ext node (ggml checks the op, type and size).
        unsafe { sys::ggml_flash_attn_ext_add_sinks(o.raw(), sinks.raw()) }
    }

    /// Matrix products with a per-row choice of matrix: `as` [k, m, n_mat] (stacked experts), `b`
    /// [k, n_used or 1, n_tokens], `ids` I32 [n_used, n_tokens] (which matrix each of a token's
    /// slots uses) -> [m, n_used, n_tokens].
    pub fn mul_mat_id(&self, as_: Tensor, b: Tensor, ids: Tensor) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_mul_mat_id(self.c(), as_.raw(), b.raw(), ids.raw()) })
    }

    /// Index (I32) of the largest value of each row: [n0, n1] -> [n1].
    pub fn argmax(&self, a: Tensor) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_argmax(self.c(), a.raw()) })
    }

    /// Indices (I32) of the `k` largest values of each row of `a`, largest first.
    pub fn argsort_top_k(&self, a: Tensor, k: i32) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_argsort_top_k(self.c(), a.raw(), k) })
    }

    /// Indices (I32) of the `k` largest values of each row of `a` (F32, contiguous), in no
    /// particular order: [n0, n1, ...] -> [k, n1, ...]. `k` must be at most `n0`.
    pub fn top_k(&self, a: Tensor, k: i32) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_top_k(self.c(), a.raw(), k) })
    }

    /// Each value limited to `min..=max` (either may be infinite).
    pub fn clamp(&self, a: Tensor, min: f32, max: f32) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_clamp(self.c(), a.raw(), min, max) })
    }

    /// Sum of each row: [n0, ...] -> [1, ...].
    pub fn sum_rows(&self, a: Tensor) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_sum_rows(self.c(), a.raw()) })
    }

    /// a / b (b broadcast over a).
    pub fn div(&self, a: Tensor, b: Tensor) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_div(self.c(), a.raw(), b.raw()) })
    }

    pub fn sigmoid(&self, a: Tensor) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_sigmoid(self.c(), a.raw()) })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn view_4d(&self, a: Tensor, ne: [i64; 4], nb1: usize, nb2: usize, nb3: usize, offset: usize) -> Tensor {
        Tensor::from_raw(unsafe {
            sys::ggml_view_4d(self.c(), a.raw(), ne[0], ne[1], ne[2], ne[3], nb1, nb2, nb3, offset)
        })
    }

    pub fn reshape_4d(&self, a: Tensor, n0: i64, n1: i64, n2: i64, n3: i64) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_reshape_4d(self.c(), a.raw(), n0, n1, n2, n3) })
    }

    pub fn relu(&self, a: Tensor) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_relu(self.c(), a.raw()) })
    }

    pub fn sqr(&self, a: Tensor) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_sqr(self.c(), a.raw()) })
    }

    /// Depthwise causal convolution: `sx` [d_conv - 1 + n_t, channels, n_seqs] (the previous
    /// inputs, then this step's), `c` [d_conv, channels] -> [channels, n_t, n_seqs].
    pub fn ssm_conv(&self, sx: Tensor, c: Tensor) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_ssm_conv(self.c(), sx.raw(), c.raw()) })
    }

    /// Mamba-2 selective scan: states `s` [d_state, head_dim, n_head, n_slots] read at slots
    /// `ids` (I32 [n_seqs]), x [head_dim, n_head, n_t, n_seqs], dt [n_head, n_t, n_seqs] (softplus
    /// applied inside), A [1, n_head], B/C [d_state, n_group, n_t, n_seqs] -> y (as x) followed by
    /// the final states [d_state * head_dim * n_head, n_seqs], flat.
    #[allow(clippy::too_many_arguments)]
    pub fn ssm_scan(&self, s: Tensor, x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, ids: Tensor) -> Tensor {
        Tensor::from_raw(unsafe {
            sys::ggml_ssm_scan(self.c(), s.raw(), x.raw(), dt.raw(), a.raw(), b.raw(), c.raw(), ids.raw(), 1)
        })
    }

    /// A tensor shaped like `a`, every element `c`.
    pub fn fill(&self, a: Tensor, c: f32) -> Tensor {
        Tensor::from_raw(unsafe { sys::ggml_fill(self.c(), a.raw(), c) })
    }
}
