//! The generation loop: prompt -> tokens -> (decode, sample, detokenize, stop checks)* -> result,
//! streaming text to a sink. Generic over the engine and the sink so it runs in the wasm
//! component (over the WIT imports) and natively (over the host's API) alike.

use crate::sampling::{top_candidates, Candidate, Sampler, SamplingParams};
use crate::tokenizer::{DecodeState, Tokenizer};
use crate::tools;
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
    /// [`Engine::decode_top`] plus log(sum(exp(logits))) over the whole vocabulary.
    fn decode_top_norm(&mut self, tokens: &[u32], k: u32, min_p: f32) -> Result<(Vec<Candidate>, f32), Error> {
        let logits = self.decode(tokens)?;
        Ok((top_candidates(&logits, k as usize, min_p), log_sum_exp(&logits)))
    }
    /// Prompt positions taken from the host's prefix cache (0 when it has none).
    fn cached_tokens(&mut self) -> u32 {
        0
    }
}

/// log(sum(exp(x))) over the finite entries, computed stably.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().filter(|x| x.is_finite()).fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return f32::NEG_INFINITY;
    }
    let s: f64 = logits.iter().filter(|x| x.is_finite()).map(|&x| ((x - max) as f64).exp()).sum();
    max + s.ln() as f32
}

/// A generated token's log-probability and the best alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct LogprobEntry {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Where text goes. `emit` returns false when the caller cancelled.
pub trait Sink {
    fn emit(&mut self, text: &str, tokens: &[u32]) -> bool;
    /// `emit` with one log-probability entry per token (requests that asked for them).
    fn emit_logprobs(&mut self, text: &str, tokens: &[u32], _logprobs: &[LogprobEntry]) -> bool {
        self.emit(text, tokens)
    }
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
    /// The output was tool calls (see [`Outcome::tool_calls`]).
    ToolCalls,
}

#[derive(Debug, Clone, Default)]
pub struct Request {
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub sampling: SamplingParams,
    /// Added to these tokens' logits before sampling.
    pub logit_bias: Vec<(u32, f32)>,
    /// Report log-probabilities with this many alternatives per token.
    pub logprobs: Option<u32>,
    /// Parse tool calls written in this syntax out of the output.
    pub tools: Option<tools::Syntax>,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub tokens: Vec<u32>,
    /// The generated text, without tool-call markup that was parsed into `tool_calls`.
    pub text: String,
    pub finish: Finish,
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub tool_calls: Vec<tools::ToolCall>,
    /// One entry per generated token when the request asked for them.
    pub logprobs: Vec<LogprobEntry>,
}

/// Most log-probability alternatives a request may ask for.
pub const MAX_TOP_LOGPROBS: u32 = 20;

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
    if let Some(n) = req.logprobs {
        if n > MAX_TOP_LOGPROBS {
            return Err(Error::InvalidInput(format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {n}")));
        }
    }
    if let Some((id, b)) = req.logit_bias.iter().find(|(_, b)| !b.is_finite()) {
        return Err(Error::InvalidInput(format!("logit_bias of token {id} is not finite ({b})")));
    }
    let p = &req.sampling;
    let mut sampler = Sampler::new(p.clone());
    // How many candidates to ask the host for: 1 suffices for plain greedy; a plug-in or
    // penalties need a wider view; full logits only when nothing truncates the distribution
    // (or a logit bias may lift any token into it).
    let mut k = if plugin.is_some() {
        DEFAULT_CANDIDATES
    } else if p.greedy() && !p.has_penalties() {
        1
    } else if p.top_k > 0 && !p.has_penalties() {
        p.top_k
    } else {
        DEFAULT_CANDIDATES.max(p.top_k)
    };
    let want_lp = req.logprobs.is_some();
    if let Some(n) = req.logprobs {
        k = k.max(n.max(1));
    }
    let full = !req.logit_bias.is_empty()
        || (plugin.is_none() && !p.greedy() && p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 && !p.has_penalties());
    // The host's min-p cut would hide alternatives the log-probabilities must show; the sampler
    // applies min-p itself.
    let min_p = if p.has_penalties() || want_lp { 0.0 } else { p.min_p };

    let mut history: Vec<u32> = prompt.to_vec();
    let mut out = Outcome {
        tokens: vec![],
        text: String::new(),
        finish: Finish::Length,
        prompt_tokens: prompt.len() as u32,
        cached_tokens: 0,
        tool_calls: vec![],
        logprobs: vec![],
    };
    let mut stream = DecodeState::default();
    let max_stop = req.stop.iter().map(|s| s.len()).max().unwrap_or(0);
    // Text produced but not yet emitted: held back while it could be the start of a stop string
    // (or of tool-call markup).
    let mut pending = String::new();
    let mut pending_tokens: Vec<u32> = Vec::new();
    let mut pending_lp: Vec<LogprobEntry> = Vec::new();
    // Tool-call markup seen so far: never streamed, parsed at the end.
    let mut markup: Option<String> = None;
    let mut next_input: Vec<u32> = prompt.to_vec();
    let mut first = true;
    while (out.tokens.len() as u32) < req.max_tokens {
        let step = if full {
            engine.decode(&next_input).map(|logits| {
                let norm = if want_lp { log_sum_exp(&logits) } else { 0.0 };
                (
                    logits.iter().enumerate().map(|(i, &l)| Candidate { id: i as u32, logit: l }).collect::<Vec<_>>(),
                    norm,
                )
            })
        } else if want_lp {
            engine.decode_top_norm(&next_input, k, min_p)
        } else {
            engine.decode_top(&next_input, k, min_p).map(|c| (c, 0.0))
        };
        let (mut cands, norm) = match step {
            Ok(x) => x,
            // The sequence reached the end of its context after the prompt: the output ends
            // there, as if `max_tokens` had been that many (a prompt that does not fit is an
            // error).
            Err(Error::ContextFull(_)) if !out.tokens.is_empty() => {
                out.finish = Finish::Length;
                break;
            }
            Err(e) => return Err(e),
        };
        if first {
            out.cached_tokens = engine.cached_tokens();
            first = false;
        }
        // Log-probabilities are the model's own (before bias, penalties and temperature).
        let top_lp: Vec<(u32, f32)> = match req.logprobs {
            Some(n) if n > 0 => {
                let mut best: Vec<&Candidate> = cands.iter().filter(|c| c.logit.is_finite()).collect();
                let n = (n as usize).min(best.len());
                if best.len() > n {
                    best.select_nth_unstable_by(n, |a, b| b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id)));
                    best.truncate(n);
                }
                best.sort_by(|a, b| b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id)));
                best.iter().map(|c| (c.id, c.logit - norm)).collect()
            }
            _ => vec![],
        };
        let raw_logit = |cands: &[Candidate], t: u32| cands.iter().find(|c| c.id == t).map(|c| c.logit);
        let raw: Option<Vec<Candidate>> = (want_lp && !req.logit_bias.is_empty()).then(|| cands.clone());
        if !req.logit_bias.is_empty() {
            for &(id, b) in &req.logit_bias {
                if let Some(c) = cands.get_mut(id as usize).filter(|c| c.id == id) {
                    c.logit += b;
                }
            }
        }
        let t = match plugin.as_deref_mut() {
            Some(pl) => {
                let mut c = cands.clone();
                sampler.penalize(&mut c, &history);
                pl.sample(&c, &history)
            }
            None => sampler
                .sample(cands.clone(), &history)
                .ok_or_else(|| Error::Internal("no finite logits to sample from".into()))?,
        };
        if want_lp {
            let l = raw_logit(raw.as_deref().unwrap_or(&cands), t).unwrap_or(f32::NEG_INFINITY);
            let e = LogprobEntry { id: t, logprob: l - norm, top: top_lp };
            out.logprobs.push(e.clone());
            pending_lp.push(e);
        }
        out.tokens.push(t);
        history.push(t);
        next_input = vec![t];
        if !req.ignore_eos && eos.contains(&t) {
            out.finish = Finish::Stop;
            // The end-of-sequence token's entry stays in the result, not in the stream.
            pending_lp.pop();
            break;
        }
        pending_tokens.push(t);
        let piece = tok.decode_step(&mut stream, t, false)?;
        if let Some(m) = markup.as_mut() {
            // Inside tool-call markup: nothing more is streamed.
            if let Some(piece) = piece {
                m.push_str(&piece);
            }
            pending_tokens.clear();
            pending_lp.clear();
            continue;
        }
        if let Some(piece) = piece {
            pending.push_str(&piece);
        }
        if let Some(pos) = req.stop.iter().filter_map(|s| find_stop(&pending, s)).min() {
            pending.truncate(pos);
            out.text.push_str(&pending);
            if !pending.is_empty() && !sink.emit_logprobs(&pending, &pending_tokens, &pending_lp) {
                out.finish = Finish::Cancelled;
                return Ok(out);
            }
            out.finish = Finish::Stop;
            return Ok(out);
        }
        if let Some(syntax) = req.tools {
            // Tool-call markup starts: the content before it is streamed, the rest held.
            let so_far = out.text.len();
            let whole = format!("{}{}", out.text, pending);
            if let Some(at) = syntax.start(&whole).filter(|&at| at >= so_far) {
                let content: String = pending[..at - so_far].to_string();
                markup = Some(pending[at - so_far..].to_string());
                pending.clear();
                if !content.is_empty() {
                    out.text.push_str(&content);
                    if !sink.emit_logprobs(&content, &pending_tokens, &pending_lp) {
                        out.finish = Finish::Cancelled;
                        return Ok(out);
                    }
                }
                pending_tokens.clear();
                pending_lp.clear();
                continue;
            }
        }
        // Emit everything that can no longer start a stop string or tool-call markup.
        let mut keep = holdback(&pending, max_stop);
        if let Some(syntax) = req.tools {
            let whole = format!("{}{}", out.text, pending);
            keep = keep.max(syntax.holdback(&whole).min(pending.len()));
        }
        if keep < pending.len() || (max_stop == 0 && keep == 0) {
            let ready: String = pending.drain(..pending.len() - keep).collect();
            out.text.push_str(&ready);
            let toks = std::mem::take(&mut pending_tokens);
            let lps = std::mem::take(&mut pending_lp);
            if !sink.emit_logprobs(&ready, &toks, &lps) {
                out.finish = Finish::Cancelled;
                return Ok(out);
            }
        }
    }
    if let (Some(m), Some(syntax)) = (markup, req.tools) {
        match tools::parse(syntax, &m) {
            Ok(calls) => {
                out.tool_calls = calls;
                out.finish = Finish::ToolCalls;
            }
            // Not a well-formed call: it was content after all.
            Err(text) => pending = text + &pending,
        }
    }
    if !pending.is_empty() {
        out.text.push_str(&pending);
        if !sink.emit_logprobs(&pending, &pending_tokens, &pending_lp) {
            out.finish = Finish::Cancelled;
        }
    }
    Ok(out)
}

/// Where `stop` begins in `pending` (stop strings never straddle emitted text: emitted text was
/// checked when it was held back).
fn find_stop(pending: &str, stop: &str) -> Option<usize> {
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
