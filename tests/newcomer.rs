//! What a newcomer hits first, end to end through the `stllm` binary: the built-in demo model
//! (readable English), Hugging Face cache names (a cache laid out as `huggingface_hub` does,
//! symlinks included), an empty `--ids`, and `run` reaching the context limit.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fixture;

fn run(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stllm"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(args: &[&str], env: &[(&str, &Path)]) -> (String, String) {
    let out = run(args, env);
    let (so, se) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "stllm {args:?} failed: {se}");
    (so, se)
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("stllm-newcomer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A Hugging Face cache holding `fixture` as `org/name`: blobs named by a hash, the snapshot's
/// files symlinks into them, `refs/main` naming the snapshot.
fn hf_cache(fixture_dir: &Path, repo: &str, hash: &str) -> PathBuf {
    let cache = temp("hub");
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snap = root.join("snapshots").join(hash);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::create_dir_all(root.join("refs")).unwrap();
    for (i, e) in std::fs::read_dir(fixture_dir).unwrap().enumerate() {
        let e = e.unwrap();
        let blob = root.join("blobs").join(format!("{i:040x}"));
        std::fs::copy(e.path(), &blob).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{i:040x}"), snap.join(e.file_name())).unwrap();
    }
    std::fs::write(root.join("refs/main"), hash).unwrap();
    cache
}

#[test]
fn repo_ids_resolve_in_the_hugging_face_cache() {
    let hash = "1234567890abcdef1234567890abcdef12345678";
    let cache = hf_cache(&fixture("llama-f32"), "tiny-org/tiny-llama", hash);
    let env = [("HF_HUB_CACHE", cache.as_path())];
    let (so, _) = ok(&["info", "--model", "tiny-org/tiny-llama", "--threads", "1"], &env);
    let v: serde_json::Value = serde_json::from_str(&so).unwrap();
    assert_eq!(v["architecture"], "llama");
    // A commit hash as the revision, and the tokenizer commands.
    ok(&["info", "--model", "tiny-org/tiny-llama", "--revision", hash, "--threads", "1"], &env);
    let (so, _) = ok(&["tokenize", "--tokenizer", "tiny-org/tiny-llama", "--text", "Hello world"], &env);
    assert!(so.contains("\"ids\""), "{so}");
    // HF_HOME/hub is the next place looked.
    let home = temp("hfhome");
    std::fs::rename(&cache, home.join("hub")).unwrap();
    let out = run(&["info", "--model", "tiny-org/tiny-llama", "--threads", "1"], &[("HF_HOME", home.as_path())]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Absent: the error says where it looked and how to download it, and nothing is fetched.
    let out = run(&["info", "--model", "other-org/absent-model"], &[("HF_HUB_CACHE", home.join("hub").as_path())]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("hf download other-org/absent-model"), "{err}");
    assert!(err.contains("models--other-org--absent-model"), "{err}");
    // An absent revision names the ones there are.
    let out = run(&["info", "--model", "tiny-org/tiny-llama", "--revision", "v9"], &[("HF_HOME", home.as_path())]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("v9") && err.contains("main"), "{err}");
    let _ = std::fs::remove_dir_all(&home);
}

#[test]
fn detokenize_of_no_ids_is_empty_text() {
    let d = fixture("llama-f32");
    let (so, _) = ok(&["detokenize", "--tokenizer", d.to_str().unwrap(), "--ids", ""], &[]);
    let v: serde_json::Value = serde_json::from_str(&so).unwrap();
    assert_eq!(v["text"], "");
    let out = run(&["detokenize", "--tokenizer", d.to_str().unwrap(), "--ids", "1,x"], &[]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("\"x\""));
}

#[test]
fn run_that_reaches_the_context_ends_with_length() {
    let d = fixture("llama-f32");
    let (so, _) = ok(
        &[
            "run",
            "--model",
            d.to_str().unwrap(),
            "--prompt",
            "Hello world",
            "--ctx-size",
            "24",
            "--max-tokens",
            "500",
            "--ignore-eos",
            "--json",
            "--threads",
            "1",
        ],
        &[],
    );
    let v: serde_json::Value = serde_json::from_str(so.trim()).unwrap();
    assert_eq!(v["finish"], "length", "{v}");
    // Every position of the context is used; the last token sampled needs no position.
    let total = v["prompt_tokens"].as_u64().unwrap() + v["tokens"].as_array().unwrap().len() as u64;
    assert_eq!(total, 25, "{v}");
}

/// Words of the system dictionary (Debian's `wamerican`, installed by scripts/test.sh).
fn dictionary() -> std::collections::HashSet<String> {
    let words = std::fs::read_to_string("/usr/share/dict/words")
        .expect("/usr/share/dict/words is missing: install the `wamerican` package (scripts/test.sh does)");
    words.lines().map(|w| w.trim().to_lowercase()).collect()
}

#[test]
fn the_demo_model_writes_dictionary_words() {
    let dict = dictionary();
    let (so, se) = ok(
        &[
            "run",
            "--prompt",
            "Tell me something about love.",
            "--max-tokens",
            "32",
            "--temperature",
            "0",
            "--threads",
            "2",
        ],
        &[("XDG_CACHE_HOME", temp("demo-cache").as_path())],
    );
    assert!(se.contains("built-in demo model"), "stderr does not say the demo model is used: {se}");
    let words: Vec<String> = so
        .split(|c: char| !c.is_alphabetic() && c != '\'')
        .map(|w| w.trim_matches('\'').to_lowercase())
        .filter(|w| !w.is_empty())
        .collect();
    assert!(words.len() >= 5, "too few words: {so:?}");
    let unknown: Vec<&String> = words.iter().filter(|w| !dict.contains(w.as_str())).collect();
    // Every word, save at most one in ten (names and rare words of the corpus), is English.
    assert!(unknown.len() * 10 <= words.len(), "not dictionary words: {unknown:?} in {so:?}");
}
