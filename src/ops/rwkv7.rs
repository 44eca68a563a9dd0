//! Core op `rwkv7` (WKV-7): the generalized delta rule with a diagonal-plus-low-rank (DPLR)
//! transition of RWKV-7 "Goose" (Peng et al. 2025, arXiv:2503.14456).
//! Semantics: `../shared/reference/ops.md` §6; layer context: `../shared/reference/mixers.md` §4.
//! References: BlinkDL/RWKV-LM `RWKV-v7/rwkv_v7_numpy.py`
//! (`S = S*w.mT - S@kk*(kk*a).mT + v*k.mT; y = S@r`) and fla
//! `fla/ops/generalized_delta_rule/dplr/naive.py` (`dplr_recurrence`); written from the
//! equations, not ported.
//!
//! Layout: r, w, k, a, b `[B,T,H,K]`, v `[B,T,H,V]`, state S `[B,H,V,K]` (rows = value dim,
//! the papers' layout; fla stores the transpose). **w is the decay multiplier in (0, 1)**. Per
//! token, all three terms from the *undecayed* S_{t−1}:
//! ```text
//! S_t = S_{t−1}·diag(w_t) + (S_{t−1} a_t) b_tᵀ + v_t k_tᵀ ;    o_t = S_t r_t   (no scale)
//! ```
//! In RWKV-7 a = −kk and b = kk ⊙ a_lr (kk L2-normalised), see [`crate::blocks::rwkv7`].
//!
//! Forms, all composed from candle ops (exact autograd; f16/bf16 inputs compute in f32, the
//! state is returned in the compute dtype):
//! - [`rwkv7_step`]: advance a state by one token (decode);
//! - [`rwkv7_recurrent`]: the token loop of [`rwkv7_step`], the reference;
//! - [`super::rwkv7_chunk::rwkv7_chunked`]: the chunkwise DPLR form used for training;
//! - [`rwkv7_reference`]: a plain f64 loop on slices, independent of candle, for tests.
//!
//! Tests (`tests/rwkv7.rs`) tie the forms together (values, gradients of every input, finite
//! differences) and compare with golden fixtures made by fla-core's `dplr_recurrence`
//! (`tests/golden/make_rwkv7.py`).

use candle_core::{DType, Result, Tensor};

pub use super::rwkv7_chunk::rwkv7_chunked;

/// Default chunk length of the chunked form (BlinkDL's CUDA kernels checkpoint every 16
/// tokens; the chunked form keeps `[C, C, K]` relative decays per chunk, so memory grows with C).
pub const DEFAULT_CHUNK: usize = 16;

/// f32 for half-precision inputs, else the input dtype.
pub(crate) fn compute_dtype(dt: DType) -> DType {
    if dt == DType::F64 { DType::F64 } else { DType::F32 }
}

/// Checks r, w, k, a, b `[B,T,H,K]`, v `[B,T,H,V]`, initial_state `[B,H,V,K]`.
pub fn check_shapes(r: &Tensor, w: &Tensor, k: &Tensor, v: &Tensor, a: &Tensor, b: &Tensor, s0: Option<&Tensor>) -> Result<()> {
    let bad = || {
        candle_core::bail!(
            "rwkv7: expected r, w, k, a, b [B,T,H,K], v [B,T,H,V], initial_state [B,H,V,K]; got r {:?}, w {:?}, k {:?}, v {:?}, a {:?}, b {:?}, initial_state {:?}",
            r.dims(),
            w.dims(),
            k.dims(),
            v.dims(),
            a.dims(),
            b.dims(),
            s0.map(|s| s.dims().to_vec())
        )
    };
    let (Ok((bb, t, h, dk)), Ok((bv, tv, hv, dv))) = (r.dims4(), v.dims4()) else { return bad() };
    if [w, k, a, b].iter().any(|x| x.dims() != r.dims()) || (bv, tv, hv) != (bb, t, h) || dk == 0 || dv == 0 {
        return bad();
    }
    if let Some(s) = s0 {
        if s.dims() != [bb, h, dv, dk] {
            return bad();
        }
    }
    Ok(())
}

/// One token. r, w, k, a, b `[B,H,K]`, v `[B,H,V]`, state `[B,H,V,K]` → (o `[B,H,V]` in r's
/// dtype, new state `[B,H,V,K]` in the compute dtype).
pub fn rwkv7_step(r: &Tensor, w: &Tensor, k: &Tensor, v: &Tensor, a: &Tensor, b: &Tensor, state: &Tensor) -> Result<(Tensor, Tensor)> {
    let dt = r.dtype();
    let ct = compute_dtype(dt);
    let row = |x: &Tensor| x.to_dtype(ct)?.contiguous()?.unsqueeze(2); // [B,H,1,X]
    let col = |x: &Tensor| x.to_dtype(ct)?.contiguous()?.unsqueeze(3); // [B,H,X,1]
    let s = state.to_dtype(ct)?;
    let decayed = s.broadcast_mul(&row(w)?)?; // S diag(w)
    let low_rank = s.matmul(&col(a)?)?.matmul(&row(b)?)?; // (S a) bᵀ
    let write = col(v)?.matmul(&row(k)?)?; // v kᵀ
    let s = ((decayed + low_rank)? + write)?;
    let o = s.matmul(&col(r)?)?.squeeze(3)?.to_dtype(dt)?; // S r
    Ok((o, s))
}

/// Token-by-token reference: [`rwkv7_step`] for t = 0..T−1. Returns (o `[B,T,H,V]`,
/// final_state `[B,H,V,K]`); the initial state is zero when not given.
pub fn rwkv7_recurrent(r: &Tensor, w: &Tensor, k: &Tensor, v: &Tensor, a: &Tensor, b: &Tensor, s0: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    check_shapes(r, w, k, v, a, b, s0)?;
    let (bb, t, h, dk) = r.dims4()?;
    let dv = v.dim(3)?;
    let ct = compute_dtype(r.dtype());
    let mut s = match s0 {
        Some(s) => s.to_dtype(ct)?,
        None => Tensor::zeros((bb, h, dv, dk), ct, r.device())?,
    };
    let mut os = Vec::with_capacity(t);
    for i in 0..t {
        let at = |x: &Tensor| x.narrow(1, i, 1)?.squeeze(1);
        let (o, s_new) = rwkv7_step(&at(r)?, &at(w)?, &at(k)?, &at(v)?, &at(a)?, &at(b)?, &s)?;
        os.push(o);
        s = s_new;
    }
    if t == 0 {
        return Ok((Tensor::zeros((bb, 0, h, dv), r.dtype(), r.device())?, s));
    }
    Ok((Tensor::stack(&os, 1)?, s))
}

/// Plain f64 loop on row-major slices in the layout of the module doc: (o, final_state).
#[allow(clippy::too_many_arguments)]
pub fn rwkv7_reference(
    r: &[f64],
    w: &[f64],
    k: &[f64],
    v: &[f64],
    a: &[f64],
    b: &[f64],
    s0: Option<&[f64]>,
    (bs, t, h, dk, dv): (usize, usize, usize, usize, usize),
) -> (Vec<f64>, Vec<f64>) {
    let mut s = s0.map(|x| x.to_vec()).unwrap_or_else(|| vec![0.0; bs * h * dv * dk]);
    let mut o = vec![0.0; bs * t * h * dv];
    let mut sa = vec![0.0; dv];
    for bb in 0..bs {
        for hh in 0..h {
            let st = &mut s[(bb * h + hh) * dv * dk..][..dv * dk];
            for tt in 0..t {
                let gi = (bb * t + tt) * h + hh;
                let (ki, vi) = (gi * dk, gi * dv);
                for (i, x) in sa.iter_mut().enumerate() {
                    *x = (0..dk).map(|j| st[i * dk + j] * a[ki + j]).sum();
                }
                for i in 0..dv {
                    for j in 0..dk {
                        let e = &mut st[i * dk + j];
                        *e = *e * w[ki + j] + sa[i] * b[ki + j] + v[vi + i] * k[ki + j];
                    }
                    o[vi + i] = (0..dk).map(|j| st[i * dk + j] * r[ki + j]).sum();
                }
            }
        }
    }
    (o, s)
}
