//! Chat templates rendered the way transformers' `apply_chat_template` renders them: Jinja with
//! `trim_blocks`, `lstrip_blocks` and loop controls, Python string methods (minijinja-contrib's
//! pycompat), `raise_exception`, `strftime_now`, and a `tojson` equal to
//! `json.dumps(x, ensure_ascii=False, ...)` (minijinja's own one HTML-escapes).

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde_json::Value as Json;

use crate::tokenizer::Tokenizer;
use crate::Error;

/// A compiled chat template and the special-token variables HF passes along.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Name of the template to use when tools are given (`tool_use`), if the config has one.
    has_tool_template: bool,
    specials: serde_json::Map<String, Json>,
    /// The templates' sources, joined (to tell which tool-call syntax they teach).
    source: String,
}

impl ChatTemplate {
    /// The template of tokenizer_config.json's `chat_template` (a string, or a list of
    /// `{name, template}` where `default` and `tool_use` are used). None if there is none.
    pub fn from_tokenizer(tok: &Tokenizer) -> Result<Option<ChatTemplate>, Error> {
        let mut templates: Vec<(String, String)> = Vec::new();
        match tok.config.get("chat_template") {
            Some(Json::String(s)) => templates.push(("default".into(), s.clone())),
            Some(Json::Array(list)) => {
                for t in list {
                    let name = t.get("name").and_then(Json::as_str);
                    let body = t.get("template").and_then(Json::as_str);
                    if let (Some(n), Some(b)) = (name, body) {
                        templates.push((n.to_string(), b.to_string()));
                    }
                }
            }
            _ => return Ok(None),
        }
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::Internal(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // A template is the model folder's code: bounded in the work it may do (a loop over a
        // huge range ends with a named error, not a hung or killed guest).
        env.set_fuel(Some(MAX_TEMPLATE_FUEL));
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        let mut has_default = false;
        let mut has_tool_template = false;
        let source: String = templates.iter().map(|(_, b)| b.as_str()).collect::<Vec<_>>().join("\n");
        for (name, body) in templates {
            has_default |= name == "default";
            has_tool_template |= name == "tool_use";
            env.add_template_owned(name.clone(), body)
                .map_err(|e| Error::InvalidInput(format!("chat template {name:?}: {e}")))?;
        }
        if !has_default {
            return Err(Error::InvalidInput("chat_template list has no \"default\" template".into()));
        }
        let mut specials = serde_json::Map::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"] {
            if let Some(v) = tok.special(key) {
                specials.insert(key.into(), Json::String(v));
            }
        }
        Ok(Some(ChatTemplate { env, has_tool_template, specials, source }))
    }

    /// The template text (all named templates, joined).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render `messages` (a JSON array). `tools`: a JSON array or none; `extra`: further template
    /// variables (a JSON object), like the keyword arguments of `apply_chat_template`.
    pub fn render(
        &self,
        messages_json: &str,
        add_generation_prompt: bool,
        tools_json: Option<&str>,
        extra_json: Option<&str>,
    ) -> Result<String, Error> {
        let messages: Json = serde_json::from_str(messages_json)
            .map_err(|e| Error::InvalidInput(format!("messages are not valid JSON: {e}")))?;
        if !messages.is_array() {
            return Err(Error::InvalidInput("messages must be a JSON array".into()));
        }
        let mut ctx = self.specials.clone();
        if let Some(extra) = extra_json {
            match serde_json::from_str::<Json>(extra) {
                Ok(Json::Object(m)) => ctx.extend(m),
                _ => return Err(Error::InvalidInput("template variables must be a JSON object".into())),
            }
        }
        ctx.insert("messages".into(), messages);
        ctx.insert("add_generation_prompt".into(), Json::Bool(add_generation_prompt));
        let mut name = "default";
        if let Some(t) = tools_json {
            let tools: Json =
                serde_json::from_str(t).map_err(|e| Error::InvalidInput(format!("tools are not valid JSON: {e}")))?;
            ctx.insert("tools".into(), tools);
            if self.has_tool_template {
                name = "tool_use";
            }
        }
        let tmpl = self.env.get_template(name).map_err(|e| Error::Internal(e.to_string()))?;
        let mut out = Capped { buf: Vec::new(), max: MAX_RENDERED };
        match tmpl.render_captured_to(Value::from(minijinja::value::Serde(&Json::Object(ctx))), &mut out) {
            Ok(_) => String::from_utf8(out.buf).map_err(|e| Error::Internal(format!("chat template output: {e}"))),
            Err(_) if out.buf.len() >= out.max => Err(Error::InvalidInput(format!(
                "chat template: the rendered prompt exceeds {} MiB",
                MAX_RENDERED >> 20
            ))),
            Err(e) => Err(Error::InvalidInput(format!("chat template: {}", render_error(&e)))),
        }
    }
}

/// Most text a chat template may render (far beyond any context a model takes).
pub const MAX_RENDERED: usize = 64 << 20;
/// The work a rendering may do, in minijinja's instructions.
pub const MAX_TEMPLATE_FUEL: u64 = 200_000_000;
/// Largest `tojson` indent.
const MAX_INDENT: usize = 64;

/// A writer that refuses past `max` bytes.
struct Capped {
    buf: Vec<u8>,
    max: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > self.max {
            self.buf.extend_from_slice(&b[..self.max - self.buf.len()]);
            return Err(std::io::Error::other("the rendered prompt is too long"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn render_error(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(&format!(": {inner}"));
        src = inner.source();
    }
    s
}

/// Python's `json.dumps` separators when `indent` is None: ", " and ": ".
struct PySep;

impl serde_json::ser::Formatter for PySep {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent, separators=..., sort_keys=...)`.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let bad = |e: serde_json::Error| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}"));
    let mut v: Json = serde_json::to_value(value).map_err(bad)?;
    if sort == Some(true) {
        v = sort_keys(v);
    }
    let indent = indent.and_then(|i| i.as_usize());
    if let Some(n) = indent.filter(|&n| n > MAX_INDENT) {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: indent {n} is beyond {MAX_INDENT}"),
        ));
    }
    let mut buf = Vec::new();
    match (indent, separators) {
        (Some(n), _) => {
            let pad = " ".repeat(n);
            let fmt = serde_json::ser::PrettyFormatter::with_indent(pad.as_bytes());
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
            serde::Serialize::serialize(&v, &mut ser).map_err(bad)?;
        }
        (None, Some(sep)) if sep.len() == Some(2) => {
            let item = sep.get_item(&Value::from(0)).map(|s| s.to_string()).unwrap_or_default();
            let key = sep.get_item(&Value::from(1)).map(|s| s.to_string()).unwrap_or_default();
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, CustomSep { item, key });
            serde::Serialize::serialize(&v, &mut ser).map_err(bad)?;
        }
        _ => {
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, PySep);
            serde::Serialize::serialize(&v, &mut ser).map_err(bad)?;
        }
    }
    Ok(Value::from_safe_string(String::from_utf8(buf).unwrap_or_default()))
}

struct CustomSep {
    item: String,
    key: String,
}

impl serde_json::ser::Formatter for CustomSep {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(self.item.as_bytes())
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(self.item.as_bytes())
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(self.key.as_bytes())
    }
}

fn sort_keys(v: Json) -> Json {
    match v {
        Json::Object(m) => {
            let mut entries: Vec<(String, Json)> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Json::Object(entries.into_iter().map(|(k, v)| (k, sort_keys(v))).collect())
        }
        Json::Array(a) => Json::Array(a.into_iter().map(sort_keys).collect()),
        other => other,
    }
}

fn raise_exception(msg: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(fmt)`: the current UTC date and time with the strftime codes templates use.
fn strftime_now(fmt: String) -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime(&fmt, secs)
}

/// Format a Unix time (UTC) with a subset of strftime: %Y %y %m %d %e %b %B %a %A %H %I %M %S %p %j %%.
pub fn strftime(fmt: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let (h, mi, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let d = doy_mar - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + if leap && m > 2 { 1 } else { 0 };
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out += &y.to_string(),
            Some('y') => out += &format!("{:02}", y % 100),
            Some('m') => out += &format!("{m:02}"),
            Some('d') => out += &format!("{d:02}"),
            Some('e') => out += &format!("{d:>2}"),
            Some('b') => out += &MONTHS[(m - 1) as usize][..3],
            Some('B') => out += MONTHS[(m - 1) as usize],
            Some('a') => out += &DAYS[weekday][..3],
            Some('A') => out += DAYS[weekday],
            Some('H') => out += &format!("{h:02}"),
            Some('I') => out += &format!("{:02}", if h % 12 == 0 { 12 } else { h % 12 }),
            Some('M') => out += &format!("{mi:02}"),
            Some('S') => out += &format!("{s:02}"),
            Some('p') => out += if h < 12 { "AM" } else { "PM" },
            Some('j') => out += &format!("{yday:03}"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}
