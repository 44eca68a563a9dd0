//! MoBA attention layer (Lu et al., Moonshot AI 2025, arXiv:2502.13189): the Llama-style
//! attention layer of [`crate::blocks::attention`] (projections, GQA, optional QK-norm, RoPE)
//! with the causal softmax replaced by Mixture of Block Attention ([`crate::ops::moba`]): each
//! query attends to its own block and the `top_k − 1` fully past blocks whose mean key scores
//! highest against it. No parameters beyond attention's (MoBA adds none); fla's `MoBAConfig`
//! defaults `moba_chunk_size = 256`, `moba_topk = 4`. `../shared/reference/mixers.md` §5.
//!
//! Choose `block_size` and `top_k` relative to the training context: with
//! `top_k·block_size ≥ seq_len` every query sees its whole prefix and MoBA is full attention.
//! Parameters have the same names and inits as `attention`, so equal seeds give equal weights.

use super::attention::{Attention, AttentionConfig};
use super::{BlockConfig, BlockDims, BlockEntry, ForwardCtx, Mixer};
use crate::model::params::ParamBuilder;
use crate::ops::attn_sublayer::Core;
use crate::ops::moba::moba;
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

pub const ENTRY: BlockEntry = BlockEntry {
    name: "moba",
    about: "MoBA block-sparse attention (own block + top-k past blocks by mean key; RoPE, GQA, optional QK-norm)",
    defaults: super::defaults_of::<MobaConfig>,
    normalize: super::normalize_with::<MobaConfig>,
    build: |v, dims, pb| Ok(Box::new(Moba::new(&super::parse(v)?, dims, pb)?)),
};

/// Options of `blocks.moba`: attention's, plus the block size and top-k.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MobaConfig {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA); null = num_heads.
    pub num_kv_heads: Option<usize>,
    /// Head dimension; null = d_model / num_heads.
    pub head_dim: Option<usize>,
    /// Per-head RMSNorm on q and k before RoPE.
    pub qk_norm: bool,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// Epsilon of the QK-norm.
    pub norm_eps: f64,
    /// Tokens per key block (MoBA's `moba_chunk_size`).
    pub block_size: usize,
    /// Blocks each query attends to, its own included (MoBA's `moba_topk`).
    pub top_k: usize,
}

impl Default for MobaConfig {
    fn default() -> Self {
        let a = AttentionConfig::default();
        Self {
            num_heads: a.num_heads,
            num_kv_heads: a.num_kv_heads,
            head_dim: a.head_dim,
            qk_norm: a.qk_norm,
            rope_theta: a.rope_theta,
            norm_eps: a.norm_eps,
            block_size: 256,
            top_k: 4,
        }
    }
}

impl MobaConfig {
    fn attention(&self) -> AttentionConfig {
        AttentionConfig {
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            qk_norm: self.qk_norm,
            rope_theta: self.rope_theta,
            norm_eps: self.norm_eps,
            ..AttentionConfig::default()
        }
    }
}

impl BlockConfig for MobaConfig {
    fn check(&self, d_model: usize) -> std::result::Result<(), (String, String)> {
        self.attention().check(d_model)?;
        if self.block_size == 0 {
            return Err(("block_size".into(), "must be at least 1".into()));
        }
        if self.top_k == 0 {
            return Err(("top_k".into(), "must be at least 1 (the own block counts toward top_k)".into()));
        }
        Ok(())
    }
}

pub struct Moba {
    cfg: MobaConfig,
    attn: Attention,
    d_model: usize,
}

impl Moba {
    pub fn new(cfg: &MobaConfig, dims: &BlockDims, pb: &mut ParamBuilder) -> Result<Self> {
        Ok(Self { cfg: cfg.clone(), attn: Attention::new(&cfg.attention(), dims, pb)?, d_model: dims.d_model })
    }
}

impl Mixer for Moba {
    fn forward(&self, x: &Tensor, _ctx: &mut ForwardCtx) -> Result<Tensor> {
        let (bs, k) = (self.cfg.block_size, self.cfg.top_k);
        self.attn.forward_with(x, &|q, k_, v| moba(q, k_, v, bs, k))
    }

    /// One fused node on CPU (see [`Attention::sublayer`]).
    fn forward_residual(&self, x: &Tensor, g: &Tensor, eps: f64, _ctx: &mut ForwardCtx) -> Option<Result<Tensor>> {
        self.attn.sublayer(x, g, eps, Core::Moba { block_size: self.cfg.block_size, top_k: self.cfg.top_k })
    }

    /// Attention's count with the mixing term over the keys a query can see: at most
    /// `min(T, top_k·block_size)` (full-context convention, as attention's 4·T·H·D).
    fn flops_per_token(&self, seq_len: usize) -> f64 {
        let full = self.attn.flops_per_token(seq_len);
        let hd = self.cfg.head_dim.unwrap_or(self.d_model / self.cfg.num_heads);
        let seen = seq_len.min(self.cfg.top_k * self.cfg.block_size);
        full - 4.0 * ((seq_len - seen) * self.cfg.num_heads * hd) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::ParamStore;
    use crate::testing::{assert_close, check_block_grads, check_sublayer, rand_tensor};
    use candle_core::{DType, Device};

    fn dims(d: usize, t: usize) -> BlockDims {
        BlockDims { d_model: d, max_seq_len: t, n_layers: 2, layer_idx: 0, init_std: 0.3, out_std: 0.3 }
    }

    /// top_k ≥ number of blocks: the MoBA layer is the attention layer (same weights); with
    /// fewer blocks it is not.
    #[test]
    fn all_blocks_is_attention_layer() {
        let (d, t) = (16, 23);
        let cfg = MobaConfig { num_heads: 4, num_kv_heads: Some(2), qk_norm: true, block_size: 5, top_k: 5, ..Default::default() };
        let (mut s1, mut s2) = (ParamStore::default(), ParamStore::default());
        let m = Moba::new(&cfg, &dims(d, t), &mut ParamBuilder::new(&mut s1, 7, DType::F64, &Device::Cpu)).unwrap();
        let a = Attention::new(&cfg.attention(), &dims(d, t), &mut ParamBuilder::new(&mut s2, 7, DType::F64, &Device::Cpu)).unwrap();
        let x = rand_tensor(&[2, t, d], 1.0, 4);
        let want = a.forward(&x, &mut ForwardCtx::default()).unwrap();
        assert_close("moba(all blocks) vs attention", &want, &m.forward(&x, &mut ForwardCtx::default()).unwrap(), 1e-12);
        let sparse = Moba::new(&MobaConfig { top_k: 2, ..cfg }, &dims(d, t), &mut ParamBuilder::new(&mut ParamStore::default(), 7, DType::F64, &Device::Cpu)).unwrap();
        let diff = (want - sparse.forward(&x, &mut ForwardCtx::default()).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff > 1e-4, "top_k = 2 of 5 blocks must differ from full attention; max diff {diff:e}");
    }

    /// Finite differences of the layer w.r.t. its input and every parameter (sparse setting).
    #[test]
    fn gradients_match_finite_differences() {
        let cfg = MobaConfig { num_heads: 2, num_kv_heads: Some(1), qk_norm: true, block_size: 3, top_k: 2, ..Default::default() };
        let mut store = ParamStore::default();
        let m = Moba::new(&cfg, &dims(8, 11), &mut ParamBuilder::new(&mut store, 7, DType::F64, &Device::Cpu)).unwrap();
        check_block_grads(&m, &store, &[2, 11, 8]);
    }

    /// The fused sublayer (norm, projections, RoPE, MoBA kernel, residual in one node) == the
    /// composed block with its pre-norm and residual, f64 (plus finite differences) and f32;
    /// QK-norm keeps the composed path.
    #[test]
    fn fused_sublayer_matches_composed() {
        let cfg = MobaConfig { num_heads: 4, num_kv_heads: Some(2), block_size: 8, top_k: 2, ..Default::default() };
        for (dt, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
            let mut store = ParamStore::default();
            let m = Moba::new(&cfg, &dims(16, 37), &mut ParamBuilder::new(&mut store, 7, dt, &Device::Cpu)).unwrap();
            check_sublayer(&m, &store, &[2, 37, 16], tol);
        }
        let qk = Moba::new(&MobaConfig { qk_norm: true, ..cfg }, &dims(16, 5), &mut ParamBuilder::new(&mut ParamStore::default(), 7, DType::F64, &Device::Cpu)).unwrap();
        let x = rand_tensor(&[1, 5, 16], 1.0, 1);
        assert!(qk.forward_residual(&x, &Tensor::ones(16, DType::F64, &Device::Cpu).unwrap(), 1e-6, &mut ForwardCtx::default()).is_none());
    }

    /// The mixing FLOPs shrink to top_k·block_size keys per query once T exceeds it.
    #[test]
    fn flops_count_selected_keys() {
        let cfg = MobaConfig { num_heads: 4, block_size: 16, top_k: 2, ..Default::default() };
        let m = Moba::new(&cfg, &dims(32, 256), &mut ParamBuilder::new(&mut ParamStore::default(), 7, DType::F64, &Device::Cpu)).unwrap();
        let a = Attention::new(&cfg.attention(), &dims(32, 256), &mut ParamBuilder::new(&mut ParamStore::default(), 7, DType::F64, &Device::Cpu)).unwrap();
        assert_eq!(m.flops_per_token(32), a.flops_per_token(32));
        assert_eq!(a.flops_per_token(256) - m.flops_per_token(256), 4.0 * ((256 - 32) * 32) as f64);
    }
}
