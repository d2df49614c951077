//! Label values: the one place where text from outside (request paths, methods, service names,
//! pod names, …) becomes part of the exposition. Every label value is a [`Value`], and a
//! `Value` is always written escaped, so no byte a client sends can break /metrics.
use std::fmt::{self, Write};

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// Label sets are built per series; keys are fixed strings, values are [`Value`]s.
pub type Labels = Vec<(&'static str, Value)>;

/// A label value as text; escaped when encoded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value(String);

impl Value {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value(s)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value(s.to_string())
    }
}

impl From<&String> for Value {
    fn from(s: &String) -> Self {
        Value(s.clone())
    }
}

impl std::ops::Deref for Value {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Writes `s` as the text format and OpenMetrics want a label value between its quotes:
/// `\` → `\\`, `"` → `\"`, newline → `\n`. Other control characters (which neither format
/// forbids, but which no dashboard shows usefully and some parsers choke on) become U+FFFD.
pub fn escape_into(s: &str, out: &mut impl Write) -> fmt::Result {
    for c in s.chars() {
        match c {
            '\\' => out.write_str("\\\\")?,
            '"' => out.write_str("\\\"")?,
            '\n' => out.write_str("\\n")?,
            c if c.is_control() => out.write_char(char::REPLACEMENT_CHARACTER)?,
            c => out.write_char(c)?,
        }
    }
    Ok(())
}

impl EncodeLabelValue for Value {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        escape_into(&self.0, encoder)
    }
}

/// A label pair.
pub fn label(key: &'static str, value: impl Into<Value>) -> (&'static str, Value) {
    (key, value.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(s: &str) -> String {
        let mut out = String::new();
        escape_into(s, &mut out).unwrap();
        out
    }

    #[test]
    fn quotes_backslashes_and_newlines_are_escaped() {
        assert_eq!(escaped(r#"/q"x"#), r#"/q\"x"#);
        assert_eq!(escaped(r"/a\b"), r"/a\\b");
        assert_eq!(escaped("/a\nb"), r"/a\nb");
        assert_eq!(escaped("pod\"}\nevil_total 1"), r#"pod\"}\nevil_total 1"#);
        assert_eq!(escaped("/\u{1}\r\t\u{7f}x"), "/\u{fffd}\u{fffd}\u{fffd}\u{fffd}x");
        assert_eq!(escaped("/caf\u{e9}"), "/caf\u{e9}");
    }
}
