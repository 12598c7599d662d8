//! A deliberately misbehaving policy for the host's sandbox tests. `generate` with a text prompt
//! of "loop" spins forever, "alloc" allocates without bound, "trap" panics (a wasm trap),
//! "ok" returns at once; `tokenize` echoes the text's bytes as ids. Never ship this.

wit_bindgen::generate!({
    world: "policy-component",
    path: "../../../wit",
});

use exports::stllm::inference::policy::{FinishReason, GenerateRequest, GenerateResult, Guest, Prompt};
use stllm::inference::streaming::Sink;
use stllm::inference::types::Error;

struct Chaos;

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
            "trap" => panic!("chaos was asked to trap"),
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
