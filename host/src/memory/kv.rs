//! A single-sequence KV cache: per layer, K as `[n_embd_k, n_ctx]` (one row per cell) and V either
//! the same way (for flash attention, which reads V rows) or transposed as `[n_ctx, n_embd_v]`
//! (for `softmax(KQ) V` as a plain `mul_mat`), so attention reads both without copies.
//!
//! Cells `0..used` hold positions `0..used` of the one sequence. A step writes its tokens at
//! `used..used+n` and attends to cells `0..used+n`.

use crate::ggml::{Backend, Buffer, Context, DType, GgmlError, Tensor};

pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    n_ctx: usize,
    dtype: DType,
    v_trans: bool,
    buffer: Buffer,
    // Owns the tensor headers above; declared last so it is dropped after the buffer.
    _ctx: Context,
}

impl KvCache {
    pub fn new(
        backend: &Backend,
        n_layer: usize,
        n_embd_k: usize,
        n_embd_v: usize,
        n_ctx: usize,
        dtype: DType,
        v_trans: bool,
    ) -> Result<KvCache, GgmlError> {
        let ctx = Context::new(2 * n_layer + 1, 0)?;
        let mut k = Vec::with_capacity(n_layer);
        let mut v = Vec::with_capacity(n_layer);
        for il in 0..n_layer {
            k.push(ctx.new_tensor(dtype, &[n_embd_k as i64, n_ctx as i64], &format!("cache_k_l{il}")));
            // Flash attention reads V rows like K; the unfused path wants V transposed.
            let v_shape = if v_trans { [n_ctx as i64, n_embd_v as i64] } else { [n_embd_v as i64, n_ctx as i64] };
            v.push(ctx.new_tensor(dtype, &v_shape, &format!("cache_v_l{il}")));
        }
        let buffer = ctx.alloc_tensors(backend)?;
        // Zero it: masked cells must never hold NaN/Inf bit patterns (0 * NaN is NaN).
        buffer.clear();
        Ok(KvCache { k, v, n_ctx, dtype, v_trans, buffer, _ctx: ctx })
    }

    pub fn k(&self, il: usize) -> Tensor {
        self.k[il]
    }

    pub fn v(&self, il: usize) -> Tensor {
        self.v[il]
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Whether V is stored transposed (`[n_ctx, n_embd_v]`, for attention without flash-attn).
    pub fn v_trans(&self) -> bool {
        self.v_trans
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Copy every cell of `other` (same shapes) into this cache.
    pub fn copy_from(&self, other: &KvCache) -> Result<(), GgmlError> {
        for (a, b) in self.k.iter().zip(&other.k).chain(self.v.iter().zip(&other.v)) {
            a.copy_from(*b)?;
        }
        Ok(())
    }

    /// Bytes of backend memory held.
    pub fn bytes(&self) -> usize {
        self.buffer.size()
    }
}
