//! Sequence operations the WIT `engine` exposes: fork, truncate, embeddings.

mod common;

use std::sync::Arc;

use common::{fixture, rel_err, Expected};
use stllm::session::Logits;
use stllm::{Model, ModelOptions, Session, SessionOptions};

fn setup(name: &str) -> (Arc<Model>, Expected) {
    (Arc::new(Model::load(&fixture(name), &ModelOptions { threads: 2 }).unwrap()), Expected::load(&fixture(name)))
}

fn opts() -> SessionOptions {
    SessionOptions { n_ctx: Some(64), ..Default::default() }
}

#[test]
fn fork_continues_like_the_original() {
    let (m, exp) = setup("qwen3-f32-sharded");
    let tokens = exp.ids("tokens");
    let want = exp.rows("logits");
    let mut a = Session::new(m.clone(), &opts()).unwrap();
    a.decode(&tokens[..5], Logits::Last).unwrap();
    let mut b = a.fork().unwrap();
    assert_eq!(b.n_past(), 5);
    let ra = a.decode(&tokens[5..], Logits::All).unwrap();
    let rb = b.decode(&tokens[5..], Logits::All).unwrap();
    assert!(rel_err(&ra, &want[5..]) < 2e-3);
    assert_eq!(ra, rb, "a fork computes exactly what its parent does");
}

#[test]
fn truncate_rewinds() {
    let (m, exp) = setup("llama-f32");
    let tokens = exp.ids("tokens");
    let mut s = Session::new(m, &opts()).unwrap();
    s.decode(&tokens, Logits::Last).unwrap();
    s.decode(&[7, 8, 9], Logits::Last).unwrap(); // a detour
    s.truncate(6).unwrap();
    let rows = s.decode(&tokens[6..], Logits::All).unwrap();
    assert!(rel_err(&rows, &exp.rows("logits")[6..]) < 2e-3);
    let e = s.truncate(1000).unwrap_err();
    assert!(e.to_string().contains("cannot truncate"), "{e}");
}

#[test]
fn embeddings_are_the_mean_of_the_final_normalised_states() {
    let (m, exp) = setup("llama-f32");
    let tokens = exp.ids("tokens");
    let emb = stllm::session::embed(&m, &opts(), &tokens).unwrap();
    assert_eq!(emb.len(), 64);
    // Reference: rmsnorm(last hidden state) * model.norm.weight, averaged over positions.
    let f = stllm::loader::safetensors::SafetensorsFile::open(&fixture("llama-f32").join("model.safetensors")).unwrap();
    let e = &f.tensors["model.norm.weight"];
    let mut buf = Vec::new();
    f.read("model.norm.weight", e, &mut buf).unwrap();
    let w: Vec<f64> = buf.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect();
    let eps = m.config["rms_norm_eps"].as_f64().unwrap();
    let last = exp.rows(&format!("hidden.{}", exp.n_hidden() - 1));
    let mut want = vec![0f64; 64];
    for row in &last {
        let rms = (row.iter().map(|x| x * x).sum::<f64>() / row.len() as f64 + eps).sqrt();
        for (i, x) in row.iter().enumerate() {
            want[i] += x / rms * w[i] / last.len() as f64;
        }
    }
    let err = rel_err(&[emb], &[want]);
    assert!(err < 1e-4, "embedding max|d|/std = {err}");
}
