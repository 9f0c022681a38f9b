//! Escaping for the two languages the controller writes: Nix expressions and POSIX shell words.

use thiserror::Error;

/// Why a value cannot be written as Nix.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EscapeError {
    /// Nix strings are C strings inside the evaluator: a NUL byte cannot be represented.
    #[error("a string contains a NUL character, which Nix strings cannot hold")]
    Nul,
    /// Nix integers are signed 64-bit.
    #[error("the number {0} does not fit a Nix integer (signed 64-bit)")]
    IntegerOutOfRange(String),
    /// NaN and the infinities have no Nix literal.
    #[error("the number {0} has no Nix literal")]
    NotFinite(String),
}

/// A Nix double-quoted string literal whose value is exactly `s`.
///
/// Every `$` is escaped (so neither `${` nor `$${` can start or hide an interpolation), as are `"`
/// and `\`; newline, carriage return and tab become `\n`, `\r`, `\t` because the Nix lexer turns
/// a raw carriage return into a newline.
pub fn string(s: &str) -> Result<String, EscapeError> {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\0' => return Err(EscapeError::Nul),
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '$' => out.push_str("\\$"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    Ok(out)
}

/// Nix keywords, which cannot be bare attribute names.
const KEYWORDS: &[&str] = &[
    "assert", "else", "if", "in", "inherit", "let", "or", "rec", "then", "with",
];

/// An attribute name: bare when it is a plain identifier, a quoted string otherwise.
pub fn attr_name(name: &str) -> Result<String, EscapeError> {
    let mut chars = name.chars();
    let plain = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '\''))
        && !KEYWORDS.contains(&name);
    if plain { Ok(name.to_owned()) } else { string(name) }
}

/// A JSON value as a Nix expression (objects become attribute sets, arrays lists).
pub fn value(v: &serde_json::Value) -> Result<String, EscapeError> {
    let mut out = String::new();
    write_value(&mut out, v, 0)?;
    Ok(out)
}

/// Writes `v` at indentation `depth` (two spaces per level) into `out`.
pub(crate) fn write_value(out: &mut String, v: &serde_json::Value, depth: usize) -> Result<(), EscapeError> {
    use serde_json::Value;
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&number(n)?),
        Value::String(s) => out.push_str(&string(s)?),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[ ]");
                return Ok(());
            }
            out.push_str("[\n");
            for item in items {
                indent(out, depth + 1);
                // Function application binds tighter than list elements: parenthesise nothing but
                // negative numbers, which would otherwise read as a subtraction.
                let negative = item.as_f64().is_some_and(|f| f < 0.0);
                if negative {
                    out.push('(');
                }
                write_value(out, item, depth + 1)?;
                if negative {
                    out.push(')');
                }
                out.push('\n');
            }
            indent(out, depth);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{ }");
                return Ok(());
            }
            out.push_str("{\n");
            for (k, item) in map {
                indent(out, depth + 1);
                out.push_str(&attr_name(k)?);
                out.push_str(" = ");
                write_value(out, item, depth + 1)?;
                out.push_str(";\n");
            }
            indent(out, depth);
            out.push('}');
        }
    }
    Ok(())
}

fn indent(out: &mut String, depth: usize) {
    for _ in 0..depth {
        out.push_str("  ");
    }
}

fn number(n: &serde_json::Number) -> Result<String, EscapeError> {
    if let Some(i) = n.as_i64() {
        return Ok(i.to_string());
    }
    if n.is_u64() {
        return Err(EscapeError::IntegerOutOfRange(n.to_string()));
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    if !f.is_finite() {
        return Err(EscapeError::NotFinite(n.to_string()));
    }
    // `{:?}` always keeps a decimal point or exponent, so Nix reads a float, never an integer.
    let text = format!("{f:?}");
    // Nix has no exponent without a fraction digit before it: `1e300` → `1.0e300`.
    Ok(match text.split_once('e') {
        Some((mantissa, exp)) if !mantissa.contains('.') => format!("{mantissa}.0e{exp}"),
        _ => text,
    })
}

pub use crate::text::{shell_word, shell_words};

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn quotes_backslashes_and_dollars_are_escaped() {
        assert_eq!(string(r#"a"b\c${d}$e"#).unwrap(), r#""a\"b\\c\${d}\$e""#);
    }

    #[test]
    fn control_characters_become_escapes() {
        assert_eq!(string("a\nb\rc\td").unwrap(), r#""a\nb\rc\td""#);
    }

    #[test]
    fn a_nul_character_is_refused() {
        assert_eq!(string("a\0b"), Err(EscapeError::Nul));
    }

    #[test]
    fn plain_attribute_names_stay_bare_and_others_are_quoted() {
        assert_eq!(attr_name("maxTootChars").unwrap(), "maxTootChars");
        assert_eq!(attr_name("with").unwrap(), "\"with\"");
        assert_eq!(attr_name("a.b").unwrap(), "\"a.b\"");
        assert_eq!(attr_name("${x}").unwrap(), "\"\\${x}\"");
        assert_eq!(attr_name("").unwrap(), "\"\"");
    }

    #[test]
    fn json_values_become_nix_values() {
        let v = json!({"b": [1, -2, 2.5, "x"], "a": {"c": null, "d": true}, "e": [], "f": {}});
        assert_eq!(
            value(&v).unwrap(),
            "{\n  a = {\n    c = null;\n    d = true;\n  };\n  b = [\n    1\n    (-2)\n    2.5\n    \"x\"\n  ];\n  e = [ ];\n  f = { };\n}"
        );
    }

    #[test]
    fn integers_beyond_i64_and_large_floats_are_handled() {
        assert!(matches!(
            value(&json!(u64::MAX)),
            Err(EscapeError::IntegerOutOfRange(_))
        ));
        assert_eq!(value(&json!(1e300)).unwrap(), "1.0e300");
        assert_eq!(value(&json!(3.0)).unwrap(), "3.0");
    }

    #[test]
    fn shell_words_are_left_alone_when_safe_and_single_quoted_otherwise() {
        assert_eq!(shell_word("/nix/store/abc-x"), "/nix/store/abc-x");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
        assert_eq!(shell_word(""), "''");
        assert_eq!(shell_word("$(reboot)"), "'$(reboot)'");
        assert_eq!(shell_words(&["echo", "a;b"]), "echo 'a;b'");
    }
}
