//! Model spec (`model:` section of an architecture file).
//!
//! A model is an embedding, `n_layers` pre-norm residual layers
//! `x += mixer(RMSNorm(x)); x += ffn(RMSNorm(x))`, a final RMSNorm and a (tied or untied) head.
//! The mixer of layer `i` is `layer_pattern[i % len]`; each block name's options live under
//! `blocks.<name>` and are checked by that block's own config struct (see `mixscale blocks`).

use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;
use std::collections::BTreeMap;

/// `model:` — architecture. Every field has a default except the sizes that define a model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    /// Block names cycled over the depth, e.g. `[attention]` or `[gated_deltanet, attention]`.
    #[serde(default = "default_pattern")]
    pub layer_pattern: Vec<String>,
    /// Per-block options, keyed by block name; missing options take the block's defaults.
    #[serde(default)]
    pub blocks: BTreeMap<String, Value>,
    #[serde(default)]
    pub ffn: FfnSpec,
    /// RMSNorm epsilon for the layer norms and the final norm.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Share the input embedding with the output head.
    #[serde(default = "default_true")]
    pub tied_embeddings: bool,
    #[serde(default)]
    pub init: InitSpec,
    /// Mixture-of-experts feed-forward (absent = dense everywhere); see [`super::moe`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<super::moe::MoeSpec>,
    /// Multi-token prediction (absent = next-token only); see [`super::mtp`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtp: Option<super::mtp::MtpSpec>,
}

/// `model.ffn:` — the feed-forward of every layer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FfnSpec {
    /// `swiglu` (Shazeer 2020), `relu2` (squared ReLU, So et al. 2021 "Primer") or `rwkv7_cmix`
    /// (RWKV-7 channel-mix: token shift + squared ReLU; use hidden_ratio 4 as RWKV does).
    #[serde(default = "default_ffn_kind")]
    pub kind: FfnKind,
    /// Hidden width = round_up(hidden_ratio · d_model, multiple_of), unless `hidden_size` is set.
    #[serde(default = "default_hidden_ratio")]
    pub hidden_ratio: f64,
    #[serde(default = "default_multiple_of")]
    pub multiple_of: usize,
    #[serde(default)]
    pub hidden_size: Option<usize>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FfnKind {
    Swiglu,
    Relu2,
    Rwkv7Cmix,
}

/// `model.init:` — N(0, std) for every matrix and the embedding (fla / GPT-2 convention); the
/// residual output projections (mixer output, FFN down) use std / sqrt(2·n_layers) when
/// `residual_rescale` is on (GPT-2, Radford et al. 2019, §2.3).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InitSpec {
    #[serde(default = "default_std")]
    pub std: f64,
    #[serde(default = "default_true")]
    pub residual_rescale: bool,
}

impl Default for FfnSpec {
    fn default() -> Self {
        Self {
            kind: default_ffn_kind(),
            hidden_ratio: default_hidden_ratio(),
            multiple_of: default_multiple_of(),
            hidden_size: None,
        }
    }
}

impl Default for InitSpec {
    fn default() -> Self {
        Self { std: default_std(), residual_rescale: true }
    }
}

impl FfnSpec {
    /// The hidden width for a model of width `d_model`.
    pub fn hidden(&self, d_model: usize) -> usize {
        if let Some(h) = self.hidden_size {
            return h;
        }
        let raw = (self.hidden_ratio * d_model as f64).round() as usize;
        let m = self.multiple_of.max(1);
        raw.div_ceil(m) * m
    }
}

impl ModelSpec {
    /// The block name of layer `i`.
    pub fn block_of_layer(&self, i: usize) -> &str {
        &self.layer_pattern[i % self.layer_pattern.len()]
    }
}

fn default_pattern() -> Vec<String> {
    vec!["attention".into()]
}
fn default_norm_eps() -> f64 {
    1e-6
}
fn default_true() -> bool {
    true
}
fn default_ffn_kind() -> FfnKind {
    FfnKind::Swiglu
}
fn default_hidden_ratio() -> f64 {
    8.0 / 3.0
}
fn default_multiple_of() -> usize {
    32
}
fn default_std() -> f64 {
    0.02
}
