//! Trainable parameters: a named, ordered store of `Var`s with deterministic initialization.
//!
//! candle's CPU random generator cannot be seeded, so initial values come from our own PRNG,
//! seeded by `(run seed, parameter name)`: a parameter's initial value does not depend on the
//! order in which layers are built. Each parameter records whether AdamW decays it.

use crate::data::rng::{mix, Rng};
use candle_core::{DType, Device, Result, Tensor, Var};
use std::collections::BTreeMap;

/// What a parameter is, for accounting (embedding vs non-embedding) and weight decay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// Input embedding (and the head when tied).
    Embedding,
    /// Untied output head.
    Head,
    /// Anything else.
    Body,
    /// A non-gradient buffer saved with the weights (e.g. the MoE router's selection bias):
    /// not counted as a parameter, never updated by the optimizer.
    Buffer,
}

#[derive(Clone, Debug)]
pub struct Param {
    pub var: Var,
    pub decay: bool,
    pub kind: ParamKind,
}

/// All parameters of a model, keyed by dotted name (sorted: iteration order is stable).
#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    pub params: BTreeMap<String, Param>,
}

impl ParamStore {
    pub fn total(&self) -> usize {
        self.params.values().map(|p| p.var.elem_count()).sum()
    }
    pub fn count_kind(&self, kind: ParamKind) -> usize {
        self.params.values().filter(|p| p.kind == kind).map(|p| p.var.elem_count()).sum()
    }
    /// Tensors by name (for saving).
    pub fn tensors(&self) -> std::collections::HashMap<String, Tensor> {
        self.params.iter().map(|(k, p)| (k.clone(), p.var.as_tensor().clone())).collect()
    }
}

/// Creates parameters under a name prefix (`pp` descends like a path, as candle's VarBuilder).
pub struct ParamBuilder<'a> {
    store: &'a mut ParamStore,
    prefix: String,
    seed: u64,
    pub dtype: DType,
    pub device: Device,
    kind: ParamKind,
}

impl<'a> ParamBuilder<'a> {
    pub fn new(store: &'a mut ParamStore, seed: u64, dtype: DType, device: &Device) -> Self {
        Self { store, prefix: String::new(), seed, dtype, device: device.clone(), kind: ParamKind::Body }
    }

    /// A builder for the child scope `name`.
    pub fn pp(&mut self, name: impl std::fmt::Display) -> ParamBuilder<'_> {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        ParamBuilder { store: self.store, prefix, seed: self.seed, dtype: self.dtype, device: self.device.clone(), kind: self.kind }
    }


    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) }
    }

    /// N(0, std²) parameter of a given kind (embedding, head).
    pub fn normal_as(&mut self, name: &str, shape: &[usize], std: f64, kind: ParamKind) -> Result<Tensor> {
        let saved = std::mem::replace(&mut self.kind, kind);
        let t = self.normal(name, shape, std);
        self.kind = saved;
        t
    }

    fn insert(&mut self, name: &str, values: Vec<f64>, shape: &[usize], decay: bool) -> Result<Tensor> {
        let full = self.full(name);
        if self.store.params.contains_key(&full) {
            candle_core::bail!("parameter `{full}` defined twice");
        }
        let t = Tensor::from_vec(values, shape, &self.device)?.to_dtype(self.dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        self.store.params.insert(full, Param { var, decay, kind: self.kind });
        Ok(out)
    }

    /// N(0, std²) entries; weight-decayed when 2-D or more.
    pub fn normal(&mut self, name: &str, shape: &[usize], std: f64) -> Result<Tensor> {
        self.normal_with_decay(name, shape, std, shape.len() >= 2)
    }

    /// N(0, std²) entries with an explicit decay flag (e.g. short-conv weights: no decay).
    pub fn normal_with_decay(&mut self, name: &str, shape: &[usize], std: f64, decay: bool) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let mut rng = self.rng_for(name);
        let v = (0..n).map(|_| rng.normal() * std).collect();
        self.insert(name, v, shape, decay)
    }

    /// The generator [`Self::normal`] uses for parameter `name`, seeded by (run seed, full
    /// name): for special inits passed to [`Self::values`].
    pub fn rng_for(&self, name: &str) -> Rng {
        Rng::new(mix(self.seed, name_hash(&self.full(name))))
    }

    /// Constant entries (norm gains: ones); never weight-decayed.
    pub fn constant(&mut self, name: &str, shape: &[usize], value: f64) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        self.insert(name, vec![value; n], shape, false)
    }

    /// A [`ParamKind::Buffer`] with constant entries; returns the `Var` so its owner can
    /// update it in place (e.g. after each optimizer step).
    pub fn buffer(&mut self, name: &str, shape: &[usize], value: f64) -> Result<Var> {
        let saved = std::mem::replace(&mut self.kind, ParamKind::Buffer);
        let n: usize = shape.iter().product();
        let t = self.insert(name, vec![value; n], shape, false);
        self.kind = saved;
        t?;
        Ok(self.store.params[&self.full(name)].var.clone())
    }

    /// Explicit values with an explicit decay flag (for blocks with special inits, e.g. decay rates).
    pub fn values(&mut self, name: &str, shape: &[usize], values: Vec<f64>, decay: bool) -> Result<Tensor> {
        self.insert(name, values, shape, decay)
    }
}

/// FNV-1a of a parameter name.
pub fn name_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}
