//! The serving core: batched sequences stay independent, the prefix cache reuses prompts, the
//! engine serves many threads at once, cancels free memory, and a full cache makes requests
//! wait instead of failing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{fixture, rel_err, Expected};
use stllm::engine::{Engine, EngineError, EngineOptions, Event, FinishReason, GenerateRequest};
use stllm::runner::{RowOut, Runner, RunnerOptions, UBatch, Want};
use stllm::session::Logits;
use stllm::{Model, ModelOptions, Session, SessionOptions};

fn model(name: &str) -> Arc<Model> {
    Arc::new(Model::load(&fixture(name), &ModelOptions { threads: 2, ..Default::default() }).unwrap())
}

/// max |a - b| / max |b| over all rows.
fn rel(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    let scale = b.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a.iter().flatten().zip(b.iter().flatten()).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert_eq!(a.len(), b.len());
    diff / scale
}

/// A deterministic prompt of `n` tokens below `vocab`.
fn prompt(seed: u32, n: usize, vocab: u32) -> Vec<u32> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x % vocab
        })
        .collect()
}

/// Greedy tokens of `p`, computed alone in a session (no stop tokens).
fn alone(m: &Arc<Model>, p: &[u32], n: usize) -> Vec<u32> {
    let mut s = Session::new(m.clone(), &SessionOptions { n_ctx: Some(256), ..Default::default() }).unwrap();
    let mut sampler = stllm::sampling::Sampler::new(Default::default());
    s.generate(p, n, &mut sampler, &[], |_| {}).unwrap()
}

fn no_stop(prompt: Vec<u32>, n: usize) -> GenerateRequest {
    GenerateRequest { stop_tokens: Some(vec![]), ..GenerateRequest::greedy(prompt, n) }
}

/// Logits of the sequence `tokens` decoded alone (prefill, then one token at a time).
fn runner_alone(m: &Arc<Model>, tokens: &[u32], split: usize) -> Vec<Vec<f32>> {
    let mut r = Runner::new(m.clone(), &opts_runner()).unwrap();
    let mut rows = Vec::new();
    let mut ub = UBatch::default();
    for (i, &t) in tokens[..split].iter().enumerate() {
        ub.push(t, i as u32, 0, true);
    }
    rows.extend(r.run(&ub, false, false).unwrap().rows);
    for (i, &t) in tokens.iter().enumerate().skip(split) {
        let mut ub = UBatch::default();
        ub.push(t, i as u32, 0, true);
        rows.extend(r.run(&ub, false, false).unwrap().rows);
    }
    rows
}

fn opts_runner() -> RunnerOptions {
    RunnerOptions { n_cells: 512, n_ubatch: 256, kv_type: None, flash_attn: None, n_seq_max: 4 }
}

#[test]
fn device_argmax_equals_argmax_of_the_logits() {
    // Greedy steps take the argmax in the graph; it must pick what the host picks from the
    // logits, for a dense model and for a hybrid one (whose steps are split by sequence).
    for name in ["qwen3-f32-sharded", "nemotron_h-f32"] {
        let m = model(name);
        let vocab = m.hparams().n_vocab as u32;
        let batch = |seed: u32| {
            let mut ub = UBatch::default();
            for s in 0..3u32 {
                for (i, &t) in prompt(seed + s, 5, vocab).iter().enumerate() {
                    ub.push(t, i as u32, s, i >= 3);
                }
            }
            ub
        };
        let mut a = Runner::new(m.clone(), &opts_runner()).unwrap();
        let mut b = Runner::new(m.clone(), &opts_runner()).unwrap();
        let rows = a.run(&batch(7), false, false).unwrap().rows;
        let tokens = b.run_argmax(&batch(7)).unwrap();
        let want: Vec<u32> = rows.iter().map(|r| stllm::sampling::argmax(r)).collect();
        assert_eq!(tokens, want, "{name}");
        assert_eq!(tokens.len(), 6);
    }
}

#[test]
fn device_candidates_equal_the_host_cut_of_the_logits() {
    // Rows of one step may ask for different things: the whole logits row, the k largest
    // logits, with or without the log-normaliser. The device's cut must be the host's.
    for name in ["qwen3-f32-sharded", "nemotron_h-f32"] {
        let m = model(name);
        let vocab = m.hparams().n_vocab as u32;
        let wants = [
            Want::Top { k: 5, norm: true },
            Want::Logits,
            Want::Top { k: 1, norm: false },
            Want::Top { k: 40, norm: false },
        ];
        let batch = |seed: u32, with_wants: bool| {
            let mut ub = UBatch::default();
            for s in 0..4u32 {
                for (i, &t) in prompt(seed + s, 4, vocab).iter().enumerate() {
                    let want = if with_wants { wants[s as usize] } else { Want::Logits };
                    ub.push_want(t, i as u32, s, i == 3, want);
                }
            }
            ub
        };
        let mut a = Runner::new(m.clone(), &opts_runner()).unwrap();
        let mut b = Runner::new(m.clone(), &opts_runner()).unwrap();
        let rows = a.run(&batch(11, false), false, false).unwrap().rows;
        let got = b.run_select(&batch(11, true)).unwrap();
        assert_eq!(got.len(), 4, "{name}");
        for (j, (row, out)) in rows.iter().zip(&got).enumerate() {
            match (wants[j], out) {
                (Want::Logits, RowOut::Logits(l)) => {
                    assert!(rel(std::slice::from_ref(l), std::slice::from_ref(row)) < 1e-5, "{name} row {j}")
                }
                (Want::Top { k, norm }, RowOut::Top(t)) => {
                    let want = stllm_policy::sampling::top_candidates(row, k as usize, 0.0);
                    let ids: Vec<u32> = want.iter().map(|c| c.id).collect();
                    assert_eq!(t.ids, ids, "{name} row {j}");
                    for (x, c) in t.logits.iter().zip(&want) {
                        assert!((x - c.logit).abs() <= 1e-4 * c.logit.abs().max(1.0), "{name} row {j}");
                    }
                    match (norm, t.log_norm) {
                        (true, Some(n)) => {
                            let lse = stllm_policy::generate::log_sum_exp(row);
                            assert!((n - lse).abs() < 1e-3, "{name} row {j}: {n} vs {lse}");
                        }
                        (false, None) => {}
                        other => panic!("{name} row {j}: norm {other:?}"),
                    }
                }
                other => panic!("{name} row {j}: {other:?}"),
            }
        }
    }
}

#[test]
fn guest_sequences_get_device_candidates_equal_to_their_logits() {
    // `Sequence::decode_top` (what a guest's decode-top runs on) against the logits of the
    // same positions through `Sequence::decode`, with other sequences in the same steps.
    let m = model("qwen3-f32-sharded");
    let vocab = m.hparams().n_vocab as u32;
    let engine = Arc::new(Engine::new(m.clone(), EngineOptions { n_cells: 512, ..Default::default() }).unwrap());
    let p = prompt(5, 9, vocab);
    let mut a = engine.open_sequence(64).unwrap();
    let mut b = engine.open_sequence(64).unwrap();
    let full = a.decode(&p, Logits::Last).unwrap().pop().unwrap();
    let top = b.decode_top(&p, 8, true).unwrap();
    let want = stllm_policy::sampling::top_candidates(&full, 8, 0.0);
    assert_eq!(top.ids, want.iter().map(|c| c.id).collect::<Vec<_>>());
    let lse = stllm_policy::generate::log_sum_exp(&full);
    assert!((top.log_norm.unwrap() - lse).abs() < 1e-3);
    // Next token, greedy (k = 0 means 1).
    let t = top.ids[0];
    let full = a.decode(&[t], Logits::Last).unwrap().pop().unwrap();
    let top = b.decode_top(&[t], 0, false).unwrap();
    assert_eq!(top.ids, vec![stllm::sampling::argmax(&full)]);
    assert_eq!(top.log_norm, None);
    assert_eq!((a.len(), b.len()), (10, 10));
}

#[test]
fn async_decodes_are_awaited_one_at_a_time_per_sequence() {
    // A guest's decode is awaited (no thread blocks on it): on a single-threaded runtime, two
    // sequences' decodes are in flight together; a sequence takes one operation at a time, and
    // its length counts the tokens in flight.
    let m = model("qwen3-f32-sharded");
    let vocab = m.hparams().n_vocab as u32;
    let engine = Arc::new(Engine::new(m.clone(), EngineOptions { n_cells: 512, ..Default::default() }).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (p, q) = (prompt(21, 7, vocab), prompt(22, 5, vocab));
    let mut alone = engine.open_sequence(64).unwrap();
    let want = alone.decode(&p, Logits::Last).unwrap().pop().unwrap();
    let mut a = engine.open_sequence(64).unwrap();
    let mut b = engine.open_sequence(64).unwrap();
    let fa = a.decode_top_async(&p, 3, false).unwrap();
    let fb = b.decode_async(&q, Logits::Last).unwrap();
    assert_eq!(a.len(), 7, "the length counts the tokens in flight");
    for err in [a.decode_top_async(&[1], 1, false).err(), a.fork().err(), a.truncate(0).err()] {
        let e = err.expect("refused while in flight").to_string();
        assert!(e.contains("in flight"), "{e}");
    }
    let (ra, rb) = rt.block_on(async { (fa.await, fb.await) });
    let top = ra.unwrap();
    let ids: Vec<u32> = stllm_policy::sampling::top_candidates(&want, 3, 0.0).iter().map(|c| c.id).collect();
    assert_eq!(top.ids, ids);
    assert_eq!(rb.unwrap().len(), 1);
    // Done: the sequence takes the next one; a failed decode gives its length back.
    let t = top.ids[0];
    let r = rt.block_on(a.decode_top_async(&[t], 1, false).unwrap()).unwrap();
    assert_eq!(r.ids.len(), 1);
    assert_eq!(a.len(), 8);
    assert!(a.decode_top_async(&[vocab], 1, false).is_err());
    assert_eq!(a.len(), 8);
}

/// What the policy's own loop samples on a caller-driven sequence, token by token (the
/// reference for runs): each row through `decode`/`decode_top`, then `pick`.
fn loop_tokens(
    seq: &mut stllm::engine::Sequence,
    p: &[u32],
    plan: &stllm::engine::RunPlan,
) -> Vec<stllm::engine::Sampled> {
    use stllm_policy::sampling::{Candidate, Sampler};
    let mut sampler = Sampler::new(plan.sampling.clone());
    let (mut hist, mut input, mut out) = (p.to_vec(), p.to_vec(), vec![]);
    while out.len() < plan.max_tokens as usize {
        let lp = plan.row.logprobs.is_some();
        let (cands, norm) = if plan.row.full {
            let Ok(mut rows) = seq.decode(&input, Logits::Last) else { break };
            let l = rows.pop().unwrap();
            let norm = if lp { stllm_policy::generate::log_sum_exp(&l) } else { 0.0 };
            (l.iter().enumerate().map(|(i, &logit)| Candidate { id: i as u32, logit }).collect::<Vec<_>>(), norm)
        } else {
            let Ok(top) = seq.decode_top(&input, plan.row.k, lp) else { break };
            (top.candidates(plan.row.min_p), top.log_norm.unwrap_or(0.0))
        };
        let (t, e) =
            stllm_policy::generate::pick(&mut sampler, cands, norm, &hist, &plan.logit_bias, plan.row.logprobs, None)
                .unwrap();
        out.push((t, e));
        hist.push(t);
        input = vec![t];
        if plan.stop_tokens.contains(&t) {
            break;
        }
    }
    out
}

fn run_all(run: &mut stllm::engine::RunTokens) -> Vec<stllm::engine::Sampled> {
    let mut out = vec![];
    loop {
        let got = run.next_blocking().unwrap();
        if got.is_empty() {
            return out;
        }
        out.extend(got);
    }
}

#[test]
fn runs_sample_on_the_compute_thread_what_the_loop_would() {
    // `Sequence::run` (a guest's `sequence.run`): the compute thread samples each row by the
    // policy's rule and computes the token next step. Same rule, seed and candidates: the
    // tokens (and log-probabilities) of the loop that samples token by token, for greedy, top-k,
    // whole rows with a logit bias, penalties and min-p, while another sequence decodes in the
    // same steps.
    use stllm::engine::RunPlan;
    use stllm_policy::generate::RowPlan;
    use stllm_policy::sampling::SamplingParams;
    let m = model("qwen3-f32-sharded");
    let vocab = m.hparams().n_vocab as u32;
    let engine = Arc::new(Engine::new(m.clone(), EngineOptions { n_cells: 1024, ..Default::default() }).unwrap());
    let p = prompt(31, 6, vocab);
    let plan = |row: RowPlan, sampling: SamplingParams, bias: Vec<(u32, f32)>| RunPlan {
        row,
        sampling,
        logit_bias: bias,
        stop_tokens: vec![],
        max_tokens: 12,
    };
    let sampled = SamplingParams { temperature: 0.8, top_k: 20, seed: 3, ..Default::default() };
    let plans = [
        plan(RowPlan { k: 1, full: false, min_p: 0.0, logprobs: None }, SamplingParams::default(), vec![]),
        plan(RowPlan { k: 20, full: false, min_p: 0.0, logprobs: Some(3) }, sampled.clone(), vec![]),
        plan(
            RowPlan { k: 0, full: true, min_p: 0.0, logprobs: Some(2) },
            SamplingParams { temperature: 1.0, seed: 9, ..Default::default() },
            vec![(7, 2.5), (11, -100.0)],
        ),
        plan(
            RowPlan { k: 64, full: false, min_p: 0.05, logprobs: None },
            SamplingParams { temperature: 0.7, min_p: 0.05, repetition_penalty: 1.3, seed: 4, ..Default::default() },
            vec![],
        ),
    ];
    for (i, plan) in plans.iter().enumerate() {
        let mut by_loop = engine.open_sequence(64).unwrap();
        let want = loop_tokens(&mut by_loop, &p, plan);
        let mut other = engine.open_sequence(64).unwrap();
        let q = prompt(40 + i as u32, 5, vocab);
        let mut seq = engine.open_sequence(64).unwrap();
        let mut run = seq.run(&p, plan.clone()).unwrap();
        // Another sequence decodes while the run goes on.
        other.decode(&q, Logits::Last).unwrap();
        let got = run_all(&mut run);
        assert_eq!(
            got.iter().map(|s| s.0).collect::<Vec<_>>(),
            want.iter().map(|s| s.0).collect::<Vec<_>>(),
            "plan {i}"
        );
        for (g, w) in got.iter().zip(&want) {
            match (&g.1, &w.1) {
                (Some(g), Some(w)) => {
                    assert!((g.logprob - w.logprob).abs() < 1e-3, "plan {i}: {g:?} vs {w:?}");
                    assert_eq!(
                        g.top.iter().map(|t| t.0).collect::<Vec<_>>(),
                        w.top.iter().map(|t| t.0).collect::<Vec<_>>()
                    );
                }
                (None, None) => {}
                other => panic!("plan {i}: {other:?}"),
            }
        }
        // The last token is yielded, not computed.
        assert!(run.ended());
        assert_eq!(seq.len(), p.len() + got.len() - 1, "plan {i}");
        // The sequence takes other operations again.
        seq.truncate(p.len()).unwrap();
        assert_eq!(seq.len(), p.len());
    }
    assert!(engine.stats().run_tokens_sampled >= 48);
}

#[test]
fn runs_end_at_stop_tokens_the_sequence_end_and_run_stop() {
    use stllm::engine::RunPlan;
    use stllm_policy::generate::RowPlan;
    use stllm_policy::sampling::SamplingParams;
    let m = model("qwen3-f32-sharded");
    let vocab = m.hparams().n_vocab as u32;
    let engine = Arc::new(Engine::new(m.clone(), EngineOptions { n_cells: 1024, ..Default::default() }).unwrap());
    let p = prompt(32, 5, vocab);
    let greedy = |max_tokens: u32, stop_tokens: Vec<u32>| RunPlan {
        row: RowPlan { k: 1, full: false, min_p: 0.0, logprobs: None },
        sampling: SamplingParams::default(),
        logit_bias: vec![],
        stop_tokens,
        max_tokens,
    };
    let mut seq = engine.open_sequence(64).unwrap();
    let all: Vec<u32> = run_all(&mut seq.run(&p, greedy(10, vec![])).unwrap()).iter().map(|s| s.0).collect();
    assert_eq!(all.len(), 10);
    // A stop token ends the run with it (its first occurrence).
    let stop = all[3];
    let first = all.iter().position(|&t| t == stop).unwrap();
    let mut seq = engine.open_sequence(64).unwrap();
    let got: Vec<u32> = run_all(&mut seq.run(&p, greedy(10, vec![stop])).unwrap()).iter().map(|s| s.0).collect();
    assert_eq!(got, all[..=first]);
    // The sequence's end: a sequence of p + 4 positions yields 5 tokens (the last one not
    // computed), as the loop ends when its next decode no longer fits.
    let mut seq = engine.open_sequence(p.len() + 4).unwrap();
    let got = run_all(&mut seq.run(&p, greedy(100, vec![])).unwrap());
    assert_eq!(got.len(), 5);
    assert_eq!(seq.len(), p.len() + 4);
    // Refused: a second run or a decode while one goes, no tokens, a bias out of the vocabulary.
    let mut seq = engine.open_sequence(64).unwrap();
    let mut run = seq.run(&p, greedy(40, vec![])).unwrap();
    for e in [seq.run(&[1], greedy(1, vec![])).err(), seq.decode(&[1], Logits::Last).err(), seq.fork().err()] {
        assert!(e.expect("refused while running").to_string().contains("in flight"));
    }
    let first = run.next_blocking().unwrap();
    assert!(!first.is_empty());
    // Stopped early: the tokens not yet computed are dropped and the sequence is usable.
    let n = seq.run_stop().unwrap();
    assert!(n >= p.len() && n < p.len() + 40, "{n}");
    assert_eq!(seq.len(), n);
    let row = seq.decode(&[1], Logits::Last).unwrap();
    assert_eq!(row.len(), 1);
    // What the reader has not read yet ends: no hang after a stop.
    while !run.next_blocking().map(|v| v.is_empty()).unwrap_or(true) {}
    let mut fresh = engine.open_sequence(64).unwrap();
    assert!(fresh.run(&p, greedy(0, vec![])).is_err());
    let bad = RunPlan { logit_bias: vec![(vocab, 1.0)], ..greedy(4, vec![]) };
    assert!(fresh.run(&p, bad).is_err());
    // A run on a closed sequence's engine operations still answer: dropping the reader ends it.
    let mut seq = engine.open_sequence(64).unwrap();
    drop(seq.run(&p, greedy(30, vec![])).unwrap());
    assert!(engine.wait_idle(Duration::from_secs(30)));
    let n = seq.run_stop().unwrap();
    assert!(n <= p.len() + 30);
    seq.decode(&[2], Logits::Last).unwrap();
}

#[test]
fn seventy_sequences_in_one_step_stay_apart() {
    // 70 sequences prefill 3 tokens each in one ubatch, then decode one token each in one
    // ubatch: more rows than ggml's attention tile, so attention is split into segments.
    let m = model("llama-f32");
    let vocab = m.hparams().n_vocab as u32;
    let seqs: Vec<Vec<u32>> = (0..70).map(|s| prompt(300 + s, 4, vocab)).collect();
    let mut r = Runner::new(m.clone(), &opts_runner()).unwrap();
    let mut ub = UBatch::default();
    for (s, toks) in seqs.iter().enumerate() {
        for (i, &t) in toks[..3].iter().enumerate() {
            ub.push(t, i as u32, s as u32, i == 2);
        }
    }
    let first = r.run(&ub, false, false).unwrap().rows;
    let mut ub = UBatch::default();
    for (s, toks) in seqs.iter().enumerate() {
        ub.push(toks[3], 3, s as u32, true);
    }
    let second = r.run(&ub, false, false).unwrap().rows;
    for (s, toks) in seqs.iter().enumerate() {
        let want = runner_alone(&m, toks, 3);
        let got = vec![first[s].clone(), second[s].clone()];
        let e = rel(&got, &want[2..]);
        assert!(e <= 1e-4, "sequence {s}: rel err {e}");
    }
}

#[test]
fn a_sequence_batched_with_others_gets_the_logits_it_gets_alone() {
    for name in ["qwen3-f32-sharded", "mistral-f32", "llama-f32", "mixtral-f32", "qwen3_moe-f32", "gpt_oss-f32"] {
        let m = model(name);
        let exp = Expected::load(&fixture(name));
        let tokens = exp.ids("tokens");
        let split = 5;
        let want = runner_alone(&m, &tokens, split);
        assert!(rel_err(&want, &exp.rows("logits")) < 2e-3, "{name}: alone matches HF");

        // Three sequences in every step: ours (seq 7), a stranger with other tokens (seq 2),
        // and one sharing our first 3 positions' cells (seq 4, forked) that then diverges.
        let vocab = m.hparams().n_vocab as u32;
        // The stranger's 60-token prompt makes the first step's attention run in two segments.
        let other = prompt(99, 60 + tokens.len() + 10, vocab);
        let mut r = Runner::new(m.clone(), &opts_runner()).unwrap();
        let mut ub = UBatch::default();
        for (i, &t) in other[..60].iter().enumerate() {
            ub.push(t, i as u32, 2, false);
        }
        for (i, &t) in tokens[..split].iter().enumerate() {
            ub.push(t, i as u32, 7, true);
        }
        for (i, &t) in other[60..65].iter().enumerate() {
            ub.push(t, 60 + i as u32, 2, true);
        }
        let mut got: Vec<Vec<f32>> = r.run(&ub, false, false).unwrap().rows[..split].to_vec();
        r.seq_cp(7, 4, 0, 3).unwrap();
        for (i, &t) in tokens.iter().enumerate().skip(split) {
            let mut ub = UBatch::default();
            ub.push(other[i + 60], i as u32 + 60, 2, true);
            ub.push(t, i as u32, 7, true);
            ub.push(other[i], i as u32 - split as u32 + 3, 4, true);
            got.push(r.run(&ub, false, false).unwrap().rows[1].clone());
        }
        let e = rel(&got, &want);
        assert!(e <= 1e-4, "{name}: batched vs alone rel err {e}");
    }
}

#[test]
fn engine_outputs_equal_sessions_and_prefix_hits_skip_compute() {
    // A dense model, and gpt-oss (sinks, a window of 4 on alternate layers, biased MoE).
    for name in ["qwen3-f32-sharded", "gpt_oss-f32"] {
        prefix_hits_skip_compute(name);
    }
}

fn prefix_hits_skip_compute(name: &str) {
    let m = model(name);
    let vocab = m.hparams().n_vocab as u32;
    let engine = Engine::new(m.clone(), EngineOptions { n_cells: 512, ..Default::default() }).unwrap();
    let system = prompt(1, 40, vocab);
    let mut a = system.clone();
    a.extend(prompt(2, 6, vocab));
    let (ta, fa) = engine.generate(no_stop(a.clone(), 8)).unwrap().wait();
    assert_eq!(fa.reason, FinishReason::Length);
    assert_eq!(ta, alone(&m, &a, 8));
    assert_eq!(fa.cached_tokens, 0);
    // Stats are published after each step: wait for the step that finished the request.
    assert!(engine.wait_idle(Duration::from_secs(10)));
    let s0 = engine.stats();
    assert_eq!((s0.prefix_hits, s0.prefix_misses), (0, 1));
    assert_eq!(s0.prompt_tokens_computed, a.len() as u64);

    // Same system prompt, another question: the 40 shared tokens come from the cache.
    let mut b = system.clone();
    b.extend(prompt(3, 5, vocab));
    let (tb, fb) = engine.generate(no_stop(b.clone(), 8)).unwrap().wait();
    assert_eq!(tb, alone(&m, &b, 8), "{name}: a prefix hit changes nothing in the output");
    assert_eq!(fb.cached_tokens, 40);
    assert!(engine.wait_idle(Duration::from_secs(10)));
    let s1 = engine.stats();
    assert_eq!(s1.prefix_hits, 1);
    assert_eq!(s1.prefix_tokens_reused, 40);
    assert_eq!(s1.prompt_tokens_computed - s0.prompt_tokens_computed, 5, "only the new tokens were computed");
    assert_eq!(s1.active, 0);
    assert_eq!(s1.kv_cells_used, s1.kv_cells_cached, "idle: only cached prefixes hold cells");
}

#[test]
fn sixteen_threads_share_one_engine() {
    let m = model("llama-f32");
    let vocab = m.hparams().n_vocab as u32;
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| prompt(100 + i, 6 + 3 * i as usize, vocab)).collect();
    let want: Vec<Vec<u32>> = prompts.iter().map(|p| alone(&m, p, 12)).collect();
    for prefix_cache in [false, true] {
        let engine = Arc::new(
            Engine::new(m.clone(), EngineOptions { n_cells: 1024, max_seqs: 12, prefix_cache, ..Default::default() })
                .unwrap(),
        );
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let (engine, prompts, want) = (engine.clone(), prompts.clone(), want.clone());
                std::thread::spawn(move || {
                    for k in 0..3 {
                        let i = (t * 3 + k) % prompts.len();
                        let (got, f) = engine.generate(no_stop(prompts[i].clone(), 12)).unwrap().wait();
                        assert_eq!(f.reason, FinishReason::Length);
                        assert_eq!(got, want[i], "thread {t} request {k} (prompt {i})");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(engine.wait_idle(Duration::from_secs(10)));
        let s = engine.stats();
        assert_eq!(s.requests_finished, 48);
        assert_eq!(s.tokens_generated, 48 * 12);
        assert_eq!(s.active + s.waiting, 0);
        assert_eq!(s.kv_cells_used, s.kv_cells_cached, "no cells leaked");
        if !prefix_cache {
            assert_eq!(s.kv_cells_used, 0);
        }
    }
}

#[test]
fn cancel_and_dropping_a_stream_free_memory() {
    let m = model("llama-f32");
    let engine =
        Engine::new(m.clone(), EngineOptions { n_cells: 256, prefix_cache: false, ..Default::default() }).unwrap();
    let mut g = engine.generate(no_stop(prompt(5, 10, 384), 200)).unwrap();
    let mut n = 0;
    while n < 3 {
        if let Some(Event::Token(_)) = g.next() {
            n += 1;
        }
    }
    // Stats are published after each step: wait for the one that produced the tokens.
    let t0 = std::time::Instant::now();
    while engine.stats().kv_cells_used < 12 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(engine.stats().kv_cells_used >= 12);
    assert!(engine.cancel(g.id()));
    let (rest, f) = g.wait();
    assert_eq!(f.reason, FinishReason::Cancelled);
    assert!(3 + rest.len() < 200);
    assert!(engine.wait_idle(Duration::from_secs(10)));
    assert_eq!(engine.stats().kv_cells_used, 0, "cancel freed the cells");

    let mut g = engine.generate(no_stop(prompt(6, 10, 384), 200)).unwrap();
    assert!(matches!(g.next(), Some(Event::Token(_))));
    drop(g);
    assert!(engine.wait_idle(Duration::from_secs(10)));
    assert_eq!(engine.stats().kv_cells_used, 0, "a dropped stream is cancelled");
}

#[test]
fn a_full_cache_makes_requests_wait_not_fail() {
    let m = model("llama-f32");
    let vocab = m.hparams().n_vocab as u32;
    // 6 requests of 20 + 20 tokens, 64 cells: at most one or two fit at a time.
    let engine = Arc::new(
        Engine::new(m.clone(), EngineOptions { n_cells: 64, max_seqs: 6, prefix_cache: false, ..Default::default() })
            .unwrap(),
    );
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(200 + i, 20, vocab)).collect();
    let gens: Vec<_> = prompts.iter().map(|p| engine.generate(no_stop(p.clone(), 20)).unwrap()).collect();
    for (p, g) in prompts.iter().zip(gens) {
        let (got, f) = g.wait();
        assert_eq!(f.reason, FinishReason::Length);
        assert_eq!(got, alone(&m, p, 20));
    }
    assert!(engine.wait_idle(Duration::from_secs(10)));
    assert_eq!(engine.stats().kv_cells_used, 0);

    // Too long for any sequence: refused up front, and the engine goes on.
    let e = engine.generate(no_stop(vec![1; 64], 4)).unwrap_err();
    assert!(matches!(e, EngineError::PromptTooLong { .. }), "{e}");
    let (got, _) = engine.generate(no_stop(prompts[0].clone(), 3)).unwrap().wait();
    assert_eq!(got.len(), 3);
}

#[test]
fn bad_requests_are_refused_and_the_engine_goes_on() {
    let m = model("llama-f32");
    let engine = Engine::new(m.clone(), EngineOptions { n_cells: 128, ..Default::default() }).unwrap();
    let e = engine.generate(no_stop(vec![], 4)).unwrap_err();
    assert!(e.to_string().contains("empty prompt"), "{e}");
    let e = engine.generate(no_stop(vec![1, 384], 4)).unwrap_err();
    assert!(e.to_string().contains("token id 384 is out of range"), "{e}");
    let mut bad = no_stop(vec![1, 2], 4);
    bad.sampling.temperature = -1.0;
    assert!(engine.generate(bad).unwrap_err().to_string().contains("temperature"));
    let (got, f) = engine.generate(no_stop(vec![1, 2, 3], 4)).unwrap().wait();
    assert_eq!((got.len(), f.reason), (4, FinishReason::Length));
    let (got, f) = engine.generate(no_stop(vec![1, 2, 3], 0)).unwrap().wait();
    assert_eq!((got.len(), f.reason), (0, FinishReason::Length));
}

#[test]
fn logits_of_a_session_match_after_the_cell_rework() {
    // Sessions now run on the shared-cell runner; truncate frees cells for reuse.
    let m = model("qwen3-f32-sharded");
    let exp = Expected::load(&fixture("qwen3-f32-sharded"));
    let tokens = exp.ids("tokens");
    let mut s = Session::new(m, &SessionOptions { n_ctx: Some(tokens.len() + 2), ..Default::default() }).unwrap();
    s.decode(&tokens[..4], Logits::Last).unwrap();
    s.decode(&[1, 2], Logits::Last).unwrap();
    s.truncate(4).unwrap();
    let rows = s.decode(&tokens[4..], Logits::All).unwrap();
    assert!(rel_err(&rows, &exp.rows("logits")[4..]) < 2e-3);
}

#[test]
fn caller_driven_sequences_batch_with_each_other_and_fork_without_copying() {
    let m = model("qwen3-f32-sharded");
    let exp = Expected::load(&fixture("qwen3-f32-sharded"));
    let tokens = exp.ids("tokens");
    let want = runner_alone(&m, &tokens, 5);
    let engine = Arc::new(
        Engine::new(m.clone(), EngineOptions { n_cells: 256, prefix_cache: false, ..Default::default() }).unwrap(),
    );
    // Four threads drive their own sequence over the same tokens, step by step, concurrently.
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (engine, tokens) = (engine.clone(), tokens.clone());
            std::thread::spawn(move || {
                let mut s = engine.open_sequence(0).unwrap();
                let mut rows = s.decode(&tokens[..5], Logits::All).unwrap();
                for &t in &tokens[5..] {
                    rows.extend(s.decode(&[t], Logits::Last).unwrap());
                }
                assert_eq!(s.len(), tokens.len());
                rows
            })
        })
        .collect();
    for t in threads {
        let got = t.join().unwrap();
        let e = rel(&got, &want);
        assert!(e <= 1e-4, "rel err {e}");
    }
    assert!(engine.wait_idle(Duration::from_secs(10)));
    assert_eq!(engine.stats().kv_cells_used, 0, "closed sequences free their cells");

    let mut a = engine.open_sequence(0).unwrap();
    a.decode(&tokens[..6], Logits::Last).unwrap();
    let mut b = a.fork().unwrap();
    assert_eq!(engine.stats().kv_cells_used, 6, "a fork shares its parent's cells");
    let ra = a.decode(&tokens[6..], Logits::All).unwrap();
    let rb = b.decode(&tokens[6..], Logits::All).unwrap();
    assert!(rel(&ra, &want[6..]) <= 1e-4 && rel(&rb, &want[6..]) <= 1e-4);
    b.truncate(2).unwrap();
    assert!(b.truncate(50).is_err());
    let e = a.decode(&[1; 300], Logits::Last).unwrap_err();
    assert!(e.to_string().contains("context full"), "{e}");
    drop((a, b));
    assert!(engine.wait_idle(Duration::from_secs(10)));
}

#[test]
fn prompt_cache_files_round_trip_through_the_prefix_cache() {
    let m = model("qwen3-f32-sharded");
    let vocab = m.hparams().n_vocab as u32;
    let system = prompt(7, 40, vocab);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("system.kv");
    {
        let engine = Arc::new(Engine::new(m.clone(), EngineOptions { n_cells: 256, ..Default::default() }).unwrap());
        engine.save_prompt(&system, &file).unwrap();
    }
    // A fresh engine (another process, say) loads it: the system prompt is not recomputed.
    let engine = Engine::new(m.clone(), EngineOptions { n_cells: 256, ..Default::default() }).unwrap();
    assert_eq!(engine.load_prompt(&file).unwrap(), system);
    let mut p = system.clone();
    p.extend(prompt(8, 5, vocab));
    let (got, f) = engine.generate(no_stop(p.clone(), 6)).unwrap().wait();
    assert_eq!(f.cached_tokens, 40);
    assert_eq!(got, alone(&m, &p, 6));
    assert!(engine.wait_idle(Duration::from_secs(10)));
    assert_eq!(engine.stats().prompt_tokens_computed, 5);

    // Another model or cache type: refused, naming what differs.
    let other = Engine::new(model("llama-f32"), EngineOptions { n_cells: 256, ..Default::default() }).unwrap();
    let e = other.load_prompt(&file).unwrap_err().to_string();
    assert!(e.contains("architecture"), "{e}");
    let f16 =
        Engine::new(m.clone(), EngineOptions { n_cells: 256, kv_type: Some(stllm::DType::F16), ..Default::default() })
            .unwrap();
    let e = f16.load_prompt(&file).unwrap_err().to_string();
    assert!(e.contains("KV cache type"), "{e}");
    let off = Engine::new(m, EngineOptions { n_cells: 256, prefix_cache: false, ..Default::default() }).unwrap();
    assert!(off.load_prompt(&file).unwrap_err().to_string().contains("prefix cache is off"));
}

#[test]
fn hybrid_prompt_cache_files_carry_the_recurrent_state() {
    // A hybrid model's file holds the attention layers' cells and the Mamba layers' state: a
    // fresh engine that loads it continues the prompt without computing it, with the output of
    // a lone run; a file of another size of state is refused.
    let m = model("nemotron_h-f32");
    let vocab = m.hparams().n_vocab as u32;
    let system = prompt(17, 24, vocab);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hybrid.kv");
    let opts = || EngineOptions { n_cells: 512, max_seqs: 4, ..Default::default() };
    {
        let engine = Arc::new(Engine::new(m.clone(), opts()).unwrap());
        engine.save_prompt(&system, &file).unwrap();
    }
    let engine = Engine::new(m.clone(), opts()).unwrap();
    assert_eq!(engine.load_prompt(&file).unwrap(), system);
    let mut p = system.clone();
    p.extend(prompt(18, 5, vocab));
    let (got, f) = engine.generate(no_stop(p.clone(), 6)).unwrap().wait();
    assert_eq!(f.cached_tokens, system.len(), "the loaded state is where the prompt resumes");
    assert_eq!(got, alone(&m, &p, 6));
    assert!(engine.wait_idle(Duration::from_secs(10)));
    assert_eq!(engine.stats().prompt_tokens_computed, 5);
    // An attention-only model's file is refused by this hybrid one (and the other way round).
    let dense = dir.path().join("dense.kv");
    Arc::new(Engine::new(model("qwen3-f32-sharded"), opts()).unwrap()).save_prompt(&system, &dense).unwrap();
    let e = engine.load_prompt(&dense).unwrap_err().to_string();
    assert!(e.contains("architecture"), "{e}");
}

#[test]
fn memory_is_reported_and_a_cache_that_cannot_fit_is_refused_up_front() {
    let m = model("llama-f32");
    let engine = Engine::new(m.clone(), EngineOptions { n_cells: 256, ..Default::default() }).unwrap();
    let (got, _) = engine.generate(no_stop(vec![1, 2, 3], 4)).unwrap().wait();
    assert_eq!(got.len(), 4);
    assert!(engine.wait_idle(Duration::from_secs(10)));
    let mem = engine.stats().memory;
    assert_eq!(mem.device, "CPU");
    assert_eq!(mem.weights, m.weight_bytes());
    assert_eq!(mem.kv, engine.stats().kv_bytes);
    assert!(mem.compute > 0 && mem.device_total > 0, "{mem:?}");
    // 2^31 cells: terabytes of KV cache. Refused before allocating, naming what and how much.
    let e = Engine::new(m.clone(), EngineOptions { n_cells: 1 << 31, ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("the KV cache") && e.contains("does not fit") && e.contains("MiB free"), "{e}");
    // Beyond what cells can be addressed with: refused as such.
    let e = Engine::new(m, EngineOptions { n_cells: 1 << 40, ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("KV cells: at most"), "{e}");
}

/// A hybrid model (Mamba-2 + attention + MoE layers, recurrent state per sequence) through the
/// engine: many requests at once — decode steps run every sequence's token through the Mamba
/// layers together, prompt chunks one sequence at a time — each gets exactly the tokens it gets
/// alone. Caller-driven sequences fork with a copy of the state, and truncating one (its state
/// cannot be rewound) is refused with a clear error while the engine goes on.
#[test]
fn hybrid_model_requests_batch_and_match_alone() {
    let m = model("nemotron_h-f32");
    let vocab = m.hparams().n_vocab as u32;
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(300 + i, 5 + 7 * i as usize, vocab)).collect();
    let want: Vec<Vec<u32>> = prompts.iter().map(|p| alone(&m, p, 10)).collect();
    let engine = Arc::new(
        Engine::new(m.clone(), EngineOptions { n_cells: 1024, max_seqs: 6, n_batch: 16, ..Default::default() })
            .unwrap(),
    );
    let gens: Vec<_> = prompts.iter().map(|p| engine.generate(no_stop(p.clone(), 10)).unwrap()).collect();
    for (i, (g, w)) in gens.into_iter().zip(&want).enumerate() {
        let (t, f) = g.wait();
        assert_eq!(&t, w, "request {i}");
        assert_eq!(f.cached_tokens, 0, "distinct prompts share nothing");
    }
    assert!(engine.wait_idle(Duration::from_secs(10)));
    let st = engine.stats();
    assert!(st.steps < 6 * 10 + 20, "decode steps were shared: {} steps", st.steps);
    // KV for the attention layer only, plus the Mamba layers' state slots, both reported.
    assert!(st.memory.kv > 0 && st.memory.recurrent > 0, "{:?}", st.memory);

    // A fork continues from a copy of the state: both continuations equal a lone run.
    let p = &prompts[3];
    let mut a = engine.open_sequence(0).unwrap();
    a.decode(p, Logits::Last).unwrap();
    let mut b = a.fork().unwrap();
    let la = a.decode(&[5], Logits::Last).unwrap();
    let lb = b.decode(&[5], Logits::Last).unwrap();
    let mut s = Session::new(m.clone(), &SessionOptions { n_ctx: Some(256), ..Default::default() }).unwrap();
    s.decode(p, Logits::Last).unwrap();
    let ls = s.decode(&[5], Logits::Last).unwrap();
    assert!(rel(&la, &ls) <= 1e-4 && rel(&lb, &ls) <= 1e-4);
    let e = a.truncate(2).unwrap_err().to_string();
    assert!(e.contains("recurrent") && e.contains("cannot be rewound"), "{e}");
    // A prompt-cache file of a hybrid carries its state (see
    // `hybrid_prompt_cache_files_carry_the_recurrent_state`); saving one leaves the engine as it was.
    let dir = tempfile::tempdir().unwrap();
    engine.save_prompt(&prompts[0], &dir.path().join("p.bin")).unwrap();
    assert_eq!(engine.generate(no_stop(prompts[0].clone(), 10)).unwrap().wait().0, want[0]);
}

/// A hybrid model's prefix cache: a finished request leaves its cells and its recurrent state
/// (which stands at the end of what it computed); the next turn of the conversation (that prompt,
/// the reply, new tokens) starts from it and computes only the new tokens, with the output of a
/// lone run. A prompt that shares only part of a cached entry cannot use it (the state would have
/// to be rewound) and is computed in full, correctly.
#[test]
fn hybrid_prefix_cache_continues_a_conversation() {
    let m = model("nemotron_h-f32");
    let vocab = m.hparams().n_vocab as u32;
    let engine = Engine::new(m.clone(), EngineOptions { n_cells: 1024, max_seqs: 4, ..Default::default() }).unwrap();
    let first = prompt(500, 20, vocab);
    let (reply, f1) = engine.generate(no_stop(first.clone(), 8)).unwrap().wait();
    assert_eq!(reply, alone(&m, &first, 8));
    assert_eq!(f1.cached_tokens, 0);
    assert!(engine.wait_idle(Duration::from_secs(10)));
    let s0 = engine.stats();

    // Next turn: everything so far plus 6 new tokens. The cache holds the prompt and the first
    // 7 reply tokens (the last one was never fed back).
    let mut turn = first.clone();
    turn.extend(&reply);
    turn.extend(prompt(501, 6, vocab));
    let (t2, f2) = engine.generate(no_stop(turn.clone(), 8)).unwrap().wait();
    assert_eq!(t2, alone(&m, &turn, 8), "a cached state changes nothing in the output");
    assert_eq!(f2.cached_tokens, first.len() + reply.len() - 1);
    assert!(engine.wait_idle(Duration::from_secs(10)));
    let s1 = engine.stats();
    assert_eq!(s1.prefix_hits - s0.prefix_hits, 1);
    assert_eq!(s1.prompt_tokens_computed - s0.prompt_tokens_computed, 7, "the last reply token + 6 new");

    // The same first prompt again shares only part of the cached entries: computed in full.
    let (t3, f3) = engine.generate(no_stop(first.clone(), 8)).unwrap().wait();
    assert_eq!(t3, reply);
    assert_eq!(f3.cached_tokens, 0);
}

/// Hybrid models keep state snapshots every `SNAPSHOT_EVERY` prompt tokens: a prompt that shares
/// a long prefix with an earlier one (a system prompt, a document) but not its tail resumes from
/// the last snapshot inside the shared part, with the output of a lone run.
#[test]
fn hybrid_prefix_resumes_from_a_snapshot() {
    use stllm::engine::SNAPSHOT_EVERY;
    let m = model("nemotron_h-f32");
    let vocab = m.hparams().n_vocab as u32;
    let engine = Engine::new(
        m.clone(),
        EngineOptions { n_cells: 4096, max_seqs: 4, max_seq_len: Some(1024), ..Default::default() },
    )
    .unwrap();
    let lone = |p: &[u32]| {
        let mut s = Session::new(m.clone(), &SessionOptions { n_ctx: Some(1024), ..Default::default() }).unwrap();
        let mut sampler = stllm::sampling::Sampler::new(Default::default());
        s.generate(p, 6, &mut sampler, &[], |_| {}).unwrap()
    };
    let shared = prompt(600, 2 * SNAPSHOT_EVERY + 100, vocab);
    let with = |tail: u32, n: usize| {
        let mut p = shared[..n].to_vec();
        p.extend(prompt(tail, 12, vocab));
        p
    };
    let a = with(601, shared.len());
    let (ta, fa) = engine.generate(no_stop(a.clone(), 6)).unwrap().wait();
    assert_eq!(ta, lone(&a));
    assert_eq!(fa.cached_tokens, 0);
    // Another tail after the whole shared part: resumes at the second snapshot.
    let b = with(602, shared.len());
    let (tb, fb) = engine.generate(no_stop(b.clone(), 6)).unwrap().wait();
    assert_eq!(tb, lone(&b));
    assert_eq!(fb.cached_tokens, 2 * SNAPSHOT_EVERY);
    // Sharing only 300 tokens: the first snapshot.
    let c = with(603, 300);
    let (tc, fc) = engine.generate(no_stop(c.clone(), 6)).unwrap().wait();
    assert_eq!(tc, lone(&c));
    assert_eq!(fc.cached_tokens, SNAPSHOT_EVERY);

    // A prompt with more boundaries than the cache has entries (8 for hybrids): once full, each
    // new snapshot replaces the prompt's previous one, so the deepest stays.
    let engine = Engine::new(
        m.clone(),
        EngineOptions { n_cells: 8192, max_seqs: 2, max_seq_len: Some(4096), ..Default::default() },
    )
    .unwrap();
    let long = prompt(610, 12 * SNAPSHOT_EVERY + 30, vocab);
    let mut d = long.clone();
    d.extend(prompt(611, 5, vocab));
    engine.generate(no_stop(d, 2)).unwrap().wait();
    let mut e = long.clone();
    e.extend(prompt(612, 5, vocab));
    let (_, fe) = engine.generate(no_stop(e, 2)).unwrap().wait();
    assert_eq!(fe.cached_tokens, 12 * SNAPSHOT_EVERY);
}

/// Positions far past any context-size default (and past i32): a hybrid model without RoPE
/// (Nemotron-H: the Mamba layers carry order, attention has no positional encoding) gives the same
/// logits for a sequence starting at position 3,000,000,000 as at 0, through both the KV cells
/// (masks compare u32 positions) and the recurrent state (which follows positions). RoPE models
/// hand positions to ggml as I32, so they are good to 2^31 - 1 (1M-token contexts are far below).
#[test]
fn long_positions_keep_masks_and_state_right() {
    let m = model("nemotron_h-f32");
    let tokens = Expected::load(&fixture("nemotron_h-f32")).ids("tokens");
    let run = |base: u32| -> Vec<Vec<f32>> {
        let mut r = Runner::new(m.clone(), &opts_runner()).unwrap();
        let mut rows = Vec::new();
        // A 4-token chunk, then one token at a time; a second sequence interleaved in between.
        let mut ub = UBatch::default();
        for (i, &t) in tokens[..4].iter().enumerate() {
            ub.push(t, base + i as u32, 1, true);
        }
        rows.extend(r.run(&ub, false, false).unwrap().rows);
        for (i, &t) in tokens.iter().enumerate().skip(4) {
            let mut ub = UBatch::default();
            ub.push(t, base + i as u32, 1, true);
            ub.push(tokens[0], base + (i - 4) as u32, 2, false);
            rows.extend(r.run(&ub, false, false).unwrap().rows);
        }
        rows
    };
    let at0 = run(0);
    let far = run(3_000_000_000);
    assert!(rel(&far, &at0) <= 1e-5, "{}", rel(&far, &at0));
    assert!(rel_err(&at0, &Expected::load(&fixture("nemotron_h-f32")).rows("logits")) < 2e-3);
}

#[test]
fn prompt_chunks_attend_over_their_own_gathered_cells_as_alone() {
    // With one unified pool, a prompt chunk batched with other sequences attends over its own
    // sequence's cells gathered out of the cache once the pool holds more than a padding's worth
    // besides them (here a stranger's 600 cells): its logits must be those it gets alone, for a
    // fresh prompt, for one sharing a forked prefix's cells, and under a sliding window
    // (mistral-f32's is 6), and with attention sinks (gpt_oss-f32, window 4 on alternate layers).
    for name in ["qwen3-f32-sharded", "mistral-f32", "llama-f32", "gpt_oss-f32"] {
        let m = model(name);
        let vocab = m.hparams().n_vocab as u32;
        let ours = prompt(11, 40, vocab);
        let want = runner_alone(&m, &ours, 20);
        let mut theirs = ours[..10].to_vec();
        theirs.extend(prompt(12, 20, vocab));
        let want_fork = runner_alone(&m, &theirs, 30);

        let opts = RunnerOptions { n_cells: 1024, n_ubatch: 512, ..opts_runner() };
        let mut r = Runner::new(m.clone(), &opts).unwrap();
        let other = prompt(99, 700, vocab);
        for chunk in 0..2 {
            let mut ub = UBatch::default();
            for (i, &t) in other.iter().enumerate().skip(chunk * 300).take(300) {
                ub.push(t, i as u32, 2, false);
            }
            r.run(&ub, false, false).unwrap();
        }
        assert_eq!(r.gathered_segments(), 0, "{name}: a sequence alone attends over the pool it fills");
        // Our first 20 tokens as one chunk, after one of the stranger's decode rows.
        let mut ub = UBatch::default();
        ub.push(other[600], 600, 2, true);
        for (i, &t) in ours[..20].iter().enumerate() {
            ub.push(t, i as u32, 7, true);
        }
        let mut got: Vec<Vec<f32>> = r.run(&ub, false, false).unwrap().rows[1..].to_vec();
        assert_eq!(r.gathered_segments(), 1, "{name}: the chunk read its own cells");
        // A fork sharing our first 10 cells computes its own 20-token chunk next to our decode row.
        r.seq_cp(7, 4, 0, 10).unwrap();
        let mut ub = UBatch::default();
        ub.push(ours[20], 20, 7, true);
        for (i, &t) in theirs[10..].iter().enumerate() {
            ub.push(t, 10 + i as u32, 4, true);
        }
        ub.push(other[601], 601, 2, true);
        let rows = r.run(&ub, false, false).unwrap().rows;
        assert_eq!(r.gathered_segments(), 2, "{name}: the fork's chunk read its cells, shared ones included");
        got.push(rows[0].clone());
        let e = rel(&rows[1..21], &want_fork[10..30]);
        assert!(e <= 1e-4, "{name}: forked chunk gathered vs alone rel err {e}");
        for (i, &t) in ours.iter().enumerate().skip(21) {
            let mut ub = UBatch::default();
            ub.push(other[i + 581], i as u32 + 581, 2, true);
            ub.push(t, i as u32, 7, true);
            got.push(r.run(&ub, false, false).unwrap().rows[1].clone());
        }
        let e = rel(&got, &want);
        assert!(e <= 1e-4, "{name}: gathered chunk then decode vs alone rel err {e}");
    }
}

/// A long prompt prefilled in chunks (of an odd size, as a scheduler cuts them) gives the logits
/// and greedy continuation it gives in one step: the KV cells, masks and positions of earlier
/// chunks, and for the hybrid model the recurrent state handed from chunk to chunk, are what one
/// step computes (issue #13's long contexts, on tiny models).
#[test]
fn a_long_prompt_in_chunks_continues_as_in_one_step() {
    for name in ["nemotron_h-f32", "qwen3-f32-sharded", "gpt_oss-f32"] {
        let m = model(name);
        let vocab = m.hparams().n_vocab as u32;
        let n = 1536;
        let p = prompt(7, n, vocab);
        let run = |chunk: usize| -> (Vec<f32>, Vec<u32>) {
            let opts = RunnerOptions { n_cells: 2048, n_ubatch: 2048, ..opts_runner() };
            let mut r = Runner::new(m.clone(), &opts).unwrap();
            let mut last = Vec::new();
            for start in (0..n).step_by(chunk) {
                let mut ub = UBatch::default();
                let end = (start + chunk).min(n);
                for (i, &t) in p.iter().enumerate().take(end).skip(start) {
                    ub.push(t, i as u32, 0, i + 1 == n);
                }
                let rows = r.run(&ub, false, false).unwrap().rows;
                if end == n {
                    last = rows.into_iter().next_back().unwrap();
                }
            }
            let first = last.clone();
            let argmax =
                |v: &[f32]| v.iter().enumerate().fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0;
            let mut greedy = vec![argmax(&last) as u32];
            for i in 0..7 {
                let mut ub = UBatch::default();
                ub.push(greedy[i], (n + i) as u32, 0, true);
                last = r.run(&ub, false, false).unwrap().rows.into_iter().next_back().unwrap();
                greedy.push(argmax(&last) as u32);
            }
            (first, greedy)
        };
        let (one, greedy_one) = run(n);
        let (chunked, greedy_chunked) = run(97);
        let err = rel(&[chunked], &[one]);
        assert!(err <= 1e-4, "{name}: last-token logits after chunks vs one step: {err:.3e}");
        assert_eq!(greedy_chunked, greedy_one, "{name}: greedy continuation");
    }
}
