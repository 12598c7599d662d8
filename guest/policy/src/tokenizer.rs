//! HF tokenizers: `tokenizer.json` through the `tokenizers` crate, plus what
//! `tokenizer_config.json` adds (special token strings, the chat template).

use serde_json::Value;

use crate::Error;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// tokenizer_config.json (an empty object when there is none)
    pub config: Value,
}

/// Incremental detokenization state (see [`Tokenizer::decode_step`]).
#[derive(Default)]
pub struct DecodeState {
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
}

impl Tokenizer {
    pub fn new(tokenizer_json: &str, tokenizer_config_json: Option<&str>) -> Result<Tokenizer, Error> {
        let inner = tokenizers::Tokenizer::from_bytes(tokenizer_json.as_bytes())
            .map_err(|e| Error::InvalidInput(format!("tokenizer.json: {e}")))?;
        let config = match tokenizer_config_json {
            Some(s) => {
                serde_json::from_str(s).map_err(|e| Error::InvalidInput(format!("tokenizer_config.json: {e}")))?
            }
            None => Value::Object(Default::default()),
        };
        Ok(Tokenizer { inner, config })
    }

    /// `add_special`: what `add_special_tokens=True` adds (BOS etc., per the post-processor).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, Error> {
        self.inner
            .encode(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::InvalidInput(format!("encode: {e}")))
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, Error> {
        let n = self.inner.get_vocab_size(true) as u32;
        if let Some(bad) = ids.iter().find(|&&i| i >= n && self.inner.id_to_token(i).is_none()) {
            return Err(Error::InvalidInput(format!("token id {bad} is not in the vocabulary of {n}")));
        }
        self.inner.decode(ids, skip_special).map_err(|e| Error::InvalidInput(format!("decode: {e}")))
    }

    /// Feed one id; returns the text it completes (None while a character is incomplete).
    pub fn decode_step(&self, st: &mut DecodeState, id: u32, skip_special: bool) -> Result<Option<String>, Error> {
        tokenizers::tokenizer::step_decode_stream(
            &self.inner,
            vec![id],
            skip_special,
            &mut st.ids,
            &mut st.prefix,
            &mut st.prefix_index,
        )
        .map_err(|e| Error::InvalidInput(format!("decode: {e}")))
    }

    /// The bytes token `id` stands for. Most tokens are whole UTF-8 text and this is their
    /// decoded text; a token that is part of a character (a byte-level BPE token of one or two of
    /// an emoji's four bytes, a SentencePiece byte-fallback `<0xE2>`) decodes to U+FFFD, and its
    /// bytes come from its vocabulary entry instead: through the byte-level alphabet (GPT-2's
    /// byte-to-character table) or the `<0xNN>` spelling. So the bytes of a sequence's tokens,
    /// joined, are its text's bytes (what OpenAI's `logprobs[].bytes` is for).
    pub fn token_bytes(&self, id: u32) -> Result<Vec<u8>, Error> {
        let text = self.decode(&[id], false)?;
        if !text.contains('\u{FFFD}') {
            return Ok(text.into_bytes());
        }
        let Some(raw) = self.inner.id_to_token(id) else { return Ok(text.into_bytes()) };
        if let Some(b) = byte_fallback(&raw) {
            return Ok(vec![b]);
        }
        let table = byte_level_inverse();
        match raw.chars().map(|c| table.get(&c).copied()).collect::<Option<Vec<u8>>>() {
            Some(bytes) => Ok(bytes),
            None => Ok(text.into_bytes()),
        }
    }

    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    /// A special token string of tokenizer_config.json (`bos_token`, ...), which may be written
    /// as a string or as an AddedToken object with `content`.
    pub fn special(&self, key: &str) -> Option<String> {
        match self.config.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
            _ => None,
        }
    }
}

/// `<0xNN>` (SentencePiece's byte-fallback tokens) -> the byte.
fn byte_fallback(tok: &str) -> Option<u8> {
    let hex = tok.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// GPT-2's byte-level alphabet inverted: the printable bytes stand for themselves, the other 68
/// are shifted to U+0100 and up, in byte order.
fn byte_level_inverse() -> &'static std::collections::HashMap<char, u8> {
    static TABLE: std::sync::OnceLock<std::collections::HashMap<char, u8>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        let mut next = 256u32;
        (0..=255u8)
            .map(|b| {
                let c = if printable(b) {
                    char::from(b)
                } else {
                    next += 1;
                    char::from_u32(next - 1).expect("below U+0200")
                };
                (c, b)
            })
            .collect()
    })
}
