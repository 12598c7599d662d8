//! Self-attention with a KV cache: projections (optional biases), optional per-head q/k RMSNorm
//! (Qwen3), RoPE, cache write, grouped-query attention with a causal (optionally sliding) mask.

use super::rope::Rope;
use super::{norm, Forward, SegmentKv};
use crate::ggml::{DType, Tensor};
use crate::loader::{LoadError, WeightBuilder};

/// Head geometry of an attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnDims {
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
}

/// What differs between families, as switches.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttnOptions {
    /// q/k/v projections have biases (Qwen2)
    pub qkv_bias: bool,
    /// o projection has a bias
    pub o_bias: bool,
    /// RMSNorm over each head of q and k before RoPE (Qwen3)
    pub qk_norm: bool,
    /// Learned per-head sinks (`{prefix}.sinks` [n_head]): one more logit in every row's softmax,
    /// unscaled and unmasked, with no value (gpt-oss)
    pub sinks: bool,
}

pub struct Attention {
    pub dims: AttnDims,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub o: Tensor,
    pub bq: Option<Tensor>,
    pub bk: Option<Tensor>,
    pub bv: Option<Tensor>,
    pub bo: Option<Tensor>,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    /// F32 [n_head]
    pub sinks: Option<Tensor>,
    pub norm_eps: f32,
}

impl Attention {
    /// Load `{prefix}.{q,k,v,o}_proj.{weight,bias}` and `{prefix}.{q,k}_norm.weight`.
    pub fn load(
        w: &mut WeightBuilder,
        prefix: &str,
        dims: AttnDims,
        opts: AttnOptions,
        norm_eps: f32,
    ) -> Result<Attention, LoadError> {
        let AttnDims { n_embd, n_head, n_head_kv, head_dim } = dims;
        let (nq, nkv) = (n_head * head_dim, n_head_kv * head_dim);
        let mut get = |name: &str, shape: &[usize], required: bool| -> Result<Option<Tensor>, LoadError> {
            let full = format!("{prefix}.{name}");
            if required {
                w.get(&full, shape).map(Some)
            } else {
                w.get_opt(&full, shape)
            }
        };
        Ok(Attention {
            dims,
            q: get("q_proj.weight", &[nq, n_embd], true)?.expect("required"),
            k: get("k_proj.weight", &[nkv, n_embd], true)?.expect("required"),
            v: get("v_proj.weight", &[nkv, n_embd], true)?.expect("required"),
            o: get("o_proj.weight", &[n_embd, nq], true)?.expect("required"),
            bq: get("q_proj.bias", &[nq], opts.qkv_bias)?,
            bk: get("k_proj.bias", &[nkv], opts.qkv_bias)?,
            bv: get("v_proj.bias", &[nkv], opts.qkv_bias)?,
            bo: get("o_proj.bias", &[n_embd], opts.o_bias)?,
            q_norm: get("q_norm.weight", &[head_dim], opts.qk_norm)?,
            k_norm: get("k_norm.weight", &[head_dim], opts.qk_norm)?,
            sinks: get("sinks", &[n_head], opts.sinks)?,
            norm_eps,
        })
    }

    /// `x` [n_embd, n_tokens] -> [n_embd, n_tokens]; `il`: the layer's index in the KV cache;
    /// `rope`: `None` for attention without positional encoding (hybrids whose Mamba layers
    /// carry position).
    pub fn forward(&self, f: &mut Forward, il: usize, x: Tensor, rope: Option<&Rope>, sliding: bool) -> Tensor {
        let AttnDims { n_head, n_head_kv, head_dim, .. } = self.dims;
        let nt = f.n_tokens as i64;
        let q = linear(f, self.q, self.bq, x);
        let k = linear(f, self.k, self.bk, x);
        let v = linear(f, self.v, self.bv, x);
        let mut q = f.ctx.reshape_3d(q, head_dim as i64, n_head as i64, nt);
        let mut k = f.ctx.reshape_3d(k, head_dim as i64, n_head_kv as i64, nt);
        if let Some(qn) = self.q_norm {
            q = norm::rms(f, q, qn, self.norm_eps);
        }
        if let Some(kn) = self.k_norm {
            k = norm::rms(f, k, kn, self.norm_eps);
        }
        let (q, k) = match rope {
            Some(r) => (r.apply(f, q), r.apply(f, k)),
            None => (q, k),
        };
        let out = attend(f, il, q, k, v, self.dims, sliding, self.sinks);
        linear(f, self.o, self.bo, out)
    }
}

/// `w x (+ b)`
fn linear(f: &Forward, w: Tensor, b: Option<Tensor>, x: Tensor) -> Tensor {
    let y = f.mm(w, x);
    match b {
        Some(b) => f.ctx.add(y, b),
        None => y,
    }
}

/// Store this step's k/v in their cells and attend over cells `0..n_kv` under the mask (with
/// per-head `sinks` when given). q [hd, n_head, nt], k [hd, n_head_kv, nt], v [hd*n_head_kv, nt]
/// -> [hd*n_head, nt]
#[allow(clippy::too_many_arguments)]
fn attend(
    f: &mut Forward,
    il: usize,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dims: AttnDims,
    sliding: bool,
    sinks: Option<Tensor>,
) -> Tensor {
    let AttnDims { n_head, n_head_kv, head_dim, .. } = dims;
    let ctx = f.ctx;
    let (nt, n_kv) = (f.n_tokens as i64, f.n_kv as i64);
    let n_embd_kv = (head_dim * n_head_kv) as i64;
    let kc = f.kv.k(il);
    let vc = f.kv.v(il);
    // Bytes of one head's slice of a cell (block-quantized caches pack heads in whole blocks).
    let head_bytes = f.kv.dtype().row_size(head_dim as i64);

    // Write this step's K and V rows into their cells; expanding the writes first orders them
    // before the reads below (ggml runs nodes in insertion order).
    let k_set = ctx.set_rows(kc, ctx.reshape_2d(k, n_embd_kv, nt), f.inp.kv_idxs);
    f.graph.expand(k_set);
    let v_set = ctx.set_rows(vc, ctx.reshape_2d(v, n_embd_kv, nt), f.inp.kv_idxs);
    f.graph.expand(v_set);

    let keys = ctx.view_3d(kc, head_dim as i64, n_kv, n_head_kv as i64, kc.nb()[1], head_bytes, 0);
    let vals = ctx.view_3d(vc, head_dim as i64, n_kv, n_head_kv as i64, vc.nb()[1], head_bytes, 0);
    let mask = if sliding { f.inp.mask_swa.unwrap_or(f.inp.mask) } else { f.inp.mask };
    let scale = 1.0 / (head_dim as f32).sqrt();
    let fa = |qs: Tensor, ks: Tensor, vs: Tensor, m: Tensor| {
        let o = ctx.flash_attn_ext(qs, ks, vs, Some(m), scale);
        if let Some(s) = sinks {
            ctx.flash_attn_ext_add_sinks(o, s);
        }
        o
    };
    if f.flash_attn && !f.attn_segments.is_empty() {
        // Rows of many sequences: one call per segment (see `attn_segments`), joined back.
        let mut outs: Vec<Tensor> = f
            .attn_segments
            .iter()
            .map(|seg| {
                let (r0, len) = (seg.first, seg.len as i64);
                let qs = ctx.view_3d(q, head_dim as i64, n_head as i64, len, q.nb()[1], q.nb()[2], r0 * q.nb()[2]);
                let qs = ctx.permute(qs, [0, 2, 1, 3]); // [hd, len, n_head]
                let o = match seg.kv {
                    SegmentKv::Pool { mask_row } => {
                        let ms = ctx.view_2d(mask, n_kv, len, mask.nb()[1], mask_row * mask.nb()[1]);
                        fa(qs, keys, vals, ms)
                    }
                    SegmentKv::Gathered { idx_off, n_cells, mask_off } => {
                        // The sequence's own cells, copied out of the cache (exactly: F16 to F32
                        // and back) so the call's cost follows its length, not the pool's.
                        let (idx, gmask) = (
                            f.inp.gather_idx.expect("gathered segments have an index"),
                            // As for the pool mask: a sliding layer without a window mask
                            // (no window configured) takes the full one.
                            if sliding { f.inp.gather_mask_swa.or(f.inp.gather_mask) } else { f.inp.gather_mask }
                                .expect("gathered segments have a mask"),
                        );
                        let nc = n_cells as i64;
                        let ids = ctx.view_1d(idx, nc, idx_off * idx.nb()[0]);
                        // get_rows gives F32: an F16 cache's rows go back to F16 (exactly).
                        let dt = f.kv.dtype();
                        let gather = |c: Tensor| {
                            let rows = ctx.get_rows(c, ids); // [n_embd_kv, nc]
                            let rows = if dt == DType::F16 { ctx.cast(rows, dt) } else { rows };
                            ctx.view_3d(
                                rows,
                                head_dim as i64,
                                nc,
                                n_head_kv as i64,
                                rows.nb()[1],
                                dt.row_size(head_dim as i64),
                                0,
                            )
                        };
                        let ms = ctx.view_2d(gmask, nc, len, nc as usize * gmask.nb()[0], mask_off * gmask.nb()[0]);
                        fa(qs, gather(kc), gather(vc), ms)
                    }
                }; // [hd, n_head, len]
                ctx.set_prec_f32(o);
                o
            })
            .collect();
        // Join pairwise so each row is copied log2(segments) times at most.
        while outs.len() > 1 {
            outs = outs.chunks(2).map(|p| if p.len() == 2 { ctx.concat(p[0], p[1], 2) } else { p[0] }).collect();
        }
        return ctx.reshape_2d(outs[0], (head_dim * n_head) as i64, nt);
    }
    let q = ctx.permute(q, [0, 2, 1, 3]); // [hd, nt, n_head]
    if f.flash_attn {
        let o = fa(q, keys, vals, mask); // [hd, n_head, nt]
        ctx.set_prec_f32(o);
        return ctx.reshape_2d(o, (head_dim * n_head) as i64, nt);
    }
    let kq = ctx.mul_mat(keys, q); // [n_kv, nt, n_head]
    ctx.set_prec_f32(kq);
    let kq = ctx.soft_max_ext(kq, Some(mask), scale);
    if let Some(s) = sinks {
        ctx.soft_max_add_sinks(kq, s);
    }
    let vals_t = ctx.cont(ctx.permute(vals, [1, 0, 2, 3])); // [n_kv, hd, n_head_kv]
    let kqv = ctx.mul_mat(vals_t, kq); // [hd, nt, n_head]
    let o = ctx.permute(kqv, [0, 2, 1, 3]); // [hd, n_head, nt]
    ctx.reshape_2d(ctx.cont(o), (head_dim * n_head) as i64, nt)
}
