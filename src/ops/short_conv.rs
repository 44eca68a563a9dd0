//! Causal depthwise short convolution (fla's `ShortConvolution`; Zoology's `ShortConvolution`;
//! the "Canon" layers of Allen-Zhu 2025 are the residual form), used by Gated DeltaNet on q, k, v
//! and optionally by softmax attention.
//!
//! `y_t[c] = Σ_{i<cs} w[c, i] · x_{t−(cs−1)+i}[c]` with zeros before the sequence start: the last
//! tap `w[:, cs−1]` sees the current token. Weight `[C, cs]` (fla stores `[C, 1, cs]`). Computed
//! as a sum of shifted zero-padded slices, because candle 0.11's depthwise `conv1d` backward is
//! ~11× slower; every term is a plain candle op, so the gradient is exact.

use candle_core::{Result, Tensor};

/// Parallel form: x `[B, T, C]`, w `[C, cs]` → `[B, T, C]`.
pub fn causal_conv(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (_b, t, _c) = x.dims3()?;
    let cs = w.dim(1)?;
    let xp = x.pad_with_zeros(1, cs - 1, 0)?;
    let mut y: Option<Tensor> = None;
    for i in 0..cs {
        let term = xp.narrow(1, i, t)?.broadcast_mul(&w.narrow(1, i, 1)?.squeeze(1)?)?;
        y = Some(match y {
            Some(acc) => (acc + term)?,
            None => term,
        });
    }
    y.ok_or_else(|| candle_core::Error::Msg("short conv: kernel width must be ≥ 1".into()))
}

/// Step form: the newest input x_t `[B, C]` and the previous `cs − 1` inputs `prev`
/// `[B, cs−1, C]` (None = zeros, i.e. the sequence start) → (y_t `[B, C]`, the new window
/// `[B, cs−1, C]`).
pub fn causal_conv_step(x_t: &Tensor, prev: Option<&Tensor>, w: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, c) = x_t.dims2()?;
    let cs = w.dim(1)?;
    let prev = match prev {
        Some(p) => p.clone(),
        None => Tensor::zeros((b, cs - 1, c), x_t.dtype(), x_t.device())?,
    };
    let win = Tensor::cat(&[&prev, &x_t.unsqueeze(1)?], 1)?; // [B, cs, C]
    let y = win.broadcast_mul(&w.t()?.unsqueeze(0)?)?.sum(1)?;
    Ok((y, win.narrow(1, 1, cs - 1)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, rand_tensor};

    /// Parallel form == step form == the defining double loop, in f64.
    #[test]
    fn parallel_equals_step_equals_loop() {
        let (b, t, c, cs) = (2, 7, 3, 4);
        let x = rand_tensor(&[b, t, c], 1.0, 1);
        let w = rand_tensor(&[c, cs], 1.0, 2);
        let par = causal_conv(&x, &w).unwrap();
        let (xv, wv) = (x.flatten_all().unwrap().to_vec1::<f64>().unwrap(), w.flatten_all().unwrap().to_vec1::<f64>().unwrap());
        let mut want = vec![0f64; b * t * c];
        for bi in 0..b {
            for ti in 0..t {
                for ci in 0..c {
                    for i in 0..cs {
                        let src = ti as isize - (cs as isize - 1) + i as isize;
                        if src >= 0 {
                            want[(bi * t + ti) * c + ci] += wv[ci * cs + i] * xv[(bi * t + src as usize) * c + ci];
                        }
                    }
                }
            }
        }
        let want = Tensor::from_vec(want, (b, t, c), &candle_core::Device::Cpu).unwrap();
        assert_close("short conv vs loop", &par, &want, 1e-14);
        let mut prev: Option<Tensor> = None;
        let mut steps = Vec::new();
        for ti in 0..t {
            let (y, next) = causal_conv_step(&x.narrow(1, ti, 1).unwrap().squeeze(1).unwrap(), prev.as_ref(), &w).unwrap();
            steps.push(y);
            prev = Some(next);
        }
        assert_close("short conv step vs parallel", &Tensor::stack(&steps, 1).unwrap(), &par, 1e-14);
    }
}
