//! Bookkeeping of a KV cache shared by many sequences (llama.cpp's "unified" cache): the cache
//! is `n_cells` slots per layer; each cell holds the K/V of one position and belongs to a set of
//! sequences. A cell shared by several sequences is a common prefix stored once (a fork or a
//! prefix-cache hit adds a sequence to the cells instead of copying them); a cell with no
//! sequence is free. Pure data, no ggml: the tensors are in [`super::kv::KvCache`].
//!
//! Which cells a token attends to is decided by the mask (see [`KvCells::mask`]), so cells of a
//! sequence need not be contiguous or ordered.

/// Whether a token at `pos` attends to a cell of its sequence at `cell_pos` under a window of
/// `w` positions (`u32::MAX`: none): the cell is not later, and less than `w` back.
pub fn visible(cell_pos: u32, pos: u32, w: u32) -> bool {
    cell_pos <= pos && pos - cell_pos < w
}

/// A sequence id, below [`MAX_SEQ`].
pub type SeqId = u32;

/// Sequences one cache can tell apart (the width of a cell's sequence set).
pub const MAX_SEQ: usize = 256;

/// A set of sequence ids as a bitmap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct SeqSet([u64; MAX_SEQ / 64]);

impl SeqSet {
    fn has(&self, s: SeqId) -> bool {
        self.0[s as usize / 64] >> (s % 64) & 1 == 1
    }
    fn add(&mut self, s: SeqId) {
        self.0[s as usize / 64] |= 1 << (s % 64);
    }
    fn remove(&mut self, s: SeqId) {
        self.0[s as usize / 64] &= !(1 << (s % 64));
    }
    fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }
    fn intersects(&self, other: &SeqSet) -> bool {
        self.0.iter().zip(&other.0).any(|(a, b)| a & b != 0)
    }
    fn only(s: SeqId) -> SeqSet {
        let mut set = SeqSet::default();
        set.add(s);
        set
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Cell {
    pos: u32,
    seqs: SeqSet,
}

/// Which cells hold which positions of which sequences.
#[derive(Debug, Clone)]
pub struct KvCells {
    cells: Vec<Cell>,
    used: usize,
}

impl KvCells {
    pub fn new(n_cells: usize) -> KvCells {
        KvCells { cells: vec![Cell::default(); n_cells], used: 0 }
    }

    pub fn n_cells(&self) -> usize {
        self.cells.len()
    }

    /// Cells holding at least one sequence.
    pub fn used(&self) -> usize {
        self.used
    }

    pub fn free(&self) -> usize {
        self.cells.len() - self.used
    }

    fn is_free(&self, i: usize) -> bool {
        self.cells[i].seqs.is_empty()
    }

    /// Up to `n` free cells, lowest first (keeps the attended range short); `None` when fewer
    /// than `n` are free.
    pub fn find_slots(&self, n: usize) -> Option<Vec<u32>> {
        if n > self.free() {
            return None;
        }
        let slots: Vec<u32> = (0..self.cells.len()).filter(|&i| self.is_free(i)).take(n).map(|i| i as u32).collect();
        (slots.len() == n).then_some(slots)
    }

    /// Record that cell `slot` now holds position `pos` of `seq`. The cell must be free.
    pub fn occupy(&mut self, slot: u32, seq: SeqId, pos: u32) {
        let c = &mut self.cells[slot as usize];
        debug_assert!(c.seqs.is_empty(), "cell {slot} is in use");
        *c = Cell { pos, seqs: SeqSet::only(seq) };
        self.used += 1;
    }

    /// Free a cell whatever sequences hold it (rolls back a failed step).
    pub fn release(&mut self, slot: u32) {
        let c = &mut self.cells[slot as usize];
        if !c.seqs.is_empty() {
            c.seqs = SeqSet::default();
            self.used -= 1;
        }
    }

    /// Remove `seq` from the cells holding its positions `p0..p1`; returns cells freed.
    pub fn seq_rm(&mut self, seq: SeqId, p0: u32, p1: u32) -> usize {
        let mut freed = 0;
        for c in &mut self.cells {
            if c.seqs.has(seq) && c.pos >= p0 && c.pos < p1 {
                c.seqs.remove(seq);
                if c.seqs.is_empty() {
                    freed += 1;
                }
            }
        }
        self.used -= freed;
        freed
    }

    /// Share positions `p0..p1` of `src` with `dst` (no copy: the cells gain a sequence).
    pub fn seq_cp(&mut self, src: SeqId, dst: SeqId, p0: u32, p1: u32) {
        for c in &mut self.cells {
            if c.seqs.has(src) && c.pos >= p0 && c.pos < p1 {
                c.seqs.add(dst);
            }
        }
    }

    /// Drop every sequence except `seq`.
    pub fn seq_keep(&mut self, seq: SeqId) {
        for c in &mut self.cells {
            if c.seqs.is_empty() {
                continue;
            }
            let had = c.seqs.has(seq);
            c.seqs = if had { SeqSet::only(seq) } else { SeqSet::default() };
            if !had {
                self.used -= 1;
            }
        }
    }

    /// Cells `seq` holds.
    pub fn seq_len(&self, seq: SeqId) -> usize {
        self.cells.iter().filter(|c| c.seqs.has(seq)).count()
    }

    /// Cells held by any of `seqs`.
    pub fn used_by(&self, seqs: &[SeqId]) -> usize {
        let mut set = SeqSet::default();
        seqs.iter().for_each(|&s| set.add(s));
        self.cells.iter().filter(|c| c.seqs.0.iter().zip(&set.0).any(|(a, b)| a & b != 0)).count()
    }

    /// `(cell, position)` of every cell of `seq`, in position order.
    pub fn seq_cells(&self, seq: SeqId) -> Vec<(u32, u32)> {
        let mut v: Vec<(u32, u32)> = (0..self.cells.len())
            .filter(|&i| self.cells[i].seqs.has(seq))
            .map(|i| (i as u32, self.cells[i].pos))
            .collect();
        v.sort_by_key(|&(_, p)| p);
        v
    }

    /// The cells of each of `seqs` among the first `n_kv`, each list in position order, as
    /// `(cell, position)` (one pass over the cells for all of them).
    pub fn cells_of(&self, seqs: &[SeqId], n_kv: usize) -> Vec<Vec<(u32, u32)>> {
        let mut out: Vec<Vec<(u32, u32)>> = vec![Vec::new(); seqs.len()];
        let mut wanted = SeqSet::default();
        for &s in seqs {
            wanted.add(s);
        }
        for (i, c) in self.cells[..n_kv.min(self.cells.len())].iter().enumerate() {
            // Most cells belong to none of them: one test of the four words each.
            if !c.seqs.intersects(&wanted) {
                continue;
            }
            for (k, &s) in seqs.iter().enumerate() {
                if c.seqs.has(s) {
                    out[k].push((i as u32, c.pos));
                }
            }
        }
        for v in &mut out {
            v.sort_by_key(|&(_, p)| p);
        }
        out
    }

    /// Cells a step must cover: one past the highest used cell.
    pub fn n_kv(&self) -> usize {
        (0..self.cells.len()).rev().find(|&i| !self.is_free(i)).map_or(0, |i| i + 1)
    }

    /// Row-major `[tokens][n_kv]` attention mask: token `(seq, pos)` sees a cell of its own
    /// sequence at a position `<= pos` (and, with a window `w`, `> pos - w`); 0 where it may
    /// attend, -inf elsewhere. Sequences never see each other's cells unless they share them.
    pub fn mask(&self, tokens: &[(SeqId, u32)], n_kv: usize, window: Option<usize>) -> Vec<f32> {
        self.mask_as(tokens, n_kv, window, 0.0, f32::NEG_INFINITY)
    }

    /// [`KvCells::mask`] written as any element type (`visible`, `hidden`: its 0 and -inf), so an
    /// F16 mask is built without an F32 copy. Per sequence of the step, each cell's position is
    /// looked up once (`u32::MAX` where the sequence does not hold the cell); a row is then one
    /// compare per cell. Large masks (long contexts: `n_kv` x ubatch rows) are filled by several
    /// threads.
    pub fn mask_as<T: Copy + Send + Sync>(
        &self,
        tokens: &[(SeqId, u32)],
        n_kv: usize,
        window: Option<usize>,
        visible: T,
        hidden: T,
    ) -> Vec<T> {
        let cells = &self.cells[..n_kv];
        let mut seqs: Vec<SeqId> = tokens.iter().map(|t| t.0).collect();
        seqs.sort_unstable();
        seqs.dedup();
        let seen: Vec<Vec<u32>> = seqs
            .iter()
            .map(|&s| cells.iter().map(|c| if c.seqs.has(s) { c.pos } else { u32::MAX }).collect())
            .collect();
        let w = window.map_or(u32::MAX, |w| w.min(u32::MAX as usize) as u32);
        let fill = |rows: &mut [T], toks: &[(SeqId, u32)]| {
            for (row, &(seq, pos)) in rows.chunks_exact_mut(n_kv).zip(toks) {
                let held = &seen[seqs.binary_search(&seq).expect("listed above")];
                for (x, &p) in row.iter_mut().zip(held) {
                    *x = if self::visible(p, pos, w) { visible } else { hidden };
                }
            }
        };
        let mut m = vec![hidden; n_kv * tokens.len()];
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(16);
        if threads < 2 || m.len() < 1 << 22 {
            fill(&mut m, tokens);
            return m;
        }
        let per = tokens.len().div_ceil(threads);
        let fill = &fill;
        std::thread::scope(|sc| {
            for (rows, toks) in m.chunks_mut(per * n_kv).zip(tokens.chunks(per)) {
                sc.spawn(move || fill(rows, toks));
            }
        });
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(c: &mut KvCells, seq: SeqId, positions: std::ops::Range<u32>) -> Vec<u32> {
        let slots = c.find_slots(positions.len()).unwrap();
        for (&s, p) in slots.iter().zip(positions) {
            c.occupy(s, seq, p);
        }
        slots
    }

    #[test]
    fn cells_of_lists_each_sequences_cells_in_position_order() {
        let mut c = KvCells::new(16);
        let a = fill(&mut c, 0, 0..3);
        let b = fill(&mut c, 1, 0..2);
        // Sequence 2 shares sequence 0's first two cells (a fork), then has one of its own.
        c.seq_cp(0, 2, 0, 2);
        let own = fill(&mut c, 2, 2..3);
        // Sequence 200 (another bitmap word) at cells out of position order.
        c.occupy(9, 200, 1);
        c.occupy(8, 200, 0);
        let got = c.cells_of(&[2, 0, 200, 7, 2], 16);
        assert_eq!(got[0], vec![(a[0], 0), (a[1], 1), (own[0], 2)]);
        assert_eq!(got[1], vec![(a[0], 0), (a[1], 1), (a[2], 2)]);
        assert_eq!(got[2], vec![(8, 0), (9, 1)]);
        assert!(got[3].is_empty(), "a sequence without cells");
        assert_eq!(got[4], got[0], "a sequence asked for twice");
        assert!(!got.iter().flatten().any(|&(cell, _)| b.contains(&cell)), "sequence 1 was not asked for");
        assert_eq!(c.cells_of(&[200], 9), vec![vec![(8, 0)]], "only cells below n_kv");
    }

    #[test]
    fn sequences_are_masked_apart() {
        let mut c = KvCells::new(8);
        fill(&mut c, 0, 0..3);
        fill(&mut c, 1, 0..2);
        let inf = f32::NEG_INFINITY;
        let m = c.mask(&[(0, 2), (1, 1), (1, 0)], 5, None);
        assert_eq!(&m[0..5], &[0.0, 0.0, 0.0, inf, inf]);
        assert_eq!(&m[5..10], &[inf, inf, inf, 0.0, 0.0]);
        assert_eq!(&m[10..15], &[inf, inf, inf, 0.0, inf]);
        let w = c.mask(&[(0, 2)], 5, Some(2));
        assert_eq!(w, vec![inf, 0.0, 0.0, inf, inf]);
    }

    #[test]
    fn a_large_mask_built_by_threads_equals_the_cell_by_cell_rule() {
        // Three sequences interleaved over 8192 cells, one shared prefix, 600 rows: past the
        // size where the rows are split over threads.
        let mut c = KvCells::new(8192);
        for i in 0..8000u32 {
            c.occupy(i, i % 3, i / 3);
        }
        c.seq_cp(0, 3, 0, 100);
        let tokens: Vec<(SeqId, u32)> = (0..600u32).map(|r| (r % 4, 2000 + r)).collect();
        for window in [None, Some(700)] {
            let m = c.mask(&tokens, 8192, window);
            for (r, &(seq, pos)) in tokens.iter().enumerate() {
                for (j, cell) in c.cells.iter().enumerate() {
                    let vis = cell.seqs.has(seq) && cell.pos <= pos && window.is_none_or(|w| pos - cell.pos < w as u32);
                    assert_eq!(m[r * 8192 + j] == 0.0, vis, "row {r} cell {j} window {window:?}");
                }
            }
        }
    }

    #[test]
    fn shared_prefix_is_stored_once_and_freed_with_its_last_owner() {
        let mut c = KvCells::new(8);
        fill(&mut c, 0, 0..4);
        c.seq_cp(0, 1, 0, 3);
        assert_eq!(c.used(), 4);
        assert_eq!(c.seq_len(1), 3);
        assert_eq!(c.seq_rm(0, 0, u32::MAX), 1, "only the unshared cell is freed");
        assert_eq!(c.used(), 3);
        assert_eq!(c.seq_rm(1, 0, u32::MAX), 3);
        assert_eq!(c.used(), 0);
        assert_eq!(c.n_kv(), 0);
    }

    #[test]
    fn slots_are_lowest_free_and_full_cache_says_none() {
        let mut c = KvCells::new(4);
        fill(&mut c, 0, 0..2);
        fill(&mut c, 1, 0..2);
        assert!(c.find_slots(1).is_none());
        c.seq_rm(0, 1, 2);
        assert_eq!(c.find_slots(1), Some(vec![1]));
        c.seq_keep(1);
        assert_eq!(c.used(), 2);
        assert_eq!(c.seq_cells(1), vec![(2, 0), (3, 1)]);
    }
}
