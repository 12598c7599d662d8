//! End-to-end tests of the `stllm` binary on the fixtures: JSON outputs and their agreement with
//! the HF references.

mod common;

use std::process::Command;

use common::{fixture, rel_err, Expected};

fn stllm(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_stllm")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stllm {args:?} failed: {stderr}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn csv(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn logits_command_prints_every_position() {
    for name in ["qwen2-f32", "qwen3-bf16"] {
        let dir = fixture(name);
        let exp = Expected::load(&dir);
        let tokens = exp.ids("tokens");
        let v = stllm(&["logits", "--model", dir.to_str().unwrap(), "--tokens", &csv(&tokens), "--threads", "2"]);
        let rows: Vec<Vec<f32>> = serde_json::from_value(v["logits"].clone()).unwrap();
        assert_eq!(rows.len(), tokens.len());
        let tol = if name.ends_with("f32") { 2e-3 } else { 3e-2 };
        let err = rel_err(&rows, &exp.rows("logits"));
        assert!(err <= tol, "{name}: {err}");
    }
}

#[test]
fn generate_command_greedy_and_seeded() {
    let dir = fixture("llama-f32");
    let exp = Expected::load(&dir);
    let d = dir.to_str().unwrap();
    let prompt = csv(&exp.ids("tokens"));
    let v =
        stllm(&["generate", "--model", d, "--tokens", &prompt, "--max-tokens", "8", "--temperature", "0", "--json"]);
    let got: Vec<u32> = serde_json::from_value(v["tokens"].clone()).unwrap();
    assert_eq!(got, exp.ids("greedy"));

    let sample = |seed: &str| -> Vec<u32> {
        let v = stllm(&[
            "generate",
            "--model",
            d,
            "--tokens",
            &prompt,
            "--max-tokens",
            "12",
            "--temperature",
            "1.5",
            "--seed",
            seed,
            "--ignore-eos",
            "--json",
        ]);
        serde_json::from_value(v["tokens"].clone()).unwrap()
    };
    let a = sample("7");
    assert_eq!(a.len(), 12);
    assert_eq!(a, sample("7"), "same seed, same tokens");
    let others: Vec<Vec<u32>> = ["8", "9", "10"].iter().map(|s| sample(s)).collect();
    assert!(others.iter().any(|o| *o != a), "different seeds should differ at temperature 1.5");
}

#[test]
fn info_command() {
    let v = stllm(&["info", "--model", fixture("qwen3-f32-sharded").to_str().unwrap()]);
    assert_eq!(v["architecture"], "qwen3");
    assert_eq!(v["dtype"], "f32");
    assert_eq!(v["head_dim"], 32);
    assert_eq!(v["layers"], 2);
    assert_eq!(v["tied_embeddings"], true);
    // embeddings + 2 x (4 norms-of-64/32 + q,k,v,o + mlp) + final norm
    let (h, v_, ff, hd, nq, nkv) = (64u64, 384u64, 96u64, 32u64, 4u64, 2u64);
    let layer = 2 * h + 2 * hd + h * nq * hd * 2 + 2 * h * nkv * hd + 3 * h * ff;
    assert_eq!(v["parameters"], v_ * h + 2 * layer + h);
}

#[test]
fn bench_command_reports_speeds() {
    let v =
        stllm(&["bench", "--model", fixture("qwen2-bf16").to_str().unwrap(), "--prompt", "24", "--gen", "4", "--json"]);
    assert!(v["prefill_tok_s"].as_f64().unwrap() > 0.0);
    assert!(v["decode_tok_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["prompt"], 24);
}
