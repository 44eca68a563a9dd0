//! JSON exactly as Python's `json` module writes and reads it, which is what Optuna's journal
//! uses: `json.dumps(log, separators=(",", ":"))` for a line and `json.dumps(dist)` (default
//! separators `", "`, `": "`) for a distribution.
//!
//! Differences from strict JSON (RFC 8259) that matter here:
//! - non-finite floats are the bare tokens `NaN`, `Infinity` and `-Infinity`;
//! - floats are written with Python's `repr` (`1e-05`, `100.0`, `1e+16`);
//! - `ensure_ascii=True`: every non-ASCII character is a `\uXXXX` escape (surrogate pairs above
//!   U+FFFF).
//!
//! Reading goes through `serde_json` after rewriting the three non-finite tokens (outside
//! strings) into sentinel strings; [`f64_of`] turns a sentinel back into the float. Inside
//! attribute values (`serde_json::Value`, which cannot hold NaN) [`clean`] turns them into the
//! strings `"NaN"`, `"Infinity"`, `"-Infinity"`.

use serde_json::Value;
use std::fmt::Write as _;

const SENTINEL: &str = "\u{0}mixscale-pyjson:";

/// Separators of `json.dumps`: compact (journal lines) or Python's default (distribution JSON).
#[derive(Clone, Copy)]
pub enum Style {
    Compact,
    Default,
}

impl Style {
    fn item(self) -> &'static str {
        match self {
            Style::Compact => ",",
            Style::Default => ", ",
        }
    }
    fn key(self) -> &'static str {
        match self {
            Style::Compact => ":",
            Style::Default => ": ",
        }
    }
}

/// Python's `repr(float)`: shortest round-trip digits, positional for exponents in [-4, 16),
/// scientific otherwise (`1e-05`, `1.5e+16`); `NaN`, `Infinity`, `-Infinity` as `json.dumps`.
pub fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "1.2345e-7", "-5e3".
    let sci = format!("{x:e}");
    let (mant, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("exponent");
    let (sign, mant) = if let Some(m) = mant.strip_prefix('-') { ("-", m) } else { ("", mant) };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point >= n {
            format!("{}{}.0", digits, "0".repeat((point - n) as usize))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        format!("{sign}{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

/// Appends a JSON string literal with `ensure_ascii=True` escaping.
pub fn push_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Appends `v` as `json.dumps` would (object keys in the map's order).
pub fn push_value(out: &mut String, v: &Value, style: Style) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if n.is_f64() {
                out.push_str(&float_repr(n.as_f64().expect("f64")));
            } else {
                out.push_str(&n.to_string());
            }
        }
        Value::String(s) => push_str(out, s),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(style.item());
                }
                push_value(out, x, style);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(style.item());
                }
                push_str(out, k);
                out.push_str(style.key());
                push_value(out, x, style);
            }
            out.push('}');
        }
    }
}

/// Builds one JSON object with keys in the order given (Python dicts keep insertion order).
pub struct Obj {
    out: String,
    style: Style,
    empty: bool,
}

impl Obj {
    pub fn new(style: Style) -> Self {
        Obj { out: "{".into(), style, empty: true }
    }
    fn key(&mut self, k: &str) -> &mut String {
        if !self.empty {
            self.out.push_str(self.style.item());
        }
        self.empty = false;
        push_str(&mut self.out, k);
        self.out.push_str(self.style.key());
        &mut self.out
    }
    pub fn raw(&mut self, k: &str, json: &str) -> &mut Self {
        self.key(k).push_str(json);
        self
    }
    pub fn str(&mut self, k: &str, v: &str) -> &mut Self {
        push_str(self.key(k), v);
        self
    }
    pub fn opt_str(&mut self, k: &str, v: Option<&str>) -> &mut Self {
        match v {
            Some(s) => self.str(k, s),
            None => self.raw(k, "null"),
        }
    }
    pub fn int(&mut self, k: &str, v: i64) -> &mut Self {
        let _ = write!(self.key(k), "{v}");
        self
    }
    pub fn float(&mut self, k: &str, v: f64) -> &mut Self {
        self.key(k).push_str(&float_repr(v));
        self
    }
    pub fn bool(&mut self, k: &str, v: bool) -> &mut Self {
        self.raw(k, if v { "true" } else { "false" })
    }
    pub fn floats(&mut self, k: &str, v: Option<&[f64]>) -> &mut Self {
        let style = self.style;
        let out = self.key(k);
        match v {
            None => out.push_str("null"),
            Some(xs) => {
                out.push('[');
                for (i, x) in xs.iter().enumerate() {
                    if i > 0 {
                        out.push_str(style.item());
                    }
                    out.push_str(&float_repr(*x));
                }
                out.push(']');
            }
        }
        self
    }
    pub fn value(&mut self, k: &str, v: &Value) -> &mut Self {
        let style = self.style;
        push_value(self.key(k), v, style);
        self
    }
    pub fn finish(&mut self) -> String {
        let mut s = std::mem::take(&mut self.out);
        s.push('}');
        s
    }
}

/// Parses one JSON text as Python's `json.loads` does, including the non-finite tokens.
pub fn parse(text: &str) -> Result<Value, String> {
    let fixed = replace_non_finite(text);
    serde_json::from_str(fixed.as_deref().unwrap_or(text)).map_err(|e| format!("invalid JSON: {e}"))
}

/// Rewrites `NaN`, `Infinity`, `-Infinity` outside strings into sentinel strings; `None` when
/// the text has none.
fn replace_non_finite(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let mut out: Option<String> = None;
    let (mut i, mut copied, mut in_str, mut esc) = (0, 0, false, false);
    while i < b.len() {
        let c = b[i];
        if in_str {
            if esc {
                esc = false;
            } else if c == b'\\' {
                esc = true;
            } else if c == b'"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        if c == b'"' {
            in_str = true;
            i += 1;
            continue;
        }
        let tok = ["NaN", "Infinity", "-Infinity"].into_iter().find(|t| b[i..].starts_with(t.as_bytes()));
        if let Some(t) = tok {
            let o = out.get_or_insert_with(String::new);
            o.push_str(&text[copied..i]);
            o.push_str(&format!("\"\\u0000mixscale-pyjson:{t}\""));
            i += t.len();
            copied = i;
        } else {
            i += 1;
        }
    }
    out.map(|mut o| {
        o.push_str(&text[copied..]);
        o
    })
}

/// A number (or a non-finite sentinel) as f64.
pub fn f64_of(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.strip_prefix(SENTINEL)? {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        _ => None,
    }
}

/// An attribute value: sentinels become the strings `"NaN"`, `"Infinity"`, `"-Infinity"`.
pub fn clean(v: Value) -> Value {
    match v {
        Value::String(s) => match s.strip_prefix(SENTINEL) {
            Some(t) => Value::String(t.to_string()),
            None => Value::String(s),
        },
        Value::Array(a) => Value::Array(a.into_iter().map(clean).collect()),
        Value::Object(m) => Value::Object(m.into_iter().map(|(k, x)| (k, clean(x))).collect()),
        v => v,
    }
}

/// A float as an attribute-style value: a JSON number, or the strings above when not finite.
pub fn float_value(x: f64) -> Value {
    match serde_json::Number::from_f64(x) {
        Some(n) => Value::Number(n),
        None => Value::String(float_repr(x)),
    }
}

/// Python's `==` on JSON scalars as used for categorical choices: numbers (and booleans, as
/// 0/1) compare by value, `NaN` equals `NaN` (`_categorical_choice_equal`).
pub fn py_eq(a: &Value, b: &Value) -> bool {
    let num = |v: &Value| match v {
        Value::Bool(x) => Some(if *x { 1.0 } else { 0.0 }),
        Value::Number(n) => n.as_f64(),
        _ => None,
    };
    match (a, b) {
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| py_eq(p, q)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, p)| y.get(k).is_some_and(|q| py_eq(p, q)))
        }
        _ => match (num(a), num(b)) {
            (Some(p), Some(q)) => p == q,
            _ => a == b,
        },
    }
}

/// Now in UTC as Python's `datetime.now(timezone.utc).isoformat(timespec="microseconds")`:
/// `2026-11-27T17:52:10.123456+00:00`.
pub fn now_iso() -> String {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    iso_from_unix(d.as_secs() as i64, d.subsec_micros())
}

/// `secs` since the epoch (UTC) and microseconds as ISO-8601 with `+00:00`.
pub fn iso_from_unix(secs: i64, micros: u32) -> String {
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}+00:00",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        // Expected strings are what CPython 3.11 prints for repr(x).
        let cases = [
            (0.0001, "0.0001"),
            (1e-5, "1e-05"),
            (100.0, "100.0"),
            (2.85, "2.85"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (123456789012345.6, "123456789012345.6"),
            (-0.5, "-0.5"),
            (3e-7, "3e-07"),
            (1.2345e-7, "1.2345e-07"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
            (0.1 + 0.2, "0.30000000000000004"),
            (5e-324, "5e-324"),
        ];
        for (x, want) in cases {
            assert_eq!(float_repr(x), want, "{x:e}");
            if x.is_finite() {
                assert_eq!(float_repr(x).parse::<f64>().unwrap(), x);
            }
        }
    }

    #[test]
    fn strings_escape_like_ensure_ascii() {
        let mut s = String::new();
        push_str(&mut s, "a\"b\\c\nd\u{1}é😀\u{7f}");
        assert_eq!(s, r#""a\"b\\c\nd\u0001\u00e9\ud83d\ude00\u007f""#);
        assert_eq!(parse(&s).unwrap(), Value::String("a\"b\\c\nd\u{1}é😀\u{7f}".into()));
    }

    #[test]
    fn non_finite_tokens_outside_strings_only() {
        let v = parse(r#"{"a":NaN,"b":[Infinity,-Infinity,1.5],"s":"NaN Infinity"}"#).unwrap();
        assert!(f64_of(&v["a"]).unwrap().is_nan());
        assert_eq!(f64_of(&v["b"][0]), Some(f64::INFINITY));
        assert_eq!(f64_of(&v["b"][1]), Some(f64::NEG_INFINITY));
        assert_eq!(f64_of(&v["b"][2]), Some(1.5));
        assert_eq!(v["s"], Value::String("NaN Infinity".into()));
        assert_eq!(clean(v["a"].clone()), Value::String("NaN".into()));
        assert!(parse("{\"a\":Nan}").is_err());
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso_from_unix(0, 0), "1970-01-01T00:00:00.000000+00:00");
        assert_eq!(iso_from_unix(1_735_725_600, 5), "2025-01-01T10:00:00.000005+00:00");
        assert_eq!(iso_from_unix(951_782_400, 0), "2000-02-29T00:00:00.000000+00:00");
    }
}
