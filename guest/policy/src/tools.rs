//! Tool calls in model output, for the template families stllm supports:
//!
//! - **Hermes / Qwen**: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block
//!   per call, possibly after some text (Qwen 2.5 / 3, Hermes 2/3, many fine-tunes).
//! - **Llama 3.x JSON**: the whole reply is a JSON object `{"name": ..., "parameters": {...}}`
//!   (or `"arguments"`), optionally after `<|python_tag|>`, several separated by `;`.
//!
//! While generating, [`ToolScanner`] tells the loop where tool-call markup starts so that text is
//! held back from the stream; at the end [`parse`] turns the held-back text into calls. Text that
//! does not parse as a call is returned as ordinary content.

use serde_json::Value;

/// A parsed tool call: the function's name and its arguments as a JSON object's text.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// Which syntax the model writes tool calls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// `<tool_call>{json}</tool_call>` blocks.
    Hermes,
    /// A bare JSON object (Llama 3.x), possibly after `<|python_tag|>`.
    Json,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";

impl Syntax {
    /// The syntax a chat template teaches its model: Hermes when it mentions `<tool_call>`,
    /// JSON objects otherwise (Llama 3.x's templates describe that format in prose).
    pub fn of_template(source: &str) -> Syntax {
        if source.contains(HERMES_OPEN) {
            Syntax::Hermes
        } else {
            Syntax::Json
        }
    }

    /// Where tool-call markup begins in `text` (the output so far), if it does: text before it
    /// is content. `None` also while the output could still turn into markup only at a later
    /// position (see [`Syntax::holdback`]).
    pub fn start(self, text: &str) -> Option<usize> {
        match self {
            Syntax::Hermes => text.find(HERMES_OPEN),
            Syntax::Json => {
                let t = text.trim_start();
                (t.starts_with('{') || t.starts_with(PYTHON_TAG)).then_some(0)
            }
        }
    }

    /// Bytes at the end of `text` to hold back because they could be the beginning of markup
    /// that the next tokens complete.
    pub fn holdback(self, text: &str) -> usize {
        match self {
            Syntax::Hermes => partial_suffix(text, HERMES_OPEN),
            // Only a reply that starts with markup is a call: hold back leading whitespace and
            // a partial `<|python_tag|>` at the very start.
            Syntax::Json => {
                let t = text.trim_start();
                if t.is_empty() || PYTHON_TAG.starts_with(t) {
                    text.len()
                } else {
                    0
                }
            }
        }
    }
}

/// Length of the longest proper prefix of `marker` that `text` ends with.
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len())
        .rev()
        .find(|&n| {
            n <= text.len() && text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

/// Parse held-back markup into calls. `Err` carries the text back when it is not a well-formed
/// call (the caller then treats it as content).
pub fn parse(syntax: Syntax, markup: &str) -> Result<Vec<ToolCall>, String> {
    let calls = match syntax {
        Syntax::Hermes => parse_hermes(markup),
        Syntax::Json => parse_json(markup),
    };
    match calls {
        Some(c) if !c.is_empty() => Ok(c),
        _ => Err(markup.to_string()),
    }
}

fn parse_hermes(text: &str) -> Option<Vec<ToolCall>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(HERMES_OPEN) {
        if !rest[..i].trim().is_empty() {
            return None;
        }
        let body = &rest[i + HERMES_OPEN.len()..];
        // A reply cut off before its closing tag (max tokens) still counts if its JSON is whole.
        let (json, after) = match body.find(HERMES_CLOSE) {
            Some(j) => (&body[..j], &body[j + HERMES_CLOSE.len()..]),
            None => (body, ""),
        };
        out.push(call_of(&serde_json::from_str::<Value>(json.trim()).ok()?)?);
        rest = after;
    }
    rest.trim().is_empty().then_some(out)
}

fn parse_json(text: &str) -> Option<Vec<ToolCall>> {
    let t = text.trim();
    let t = t.strip_prefix(PYTHON_TAG).unwrap_or(t).trim();
    // One object, an array of objects, or objects separated by ';'.
    if let Ok(v) = serde_json::from_str::<Value>(t) {
        return match v {
            Value::Array(items) => items.iter().map(call_of).collect(),
            v => Some(vec![call_of(&v)?]),
        };
    }
    // Objects separated by ';' (Llama 3.x), else written one after another.
    let parts: Option<Vec<ToolCall>> = t
        .split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| serde_json::from_str::<Value>(p).ok().and_then(|v| call_of(&v)))
        .collect();
    if parts.as_ref().is_some_and(|p| !p.is_empty()) {
        return parts;
    }
    serde_json::Deserializer::from_str(t).into_iter::<Value>().map(|v| v.ok().and_then(|v| call_of(&v))).collect()
}

/// `{"name": ..., "arguments" | "parameters": {...}}` → a call (arguments given as a JSON string
/// are accepted when they hold an object).
fn call_of(v: &Value) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = v.get("arguments").or_else(|| v.get("parameters")).cloned().unwrap_or(Value::Object(Default::default()));
    let args = match args {
        Value::String(s) => match serde_json::from_str::<Value>(&s) {
            Ok(o @ Value::Object(_)) => o,
            _ => return None,
        },
        o @ Value::Object(_) => o,
        _ => return None,
    };
    Some(ToolCall { name, arguments: args.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hermes_calls() {
        let t = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>";
        let c = parse(Syntax::Hermes, t).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].name, "get_weather");
        assert_eq!(c[0].arguments, r#"{"city":"Paris"}"#);
        assert_eq!(c[1].arguments, "{}");
        assert!(parse(Syntax::Hermes, "<tool_call>{not json}</tool_call>").is_err());
        assert!(parse(Syntax::Hermes, "<tool_call>{\"name\": \"f\"}</tool_call> trailing words").is_err());
    }

    #[test]
    fn llama_json_calls() {
        let c = parse(Syntax::Json, "<|python_tag|>{\"name\": \"f\", \"parameters\": {\"x\": 1}}").unwrap();
        assert_eq!(c, vec![ToolCall { name: "f".into(), arguments: r#"{"x":1}"#.into() }]);
        let c = parse(Syntax::Json, "{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"parameters\": {}}")
            .unwrap();
        assert_eq!(c.len(), 2);
        assert!(parse(Syntax::Json, "{\"answer\": 3}").is_err());
    }

    #[test]
    fn markup_start_and_holdback() {
        assert_eq!(Syntax::Hermes.start("Sure. <tool_call>{"), Some(6));
        assert_eq!(Syntax::Hermes.holdback("Sure. <tool_"), 6);
        assert_eq!(Syntax::Hermes.holdback("Sure."), 0);
        assert_eq!(Syntax::Json.start("  {\"name\""), Some(0));
        assert_eq!(Syntax::Json.start("Hello {"), None);
        assert_eq!(Syntax::Json.holdback("<|pyth"), 6);
        assert_eq!(Syntax::Json.holdback("Hi"), 0);
    }
}
