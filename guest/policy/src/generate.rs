//! The generation loop: prompt -> tokens -> (decode, sample, detokenize, stop checks)* -> result,
//! streaming text to a sink. Generic over the engine and the sink so it runs in the wasm
//! component (over the WIT imports) and natively (over the host's API) alike.

use crate::sampling::{top_candidates, Candidate, Sampler, SamplingParams};
use crate::tokenizer::{DecodeState, Tokenizer};
use crate::Error;

/// How many candidates the host pre-filters for sampling when the request sets no top-k:
/// beyond this the probability mass is negligible for any realistic temperature, and the
/// boundary stays cheap (8 bytes a candidate instead of 4 bytes per vocabulary entry).
pub const DEFAULT_CANDIDATES: u32 = 1024;

/// The engine as the loop sees it: one sequence.
pub trait Engine {
    /// Append tokens; full logits of the last position.
    fn decode(&mut self, tokens: &[u32]) -> Result<Vec<f32>, Error>;
    /// Append tokens; the `k` best candidates of the last position, min-p filtered.
    fn decode_top(&mut self, tokens: &[u32], k: u32, min_p: f32) -> Result<Vec<Candidate>, Error> {
        let logits = self.decode(tokens)?;
        Ok(top_candidates(&logits, k as usize, min_p))
    }
}

/// Where text goes. `emit` returns false when the caller cancelled.
pub trait Sink {
    fn emit(&mut self, text: &str, tokens: &[u32]) -> bool;
}

/// An optional external sampler (a plug-in component).
pub trait PluginSampler {
    fn sample(&mut self, candidates: &[Candidate], history: &[u32]) -> u32;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Request {
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub sampling: SamplingParams,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: Finish,
    pub prompt_tokens: u32,
}

/// Run the loop for `prompt` (already tokenized).
pub fn generate(
    tok: &Tokenizer,
    engine: &mut dyn Engine,
    prompt: &[u32],
    req: &Request,
    eos: &[u32],
    sink: &mut dyn Sink,
    mut plugin: Option<&mut dyn PluginSampler>,
) -> Result<Outcome, Error> {
    req.sampling.validate()?;
    if prompt.is_empty() {
        return Err(Error::InvalidInput("empty prompt".into()));
    }
    let p = &req.sampling;
    let mut sampler = Sampler::new(p.clone());
    // How many candidates to ask the host for: 1 suffices for plain greedy; a plug-in or
    // penalties need a wider view; full logits only when nothing truncates the distribution.
    let k = if plugin.is_some() {
        DEFAULT_CANDIDATES
    } else if p.greedy() && !p.has_penalties() {
        1
    } else if p.top_k > 0 && !p.has_penalties() {
        p.top_k
    } else {
        DEFAULT_CANDIDATES.max(p.top_k)
    };
    let full =
        plugin.is_none() && !p.greedy() && p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 && !p.has_penalties();
    let min_p = if p.has_penalties() { 0.0 } else { p.min_p };

    let mut history: Vec<u32> = prompt.to_vec();
    let mut out =
        Outcome { tokens: vec![], text: String::new(), finish: Finish::Length, prompt_tokens: prompt.len() as u32 };
    let mut stream = DecodeState::default();
    let max_stop = req.stop.iter().map(|s| s.len()).max().unwrap_or(0);
    // Text produced but not yet emitted: held back while it could be the start of a stop string.
    let mut pending = String::new();
    let mut pending_tokens: Vec<u32> = Vec::new();
    let mut next_input: Vec<u32> = prompt.to_vec();
    while (out.tokens.len() as u32) < req.max_tokens {
        let cands = if full {
            let logits = engine.decode(&next_input)?;
            logits.iter().enumerate().map(|(i, &l)| Candidate { id: i as u32, logit: l }).collect()
        } else {
            engine.decode_top(&next_input, k, min_p)?
        };
        let t = match plugin.as_deref_mut() {
            Some(pl) => {
                let mut c = cands;
                sampler.penalize(&mut c, &history);
                pl.sample(&c, &history)
            }
            None => sampler
                .sample(cands, &history)
                .ok_or_else(|| Error::Internal("no finite logits to sample from".into()))?,
        };
        out.tokens.push(t);
        history.push(t);
        next_input = vec![t];
        if !req.ignore_eos && eos.contains(&t) {
            out.finish = Finish::Stop;
            break;
        }
        pending_tokens.push(t);
        if let Some(piece) = tok.decode_step(&mut stream, t, false)? {
            pending.push_str(&piece);
        }
        if let Some(pos) = req.stop.iter().filter_map(|s| find_stop(&out.text, &pending, s)).min() {
            pending.truncate(pos);
            out.text.push_str(&pending);
            if !pending.is_empty() && !sink.emit(&pending, &pending_tokens) {
                out.finish = Finish::Cancelled;
                return Ok(out);
            }
            out.finish = Finish::Stop;
            return Ok(out);
        }
        // Emit everything that can no longer start a stop string.
        let keep = holdback(&pending, max_stop);
        if keep < pending.len() || max_stop == 0 {
            let ready: String = pending.drain(..pending.len() - keep).collect();
            out.text.push_str(&ready);
            let toks = std::mem::take(&mut pending_tokens);
            if !sink.emit(&ready, &toks) {
                out.finish = Finish::Cancelled;
                return Ok(out);
            }
        }
    }
    if !pending.is_empty() {
        out.text.push_str(&pending);
        if !sink.emit(&pending, &pending_tokens) {
            out.finish = Finish::Cancelled;
        }
    }
    Ok(out)
}

/// Where `stop` begins in `pending` if it occurs in `emitted + pending` ending inside `pending`
/// (stop strings never straddle emitted text: emitted text was checked when it was held back).
fn find_stop(_emitted: &str, pending: &str, stop: &str) -> Option<usize> {
    if stop.is_empty() {
        return None;
    }
    pending.find(stop)
}

/// Bytes at the end of `pending` to hold back: the longest suffix that is a proper prefix of a
/// stop string could be completed by the next token. Conservatively: up to `max_stop - 1`
/// bytes, on a char boundary.
fn holdback(pending: &str, max_stop: usize) -> usize {
    if max_stop <= 1 {
        return 0;
    }
    let mut n = (max_stop - 1).min(pending.len());
    while n > 0 && !pending.is_char_boundary(pending.len() - n) {
        n -= 1;
    }
    n
}
