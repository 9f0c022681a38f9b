//! Untrusted text made safe to show or to pass on: control characters (ESC, NUL, direction overrides) escaped, passwords in URLs hidden, POSIX shell words quoted.

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

/// Hides the password of `scheme://user:password@host/...`, so that a URL can be shown and logged.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let user = &authority[..at];
            let user = user.split(':').next().unwrap_or_default();
            let scheme = url[..scheme_end].to_ascii_lowercase();
            // Over http(s), a user name alone is often a token (`https://TOKEN@host`): hidden too. An ssh
            // user (`git@`) names an account, not a secret.
            let hidden = if authority[..at].contains(':') {
                format!("{user}:***")
            } else if scheme.contains("http") {
                "***".to_owned()
            } else {
                user.to_owned()
            };
            format!("{}://{hidden}@{}", &url[..scheme_end], &rest[at + 1..])
        }
        None => url.to_owned(),
    }
}

/// Hides the password of every URL among the space-separated words of `line` (quoted URLs too), so
/// that a program's message can be shown and logged.
pub fn redact_words(line: &str) -> String {
    line.split(' ')
        .map(|word| {
            let trimmed = word.trim_matches(|c| c == '\'' || c == '"');
            if trimmed.contains("://") {
                word.replace(trimmed, &redact(trimmed))
            } else {
                word.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A POSIX shell word whose value is exactly `s`: unchanged when it holds only safe characters,
/// single-quoted otherwise (`'` itself written as `'\''`).
pub fn shell_word(s: &str) -> String {
    let safe = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./-_".contains(&b));
    if safe {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Shell words joined by spaces, each escaped.
pub fn shell_words<S: AsRef<str>>(words: &[S]) -> String {
    words
        .iter()
        .map(|w| shell_word(w.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
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
