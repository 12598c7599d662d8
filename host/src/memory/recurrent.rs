//! Recurrent state of the Mamba layers of hybrid models: per layer, the convolution state (the
//! last `d_conv - 1` inputs of the causal conv, `[conv_row, n_slots]`) and the SSM state
//! (`[ssm_row, n_slots]`), F32, one slot per live sequence. Unlike KV cells, a slot holds a
//! sequence's whole past: it advances with every token and cannot be rewound, so a fork copies the
//! slot and truncating a sequence is refused (see ARCHITECTURE.md: hybrid memory).

use std::collections::BTreeMap;

use crate::ggml::{Backend, Buffer, Context, DType, GgmlError, Tensor};
use crate::memory::cells::SeqId;

/// Sizes of one Mamba layer's state rows (F32 elements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecurrentShape {
    /// Model layers that are recurrent, in order
    pub layers: Vec<usize>,
    /// (d_conv - 1) * conv channels
    pub conv_row: usize,
    /// d_state * head_dim * n_heads
    pub ssm_row: usize,
}

pub struct RecurrentCache {
    conv: Vec<Tensor>,
    ssm: Vec<Tensor>,
    n_slots: usize,
    slots: BTreeMap<SeqId, u32>,
    /// The position each sequence's state has consumed up to (its next token's position)
    next_pos: BTreeMap<SeqId, u32>,
    free: Vec<u32>,
    buffers: Vec<Buffer>,
    per_backend: Vec<usize>,
    // Owns the headers; declared last.
    _ctx: crate::ggml::Headers,
}

impl RecurrentCache {
    /// `layer_backend[i]`: the backend of recurrent layer `i` (of `shape.layers`).
    pub fn new(
        backends: &[&Backend],
        layer_backend: &[usize],
        shape: RecurrentShape,
        n_slots: usize,
    ) -> Result<RecurrentCache, GgmlError> {
        let n = shape.layers.len();
        let n_slots = n_slots.max(1);
        let ctx = Context::new(2 * n + 1, 0)?;
        let conv: Vec<Tensor> = (0..n)
            .map(|i| ctx.new_tensor(DType::F32, &[shape.conv_row as i64, n_slots as i64], &format!("rs_conv_{i}")))
            .collect();
        let ssm: Vec<Tensor> = (0..n)
            .map(|i| ctx.new_tensor(DType::F32, &[shape.ssm_row as i64, n_slots as i64], &format!("rs_ssm_{i}")))
            .collect();
        let (buffers, per_backend) = super::alloc_per_backend(
            backends,
            layer_backend,
            |i| [conv[i], ssm[i]],
            |n| format!("the recurrent state ({n_slots} sequences, {n} layers)"),
        )?;
        let free = (0..n_slots as u32).rev().collect();
        Ok(RecurrentCache {
            conv,
            ssm,
            n_slots,
            slots: BTreeMap::new(),
            next_pos: BTreeMap::new(),
            free,
            buffers,
            per_backend,
            _ctx: ctx.into_headers(),
        })
    }

    pub fn conv(&self, i: usize) -> Tensor {
        self.conv[i]
    }

    pub fn ssm(&self, i: usize) -> Tensor {
        self.ssm[i]
    }

    pub fn n_slots(&self) -> usize {
        self.n_slots
    }

    pub fn slot(&self, seq: SeqId) -> Option<u32> {
        self.slots.get(&seq).copied()
    }

    /// The slot of `seq`, taking a zeroed one for a sequence that has none; `None` when all are
    /// taken.
    pub fn ensure(&mut self, seq: SeqId) -> Result<Option<u32>, GgmlError> {
        if let Some(s) = self.slot(seq) {
            return Ok(Some(s));
        }
        let Some(s) = self.free.pop() else {
            return Ok(None);
        };
        self.zero(s)?;
        self.slots.insert(seq, s);
        Ok(Some(s))
    }

    /// Give `seq`'s slot back.
    pub fn release(&mut self, seq: SeqId) {
        self.next_pos.remove(&seq);
        if let Some(s) = self.slots.remove(&seq) {
            self.free.push(s);
        }
    }

    /// The position `seq`'s state expects next (0 for a sequence without state).
    pub fn next_pos(&self, seq: SeqId) -> u32 {
        self.next_pos.get(&seq).copied().unwrap_or(0)
    }

    pub fn set_next_pos(&mut self, seq: SeqId, pos: u32) {
        self.next_pos.insert(seq, pos);
    }

    /// Sequences holding a slot.
    pub fn seqs(&self) -> Vec<SeqId> {
        self.slots.keys().copied().collect()
    }

    /// `dst` gets a copy of `src`'s state (a fork). False when no slot is free.
    pub fn copy(&mut self, src: SeqId, dst: SeqId) -> Result<bool, GgmlError> {
        let Some(from) = self.slot(src) else {
            self.release(dst);
            return Ok(true);
        };
        let Some(to) = self.ensure(dst)? else {
            return Ok(false);
        };
        for t in self.conv.iter().chain(&self.ssm) {
            let row = t.nb()[1];
            let bytes = t.read_bytes(from as usize * row, row)?;
            t.write_bytes(&bytes, to as usize * row)?;
        }
        self.next_pos.insert(dst, self.next_pos(src));
        Ok(true)
    }

    /// Every slot and its bookkeeping from `other` (same shapes).
    pub fn copy_all_from(&mut self, other: &RecurrentCache) -> Result<(), GgmlError> {
        for (a, b) in self.conv.iter().zip(&other.conv).chain(self.ssm.iter().zip(&other.ssm)) {
            a.copy_from(*b)?;
        }
        self.slots = other.slots.clone();
        self.next_pos = other.next_pos.clone();
        self.free = other.free.clone();
        Ok(())
    }

    /// Bytes of one sequence's state: per recurrent layer, its conv row then its SSM row.
    pub fn slot_bytes(&self) -> usize {
        self.conv.iter().zip(&self.ssm).map(|(c, s)| c.nb()[1] + s.nb()[1]).sum()
    }

    /// `seq`'s state as bytes (see [`RecurrentCache::slot_bytes`]); zeros for a sequence without
    /// a slot (nothing consumed yet).
    pub fn read_slot(&self, seq: SeqId) -> Result<Vec<u8>, GgmlError> {
        let Some(slot) = self.slot(seq) else {
            return Ok(vec![0; self.slot_bytes()]);
        };
        let mut out = Vec::with_capacity(self.slot_bytes());
        for (c, s) in self.conv.iter().zip(&self.ssm) {
            for t in [c, s] {
                let row = t.nb()[1];
                out.extend(t.read_bytes(slot as usize * row, row)?);
            }
        }
        Ok(out)
    }

    /// Give `seq` the state `data` (from [`RecurrentCache::read_slot`] of a cache with the same
    /// shapes) that has consumed positions `0..next_pos`. False when no slot is free.
    pub fn write_slot(&mut self, seq: SeqId, data: &[u8], next_pos: u32) -> Result<bool, GgmlError> {
        if data.len() != self.slot_bytes() {
            return Err(GgmlError::Tensor {
                name: "recurrent state".into(),
                msg: format!("{} bytes given, this model's sequences hold {}", data.len(), self.slot_bytes()),
            });
        }
        let Some(slot) = self.ensure(seq)? else {
            return Ok(false);
        };
        let mut at = 0;
        for (c, s) in self.conv.iter().zip(&self.ssm) {
            for t in [c, s] {
                let row = t.nb()[1];
                t.write_bytes(&data[at..at + row], slot as usize * row)?;
                at += row;
            }
        }
        self.next_pos.insert(seq, next_pos);
        Ok(true)
    }

    fn zero(&self, slot: u32) -> Result<(), GgmlError> {
        for t in self.conv.iter().chain(&self.ssm) {
            let row = t.nb()[1];
            t.write_bytes(&vec![0u8; row], slot as usize * row)?;
        }
        Ok(())
    }

    /// Bytes held, in all and per backend.
    pub fn bytes(&self) -> usize {
        self.buffers.iter().map(Buffer::size).sum()
    }

    pub fn bytes_per_backend(&self) -> &[usize] {
        &self.per_backend
    }
}
