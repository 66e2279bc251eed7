//! A small JSON value and its writer (the tools only write JSON, never read it).
//!
//! The output is indented, except that an object or array holding only scalars is written on one line,
//! so every device of `lsiommu --json` is one line (convenient for `grep`) and the document stays valid
//! JSON for real parsers.

use std::fmt::Write as _;

/// A JSON value. Object members keep their insertion order.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A non-negative integer (every number the tools print is one).
    Number(u64),
    /// A string (escaped when written).
    String(String),
    /// An array.
    Array(Vec<Value>),
    /// An object: (key, value) pairs in order.
    Object(Vec<(String, Value)>),
}

impl Value {
    /// An object from (key, value) pairs.
    pub fn object<K: Into<String>>(members: impl IntoIterator<Item = (K, Value)>) -> Value {
        Value::Object(members.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    /// A string, or `null` for `None`.
    pub fn opt_str(s: Option<impl Into<String>>) -> Value {
        s.map_or(Value::Null, |s| Value::String(s.into()))
    }

    fn is_scalar(&self) -> bool {
        !matches!(self, Value::Array(_) | Value::Object(_))
    }

    /// The value as indented JSON text, with a final newline.
    pub fn to_pretty(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out.push('\n');
        out
    }

    fn write(&self, out: &mut String, indent: usize) {
        match self {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => {
                let _ = write!(out, "{n}");
            }
            Value::String(s) => escape_into(out, s),
            Value::Array(items) => {
                let flat = items.iter().all(Value::is_scalar);
                write_seq(out, indent, ('[', ']'), flat, items.iter().map(|v| (None, v)));
            }
            Value::Object(members) => {
                let flat = members.iter().all(|(_, v)| v.is_scalar());
                write_seq(out, indent, ('{', '}'), flat, members.iter().map(|(k, v)| (Some(k.as_str()), v)));
            }
        }
    }
}

fn write_seq<'a>(
    out: &mut String,
    indent: usize,
    (open, close): (char, char),
    flat: bool,
    items: impl ExactSizeIterator<Item = (Option<&'a str>, &'a Value)>,
) {
    out.push(open);
    let empty = items.len() == 0;
    for (i, (key, value)) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        if flat {
            if i > 0 {
                out.push(' ');
            }
        } else {
            out.push('\n');
            out.push_str(&"  ".repeat(indent + 1));
        }
        if let Some(key) = key {
            escape_into(out, key);
            out.push_str(": ");
        }
        value.write(out, indent + 1);
    }
    if !flat && !empty {
        out.push('\n');
        out.push_str(&"  ".repeat(indent));
    }
    out.push(close);
}

/// Appends `s` as a JSON string literal: quotes, `\"`, `\\`, the short escapes for `\n`, `\r`, `\t`,
/// `\u00XX` for every other control character (and DEL), everything else as is (JSON text is UTF-8).
pub fn escape_into(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `s` as a JSON string literal (see [`escape_into`]).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    escape_into(&mut out, s);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped() {
        assert_eq!(escape("vfio-pci"), r#""vfio-pci""#);
        assert_eq!(escape(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(escape("l1\nl2\r\t"), r#""l1\nl2\r\t""#);
        assert_eq!(escape("\0\u{1}\u{1f}\u{7f}"), r#""\u0000\u0001\u001f\u007f""#);
        assert_eq!(escape("é ✓ /"), "\"é ✓ /\"", "UTF-8 and / stay as they are");
    }

    #[test]
    fn every_char_round_trips_through_a_real_parser() {
        // Every ASCII character and a few others, one string: the parser must give it back.
        let mut s: String = (0u8..=0x7f).map(char::from).collect();
        s.push_str("é\u{2028}\u{10ffff}");
        let back: String = serde_json::from_str(&escape(&s)).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn documents_parse_back_and_flat_objects_take_one_line() {
        let doc = Value::object([
            ("name", Value::String("edu \"x\"".into())),
            ("none", Value::Null),
            ("ok", Value::Bool(true)),
            ("empty", Value::Array(vec![])),
            ("empty_object", Value::object::<String>([])),
            (
                "devices",
                Value::Array(vec![
                    Value::object([
                        ("address", Value::String("0000:00:03.0".into())),
                        ("n", Value::Number(7)),
                    ]),
                    Value::object([("nested", Value::Array(vec![Value::Number(1), Value::Number(2)]))]),
                ]),
            ),
        ]);
        let text = doc.to_pretty();
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["name"], "edu \"x\"");
        assert_eq!(parsed["devices"][0]["n"], 7);
        assert_eq!(parsed["devices"][1]["nested"][1], 2);
        assert!(parsed["none"].is_null() && parsed["empty"].as_array().unwrap().is_empty());
        assert!(
            text.lines().any(|l| l.trim() == r#"{"address": "0000:00:03.0", "n": 7},"#),
            "a device is one line:\n{text}"
        );
        assert!(text.lines().any(|l| l.trim() == r#""nested": [1, 2]"#), "{text}");
    }
}
