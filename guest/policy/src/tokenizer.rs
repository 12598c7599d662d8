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
