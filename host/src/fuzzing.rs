//! Fuzz targets: hostile bytes into the parsers and the engine's caller-driven API, through the
//! same entry points users reach (a model folder loaded, an adapter folder, a prompt-cache file,
//! a guest's sequence operations). Each target takes arbitrary bytes and must end with `Ok` or a
//! named error — never a panic, an abort (ggml asserts included) or a hang.
//!
//! Shared by the bounded in-tree harness (`tests/fuzz.rs`, run in CI with a deterministic
//! mutator over the seeds in `fuzz/corpus/`) and the cargo-fuzz targets (`fuzz/`, libFuzzer,
//! run by hand with a nightly toolchain for longer). Not part of the supported API.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::engine::{Engine, EngineOptions, GenerateRequest, RunPlan, Sequence};
use crate::sampling::SamplingParams;
use crate::{Model, ModelOptions};

/// What one input did: loaded / accepted, or refused with this message.
pub type Outcome = Result<(), String>;

/// A private copy of a folder in the temp directory, one file of which each input replaces
/// (removed on drop).
pub struct Folder {
    dir: PathBuf,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl Folder {
    /// Copy the regular files of `src` (not its subfolders).
    pub fn copy_of(src: &Path) -> std::io::Result<Folder> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("stllm-fuzz-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        for e in std::fs::read_dir(src)? {
            let e = e?;
            if e.file_type()?.is_file() {
                std::fs::copy(e.path(), dir.join(e.file_name()))?;
            }
        }
        Ok(Folder { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Replace `file` with `data`.
    pub fn put(&self, file: &str, data: &[u8]) -> std::io::Result<()> {
        std::fs::write(self.dir.join(file), data)
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn opts() -> ModelOptions {
    ModelOptions { threads: 1, ..Default::default() }
}

/// `data` as `file` of a model folder (a copy of a fixture: `model.safetensors`, a shard's
/// index `model.safetensors.index.json`, `config.json`), then the folder loaded as a model.
pub fn model_file(folder: &Folder, file: &str, data: &[u8]) -> Outcome {
    folder.put(file, data).map_err(|e| e.to_string())?;
    Model::load(folder.path(), &opts()).map(drop).map_err(|e| e.to_string())
}

/// `data` as `adapter_config.json` of an adapter folder (a copy of a PEFT fixture), loaded for
/// `model`.
pub fn adapter_config(model: &Model, folder: &Folder, data: &[u8]) -> Outcome {
    folder.put("adapter_config.json", data).map_err(|e| e.to_string())?;
    model.load_adapter("fuzz", folder.path()).map(drop).map_err(|e| e.to_string())
}

/// `data` as a prompt-cache file, loaded into `engine`'s prefix cache.
pub fn prompt_cache(engine: &Engine, folder: &Folder, data: &[u8]) -> Outcome {
    folder.put("prompt.bin", data).map_err(|e| e.to_string())?;
    engine.load_prompt(&folder.path().join("prompt.bin")).map(drop).map_err(|e| e.to_string())
}

/// An engine for [`engine_ops`]: a small cache, so inputs also reach its limits.
pub fn ops_engine(model: Arc<Model>) -> Result<Arc<Engine>, String> {
    let opts = EngineOptions { n_cells: 192, max_seqs: 4, n_batch: 64, prefix_cache_entries: 4, ..Default::default() };
    Engine::new(model, opts).map(Arc::new).map_err(|e| e.to_string())
}

/// Reads the input as a stream of small numbers.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u32(&mut self) -> Option<u32> {
        // Mostly small values, sometimes the extremes.
        Some(match self.u8()? {
            250 => u32::MAX,
            251 => u32::MAX / 2 + 1,
            252 => 1 << 20,
            253 => 0,
            b => b as u32,
        })
    }
    fn f32(&mut self) -> Option<f32> {
        Some(match self.u8()? {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => -1.0,
            3 => 1e30,
            b => b as f32 / 128.0,
        })
    }
    fn tokens(&mut self, n_vocab: u32) -> Option<Vec<u32>> {
        let n = (self.u8()? % 24) as usize;
        (0..n).map(|_| self.u32().map(|t| if t < 250 { t % n_vocab.max(1) } else { t })).collect()
    }
}

/// Interpret `data` as operations on `engine`'s caller-driven sequences (what a guest's
/// `sequence` resources do): open with any length, decode, decode-top with any k, fork, truncate
/// anywhere, runs with any plan, run-stop, close, and native requests with any parameters. Every
/// call must return; afterwards the engine must still serve a plain request and hold no
/// sequence once all are closed. Refusals are normal (how many: `Ok`); `Err` is a broken
/// invariant.
pub fn engine_ops(engine: &Arc<Engine>, data: &[u8]) -> Result<usize, String> {
    let n_vocab = engine.model().hparams().n_vocab as u32;
    let mut b = Bytes(data);
    let mut seqs: Vec<Sequence> = Vec::new();
    let mut runs = Vec::new();
    let mut refused = 0usize;
    let mut note = |r: Result<(), String>| {
        if r.is_err() {
            refused += 1;
        }
    };
    for _ in 0..64 {
        let Some(op) = b.u8() else { break };
        let pick = |b: &mut Bytes, n: usize| b.u8().map(|x| x as usize % n.max(1));
        match op % 10 {
            0 => {
                let Some(len) = b.u32() else { break };
                note(engine.open_sequence(len as usize).map(|s| seqs.push(s)).map_err(|e| e.to_string()));
            }
            1 | 2 if !seqs.is_empty() => {
                let (Some(i), Some(toks)) = (pick(&mut b, seqs.len()), b.tokens(n_vocab)) else { break };
                let r = if op % 10 == 1 {
                    seqs[i].decode(&toks, crate::session::Logits::Last).map(drop)
                } else {
                    let Some(k) = b.u32() else { break };
                    seqs[i].decode_top(&toks, k, k % 2 == 0).map(drop)
                };
                note(r.map_err(|e| e.to_string()));
            }
            3 if !seqs.is_empty() => {
                let Some(i) = pick(&mut b, seqs.len()) else { break };
                note(seqs[i].fork().map(|s| seqs.push(s)).map_err(|e| e.to_string()));
            }
            4 if !seqs.is_empty() => {
                let (Some(i), Some(len)) = (pick(&mut b, seqs.len()), b.u32()) else { break };
                note(seqs[i].truncate(len as usize).map_err(|e| e.to_string()));
            }
            5 if !seqs.is_empty() => {
                let (Some(i), Some(toks)) = (pick(&mut b, seqs.len()), b.tokens(n_vocab)) else { break };
                let (Some(k), Some(t), Some(p), Some(m), Some(max), Some(bias)) =
                    (b.u32(), b.f32(), b.f32(), b.f32(), b.u32(), b.u32())
                else {
                    break;
                };
                let plan = RunPlan {
                    row: stllm_policy::generate::RowPlan {
                        k,
                        full: k % 3 == 0,
                        min_p: m,
                        logprobs: (k % 2 == 1).then_some(k % 24),
                    },
                    sampling: SamplingParams {
                        temperature: t,
                        top_p: p,
                        top_k: k,
                        seed: k as u64,
                        ..Default::default()
                    },
                    logit_bias: vec![(bias, t)],
                    stop_tokens: vec![bias % n_vocab.max(1)],
                    max_tokens: max % 40,
                };
                note(seqs[i].run(&toks, plan).map(|r| runs.push((i, r))).map_err(|e| e.to_string()));
            }
            6 if !runs.is_empty() => {
                let Some(j) = pick(&mut b, runs.len()) else { break };
                note(runs[j].1.next_blocking().map(drop).map_err(|e| e.to_string()));
            }
            7 if !seqs.is_empty() => {
                let Some(i) = pick(&mut b, seqs.len()) else { break };
                note(seqs[i].run_stop().map(drop).map_err(|e| e.to_string()));
            }
            8 if !seqs.is_empty() => {
                let Some(i) = pick(&mut b, seqs.len()) else { break };
                runs.retain(|(s, _)| *s != i);
                for r in runs.iter_mut() {
                    if r.0 > i {
                        r.0 -= 1;
                    }
                }
                seqs.remove(i);
            }
            9 => {
                let (Some(toks), Some(max), Some(t), Some(k)) = (b.tokens(n_vocab), b.u32(), b.f32(), b.u32()) else {
                    break;
                };
                let req = GenerateRequest {
                    sampling: SamplingParams { temperature: t, top_k: k, ..Default::default() },
                    ..GenerateRequest::greedy(toks, (max % 16) as usize)
                };
                note(engine.generate(req).map(|g| drop(g.wait())).map_err(|e| e.to_string()));
            }
            _ => {}
        }
    }
    // Runs still going end with their sequences.
    drop(runs);
    drop(seqs);
    if !engine.wait_idle(std::time::Duration::from_secs(30)) {
        return Err("the engine did not come back to idle".into());
    }
    let st = engine.stats();
    if st.sequences != 0 {
        return Err(format!("{} sequences still open after all were closed", st.sequences));
    }
    let (toks, done) = engine
        .generate(GenerateRequest { stop_tokens: Some(vec![]), ..GenerateRequest::greedy(vec![1, 2, 3], 2) })
        .map_err(|e| format!("the engine refuses a plain request afterwards: {e}"))?
        .wait();
    if toks.len() != 2 {
        return Err(format!("a plain request afterwards ended with {:?} after {} tokens", done.reason, toks.len()));
    }
    Ok(refused)
}
