//! Bad model folders: each gives a typed error that names the file and tensor, never a panic,
//! both from the library and from the CLI (exit code != 0, message on stderr).

mod common;

use std::path::Path;
use std::process::Command;

use common::{copy_fixture, edit_json, read_all, write_safetensors};
use stllm::loader::LoadError;
use stllm::{Model, ModelOptions};

fn load(dir: &Path) -> LoadError {
    match Model::load(dir, &ModelOptions { threads: 1, ..Default::default() }) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e,
    }
}

/// Run `stllm logits` on the folder: it must fail cleanly with `needle` in its message.
fn cli_fails(dir: &Path, needle: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_stllm"))
        .args(["logits", "--model"])
        .arg(dir)
        .args(["--tokens", "1,2,3"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit status should be non-zero");
    assert_ne!(out.status.code(), None, "killed by a signal: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
    assert!(out.stdout.is_empty(), "nothing on stdout on error");
}

#[test]
fn truncated_shard() {
    let tmp = copy_fixture("qwen3-f32-sharded");
    let shard = tmp.path().join("model-00002-of-00004.safetensors");
    let len = std::fs::metadata(&shard).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&shard).unwrap();
    f.set_len(len - 100).unwrap();
    match load(tmp.path()) {
        LoadError::Truncated { file, tensor: Some(t), .. } => {
            assert_eq!(file, shard);
            assert!(t.starts_with("model."), "{t}");
        }
        e => panic!("wrong error: {e}"),
    }
    cli_fails(tmp.path(), "model-00002-of-00004.safetensors: truncated at tensor");
}

#[test]
fn header_that_lies_about_offsets() {
    let tmp = copy_fixture("llama-f32");
    let path = tmp.path().join("model.safetensors");
    let mut tensors = read_all(&path);
    // Claim the first tensor is one row larger than its shape says.
    let (name, _, shape, data) = &mut tensors[0];
    let victim = name.clone();
    let row = data.len() / shape[0];
    data.extend(vec![0u8; row]);
    write_safetensors(&path, &tensors);
    match load(tmp.path()) {
        LoadError::Corrupt { file, msg } => {
            assert_eq!(file, path);
            assert!(msg.contains(&victim), "{msg}");
        }
        e => panic!("wrong error: {e}"),
    }
    cli_fails(tmp.path(), "corrupt safetensors file");
}

#[test]
fn offsets_past_the_end_of_the_file() {
    let tmp = copy_fixture("llama-f32");
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    // Keep the header, drop most of the data.
    std::fs::write(&path, &bytes[..8 + n + 16]).unwrap();
    assert!(matches!(load(tmp.path()), LoadError::Truncated { .. }));
    cli_fails(tmp.path(), "truncated");
}

#[test]
fn garbage_header() {
    let tmp = copy_fixture("llama-f32");
    let path = tmp.path().join("model.safetensors");
    let mut bytes = (20u64).to_le_bytes().to_vec();
    bytes.extend(b"{\"a\": not json at al");
    std::fs::write(&path, bytes).unwrap();
    assert!(matches!(load(tmp.path()), LoadError::Corrupt { .. }));
    cli_fails(tmp.path(), "not a JSON object");
    std::fs::write(&path, (u64::MAX).to_le_bytes()).unwrap();
    assert!(matches!(load(tmp.path()), LoadError::Corrupt { .. }));
}

#[test]
fn missing_tensor() {
    let tmp = copy_fixture("qwen2-f32");
    let path = tmp.path().join("model.safetensors");
    let tensors: Vec<_> =
        read_all(&path).into_iter().filter(|t| t.0 != "model.layers.1.self_attn.k_proj.bias").collect();
    write_safetensors(&path, &tensors);
    match load(tmp.path()) {
        LoadError::MissingTensor { name, arch, .. } => {
            assert_eq!(name, "model.layers.1.self_attn.k_proj.bias");
            assert_eq!(arch, "qwen2");
        }
        e => panic!("wrong error: {e}"),
    }
    cli_fails(tmp.path(), "missing tensor model.layers.1.self_attn.k_proj.bias");
}

#[test]
fn unexpected_tensor() {
    let tmp = copy_fixture("llama-f32");
    let path = tmp.path().join("model.safetensors");
    let mut tensors = read_all(&path);
    tensors.push(("model.layers.0.mlp.extra.weight".into(), "F32".into(), vec![2], vec![0; 8]));
    write_safetensors(&path, &tensors);
    assert!(
        matches!(load(tmp.path()), LoadError::UnexpectedTensor { ref name, .. } if name == "model.layers.0.mlp.extra.weight")
    );
    cli_fails(tmp.path(), "unexpected tensor model.layers.0.mlp.extra.weight");
}

#[test]
fn wrong_shape() {
    let tmp = copy_fixture("mistral-f32");
    edit_json(&tmp.path().join("config.json"), |c| c["intermediate_size"] = 80.into());
    match load(tmp.path()) {
        LoadError::ShapeMismatch { name, expected, got, .. } => {
            assert_eq!(name, "model.layers.0.mlp.gate_proj.weight");
            assert_eq!(expected, vec![80, 64]);
            assert_eq!(got, vec![96, 64]);
        }
        e => panic!("wrong error: {e}"),
    }
    cli_fails(tmp.path(), "has shape [96, 64], expected [80, 64]");
}

#[test]
fn unsupported_dtype() {
    let tmp = copy_fixture("llama-f32");
    let path = tmp.path().join("model.safetensors");
    let mut tensors = read_all(&path);
    let t = tensors.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
    t.1 = "F64".into();
    let v = t.3.clone();
    t.3 = v.chunks(4).flat_map(|b| (f32::from_le_bytes(b.try_into().unwrap()) as f64).to_le_bytes()).collect();
    write_safetensors(&path, &tensors);
    assert!(matches!(load(tmp.path()), LoadError::UnsupportedDtype { ref dtype, .. } if dtype == "F64"));
    cli_fails(tmp.path(), "tensor model.norm.weight has dtype F64");
}

#[test]
fn unknown_architecture() {
    let tmp = copy_fixture("llama-f32");
    edit_json(&tmp.path().join("config.json"), |c| {
        c["model_type"] = "gpt_frobnicator".into();
        c["architectures"] = serde_json::json!(["GptFrobnicatorForCausalLM"]);
    });
    assert!(matches!(load(tmp.path()), LoadError::UnknownArchitecture { ref name, .. } if name == "gpt_frobnicator"));
    cli_fails(tmp.path(), "unknown architecture \"gpt_frobnicator\"");
}

#[test]
fn config_values_out_of_range() {
    let cases: &[(&str, serde_json::Value, &str)] = &[
        ("num_key_value_heads", 3.into(), "num_key_value_heads"),
        ("hidden_size", 0.into(), "hidden_size"),
        ("rms_norm_eps", (-1.0).into(), "rms_norm_eps"),
        ("num_attention_heads", "four".into(), "num_attention_heads"),
        ("hidden_act", "gelu".into(), "hidden_act"),
    ];
    for (key, value, needle) in cases {
        let tmp = copy_fixture("llama-f32");
        edit_json(&tmp.path().join("config.json"), |c| c[*key] = value.clone());
        let e = load(tmp.path());
        assert!(matches!(e, LoadError::InvalidConfig { .. }), "{key}: {e}");
        assert!(e.to_string().contains(needle), "{key}: {e}");
        cli_fails(tmp.path(), needle);
    }
    let tmp = copy_fixture("llama-f32");
    edit_json(&tmp.path().join("config.json"), |c| {
        c["rope_parameters"] = serde_json::json!({"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0})
    });
    cli_fails(tmp.path(), "\"longrope\" is not supported");
}

#[test]
fn broken_config_and_missing_files() {
    let tmp = copy_fixture("llama-f32");
    std::fs::write(tmp.path().join("config.json"), "{ not json").unwrap();
    assert!(matches!(load(tmp.path()), LoadError::Json { .. }));
    cli_fails(tmp.path(), "config.json: invalid JSON");

    let tmp = copy_fixture("llama-f32");
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    assert!(matches!(load(tmp.path()), LoadError::NoWeights { .. }));
    cli_fails(tmp.path(), "no model.safetensors");

    cli_fails(Path::new("/nonexistent/model/dir"), "config.json");
}

#[test]
fn non_regular_files_are_refused_not_read_forever() {
    // /dev/zero as config.json (a symbolic link, as in the Hugging Face cache): refused by its
    // kind instead of read until memory runs out.
    let tmp = copy_fixture("llama-f32");
    std::fs::remove_file(tmp.path().join("config.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", tmp.path().join("config.json")).unwrap();
    assert!(load(tmp.path()).to_string().contains("not a regular file"));
    cli_fails(tmp.path(), "not a regular file");

    // A FIFO named model.safetensors: refused before it is opened (the open would block).
    let tmp = copy_fixture("llama-f32");
    let st = tmp.path().join("model.safetensors");
    std::fs::remove_file(&st).unwrap();
    assert!(Command::new("mkfifo").arg(&st).status().unwrap().success());
    assert!(load(tmp.path()).to_string().contains("not a regular file"));
    cli_fails(tmp.path(), "not a regular file");

    // /dev/zero as tokenizer.json, for the tokenizer-only commands.
    let tmp = copy_fixture("llama-f32");
    std::fs::remove_file(tmp.path().join("tokenizer.json")).ok();
    std::os::unix::fs::symlink("/dev/zero", tmp.path().join("tokenizer.json")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_stllm"))
        .args(["tokenize", "--tokenizer"])
        .arg(tmp.path())
        .args(["--text", "hello"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.status.code().is_some(), "{stderr}");
    assert!(stderr.contains("not a regular file"), "{stderr}");
}

#[test]
fn absurd_sizes_are_refused_not_wrapped() {
    // Sizes from a user reach the cache's size arithmetic: values whose products wrap must be
    // refused with a message, never slip past the fit check into ggml (an abort).
    let model = std::sync::Arc::new(Model::load(&common::fixture("llama-f32"), &ModelOptions::default()).unwrap());
    for (n_ctx, n_batch, needle) in
        [(1usize << 56, 512, "KV cells: at most"), (64, 1 << 62, "tokens: at most"), (1 << 31, 1 << 20, "does not fit")]
    {
        let opts = stllm::SessionOptions { n_ctx: Some(n_ctx), n_batch, ..Default::default() };
        let e = stllm::Session::new(model.clone(), &opts).err().expect("refused").to_string();
        assert!(e.contains(needle), "{n_ctx} x {n_batch}: {e}");
    }
    let e = stllm::Engine::new(model.clone(), stllm::EngineOptions { n_cells: usize::MAX / 2, ..Default::default() })
        .expect_err("refused")
        .to_string();
    assert!(e.contains("at most"), "{e}");
    for (flag, value, needle) in [
        ("--ctx-size", "72057594037927936", "--ctx-size must be in 1..="),
        ("--ctx-size", "0", "--ctx-size must be in 1..="),
        ("--batch", "4611686018427387904", "--batch must be in 1..="),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_stllm"))
            .args(["--quiet", "run", "--model"])
            .arg(common::fixture("llama-f32"))
            .args(["--prompt", "hi", flag, value])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag} {value}: {stderr}");
        assert!(stderr.contains(needle), "{flag} {value}: {stderr}");
    }
    // More spare policy instances than requests may run is refused before anything loads.
    let out = Command::new(env!("CARGO_BIN_EXE_stllm"))
        .args(["--quiet", "serve", "--model"])
        .arg(common::fixture("llama-f32"))
        .args(["--port", "0", "--max-concurrent", "2", "--spare-instances", "3"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--spare-instances must be at most --max-concurrent (2), got 3"), "{stderr}");
    // `generate --top-k 2^32` is refused by the parser, not truncated to 0 (off).
    let out = Command::new(env!("CARGO_BIN_EXE_stllm"))
        .args(["--quiet", "generate", "--model"])
        .arg(common::fixture("llama-f32"))
        .args(["--tokens", "1,2", "--max-tokens", "2", "--top-k", "4294967296"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--top-k"), "{stderr}");
}

#[test]
fn index_naming_a_missing_shard_or_tensor() {
    let tmp = copy_fixture("qwen3-f32-sharded");
    std::fs::remove_file(tmp.path().join("model-00003-of-00004.safetensors")).unwrap();
    assert!(matches!(load(tmp.path()), LoadError::Io { .. }));
    cli_fails(tmp.path(), "model-00003-of-00004.safetensors");

    let tmp = copy_fixture("qwen3-f32-sharded");
    edit_json(&tmp.path().join("model.safetensors.index.json"), |c| {
        c["weight_map"]["model.layers.0.mlp.phantom.weight"] = "model-00001-of-00004.safetensors".into()
    });
    assert!(matches!(load(tmp.path()), LoadError::IndexMismatch { .. }));
    cli_fails(tmp.path(), "model.layers.0.mlp.phantom.weight is listed in the index");

    let tmp = copy_fixture("qwen3-f32-sharded");
    edit_json(&tmp.path().join("model.safetensors.index.json"), |c| {
        c["weight_map"]["model.norm.weight"] = "../../etc/passwd".into()
    });
    assert!(matches!(load(tmp.path()), LoadError::InvalidConfig { .. }));
}

#[test]
fn bad_tokens_are_rejected_by_the_cli() {
    let dir = common::fixture("llama-f32");
    let run =
        |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_stllm")).args(args).arg("--model").arg(&dir).output().unwrap();
    let out = run(&["logits", "--tokens", "1,99999"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("token id 99999 is out of range"), "{err}");
    let out = run(&["logits", "--tokens", "1,x"]);
    assert!(!out.status.success());
    let out = run(&["logits", "--tokens", "1,2", "--kv-type", "fp8"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FP8 KV caches are not supported"), "{err}");
    let out = run(&["generate", "--tokens", "1,2", "--max-tokens", "300", "--ctx-size", "16"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("context full"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// MoE checkpoints: a missing expert, an expert of the wrong shape, and routing settings that
/// cannot work each name what is wrong.
#[test]
fn moe_checkpoints_with_bad_experts_or_routing() {
    let tmp = copy_fixture("mixtral-f32");
    let path = tmp.path().join("model.safetensors");
    let gone = "model.layers.1.block_sparse_moe.experts.3.w2.weight";
    let tensors: Vec<_> = read_all(&path).into_iter().filter(|t| t.0 != gone).collect();
    write_safetensors(&path, &tensors);
    assert!(matches!(load(tmp.path()), LoadError::MissingTensor { ref name, .. } if name == gone));
    cli_fails(tmp.path(), &format!("missing tensor {gone}"));

    let tmp = copy_fixture("qwen3_moe-f32");
    edit_json(&tmp.path().join("config.json"), |c| c["moe_intermediate_size"] = 40.into());
    match load(tmp.path()) {
        LoadError::ShapeMismatch { name, expected, got, .. } => {
            assert_eq!(name, "model.layers.1.mlp.experts.0.gate_proj.weight");
            assert_eq!((expected, got), (vec![40, 64], vec![32, 64]));
        }
        e => panic!("wrong error: {e}"),
    }

    let tmp = copy_fixture("qwen3_moe-f32");
    edit_json(&tmp.path().join("config.json"), |c| c["num_experts_per_tok"] = 5.into());
    cli_fails(tmp.path(), "num_experts_per_tok");
    let tmp = copy_fixture("mixtral-f32");
    edit_json(&tmp.path().join("config.json"), |c| {
        c.as_object_mut().unwrap().remove("num_local_experts");
    });
    cli_fails(tmp.path(), "needs num_experts");
    // The Hub's Qwen3-MoE spelling (`num_experts`) loads like transformers 5's.
    let tmp = copy_fixture("qwen3_moe-f32");
    edit_json(&tmp.path().join("config.json"), |c| {
        let n = c.as_object_mut().unwrap().remove("num_local_experts").unwrap();
        c["num_experts"] = n;
    });
    Model::load(tmp.path(), &ModelOptions { threads: 1, ..Default::default() }).expect("num_experts spelling loads");
}

/// Nemotron-H configs that cannot work name the field; a hybrid model's state limits are errors,
/// not crashes.
#[test]
fn nemotron_h_bad_configs_and_state_limits() {
    let tmp = copy_fixture("nemotron_h-f32");
    edit_json(&tmp.path().join("config.json"), |c| {
        c.as_object_mut().unwrap().remove("layers_block_type");
        c["hybrid_override_pattern"] = "M*EX-E".into();
    });
    cli_fails(tmp.path(), "unknown layer letter 'X'");
    let tmp = copy_fixture("nemotron_h-f32");
    edit_json(&tmp.path().join("config.json"), |c| c["moe_latent_size"] = 16.into());
    cli_fails(tmp.path(), "latent MoE projections are not supported");
    let tmp = copy_fixture("nemotron_h-f32");
    edit_json(&tmp.path().join("config.json"), |c| c["n_group"] = 3.into());
    cli_fails(tmp.path(), "not a valid grouping");

    let model = std::sync::Arc::new(
        Model::load(&common::fixture("nemotron_h-f32"), &ModelOptions { threads: 1, ..Default::default() }).unwrap(),
    );
    let mut s = stllm::Session::new(model, &stllm::SessionOptions { n_ctx: Some(64), ..Default::default() }).unwrap();
    s.decode(&[5, 6, 7, 8], stllm::session::Logits::Last).unwrap();
    let e = s.truncate(2).unwrap_err().to_string();
    assert!(e.contains("cannot be rewound"), "{e}");
    // A prompt cache of a hybrid model carries its recurrent state (tests/session.rs).
    let dir = tempfile::tempdir().unwrap();
    s.save_state(&dir.path().join("p.bin")).unwrap();
    // Back to the start is fine: the state starts over, and decoding goes on.
    s.truncate(0).unwrap();
    s.decode(&[5, 6], stllm::session::Logits::Last).unwrap();
}

/// gpt-oss checkpoints that cannot work name what is wrong: MXFP4 parts of the wrong type or
/// shape, a missing sink, an impossible SwiGLU limit.
#[test]
fn gpt_oss_bad_mxfp4_parts_and_configs() {
    let blocks = "model.layers.1.mlp.experts.gate_up_proj_blocks";
    let scales = "model.layers.1.mlp.experts.down_proj_scales";
    let tmp = copy_fixture("gpt_oss-mxfp4");
    let path = tmp.path().join("model.safetensors");
    let mut tensors = read_all(&path);
    tensors.iter_mut().find(|t| t.0 == scales).unwrap().1 = "I8".into();
    write_safetensors(&path, &tensors);
    assert!(matches!(load(tmp.path()), LoadError::UnsupportedDtype { ref name, .. } if name == scales));
    cli_fails(tmp.path(), "MXFP4 blocks and scales are U8");

    let tmp = copy_fixture("gpt_oss-mxfp4");
    let path = tmp.path().join("model.safetensors");
    let mut tensors = read_all(&path);
    let t = tensors.iter_mut().find(|t| t.0 == blocks).unwrap();
    // Same bytes, blocks of 32 bytes instead of 16: not the Hub's layout.
    t.2 = vec![t.2[0], t.2[1], t.2[2] / 2, 32];
    write_safetensors(&path, &tensors);
    match load(tmp.path()) {
        LoadError::ShapeMismatch { name, expected, got, .. } => {
            assert_eq!(name, blocks);
            assert_eq!((expected, got), (vec![4, 64, 2, 16], vec![4, 64, 1, 32]));
        }
        e => panic!("wrong error: {e}"),
    }

    let tmp = copy_fixture("gpt_oss-f32");
    let path = tmp.path().join("model.safetensors");
    let gone = "model.layers.2.self_attn.sinks";
    let tensors: Vec<_> = read_all(&path).into_iter().filter(|t| t.0 != gone).collect();
    write_safetensors(&path, &tensors);
    assert!(matches!(load(tmp.path()), LoadError::MissingTensor { ref name, .. } if name == gone));

    let tmp = copy_fixture("gpt_oss-f32");
    edit_json(&tmp.path().join("config.json"), |c| c["swiglu_limit"] = (-1.0).into());
    cli_fails(tmp.path(), "swiglu_limit");
    let tmp = copy_fixture("gpt_oss-f32");
    edit_json(&tmp.path().join("config.json"), |c| c["rope_parameters"]["truncate"] = "yes".into());
    cli_fails(tmp.path(), "truncate");
}
