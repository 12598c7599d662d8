//! Sampling on the host, for the token-level `stllm generate` loop. The samplers themselves are
//! the policy crate's (one implementation, shared with the guest component); this module applies
//! them to full logits rows.

pub use stllm_policy::sampling::{Candidate, Sampler, SamplingParams};

/// Index of the largest logit (the first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Pick the next token from a full logits row; `history` feeds the penalties.
pub fn sample_logits(sampler: &mut Sampler, logits: &[f32], history: &[u32]) -> u32 {
    if sampler.params.greedy() && !sampler.params.has_penalties() {
        return argmax(logits);
    }
    let cands = logits.iter().enumerate().map(|(i, &logit)| Candidate { id: i as u32, logit }).collect();
    sampler.sample(cands, history).unwrap_or_else(|| argmax(logits))
}
