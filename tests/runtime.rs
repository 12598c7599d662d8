//! Contract tests: the real guest components (built by build.rs) against the host, on the tiny
//! fixtures (which ship a small tokenizer and chat template): generation through the WIT boundary
//! equals HF's greedy tokens and the native loop; streaming, stop strings and cancellation; the
//! sandbox (a guest that loops, one that allocates without bound, one that traps) ends only its
//! own request; sampler plug-ins.

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{fixture, temp_file, Expected};
use stllm::runtime::{
    FinishReason, GenerateRequest, Isolation, ModelHandle, Prompt, Runtime, RuntimeConfig, RuntimeError, Sampling,
    CHAOS_POLICY, MIROSTAT_SAMPLER,
};
use stllm::{Model, ModelOptions, Session, SessionOptions};

fn model(name: &str) -> Arc<Model> {
    Arc::new(Model::load(&fixture(name), &ModelOptions { threads: 2, ..Default::default() }).unwrap())
}

fn runtime(name: &str, cfg: RuntimeConfig) -> Runtime {
    let handle = ModelHandle::from_dir(&fixture(name), Some(model(name))).unwrap();
    Runtime::new(Arc::new(handle), cfg).unwrap()
}

fn greedy() -> Sampling {
    Sampling::default()
}

fn request(prompt: Prompt, max_tokens: u32, sampling: Sampling) -> GenerateRequest {
    GenerateRequest {
        prompt,
        tools_json: None,
        max_tokens,
        stop: vec![],
        ignore_eos: true,
        sampling,
        adapters: None,
        logprobs: None,
        parse_tool_calls: false,
    }
}

fn no_cancel() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

#[test]
fn guest_generation_equals_hf_greedy_tokens() {
    let trt = tokio::runtime::Runtime::new().unwrap();
    for name in ["llama-f32", "qwen2-bf16", "qwen3-f32-sharded"] {
        let exp = Expected::load(&fixture(name));
        let rt = runtime(name, RuntimeConfig::default());
        let req = request(Prompt::Tokens(exp.ids("tokens")), 8, greedy());
        let r = trt.block_on(rt.generate(&req, |_, _| true, no_cancel())).unwrap();
        assert_eq!(r.tokens, exp.ids("greedy"), "{name}");
        assert_eq!(r.finish, FinishReason::Length);
        assert_eq!(r.prompt_tokens as usize, exp.ids("tokens").len());
    }
}

struct Collect(String);

impl stllm_policy::generate::Sink for Collect {
    fn emit(&mut self, text: &str, _: &[u32]) -> bool {
        self.0.push_str(text);
        true
    }
}

#[test]
fn wasm_and_native_policies_agree() {
    let name = "llama-f32";
    let m = model(name);
    let handle = ModelHandle::from_dir(&fixture(name), Some(m.clone())).unwrap();
    let rt = Runtime::new(Arc::new(handle), RuntimeConfig::default()).unwrap();
    let trt = tokio::runtime::Runtime::new().unwrap();
    let sampling = Sampling {
        temperature: 0.9,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.02,
        repetition_penalty: 1.1,
        seed: 5,
        ..greedy()
    };
    let req = request(Prompt::Text("Hello world! The quick brown fox".into()), 24, sampling);
    let streamed = Arc::new(Mutex::new(String::new()));
    let s2 = streamed.clone();
    let wasm = trt
        .block_on(rt.generate(
            &req,
            move |t, _| {
                s2.lock().unwrap().push_str(t);
                true
            },
            no_cancel(),
        ))
        .unwrap();
    assert_eq!(*streamed.lock().unwrap(), wasm.text, "the stream adds up to the result");

    let dir = fixture(name);
    let tok = stllm_policy::tokenizer::Tokenizer::new(
        &std::fs::read_to_string(dir.join("tokenizer.json")).unwrap(),
        Some(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()),
    )
    .unwrap();
    let prompt = tok.encode("Hello world! The quick brown fox", true).unwrap();
    let mut sess = Session::new(m.clone(), &SessionOptions { n_ctx: Some(64), ..Default::default() }).unwrap();
    let native_req = stllm_policy::generate::Request {
        max_tokens: 24,
        stop: vec![],
        ignore_eos: true,
        sampling: stllm_policy::sampling::SamplingParams {
            temperature: 0.9,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.02,
            repetition_penalty: 1.1,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 5,
        },
        ..Default::default()
    };
    let mut sink = Collect(String::new());
    let native =
        stllm_policy::generate::generate(&tok, &mut sess, &prompt, &native_req, &[2], &mut sink, None).unwrap();
    assert_eq!(native.tokens, wasm.tokens);
    assert_eq!(native.text, wasm.text);
    assert_eq!(wasm.tokens.len(), 24);
}

#[test]
fn chat_prompts_stop_strings_and_eos() {
    let rt = runtime("qwen3-bf16", RuntimeConfig::default());
    let trt = tokio::runtime::Runtime::new().unwrap();
    let chat = Prompt::Chat(r#"[{"role":"user","content":"What is the capital of France?"}]"#.into());
    let full = trt.block_on(rt.generate(&request(chat.clone(), 20, greedy()), |_, _| true, no_cancel())).unwrap();
    assert!(full.prompt_tokens > 5);
    // Stop at a string taken from the middle of the greedy output: the result ends right before it.
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() >= 6, "greedy text too short to cut: {:?}", full.text);
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let mut req = request(chat, 20, greedy());
    req.stop = vec![stop.clone()];
    let streamed = Arc::new(Mutex::new(String::new()));
    let s2 = streamed.clone();
    let cut = trt
        .block_on(rt.generate(
            &req,
            move |t, _| {
                s2.lock().unwrap().push_str(t);
                true
            },
            no_cancel(),
        ))
        .unwrap();
    assert_eq!(cut.finish, FinishReason::Stop);
    let at = full.text.find(&stop).unwrap();
    assert_eq!(cut.text, full.text[..at], "stop string {stop:?}");
    assert_eq!(*streamed.lock().unwrap(), cut.text, "nothing past the stop string was streamed");
}

#[test]
fn cancel_mid_generation_then_go_on() {
    let rt = runtime("llama-f32", RuntimeConfig::default());
    let trt = tokio::runtime::Runtime::new().unwrap();
    let req = request(Prompt::Text("Hello".into()), 40, greedy());
    let mut n = 0;
    let e = trt
        .block_on(rt.generate(
            &req,
            move |_, _| {
                n += 1;
                n < 3
            },
            no_cancel(),
        ))
        .unwrap_err();
    assert!(matches!(e, RuntimeError::Cancelled), "{e}");
    let ok = trt.block_on(rt.generate(&req, |_, _| true, no_cancel())).unwrap();
    assert_eq!(ok.tokens.len(), 40);
}

#[test]
fn sandbox_ends_only_the_misbehaving_request() {
    let (_d, chaos) = temp_file(CHAOS_POLICY, "chaos.wasm");
    let cfg = RuntimeConfig {
        policy: Some(chaos),
        memory_limit: 64 << 20,
        step_timeout: Duration::from_millis(300),
        // Reused instances: what a guest keeps past its request is what this test is about.
        isolation: Some(Isolation::Pooled),
        ..RuntimeConfig::default()
    };
    let rt = runtime("llama-f32", cfg);
    let trt = tokio::runtime::Runtime::new().unwrap();
    let run = |what: &str| {
        trt.block_on(rt.generate(&request(Prompt::Text(what.into()), 4, greedy()), |_, _| true, no_cancel()))
    };
    assert_eq!(run("ok").unwrap().text, "ok");
    let e = run("loop").unwrap_err();
    assert!(matches!(e, RuntimeError::Timeout { .. }), "{e}");
    assert_eq!(run("ok").unwrap().text, "ok", "the next request works after a timeout");
    let e = run("alloc").unwrap_err();
    assert!(matches!(e, RuntimeError::OutOfMemory { limit_mib: 64, .. }), "{e}");
    assert_eq!(run("ok").unwrap().text, "ok", "the next request works after running out of memory");
    let e = run("trap").unwrap_err();
    assert!(matches!(e, RuntimeError::Trap { .. }), "{e}");
    assert!(e.to_string().contains("unreachable"), "{e}");
    assert_eq!(run("ok").unwrap().text, "ok", "the next request works after a trap");
    // Every misuse of the contract comes back as an error the guest sees.
    let e = run("misuse").unwrap_err().to_string();
    assert!(e.contains("misuse: 8 of 8 refused"), "{e}");
    // Opening sequences until refused: the request ends with the refusal, its sequences are
    // closed, and the next request works.
    let e = run("sequences").unwrap_err();
    assert!(matches!(e, RuntimeError::Guest { .. }), "{e}");
    assert_eq!(run("ok").unwrap().text, "ok", "the next request works after hoarding sequences");
    let engine = rt.handle().engine().unwrap().clone();
    assert!(engine.wait_idle(Duration::from_secs(5)));
    assert_eq!(engine.stats().sequences, 0, "the hoarded sequences were closed");
    // A sequence kept in the guest's globals past its request is closed when the request ends
    // (no pinned cells, no context carried over); using it later traps that guest only.
    let e = run("keep").unwrap_err().to_string();
    assert!(e.contains("kept a sequence"), "{e}");
    assert!(engine.wait_idle(Duration::from_secs(5)));
    assert_eq!(engine.stats().sequences, 0, "the kept sequence was closed");
    let e = run("reuse").unwrap_err();
    assert!(matches!(e, RuntimeError::Trap { .. }), "{e}");
    assert_eq!(run("ok").unwrap().text, "ok", "the next request works");
}

#[test]
fn zero_max_tokens_generates_nothing() {
    // No tokens asked: the prompt is not run ahead by the host, the result is empty.
    let rt = runtime("llama-f32", RuntimeConfig::default());
    let trt = tokio::runtime::Runtime::new().unwrap();
    let r = trt
        .block_on(rt.generate(&request(Prompt::Text("Hello".into()), 0, greedy()), |_, _| true, no_cancel()))
        .unwrap();
    assert!(r.tokens.is_empty() && r.text.is_empty());
    assert_eq!(r.finish, FinishReason::Length);
}

#[test]
fn per_request_instances_keep_nothing_from_one_request_to_the_next() {
    // What one user's request leaves in a guest's globals must not reach the next user's:
    // a component given by path gets a fresh instance per request unless pooling is asked for
    // (the embedded policy, whose only global state is its parsed tokenizer, is pooled).
    assert_eq!(RuntimeConfig::default().isolation(), Isolation::Pooled);
    let (_d, chaos) = temp_file(CHAOS_POLICY, "chaos.wasm");
    let trt = tokio::runtime::Runtime::new().unwrap();
    for (isolation, leaks) in [(None, false), (Some(Isolation::PerRequest), false), (Some(Isolation::Pooled), true)] {
        let cfg = RuntimeConfig { policy: Some(chaos.clone()), isolation, pool_size: 1, ..RuntimeConfig::default() };
        assert_eq!(cfg.isolation() == Isolation::Pooled, leaks);
        let rt = runtime("llama-f32", cfg);
        assert_eq!(trt.block_on(rt.prewarm(1)).unwrap(), 1);
        let run = |what: &str| {
            trt.block_on(rt.generate(&request(Prompt::Text(what.into()), 4, greedy()), |_, _| true, no_cancel()))
        };
        let e = run("remember:alice's secret").unwrap_err().to_string();
        assert!(e.contains("remembered"), "{e}");
        let e = run("recall").unwrap_err().to_string();
        assert_eq!(e.contains("alice's secret"), leaks, "{isolation:?}: {e}");
        // A guest printing 1 MiB ends its request as it meant to (its output goes to tracing,
        // capped per request, never blocking it) and the next request works.
        let e = run("log").unwrap_err().to_string();
        assert!(e.contains("logged 1 MiB"), "{e}");
        assert_eq!(run("ok").unwrap().text, "ok");
    }
}

#[test]
fn spare_instances_are_made_ahead_of_demand_within_the_pool_size() {
    // `spare`: a request that takes an instance leaves the pool short, and ready ones are made
    // in the background; the pool never holds more than its size.
    let trt = tokio::runtime::Runtime::new().unwrap();
    let wait_idle = |rt: &Runtime, want: usize| {
        let t0 = std::time::Instant::now();
        while rt.idle_instances() < want && t0.elapsed() < Duration::from_secs(120) {
            trt.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
        }
        rt.idle_instances()
    };
    for (pool_size, spare) in [(3, 2), (2, 5), (4, 0)] {
        let rt = runtime("llama-f32", RuntimeConfig { pool_size, spare, ..RuntimeConfig::default() });
        assert_eq!(rt.idle_instances(), 0, "nothing is made before it is needed");
        let req = request(Prompt::Text("Hello".into()), 2, greedy());
        trt.block_on(rt.generate(&req, |_, _| true, no_cancel())).unwrap();
        // The request's own instance came back, and `spare` more were made meanwhile.
        let want = (1 + spare).min(pool_size);
        assert_eq!(wait_idle(&rt, want), want, "pool {pool_size}, spare {spare}");
        // Concurrent requests take what is ready; afterwards the pool is full but not over.
        let reqs: Vec<_> = (0..pool_size + 1).map(|_| rt.generate(&req, |_, _| true, no_cancel())).collect();
        for r in trt.block_on(futures_util::future::join_all(reqs)) {
            r.unwrap();
        }
        trt.block_on(async { tokio::time::sleep(Duration::from_millis(200)).await });
        let idle = wait_idle(&rt, want);
        assert!((want..=pool_size).contains(&idle), "pool {pool_size}, spare {spare}: {idle} idle");
    }
    // Prewarming makes as many as asked (side by side), within the pool's size.
    let rt = runtime("llama-f32", RuntimeConfig { pool_size: 3, ..RuntimeConfig::default() });
    assert_eq!(trt.block_on(rt.prewarm(5)).unwrap(), 3);
    assert_eq!(trt.block_on(rt.prewarm(2)).unwrap(), 3, "a full pool makes no more");
}

#[test]
fn a_request_has_a_budget_that_host_calls_do_not_renew() {
    // A guest spinning on cheap host calls restarts the step clock at every call; its fuel for
    // the request runs out all the same.
    let (_d, chaos) = temp_file(CHAOS_POLICY, "chaos.wasm");
    let cfg = RuntimeConfig { policy: Some(chaos), request_fuel: 100_000_000, ..RuntimeConfig::default() };
    let rt = runtime("llama-f32", cfg);
    let trt = tokio::runtime::Runtime::new().unwrap();
    let run = |what: &str| {
        trt.block_on(rt.generate(&request(Prompt::Text(what.into()), 4, greedy()), |_, _| true, no_cancel()))
    };
    let e = run("spin").unwrap_err();
    assert!(matches!(e, RuntimeError::OutOfFuel { fuel: 100_000_000, .. }), "{e}");
    assert!(e.to_string().contains("budget"), "{e}");
    assert_eq!(run("ok").unwrap().text, "ok", "the next request gets a fresh budget");
    assert_eq!(run("ok").unwrap().text, "ok");
}

#[test]
fn sampler_plugin_and_bad_components() {
    let (_d, miro) = temp_file(MIROSTAT_SAMPLER, "mirostat.wasm");
    let rt = runtime("llama-f32", RuntimeConfig { sampler: Some(miro.clone()), ..RuntimeConfig::default() });
    let trt = tokio::runtime::Runtime::new().unwrap();
    let r = trt
        .block_on(rt.generate(&request(Prompt::Text("The fox".into()), 12, greedy()), |_, _| true, no_cancel()))
        .unwrap();
    assert_eq!(r.tokens.len(), 12);
    assert!(r.tokens.iter().all(|&t| t < 384));

    // A sampler given as the policy, a policy given as the sampler, and garbage: clear load errors.
    let handle = || Arc::new(ModelHandle::from_dir(&fixture("llama-f32"), None).unwrap());
    let e = Runtime::new(handle(), RuntimeConfig { policy: Some(miro.clone()), ..Default::default() }).err().unwrap();
    assert!(e.to_string().contains("mirostat.wasm"), "{e}");
    let (_g, garbage) = temp_file(b"\0asm garbage", "garbage.wasm");
    let e = Runtime::new(handle(), RuntimeConfig { sampler: Some(garbage), ..Default::default() }).err().unwrap();
    assert!(matches!(e, RuntimeError::Load { ref path, .. } if path.ends_with("garbage.wasm")), "{e}");
    let e = Runtime::new(handle(), RuntimeConfig { policy: Some("/nonexistent/p.wasm".into()), ..Default::default() })
        .err()
        .unwrap();
    assert!(e.to_string().contains("/nonexistent/p.wasm"), "{e}");
}

#[test]
fn engine_errors_reach_the_guest_as_errors() {
    let rt = runtime("llama-f32", RuntimeConfig::default());
    let trt = tokio::runtime::Runtime::new().unwrap();
    let e = trt
        .block_on(rt.generate(&request(Prompt::Tokens(vec![1, 99999]), 4, greedy()), |_, _| true, no_cancel()))
        .unwrap_err();
    assert!(e.to_string().contains("token id 99999 is out of range"), "{e}");
    let e =
        trt.block_on(rt.generate(&request(Prompt::Tokens(vec![]), 4, greedy()), |_, _| true, no_cancel())).unwrap_err();
    assert!(e.to_string().contains("empty prompt"), "{e}");
    let mut bad = request(Prompt::Text("hi".into()), 4, greedy());
    bad.sampling.top_p = 0.0;
    let e = trt.block_on(rt.generate(&bad, |_, _| true, no_cancel())).unwrap_err();
    assert!(e.to_string().contains("top_p"), "{e}");
    // The runtime is fine afterwards.
    assert_eq!(
        trt.block_on(rt.generate(&request(Prompt::Text("hi".into()), 3, greedy()), |_, _| true, no_cancel()))
            .unwrap()
            .tokens
            .len(),
        3
    );
}

#[test]
fn concurrent_requests_on_one_runtime() {
    let rt = Arc::new(runtime("qwen2-f32", RuntimeConfig::default()));
    let trt = tokio::runtime::Runtime::new().unwrap();
    let exp = Expected::load(&fixture("qwen2-f32"));
    let want = exp.ids("greedy");
    let results = trt.block_on(async {
        let mut handles = Vec::new();
        for _ in 0..6 {
            let rt = rt.clone();
            let prompt = exp.ids("tokens");
            handles.push(tokio::spawn(async move {
                rt.generate(&request(Prompt::Tokens(prompt), 8, greedy()), |_, _| true, no_cancel()).await
            }));
        }
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap().unwrap().tokens);
        }
        out
    });
    for r in results {
        assert_eq!(r, want);
    }
}

/// Per-request LoRA adapters through the WIT boundary: the policy passes the request's list to
/// `new-sequence-with`; the guest's tokens equal the PEFT-merged model's greedy tokens; `none`
/// keeps the host's default (here the base), and a name that is not loaded is the guest's
/// invalid input.
#[test]
fn per_request_adapters_through_the_guest() {
    let trt = tokio::runtime::Runtime::new().unwrap();
    let m = model("llama-f32");
    let dir = fixture("lora").join("llama-a");
    m.load_adapter("a", &dir).unwrap();
    let rt = Runtime::new(
        Arc::new(ModelHandle::from_dir(&fixture("llama-f32"), Some(m)).unwrap()),
        RuntimeConfig::default(),
    )
    .unwrap();
    let exp = Expected::load(&dir);
    let base = Expected::load(&fixture("llama-f32"));
    let with = |adapters| GenerateRequest { adapters, ..request(Prompt::Tokens(exp.ids("tokens")), 8, greedy()) };
    let adapter = |name: &str, weight| stllm::runtime::Adapter { name: name.into(), weight };
    let r = trt.block_on(rt.generate(&with(Some(vec![adapter("a", 1.0)])), |_, _| true, no_cancel())).unwrap();
    assert_eq!(r.tokens, exp.ids("greedy"), "with the adapter");
    let r = trt.block_on(rt.generate(&with(None), |_, _| true, no_cancel())).unwrap();
    assert_eq!(r.tokens, base.ids("greedy"), "the default: the base model");
    let r = trt.block_on(rt.generate(&with(Some(vec![])), |_, _| true, no_cancel())).unwrap();
    assert_eq!(r.tokens, base.ids("greedy"), "an empty list: the base model");
    let e = trt.block_on(rt.generate(&with(Some(vec![adapter("nope", 1.0)])), |_, _| true, no_cancel())).unwrap_err();
    assert!(e.to_string().contains("no LoRA adapter named \"nope\""), "{e}");
    // The runtime goes on.
    let r = trt.block_on(rt.generate(&with(Some(vec![adapter("a", 1.0)])), |_, _| true, no_cancel())).unwrap();
    assert_eq!(r.tokens, exp.ids("greedy"));
}
