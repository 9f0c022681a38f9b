//! Untrusted text made safe to show: control characters (ESC, NUL, direction overrides) escaped.

use std::borrow::Cow;

/// Whether `c` must never reach a terminal or a log line raw: C0 and C1 controls other than newline and
/// tab, DEL, and the invisible direction controls that make text read differently than it is.
pub fn is_hostile(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every hostile character written as `\u{…}`, so that it shows as what it is.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_hostile) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_hostile(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `text` with newlines escaped too, for what must stay on one line (a name, a table cell).
pub fn one_line(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| is_hostile(c) || c == '\n') {
        return Cow::Borrowed(text);
    }
    Cow::Owned(escape(text).replace('\n', "\\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_and_direction_overrides_are_shown_not_obeyed() {
        assert_eq!(escape("plain\ttext\n"), "plain\ttext\n");
        assert_eq!(escape("a\u{1b}[2Jb\0c"), "a\\u{1b}[2Jb\\u{0}c");
        assert_eq!(escape("x\u{202e}y"), "x\\u{202e}y");
        assert_eq!(escape("\u{9b}"), "\\u{9b}");
        assert_eq!(one_line("a\nb\u{7f}"), "a\\nb\\u{7f}");
    }
}
