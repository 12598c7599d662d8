//! The wasm component: WIT bindings (`policy-component` world) adapted to the library.
//!
//! One instance serves one model and is reused across requests (the host pools instances), so the
//! tokenizer and chat template are parsed once, on first use, from the host's `current-model`.

use std::sync::OnceLock;

use crate::generate::{self, Engine, Finish, LogprobEntry, PluginSampler, Request, Run, Sink};
use crate::sampling::{Candidate, SamplingParams};
use crate::template::ChatTemplate;
use crate::tokenizer::Tokenizer;
use crate::tools::Syntax;
use crate::Error;

wit_bindgen::generate!({
    world: "policy-component",
    path: "../../wit",
});

use exports::stllm::inference::policy::{self as wit_policy, FinishReason, GenerateRequest, GenerateResult, Prompt};
use stllm::inference::engine;
use stllm::inference::plugin_sampler;
use stllm::inference::streaming;
use stllm::inference::types::{self as wit};

struct Loaded {
    tok: Tokenizer,
    template: Option<ChatTemplate>,
}

static LOADED: OnceLock<Result<Loaded, Error>> = OnceLock::new();

fn loaded() -> Result<&'static Loaded, wit::Error> {
    LOADED
        .get_or_init(|| {
            let model = engine::current_model();
            let json = model
                .tokenizer_json()
                .ok_or_else(|| Error::InvalidInput("the model folder has no tokenizer.json".into()))?;
            let config = model.tokenizer_config_json();
            let tok = Tokenizer::new(&json, config.as_deref())?;
            let template = ChatTemplate::from_tokenizer(&tok)?;
            Ok(Loaded { tok, template })
        })
        .as_ref()
        .map_err(|e| to_wit(e.clone()))
}

fn to_wit(e: Error) -> wit::Error {
    match e {
        Error::InvalidInput(m) => wit::Error::InvalidInput(m),
        Error::ContextFull(m) => wit::Error::ContextFull(m),
        Error::Cancelled => wit::Error::Cancelled,
        Error::Internal(m) => wit::Error::Internal(m),
    }
}

fn from_wit(e: wit::Error) -> Error {
    match e {
        wit::Error::InvalidInput(m) => Error::InvalidInput(m),
        wit::Error::ContextFull(m) => Error::ContextFull(m),
        wit::Error::Cancelled => Error::Cancelled,
        wit::Error::Internal(m) => Error::Internal(m),
    }
}

struct Seq(engine::Sequence);

impl Engine for Seq {
    fn decode(&mut self, tokens: &[u32]) -> Result<Vec<f32>, Error> {
        self.0.decode(tokens).map_err(from_wit)
    }
    fn decode_top(&mut self, tokens: &[u32], k: u32, min_p: f32) -> Result<Vec<Candidate>, Error> {
        let c = self.0.decode_top(tokens, k, min_p).map_err(from_wit)?;
        Ok(c.into_iter().map(|c| Candidate { id: c.id, logit: c.logit }).collect())
    }
    fn decode_top_norm(&mut self, tokens: &[u32], k: u32, min_p: f32) -> Result<(Vec<Candidate>, f32), Error> {
        let t = self.0.decode_top_norm(tokens, k, min_p).map_err(from_wit)?;
        Ok((t.candidates.into_iter().map(|c| Candidate { id: c.id, logit: c.logit }).collect(), t.log_norm))
    }
    fn cached_tokens(&mut self) -> u32 {
        self.0.cached_tokens()
    }
    fn run(&mut self, tokens: &[u32], run: &Run) -> Result<bool, Error> {
        let p = &run.sampling;
        let plan = engine::RunPlan {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            seed: p.seed,
            logit_bias: run.logit_bias.clone(),
            candidates: run.row.k,
            cut_min_p: run.row.min_p,
            full_row: run.row.full,
            logprobs: run.row.logprobs,
            stop_tokens: run.stop_tokens.clone(),
            max_tokens: run.max_tokens,
        };
        self.0.run(tokens, &plan).map_err(from_wit)?;
        Ok(true)
    }
    fn run_next(&mut self) -> Result<Vec<(u32, Option<LogprobEntry>)>, Error> {
        let got = self.0.run_next().map_err(from_wit)?;
        Ok(got
            .into_iter()
            .map(|s| {
                let lp = s.logprob.map(|e| LogprobEntry {
                    id: e.id,
                    logprob: e.logprob,
                    top: e.top.into_iter().map(|t| (t.id, t.logprob)).collect(),
                });
                (s.id, lp)
            })
            .collect())
    }
    fn run_stop(&mut self) -> Result<(), Error> {
        self.0.run_stop();
        Ok(())
    }
}

fn lp_to_wit(e: &LogprobEntry) -> wit::LogprobEntry {
    wit::LogprobEntry {
        id: e.id,
        logprob: e.logprob,
        top: e.top.iter().map(|&(id, logprob)| wit::TokenLogprob { id, logprob }).collect(),
    }
}

struct Out<'a>(&'a streaming::Sink);

impl Sink for Out<'_> {
    fn emit(&mut self, text: &str, tokens: &[u32]) -> bool {
        self.0.emit(text, tokens)
    }
    fn emit_logprobs(&mut self, text: &str, tokens: &[u32], logprobs: &[LogprobEntry]) -> bool {
        let lp: Vec<wit::LogprobEntry> = logprobs.iter().map(lp_to_wit).collect();
        self.0.emit_logprobs(text, tokens, &lp)
    }
}

struct Plugin;

impl PluginSampler for Plugin {
    fn sample(&mut self, candidates: &[Candidate], history: &[u32]) -> u32 {
        let c: Vec<wit::Candidate> = candidates.iter().map(|c| wit::Candidate { id: c.id, logit: c.logit }).collect();
        plugin_sampler::sample(&c, history)
    }
}

struct Policy;

impl wit_policy::Guest for Policy {
    fn tokenize(text: String, add_special: bool) -> Result<Vec<u32>, wit::Error> {
        loaded()?.tok.encode(&text, add_special).map_err(to_wit)
    }

    fn detokenize(ids: Vec<u32>, skip_special: bool) -> Result<String, wit::Error> {
        loaded()?.tok.decode(&ids, skip_special).map_err(to_wit)
    }

    fn apply_chat_template(
        messages_json: String,
        add_generation_prompt: bool,
        tools_json: Option<String>,
        extra_json: Option<String>,
    ) -> Result<String, wit::Error> {
        let l = loaded()?;
        let t = l.template.as_ref().ok_or_else(|| wit::Error::InvalidInput("the model has no chat template".into()))?;
        t.render(&messages_json, add_generation_prompt, tools_json.as_deref(), extra_json.as_deref()).map_err(to_wit)
    }

    fn generate(req: GenerateRequest, out: &streaming::Sink) -> Result<GenerateResult, wit::Error> {
        let l = loaded()?;
        let prompt = match &req.prompt {
            Prompt::Text(s) => l.tok.encode(s, true).map_err(to_wit)?,
            Prompt::Tokens(ids) => ids.clone(),
            Prompt::Chat(messages) => {
                let t = l
                    .template
                    .as_ref()
                    .ok_or_else(|| wit::Error::InvalidInput("the model has no chat template".into()))?;
                let text = t.render(messages, true, req.tools_json.as_deref(), None).map_err(to_wit)?;
                l.tok.encode(&text, false).map_err(to_wit)?
            }
        };
        let model = engine::current_model();
        let eos = model.special_tokens().eos;
        let max_len = (prompt.len() as u64 + req.max_tokens as u64).min(u32::MAX as u64) as u32;
        let mut seq = Seq(model.new_sequence_with(max_len, req.adapters.as_deref())?);
        let s = &req.sampling;
        let tools = match (&req.tools_json, req.parse_tool_calls) {
            (Some(_), true) => Some(l.template.as_ref().map_or(Syntax::Json, |t| Syntax::of_template(t.source()))),
            _ => None,
        };
        let request = Request {
            logit_bias: s.logit_bias.clone(),
            logprobs: req.logprobs,
            tools,
            max_tokens: req.max_tokens,
            stop: req.stop.clone(),
            ignore_eos: req.ignore_eos,
            sampling: SamplingParams {
                temperature: s.temperature,
                top_k: s.top_k,
                top_p: s.top_p,
                min_p: s.min_p,
                repetition_penalty: s.repetition_penalty,
                presence_penalty: s.presence_penalty,
                frequency_penalty: s.frequency_penalty,
                seed: s.seed,
            },
        };
        let mut sink = Out(out);
        let mut plugin = Plugin;
        let plugin: Option<&mut dyn PluginSampler> = if plugin_sampler::active() { Some(&mut plugin) } else { None };
        let o = generate::generate(&l.tok, &mut seq, &prompt, &request, &eos, &mut sink, plugin).map_err(to_wit)?;
        Ok(GenerateResult {
            tokens: o.tokens,
            text: o.text,
            finish: match o.finish {
                Finish::Stop => FinishReason::Stop,
                Finish::Length => FinishReason::Length,
                Finish::Cancelled => FinishReason::Cancelled,
                Finish::ToolCalls => FinishReason::ToolCalls,
            },
            prompt_tokens: o.prompt_tokens,
            cached_tokens: o.cached_tokens,
            tool_calls: o
                .tool_calls
                .into_iter()
                .enumerate()
                .map(|(i, c)| wit_policy::ToolCall { id: format!("call_{i}"), name: c.name, arguments: c.arguments })
                .collect(),
            logprobs: o.logprobs.iter().map(lp_to_wit).collect(),
        })
    }
}

export!(Policy);
