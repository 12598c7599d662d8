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

/// Elements of one cell of V.
fn v_row(v: &Tensor, v_trans: bool) -> i64 {
    if v_trans {
        v.ne()[1]
    } else {
        v.ne()[0]
    }
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

    /// The bytes of cells `0..n` of every layer (K then V), layout-independent: per layer, K rows
    /// then V rows (a transposed V is gathered column by column).
    pub fn read_cells(&self, n: usize) -> Result<Vec<u8>, GgmlError> {
        let mut out = Vec::new();
        for (k, v) in self.k.iter().zip(&self.v) {
            out.extend(k.read_bytes(0, n * k.nb()[1])?);
            if self.v_trans {
                let es = v.nb()[0];
                let rows = v.ne()[1] as usize;
                let mut col = vec![0u8; n * rows * es];
                for r in 0..rows {
                    let bytes = v.read_bytes(r * v.nb()[1], n * es)?;
                    for c in 0..n {
                        col[(c * rows + r) * es..(c * rows + r + 1) * es].copy_from_slice(&bytes[c * es..(c + 1) * es]);
                    }
                }
                out.extend(col);
            } else {
                out.extend(v.read_bytes(0, n * v.nb()[1])?);
            }
        }
        Ok(out)
    }

    /// Bytes `read_cells(n)` produces.
    pub fn cells_bytes(&self, n: usize) -> usize {
        self.k.iter().zip(&self.v).map(|(k, v)| n * k.nb()[1] + n * self.dtype.row_size(v_row(v, self.v_trans))).sum()
    }

    /// Write cells `0..n` from bytes made by `read_cells` of a cache with the same shapes and type.
    pub fn write_cells(&self, n: usize, data: &[u8]) -> Result<(), GgmlError> {
        let mut at = 0;
        for (k, v) in self.k.iter().zip(&self.v) {
            let kb = n * k.nb()[1];
            k.write_bytes(&data[at..at + kb], 0)?;
            at += kb;
            if self.v_trans {
                let es = v.nb()[0];
                let rows = v.ne()[1] as usize;
                for r in 0..rows {
                    let row: Vec<u8> = (0..n)
                        .flat_map(|c| data[at + (c * rows + r) * es..at + (c * rows + r + 1) * es].iter().copied())
                        .collect();
                    v.write_bytes(&row, r * v.nb()[1])?;
                }
                at += n * rows * es;
            } else {
                let vb = n * v.nb()[1];
                v.write_bytes(&data[at..at + vb], 0)?;
                at += vb;
            }
        }
        Ok(())
    }

    /// Bytes of backend memory held.
    pub fn bytes(&self) -> usize {
        self.buffer.size()
    }
}
