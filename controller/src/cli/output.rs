//! Output of the remote subcommands: kubectl-style tables, YAML and JSON.

use serde_json::Value;

use crate::api::Timestamp;

/// How `get` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A kubectl-style table.
    Table,
    /// YAML.
    Yaml,
    /// JSON.
    Json,
}

/// `5s`, `7m`, `3h`, `12d`: how long ago `timestamp` was, as kubectl shows ages.
pub fn age(timestamp: Option<&str>, now: Timestamp) -> String {
    let Some(then) = timestamp.and_then(Timestamp::parse) else {
        return "<unknown>".into();
    };
    let seconds = now.unix().saturating_sub(then.unix());
    match seconds {
        0..=119 => format!("{seconds}s"),
        120..=7199 => format!("{}m", seconds / 60),
        7200..=172_799 => format!("{}h", seconds / 3600),
        _ => format!("{}d", seconds / 86_400),
    }
}

/// The condition of `type_` in an object's status.
pub fn condition<'a>(object: &'a Value, type_: &str) -> Option<&'a Value> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// Renders rows as a table with a header, columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            }
        }
        out.trim_end().to_owned()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// Prints `value` as YAML.
pub fn yaml(value: &Value) -> String {
    yaml_serde::to_string(value).unwrap_or_else(|e| format!("# cannot render as YAML: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_kubectl() {
        let now = Timestamp::from_unix(1_000_000);
        let at = |s: u64| Timestamp::from_unix(1_000_000 - s).to_string();
        assert_eq!(age(Some(&at(5)), now), "5s");
        assert_eq!(age(Some(&at(600)), now), "10m");
        assert_eq!(age(Some(&at(3 * 3600)), now), "3h");
        assert_eq!(age(Some(&at(5 * 86_400)), now), "5d");
        assert_eq!(age(None, now), "<unknown>");
    }

    #[test]
    fn tables_pad_columns_to_the_widest_cell() {
        let out = table(
            &["NAME", "READY"],
            &[
                vec!["uni-utrecht".into(), "True".into()],
                vec!["a".into(), "False".into()],
            ],
        );
        assert_eq!(
            out,
            "NAME          READY\nuni-utrecht   True\na             False\n"
        );
    }
}
