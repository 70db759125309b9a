//! Bounds on what a chat template may build while it renders.
//!
//! minijinja's fuel counts instructions, not bytes: `{% set ns.s = ns.s ~ ns.s %}` in a loop of
//! forty doubles a string to a terabyte in forty instructions, and no output limit sees it, as
//! the string is never written. So the compiled template is rewritten before it runs: every
//! instruction that can make text or a sequence (`~`, `+`, `*`, list literals, literal text, which
//! is turned into an `{{ }}` output) becomes a call to a function here that first charges the
//! size of what it is about to make against the render's byte budget, and fails once the budget
//! is spent. Outputs (including those captured by `{% set %}` blocks and macros), the
//! string-making filters and the Python string methods are charged the same way. Every byte a
//! render allocates for text is charged once, so its memory stays below the budget.
//!
//! Sizes of nested values are estimated by walking them, which itself costs "work" from a second
//! budget, so that a structure built to be expensive to walk (a list holding itself twice, forty
//! times over) ends with an error instead of a hang.

use minijinja::machinery::{Instruction, Instructions};
use minijinja::value::{Rest, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};
use std::cell::Cell;

/// Which of the two budgets ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Exhausted {
    Bytes,
    Work,
}

thread_local! {
    /// Bytes and work units the render on this thread may still spend; unlimited outside one.
    static LEFT: Cell<(u64, u64)> = const { Cell::new((u64::MAX, u64::MAX)) };
    static TRIPPED: Cell<Option<Exhausted>> = const { Cell::new(None) };
}

/// The budgets of one render on this thread, lifted again when dropped.
pub(super) struct Budget(());

impl Budget {
    pub(super) fn enter(bytes: u64, work: u64) -> Budget {
        LEFT.with(|l| l.set((bytes, work)));
        TRIPPED.with(|t| t.set(None));
        Budget(())
    }

    /// Which budget a failed render ran out of, if any.
    pub(super) fn exhausted(&self) -> Option<Exhausted> {
        TRIPPED.with(Cell::get)
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        LEFT.with(|l| l.set((u64::MAX, u64::MAX)));
    }
}

fn trip(which: Exhausted) -> Error {
    TRIPPED.with(|t| t.set(Some(which)));
    Error::new(ErrorKind::InvalidOperation, "the chat template's size limit was reached")
}

/// Spends `n` bytes of the byte budget.
pub(super) fn charge(n: u64) -> Result<(), Error> {
    LEFT.with(|l| {
        let (bytes, work) = l.get();
        match bytes.checked_sub(n) {
            Some(b) => {
                l.set((b, work));
                Ok(())
            }
            None => Err(trip(Exhausted::Bytes)),
        }
    })
}

fn spend_work(n: u64) -> Result<(), Error> {
    LEFT.with(|l| {
        let (bytes, work) = l.get();
        match work.checked_sub(n) {
            Some(w) => {
                l.set((bytes, w));
                Ok(())
            }
            None => Err(trip(Exhausted::Work)),
        }
    })
}

fn bytes_left() -> u64 {
    LEFT.with(|l| l.get().0)
}

/// Fails when making `n` more bytes would pass the budget, without spending it (for values that
/// only refer to existing text).
fn check(n: u64) -> Result<(), Error> {
    if n > bytes_left() {
        return Err(trip(Exhausted::Bytes));
    }
    Ok(())
}

/// An upper bound on the bytes `v` shows as when printed (a top-level string exactly; strings
/// inside containers are quoted and escaped, up to six bytes per byte). The walk stops once the
/// bound passes the bytes left, and each value visited costs one unit of work.
pub(super) fn shown_size(v: &Value) -> Result<u64, Error> {
    if let Some(s) = v.as_str() {
        spend_work(1)?;
        return Ok(s.len() as u64);
    }
    let limit = bytes_left();
    let mut total = 0u64;
    let mut stack = vec![v.clone()];
    while let Some(v) = stack.pop() {
        spend_work(1)?;
        total = total.saturating_add(match v.kind() {
            ValueKind::Undefined => 0,
            ValueKind::String => v.as_str().map_or(0, |s| 6 * s.len() as u64 + 2),
            ValueKind::Bytes => v.as_bytes().map_or(0, |b| 6 * b.len() as u64 + 4),
            ValueKind::Seq | ValueKind::Iterable | ValueKind::Map => {
                let is_map = v.kind() == ValueKind::Map;
                if let Ok(items) = v.try_iter() {
                    for item in items {
                        if is_map {
                            stack.push(v.get_item(&item).unwrap_or_default());
                        }
                        stack.push(item);
                        // Each item shows with at least a separator; stop as soon as that is too much.
                        total = total.saturating_add(4);
                        if total > limit {
                            return Ok(total);
                        }
                        spend_work(1)?;
                    }
                }
                2
            }
            // Numbers, booleans, none and opaque objects (macros, functions) print short.
            _ => 64,
        });
        if total > limit {
            return Ok(total);
        }
    }
    Ok(total)
}

// Names of the functions the rewritten instructions call; a template cannot spell them (they are
// not identifiers), so it cannot call them itself.
const CONCAT: &str = "ember:concat";
const ADD: &str = "ember:add";
const MUL: &str = "ember:mul";
const LIST: &str = "ember:list";

/// Rewrites compiled instructions so that everything that makes text or sequences is charged
/// (see the module documentation). Jump targets move with the instructions.
///
/// Constants that hold lazy sequences are made into lists, or refused ([`settle_constant`]).
pub(super) fn guard_instructions<'s>(old: &Instructions<'s>) -> Result<Instructions<'s>, String> {
    let n = old.len();
    // New index of each old instruction: literal text becomes two instructions.
    let mut at = Vec::with_capacity(n + 1);
    let mut next = 0u32;
    for i in 0..n {
        at.push(next);
        next += if matches!(old.get(i as u32), Some(Instruction::EmitRaw(_))) { 2 } else { 1 };
    }
    at.push(next);
    let to = |t: u32| at.get(t as usize).copied().unwrap_or(next);
    let mut out = Instructions::new(old.name(), old.source());
    for i in 0..n as u32 {
        let Some(ins) = old.get(i) else { break };
        let line = old.get_line(i);
        let mut push = |ins: Instruction<'s>| match line {
            Some(l) => out.add_with_line(ins, l.min(u16::MAX as usize) as u16),
            None => out.add(ins),
        };
        match ins.clone() {
            Instruction::EmitRaw(s) => {
                // Through the formatter, which charges it; safe, so that auto-escaping (which
                // never applies to template text) leaves it alone.
                push(Instruction::LoadConst(Value::from_safe_string(s.to_string())));
                push(Instruction::Emit);
            }
            Instruction::StringConcat => drop(push(Instruction::CallFunction(CONCAT, Some(2)))),
            Instruction::Add => drop(push(Instruction::CallFunction(ADD, Some(2)))),
            Instruction::Mul => drop(push(Instruction::CallFunction(MUL, Some(2)))),
            Instruction::BuildList(Some(k)) => match u16::try_from(k) {
                Ok(k) => drop(push(Instruction::CallFunction(LIST, Some(k)))),
                Err(_) => drop(push(Instruction::BuildList(Some(k)))),
            },
            Instruction::Jump(t) => drop(push(Instruction::Jump(to(t)))),
            Instruction::JumpIfFalse(t) => drop(push(Instruction::JumpIfFalse(to(t)))),
            Instruction::JumpIfFalseOrPop(t) => drop(push(Instruction::JumpIfFalseOrPop(to(t)))),
            Instruction::JumpIfTrueOrPop(t) => drop(push(Instruction::JumpIfTrueOrPop(to(t)))),
            Instruction::Iterate(t) => drop(push(Instruction::Iterate(to(t)))),
            Instruction::BuildMacro(name, t, flags) => drop(push(Instruction::BuildMacro(name, to(t), flags))),
            Instruction::LoadConst(v) => match settle_constant(&v, 0) {
                Ok(Some(settled)) => drop(push(Instruction::LoadConst(settled))),
                Ok(None) => drop(push(Instruction::LoadConst(v))),
                Err(e) => return Err(format!("{e} (line {})", line.unwrap_or(0))),
            },
            other => drop(push(other)),
        }
    }
    Ok(out)
}

/// Evaluates `a <op> b` with minijinja's own operator, for the cases that make no text. The
/// expressions are compiled once: this runs for every `+` and `*` of a render.
fn native(op: &str, a: &Value, b: &Value) -> Result<Value, Error> {
    use minijinja::Expression;
    use std::sync::LazyLock;
    static ENV: LazyLock<Environment<'static>> = LazyLock::new(Environment::new);
    static ADD_EXPR: LazyLock<Expression<'static, 'static>> = LazyLock::new(|| ENV.compile_expression("a + b").expect("a valid expression"));
    static MUL_EXPR: LazyLock<Expression<'static, 'static>> = LazyLock::new(|| ENV.compile_expression("a * b").expect("a valid expression"));
    // Numbers directly, as minijinja does them (integers exact, else floats): evaluating an
    // expression costs a new frame each time, and templates count in loops.
    if a.is_integer() && b.is_integer() {
        if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
            if let Some(r) = if op == "+" { x.checked_add(y) } else { x.checked_mul(y) } {
                return Ok(Value::from(r));
            }
        }
    } else if a.is_number() && b.is_number() {
        if let (Ok(x), Ok(y)) = (f64::try_from(a.clone()), f64::try_from(b.clone())) {
            return Ok(Value::from(if op == "+" { x + y } else { x * y }));
        }
    }
    let expr = if op == "+" { &ADD_EXPR } else { &MUL_EXPR };
    expr.eval(minijinja::context! { a => a, b => b })
}

fn item_count(v: &Value) -> Option<u64> {
    matches!(v.kind(), ValueKind::Seq | ValueKind::Iterable | ValueKind::Map).then(|| v.len().map(|n| n as u64)).flatten()
}

/// What a sequence item costs the budget: it refers to a value rather than copying it.
const ITEM_BYTES: u64 = 16;

fn concat(a: &Value, b: &Value) -> Result<Value, Error> {
    let n = shown_size(a)?.saturating_add(shown_size(b)?);
    charge(n)?;
    Ok(Value::from(format!("{a}{b}")))
}

fn add(a: &Value, b: &Value) -> Result<Value, Error> {
    if let (Some(x), Some(y)) = (a.as_str(), b.as_str()) {
        charge(x.len() as u64 + y.len() as u64)?;
        return Ok(Value::from([x, y].concat()));
    }
    if let (Some(x), Some(y)) = (item_count(a), item_count(b)) {
        charge(x.saturating_add(y).saturating_mul(ITEM_BYTES))?;
    }
    native("+", a, b)
}

fn mul(a: &Value, b: &Value) -> Result<Value, Error> {
    for (x, n) in [(a, b), (b, a)] {
        // A count past u64 (minijinja's integers reach i128) costs the whole budget.
        let times = match n.as_usize() {
            Some(t) => t as u64,
            None if n.is_integer() && n.as_i64().is_none() => u64::MAX,
            None => continue,
        };
        // At least one unit per repetition: repeating an empty list still loops `times` times
        // (a fuzzed `messages * 10**20` with no messages ran for minutes).
        if let Some(s) = x.as_str() {
            charge((s.len() as u64).max(1).saturating_mul(times))?;
        } else if let Some(items) = item_count(x) {
            charge(items.max(1).saturating_mul(times).saturating_mul(ITEM_BYTES))?;
            if matches!(x.kind(), ValueKind::Seq | ValueKind::Iterable) {
                return Ok(repeat(x, times));
            }
        }
    }
    native("*", a, b)
}

/// `seq * times` as a list of its own, made now: minijinja repeats lazily by iterating `times`
/// times, so that repeats of repeats of an empty list cost the product of their counts at
/// every walk while holding nothing (a fuzzed `messages * 13022 * 6466` with no messages ran
/// for 20 s). Made here, an empty list stays empty and a longer one has the length charged.
fn repeat(seq: &Value, times: u64) -> Value {
    let items: Vec<Value> = seq.try_iter().map(|it| it.collect()).unwrap_or_default();
    if items.is_empty() {
        return Value::from(Vec::<Value>::new());
    }
    let n = items.len().saturating_mul(times as usize);
    Value::from(items.iter().cycle().take(n).cloned().collect::<Vec<Value>>())
}

/// Most items a constant sequence folded at compile time may hold once made (`[1] * 3` is
/// fine; `[1] * 10**9` is not a chat template).
const MAX_CONST_ITEMS: usize = 1 << 16;

/// A constant that minijinja computed while compiling (`[] * 84200252`, `[1] + [2]`) may be a
/// lazy sequence, which never passed through [`mul`]: walking `[] * N` costs N however empty
/// it is. Returns the constant with every lazy sequence made into a list of its own (an empty
/// repeat is an empty list; the walk of a non-empty one costs its length, at most
/// [`MAX_CONST_ITEMS`]); None when nothing is lazy; an error when a lazy one is too long or
/// sits inside a map.
fn settle_constant(v: &Value, depth: usize) -> Result<Option<Value>, String> {
    let too_big = || format!("the chat template repeats a sequence in a constant expression to more than {MAX_CONST_ITEMS} items; repeat a variable instead");
    match v.kind() {
        ValueKind::Iterable => {
            let n = v.len().ok_or_else(too_big)?;
            if n > MAX_CONST_ITEMS || depth >= 32 {
                return Err(too_big());
            }
            if n == 0 {
                return Ok(Some(Value::from(Vec::<Value>::new())));
            }
            let items: Vec<Value> = v.try_iter().map_err(|e| e.to_string())?.take(n).collect();
            let mut out = Vec::with_capacity(items.len());
            for x in &items {
                out.push(settle_constant(x, depth + 1)?.unwrap_or_else(|| x.clone()));
            }
            Ok(Some(Value::from(out)))
        }
        ValueKind::Seq if depth < 32 => {
            let items: Vec<Value> = v.try_iter().map_err(|e| e.to_string())?.collect();
            let mut changed = false;
            let mut out = Vec::with_capacity(items.len());
            for x in &items {
                match settle_constant(x, depth + 1)? {
                    Some(y) => {
                        changed = true;
                        out.push(y);
                    }
                    None => out.push(x.clone()),
                }
            }
            Ok(changed.then(|| Value::from(out)))
        }
        ValueKind::Map if depth < 32 => {
            for k in v.try_iter().map_err(|e| e.to_string())? {
                if v.get_item(&k).is_ok_and(|x| !matches!(settle_constant(&x, depth + 1), Ok(None))) {
                    return Err("the chat template builds a map holding a repeated sequence in a constant expression; build it from variables instead".into());
                }
            }
            Ok(None)
        }
        _ => Ok(None),
    }
}

fn list(items: &[Value]) -> Result<Value, Error> {
    // Refers to its items without copying them; what matters is that printing or walking it later
    // stays within the budget (a list holding itself twice doubles at each step).
    let mut shown = 2u64;
    for v in items {
        shown = shown.saturating_add(shown_size(v)?);
    }
    check(shown)?;
    charge(items.len() as u64 * ITEM_BYTES)?;
    Ok(Value::from(items.to_vec()))
}

/// Largest integer a filter takes as a width or count (`indent(n)`, `batch(n)`, `round(n)`).
const MAX_FILTER_INT: i64 = 1 << 16;

/// Refuses a printf mapping key (`%(name)s`) holding a non-ASCII character: minijinja's
/// `format` walks the key byte by byte and panics inside a multi-byte character (found by the
/// `chat_template` fuzz target, session 9).
fn check_printf_keys(fmt: &str) -> Result<(), Error> {
    let b = fmt.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match (b[i], b.get(i + 1)) {
            (b'%', Some(b'%')) => i += 2,
            (b'%', Some(b'(')) => {
                let key = &b[i + 2..];
                let end = key.iter().position(|&c| c == b')').unwrap_or(key.len());
                if !key[..end].is_ascii() {
                    return Err(Error::new(ErrorKind::InvalidOperation, format!("format: the key of the %(...) at byte {i} of the format string is not ASCII, which the template engine cannot read; use an ASCII key")));
                }
                i += 2 + end;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// Charges a builtin filter's output before it runs, from its inputs, then calls it.
fn guarded_filter(state: &State, name: &str, f: &Value, args: &[Value]) -> Result<Value, Error> {
    let input = args.first().cloned().unwrap_or_default();
    for a in args.iter().skip(1) {
        if let Some(i) = a.as_i64() {
            if i.unsigned_abs() > MAX_FILTER_INT as u64 {
                return Err(Error::new(ErrorKind::InvalidOperation, format!("{name}: the argument {i} is over the {MAX_FILTER_INT} a chat template may pass")));
            }
        }
    }
    if name == "format" {
        check_printf_keys(input.as_str().unwrap_or(""))?;
    }
    let shown = shown_size(&input)?;
    check(shown)?;
    let arg_str = |i: usize| args.get(i).and_then(|v| v.as_str()).unwrap_or("");
    // What the output can grow to beyond a copy of the input.
    let extra: u64 = match name {
        "replace" => {
            let (s, from, with) = (input.as_str().unwrap_or(""), arg_str(1), arg_str(2));
            let hits = if from.is_empty() { s.chars().count() as u64 + 1 } else { s.matches(from).count() as u64 };
            hits.saturating_mul(with.len() as u64)
        }
        "join" => item_count(&input).unwrap_or(0).saturating_mul(arg_str(1).len() as u64),
        "indent" => {
            let width = args.get(1).map_or(Ok(0), |w| w.as_str().map(|s| Ok(s.len() as u64)).unwrap_or_else(|| shown_size(w)))?;
            let lines = input.as_str().map_or(0, |s| s.lines().count() as u64 + 1);
            lines.saturating_mul(width)
        }
        "format" => {
            let mut n = 0u64;
            for a in args.iter().skip(1) {
                n = n.saturating_add(shown_size(a)?);
            }
            // Widths such as "%100000s" pad up to their number.
            let digits = input.as_str().unwrap_or("").split(|c: char| !c.is_ascii_digit()).filter_map(|d| d.parse::<u64>().ok()).fold(0u64, u64::saturating_add);
            n.saturating_add(digits)
        }
        // Strings added to each other: each partial sum is a new string.
        "sum" => shown.saturating_mul(item_count(&input).unwrap_or(1)),
        _ => 0,
    };
    // Copies and case changes make up to three bytes per byte of their input.
    let makes_text = matches!(name, "replace" | "join" | "indent" | "format" | "string" | "pprint" | "tojson" | "upper" | "lower" | "title" | "capitalize" | "trim" | "sum" | "lines" | "split");
    if makes_text {
        charge(shown.saturating_mul(3).saturating_add(extra))?;
    } else {
        charge(item_count(&input).unwrap_or(0).saturating_mul(ITEM_BYTES))?;
    }
    f.call(state, args)
}

/// Registers the guarded operations and replaces the builtin filters that make text or walk
/// sequences with charged versions of themselves.
pub(super) fn install(env: &mut Environment<'_>) {
    env.add_function(CONCAT, |a: Value, b: Value| concat(&a, &b));
    env.add_function(ADD, |a: Value, b: Value| add(&a, &b));
    env.add_function(MUL, |a: Value, b: Value| mul(&a, &b));
    env.add_function(LIST, |items: Rest<Value>| list(&items));
    env.set_formatter(|out, state, value| {
        charge(shown_size(value)?)?;
        minijinja::escape_formatter(out, state, value)
    });
    use minijinja::filters as f;
    let builtins: Vec<(&'static str, Value)> = vec![
        ("replace", Value::from_function(f::replace)),
        ("join", Value::from_function(f::join)),
        ("indent", Value::from_function(f::indent)),
        ("format", Value::from_function(f::format)),
        ("string", Value::from_function(f::string)),
        ("pprint", Value::from_function(f::pprint)),
        ("upper", Value::from_function(f::upper)),
        ("lower", Value::from_function(f::lower)),
        ("title", Value::from_function(f::title)),
        ("capitalize", Value::from_function(f::capitalize)),
        ("trim", Value::from_function(f::trim)),
        ("split", Value::from_function(f::split)),
        ("lines", Value::from_function(f::lines)),
        ("sum", Value::from_function(f::sum)),
        ("list", Value::from_function(f::list)),
        ("sort", Value::from_function(f::sort)),
        ("unique", Value::from_function(f::unique)),
        ("reverse", Value::from_function(f::reverse)),
        ("dictsort", Value::from_function(f::dictsort)),
        ("items", Value::from_function(f::items)),
        ("batch", Value::from_function(f::batch)),
        ("slice", Value::from_function(f::slice)),
        ("groupby", Value::from_function(f::groupby)),
        ("min", Value::from_function(f::min)),
        ("max", Value::from_function(f::max)),
        ("last", Value::from_function(f::last)),
        ("length", Value::from_function(f::length)),
        ("count", Value::from_function(f::length)),
        ("round", Value::from_function(f::round)),
    ];
    for (name, func) in builtins {
        env.add_filter(name, move |state: &State, args: Rest<Value>| guarded_filter(state, name, &func, &args));
    }
}
