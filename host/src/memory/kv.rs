//! The KV cache tensors: per layer, K as `[n_embd_k, n_cells]` and V as `[n_embd_v, n_cells]`,
//! one row per cell. A step writes its rows into free cells with `set_rows` (cells chosen by
//! [`super::cells::KvCells`]), and attention reads the first `n_kv` rows as a view, so neither
//! needs a copy. Flash attention reads V rows directly; the unfused path transposes them.

use crate::ggml::{Backend, Buffer, Context, DType, GgmlError, Tensor};

pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    n_cells: usize,
    dtype: DType,
    /// One buffer per backend holding layers, and its bytes per backend
    buffers: Vec<Buffer>,
    per_backend: Vec<usize>,
    // Owns the tensor headers above; declared last so it is dropped after the buffer.
    _ctx: crate::ggml::Headers,
}

impl KvCache {
    /// A cache of `n_cells` cells for layers living on `backends[layer_backend[il]]`: each
    /// layer's K and V sit on its layer's device.
    pub fn new(
        backends: &[&Backend],
        layer_backend: &[usize],
        n_embd_k: usize,
        n_embd_v: usize,
        n_cells: usize,
        dtype: DType,
    ) -> Result<KvCache, GgmlError> {
        let n_layer = layer_backend.len();
        let ctx = Context::new(2 * n_layer + 1, 0)?;
        let mut k = Vec::with_capacity(n_layer);
        let mut v = Vec::with_capacity(n_layer);
        for il in 0..n_layer {
            k.push(ctx.new_tensor(dtype, &[n_embd_k as i64, n_cells as i64], &format!("cache_k_l{il}")));
            v.push(ctx.new_tensor(dtype, &[n_embd_v as i64, n_cells as i64], &format!("cache_v_l{il}")));
        }
        let (buffers, per_backend) = super::alloc_per_backend(
            backends,
            layer_backend,
            |il| [k[il], v[il]],
            |n| format!("the KV cache ({n_cells} cells, {}, {n} layers)", dtype.name()),
        )?;
        Ok(KvCache { k, v, n_cells, dtype, buffers, per_backend, _ctx: ctx.into_headers() })
    }

    pub fn k(&self, il: usize) -> Tensor {
        self.k[il]
    }

    pub fn v(&self, il: usize) -> Tensor {
        self.v[il]
    }

    pub fn n_cells(&self) -> usize {
        self.n_cells
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes of one cell over all layers (K and V).
    pub fn cell_bytes(&self) -> usize {
        self.k.iter().zip(&self.v).map(|(k, v)| k.nb()[1] + v.nb()[1]).sum()
    }

    /// Copy every cell of `other` (same shapes) into this cache.
    pub fn copy_from(&self, other: &KvCache) -> Result<(), GgmlError> {
        for (a, b) in self.k.iter().zip(&other.k).chain(self.v.iter().zip(&other.v)) {
            a.copy_from(*b)?;
        }
        Ok(())
    }

    /// The bytes of `cells` (in that order) of every layer: per layer, their K rows then their V
    /// rows. Independent of where the cells sit, so it loads into any free cells.
    pub fn read_cells(&self, cells: &[u32]) -> Result<Vec<u8>, GgmlError> {
        let mut out = Vec::with_capacity(cells.len() * self.cell_bytes());
        for t in self.k.iter().zip(&self.v).flat_map(|(k, v)| [k, v]) {
            let row = t.nb()[1];
            for (start, len) in runs(cells) {
                out.extend(t.read_bytes(start as usize * row, len * row)?);
            }
        }
        Ok(out)
    }

    /// Bytes `read_cells` produces for `n` cells.
    pub fn cells_bytes(&self, n: usize) -> usize {
        n * self.cell_bytes()
    }

    /// Write `cells` from bytes made by `read_cells` of a cache with the same shapes and type.
    pub fn write_cells(&self, cells: &[u32], data: &[u8]) -> Result<(), GgmlError> {
        let mut at = 0;
        for t in self.k.iter().zip(&self.v).flat_map(|(k, v)| [k, v]) {
            let row = t.nb()[1];
            for (start, len) in runs(cells) {
                t.write_bytes(&data[at..at + len * row], start as usize * row)?;
                at += len * row;
            }
        }
        Ok(())
    }

    /// Bytes of backend memory held.
    pub fn bytes(&self) -> usize {
        self.buffers.iter().map(Buffer::size).sum()
    }

    /// Bytes held on each backend.
    pub fn bytes_per_backend(&self) -> &[usize] {
        &self.per_backend
    }
}

/// `cells` as runs of consecutive indices: `(first, length)`.
fn runs(cells: &[u32]) -> Vec<(u32, usize)> {
    let mut out: Vec<(u32, usize)> = Vec::new();
    for &c in cells {
        match out.last_mut() {
            Some((s, n)) if *s + *n as u32 == c => *n += 1,
            _ => out.push((c, 1)),
        }
    }
    out
}
