//! A deliberately misbehaving policy for the host's sandbox tests. `generate` with a text prompt
//! of "loop" spins forever, "spin" spins forever calling the host (each call restarts the step
//! clock), "alloc" allocates without bound, "trap" panics (a wasm trap), "sequences" opens
//! sequences until the host refuses one, "misuse" passes the host absurd values, "keep" leaves a
//! sequence in a global past its request and "reuse" decodes on it in the next, "remember:X"
//! keeps X in a global and "recall" answers with what it kept (a leak between requests, when the
//! instance is reused), "log" writes 1 MiB to stderr, "ok" returns at once; `tokenize` echoes the
//! text's bytes as ids. Never ship this.

wit_bindgen::generate!({
    world: "policy-component",
    path: "../../../wit",
});

use exports::stllm::inference::policy::{FinishReason, GenerateRequest, GenerateResult, Guest, Prompt};
use stllm::inference::streaming::Sink;
use stllm::inference::types::Error;

struct Chaos;

std::thread_local! {
    /// What "keep" leaves behind for "reuse".
    static KEPT: std::cell::RefCell<Option<stllm::inference::engine::Sequence>> = const { std::cell::RefCell::new(None) };
    /// What "remember:X" keeps for "recall".
    static SECRET: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

impl Guest for Chaos {
    fn tokenize(text: String, _add_special: bool) -> Result<Vec<u32>, Error> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn detokenize(ids: Vec<u32>, _skip_special: bool) -> Result<String, Error> {
        Ok(ids.iter().map(|&i| char::from_u32(i).unwrap_or('?')).collect())
    }

    fn apply_chat_template(_: String, _: bool, _: Option<String>, _: Option<String>) -> Result<String, Error> {
        Err(Error::InvalidInput("chaos has no template".into()))
    }

    fn generate(req: GenerateRequest, out: &Sink) -> Result<GenerateResult, Error> {
        let what = match &req.prompt {
            Prompt::Text(t) => t.clone(),
            _ => String::new(),
        };
        match what.as_str() {
            "loop" => {
                let mut x: u64 = 1;
                loop {
                    x = std::hint::black_box(x.wrapping_mul(3).wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 16 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "spin" => loop {
                std::hint::black_box(out.cancelled());
            },
            "sequences" => {
                let model = stllm::inference::engine::current_model();
                let mut held = Vec::new();
                loop {
                    match model.new_sequence(0) {
                        Ok(s) => held.push(s),
                        Err(e) => return Err(e),
                    }
                }
            }
            "misuse" => {
                // Out-of-range ids, huge counts and lengths: each must come back as an error.
                let model = stllm::inference::engine::current_model();
                let seq = model.new_sequence(0)?;
                let bad = [
                    seq.decode(&[u32::MAX]).err(),
                    seq.decode_top(&[1], u32::MAX, 2.0).err(),
                    seq.decode_top(&[1], u32::MAX, f32::NAN).err(),
                    seq.truncate(u32::MAX).err(),
                    seq.decode(&[]).err(),
                    model.embed(&[u32::MAX]).err(),
                    model.embed(&vec![1; 1 << 20]).err(),
                    seq.decode_all(&vec![1; 1 << 20]).err(),
                ];
                let refused = bad.iter().filter(|e| e.is_some()).count();
                Err(Error::InvalidInput(format!("misuse: {refused} of {} refused", bad.len())))
            }
            "keep" => {
                let seq = stllm::inference::engine::current_model().new_sequence(0)?;
                seq.decode(&[1, 2, 3])?;
                KEPT.with(|k| *k.borrow_mut() = Some(seq));
                out.emit("kept", &[]);
                Err(Error::InvalidInput("kept a sequence".into()))
            }
            "reuse" => {
                let n = KEPT.with(|k| k.borrow().as_ref().map(|s| s.len()));
                Err(Error::InvalidInput(format!("reused: {n:?}")))
            }
            "trap" => panic!("chaos was asked to trap"),
            "recall" => {
                let kept = SECRET.with(|k| k.borrow().clone());
                Err(Error::InvalidInput(format!("recalled: {kept:?}")))
            }
            "log" => {
                let line = "x".repeat(1023);
                for _ in 0..1024 {
                    eprintln!("{line}");
                }
                Err(Error::InvalidInput("logged 1 MiB".into()))
            }
            w if w.starts_with("remember:") => {
                SECRET.with(|k| *k.borrow_mut() = w["remember:".len()..].to_string());
                Err(Error::InvalidInput("remembered".into()))
            }
            _ => {
                out.emit("ok", &[]);
                Ok(GenerateResult {
                    tokens: vec![],
                    text: "ok".into(),
                    finish: FinishReason::Stop,
                    prompt_tokens: 0,
                    cached_tokens: 0,
                    tool_calls: vec![],
                    logprobs: vec![],
                })
            }
        }
    }
}

export!(Chaos);
