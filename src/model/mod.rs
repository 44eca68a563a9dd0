//! The language model: one composition for every architecture.
//!
//! `tokens → embed → n_layers × [x += mixer(RMSNorm(x)); x += ffn(RMSNorm(x))] → RMSNorm → head`,
//! the mixer of layer i being `layer_pattern[i % len]` from the block registry. Parameter names:
//! `embed`, `layers.<i>.{norm1,mixer.*,norm2,ffn.*}`, `final_norm`, `head` (untied only),
//! `mtp.*` (multi-token prediction modules, [`mtp`]). The feed-forward is dense or MoE ([`moe`]).

pub mod collective;
pub mod count;
pub mod ffn;
pub mod moe;
pub mod mtp;
pub mod objective;
pub mod params;

use crate::ops::linear::linear;
use crate::blocks::{self, BlockDims, ForwardCtx, Mixer};
use crate::config::model::ModelSpec;
use crate::ops::norm::rms_norm;
use crate::ops::reduction_dtype;
use crate::ops::softmax::cross_entropy_each;
use candle_core::{DType, Device, Result, Tensor};
use moe::{FeedForward, RouteStats};
use params::{ParamBuilder, ParamKind, ParamStore};

pub struct Layer {
    norm1: Tensor,
    pub mixer: Box<dyn Mixer>,
    norm2: Tensor,
    pub ffn: FeedForward,
}

/// Balancing losses and routing statistics of the MoE layers of one forward pass.
#[derive(Default)]
pub struct AuxOut {
    /// Scalar loss terms to add to the training loss (coefficients included).
    pub losses: Vec<Tensor>,
    /// Per MoE layer, in forward order.
    pub routes: Vec<RouteStats>,
}

impl Layer {
    /// Layer `i` of `spec` with block `name` (model layers, and MTP modules' blocks).
    pub(crate) fn new(spec: &ModelSpec, name: &str, dims: &BlockDims, lb: &mut ParamBuilder) -> Result<Self> {
        let d = spec.d_model;
        let entry = blocks::find(name).ok_or_else(|| candle_core::Error::Msg(format!("unknown block `{name}`")))?;
        let opts = spec.blocks.get(name).cloned().unwrap_or(serde_yaml_ng::Value::Null);
        let norm1 = lb.constant("norm1", &[d], 1.0)?;
        let mixer = (entry.build)(&opts, dims, &mut lb.pp("mixer"))?;
        let norm2 = lb.constant("norm2", &[d], 1.0)?;
        let ffn = FeedForward::new(spec, dims.layer_idx, dims.init_std, dims.out_std, &mut lb.pp("ffn"))?;
        Ok(Self { norm1, mixer, norm2, ffn })
    }

    /// `x += mixer(RMSNorm(x)); x += ffn(RMSNorm(x))`; MoE losses and statistics go to `aux`.
    pub fn forward(&self, x: &Tensor, eps: f64, ctx: &mut ForwardCtx, aux: &mut AuxOut) -> Result<Tensor> {
        let x = match self.mixer.forward_residual(x, &self.norm1, eps, ctx) {
            Some(y) => y?,
            None => (x + self.mixer.forward(&rms_norm(x, &self.norm1, eps)?, ctx)?)?,
        };
        if let FeedForward::Dense(f) = &self.ffn {
            return f.forward_residual(&x, &self.norm2, eps);
        }
        let (f, moe) = self.ffn.forward(&rms_norm(&x, &self.norm2, eps)?)?;
        if let Some((loss, stats)) = moe {
            aux.losses.extend(loss);
            aux.routes.push(stats);
        }
        x + f
    }
}

pub struct LanguageModel {
    pub spec: ModelSpec,
    pub params: ParamStore,
    embed: Tensor,
    pub layers: Vec<Layer>,
    final_norm: Tensor,
    head: Option<Tensor>,
    /// Multi-token prediction modules (training only; absent without `model.mtp`).
    pub mtp: Option<mtp::Mtp>,
}

impl LanguageModel {
    /// Builds the model with its initial weights (deterministic in `seed`). The spec's blocks
    /// must have been resolved (`blocks::resolve_blocks`).
    pub fn new(spec: &ModelSpec, max_seq_len: usize, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        Self::new_mixed(spec, max_seq_len, seed, dtype, dtype, device)
    }

    /// [`Self::new`] with master weights (the `Var`s) in `master` and computation in `compute`
    /// (mixed precision, `train.precision: bf16`: f32 masters, bf16 compute; [`params`]).
    pub fn new_mixed(spec: &ModelSpec, max_seq_len: usize, seed: u64, master: DType, compute: DType, device: &Device) -> Result<Self> {
        let mut store = ParamStore::default();
        let d = spec.d_model;
        let std = spec.init.std;
        let out_std = if spec.init.residual_rescale { std / (2.0 * spec.n_layers as f64).sqrt() } else { std };
        let mut root = ParamBuilder::mixed(&mut store, seed, master, compute, device);
        let embed = root.normal_as("embed", &[spec.vocab_size, d], std, ParamKind::Embedding)?;
        let mut layers = Vec::with_capacity(spec.n_layers);
        for i in 0..spec.n_layers {
            let dims = BlockDims { d_model: d, max_seq_len, n_layers: spec.n_layers, layer_idx: i, init_std: std, out_std };
            layers.push(Layer::new(spec, spec.block_of_layer(i), &dims, &mut root.pp(format!("layers.{i}")))?);
        }
        let final_norm = root.constant("final_norm", &[d], 1.0)?;
        let head = if spec.tied_embeddings {
            None
        } else {
            Some(root.normal_as("head", &[spec.vocab_size, d], std, ParamKind::Head)?)
        };
        let mtp = match &spec.mtp {
            Some(m) => Some(mtp::Mtp::new(m, spec, max_seq_len, &mut root.pp("mtp"))?),
            None => None,
        };
        Ok(Self { spec: spec.clone(), params: store, embed, layers, final_norm, head, mtp })
    }

    /// Token embeddings `[B, T, d]` for tokens `[B, T]` (u32). Every forward pass starts here, so
    /// under mixed precision this is where the compute copies are refreshed from the masters.
    fn embed_tokens(&self, tokens: &Tensor) -> Result<Tensor> {
        self.params.refresh_casts()?;
        let (b, t) = tokens.dims2()?;
        self.embed.index_select(&tokens.flatten_all()?, 0)?.reshape((b, t, self.spec.d_model))
    }

    /// Residual stream after layers `range` (before the final norm), starting from `x`.
    fn run_layers(&self, mut x: Tensor, range: std::ops::Range<usize>, ctx: &mut ForwardCtx, aux: &mut AuxOut) -> Result<Tensor> {
        for l in &self.layers[range] {
            x = l.forward(&x, self.spec.norm_eps, ctx, aux)?;
        }
        Ok(x)
    }

    /// Residual stream after the last layer (before the final norm) `[B, T, d]`, with the MoE
    /// layers' losses and statistics.
    pub fn residual(&self, tokens: &Tensor) -> Result<(Tensor, AuxOut)> {
        let mut aux = AuxOut::default();
        let x = self.run_layers(self.embed_tokens(tokens)?, 0..self.layers.len(), &mut ForwardCtx::default(), &mut aux)?;
        Ok((x, aux))
    }

    /// Final hidden states `[B, T, d]` for tokens `[B, T]` (u32).
    pub fn hidden(&self, tokens: &Tensor) -> Result<Tensor> {
        rms_norm(&self.residual(tokens)?.0, &self.final_norm, self.spec.norm_eps)
    }

    /// The MoE layers, in depth order (MTP modules' MoE layers excluded).
    pub fn moe_layers(&self) -> impl Iterator<Item = &moe::Moe> {
        self.layers.iter().filter_map(|l| l.ffn.as_moe())
    }

    /// Logits `[B·T, V]` from hidden states `[B, T, d]`.
    fn logits_flat(&self, h: &Tensor) -> Result<Tensor> {
        let (b, t, _d) = h.dims3()?;
        let w = self.head.as_ref().unwrap_or(&self.embed);
        linear(h, &w.t()?.contiguous()?, (b * t, w.dim(0)?))
    }

    /// Per-position cross-entropy `[B·T]` of the head on normalized hidden states `[B, T, d]`
    /// against `targets` (`B·T` elements): the head and the loss as one node on the CPU
    /// ([`crate::ops::head_ce`]), the logits never a graph tensor.
    pub(crate) fn head_ce_each(&self, hn: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let w = self.head.as_ref().unwrap_or(&self.embed);
        crate::ops::head_ce::head_ce(hn, w, &targets.flatten_all()?)
    }

    /// Logits `[B, T, V]`.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        self.logits_flat(&self.hidden(tokens)?)?.reshape((b, t, self.spec.vocab_size))
    }

    /// Mean next-token cross-entropy; inputs and targets `[B, T]`.
    pub fn loss(&self, inputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
        self.head_ce_each(&self.hidden(inputs)?, targets)?.mean_all()
    }

    /// Per-position cross-entropy `[B·T]` (nats), no gradient needed.
    pub fn loss_each(&self, inputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
        self.head_ce_each(&self.hidden(inputs)?, targets)
    }

    /// Per-position cross-entropy `[B·T]` (as [`Self::loss_each`]) and whether the argmax of the
    /// logits equals the target `[B·T]` (u8), from one forward pass.
    pub fn loss_and_correct_each(&self, inputs: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
        let logits = self.logits_flat(&self.hidden(inputs)?)?;
        let t = targets.flatten_all()?;
        let each = cross_entropy_each(&logits.to_dtype(reduction_dtype(logits.dtype()))?, &t)?;
        let correct = logits.argmax(candle_core::D::Minus1)?.eq(&t)?;
        Ok((each, correct))
    }
}

