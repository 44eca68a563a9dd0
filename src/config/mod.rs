//! Configuration: YAML files → typed specs, with errors that name the file, line and key path.
//!
//! Flow: [`YamlDoc::load`] parses a file into a YAML value (syntax errors carry the line), CLI
//! overrides (`--set model.d_model=256`) are applied to that value, and [`YamlDoc::deserialize`]
//! turns it into `deny_unknown_fields` structs through `serde_path_to_error`, so a wrong type or an
//! unknown key is reported as `file:line: model.blocks.attention.num_heads: <what is wrong>`.
//! Semantic checks (e.g. `d_model` not divisible by heads) report through [`YamlDoc::error`] with
//! the same location format.
//!
//! YAML backend: `serde_yaml_ng`, the maintained, API-compatible fork of the archived
//! `serde_yaml` (0.9.34+deprecated); it is kept behind this module.

pub mod data;
pub mod model;
pub mod moe;
pub mod mtp;
pub mod run;
pub mod train;

use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;
use std::path::{Path, PathBuf};

pub use run::RunSpec;

/// A parsed YAML file plus the overrides applied to it.
#[derive(Clone, Debug)]
pub struct YamlDoc {
    pub file: PathBuf,
    text: String,
    pub value: Value,
    /// Key paths set from outside the file (command line, sweep), with where they came from
    /// (e.g. `--set model.d_model=256`).
    overrides: Vec<(String, String)>,
}

impl YamlDoc {
    /// Reads and parses `path`. Syntax errors name the file and line.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            file: path.to_path_buf(),
            line: None,
            key_path: String::new(),
            message: format!("cannot read the file: {e}"),
        })?;
        Self::from_text(path, text)
    }

    /// Parses YAML `text` that came from `file` (used in messages only).
    pub fn from_text(file: &Path, text: String) -> Result<Self> {
        let value: Value = serde_yaml_ng::from_str(&text).map_err(|e| Error::Config {
            file: file.to_path_buf(),
            line: e.location().map(|l| l.line()),
            key_path: String::new(),
            message: strip_location(&e.to_string()),
        })?;
        let value = if value.is_null() { Value::Mapping(Default::default()) } else { value };
        Ok(Self { file: file.to_path_buf(), text, value, overrides: Vec::new() })
    }

    /// Applies one `dotted.key.path=value` override; the value is parsed as YAML
    /// (`256` → integer, `true` → bool, `[a, b]` → list, anything else → string).
    pub fn apply_override(&mut self, assignment: &str) -> Result<()> {
        let (key, raw) = assignment.split_once('=').ok_or_else(|| {
            Error::Input(format!("--set {assignment}: expected KEY=VALUE, e.g. model.d_model=256"))
        })?;
        let key = key.trim();
        if key.is_empty() {
            return Err(Error::Input(format!("--set {assignment}: empty key")));
        }
        let new: Value = serde_yaml_ng::from_str(raw)
            .map_err(|e| Error::Input(format!("--set {assignment}: value is not valid YAML: {e}")))?;
        set_path(&mut self.value, &split_path(key), new)
            .map_err(|m| Error::Input(format!("--set {assignment}: {m}")))?;
        self.overrides.push((key.to_string(), format!("--set {assignment}")));
        Ok(())
    }

    /// Sets `key` (dotted path) to `value`; `origin` says where the value came from in error
    /// messages (e.g. `sweeps/x.yaml:12 grid.model.d_model`).
    pub fn set_value(&mut self, key: &str, value: Value, origin: &str) -> Result<()> {
        set_path(&mut self.value, &split_path(key), value).map_err(|m| Error::Input(format!("{origin}: {key}: {m}")))?;
        self.overrides.push((key.to_string(), origin.to_string()));
        Ok(())
    }

    /// The file's text as read.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// A located error for a path of literal mapping keys, which may themselves contain dots
    /// (sweep files use dotted keys such as `grid: {model.d_model: [..]}`); `[i]` items are list
    /// indices. The message shows the keys joined with dots.
    pub fn error_keys(&self, keys: &[&str], message: impl Into<String>) -> Error {
        let segs: Vec<Seg> = keys
            .iter()
            .map(|k| match k.strip_prefix('[').and_then(|r| r.strip_suffix(']')).and_then(|n| n.parse().ok()) {
                Some(i) => Seg::Index(i),
                None => Seg::Key(k.to_string()),
            })
            .collect();
        let mut path = String::new();
        for k in keys {
            path = join_path(&path, k);
        }
        Error::Config { file: self.file.clone(), line: locate_segs(&self.text, segs), key_path: path, message: message.into() }
    }

    /// Deserializes the whole document.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T> {
        self.deserialize_at(&self.value, "")
    }

    /// Deserializes a sub-tree `value` found at `base` (a dotted key path, "" for the root).
    pub fn deserialize_at<T: DeserializeOwned>(&self, value: &Value, base: &str) -> Result<T> {
        serde_path_to_error::deserialize(value.clone()).map_err(|e| {
            let inner = e.path().to_string();
            let path = join_path(base, if inner == "." { "" } else { &inner });
            self.error(&path, strip_location(&e.inner().to_string()))
        })
    }

    /// A located configuration error for `key_path` (dotted, with `[i]` for list items).
    pub fn error(&self, key_path: &str, message: impl Into<String>) -> Error {
        let mut message = message.into();
        let overridden = self
            .overrides
            .iter()
            .rev()
            .find(|(k, _)| key_path == k || key_path.starts_with(&format!("{k}.")) || key_path.starts_with(&format!("{k}[")));
        let line = match overridden {
            Some((_, arg)) => {
                message.push_str(&format!(" (set by {arg})"));
                None
            }
            None => locate_line(&self.text, key_path),
        };
        Error::Config { file: self.file.clone(), line, key_path: key_path.to_string(), message }
    }
}

/// Joins two dotted paths.
pub fn join_path(base: &str, rest: &str) -> String {
    match (base.is_empty(), rest.is_empty()) {
        (true, _) => rest.to_string(),
        (_, true) => base.to_string(),
        _ if rest.starts_with('[') => format!("{base}{rest}"),
        _ => format!("{base}.{rest}"),
    }
}

/// serde_yaml appends " at line L column C"; we print the line ourselves.
fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

#[derive(Debug, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn split_path(path: &str) -> Vec<Seg> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let mut rest = part;
        if let Some(i) = rest.find('[') {
            if i > 0 {
                out.push(Seg::Key(rest[..i].to_string()));
            }
            rest = &rest[i..];
            while let Some(stripped) = rest.strip_prefix('[') {
                let end = stripped.find(']').unwrap_or(stripped.len());
                match stripped[..end].parse() {
                    Ok(n) => out.push(Seg::Index(n)),
                    Err(_) => out.push(Seg::Key(stripped[..end].to_string())),
                }
                rest = stripped.get(end + 1..).unwrap_or("");
            }
        } else if let Ok(n) = rest.parse::<usize>() {
            out.push(Seg::Index(n));
        } else {
            out.push(Seg::Key(rest.to_string()));
        }
    }
    out
}

fn set_path(root: &mut Value, path: &[Seg], new: Value) -> std::result::Result<(), String> {
    let Some((first, rest)) = path.split_first() else {
        *root = new;
        return Ok(());
    };
    match first {
        Seg::Key(k) => {
            if root.is_null() {
                *root = Value::Mapping(Default::default());
            }
            let map = root.as_mapping_mut().ok_or_else(|| format!("`{k}` is inside a value that is not a mapping"))?;
            let key = Value::String(k.clone());
            if !map.contains_key(&key) {
                map.insert(key.clone(), Value::Null);
            }
            set_path(map.get_mut(&key).expect("inserted"), rest, new)
        }
        Seg::Index(i) => {
            let seq = root.as_sequence_mut().ok_or_else(|| format!("index [{i}] into a value that is not a list"))?;
            let len = seq.len();
            let slot = seq.get_mut(*i).ok_or_else(|| format!("index [{i}] out of range (list has {len} items)"))?;
            set_path(slot, rest, new)
        }
    }
}

/// Finds the 1-based line of `key_path` in block-style YAML `text` by following indentation.
/// Returns the deepest line found (the parent's line when the leaf is in flow style).
pub fn locate_line(text: &str, key_path: &str) -> Option<usize> {
    locate_segs(text, split_path(key_path))
}

fn locate_segs(text: &str, segs: Vec<Seg>) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let significant = |l: &str| {
        let t = l.trim_start();
        !t.is_empty() && !t.starts_with('#')
    };
    // Scope: lines (start, end) exclusive, whose content is deeper than `parent_indent`.
    let (mut start, mut end, mut parent_indent): (usize, usize, isize) = (0, lines.len(), -1);
    let mut found = None;
    for seg in segs {
        let mut hit = None;
        match &seg {
            Seg::Key(k) => {
                for (i, l) in lines.iter().enumerate().take(end).skip(start) {
                    if !significant(l) {
                        continue;
                    }
                    let t = l.trim_start().trim_start_matches("- ");
                    if t.starts_with(&format!("{k}:")) || t.starts_with(&format!("\"{k}\":")) {
                        hit = Some(i);
                        break;
                    }
                }
            }
            Seg::Index(n) => {
                let mut count = 0;
                for (i, l) in lines.iter().enumerate().take(end).skip(start) {
                    if significant(l) && l.trim_start().starts_with('-') && indent(l) as isize > parent_indent {
                        if count == *n {
                            hit = Some(i);
                            break;
                        }
                        count += 1;
                    }
                }
            }
        }
        let Some(i) = hit else { break };
        found = Some(i + 1);
        let ind = indent(lines[i]) as isize;
        parent_indent = ind;
        start = i + 1;
        end = (start..lines.len())
            .find(|&j| significant(lines[j]) && (indent(lines[j]) as isize) <= ind)
            .unwrap_or(lines.len());
        if let Seg::Index(_) = seg {
            // Keys of a list item start on the dash line itself.
            start = i;
            parent_indent = ind + 1;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "model:\n  d_model: 64\n  blocks:\n    attention:\n      num_heads: 4\n  pattern:\n    - attention\n    - mlp\ntrain:\n  lr: 1e-3\n";

    #[test]
    fn locates_nested_keys_and_list_items() {
        assert_eq!(locate_line(DOC, "model.d_model"), Some(2));
        assert_eq!(locate_line(DOC, "model.blocks.attention.num_heads"), Some(5));
        assert_eq!(locate_line(DOC, "model.pattern[1]"), Some(8));
        assert_eq!(locate_line(DOC, "train.lr"), Some(10));
        assert_eq!(locate_line(DOC, "train.missing"), Some(9));
        assert_eq!(locate_line(DOC, "nothing"), None);
    }

    #[test]
    fn overrides_parse_yaml_values_and_create_keys() {
        let mut d = YamlDoc::from_text(Path::new("x.yaml"), DOC.to_string()).unwrap();
        d.apply_override("model.d_model=128").unwrap();
        d.apply_override("model.pattern[0]=gdn").unwrap();
        d.apply_override("train.new.key=true").unwrap();
        assert_eq!(d.value["model"]["d_model"].as_u64(), Some(128));
        assert_eq!(d.value["model"]["pattern"][0].as_str(), Some("gdn"));
        assert_eq!(d.value["train"]["new"]["key"].as_bool(), Some(true));
        assert!(d.apply_override("model.pattern[5]=x").is_err());
        assert!(d.apply_override("nokeyvalue").is_err());
        let e = d.error("model.d_model", "bad");
        assert!(e.to_string().contains("set by --set model.d_model=128"), "{e}");
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let e = YamlDoc::from_text(Path::new("bad.yaml"), "a: 1\nb: [1, 2\nc: 3\n".into()).unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("bad.yaml:"), "{s}");
        assert!(matches!(e, Error::Config { line: Some(_), .. }));
    }
}
