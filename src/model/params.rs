//! Trainable parameters: a named, ordered store of `Var`s with deterministic initialization.
//!
//! candle's CPU random generator cannot be seeded, so initial values come from our own PRNG,
//! seeded by `(run seed, parameter name)`: a parameter's initial value does not depend on the
//! order in which layers are built. Each parameter records whether AdamW decays it.
//!
//! Mixed precision ([`ParamBuilder::mixed`], `train.precision: bf16`): the `Var`s (master
//! weights, what the optimizer updates and checkpoints save) are f32, and the tensors handed to
//! the blocks are `var.to_dtype(bf16)` — a graph node, so backpropagation returns the
//! gradient of the *f32* master through candle's `ToDType` backward (the bf16 gradient cast
//! up). The bf16 copies are refreshed in place from the masters by [`ParamStore::refresh_casts`]
//! at the start of every model forward pass ([`crate::model::LanguageModel`]), so a forward
//! always sees the current weights; no block needs to know (the whole model computes in the
//! builder's `dtype`). This is Megatron-LM's `--bf16` scheme (Float16Module + fp32 main params,
//! Micikevicius et al. 2018 "Mixed Precision Training", arXiv:1710.03740): every parameter,
//! norm gains and gate parameters included, is rounded to bf16 at use; the blocks upcast gate
//! and decay parameters and run norm statistics, softmax and the loss in f32
//! ([`crate::ops::reduction_dtype`]). Buffers (MoE selection bias) stay in the master dtype.

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
    /// Mixed precision: the compute-dtype copy handed to the blocks, by parameter name (empty
    /// when the model computes in its master dtype).
    casts: Vec<(String, Tensor)>,
}

impl ParamStore {
    pub fn total(&self) -> usize {
        self.params.values().map(|p| p.var.elem_count()).sum()
    }
    pub fn count_kind(&self, kind: ParamKind) -> usize {
        self.params.values().filter(|p| p.kind == kind).map(|p| p.var.elem_count()).sum()
    }
    /// The dtype the model computes in: the casts' dtype under mixed precision, else the
    /// parameters' (None for an empty store).
    pub fn compute_dtype(&self) -> Option<DType> {
        match self.casts.first() {
            Some((_, t)) => Some(t.dtype()),
            None => self.params.values().find(|p| p.kind != ParamKind::Buffer).map(|p| p.var.dtype()),
        }
    }

    /// Whether the model keeps compute-dtype copies of its weights (mixed precision).
    pub fn has_casts(&self) -> bool {
        !self.casts.is_empty()
    }

    /// The compute-dtype copy of parameter `name` (mixed precision only).
    pub fn cast_of(&self, name: &str) -> Option<&Tensor> {
        self.casts.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// Mixed precision: copies every master weight, cast to the compute dtype, into its compute
    /// copy in place (the copy keeps its place in the autograd graph). No-op without casts.
    pub fn refresh_casts(&self) -> Result<()> {
        for (name, c) in &self.casts {
            let master = self.params[name].var.as_tensor().detach();
            let fresh = master.to_dtype(c.dtype())?.flatten_all()?;
            c.flatten_all()?.slice_set(&fresh, 0, 0)?;
        }
        Ok(())
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
    /// The dtype the blocks compute in (activations, RoPE tables, parameter tensors they get).
    pub dtype: DType,
    /// The dtype of the `Var`s (master weights); differs from `dtype` under mixed precision.
    master: DType,
    pub device: Device,
    kind: ParamKind,
}

impl<'a> ParamBuilder<'a> {
    pub fn new(store: &'a mut ParamStore, seed: u64, dtype: DType, device: &Device) -> Self {
        Self::mixed(store, seed, dtype, dtype, device)
    }

    /// Master weights in `master`, handed to the blocks cast to `compute` (mixed precision; see
    /// the module docs). `mixed(s, seed, d, d, dev)` is [`Self::new`].
    pub fn mixed(store: &'a mut ParamStore, seed: u64, master: DType, compute: DType, device: &Device) -> Self {
        Self { store, prefix: String::new(), seed, dtype: compute, master, device: device.clone(), kind: ParamKind::Body }
    }

    /// A builder for the child scope `name`.
    pub fn pp(&mut self, name: impl std::fmt::Display) -> ParamBuilder<'_> {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        ParamBuilder { store: self.store, prefix, seed: self.seed, dtype: self.dtype, master: self.master, device: self.device.clone(), kind: self.kind }
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
        let t = Tensor::from_vec(values, shape, &self.device)?.to_dtype(self.master)?;
        let var = Var::from_tensor(&t)?;
        let out = if self.master != self.dtype && self.kind != ParamKind::Buffer {
            let c = var.as_tensor().to_dtype(self.dtype)?;
            self.store.casts.push((full.clone(), c.clone()));
            c
        } else {
            var.as_tensor().clone()
        };
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
