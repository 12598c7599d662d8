//! LoRA adapters (PEFT format, applied unmerged): parity with the PEFT-merged model, weighted
//! lists, different adapters in one batch, hot reload with in-flight requests finishing on their
//! version, adapters over a quantized base (QLoRA), the prefix cache keeping adapters apart, and
//! clear errors for adapters that cannot load. Fixtures: tests/fixtures/make_lora_fixtures.py.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{fixture, rel_err, Expected};
use stllm::engine::{Engine, EngineOptions, GenerateRequest};
use stllm::lora::{AdapterList, LoraError};
use stllm::runner::{Runner, RunnerOptions, UBatch};
use stllm::session::Logits;
use stllm::DType;
use stllm::{Model, ModelOptions, Session, SessionOptions};

fn adapter(name: &str) -> PathBuf {
    fixture("lora").join(name)
}

fn model(name: &str, quantize: Option<DType>) -> Arc<Model> {
    Arc::new(Model::load(&fixture(name), &ModelOptions { threads: 2, quantize, ..Default::default() }).unwrap())
}

fn session(m: &Arc<Model>, adapters: AdapterList) -> Session {
    let mut s = Session::new(m.clone(), &SessionOptions { n_ctx: Some(128), ..Default::default() }).unwrap();
    s.set_adapters(adapters).unwrap();
    s
}

/// Logits of every prompt position and 8 greedy tokens.
fn run(m: &Arc<Model>, adapters: AdapterList, tokens: &[u32]) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut s = session(m, adapters.clone());
    let rows = s.decode(tokens, Logits::All).unwrap();
    let mut s = session(m, adapters);
    let mut sampler = stllm::sampling::Sampler::new(Default::default());
    let greedy = s.generate(tokens, 8, &mut sampler, &[], |_| {}).unwrap();
    (rows, greedy)
}

/// F32 models: the same tolerance as the base parity tests.
const TOL: f64 = 2e-3;

#[test]
fn adapters_match_the_peft_merged_model() {
    for (base, name) in [
        ("llama-f32", "llama-a"),
        ("llama-f32", "llama-b"),
        ("llama-f32", "llama-save"),
        ("nemotron_h-f32", "nemotron"),
        ("gpt_oss-f32", "gpt_oss"),
    ] {
        let m = model(base, None);
        let a = m.load_adapter(name, &adapter(name)).unwrap();
        let exp = Expected::load(&adapter(name));
        let (rows, greedy) = run(&m, vec![(a.clone(), 1.0)], &exp.ids("tokens"));
        let e = rel_err(&rows, &exp.rows("logits"));
        eprintln!("{name} over {base}: {} modules, rank {}, rel err {e:.2e}", a.modules(), a.rank());
        assert!(e < TOL, "{name}: {e}");
        assert_eq!(greedy, exp.ids("greedy"), "{name}: greedy tokens");
        // Its matrices are counted in the memory breakdown: r x (in + out) F32 per module (r >= 1).
        assert!(a.bytes() >= a.modules() * 4 * 2 * 48);
        assert_eq!(session(&m, vec![]).memory().lora, a.bytes());
        // Without the adapter the model is the base again (the adapter moves logits by ~5 std).
        let (base_rows, _) = run(&m, vec![], &exp.ids("tokens"));
        let base_exp = Expected::load(&fixture(base));
        assert!(rel_err(&base_rows, &base_exp.rows("logits")) < TOL, "{base} without adapters");
        assert!(rel_err(&base_rows, &exp.rows("logits")) > 1.0, "{name} must change the logits");
    }
}

#[test]
fn a_weighted_list_equals_the_weighted_merge() {
    let m = model("llama-f32", None);
    let a = m.load_adapter("a", &adapter("llama-a")).unwrap();
    let b = m.load_adapter("b", &adapter("llama-b")).unwrap();
    let exp = Expected::load(&adapter("mix"));
    let (rows, greedy) = run(&m, vec![(a, 0.5), (b, 1.0)], &exp.ids("tokens"));
    let e = rel_err(&rows, &exp.rows("logits"));
    assert!(e < TOL, "0.5 a + 1.0 b: {e}");
    assert_eq!(greedy, exp.ids("greedy"));
}

/// Layers split over two backends (two CPU backends stand in for two devices): each adapter's
/// matrices sit with the layer they adapt, and a weighted pair (stacked, rank padded as on GPUs)
/// still equals the weighted merge.
#[test]
fn adapters_follow_a_layer_split() {
    let opts = ModelOptions { threads: 2, devices: vec!["cpu".into(), "cpu".into()], ..Default::default() };
    let m = Arc::new(Model::load(&fixture("llama-f32"), &opts).unwrap());
    let a = m.load_adapter("a", &adapter("llama-a")).unwrap();
    let b = m.load_adapter("b", &adapter("llama-b")).unwrap();
    let exp = Expected::load(&adapter("mix"));
    let (rows, greedy) = run(&m, vec![(a, 0.5), (b, 1.0)], &exp.ids("tokens"));
    let e = rel_err(&rows, &exp.rows("logits"));
    assert!(e < TOL, "split: {e}");
    assert_eq!(greedy, exp.ids("greedy"));
}

/// Sequences with different adapters (none, a, b, a weighted list) in one ubatch equal each
/// computed alone; for a dense model and for the hybrid (whose steps split by sequence).
#[test]
fn different_adapters_batch_together() {
    // llama-save replaces the head (modules_to_save), which runs on the output rows only.
    for (base, names) in [("llama-f32", ["llama-a", "llama-save"]), ("nemotron_h-f32", ["nemotron", "nemotron"])] {
        let m = model(base, None);
        let a = m.load_adapter("a", &adapter(names[0])).unwrap();
        let b = m.load_adapter("b", &adapter(names[1])).unwrap();
        let lists: Vec<AdapterList> =
            vec![vec![], vec![(a.clone(), 1.0)], vec![(b.clone(), 1.0)], vec![(a, 0.5), (b, 0.7)]];
        let prompt: Vec<u32> = Expected::load(&fixture(base)).ids("tokens");
        let opts = RunnerOptions { n_cells: 256, n_ubatch: 64, kv_type: None, flash_attn: None, n_seq_max: 8 };
        // Alone: prefill then one decode step.
        let alone: Vec<Vec<Vec<f32>>> = lists
            .iter()
            .map(|list| {
                let mut r = Runner::new(m.clone(), &opts).unwrap();
                r.set_adapters(0, list.clone()).unwrap();
                let mut ub = UBatch::default();
                for (i, &t) in prompt.iter().enumerate() {
                    ub.push(t, i as u32, 0, i + 1 == prompt.len());
                }
                let mut rows = r.run(&ub, false, false).unwrap().rows;
                let mut ub = UBatch::default();
                ub.push(7, prompt.len() as u32, 0, true);
                rows.extend(r.run(&ub, false, false).unwrap().rows);
                rows
            })
            .collect();
        // Together: all prefills in one ubatch, then all decodes in one.
        let mut r = Runner::new(m.clone(), &opts).unwrap();
        let mut ub = UBatch::default();
        for (s, list) in lists.iter().enumerate() {
            r.set_adapters(s as u32, list.clone()).unwrap();
            for (i, &t) in prompt.iter().enumerate() {
                ub.push(t, i as u32, s as u32, i + 1 == prompt.len());
            }
        }
        let first = r.run(&ub, false, false).unwrap().rows;
        let mut ub = UBatch::default();
        for s in 0..lists.len() {
            ub.push(7, prompt.len() as u32, s as u32, true);
        }
        let second = r.run(&ub, false, false).unwrap().rows;
        for s in 0..lists.len() {
            let want: Vec<Vec<f64>> = alone[s].iter().map(|r| r.iter().map(|&x| x as f64).collect()).collect();
            let e = rel_err(&[first[s].clone(), second[s].clone()], &want);
            assert!(e < 1e-4, "{base} sequence {s}: {e}");
        }
        // And the adapters did change the rows.
        assert_ne!(alone[0], alone[1]);
    }
}

/// QLoRA: an adapter over a Q8_0 base tracks the PEFT-merged full-precision model about as well
/// as the Q8_0 base tracks the base (quantization tolerance of the parity tests), far from the
/// base without the adapter.
#[test]
fn adapters_over_a_quantized_base() {
    let m = model("llama-f32", Some(DType::Q8_0));
    let a = m.load_adapter("a", &adapter("llama-a")).unwrap();
    let exp = Expected::load(&adapter("llama-a"));
    let (rows, _) = run(&m, vec![(a, 1.0)], &exp.ids("tokens"));
    let e = rel_err(&rows, &exp.rows("logits"));
    let (plain, _) = run(&m, vec![], &exp.ids("tokens"));
    let e_plain = rel_err(&plain, &exp.rows("logits"));
    eprintln!("q8_0 base + adapter: {e:.3e} (q8_0 base alone vs the merged model: {e_plain:.3})");
    // Measured 9.7e-2 (the Q8_0 base alone tracks the base at 5.5e-2 to 7.6e-2).
    assert!(e < 0.15 && e_plain > 1.0, "{e} {e_plain}");
}

/// Copy an adapter folder's two files into `dir`, each written beside its place and renamed
/// over it (how a new version should be deployed: a reader never sees half a file).
fn put(src: &Path, dir: &Path) {
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        let tmp = dir.join(format!(".{f}.new"));
        std::fs::copy(src.join(f), &tmp).unwrap();
        std::fs::rename(&tmp, dir.join(f)).unwrap();
    }
}

/// Replacing an adapter's files on disk installs a new version for new requests, while a
/// request already submitted finishes on the version it started with; explicit reload and
/// unload work with requests in flight; the engine goes on after a request names an unknown
/// adapter.
#[test]
fn hot_reload_keeps_in_flight_requests_on_their_version() {
    let m = model("llama-f32", None);
    let tmp = tempfile::tempdir().unwrap();
    put(&adapter("llama-a"), tmp.path());
    let v1 = m.load_adapter("x", tmp.path()).unwrap();
    let engine = Engine::new(m.clone(), EngineOptions { n_cells: 1024, max_seqs: 4, ..Default::default() }).unwrap();
    let prompt = Expected::load(&adapter("llama-a")).ids("tokens");
    let req = |n| GenerateRequest {
        stop_tokens: Some(vec![]),
        adapters: vec![("x".into(), 1.0)],
        ..GenerateRequest::greedy(prompt.clone(), n)
    };
    // What each version generates alone.
    let alone = |a: &Arc<stllm::lora::LoraAdapter>, n| {
        let mut s = session(&m, vec![(a.clone(), 1.0)]);
        s.generate(&prompt, n, &mut stllm::sampling::Sampler::new(Default::default()), &[], |_| {}).unwrap()
    };
    let mut first = engine.generate(req(48)).unwrap();
    let t0 = first.next().expect("a first token");
    // New files on disk (another version): the next lookup reads them.
    put(&adapter("llama-a2"), tmp.path());
    let v2 = m.adapter("x").unwrap();
    assert_ne!(v1.id(), v2.id(), "the changed files are read again");
    let second = engine.generate(req(8)).unwrap();
    let (rest, _) = first.wait();
    let mut got1 = vec![];
    if let stllm::engine::Event::Token(t) = t0 {
        got1.push(t);
    }
    got1.extend(rest);
    assert_eq!(got1, alone(&v1, 48), "the in-flight request stays on version 1");
    let (got2, _) = second.wait();
    assert_eq!(got2, Expected::load(&adapter("llama-a2")).ids("greedy"), "a new request gets version 2");
    assert_eq!(got2, alone(&v2, 8));
    // Explicit reload: a new version again, same weights.
    let v3 = m.adapters().reload(&m, "x").unwrap();
    assert!(v3.id() > v2.id());
    // Unload: new requests naming it fail clearly; the engine serves others.
    assert!(m.adapters().unload("x"));
    let e = engine.generate(req(4)).unwrap_err().to_string();
    assert!(e.contains("no LoRA adapter named \"x\""), "{e}");
    let (plain, _) = engine.generate(GenerateRequest::greedy(prompt.clone(), 4)).unwrap().wait();
    assert_eq!(plain.len(), 4);
}

/// The prefix cache keeps K/V computed under different adapters apart: the same prompt with
/// and without an adapter, one after the other, each gets its own answer.
#[test]
fn the_prefix_cache_does_not_mix_adapters() {
    let m = model("llama-f32", None);
    m.load_adapter("a", &adapter("llama-a")).unwrap();
    let engine = Engine::new(m.clone(), EngineOptions { n_cells: 2048, max_seqs: 4, ..Default::default() }).unwrap();
    // A prompt of several cache blocks: the fixture prompt repeated.
    let base_prompt = Expected::load(&adapter("llama-a")).ids("tokens");
    let prompt: Vec<u32> = base_prompt.iter().cycle().take(40).copied().collect();
    let gen = |adapters: Vec<(String, f32)>| {
        let req = GenerateRequest { stop_tokens: Some(vec![]), adapters, ..GenerateRequest::greedy(prompt.clone(), 6) };
        engine.generate(req).unwrap().wait().0
    };
    let plain = gen(vec![]);
    let with_a = gen(vec![("a".into(), 1.0)]);
    let plain_again = gen(vec![]);
    let with_a_again = gen(vec![("a".into(), 1.0)]);
    let a = m.adapter("a").unwrap();
    let mut sampler = stllm::sampling::Sampler::new(Default::default());
    let want_a = session(&m, vec![(a, 1.0)]).generate(&prompt, 6, &mut sampler, &[], |_| {}).unwrap();
    let want_plain = session(&m, vec![]).generate(&prompt, 6, &mut sampler, &[], |_| {}).unwrap();
    assert_eq!(with_a, want_a);
    assert_eq!(with_a_again, want_a);
    assert_eq!(plain, want_plain);
    assert_eq!(plain_again, want_plain);
    assert_ne!(want_a, want_plain);
    assert!(engine.stats().prefix_hits >= 2, "repeats reuse their own entries");
}

fn load_err(base: &str, dir: &Path) -> LoraError {
    model(base, None).load_adapter("bad", dir).unwrap_err()
}

#[test]
fn adapters_that_cannot_load_say_why() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Nothing there.
    let e = load_err("llama-f32", dir).to_string();
    assert!(e.contains("adapter_config.json"), "{e}");
    // Modules the model does not have (another architecture's adapter).
    let e = load_err("llama-f32", &adapter("nemotron")).to_string();
    assert!(e.contains("module model.layers.0.mixer.in_proj has no matrix"), "{e}");
    // DoRA, trained biases, replacing an embedding (modules_to_save), another PEFT type.
    put(&adapter("llama-a"), dir);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    for (key, value, says) in [
        ("use_dora", serde_json::json!(true), "DoRA"),
        ("bias", serde_json::json!("all"), "trained biases"),
        ("modules_to_save", serde_json::json!(["embed_tokens"]), "replacing an embedding"),
        ("peft_type", serde_json::json!("IA3"), "only LORA"),
    ] {
        let mut c = cfg.clone();
        c[key] = value;
        std::fs::write(dir.join("adapter_config.json"), c.to_string()).unwrap();
        let e = load_err("llama-f32", dir).to_string();
        assert!(e.contains(says) && e.contains("not supported"), "{key}: {e}");
    }
    // An alpha whose scale is not a finite number (1e300 / r overflows F32).
    let mut c = cfg.clone();
    c["lora_alpha"] = serde_json::json!(1e300);
    std::fs::write(dir.join("adapter_config.json"), c.to_string()).unwrap();
    let e = load_err("llama-f32", dir).to_string();
    assert!(e.contains("lora_alpha") && e.contains("not a finite number"), "{e}");
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    // A truncated tensor file.
    let st = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err("llama-f32", dir).to_string();
    assert!(e.contains("adapter_model.safetensors"), "{e}");
    // lora_B missing, and a wrong shape (an adapter of another width).
    let mut t = common::read_all(&adapter("llama-a").join("adapter_model.safetensors"));
    let b_name = t.iter().position(|x| x.0.ends_with("q_proj.lora_B.weight")).unwrap();
    let removed = t.remove(b_name);
    common::write_safetensors(&st, &t);
    let e = load_err("llama-f32", dir).to_string();
    assert!(e.contains("has only one of lora_A / lora_B"), "{e}");
    t.push((removed.0, removed.1, vec![removed.2[0] / 2, removed.2[1]], removed.3[..removed.3.len() / 2].to_vec()));
    common::write_safetensors(&st, &t);
    let e = load_err("llama-f32", dir).to_string();
    assert!(e.contains("q_proj: lora_A is") && e.contains("the base matrix is"), "{e}");
}

/// An adapter finds its base matrices by address: one loaded for another model (even of the same
/// checkpoint) is refused on a session of this one, never silently missing or mismatching.
#[test]
fn an_adapter_of_another_model_is_refused() {
    let a = model("llama-f32", None);
    let b = model("llama-f32", None);
    a.load_adapter("x", &adapter("llama-a")).unwrap();
    let x = a.adapter("x").unwrap();
    let mut s = Session::new(b.clone(), &SessionOptions { n_ctx: Some(64), ..Default::default() }).unwrap();
    let e = s.set_adapters(vec![(x.clone(), 1.0)]).unwrap_err().to_string();
    assert!(e.contains("loaded for another model"), "{e}");
    // Its own model takes it.
    session(&a, vec![(x, 1.0)]);
}

/// More distinct adapters than one step computes (`MAX_STEP_ADAPTERS`): the engine spreads the
/// requests over steps and every one gets its adapter's answer; a request listing too many is
/// refused.
#[test]
fn more_adapters_than_a_step_holds() {
    let m = model("llama-f32", None);
    let n = stllm::lora::MAX_STEP_ADAPTERS + 3;
    for i in 0..n {
        // The same files under several names: distinct versions, the same weights.
        m.load_adapter(&format!("a{i}"), &adapter("llama-a")).unwrap();
    }
    let engine = Engine::new(m.clone(), EngineOptions { n_cells: 2048, max_seqs: 16, ..Default::default() }).unwrap();
    let exp = Expected::load(&adapter("llama-a"));
    let gens: Vec<_> = (0..n)
        .map(|i| {
            let req = GenerateRequest {
                stop_tokens: Some(vec![]),
                adapters: vec![(format!("a{i}"), 1.0)],
                ..GenerateRequest::greedy(exp.ids("tokens"), 8)
            };
            engine.generate(req).unwrap()
        })
        .collect();
    for g in gens {
        assert_eq!(g.wait().0, exp.ids("greedy"));
    }
    let too_many = GenerateRequest {
        adapters: (0..n).map(|i| (format!("a{i}"), 0.1)).collect(),
        ..GenerateRequest::greedy(exp.ids("tokens"), 2)
    };
    let e = engine.generate(too_many).unwrap_err().to_string();
    assert!(e.contains("adapters in one request; at most"), "{e}");
}

/// Engine-wide adapters (`EngineOptions::adapters`, what `stllm run --lora` sets): requests that
/// name none and caller-driven sequences (the WIT `engine`'s) are computed with them; a request
/// naming its own list uses that instead.
#[test]
fn engine_default_adapters_apply_to_plain_requests_and_sequences() {
    let m = model("llama-f32", None);
    m.load_adapter("a", &adapter("llama-a")).unwrap();
    m.load_adapter("b", &adapter("llama-b")).unwrap();
    let engine = Arc::new(
        Engine::new(m.clone(), EngineOptions { adapters: vec![("a".into(), 1.0)], ..Default::default() }).unwrap(),
    );
    let exp = Expected::load(&adapter("llama-a"));
    let req = |adapters: Vec<(String, f32)>| GenerateRequest {
        stop_tokens: Some(vec![]),
        adapters,
        ..GenerateRequest::greedy(exp.ids("tokens"), 8)
    };
    assert_eq!(engine.generate(req(vec![])).unwrap().wait().0, exp.ids("greedy"));
    let b = Expected::load(&adapter("llama-b"));
    assert_eq!(engine.generate(req(vec![("b".into(), 1.0)])).unwrap().wait().0, b.ids("greedy"));
    let mut seq = engine.open_sequence(0).unwrap();
    let rows = seq.decode(&exp.ids("tokens"), Logits::All).unwrap();
    let e = rel_err(&rows, &exp.rows("logits"));
    assert!(e < TOL, "caller-driven sequence: {e}");
    let fork = seq.fork().unwrap();
    drop(seq);
    drop(fork);
    // An engine naming an adapter that is not loaded is refused.
    let err = Engine::new(m.clone(), EngineOptions { adapters: vec![("zzz".into(), 1.0)], ..Default::default() });
    assert!(err.unwrap_err().to_string().contains("no LoRA adapter named \"zzz\""));
}
