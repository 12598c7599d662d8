//! Sequence operations the WIT `engine` exposes: fork, truncate, embeddings.

mod common;

use std::sync::Arc;

use common::{fixture, rel_err, Expected};
use stllm::session::Logits;
use stllm::{Model, ModelOptions, Session, SessionOptions};

fn setup(name: &str) -> (Arc<Model>, Expected) {
    (
        Arc::new(Model::load(&fixture(name), &ModelOptions { threads: 2, ..Default::default() }).unwrap()),
        Expected::load(&fixture(name)),
    )
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

#[test]
fn prompt_cache_round_trip_and_rejections() {
    use stllm::DType;
    use stllm::StateError;
    let tmp = tempfile::tempdir().unwrap();
    // Both V layouts: flash attention (V by rows) and the unfused path (V transposed).
    for (name, flash) in [("qwen2-bf16", true), ("llama-f32", false)] {
        let (m, exp) = setup(name);
        let tokens = exp.ids("tokens");
        let o = SessionOptions { flash_attn: Some(flash), ..opts() };
        let mut a = Session::new(m.clone(), &o).unwrap();
        a.decode(&tokens[..7], Logits::Last).unwrap();
        let file = tmp.path().join(format!("{name}.kv"));
        a.save_state(&file).unwrap();
        let want = a.decode(&tokens[7..], Logits::All).unwrap();

        let mut b = Session::new(m.clone(), &o).unwrap();
        assert_eq!(b.load_state(&file).unwrap(), tokens[..7]);
        assert_eq!(b.n_past(), 7);
        let got = b.decode(&tokens[7..], Logits::All).unwrap();
        assert_eq!(got, want, "{name}: a loaded prompt cache continues exactly like the original");

        // Another cache type: refused.
        let other = if flash { DType::F32 } else { DType::F16 };
        let mut c = Session::new(m.clone(), &SessionOptions { kv_type: Some(other), ..o.clone() }).unwrap();
        let e = c.load_state(&file).unwrap_err();
        assert!(matches!(e, StateError::Mismatch { field: "KV cache type", .. }), "{e}");
        // Too small a session.
        let mut d = Session::new(m.clone(), &SessionOptions { n_ctx: Some(4), ..o.clone() }).unwrap();
        assert!(matches!(d.load_state(&file).unwrap_err(), StateError::TooLong { n: 7, .. }));
        // Truncated and foreign files.
        let bytes = std::fs::read(&file).unwrap();
        let cut = tmp.path().join("cut.kv");
        std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
        assert!(b.load_state(&cut).unwrap_err().to_string().contains("truncated"));
        std::fs::write(&cut, b"definitely not a cache").unwrap();
        assert!(b.load_state(&cut).unwrap_err().to_string().contains("not a stllm prompt-cache file"));
        // A damaged payload (one byte of the cells flipped) is refused by the checksum.
        let mut damaged = bytes.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 0x40;
        std::fs::write(&cut, &damaged).unwrap();
        let e = b.load_state(&cut).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        // A header length beyond the file is refused before anything is allocated for it.
        let mut lying = bytes[..16].to_vec();
        lying[8..16].copy_from_slice(&(1u64 << 29).to_le_bytes());
        std::fs::write(&cut, &lying).unwrap();
        let e = b.load_state(&cut).unwrap_err().to_string();
        assert!(e.contains("does not fit the file"), "{e}");
        // Saving never writes over another file of the folder (the temporary name is its own).
        let bystander = tmp.path().join(format!("{name}.partial"));
        std::fs::write(&bystander, b"someone else's").unwrap();
        a.save_state(&file).unwrap();
        assert_eq!(std::fs::read(&bystander).unwrap(), b"someone else's");
        let leftovers = std::fs::read_dir(tmp.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.'))
            .count();
        assert_eq!(leftovers, 0, "no temporary file left behind");
    }
    // Another model: refused, naming the architecture.
    let (m, _) = setup("qwen3-f32-sharded");
    let mut s = Session::new(m, &opts()).unwrap();
    let e = s.load_state(&tmp.path().join("llama-f32.kv")).unwrap_err();
    assert!(e.to_string().contains("made for architecture llama"), "{e}");
}

#[test]
fn a_hybrid_prompt_cache_carries_the_recurrent_state() {
    // Nemotron-H (Mamba-2 + attention + MoE): the file holds the attention layers' cells and the
    // Mamba layers' conv and SSM state; a loaded session continues exactly like the original,
    // and a file without state (or with another state size) is refused for this model.
    use stllm::StateError;
    let tmp = tempfile::tempdir().unwrap();
    let (m, exp) = setup("nemotron_h-f32");
    let tokens = exp.ids("tokens");
    let mut a = Session::new(m.clone(), &opts()).unwrap();
    a.decode(&tokens[..6], Logits::Last).unwrap();
    let file = tmp.path().join("hybrid.kv");
    a.save_state(&file).unwrap();
    let want = a.decode(&tokens[6..], Logits::All).unwrap();

    let mut b = Session::new(m.clone(), &opts()).unwrap();
    // A session that computed something else first: loading replaces its cells and its state.
    b.decode(&tokens[3..9], Logits::Last).unwrap();
    assert_eq!(b.load_state(&file).unwrap(), tokens[..6]);
    let got = b.decode(&tokens[6..], Logits::All).unwrap();
    assert_eq!(got, want, "a loaded hybrid prompt cache continues exactly like the original");

    // The same file with its state cut off (the header edited to match): refused by size.
    let bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&bytes[16..16 + n]).unwrap();
    let state = h["recurrent_bytes"].as_u64().unwrap();
    assert!(state > 0, "the header names the state's size");
    h["recurrent_bytes"] = 0.into();
    let json = serde_json::to_vec(&h).unwrap();
    let mut edited = bytes[..8].to_vec();
    edited.extend((json.len() as u64).to_le_bytes());
    edited.extend(&json);
    edited.extend(&bytes[16 + n..bytes.len() - state as usize]);
    let cut = tmp.path().join("stateless.kv");
    std::fs::write(&cut, &edited).unwrap();
    let mut c = Session::new(m, &opts()).unwrap();
    let e = c.load_state(&cut).unwrap_err();
    assert!(matches!(e, StateError::Mismatch { field: "bytes of recurrent state per sequence", .. }), "{e}");
    assert_eq!(c.n_past(), 0, "a refused file leaves the session empty");
}
