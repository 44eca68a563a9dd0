//! Rotary position embedding (Su et al. 2021, arXiv:2104.09864) in the half-split layout
//! (NeoX / HF `rotate_half`: dimension i pairs with i + D/2), composed from primitive ops.
//! candle 0.11's fused `rotary_emb::rope` has no backward.

use candle_core::{DType, Device, Result, Tensor, D};

/// cos/sin tables `[T, D/2]` for positions 0..T with θ_i = base^(−2i/D).
#[derive(Clone, Debug)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    pub fn new(seq_len: usize, head_dim: usize, base: f64, dtype: DType, dev: &Device) -> Result<Self> {
        assert!(head_dim % 2 == 0, "RoPE needs an even head dim");
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(seq_len * half);
        let mut sin = Vec::with_capacity(seq_len * half);
        for p in 0..seq_len {
            for i in 0..half {
                let theta = base.powf(-2.0 * i as f64 / head_dim as f64);
                let phi = p as f64 * theta;
                cos.push(phi.cos());
                sin.push(phi.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (seq_len, half), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (seq_len, half), dev)?.to_dtype(dtype)?;
        Ok(Self { cos, sin })
    }

    /// Rotates x `[B, T, H, D]` (T ≤ table length): `[a, b] → [a cos − b sin, a sin + b cos]`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (_b, t, _h, d) = x.dims4()?;
        let half = d / 2;
        let cos = self.cos.narrow(0, 0, t)?.unsqueeze(1)?; // [T, 1, D/2]
        let sin = self.sin.narrow(0, 0, t)?.unsqueeze(1)?;
        let a = x.narrow(D::Minus1, 0, half)?;
        let b = x.narrow(D::Minus1, half, half)?;
        let ra = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
        let rb = (a.broadcast_mul(&sin)? + b.broadcast_mul(&cos)?)?;
        Tensor::cat(&[ra, rb], D::Minus1)
    }
}
