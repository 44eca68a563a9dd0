//! The language model: one composition for every architecture.
//!
//! `tokens → embed → n_layers × [x += mixer(RMSNorm(x)); x += ffn(RMSNorm(x))] → RMSNorm → head`,
//! the mixer of layer i being `layer_pattern[i % len]` from the block registry. Parameter names:
//! `embed`, `layers.<i>.{norm1,mixer.*,norm2,ffn.*}`, `final_norm`, `head` (untied only).

pub mod count;
pub mod ffn;
pub mod params;

use crate::blocks::{self, BlockDims, ForwardCtx, Mixer};
use crate::config::model::ModelSpec;
use crate::ops::norm::rms_norm;
use crate::ops::reduction_dtype;
use crate::ops::softmax::{cross_entropy, cross_entropy_each};
use candle_core::{DType, Device, Result, Tensor};
use ffn::Ffn;
use params::{ParamBuilder, ParamKind, ParamStore};


pub struct Layer {
    norm1: Tensor,
    pub mixer: Box<dyn Mixer>,
    norm2: Tensor,
    pub ffn: Ffn,
}

pub struct LanguageModel {
    pub spec: ModelSpec,
    pub params: ParamStore,
    embed: Tensor,
    pub layers: Vec<Layer>,
    final_norm: Tensor,
    head: Option<Tensor>,
}

impl LanguageModel {
    /// Builds the model with its initial weights (deterministic in `seed`). The spec's blocks
    /// must have been resolved (`blocks::resolve_blocks`).
    pub fn new(spec: &ModelSpec, max_seq_len: usize, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let mut store = ParamStore::default();
        let d = spec.d_model;
        let std = spec.init.std;
        let out_std = if spec.init.residual_rescale { std / (2.0 * spec.n_layers as f64).sqrt() } else { std };
        let mut root = ParamBuilder::new(&mut store, seed, dtype, device);
        let embed = root.normal_as("embed", &[spec.vocab_size, d], std, ParamKind::Embedding)?;
        let mut layers = Vec::with_capacity(spec.n_layers);
        for i in 0..spec.n_layers {
            let name = spec.block_of_layer(i);
            let entry = blocks::find(name).ok_or_else(|| candle_core::Error::Msg(format!("unknown block `{name}`")))?;
            let opts = spec.blocks.get(name).cloned().unwrap_or(serde_yaml_ng::Value::Null);
            let dims = BlockDims { d_model: d, max_seq_len, n_layers: spec.n_layers, layer_idx: i, init_std: std, out_std };
            let mut lb = root.pp(format!("layers.{i}"));
            let norm1 = lb.constant("norm1", &[d], 1.0)?;
            let mixer = (entry.build)(&opts, &dims, &mut lb.pp("mixer"))?;
            let norm2 = lb.constant("norm2", &[d], 1.0)?;
            let ffn = Ffn::new_at(spec.ffn.kind, d, spec.ffn.hidden(d), std, out_std, (i, spec.n_layers), &mut lb.pp("ffn"))?;
            layers.push(Layer { norm1, mixer, norm2, ffn });
        }
        let final_norm = root.constant("final_norm", &[d], 1.0)?;
        let head = if spec.tied_embeddings {
            None
        } else {
            Some(root.normal_as("head", &[spec.vocab_size, d], std, ParamKind::Head)?)
        };
        Ok(Self { spec: spec.clone(), params: store, embed, layers, final_norm, head })
    }

    /// Final hidden states `[B, T, d]` for tokens `[B, T]` (u32).
    pub fn hidden(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let mut x = self.embed.index_select(&tokens.flatten_all()?, 0)?.reshape((b, t, self.spec.d_model))?;
        let eps = self.spec.norm_eps;
        let mut ctx = ForwardCtx::default();
        for l in &self.layers {
            x = (&x + l.mixer.forward(&rms_norm(&x, &l.norm1, eps)?, &mut ctx)?)?;
            x = (&x + l.ffn.forward(&rms_norm(&x, &l.norm2, eps)?)?)?;
        }
        rms_norm(&x, &self.final_norm, eps)
    }

    /// Logits `[B·T, V]` from hidden states `[B, T, d]`.
    fn logits_flat(&self, h: &Tensor) -> Result<Tensor> {
        let (b, t, d) = h.dims3()?;
        let w = self.head.as_ref().unwrap_or(&self.embed);
        h.reshape((b * t, d))?.matmul(&w.t()?)
    }

    /// Logits `[B, T, V]`.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        self.logits_flat(&self.hidden(tokens)?)?.reshape((b, t, self.spec.vocab_size))
    }

    /// Mean next-token cross-entropy; inputs and targets `[B, T]`.
    pub fn loss(&self, inputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let logits = self.logits_flat(&self.hidden(inputs)?)?;
        cross_entropy(&logits.to_dtype(reduction_dtype(logits.dtype()))?, &targets.flatten_all()?)
    }

    /// Per-position cross-entropy `[B·T]` (nats), no gradient needed.
    pub fn loss_each(&self, inputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let logits = self.logits_flat(&self.hidden(inputs)?)?;
        cross_entropy_each(&logits.to_dtype(reduction_dtype(logits.dtype()))?, &targets.flatten_all()?)
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

