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
    /// Append `tokens` and let the engine generate on by `run`'s rule (the host's
    /// `sequence.run`: each token sampled where its row is and computed in the next step,
    /// without a round trip through this loop). False when the engine cannot: the loop then
    /// decodes and samples token by token.
    fn run(&mut self, _tokens: &[u32], _run: &Run) -> Result<bool, Error> {
        Ok(false)
    }
    /// The run's tokens since the last call (at least one); empty once it has ended.
    fn run_next(&mut self) -> Result<Vec<(u32, Option<LogprobEntry>)>, Error> {
        Ok(vec![])
    }
    /// End the run early (a stop string, a cancel).
    fn run_stop(&mut self) -> Result<(), Error> {
        Ok(())
    }
}

/// What a generation asks of each next-token row: the one rule the loop's own sampling and the
/// host's runs ([`Engine::run`]) both follow, so either gives the same tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowPlan {
    /// Candidates cut from each row (its `k` largest logits; ignored with `full`)
    pub k: u32,
    /// Sample from the whole row
    pub full: bool,
    /// Drop cut candidates below `min_p` times the top probability (0: none)
    pub min_p: f32,
    /// Log-probabilities with this many alternatives per token
    pub logprobs: Option<u32>,
}

impl RowPlan {
    /// The rows `req` needs (`plugin`: a sampler plug-in chooses, from a wide view).
    pub fn new(req: &Request, plugin: bool) -> RowPlan {
        let p = &req.sampling;
        // How many candidates to ask the host for: 1 suffices for plain greedy; a plug-in or
        // penalties need a wider view; full logits only when nothing truncates the distribution
        // (or a logit bias may lift any token into it).
        let mut k = if plugin {
            DEFAULT_CANDIDATES
        } else if p.greedy() && !p.has_penalties() {
            1
        } else if p.top_k > 0 && !p.has_penalties() {
            p.top_k
        } else {
            DEFAULT_CANDIDATES.max(p.top_k)
        };
        if let Some(n) = req.logprobs {
            k = k.max(n.max(1));
        }
        let full = !req.logit_bias.is_empty()
            || (!plugin && !p.greedy() && p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 && !p.has_penalties());
        // The host's min-p cut would hide alternatives the log-probabilities must show; the
        // sampler applies min-p itself.
        let min_p = if p.has_penalties() || req.logprobs.is_some() { 0.0 } else { p.min_p };
        RowPlan { k, full, min_p, logprobs: req.logprobs }
    }
}

/// What the host's run samples with ([`Engine::run`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub row: RowPlan,
    pub sampling: SamplingParams,
    pub logit_bias: Vec<(u32, f32)>,
    /// Tokens that end the run (the last one it yields)
    pub stop_tokens: Vec<u32>,
    pub max_tokens: u32,
}

/// Choose the next token from a row's candidates (the whole row, or its cut) with the request's
/// rule: the log-probability entry (the model's own, before bias, penalties and temperature;
/// `norm` is the row's log-normaliser), the logit bias (whole rows: index = id), then the
/// plug-in or the sampler.
pub fn pick(
    sampler: &mut Sampler,
    mut cands: Vec<Candidate>,
    norm: f32,
    history: &[u32],
    logit_bias: &[(u32, f32)],
    logprobs: Option<u32>,
    plugin: Option<&mut dyn PluginSampler>,
) -> Result<(u32, Option<LogprobEntry>), Error> {
    let top_lp: Vec<(u32, f32)> = match logprobs {
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
    let raw: Option<Vec<Candidate>> = (logprobs.is_some() && !logit_bias.is_empty()).then(|| cands.clone());
    for &(id, b) in logit_bias {
        if let Some(c) = cands.get_mut(id as usize).filter(|c| c.id == id) {
            c.logit += b;
        }
    }
    let t = match plugin {
        Some(pl) => {
            let mut c = cands.clone();
            sampler.penalize(&mut c, history);
            pl.sample(&c, history)
        }
        None => {
            let c = if logprobs.is_some() { cands.clone() } else { std::mem::take(&mut cands) };
            sampler.sample(c, history).ok_or_else(|| Error::Internal("no finite logits to sample from".into()))?
        }
    };
    let lp = logprobs.map(|_| {
        let l = raw_logit(raw.as_deref().unwrap_or(&cands), t).unwrap_or(f32::NEG_INFINITY);
        LogprobEntry { id: t, logprob: l - norm, top: top_lp }
    });
    Ok((t, lp))
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
    plugin: Option<&mut dyn PluginSampler>,
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
    let plan = RowPlan::new(req, plugin.is_some());
    // Without a plug-in the host can sample by the same rule where the rows are and run ahead
    // of this loop (no round trip per token); else, or when it cannot, token by token here.
    let running = plugin.is_none()
        && req.max_tokens > 0
        && engine.run(
            prompt,
            &Run {
                row: plan,
                sampling: req.sampling.clone(),
                logit_bias: req.logit_bias.clone(),
                stop_tokens: if req.ignore_eos { vec![] } else { eos.to_vec() },
                max_tokens: req.max_tokens,
            },
        )?;
    let mut src = Source {
        running,
        over: false,
        queue: std::collections::VecDeque::new(),
        sampler: Sampler::new(req.sampling.clone()),
        plan,
        plugin,
    };
    let r = generate_loop(tok, engine, &mut src, prompt, req, eos, sink);
    if src.running && !src.over {
        // Stop what the host would still compute (a stop string, a cancel, a failure).
        let stopped = engine.run_stop();
        if r.is_ok() {
            stopped?;
        }
    }
    r
}

/// Where the loop's tokens come from: the host's run, or decoding and sampling here.
struct Source<'a> {
    running: bool,
    /// The run has ended (nothing more will come)
    over: bool,
    queue: std::collections::VecDeque<(u32, Option<LogprobEntry>)>,
    sampler: Sampler,
    plan: RowPlan,
    plugin: Option<&'a mut dyn PluginSampler>,
}

impl Source<'_> {
    /// The next token and its log-probability entry; `None` when the sequence is full.
    fn next(
        &mut self,
        engine: &mut dyn Engine,
        input: &[u32],
        history: &[u32],
        logit_bias: &[(u32, f32)],
    ) -> Result<Option<(u32, Option<LogprobEntry>)>, Error> {
        if self.running {
            if self.queue.is_empty() && !self.over {
                let got = engine.run_next()?;
                self.over = got.is_empty();
                self.queue.extend(got);
            }
            return Ok(self.queue.pop_front());
        }
        let want_lp = self.plan.logprobs.is_some();
        let (k, min_p) = (self.plan.k, self.plan.min_p);
        let step = if self.plan.full {
            engine.decode(input).map(|logits| {
                let norm = if want_lp { log_sum_exp(&logits) } else { 0.0 };
                (
                    logits.iter().enumerate().map(|(i, &l)| Candidate { id: i as u32, logit: l }).collect::<Vec<_>>(),
                    norm,
                )
            })
        } else if want_lp {
            engine.decode_top_norm(input, k, min_p)
        } else {
            engine.decode_top(input, k, min_p).map(|c| (c, 0.0))
        };
        let (cands, norm) = match step {
            Ok(x) => x,
            // The sequence reached the end of its context after the prompt: the output ends
            // there, as if `max_tokens` had been that many (a prompt that does not fit is an
            // error).
            Err(Error::ContextFull(_)) if history.len() > input.len() => return Ok(None),
            Err(e) => return Err(e),
        };
        let plugin: Option<&mut dyn PluginSampler> = match self.plugin {
            Some(ref mut p) => Some(&mut **p),
            None => None,
        };
        pick(&mut self.sampler, cands, norm, history, logit_bias, self.plan.logprobs, plugin).map(Some)
    }
}

fn generate_loop(
    tok: &Tokenizer,
    engine: &mut dyn Engine,
    src: &mut Source<'_>,
    prompt: &[u32],
    req: &Request,
    eos: &[u32],
    sink: &mut dyn Sink,
) -> Result<Outcome, Error> {
    let want_lp = req.logprobs.is_some();
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
        let Some((t, lp)) = src.next(engine, &next_input, &history, &req.logit_bias)? else {
            out.finish = Finish::Length;
            break;
        };
        if first {
            out.cached_tokens = engine.cached_tokens();
            first = false;
        }
        if want_lp {
            let e = lp.unwrap_or(LogprobEntry { id: t, logprob: f32::NEG_INFINITY, top: vec![] });
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
