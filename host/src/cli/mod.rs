//! The `stllm` command line: `info`, `logits`, `generate`, `bench`.
//! Machine-readable output (JSON) goes to stdout; logs and errors go to stderr.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};

use crate::ggml::DType;
use crate::sampling::{Sampler, SamplerConfig};
use crate::session::Logits;
use crate::{Model, ModelOptions, Session, SessionOptions};

#[derive(Parser, Debug)]
#[command(
    name = "stllm",
    version,
    about = "Run HuggingFace safetensors models on ggml"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// HuggingFace model folder (config.json + *.safetensors)
    #[arg(long)]
    pub model: PathBuf,
    /// CPU threads (default: all cores)
    #[arg(long)]
    pub threads: Option<usize>,
    /// Context size (positions held by the KV cache)
    #[arg(long)]
    pub ctx_size: Option<usize>,
    /// KV cache type: f32, f16, bf16 (default: f32 for F32 models, f16 otherwise)
    #[arg(long)]
    pub kv_type: Option<String>,
    /// Most tokens per graph during prefill
    #[arg(long, default_value_t = 512)]
    pub batch: usize,
    /// Fused flash attention: on, off, auto (= on)
    #[arg(long, default_value = "auto")]
    pub flash_attn: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print architecture, sizes, dtype and parameter count as JSON
    Info {
        #[command(flatten)]
        m: ModelArgs,
    },
    /// Print logits of every input position as JSON: {"logits": [[...], ...]}
    Logits {
        #[command(flatten)]
        m: ModelArgs,
        /// Comma-separated token ids
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
    },
    /// Generate tokens after a prompt of token ids
    Generate {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// 0 = greedy
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Keep going after end-of-sequence tokens
        #[arg(long)]
        ignore_eos: bool,
        /// Print {"tokens": [...]} (the new ids only) instead of one id per line as they come
        #[arg(long)]
        json: bool,
    },
    /// Measure prefill and decode speed on random token ids
    Bench {
        #[command(flatten)]
        m: ModelArgs,
        /// Prompt length
        #[arg(long, default_value_t = 512)]
        prompt: usize,
        /// Tokens to decode after the prompt
        #[arg(long, default_value_t = 128)]
        gen: usize,
        /// Repetitions (the best is reported)
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

fn parse_kv_type(s: &str) -> Result<DType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("unsupported --kv-type {other:?} (supported: f32, f16, bf16)"),
    })
}

fn open(m: &ModelArgs, min_ctx: usize) -> Result<Session> {
    let mut opts = ModelOptions::default();
    if let Some(t) = m.threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        opts.threads = t;
    }
    let model =
        Model::load(&m.model, &opts).with_context(|| format!("loading {}", m.model.display()))?;
    let kv_type = m.kv_type.as_deref().map(parse_kv_type).transpose()?;
    let n_ctx = m
        .ctx_size
        .unwrap_or_else(|| model.hparams().n_ctx_train.min(4096).max(min_ctx));
    let sopts = SessionOptions {
        n_ctx: Some(n_ctx),
        n_batch: m.batch,
        kv_type,
        flash_attn: match m.flash_attn.as_str() {
            "on" => Some(true),
            "off" => Some(false),
            "auto" => None,
            other => bail!("--flash-attn must be on, off or auto, got {other:?}"),
        },
    };
    Ok(Session::new(Arc::new(model), &sopts)?)
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info { m } => {
            let model = Model::load(
                &m.model,
                &ModelOptions {
                    threads: m.threads.unwrap_or(1).max(1),
                },
            )
            .with_context(|| format!("loading {}", m.model.display()))?;
            let hp = model.hparams();
            let out = serde_json::json!({
                "architecture": hp.arch,
                "dtype": model.dtype.name(),
                "parameters": model.n_params(),
                "weight_bytes": model.weight_bytes(),
                "vocab_size": hp.n_vocab,
                "hidden_size": hp.n_embd,
                "layers": hp.n_layer,
                "heads": hp.n_head,
                "kv_heads": hp.n_head_kv,
                "head_dim": hp.head_dim,
                "intermediate_size": hp.n_ff,
                "context_length": hp.n_ctx_train,
                "sliding_window": hp.sliding_window,
                "tied_embeddings": hp.tied_embeddings,
                "eos_token_ids": model.eos_tokens(),
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Command::Logits { m, tokens } => {
            let mut s = open(&m, tokens.len())?;
            let rows = s.decode(&tokens, Logits::All)?;
            println!(
                "{}",
                serde_json::to_string(&serde_json::json!({ "logits": rows }))?
            );
        }
        Command::Generate {
            m,
            tokens,
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            ignore_eos,
            json,
        } => {
            if !(0.0..=1.0).contains(&top_p) || top_p == 0.0 {
                bail!("--top-p must be in (0, 1], got {top_p}");
            }
            if !temperature.is_finite() || temperature < 0.0 {
                bail!("--temperature must be >= 0, got {temperature}");
            }
            let mut s = open(&m, tokens.len() + max_tokens)?;
            let stop = if ignore_eos {
                vec![]
            } else {
                s.model().eos_tokens()
            };
            let mut sampler = Sampler::new(SamplerConfig {
                temperature,
                top_k,
                top_p,
                seed,
            });
            let out = s.generate(&tokens, max_tokens, &mut sampler, &stop, |t| {
                if !json {
                    println!("{t}");
                }
            })?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&serde_json::json!({ "tokens": out }))?
                );
            }
        }
        Command::Bench {
            m,
            prompt,
            gen,
            repeat,
            json,
        } => bench(&m, prompt, gen, repeat.max(1), json)?,
    }
    Ok(())
}

fn bench(m: &ModelArgs, prompt: usize, gen: usize, repeat: usize, json: bool) -> Result<()> {
    if prompt == 0 {
        bail!("--prompt must be at least 1");
    }
    let mut s = open(m, prompt + gen)?;
    let n_vocab = s.model().hparams().n_vocab as u32;
    // Deterministic pseudo-random prompt (an LCG), avoiding the first ids (often special tokens).
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let tokens: Vec<u32> = (0..prompt)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((x >> 33) as u32) % (n_vocab - n_vocab.min(100)).max(1)) + n_vocab.min(100)
        })
        .collect();
    let (mut best_pp, mut best_tg) = (f64::MAX, f64::MAX);
    for _ in 0..repeat {
        s.reset();
        let t0 = Instant::now();
        let logits = s.decode(&tokens, Logits::Last)?;
        best_pp = best_pp.min(t0.elapsed().as_secs_f64());
        let mut t = crate::sampling::argmax(&logits[0]);
        let t1 = Instant::now();
        for _ in 0..gen {
            let l = s.decode(&[t], Logits::Last)?;
            t = crate::sampling::argmax(&l[0]);
        }
        best_tg = best_tg.min(t1.elapsed().as_secs_f64());
    }
    let model = s.model();
    let pp = prompt as f64 / best_pp;
    let tg = if gen > 0 { gen as f64 / best_tg } else { 0.0 };
    if json {
        let out = serde_json::json!({
            "model": m.model, "architecture": model.hparams().arch, "dtype": model.dtype.name(),
            "threads": model.threads(), "prompt": prompt, "gen": gen,
            "prefill_tok_s": pp, "decode_tok_s": tg, "ttft_ms": best_pp * 1e3,
        });
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!(
            "{} {} ({} threads): prefill {prompt} tokens {pp:.1} tok/s ({:.1} ms), decode {gen} tokens {tg:.2} tok/s",
            model.hparams().arch,
            model.dtype.name(),
            model.threads(),
            best_pp * 1e3
        );
    }
    Ok(())
}
