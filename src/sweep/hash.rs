//! Trial identity: a stable hash of the resolved config.
//!
//! The resolved [`RunSpec`] (every default filled in, blocks resolved) is serialized to
//! canonical JSON — object keys sorted, no whitespace, numbers as serde_json prints them
//! (shortest round-trip form) — with `train.seed` set to 0, and hashed with SHA-256; the first
//! 12 hex digits name the config. The seed is kept apart: the trial key (and run folder) is
//! `<hash>-s<seed>`, so the replicates of one config share a hash. Reference:
//! `../shared/reference/sweeps-storage-tracking.md` §6 ("derive trial identity from the config
//! hash plus the seed; never from counters").

use crate::config::RunSpec;
use sha2::{Digest, Sha256};

/// Canonical JSON text of a JSON value (sorted keys, compact).
pub fn canonical_json(v: &serde_json::Value) -> String {
    let mut out = String::new();
    write(v, &mut out);
    out
}

fn write(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k).expect("string"));
                out.push(':');
                write(&m[*k], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&serde_json::to_string(other).expect("scalar")),
    }
}

/// The canonical JSON of a resolved spec, seed normalized to 0.
pub fn spec_json(spec: &RunSpec) -> String {
    let mut s = spec.clone();
    s.train.seed = 0;
    let v = serde_json::to_value(&s).expect("spec serializes");
    canonical_json(&v)
}

/// 12 hex digits of SHA-256 of the canonical config (seed excluded).
pub fn config_hash(spec: &RunSpec) -> String {
    let d = Sha256::digest(spec_json(spec).as_bytes());
    d.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// The trial key and run-folder name: `<hash>-s<seed>`.
pub fn trial_key(spec: &RunSpec) -> String {
    format!("{}-s{}", config_hash(spec), spec.train.seed)
}

/// A 64-bit number from a hex hash (for Hyperband brackets).
pub fn hash_u64(hash: &str) -> u64 {
    u64::from_str_radix(&hash[..hash.len().min(16)], 16).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_recursively() {
        let a: serde_json::Value = serde_json::from_str(r#"{"b":1,"a":{"d":[1,{"y":2,"x":1}],"c":0.1}}"#).unwrap();
        assert_eq!(canonical_json(&a), r#"{"a":{"c":0.1,"d":[1,{"x":1,"y":2}]},"b":1}"#);
    }
}
