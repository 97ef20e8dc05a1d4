//! Printing: JSON is the API's JSON unchanged, YAML the same value, tables for people.

use std::borrow::Cow;
use std::io::Write;

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
    /// Comma-separated values, for `history` (spreadsheets, accounting scripts).
    Csv,
}

/// Prints `value` as JSON or YAML; returns false for `table`, which the caller prints itself.
pub fn print_structured(format: Format, value: &Value) -> std::io::Result<bool> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, value)?;
            writeln!(out)?;
            Ok(true)
        }
        Format::Yaml => {
            let text = serde_saphyr::to_string(value).map_err(std::io::Error::other)?;
            out.write_all(text.as_bytes())?;
            Ok(true)
        }
        Format::Table | Format::Csv => Ok(false),
    }
}

/// A plain text table with left-aligned columns, two spaces apart.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<const N: usize>(header: [&str; N]) -> Self {
        Self {
            rows: vec![header.iter().map(|s| (*s).to_owned()).collect()],
        }
    }

    /// Adds a row; control characters in its cells are shown escaped ([`printable`]).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(
            cells
                .into_iter()
                .map(|c| printable(&c).into_owned())
                .collect(),
        );
    }

    pub fn render(&self, indent: &str) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut text = String::new();
        for row in &self.rows {
            let mut line = indent.to_owned();
            for (c, cell) in row.iter().enumerate() {
                line.push_str(cell);
                if c + 1 < row.len() {
                    line.push_str(&" ".repeat(widths[c] - cell.chars().count() + 2));
                }
            }
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }
}

/// Text from the agent as it may be shown on a terminal: control characters are shown escaped
/// (`\u{1b}`), so that what another user wrote into a job (a message, a value) cannot move the
/// cursor, rewrite the screen or break a table's lines.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Bytes in binary units: `140.4 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Seconds as `3d4h`, `2h05m`, `4m10s` or `12s`.
pub fn duration(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(150_754_820_096), "140.4 GiB");
        assert_eq!(duration(3 * 3600 + 5 * 60), "3h05m");
        assert_eq!(duration(42), "42s");
    }

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(printable("plain text, ünïcode"), "plain text, ünïcode");
        assert_eq!(
            printable("a\u{1b}[2Jb\tc\nd\u{7f}"),
            "a\\u{1b}[2Jb\\tc\\nd\\u{7f}"
        );
        let mut table = Table::new(["NAME", "MESSAGE"]);
        table.row(vec!["x".into(), "one\ntwo\u{1b}]0;title\u{7}".into()]);
        assert_eq!(
            table.render(""),
            "NAME  MESSAGE\nx     one\\ntwo\\u{1b}]0;title\\u{7}\n"
        );
    }

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new(["GPU", "MODEL"]);
        t.row(vec!["0".into(), "NVIDIA H200".into()]);
        assert_eq!(t.render(""), "GPU  MODEL\n0    NVIDIA H200\n");
    }
}
