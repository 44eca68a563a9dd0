//! Core op `ssd`: the state-space recurrence of Mamba-2 (Dao & Gu 2024, "Transformers are SSMs:
//! Generalized Models and Efficient Algorithms Through Structured State Space Duality",
//! arXiv:2405.21060). Semantics: `../shared/reference/ops.md` §5; chunked algorithm:
//! `../shared/reference/mixers.md` §2. Reference: state-spaces/mamba
//! `mamba_ssm/modules/ssd_minimal.py` (`segsum`, `ssd_minimal_discrete(x·dt, A·dt, B, C, …)`);
//! this file is written from the equations, not ported.
//!
//! Layout: x `[B,T,H,P]`, dt `[B,T,H]` (already softplus'd, > 0), A `[H]` (< 0, one scalar per
//! head), Bm, Cm `[B,T,G,N]` (head h reads group `h / (H/G)`), state `[B,H,P,N]` (mamba's
//! `final_states` layout). Per token:
//! ```text
//! h_t = exp(dt_t·A)·h_{t−1} + dt_t · x_t Bm_tᵀ        (P×N)
//! y_t = h_t Cm_t                                     (P; includes token t)
//! ```
//! No D skip and no z gate (the layer adds them).
//!
//! Forms, all composed from candle ops (exact autograd; f16/bf16 inputs compute in f32; the
//! state is returned in the compute dtype, y in x's dtype):
//! - [`ssd_step`]: advance a state by one token (decode);
//! - [`ssd_recurrent`]: the token loop of [`ssd_step`], the reference;
//! - [`ssd_chunked`] (in `ssd_chunked.rs`): the chunked SSD algorithm used for training;
//! - [`ssd_reference`]: a plain f64 loop on slices, independent of candle, for tests.
//!
//! Tests: `tests/ssd.rs` (forms against each other, values and gradients of every input, finite
//! differences, the CLI) and `tests/golden.rs` (fixtures written by mamba_ssm's `ssd_minimal`,
//! `tests/golden/make_ssd.py`).

pub use super::ssd_chunked::{ssd_chunked, DEFAULT_CHUNK};
use candle_core::{Result, Tensor};

/// Checks x `[B,T,H,P]`, dt `[B,T,H]`, A `[H]`, Bm, Cm `[B,T,G,N]` with H % G == 0, and
/// initial_state `[B,H,P,N]`.
pub fn check_shapes(x: &Tensor, dt: &Tensor, a: &Tensor, bm: &Tensor, cm: &Tensor, s0: Option<&Tensor>) -> Result<()> {
    let bad = || {
        candle_core::bail!(
            "ssd: expected x [B,T,H,P], dt [B,T,H], A [H], Bm, Cm [B,T,G,N] with H a multiple of G, initial_state [B,H,P,N]; got x {:?}, dt {:?}, A {:?}, Bm {:?}, Cm {:?}, initial_state {:?}",
            x.dims(),
            dt.dims(),
            a.dims(),
            bm.dims(),
            cm.dims(),
            s0.map(|s| s.dims().to_vec())
        )
    };
    let (Ok((b, t, h, p)), Ok((bb, tb, g, n))) = (x.dims4(), bm.dims4()) else { return bad() };
    if (bb, tb) != (b, t) || cm.dims() != bm.dims() || dt.dims() != [b, t, h] || a.dims() != [h] || p == 0 || n == 0 || g == 0 || h % g != 0 {
        return bad();
    }
    if let Some(s) = s0 {
        if s.dims() != [b, h, p, n] {
            return bad();
        }
    }
    Ok(())
}

/// Repeats groups to heads: `[..., G, N]` → `[..., H, N]`, head h = group h / (H/G) (each group
/// repeated H/G times contiguously; the gradient sums back over the heads of a group).
pub fn groups_to_heads(x: &Tensor, h: usize) -> Result<Tensor> {
    let r = x.rank();
    let g = x.dim(r - 2)?;
    if g == h {
        return Ok(x.clone());
    }
    let mut wide = x.dims().to_vec();
    wide.insert(r - 1, h / g);
    let mut out = x.dims().to_vec();
    out[r - 2] = h;
    x.unsqueeze(r - 1)?.broadcast_as(wide)?.contiguous()?.reshape(out)
}

/// One token. x_t `[B,H,P]`, dt_t `[B,H]`, A `[H]`, Bm_t, Cm_t `[B,G,N]`, state `[B,H,P,N]` →
/// (y_t `[B,H,P]` in x's dtype, new state `[B,H,P,N]` in the compute dtype).
pub fn ssd_step(x: &Tensor, dt: &Tensor, a: &Tensor, bm: &Tensor, cm: &Tensor, state: &Tensor) -> Result<(Tensor, Tensor)> {
    let xdt = x.dtype();
    let ct = super::reduction_dtype(xdt);
    let (b, h, _p) = x.dims3()?;
    let dt = dt.to_dtype(ct)?;
    let decay = dt.broadcast_mul(&a.to_dtype(ct)?)?.exp()?.reshape((b, h, 1, 1))?; // exp(dt·A)
    let xs = x.to_dtype(ct)?.broadcast_mul(&dt.unsqueeze(2)?)?.unsqueeze(3)?; // dt·x  [B,H,P,1]
    let bh = groups_to_heads(&bm.to_dtype(ct)?, h)?.unsqueeze(2)?; // [B,H,1,N]
    let ch = groups_to_heads(&cm.to_dtype(ct)?, h)?.contiguous()?.unsqueeze(3)?; // [B,H,N,1]
    let s = (state.to_dtype(ct)?.broadcast_mul(&decay)? + xs.broadcast_mul(&bh)?)?; // [B,H,P,N]
    let y = s.matmul(&ch)?.squeeze(3)?.to_dtype(xdt)?;
    Ok((y, s))
}

/// Token-by-token reference: [`ssd_step`] for t = 0..T−1. Returns (y `[B,T,H,P]`,
/// final_state `[B,H,P,N]`).
pub fn ssd_recurrent(x: &Tensor, dt: &Tensor, a: &Tensor, bm: &Tensor, cm: &Tensor, s0: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    check_shapes(x, dt, a, bm, cm, s0)?;
    let (b, t, h, p) = x.dims4()?;
    let n = bm.dim(3)?;
    let ct = super::reduction_dtype(x.dtype());
    let mut s = match s0 {
        Some(s) => s.to_dtype(ct)?,
        None => Tensor::zeros((b, h, p, n), ct, x.device())?,
    };
    let mut ys = Vec::with_capacity(t);
    for i in 0..t {
        let at = |z: &Tensor| z.narrow(1, i, 1)?.squeeze(1);
        let (y, s_new) = ssd_step(&at(x)?, &at(dt)?, a, &at(bm)?, &at(cm)?, &s)?;
        ys.push(y);
        s = s_new;
    }
    if t == 0 {
        return Ok((x.clone(), s));
    }
    Ok((Tensor::stack(&ys, 1)?, s))
}

/// Plain f64 loop on row-major slices in the layout of the module doc: (y, final_state).
#[allow(clippy::too_many_arguments)]
pub fn ssd_reference(
    x: &[f64],
    dt: &[f64],
    a: &[f64],
    bm: &[f64],
    cm: &[f64],
    s0: Option<&[f64]>,
    (b, t, h, p, g, n): (usize, usize, usize, usize, usize, usize),
) -> (Vec<f64>, Vec<f64>) {
    let mut s = s0.map(|v| v.to_vec()).unwrap_or_else(|| vec![0.0; b * h * p * n]);
    let mut y = vec![0.0; b * t * h * p];
    let heads_per_group = h / g;
    for bb in 0..b {
        for hh in 0..h {
            let gg = hh / heads_per_group;
            let st = &mut s[(bb * h + hh) * p * n..][..p * n];
            for tt in 0..t {
                let ti = (bb * t + tt) * h + hh; // index into dt; x row at ti·p
                let gi = ((bb * t + tt) * g + gg) * n; // row of Bm, Cm
                let d = dt[ti];
                let decay = (d * a[hh]).exp();
                for i in 0..p {
                    let xi = d * x[ti * p + i];
                    let mut acc = 0.0;
                    for j in 0..n {
                        let v = decay * st[i * n + j] + xi * bm[gi + j];
                        st[i * n + j] = v;
                        acc += v * cm[gi + j];
                    }
                    y[ti * p + i] = acc;
                }
            }
        }
    }
    (y, s)
}
