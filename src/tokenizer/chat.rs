//! Chat templates: Hugging Face Jinja templates rendered with minijinja.
//!
//! The environment is set up like transformers' (`trim_blocks`, `lstrip_blocks`,
//! `raise_exception`, a Python-flavoured `tojson`, `strftime_now`) and the Python `str`/`dict`
//! methods templates commonly call (`.strip()`, `.startswith()`, `.items()`, `.get()`, ...) are
//! provided through minijinja's unknown-method hook.

use super::{Result, TokenizerError};
use minijinja::value::{Kwargs, Value, ValueKind};
use super::chat_guard;
use minijinja::machinery;
use minijinja::{Environment, Error, ErrorKind, State};
use std::collections::BTreeMap;

/// One chat turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// Longest template accepted (real ones are a few KiB; a template comes from the model file).
const MAX_TEMPLATE_BYTES: usize = 256 << 10;
/// Instructions a render may execute: real templates need a few thousand per message; the
/// limit ends a looping template (nested `range(100000)`) in well under a second.
const FUEL: u64 = 5_000_000;
/// Bytes of text a render may make (its output and every string, capture and list on the way;
/// see `chat_guard`) beyond [`BYTES_PER_MESSAGE_BYTE`] per byte of the messages: real templates
/// copy each message a few times.
const BASE_BYTES: u64 = 16 << 20;
const BYTES_PER_MESSAGE_BYTE: u64 = 16;
/// Values a render may visit while sizing what it prints and copies (a few per message byte
/// suffice; the bound ends templates that build self-referencing structures).
const WORK: u64 = 20_000_000;

pub(super) fn render(template: &str, messages: &[ChatMessage], add_generation_prompt: bool, bos: &str, eos: &str) -> Result<String> {
    if template.len() > MAX_TEMPLATE_BYTES {
        return Err(TokenizerError::Template(format!("the chat template has {} bytes, more than the {MAX_TEMPLATE_BYTES} accepted", template.len())));
    }
    let mut env = environment();
    env.set_fuel(Some(FUEL));
    let tmpl = env.template_from_str(template).map_err(template_error)?;
    let msgs: Vec<Value> = messages
        .iter()
        .map(|m| {
            let mut map = BTreeMap::new();
            map.insert("role".to_string(), Value::from(m.role.as_str()));
            map.insert("content".to_string(), Value::from(m.content.as_str()));
            Value::from(map)
        })
        .collect();
    let ctx = minijinja::context! {
        messages => msgs,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos,
        eos_token => eos,
    };
    let message_bytes: u64 = messages.iter().map(|m| (m.content.len() + m.role.len()) as u64).sum();
    let budget_bytes = BASE_BYTES.saturating_add(message_bytes.saturating_mul(BYTES_PER_MESSAGE_BYTE));
    // Run the compiled template with every text-making instruction charged (chat_guard).
    let compiled = machinery::get_compiled_template(&tmpl);
    let instructions = chat_guard::guard_instructions(&compiled.instructions).map_err(TokenizerError::Template)?;
    let blocks = compiled.blocks.iter().map(|(name, b)| Ok((*name, chat_guard::guard_instructions(b)?))).collect::<std::result::Result<_, String>>().map_err(TokenizerError::Template)?;
    let budget = chat_guard::Budget::enter(budget_bytes, WORK);
    let mut text = String::new();
    let result = {
        let mut out = machinery::make_string_output(&mut text);
        machinery::Vm::new(&env).eval(&instructions, ctx, &blocks, &mut out, compiled.initial_auto_escape).map(drop)
    };
    let exhausted = budget.exhausted();
    drop(budget);
    match result {
        Ok(()) => Ok(text),
        Err(_) if exhausted == Some(chat_guard::Exhausted::Bytes) => Err(TokenizerError::Template(format!(
            "the chat template made more than {budget_bytes} bytes of text ({BASE_BYTES} plus {BYTES_PER_MESSAGE_BYTE} per byte of the messages): does it double a string in a loop?"
        ))),
        Err(_) if exhausted == Some(chat_guard::Exhausted::Work) => Err(TokenizerError::Template(format!(
            "the chat template walked more than {WORK} values while sizing what it makes: does it build a list that holds itself?"
        ))),
        Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(TokenizerError::Template(format!("the chat template ran more than {FUEL} instructions (a loop that does not end?)"))),
        Err(e) => Err(template_error(e)),
    }
}

fn template_error(e: Error) -> TokenizerError {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    TokenizerError::Template(msg)
}

fn environment<'s>() -> Environment<'s> {
    let mut env = Environment::new();
    chat_guard::install(&mut env);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |fmt: String| -> Value { Value::from(strftime_now(&fmt)) });
    env.add_filter("tojson", tojson);
    env.set_unknown_method_callback(py_method);
    env
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent = match indent.or(kwargs.get::<Option<Value>>("indent")?) {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(usize::try_from(v).map_err(|_| Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an integer"))?),
    };
    let _ = kwargs.get::<Option<Value>>("sort_keys")?; // maps are already ordered by key
    kwargs.assert_all_used()?;
    // The same bound as the builtin filters' widths: a huge indent aborted the process on one
    // allocation (a fuzz finding) before any budget saw it.
    if let Some(n) = indent.filter(|&n| n > MAX_TOJSON_INDENT) {
        return Err(Error::new(ErrorKind::InvalidOperation, format!("tojson: indent {n} is over the {MAX_TOJSON_INDENT} a chat template may pass")));
    }
    // JSON quotes: at most a few bytes per byte shown; then the indentation, which grows with
    // the nesting depth, counted exactly before any of it is made.
    chat_guard::charge(chat_guard::shown_size(value)?.saturating_mul(3))?;
    let json = serde_json::to_value(value).map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    if let Some(n) = indent {
        chat_guard::charge(indentation_bytes(&json, n as u64, 0))?;
    }
    let mut out = String::new();
    py_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

/// Largest `tojson` indent a chat template may ask for.
const MAX_TOJSON_INDENT: usize = 1 << 16;

/// Bytes of newlines and indentation that [`py_json`] writes for `v` at `level` with indent
/// `n` (saturating).
fn indentation_bytes(v: &serde_json::Value, n: u64, level: u64) -> u64 {
    use serde_json::Value as J;
    let line = |level: u64| n.saturating_mul(level).saturating_add(1);
    let children: Box<dyn Iterator<Item = &serde_json::Value>> = match v {
        J::Array(items) if !items.is_empty() => Box::new(items.iter()),
        J::Object(map) if !map.is_empty() => Box::new(map.values()),
        _ => return 0,
    };
    children.fold(line(level), |acc, it| acc.saturating_add(line(level + 1)).saturating_add(indentation_bytes(it, n, level + 1)))
}

fn py_json(v: &serde_json::Value, indent: Option<usize>, level: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    // Python's separators: ", " and ": " without indent, "," and ": " with it.
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, it) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                py_json(it, indent, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, it)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(": ");
                py_json(it, indent, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}

/// The current UTC time formatted with the common strftime codes.
fn strftime_now(fmt: &str) -> String {
    const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    const DAYS: [&str; 7] = ["Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday"];
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let wd = DAYS[days.rem_euclid(7) as usize];
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('-') => match chars.next() {
                Some('d') => out.push_str(&d.to_string()),
                Some('m') => out.push_str(&m.to_string()),
                Some(o) => {
                    out.push_str("%-");
                    out.push(o);
                }
                None => out.push_str("%-"),
            },
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(wd),
            Some('a') => out.push_str(&wd[..3]),
            Some('H') => out.push_str(&format!("{:02}", tod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", tod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some('j') => out.push_str(&format!("{:03}", doy_of(y, m, d))),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

fn doy_of(y: i64, m: i64, d: i64) -> i64 {
    const CUM: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    CUM[(m - 1) as usize] + d + i64::from(leap && m > 2)
}

fn arg_str<'a>(args: &'a [Value], i: usize, method: &str) -> std::result::Result<Option<&'a str>, Error> {
    match args.get(i) {
        None => Ok(None),
        Some(v) if v.is_none() || v.is_undefined() => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| Error::new(ErrorKind::InvalidOperation, format!("{method}: argument {} must be a string", i + 1))),
    }
}

fn arg_int(args: &[Value], i: usize) -> Option<i64> {
    args.get(i).and_then(|v| i64::try_from(v.clone()).ok())
}

/// Python's `str.strip` family: whitespace, or any of the given characters.
fn strip_with<'a>(s: &'a str, chars: Option<&str>, left: bool, right: bool) -> &'a str {
    let pred = |c: char| match chars {
        None => c.is_whitespace(),
        Some(set) => set.contains(c),
    };
    let s = if left { s.trim_start_matches(pred) } else { s };
    if right {
        s.trim_end_matches(pred)
    } else {
        s
    }
}

/// Prefix/suffix tests taking a string or a tuple/list of strings.
fn affix_test(s: &str, arg: Option<&Value>, test: impl Fn(&str, &str) -> bool) -> std::result::Result<bool, Error> {
    let Some(arg) = arg else {
        return Err(Error::new(ErrorKind::MissingArgument, "startswith/endswith need an argument"));
    };
    if let Some(p) = arg.as_str() {
        return Ok(test(s, p));
    }
    if arg.kind() == ValueKind::Seq {
        for p in arg.try_iter()? {
            if p.as_str().is_some_and(|p| test(s, p)) {
                return Ok(true);
            }
        }
        return Ok(false);
    }
    Err(Error::new(ErrorKind::InvalidOperation, "startswith/endswith take a string or a tuple of strings"))
}

fn py_method(state: &State, value: &Value, method: &str, args: &[Value]) -> std::result::Result<Value, Error> {
    if let Some(s) = value.as_str() {
        return str_method(s, method, args);
    }
    match value.kind() {
        ValueKind::Map => match method {
            "items" => state.apply_filter("items", std::slice::from_ref(value)),
            "keys" => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
            "values" => {
                let vals: Vec<Value> = value.try_iter()?.map(|k| value.get_item(&k).unwrap_or_default()).collect();
                Ok(Value::from(vals))
            }
            "get" => {
                let key = args.first().cloned().unwrap_or_default();
                match value.get_item(&key) {
                    Ok(v) if !v.is_undefined() => Ok(v),
                    _ => Ok(args.get(1).cloned().unwrap_or(Value::from(()))),
                }
            }
            _ => Err(Error::from(ErrorKind::UnknownMethod)),
        },
        ValueKind::Seq => match method {
            "count" => {
                let needle = args.first().cloned().unwrap_or_default();
                Ok(Value::from(value.try_iter()?.filter(|v| *v == needle).count()))
            }
            "index" => {
                let needle = args.first().cloned().unwrap_or_default();
                value
                    .try_iter()?
                    .position(|v| v == needle)
                    .map(Value::from)
                    .ok_or_else(|| Error::new(ErrorKind::InvalidOperation, "list.index: value not in list"))
            }
            _ => Err(Error::from(ErrorKind::UnknownMethod)),
        },
        _ => Err(Error::from(ErrorKind::UnknownMethod)),
    }
}

fn str_method(s: &str, method: &str, args: &[Value]) -> std::result::Result<Value, Error> {
    // Charged before the string is made (chat_guard): a copy or case change of `s` is at most
    // three bytes per byte; `replace` and `join` can grow past that.
    let extra = match method {
        "replace" => {
            let from = arg_str(args, 0, method)?.unwrap_or("");
            let to = arg_str(args, 1, method)?.unwrap_or("");
            let hits = if from.is_empty() { s.chars().count() + 1 } else { s.matches(from).count() };
            (hits as u64).saturating_mul(to.len() as u64)
        }
        "join" => match args.first() {
            Some(items) => chat_guard::shown_size(items)?.saturating_add((items.len().unwrap_or(0) as u64).saturating_mul(s.len() as u64)),
            None => 0,
        },
        _ => 0,
    };
    chat_guard::charge((s.len() as u64).saturating_mul(3).saturating_add(extra))?;
    let v = match method {
        "strip" => Value::from(strip_with(s, arg_str(args, 0, method)?, true, true)),
        "lstrip" => Value::from(strip_with(s, arg_str(args, 0, method)?, true, false)),
        "rstrip" => Value::from(strip_with(s, arg_str(args, 0, method)?, false, true)),
        "lower" => Value::from(s.to_lowercase()),
        "upper" => Value::from(s.to_uppercase()),
        "title" => {
            let mut out = String::with_capacity(s.len());
            let mut prev_cased = false;
            for c in s.chars() {
                if prev_cased {
                    out.extend(c.to_lowercase());
                } else {
                    out.extend(c.to_uppercase());
                }
                prev_cased = c.is_alphabetic();
            }
            Value::from(out)
        }
        "capitalize" => {
            let mut cs = s.chars();
            Value::from(match cs.next() {
                Some(f) => f.to_uppercase().chain(cs.flat_map(char::to_lowercase)).collect::<String>(),
                None => String::new(),
            })
        }
        "startswith" => Value::from(affix_test(s, args.first(), |s, p| s.starts_with(p))?),
        "endswith" => Value::from(affix_test(s, args.first(), |s, p| s.ends_with(p))?),
        "split" | "rsplit" => {
            let sep = arg_str(args, 0, method)?;
            let max = arg_int(args, 1).filter(|&m| m >= 0).map(|m| m as usize);
            let parts: Vec<String> = match (sep, max, method) {
                (None, None, _) => s.split_whitespace().map(str::to_string).collect(),
                (None, Some(m), "split") => {
                    let mut parts: Vec<String> = Vec::new();
                    let mut rest = s.trim_start();
                    while !rest.is_empty() {
                        if parts.len() == m {
                            parts.push(rest.to_string());
                            break;
                        }
                        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                        parts.push(rest[..end].to_string());
                        rest = rest[end..].trim_start();
                    }
                    parts
                }
                (None, Some(_), _) => s.split_whitespace().map(str::to_string).collect(),
                (Some(""), _, _) => return Err(Error::new(ErrorKind::InvalidOperation, "split: empty separator")),
                (Some(sep), None, _) => s.split(sep).map(str::to_string).collect(),
                (Some(sep), Some(m), "split") => s.splitn(m + 1, sep).map(str::to_string).collect(),
                (Some(sep), Some(m), _) => {
                    let mut v: Vec<String> = s.rsplitn(m + 1, sep).map(str::to_string).collect();
                    v.reverse();
                    v
                }
            };
            Value::from(parts)
        }
        "splitlines" => Value::from(s.lines().map(str::to_string).collect::<Vec<_>>()),
        "replace" => {
            let (Some(from), Some(to)) = (arg_str(args, 0, method)?, arg_str(args, 1, method)?) else {
                return Err(Error::new(ErrorKind::MissingArgument, "replace needs two arguments"));
            };
            match arg_int(args, 2).filter(|&c| c >= 0) {
                Some(c) => Value::from(s.replacen(from, to, c as usize)),
                None => Value::from(s.replace(from, to)),
            }
        }
        "find" | "rfind" | "index" | "rindex" => {
            let needle = arg_str(args, 0, method)?.unwrap_or("");
            let byte = if method.starts_with('r') { s.rfind(needle) } else { s.find(needle) };
            match byte {
                Some(b) => Value::from(s[..b].chars().count()),
                None if method.ends_with("index") => {
                    return Err(Error::new(ErrorKind::InvalidOperation, "substring not found"))
                }
                None => Value::from(-1),
            }
        }
        "count" => {
            let needle = arg_str(args, 0, method)?.unwrap_or("");
            Value::from(if needle.is_empty() { s.chars().count() + 1 } else { s.matches(needle).count() })
        }
        "join" => {
            let items = args.first().ok_or_else(|| Error::new(ErrorKind::MissingArgument, "join needs an iterable"))?;
            let parts: Vec<String> = items.try_iter()?.map(|v| v.to_string()).collect();
            Value::from(parts.join(s))
        }
        "isdigit" | "isnumeric" | "isdecimal" => Value::from(!s.is_empty() && s.chars().all(|c| c.is_numeric())),
        "isalpha" => Value::from(!s.is_empty() && s.chars().all(char::is_alphabetic)),
        "isalnum" => Value::from(!s.is_empty() && s.chars().all(char::is_alphanumeric)),
        "isspace" => Value::from(!s.is_empty() && s.chars().all(char::is_whitespace)),
        "islower" => Value::from(s.chars().any(char::is_lowercase) && !s.chars().any(char::is_uppercase)),
        "isupper" => Value::from(s.chars().any(char::is_uppercase) && !s.chars().any(char::is_lowercase)),
        _ => return Err(Error::from(ErrorKind::UnknownMethod)),
    };
    Ok(v)
}
