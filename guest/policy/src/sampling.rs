//! Samplers over candidate lists: repetition / presence / frequency penalties, temperature,
//! top-k, top-p, min-p, seeded draws. The order follows HF's logits processors: penalties, then
//! temperature, top-k, top-p, min-p.

/// A candidate token and its logit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub id: u32,
    pub logit: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy
    pub temperature: f32,
    /// 0 = off
    pub top_k: u32,
    /// 1 = off
    pub top_p: f32,
    /// 0 = off
    pub min_p: f32,
    /// 1 = off; HF: logit / p if positive else logit * p, for tokens seen before
    pub repetition_penalty: f32,
    /// 0 = off; OpenAI: logit - presence * [count > 0] - frequency * count
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), crate::Error> {
        let bad = |m: String| Err(crate::Error::InvalidInput(m));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        if !self.presence_penalty.is_finite() || !self.frequency_penalty.is_finite() {
            return bad("presence/frequency penalties must be finite".into());
        }
        Ok(())
    }

    pub fn greedy(&self) -> bool {
        self.temperature == 0.0
    }

    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// SplitMix64: small, fast, and the same on every platform (wasm included).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = Rng::new(params.seed);
        Sampler { params, rng }
    }

    /// Apply the penalties for `history` to the candidates' logits (in place).
    pub fn penalize(&self, cands: &mut [Candidate], history: &[u32]) {
        let p = &self.params;
        if !p.has_penalties() || history.is_empty() {
            return;
        }
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        for &t in history {
            *counts.entry(t).or_default() += 1;
        }
        for c in cands.iter_mut() {
            if let Some(&n) = counts.get(&c.id) {
                if p.repetition_penalty != 1.0 {
                    c.logit =
                        if c.logit > 0.0 { c.logit / p.repetition_penalty } else { c.logit * p.repetition_penalty };
                }
                c.logit -= p.presence_penalty + p.frequency_penalty * n as f32;
            }
        }
    }

    /// The probability distribution the draw uses, after penalties and all filters, as
    /// (id, p). Sorted by probability (highest first) when top-k or top-p needed an order;
    /// otherwise in candidate order (a full-vocabulary sort per token would cost milliseconds).
    pub fn distribution(&self, mut cands: Vec<Candidate>, history: &[u32]) -> Vec<(u32, f64)> {
        let p = &self.params;
        self.penalize(&mut cands, history);
        cands.retain(|c| c.logit.is_finite());
        if cands.is_empty() {
            return vec![];
        }
        let desc = |a: &Candidate, b: &Candidate| b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id));
        if p.greedy() {
            let best = cands.iter().copied().min_by(desc).expect("non-empty");
            return vec![(best.id, 1.0)];
        }
        if p.top_k > 0 && (p.top_k as usize) < cands.len() {
            cands.select_nth_unstable_by(p.top_k as usize - 1, desc);
            cands.truncate(p.top_k as usize);
        }
        let sorted = p.top_k > 0 || p.top_p < 1.0;
        if sorted {
            cands.sort_unstable_by(desc);
        }
        let t = p.temperature as f64;
        let max = cands.iter().map(|c| c.logit).fold(f32::NEG_INFINITY, f32::max) as f64 / t;
        let mut probs: Vec<(u32, f64)> = cands.iter().map(|c| (c.id, (c.logit as f64 / t - max).exp())).collect();
        normalize(&mut probs);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|(_, q)| {
                    acc += q;
                    acc >= p.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep.max(1));
            normalize(&mut probs);
        }
        if p.min_p > 0.0 {
            let top = probs.iter().map(|x| x.1).fold(0.0, f64::max);
            let floor = top * p.min_p as f64;
            probs.retain(|(_, q)| *q >= floor);
            normalize(&mut probs);
        }
        probs
    }

    /// Pick the next token.
    pub fn sample(&mut self, cands: Vec<Candidate>, history: &[u32]) -> Option<u32> {
        let probs = self.distribution(cands, history);
        if probs.len() <= 1 {
            return probs.first().map(|(id, _)| *id);
        }
        let r = self.rng.next_f64();
        let mut acc = 0.0;
        for (id, q) in &probs {
            acc += q;
            if r < acc {
                return Some(*id);
            }
        }
        probs.last().map(|(id, _)| *id)
    }
}

fn normalize(p: &mut [(u32, f64)]) {
    let s: f64 = p.iter().map(|(_, q)| q).sum();
    if s > 0.0 {
        p.iter_mut().for_each(|(_, q)| *q /= s);
    }
}

/// The `k` highest logits (sorted, highest first), dropping those whose probability is below
/// `min_p` times the top one. What the host's `decode-top` returns.
pub fn top_candidates(logits: &[f32], k: usize, min_p: f32) -> Vec<Candidate> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).filter(|&i| logits[i as usize].is_finite()).collect();
    let k = k.clamp(1, idx.len().max(1));
    if idx.len() > k {
        idx.select_nth_unstable_by(k - 1, |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        idx.truncate(k);
    }
    idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    let mut out: Vec<Candidate> = idx.into_iter().map(|i| Candidate { id: i, logit: logits[i as usize] }).collect();
    if let Some(best) = out.first() {
        let floor = min_p_floor(best.logit, min_p);
        out.retain(|c| c.logit >= floor);
    }
    out
}

/// The lowest logit min-p keeps when the best is `best`: p_i / p_max = exp(l_i - l_max) >= min_p
/// <=> l_i >= l_max + ln(min_p) (min-p 0: no floor).
pub fn min_p_floor(best: f32, min_p: f32) -> f32 {
    if min_p > 0.0 {
        best + min_p.ln()
    } else {
        f32::NEG_INFINITY
    }
}
