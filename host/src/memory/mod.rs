//! Model memory that persists across steps: the KV cache of attention layers (tensors in
//! [`kv`], which cells hold which sequence in [`cells`]), and prompt-cache files that save and
//! restore a sequence ([`state`]); the recurrent state of hybrid models ([`recurrent`]).

pub mod cells;
pub mod kv;
pub mod recurrent;
pub mod state;

use crate::ggml::{Backend, Buffer, GgmlError, Tensor};

/// Per-layer state tensors (`pair(i)` for layer `i`) in one zeroed buffer per backend, layer `i`
/// on `backends[layer_backend[i]]`; `what(n)` names `n` layers' share in an out-of-memory error.
/// Returns the buffers and the bytes each backend holds.
pub(crate) fn alloc_per_backend(
    backends: &[&Backend],
    layer_backend: &[usize],
    pair: impl Fn(usize) -> [Tensor; 2],
    what: impl Fn(usize) -> String,
) -> Result<(Vec<Buffer>, Vec<usize>), GgmlError> {
    let mut buffers = Vec::new();
    let mut per_backend = vec![0; backends.len()];
    for (b, backend) in backends.iter().enumerate() {
        let tensors: Vec<Tensor> =
            (0..layer_backend.len()).filter(|&i| layer_backend[i] == b).flat_map(&pair).collect();
        if tensors.is_empty() {
            continue;
        }
        let buffer = Buffer::alloc_tensors_on(backend, &tensors, &what(tensors.len() / 2))?;
        // Zeroed: masked KV cells must never hold NaN/Inf bit patterns (0 * NaN is NaN), and a
        // fresh recurrent state starts at zero.
        buffer.clear();
        per_backend[b] = buffer.size();
        buffers.push(buffer);
    }
    Ok((buffers, per_backend))
}
