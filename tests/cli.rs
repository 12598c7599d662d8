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

#[test]
fn max_tokens_beyond_the_context_end_with_length() {
    // More tokens asked than the context holds: the output ends where the context does, with
    // finish reason `length` (not a "context full" error after streaming).
    let d = fixture("llama-f32");
    let v = stllm(&[
        "run",
        "--model",
        d.to_str().unwrap(),
        "--prompt",
        "hello",
        "--max-tokens",
        "500",
        "--ctx-size",
        "64",
        "--ignore-eos",
        "--json",
    ]);
    assert_eq!(v["finish"], "length", "{v}");
    let (n, prompt) = (v["tokens"].as_array().unwrap().len(), v["prompt_tokens"].as_u64().unwrap() as usize);
    // The last token is yielded without being computed.
    assert_eq!(n + prompt, 64 + 1, "{v}");
}

#[test]
fn run_command_streams_text_through_the_policy() {
    let d = fixture("llama-f32");
    let d = d.to_str().unwrap();
    // JSON result: greedy, chat template applied (the fixture has one)
    let v = stllm(&[
        "run",
        "--model",
        d,
        "--prompt",
        "Hello world",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ]);
    assert_eq!(v["tokens"].as_array().unwrap().len(), 12);
    assert_eq!(v["finish"], "length");
    let chat_prompt_tokens = v["prompt_tokens"].as_u64().unwrap();
    // --raw skips the template: fewer prompt tokens
    let raw = stllm(&[
        "run",
        "--model",
        d,
        "--prompt",
        "Hello world",
        "--raw",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "--json",
    ]);
    assert!(raw["prompt_tokens"].as_u64().unwrap() < chat_prompt_tokens);
    // Streaming mode prints the same text
    let out = Command::new(env!("CARGO_BIN_EXE_stllm"))
        .args([
            "run",
            "--model",
            d,
            "--prompt",
            "Hello world",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--ignore-eos",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end_matches('\n'), v["text"].as_str().unwrap());
}

#[test]
fn tokenizer_commands_match_python() {
    let exp = common::tokenizer_expectations();
    let q = &exp["packages"]["qwen3"];
    let dir = common::npm_tokenizer(q["npm"].as_str().unwrap(), q["version"].as_str().unwrap());
    let dir = dir.to_str().unwrap();
    let case = &q["encode"][6];
    let text = case["text"].as_str().unwrap();
    let v = stllm(&["tokenize", "--tokenizer", dir, "--text", text]);
    assert_eq!(v["ids"], case["ids"]);
    let v = stllm(&["tokenize", "--tokenizer", dir, "--text", text, "--special"]);
    assert_eq!(v["ids"], case["ids_special"]);
    let ids: Vec<String> = case["ids"].as_array().unwrap().iter().map(|x| x.to_string()).collect();
    let v = stllm(&["detokenize", "--tokenizer", dir, "--ids", &ids.join(",")]);
    assert_eq!(v["text"], case["decoded"]);

    let l = &exp["packages"]["llama3_1"];
    let ldir = common::npm_tokenizer(l["npm"].as_str().unwrap(), l["version"].as_str().unwrap());
    for chat in l["chat"].as_array().unwrap() {
        let tmp = tempfile::tempdir().unwrap();
        let msgs = tmp.path().join("messages.json");
        std::fs::write(&msgs, chat["messages"].to_string()).unwrap();
        let mut args = vec![
            "template".to_string(),
            "--tokenizer".into(),
            ldir.to_str().unwrap().into(),
            "--messages".into(),
            msgs.to_str().unwrap().into(),
            "--vars".into(),
            chat["vars"].to_string(),
        ];
        if !chat["add_generation_prompt"].as_bool().unwrap() {
            args.push("--no-generation-prompt".into());
        }
        if !chat["tools"].is_null() {
            let tools = tmp.path().join("tools.json");
            std::fs::write(&tools, chat["tools"].to_string()).unwrap();
            args.push("--tools".into());
            args.push(tools.to_str().unwrap().into());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let v = stllm(&refs);
        assert_eq!(v["text"], chat["text"]);
    }
}

#[test]
fn policy_errors_exit_cleanly() {
    let d = fixture("llama-f32");
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_stllm")).args(args).output().unwrap();
    let out = run(&["run", "--model", d.to_str().unwrap(), "--prompt", "x", "--policy", "/nonexistent.wasm"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.wasm"));
    let out = run(&["tokenize", "--tokenizer", "/nonexistent", "--text", "x"]);
    assert!(!out.status.success());
    let out = run(&["run", "--model", d.to_str().unwrap(), "--prompt", "x", "--top-p", "0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("top_p") && !err.contains("panicked"), "{err}");
}

#[test]
fn chat_command_takes_turns_on_stdin() {
    use std::io::Write;
    let d = fixture("qwen2-f32");
    let mut child = Command::new(env!("CARGO_BIN_EXE_stllm"))
        .args(["chat", "--model", d.to_str().unwrap(), "--max-tokens", "6", "--temperature", "0", "--ignore-eos"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"Hello there\nWhat is the capital of France?\n/exit\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.matches('\n').count() >= 2, "an answer per turn: {stdout:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).matches("> ").count(),
        3,
        "a prompt before each turn and at the end"
    );
}

#[test]
fn generate_with_a_prompt_cache() {
    let dir = fixture("qwen3-bf16");
    let exp = Expected::load(&dir);
    let d = dir.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let pc = tmp.path().join("prompt.kv");
    let prompt = csv(&exp.ids("tokens"));
    let args = [
        "generate",
        "--model",
        d,
        "--tokens",
        &prompt,
        "--max-tokens",
        "8",
        "--ignore-eos",
        "--json",
        "--prompt-cache",
    ];
    let mut with = args.to_vec();
    with.push(pc.to_str().unwrap());
    let first = stllm(&with); // computes and saves
    assert!(pc.exists());
    let second = stllm(&with); // reuses
    assert_eq!(first["tokens"], second["tokens"]);
    let want: Vec<u32> = serde_json::from_value(first["tokens"].clone()).unwrap();
    assert_eq!(want, exp.ids("greedy"));
    // A cache from another model is a clear error.
    let other = fixture("llama-bf16");
    let out = Command::new(env!("CARGO_BIN_EXE_stllm"))
        .args(["generate", "--model", other.to_str().unwrap(), "--tokens", "1,2,3", "--prompt-cache"])
        .arg(&pc)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("made for architecture qwen3"));
}

/// Run the binary expecting failure; its stderr.
fn stllm_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_stllm")).args(args).output().unwrap();
    assert!(!out.status.success(), "stllm {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn devices_and_device_selection() {
    let v = stllm(&["devices"]);
    let devs = v["devices"].as_array().unwrap();
    assert!(devs.iter().any(|d| d["kind"] == "cpu"), "{v}");
    assert!(v["ggml"].as_str().unwrap().starts_with("0."));
    let dir = fixture("llama-f32");
    let m = dir.to_str().unwrap();
    let v = stllm(&["info", "--model", m, "--device", "cpu", "--ctx-size", "100"]);
    assert_eq!(v["device"], "CPU");
    let mem = &v["memory"];
    assert_eq!(mem["kv"].as_u64().unwrap(), 100 * mem["kv_per_token"].as_u64().unwrap());
    assert!(mem["total"].as_u64().unwrap() > mem["weights"].as_u64().unwrap());
    // No GPU module loaded (or none in the folder): a clear error naming the devices there are.
    let empty = tempfile::tempdir().unwrap();
    let e = stllm_fails(&["info", "--model", m, "--device", "cuda:0", "--backend-dir", empty.path().to_str().unwrap()]);
    assert!(e.contains("no ggml backend device \"cuda:0\"") && e.contains("CPU"), "{e}");
    // A file that is not a ggml backend module.
    let bogus = empty.path().join("libggml-bogus.so");
    std::fs::write(&bogus, b"not a shared library").unwrap();
    let e = stllm_fails(&["devices", "--backend-dir", empty.path().to_str().unwrap()]);
    assert!(e.contains("libggml-bogus.so") && e.contains("no ggml-abi.txt"), "{e}");
    // A module built from other ggml sources is refused before it is opened.
    let devices = stllm(&["devices"]);
    let ours = devices["ggml_abi"].as_str().unwrap();
    assert_eq!(ours.len(), 16, "{devices}");
    std::fs::write(empty.path().join("ggml-abi.txt"), "0123456789abcdef\n").unwrap();
    let e = stllm_fails(&["devices", "--backend-dir", empty.path().to_str().unwrap()]);
    assert!(e.contains("built from other ggml sources") && e.contains(ours), "{e}");
    // With the right stamp the file gets as far as loading (refused there: not a module, or a
    // static build).
    std::fs::write(empty.path().join("ggml-abi.txt"), format!("{ours}\n")).unwrap();
    let e = stllm_fails(&["devices", "--backend-dir", empty.path().to_str().unwrap()]);
    assert!(e.contains("libggml-bogus.so") && !e.contains("ggml sources"), "{e}");
}

/// Layers split over several backends (two CPU backends stand in for two GPUs here; the same path
/// puts them on CUDA devices): every split gives the logits of one backend, and `info` reports
/// where each layer, weight and cache byte goes.
#[test]
fn layer_split_and_offload_keep_the_logits() {
    for name in ["llama-f32", "qwen3-bf16"] {
        let dir = fixture(name);
        let m = dir.to_str().unwrap();
        let tokens = csv(&Expected::load(&dir).ids("tokens"));
        let logits = |extra: &[&str]| -> Vec<Vec<f32>> {
            let mut args = vec!["logits", "--model", m, "--tokens", &tokens, "--threads", "2"];
            args.extend_from_slice(extra);
            serde_json::from_value(stllm(&args)["logits"].clone()).unwrap()
        };
        let one = logits(&[]);
        for extra in [
            &["--devices", "cpu,cpu"][..],
            &["--devices", "cpu,cpu", "--tensor-split", "1,3"],
            &["--devices", "cpu,cpu", "--gpu-layers", "1"],
            &["--device", "cpu", "--gpu-layers", "0"],
            &["--devices", "cpu,cpu", "--split", "none"],
        ] {
            assert_eq!(logits(extra), one, "{name} {extra:?}");
        }
    }
    let dir = fixture("llama-f32");
    let m = dir.to_str().unwrap();
    let v = stllm(&["info", "--model", m, "--devices", "cpu,cpu", "--gpu-layers", "1", "--ctx-size", "64"]);
    let b = v["memory"]["backends"].as_array().unwrap();
    assert_eq!(b.len(), 3, "{v}");
    let layers: Vec<u64> = b.iter().map(|x| x["layers"].as_u64().unwrap()).collect();
    let n_layer = v["layers"].as_u64().unwrap();
    assert_eq!(layers, vec![1, 0, n_layer - 1], "{v}");
    let weights: u64 = b.iter().map(|x| x["weights"].as_u64().unwrap()).sum();
    assert_eq!(weights, v["weight_bytes"].as_u64().unwrap());
    assert_eq!(b[0]["kv"].as_u64().unwrap() * (n_layer - 1), b[2]["kv"].as_u64().unwrap());
    assert_eq!((b[1]["weights"].as_u64(), b[1]["kv"].as_u64()), (Some(0), Some(0)));
    let e = stllm_fails(&["info", "--model", m, "--devices", "cpu,cpu", "--tensor-split", "1"]);
    assert!(e.contains("--tensor-split needs 2"), "{e}");
    let e = stllm_fails(&["info", "--model", m, "--devices", "cpu,cpu", "--split", "row"]);
    assert!(e.contains("--split must be layer or none"), "{e}");
}

/// `--quantize`: smaller weights in `info`, logits close to HF's, and a clear error for a type
/// it does not offer.
#[test]
fn quantize_option() {
    let dir = fixture("mixtral-f32");
    let m = dir.to_str().unwrap();
    let exp = Expected::load(&dir);
    let tokens = csv(&exp.ids("tokens"));
    let full = stllm(&["info", "--model", m])["weight_bytes"].as_u64().unwrap();
    let q8 = stllm(&["info", "--model", m, "--quantize", "q8_0"])["weight_bytes"].as_u64().unwrap();
    assert!(q8 * 2 < full, "{full} -> {q8}");
    let v = stllm(&["logits", "--model", m, "--tokens", &tokens, "--threads", "2", "--quantize", "q8_0"]);
    let rows: Vec<Vec<f32>> = serde_json::from_value(v["logits"].clone()).unwrap();
    let err = rel_err(&rows, &exp.rows("logits"));
    assert!(err < 0.1, "{err}");
    let e = stllm_fails(&["info", "--model", m, "--quantize", "q3_k"]);
    assert!(e.contains("--quantize must be q8_0, q4_0 or q4_k"), "{e}");
}

/// `--lora DIR[:WEIGHT]` on logits and generate: the PEFT-merged model's logits and greedy
/// tokens; a weighted pair equals the weighted merge; an adapter that does not fit the model
/// fails clearly.
#[test]
fn lora_option() {
    let m = fixture("llama-f32");
    let m = m.to_str().unwrap();
    let a = fixture("lora").join("llama-a");
    let exp = Expected::load(&a);
    let tokens = csv(&exp.ids("tokens"));
    let v = stllm(&["logits", "--model", m, "--tokens", &tokens, "--threads", "2", "--lora", a.to_str().unwrap()]);
    let rows: Vec<Vec<f32>> = serde_json::from_value(v["logits"].clone()).unwrap();
    let err = rel_err(&rows, &exp.rows("logits"));
    assert!(err < 2e-3, "{err}");
    let v = stllm(&[
        "generate",
        "--model",
        m,
        "--tokens",
        &tokens,
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--json",
        "--lora",
        a.to_str().unwrap(),
    ]);
    let got: Vec<u32> = serde_json::from_value(v["tokens"].clone()).unwrap();
    assert_eq!(got, exp.ids("greedy"));
    let mix = Expected::load(&fixture("lora").join("mix"));
    let b = fixture("lora").join("llama-b");
    let (wa, wb) = (format!("{}:0.5", a.display()), format!("{}:1", b.display()));
    let v = stllm(&["logits", "--model", m, "--tokens", &tokens, "--threads", "2", "--lora", &wa, "--lora", &wb]);
    let rows: Vec<Vec<f32>> = serde_json::from_value(v["logits"].clone()).unwrap();
    let err = rel_err(&rows, &mix.rows("logits"));
    assert!(err < 2e-3, "weighted: {err}");
    let other = fixture("lora").join("nemotron");
    let e = stllm_fails(&["logits", "--model", m, "--tokens", "1,2", "--lora", other.to_str().unwrap()]);
    assert!(e.contains("--lora") && e.contains("has no matrix"), "{e}");
    // Text generation through the policy component: every sequence uses the adapter.
    let run = |extra: &[&str]| -> Vec<u32> {
        let mut args = vec!["run", "--model", m, "--prompt", "hello world", "--raw", "--max-tokens", "6"];
        args.extend(["--temperature", "0", "--ignore-eos", "--json"]);
        args.extend(extra);
        serde_json::from_value(stllm(&args)["tokens"].clone()).unwrap()
    };
    let plain = run(&[]);
    let adapted = run(&["--lora", a.to_str().unwrap()]);
    assert_eq!(plain.len(), 6);
    assert_ne!(plain, adapted, "run --lora must change the output");
}

#[test]
fn no_device_flag_uses_the_cpu_without_a_gpu_module_and_says_so() {
    let dir = fixture("llama-f32");
    let d = dir.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", d, "--tokens", "1,2,3", "--max-tokens", "2", "--json"];
        args.extend_from_slice(extra);
        let out = Command::new(env!("CARGO_BIN_EXE_stllm")).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "stllm {args:?} failed: {stderr}");
        stderr
    };
    // No module beside the binary: the CPU, said on stderr.
    let stderr = run(&[]);
    assert!(stderr.lines().any(|l| l.starts_with("stllm: using the CPU (no GPU backend found")), "{stderr}");
    // A module that cannot be loaded is no error when no device was asked for: the CPU, with why.
    let tmp = std::env::temp_dir().join(format!("stllm-fake-module-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("libggml-cuda.so"), b"not a module").unwrap();
    let stderr = run(&["--backend-dir", tmp.to_str().unwrap()]);
    assert!(stderr.lines().any(|l| l.starts_with("stllm: using the CPU (a GPU backend failed to load")), "{stderr}");
    // Asking for the device makes the same module an error.
    let out = Command::new(env!("CARGO_BIN_EXE_stllm"))
        .args(["generate", "--model", d, "--tokens", "1,2,3", "--max-tokens", "2", "--device", "cuda"])
        .args(["--backend-dir", tmp.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    // --device cpu: no module is looked at, nothing said.
    let stderr = run(&["--device", "cpu", "--backend-dir", tmp.to_str().unwrap()]);
    assert!(!stderr.contains("stllm: using"), "{stderr}");
    std::fs::remove_dir_all(&tmp).ok();
}

/// The JSON lines a command prints.
fn stllm_lines(args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_stllm")).args(args).output().unwrap();
    assert!(out.status.success(), "stllm {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn a_long_prompt_is_benched_over_several_runs_through_a_state_file() {
    // `bench --chunk` reports speed over depth; with --state a run that stops (here after two
    // chunks) saves the sequence — a hybrid's recurrent state included — and the next run
    // resumes there: the tokens decoded at the end are those of one uninterrupted run.
    let dir = fixture("nemotron_h-f32");
    let m = dir.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("depth.kv");
    let st = state.to_str().unwrap();
    let base = ["--quiet", "bench", "--model", m, "--prompt", "200", "--gen", "5", "--chunk", "48", "--json"];
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [base, extra].concat()
    }

    let first = stllm_lines(&with(&base, &["--state", st, "--stop-after", "2"]));
    assert_eq!(first.len(), 3, "two chunks and the summary");
    assert_eq!(first[1]["depth"], 96);
    assert!(first[0]["prefill_tok_s"].as_f64().unwrap() > 0.0);
    assert_eq!(first[2]["stopped_at"], 96);
    assert!(first[2]["memory"]["recurrent"].as_u64().unwrap() > 0);
    assert!(state.exists());

    let rest = stllm_lines(&with(&base, &["--state", st]));
    let end = rest.last().unwrap();
    assert_eq!(end["resumed_from"], 96);
    assert_eq!(rest[rest.len() - 2]["depth"], 199, "the prompt's last token is the first decoded");
    let whole = stllm_lines(&with(&base, &[]));
    let end_whole = whole.last().unwrap();
    assert_eq!(end_whole["resumed_from"], 0);
    assert_eq!(end["tokens"], end_whole["tokens"], "resumed == uninterrupted");
    assert_eq!(end["tokens"].as_array().unwrap().len(), 5);

    // A state of another prompt or model is refused, naming it.
    let e = stllm_fails(&["bench", "--model", m, "--prompt", "150", "--chunk", "48", "--state", st]);
    assert!(e.contains("not the start of this bench's prompt"), "{e}");
    let other = fixture("llama-f32");
    let e =
        stllm_fails(&["bench", "--model", other.to_str().unwrap(), "--prompt", "200", "--chunk", "48", "--state", st]);
    assert!(e.contains("made for architecture nemotron_h"), "{e}");
    let e = stllm_fails(&["bench", "--model", m, "--chunk", "0"]);
    assert!(e.contains("--chunk must be at least 1"), "{e}");
    let e = stllm_fails(&["bench", "--model", m, "--chunk", "8", "--deadline=-1"]);
    assert!(e.contains("--deadline"), "{e}");
}
