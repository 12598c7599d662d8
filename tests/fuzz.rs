//! The in-tree fuzz harness (CI, bounded): every target of `stllm::fuzzing` gets its seeds (the
//! fixtures' own files and the hostile ones committed in `fuzz/corpus/<target>/`) and then
//! mutants of them from a deterministic mutator (bit flips, interesting bytes and numbers,
//! insertions, deletions, duplications, truncations) for `STLLM_FUZZ_SECS` seconds each (default
//! 8; `STLLM_FUZZ_SEED` varies the run). A panic fails the test and leaves its input in
//! `target/fuzz-failures/`; an abort (a ggml assert) kills the test binary, which fails too.
//! `cargo fuzz` runs the same targets for longer (fuzz/README.md).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fixture;
use stllm::fuzzing::{self, Folder};
use stllm::{Model, ModelOptions};

/// xorshift64*: a deterministic stream for the mutator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Tokens a JSON or binary mutant may gain: extreme numbers, other types, separators.
const DICT: &[&[u8]] = &[
    b"0",
    b"-1",
    b"1e308",
    b"-1e308",
    b"1e-310",
    b"4294967296",
    b"18446744073709551615",
    b"9223372036854775808",
    b"65536",
    b"null",
    b"true",
    b"[]",
    b"{}",
    b"\"\"",
    b"\"NaN\"",
    b"\"F64\"",
    b"\"BF16\"",
    b"\"I8\"",
    b"[1,2,3]",
    b"\"../x\"",
    b",",
    b":",
    b"\"",
    b"\\u0000",
    b"\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"\0\0\0\0\0\0\0\0",
];

/// One to four mutations, most of them in the first `focus` bytes (a safetensors header).
fn mutate(rng: &mut Rng, data: &mut Vec<u8>, focus: usize) {
    for _ in 0..1 + rng.below(4) {
        let span = if rng.below(10) < 9 { focus.min(data.len()) } else { data.len() };
        let at = rng.below(span + 1).min(data.len());
        match rng.below(8) {
            0 if !data.is_empty() => {
                let i = at.min(data.len() - 1);
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = at.min(data.len() - 1);
                data[i] = [0u8, 0xff, b'9', b'-', b'"', b'{', b'}', b'.', b'e', 0x7f][rng.below(10)];
            }
            2 => {
                let tok = DICT[rng.below(DICT.len())];
                data.splice(at..at, tok.iter().copied());
            }
            3 => {
                // A number in the text becomes an extreme one.
                let start = (at..data.len()).find(|&i| data[i].is_ascii_digit());
                if let Some(s) = start {
                    let end =
                        (s..data.len()).find(|&i| !data[i].is_ascii_digit() && data[i] != b'.').unwrap_or(data.len());
                    let tok = DICT[rng.below(9)];
                    data.splice(s..end, tok.iter().copied());
                }
            }
            4 if !data.is_empty() => {
                let n = 1 + rng.below(16);
                let end = (at + n).min(data.len());
                data.drain(at.min(end)..end);
            }
            5 if !data.is_empty() => {
                let n = 1 + rng.below(32);
                let end = (at + n).min(data.len());
                let piece: Vec<u8> = data[at.min(end)..end].to_vec();
                let to = rng.below(data.len() + 1);
                data.splice(to..to, piece);
            }
            6 => data.truncate(at),
            _ => {
                let n = 1 + rng.below(8);
                for _ in 0..n {
                    data.insert(at.min(data.len()), rng.next() as u8);
                }
            }
        }
    }
}

fn secs() -> Duration {
    Duration::from_secs_f64(std::env::var("STLLM_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(8.0))
}

fn seed() -> u64 {
    std::env::var("STLLM_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed) | 1
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// Run `f` on every seed, then on mutants until the time is up. `f` returns whether the input
/// was accepted; a panic is a finding. Prints executions and outcomes.
fn fuzz(target: &str, seeds: Vec<Vec<u8>>, focus: usize, mut f: impl FnMut(&[u8]) -> bool) {
    assert!(!seeds.is_empty());
    let mut rng = Rng(seed() ^ (target.len() as u64).wrapping_mul(0x9e3779b97f4a7c15));
    let (t0, budget) = (Instant::now(), secs());
    let (mut execs, mut accepted) = (0u64, 0u64);
    let mut run = |input: &[u8], execs: &mut u64| {
        *execs += 1;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(input))) {
            Ok(ok) => ok,
            Err(_) => {
                let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
                std::fs::create_dir_all(&dir).unwrap();
                let file = dir.join(format!("{target}-{execs}.bin"));
                std::fs::write(&file, input).unwrap();
                panic!("fuzz {target}: a panic on the input saved in {}", file.display());
            }
        }
    };
    for s in &seeds {
        accepted += run(s, &mut execs) as u64;
    }
    while t0.elapsed() < budget {
        let mut m = seeds[rng.below(seeds.len())].clone();
        mutate(&mut rng, &mut m, focus);
        accepted += run(&m, &mut execs) as u64;
    }
    eprintln!(
        "fuzz {target}: {execs} executions in {:.1} s, {accepted} accepted, {} refused",
        t0.elapsed().as_secs_f64(),
        execs - accepted
    );
}

fn model(name: &str) -> Arc<Model> {
    Arc::new(Model::load(&fixture(name), &ModelOptions { threads: 1, ..Default::default() }).unwrap())
}

#[test]
fn fuzz_config_json() {
    let folder = Folder::copy_of(&fixture("llama-f32")).unwrap();
    let mut seeds = corpus("config");
    for f in ["llama-f32", "qwen3-f32-sharded", "mixtral-f32", "nemotron_h-f32", "qwen3_moe-f32"] {
        seeds.push(std::fs::read(fixture(f).join("config.json")).unwrap());
    }
    fuzz("config", seeds, usize::MAX, |d| fuzzing::model_file(&folder, "config.json", d).is_ok());
}

#[test]
fn fuzz_safetensors_header() {
    let folder = Folder::copy_of(&fixture("llama-f32")).unwrap();
    let real = std::fs::read(fixture("llama-f32").join("model.safetensors")).unwrap();
    let header = 8 + u64::from_le_bytes(real[..8].try_into().unwrap()) as usize;
    let mut seeds = corpus("safetensors");
    seeds.push(real);
    fuzz("safetensors", seeds, header + 8, |d| fuzzing::model_file(&folder, "model.safetensors", d).is_ok());
}

#[test]
fn fuzz_safetensors_index() {
    let folder = Folder::copy_of(&fixture("qwen3-f32-sharded")).unwrap();
    let mut seeds = corpus("index");
    seeds.push(std::fs::read(fixture("qwen3-f32-sharded").join("model.safetensors.index.json")).unwrap());
    fuzz("index", seeds, usize::MAX, |d| fuzzing::model_file(&folder, "model.safetensors.index.json", d).is_ok());
}

#[test]
fn fuzz_adapter_config_json() {
    let m = model("llama-f32");
    let folder = Folder::copy_of(&fixture("lora/llama-a")).unwrap();
    let mut seeds = corpus("adapter_config");
    seeds.push(std::fs::read(fixture("lora/llama-a").join("adapter_config.json")).unwrap());
    fuzz("adapter_config", seeds, usize::MAX, |d| fuzzing::adapter_config(&m, &folder, d).is_ok());
}

#[test]
fn fuzz_prompt_cache_files() {
    let m = model("llama-f32");
    let engine = Arc::new(stllm::Engine::new(m, stllm::EngineOptions { n_cells: 512, ..Default::default() }).unwrap());
    let folder = Folder::copy_of(&fixture("lora/llama-a")).unwrap();
    let real = folder.path().join("real.bin");
    engine.save_prompt(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], &real).unwrap();
    let mut seeds = corpus("prompt_cache");
    let real = std::fs::read(real).unwrap();
    let focus = real.len().min(256);
    seeds.push(real);
    fuzz("prompt_cache", seeds, focus, |d| fuzzing::prompt_cache(&engine, &folder, d).is_ok());
}

#[test]
fn fuzz_engine_operations() {
    let engine = fuzzing::ops_engine(model("llama-f32")).unwrap();
    let mut seeds = corpus("engine_ops");
    seeds.push((0..=255u8).collect());
    fuzz("engine_ops", seeds, usize::MAX, |d| match fuzzing::engine_ops(&engine, d) {
        Ok(refused) => refused == 0,
        Err(broken) => panic!("engine invariant broken: {broken}"),
    });
}
