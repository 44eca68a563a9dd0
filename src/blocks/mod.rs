//! Token mixers and their registry.
//!
//! A mixer maps `[B, T, d_model]` → `[B, T, d_model]` causally. Each lives in one file with a
//! serde config struct (`deny_unknown_fields`, defaults), its layer, its reference form and its
//! tests; registering it is one line in [`REGISTRY`].

pub mod attention;
pub mod fox;
pub mod gated_deltanet;
pub mod mamba2;
pub mod moba;
pub mod rwkv7;

use crate::config::model::ModelSpec;
use crate::config::{join_path, YamlDoc};
use crate::error::Result;
use crate::model::params::ParamBuilder;
use candle_core::Tensor;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_yaml_ng::Value;

/// Model-level facts a block needs to build itself.
#[derive(Clone, Debug)]
pub struct BlockDims {
    pub d_model: usize,
    /// Longest sequence the block will see (RoPE tables etc.).
    pub max_seq_len: usize,
    pub n_layers: usize,
    pub layer_idx: usize,
    /// Init std for input projections.
    pub init_std: f64,
    /// Init std for the output projection into the residual stream.
    pub out_std: f64,
}

/// State threaded through the layers of one forward pass (e.g. RWKV-7's `v_first`).
#[derive(Default)]
pub struct ForwardCtx {
    pub v_first: Option<Tensor>,
}

/// A token mixer layer.
pub trait Mixer: Send + Sync {
    /// x `[B, T, d]` → `[B, T, d]`, causal.
    fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> candle_core::Result<Tensor>;
    /// Forward FLOPs per token at context `seq_len`: 2 per weight multiply-add plus the
    /// token-mixing term (documented per block).
    fn flops_per_token(&self, seq_len: usize) -> f64;
    /// The pre-norm sublayer `x + self(RMSNorm(x; g))` as one fused op, where the block has
    /// one for this input (dtype, device, options); `None` makes the caller compose norm,
    /// [`Mixer::forward`] and the residual add. Both give the same values.
    fn forward_residual(&self, _x: &Tensor, _g: &Tensor, _eps: f64, _ctx: &mut ForwardCtx) -> Option<candle_core::Result<Tensor>> {
        None
    }
}

/// A block's config: typed options with defaults and a semantic check.
pub trait BlockConfig: DeserializeOwned + Serialize + Default {
    /// Checks the options against the model width; `Err((key, message))` names the option.
    fn check(&self, d_model: usize) -> std::result::Result<(), (String, String)>;
}

/// One registered block.
pub struct BlockEntry {
    pub name: &'static str,
    pub about: &'static str,
    /// The default options, as YAML (for `mixscale blocks`).
    pub defaults: fn() -> Value,
    /// Parses options (located errors), checks them and returns them with defaults filled in.
    pub normalize: fn(&YamlDoc, &Value, &str, usize) -> Result<Value>,
    pub build: fn(&Value, &BlockDims, &mut ParamBuilder) -> candle_core::Result<Box<dyn Mixer>>,
}

/// Every block mixscale knows. Adding a block: one file plus one line here.
pub static REGISTRY: &[BlockEntry] = &[attention::ENTRY, gated_deltanet::ENTRY, mamba2::ENTRY, rwkv7::ENTRY, fox::ENTRY, moba::ENTRY];

pub fn known_names() -> Vec<String> {
    REGISTRY.iter().map(|b| b.name.to_string()).collect()
}

pub fn find(name: &str) -> Option<&'static BlockEntry> {
    REGISTRY.iter().find(|b| b.name == name)
}

/// Default options of config type `C` as YAML.
pub fn defaults_of<C: BlockConfig>() -> Value {
    serde_yaml_ng::to_value(C::default()).expect("block config serializes")
}

/// Generic `normalize` for config type `C`.
pub fn normalize_with<C: BlockConfig>(doc: &YamlDoc, v: &Value, base: &str, d_model: usize) -> Result<Value> {
    let v = if v.is_null() { Value::Mapping(Default::default()) } else { v.clone() };
    let cfg: C = doc.deserialize_at(&v, base)?;
    cfg.check(d_model).map_err(|(k, m)| doc.error(&join_path(base, &k), m))?;
    Ok(serde_yaml_ng::to_value(&cfg).expect("block config serializes"))
}

/// Parses block options from a (normalized) value; used by `build`.
pub fn parse<C: BlockConfig>(v: &Value) -> candle_core::Result<C> {
    serde_yaml_ng::from_value(v.clone()).map_err(|e| candle_core::Error::Msg(format!("block options: {e}")))
}

/// Checks every block named in `model.layer_pattern` and its options, and fills in defaults
/// (so the run's resolved config records every option).
pub fn resolve_blocks(doc: &YamlDoc, model: &mut ModelSpec) -> Result<()> {
    for (i, name) in model.layer_pattern.iter().enumerate() {
        if find(name).is_none() {
            return Err(doc.error(
                &format!("model.layer_pattern[{i}]"),
                format!("unknown block `{name}`; known blocks: {}", known_names().join(", ")),
            ));
        }
    }
    for name in model.blocks.keys() {
        if !model.layer_pattern.contains(name) {
            let msg = if find(name).is_some() {
                format!("options for block `{name}`, which is not in model.layer_pattern")
            } else {
                format!("unknown block `{name}`; known blocks: {}", known_names().join(", "))
            };
            return Err(doc.error(&format!("model.blocks.{name}"), msg));
        }
    }
    let names: std::collections::BTreeSet<String> = model.layer_pattern.iter().cloned().collect();
    for name in names {
        let entry = find(&name).expect("checked above");
        let given = model.blocks.get(&name).cloned().unwrap_or(Value::Null);
        let full = (entry.normalize)(doc, &given, &format!("model.blocks.{name}"), model.d_model)?;
        model.blocks.insert(name, full);
    }
    Ok(())
}
