//! The automatic prefix cache: finished sequences leave their KV cells behind under a cache
//! entry (a sequence id the cache owns), indexed by chained hashes of their token blocks. A new
//! request looks up the longest cached prefix of its prompt and shares those cells instead of
//! recomputing them; entries are evicted least-recently-used when cells or ids run short.
//!
//! Block `i` of a token list hashes the hash of block `i-1` with its own tokens, so one hash
//! names a whole prefix; a hit is verified token by token (a hash collision costs a miss, never
//! a wrong answer) and extended token by token past the last whole block.
//!
//! K/V depend on more than the tokens when LoRA adapters are active: every entry carries a
//! `salt` naming what computed it (0: the base model; see `adapters_salt` in the scheduler),
//! which seeds its hash chain and must match for a hit.

use std::collections::HashMap;

use crate::memory::cells::SeqId;

/// Tokens per hashed block.
pub const BLOCK: usize = 16;

struct Entry {
    seq: SeqId,
    salt: u64,
    tokens: Vec<u32>,
    hashes: Vec<u64>,
    last_used: u64,
}

/// A cache hit: share positions `0..len` of `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub entry: u64,
    pub seq: SeqId,
    pub len: usize,
}

#[derive(Default)]
pub struct PrefixCache {
    /// Entries are usable only whole (hybrid models: an entry's recurrent state stands at its
    /// end), so an entry that is a prefix of another is not redundant (see [`PrefixCache::nested`])
    nested: bool,
    entries: HashMap<u64, Entry>,
    /// Block-chain hash -> entries having that prefix
    index: HashMap<u64, Vec<u64>>,
    next_id: u64,
    clock: u64,
}

fn block_hashes(salt: u64, tokens: &[u32]) -> Vec<u64> {
    let mut h: u64 = 0xcbf29ce484222325 ^ salt.wrapping_mul(0x9e3779b97f4a7c15);
    tokens
        .chunks_exact(BLOCK)
        .map(|b| {
            for &t in b {
                for byte in t.to_le_bytes() {
                    h ^= byte as u64;
                    h = h.wrapping_mul(0x100000001b3);
                }
            }
            h
        })
        .collect()
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    /// A cache for hybrid models: entries are used whole ([`PrefixCache::lookup_whole`]) and one
    /// that is a prefix of another is kept (a state snapshot on the way to the longer one).
    pub fn nested() -> PrefixCache {
        PrefixCache { nested: true, ..Default::default() }
    }

    /// The longest entry computed under `salt` whose tokens are all a prefix of `tokens` and
    /// shorter than `below` (at least one whole block).
    pub fn lookup_whole(&self, salt: u64, tokens: &[u32], below: usize) -> Option<Hit> {
        let mut best: Option<Hit> = None;
        for h in block_hashes(salt, tokens) {
            let Some(ids) = self.index.get(&h) else { break };
            for &id in ids {
                let e = &self.entries[&id];
                let len = e.tokens.len();
                if e.salt == salt && len < below && tokens.starts_with(&e.tokens) {
                    let better = best.is_none_or(|b| (len, e.last_used) > (b.len, self.entries[&b.entry].last_used));
                    if better {
                        best = Some(Hit { entry: id, seq: e.seq, len });
                    }
                }
            }
        }
        best
    }

    /// Whether this is a [`PrefixCache::nested`] cache.
    pub fn is_nested(&self) -> bool {
        self.nested
    }

    /// Whether an entry computed under `salt` holds exactly `tokens`.
    pub fn contains_whole(&self, salt: u64, tokens: &[u32]) -> bool {
        self.lookup_whole(salt, tokens, tokens.len() + 1).is_some_and(|h| h.len == tokens.len())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry computed under `salt` sharing the longest prefix with `tokens` (at least one
    /// whole block).
    pub fn lookup(&self, salt: u64, tokens: &[u32]) -> Option<Hit> {
        let mut best: Option<&Vec<u64>> = None;
        for h in block_hashes(salt, tokens) {
            match self.index.get(&h) {
                Some(ids) => best = Some(ids),
                None => break,
            }
        }
        best?
            .iter()
            .map(|id| (id, &self.entries[id]))
            .filter(|(_, e)| e.salt == salt)
            .map(|(&id, e)| Hit { entry: id, seq: e.seq, len: common_prefix(&e.tokens, tokens) })
            .filter(|h| h.len >= BLOCK)
            .max_by_key(|h| (h.len, self.entries[&h.entry].last_used))
    }

    /// Mark an entry used now.
    pub fn touch(&mut self, entry: u64) {
        self.clock += 1;
        if let Some(e) = self.entries.get_mut(&entry) {
            e.last_used = self.clock;
        }
    }

    /// Cache `tokens` held by `seq`. Returns the sequences whose cells the caller must free:
    /// `seq` itself when an entry already covers `tokens` (or they are shorter than a block),
    /// and entries the new one makes redundant (their tokens are a prefix of `tokens`).
    pub fn insert(&mut self, seq: SeqId, salt: u64, tokens: Vec<u32>) -> Vec<SeqId> {
        let exists = if self.nested {
            self.contains_whole(salt, &tokens)
        } else {
            self.lookup(salt, &tokens).is_some_and(|h| h.len == tokens.len())
        };
        if tokens.len() < BLOCK || exists {
            return vec![seq];
        }
        let covered: Vec<u64> = self
            .entries
            .iter()
            .filter(|_| !self.nested)
            .filter(|(_, e)| e.salt == salt && e.tokens.len() <= tokens.len() && tokens.starts_with(&e.tokens))
            .map(|(&id, _)| id)
            .collect();
        let mut freed: Vec<SeqId> = covered.into_iter().filter_map(|id| self.remove(id)).collect();
        let id = self.next_id;
        self.next_id += 1;
        self.clock += 1;
        let hashes = block_hashes(salt, &tokens);
        for &h in &hashes {
            self.index.entry(h).or_default().push(id);
        }
        self.entries.insert(id, Entry { seq, salt, tokens, hashes, last_used: self.clock });
        freed.sort_unstable();
        freed
    }

    /// Remove an entry; returns the sequence whose cells the caller must free.
    pub fn remove(&mut self, id: u64) -> Option<SeqId> {
        let e = self.entries.remove(&id)?;
        for h in &e.hashes {
            if let Some(ids) = self.index.get_mut(h) {
                ids.retain(|&x| x != id);
                if ids.is_empty() {
                    self.index.remove(h);
                }
            }
        }
        Some(e.seq)
    }

    /// Evict the least recently used entry other than `keep`; returns its sequence.
    pub fn evict_lru(&mut self, keep: Option<u64>) -> Option<SeqId> {
        let id = self
            .entries
            .iter()
            .filter(|(&id, _)| Some(id) != keep)
            .min_by_key(|(_, e)| e.last_used)
            .map(|(&id, _)| id)?;
        self.remove(id)
    }

    /// Sequence ids of all entries.
    pub fn seqs(&self) -> Vec<SeqId> {
        self.entries.values().map(|e| e.seq).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn longest_prefix_wins_and_extends_past_the_last_block() {
        let mut c = PrefixCache::default();
        let a = toks(40, 0);
        assert!(c.insert(1, 0, a.clone()).is_empty());
        let mut q = a[..37].to_vec();
        q.extend([9999, 9998]);
        assert_eq!(c.lookup(0, &q), Some(Hit { entry: 0, seq: 1, len: 37 }));
        assert_eq!(c.lookup(0, &toks(40, 1)), None, "different tokens miss");
        assert_eq!(c.lookup(0, &a[..10]), None, "less than a block is not worth sharing");
        assert_eq!(c.lookup(7, &q), None, "K/V computed under other adapters miss");
        assert!(c.insert(2, 7, a.clone()).is_empty(), "the same tokens under another salt are another entry");
        assert_eq!(c.lookup(7, &q).map(|h| h.seq), Some(2));
        assert_eq!(c.lookup(0, &q).map(|h| h.seq), Some(1));
    }

    #[test]
    fn nested_entries_are_kept_and_used_whole() {
        let mut c = PrefixCache::nested();
        let a = toks(64, 0);
        assert!(c.insert(1, 0, a[..32].to_vec()).is_empty());
        assert!(c.insert(2, 0, a.clone()).is_empty(), "the shorter entry stays");
        assert_eq!(c.len(), 2);
        assert_eq!(c.insert(3, 0, a[..32].to_vec()), vec![3], "the same tokens again");
        let mut q = a[..50].to_vec();
        q.push(9999);
        // The longer entry shares 50 tokens but is not whole inside the query: the snapshot is.
        assert_eq!(c.lookup_whole(0, &q, q.len()), Some(Hit { entry: 0, seq: 1, len: 32 }));
        let mut q = a.clone();
        q.push(5);
        assert_eq!(c.lookup_whole(0, &q, q.len()).map(|h| h.seq), Some(2));
        assert_eq!(c.lookup_whole(0, &a, a.len()).map(|h| h.seq), Some(1), "at least one token left to compute");
        assert_eq!(c.lookup_whole(1, &q, q.len()), None, "another salt");
    }

    #[test]
    fn redundant_entries_are_dropped_and_lru_evicts_oldest() {
        let mut c = PrefixCache::default();
        let a = toks(20, 0);
        c.insert(1, 0, a.clone());
        assert_eq!(c.insert(2, 0, a[..18].to_vec()), vec![2], "already covered");
        let mut longer = a.clone();
        longer.extend(toks(20, 3));
        assert_eq!(c.insert(3, 0, longer), vec![1], "the shorter entry is covered by the longer");
        c.insert(4, 0, toks(32, 5));
        assert_eq!(c.len(), 2);
        c.touch(c.lookup(0, &a).unwrap().entry);
        assert_eq!(c.evict_lru(None), Some(4));
        assert_eq!(c.evict_lru(None), Some(3));
        assert_eq!(c.evict_lru(None), None);
        assert!(c.index.is_empty());
    }
}
