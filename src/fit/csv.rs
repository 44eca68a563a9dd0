//! A minimal CSV reader (RFC 4180 subset): comma separator, optional double-quoted fields with
//! `""` escapes, CRLF or LF line ends, a UTF-8 BOM, blank lines skipped. Quoted fields may not
//! span lines (none of the scaling-law tables need that). Every record keeps its 1-based line
//! number so errors can name it.

use super::error::FitError;
use std::path::{Path, PathBuf};

/// A parsed CSV file: header names and string records with their line numbers.
#[derive(Clone, Debug)]
pub struct Table {
    pub path: PathBuf,
    pub header: Vec<String>,
    /// (line number, fields); every record has `header.len()` fields.
    pub records: Vec<(usize, Vec<String>)>,
}

impl Table {
    /// Reads and splits `path`. Ragged rows and unterminated quotes are errors.
    pub fn read(path: &Path) -> Result<Table, FitError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| FitError::Io { path: path.to_path_buf(), source })?;
        Table::parse(path, &text)
    }

    /// Parses CSV text; `path` is only used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Table, FitError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut header: Option<Vec<String>> = None;
        let mut records = Vec::new();
        for (i, raw) in text.split('\n').enumerate() {
            let line_no = i + 1;
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            if line.trim().is_empty() {
                continue;
            }
            let fields = split_line(line).ok_or_else(|| FitError::Quote {
                path: path.to_path_buf(),
                line: line_no,
            })?;
            match &header {
                None => header = Some(fields.into_iter().map(|f| f.trim().to_string()).collect()),
                Some(h) => {
                    if fields.len() != h.len() {
                        return Err(FitError::Ragged {
                            path: path.to_path_buf(),
                            line: line_no,
                            expected: h.len(),
                            found: fields.len(),
                        });
                    }
                    records.push((line_no, fields));
                }
            }
        }
        let header = header.ok_or_else(|| FitError::Empty { path: path.to_path_buf() })?;
        Ok(Table { path: path.to_path_buf(), header, records })
    }

    /// Index of the column named `name` (exact match after trimming), if present.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.header.iter().position(|h| h == name)
    }

    /// All values of a numeric column; NaN/inf are returned as such (callers decide), empty
    /// fields as NaN; anything else unparsable is a [`FitError::Parse`] naming file, line, column.
    pub fn numeric_column(&self, name: &str) -> Result<Option<Vec<f64>>, FitError> {
        let Some(j) = self.column(name) else { return Ok(None) };
        let mut out = Vec::with_capacity(self.records.len());
        for (line, fields) in &self.records {
            out.push(parse_number(&fields[j]).ok_or_else(|| FitError::Parse {
                path: self.path.clone(),
                line: *line,
                column: name.to_string(),
                value: fields[j].clone(),
            })?);
        }
        Ok(Some(out))
    }

    /// Comma-separated header names, for error messages.
    pub fn header_list(&self) -> String {
        self.header.iter().map(|h| format!("`{h}`")).collect::<Vec<_>>().join(", ")
    }
}

/// Parses a numeric field. Empty → NaN (a missing value). `nan`, `inf`, `-inf`, `infinity`
/// (any case) parse to the non-finite values. Returns `None` for malformed text.
pub fn parse_number(field: &str) -> Option<f64> {
    let t = field.trim();
    if t.is_empty() {
        return Some(f64::NAN);
    }
    t.parse::<f64>().ok()
}

/// Splits one line into fields; `None` on an unterminated quote.
fn split_line(line: &str) -> Option<Vec<String>> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    let mut in_quotes = false;
    let mut at_field_start = true;
    while let Some(c) = chars.next() {
        if in_quotes {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    cur.push('"');
                    chars.next();
                } else {
                    in_quotes = false;
                }
            } else {
                cur.push(c);
            }
        } else if c == '"' && at_field_start {
            in_quotes = true;
            at_field_start = false;
        } else if c == ',' {
            fields.push(std::mem::take(&mut cur));
            at_field_start = true;
        } else {
            cur.push(c);
            if !c.is_whitespace() {
                at_field_start = false;
            }
        }
    }
    if in_quotes {
        return None;
    }
    fields.push(cur);
    Some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn quotes_crlf_and_errors() {
        let p = Path::new("t.csv");
        let t = Table::parse(p, "\u{feff}a,\"b, c\",d\r\n1,\"x \"\"y\"\"\",3\r\n\r\n4,5,6\n").unwrap();
        assert_eq!(t.header, vec!["a", "b, c", "d"]);
        assert_eq!(t.records[0].1[1], "x \"y\"");
        assert_eq!(t.records[1].0, 4);
        assert!(matches!(Table::parse(p, "a,b\n1\n"), Err(FitError::Ragged { line: 2, .. })));
        assert!(matches!(Table::parse(p, "a\n\"1\n"), Err(FitError::Quote { line: 2, .. })));
        assert!(matches!(Table::parse(p, "\n\n"), Err(FitError::Empty { .. })));
        let t = Table::parse(p, "a,b\n1,zz\n").unwrap();
        let e = t.numeric_column("b").unwrap_err().to_string();
        assert!(e.contains("t.csv:2") && e.contains("`b`") && e.contains("zz"), "{e}");
        assert!(parse_number("NaN").unwrap().is_nan());
        assert_eq!(parse_number("-inf"), Some(f64::NEG_INFINITY));
        assert_eq!(parse_number(" 1e3 "), Some(1000.0));
    }
}
