//! Core op `gated_delta_rule`: the recurrence of Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024,
//! "Gated Delta Networks: Improving Mamba2 with Delta Rule", arXiv:2412.06464).
//! Semantics: `../shared/reference/ops.md` §4; chunk form: `../shared/reference/mixers.md` §3.
//! References: fla `fla/ops/gated_delta_rule/naive.py` (`naive_recurrent_gated_delta_rule`,
//! `naive_chunk_gated_delta_rule`); this file is written from the equations, not ported.
//!
//! Layout (fla): q, k `[B,T,H,K]`, v `[B,T,H,V]`, g (log-decay, normally ≤ 0) and beta
//! `[B,T,H]`, state S `[B,H,K,V]` (fla's K×V layout, the transpose of the paper's). Per token,
//! in this order: `S ← exp(g_t)·S;  u_t = β_t (v_t − Sᵀk_t);  S ← S + k_t u_tᵀ;  o_t = Sᵀ(q_t·K^-½)`.
//! q and k are used as given (the layer L2-normalises them).
//!
//! Forms, all composed from candle ops (exact autograd; f16/bf16 inputs compute in f32, the
//! state is returned in the compute dtype):
//! - [`gdr_step`]: advance a state by one token (decode);
//! - [`gdr_recurrent`]: the token loop of [`gdr_step`], the reference;
//! - [`gdr_chunked`]: the chunkwise WY/UT-transform form used for training;
//! - [`gdr_reference`]: a plain f64 loop on slices, independent of candle, for tests.
//!
//! Tests (`tests/gdn.rs`) tie the forms together (values, gradients of every input, finite
//! differences). Not yet done: golden fixtures produced by fla itself (torch, fp32:
//! `naive_recurrent_gated_delta_rule` / `chunk_gated_delta_rule` on saved inputs, compared
//! through `mixscale op gated_delta_rule`).

use candle_core::{DType, Result, Tensor, D};

/// fla's chunk size for GDN.
pub const DEFAULT_CHUNK: usize = 64;

/// f32 for half-precision inputs, else the input dtype.
fn compute_dtype(dt: DType) -> DType {
    if dt == DType::F64 { DType::F64 } else { DType::F32 }
}

/// Checks q, k `[B,T,H,K]`, v `[B,T,H,V]`, g, beta `[B,T,H]`, initial_state `[B,H,K,V]`.
pub fn check_shapes(q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor, beta: &Tensor, s0: Option<&Tensor>) -> Result<()> {
    let bad = || {
        candle_core::bail!(
            "gated_delta_rule: expected q, k [B,T,H,K], v [B,T,H,V], g, beta [B,T,H], initial_state [B,H,K,V]; got q {:?}, k {:?}, v {:?}, g {:?}, beta {:?}, initial_state {:?}",
            q.dims(),
            k.dims(),
            v.dims(),
            g.dims(),
            beta.dims(),
            s0.map(|s| s.dims().to_vec())
        )
    };
    let (Ok((b, t, h, dk)), Ok((bv, tv, hv, dv))) = (q.dims4(), v.dims4()) else { return bad() };
    if k.dims() != q.dims() || (bv, tv, hv) != (b, t, h) || g.dims() != [b, t, h] || beta.dims() != [b, t, h] || dk == 0 || dv == 0 {
        return bad();
    }
    if let Some(s) = s0 {
        if s.dims() != [b, h, dk, dv] {
            return bad();
        }
    }
    Ok(())
}

/// One token. q_t, k_t `[B,H,K]`, v_t `[B,H,V]`, g_t, beta_t `[B,H]`, state `[B,H,K,V]` →
/// (o_t `[B,H,V]` in q's dtype, new state `[B,H,K,V]` in the compute dtype).
pub fn gdr_step(q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor, beta: &Tensor, state: &Tensor) -> Result<(Tensor, Tensor)> {
    let dt = q.dtype();
    let ct = compute_dtype(dt);
    let (b, h, dk) = q.dims3()?;
    let col = |x: &Tensor| x.to_dtype(ct)?.reshape((b, h, 1, 1));
    let q = (q.to_dtype(ct)?.contiguous()? * (dk as f64).powf(-0.5))?.unsqueeze(2)?; // [B,H,1,K]
    let k = k.to_dtype(ct)?.contiguous()?.unsqueeze(2)?; // [B,H,1,K]
    let v = v.to_dtype(ct)?.contiguous()?.unsqueeze(2)?; // [B,H,1,V]
    let s = state.to_dtype(ct)?.broadcast_mul(&col(g)?.exp()?)?; // S ← exp(g)·S
    let u = (v - k.matmul(&s)?)?.broadcast_mul(&col(beta)?)?; // u = β(v − Sᵀk)   [B,H,1,V]
    let s = (s + k.transpose(2, 3)?.contiguous()?.matmul(&u)?)?; // S ← S + k uᵀ
    let o = q.matmul(&s)?.squeeze(2)?.to_dtype(dt)?; // o = Sᵀq
    Ok((o, s))
}

/// Token-by-token reference: [`gdr_step`] for t = 0..T−1. Shapes as the module doc; returns
/// (o `[B,T,H,V]`, final_state `[B,H,K,V]`).
pub fn gdr_recurrent(q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor, beta: &Tensor, s0: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    check_shapes(q, k, v, g, beta, s0)?;
    let (b, t, h, dk) = q.dims4()?;
    let dv = v.dim(3)?;
    let mut s = match s0 {
        Some(s) => s.to_dtype(compute_dtype(q.dtype()))?,
        None => Tensor::zeros((b, h, dk, dv), compute_dtype(q.dtype()), q.device())?,
    };
    let mut os = Vec::with_capacity(t);
    for i in 0..t {
        let at = |x: &Tensor| x.narrow(1, i, 1)?.squeeze(1);
        let (o, s_new) = gdr_step(&at(q)?, &at(k)?, &at(v)?, &at(g)?, &at(beta)?, &s)?;
        os.push(o);
        s = s_new;
    }
    Ok((Tensor::stack(&os, 1)?, s))
}

/// Chunkwise form (mixers.md §3; paper §3.2 / Yang et al. 2024 "Parallelizing linear
/// transformers with the delta rule", the WY/UT transform). Same inputs and outputs as
/// [`gdr_recurrent`]; T is zero-padded to a multiple of the chunk C = min(chunk, T) (padded
/// tokens have g = β = 0, k = 0: they leave the state unchanged).
///
/// Within a chunk (q pre-scaled by K^-½), G = cumsum(g), Γ_ij = exp(G_i − G_j) for j ≤ i else 0
/// (the difference is formed and masked before exp), γ = exp(G):
/// `L = tril(diag(β)(K Kᵀ ⊙ Γ), −1)`, `T = (I + L)⁻¹`, `U = T(β⊙V)`, `W = T(β⊙γ⊙K)`;
/// then sequentially over chunks with incoming state S:
/// `V' = U − W S;  O = (γ⊙Q) S + (Q Kᵀ ⊙ Γ) V';  S ← γ_C S + (exp(G_C − G)⊙K)ᵀ V'`.
/// Everything but the chunk loop is batched matmuls over (chunks, B, H).
///
/// Cost per token and head (multiply-adds): C(3K + 2V) + C²/2 + 3KV (Q Kᵀ, K Kᵀ, W, U, the
/// intra-chunk mix, the three state products; the solve ≈ C²/2 amortised).
pub fn gdr_chunked(q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor, beta: &Tensor, s0: Option<&Tensor>, chunk: usize) -> Result<(Tensor, Tensor)> {
    check_shapes(q, k, v, g, beta, s0)?;
    if chunk == 0 {
        candle_core::bail!("gated_delta_rule: chunk size must be at least 1");
    }
    let (b, t, h, dk) = q.dims4()?;
    let dv = v.dim(3)?;
    let dt = q.dtype();
    let ct = compute_dtype(dt);
    let dev = q.device();
    let c = chunk.min(t.max(1));
    let n = t.div_ceil(c);
    let pad = n * c - t;
    // [B,T,H,X] → [N,B,H,C,X] (contiguous, so chunk n is a contiguous slice).
    let to_chunks4 = |x: &Tensor| -> Result<Tensor> {
        let x = x.to_dtype(ct)?.pad_with_zeros(1, 0, pad)?;
        let d = x.dim(3)?;
        x.reshape((b, n, c, h, d))?.permute((1, 0, 3, 2, 4))?.contiguous()
    };
    // [B,T,H] → [N,B,H,C].
    let to_chunks3 = |x: &Tensor| -> Result<Tensor> {
        x.to_dtype(ct)?.pad_with_zeros(1, 0, pad)?.reshape((b, n, c, h))?.permute((1, 0, 3, 2))?.contiguous()
    };
    let q = (to_chunks4(q)? * (dk as f64).powf(-0.5))?;
    let k = to_chunks4(k)?;
    let v = to_chunks4(v)?;
    let g = to_chunks3(g)?;
    let beta = to_chunks3(beta)?;

    let eye = Tensor::eye(c, ct, dev)?;
    let strict = (Tensor::tril2(c, ct, dev)? - &eye)?; // 1 for j < i
    let gc = g.reshape((n * b * h, c))?.matmul(&Tensor::triu2(c, ct, dev)?)?.reshape((n, b, h, c))?; // G = cumsum(g)  [N,B,H,C]
    let diff = gc.unsqueeze(4)?.broadcast_sub(&gc.unsqueeze(3)?)?; // G_i − G_j  [N,B,H,C,C]
    // Γ: exp of the masked difference below the diagonal, exactly 1 on it (no gradient path
    // through the diagonal's G_i − G_i, which would cancel O(1) terms in dg), 0 above.
    let gamma = diff.broadcast_mul(&strict)?.exp()?.broadcast_mul(&strict)?.broadcast_add(&eye)?;
    let kt = k.transpose(3, 4)?.contiguous()?; // [N,B,H,K,C]
    let l = (bmm(&k, &kt)? * &gamma)?.broadcast_mul(&beta.unsqueeze(4)?)?.broadcast_mul(&strict)?;
    let tinv = unit_lower_inverse(&l)?; // (I + L)⁻¹  [N,B,H,C,C]
    let decay = gc.exp()?; // γ  [N,B,H,C]
    let u = bmm(&tinv, &v.broadcast_mul(&beta.unsqueeze(4)?)?)?; // [N,B,H,C,V]
    let w = bmm(&tinv, &k.broadcast_mul(&(&beta * &decay)?.unsqueeze(4)?)?)?; // [N,B,H,C,K]
    let p = (bmm(&q, &kt)? * &gamma)?; // causal incl. diagonal  [N,B,H,C,C]
    let qg = q.broadcast_mul(&decay.unsqueeze(4)?)?; // [N,B,H,C,K]
    let g_last = gc.narrow(3, c - 1, 1)?; // [N,B,H,1]
    // G_C − G_i = Σ_{j>i} g_j, summed directly (not as a difference) for the same reason.
    let to_end = g.reshape((n * b * h, c))?.matmul(&strict)?.reshape((n, b, h, c))?;
    let kd = k.broadcast_mul(&to_end.exp()?.unsqueeze(4)?)?.transpose(3, 4)?.contiguous()?; // [N,B,H,K,C]
    let s_decay = g_last.exp()?.unsqueeze(4)?; // [N,B,H,1,1]

    let mut s = match s0 {
        Some(s) => s.to_dtype(ct)?,
        None => Tensor::zeros((b, h, dk, dv), ct, dev)?,
    };
    let mut os = Vec::with_capacity(n);
    for i in 0..n {
        let at = |x: &Tensor| x.get(i);
        let v_new = (at(&u)? - at(&w)?.matmul(&s)?)?; // V' = U − W S  [B,H,C,V]
        os.push((at(&qg)?.matmul(&s)? + at(&p)?.matmul(&v_new)?)?);
        s = (s.broadcast_mul(&at(&s_decay)?)? + at(&kd)?.matmul(&v_new)?)?;
    }
    let o = Tensor::stack(&os, 0)?; // [N,B,H,C,V]
    let o = o.permute((1, 0, 3, 2, 4))?.reshape((b, n * c, h, dv))?.narrow(1, 0, t)?.to_dtype(dt)?;
    Ok((o, s))
}

/// Batched matmul over any number of leading dims (candle's CPU matmul handles at most two
/// batch dims): `[..., m, k] @ [..., k, n]` → `[..., m, n]`, same leading dims on both sides.
///
/// The operands are made contiguous first: candle's CUDA matmul rejects strided views such as
/// the off-diagonal block `L₂₁` of [`unit_lower_inverse`] (the CPU one takes any strides), and
/// `contiguous()` is free for the operands that already are.
fn bmm(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a, b) = (&a.contiguous()?, &b.contiguous()?);
    let (ad, bd) = (a.dims(), b.dims());
    let r = ad.len();
    if r <= 3 {
        return a.matmul(b);
    }
    let batch: usize = ad[..r - 2].iter().product();
    let out = a.reshape((batch, ad[r - 2], ad[r - 1]))?.matmul(&b.reshape((batch, bd[r - 2], bd[r - 1]))?)?;
    let mut shape = ad[..r - 1].to_vec();
    shape.push(bd[r - 1]);
    out.reshape(shape)
}

/// `(I + L)⁻¹` for strictly lower-triangular `L` `[..., C, C]` by recursive block forward
/// substitution: `[[A, 0], [X, D]]⁻¹ = [[A⁻¹, 0], [−D⁻¹ X A⁻¹, D⁻¹]]` with A = I + L₁₁,
/// D = I + L₂₂ (inverted together as one batch when their sizes agree). Every block computed is
/// a block of the exact inverse (no series expansion, whose terms grow like binomials), and
/// the graph has O(log C) levels instead of C row steps.
pub fn unit_lower_inverse(l: &Tensor) -> Result<Tensor> {
    let c = l.dim(D::Minus1)?;
    let r = l.rank();
    if c == 1 {
        return l.ones_like();
    }
    let n1 = c / 2;
    let n2 = c - n1;
    let l11 = l.narrow(r - 2, 0, n1)?.narrow(r - 1, 0, n1)?;
    let l21 = l.narrow(r - 2, n1, n2)?.narrow(r - 1, 0, n1)?;
    let l22 = l.narrow(r - 2, n1, n2)?.narrow(r - 1, n1, n2)?;
    let (a, d) = if n1 == n2 {
        // Concatenated along the leading dim (not stacked): the rank stays fixed at every level
        // (stacking added one dim per level, and candle's strided kernels stop at rank 8).
        let lead = l.dim(0)?;
        let both = unit_lower_inverse(&Tensor::cat(&[&l11, &l22], 0)?)?;
        (both.narrow(0, 0, lead)?, both.narrow(0, lead, lead)?)
    } else {
        (unit_lower_inverse(&l11.contiguous()?)?, unit_lower_inverse(&l22.contiguous()?)?)
    };
    let x = bmm(&d, &bmm(&l21, &a)?)?.neg()?;
    let mut zshape = l.dims().to_vec();
    zshape[r - 2] = n1;
    zshape[r - 1] = n2;
    let zeros = Tensor::zeros(zshape, l.dtype(), l.device())?;
    let top = Tensor::cat(&[&a, &zeros], r - 1)?;
    let bottom = Tensor::cat(&[&x, &d], r - 1)?;
    Tensor::cat(&[&top, &bottom], r - 2)
}

/// Plain f64 loop (row-major slices in the layout of the module doc): (o, final_state).
#[allow(clippy::too_many_arguments)]
pub fn gdr_reference(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    g: &[f64],
    beta: &[f64],
    s0: Option<&[f64]>,
    (b, t, h, dk, dv): (usize, usize, usize, usize, usize),
) -> (Vec<f64>, Vec<f64>) {
    let mut s = s0.map(|x| x.to_vec()).unwrap_or_else(|| vec![0.0; b * h * dk * dv]);
    let mut o = vec![0.0; b * t * h * dv];
    let scale = (dk as f64).powf(-0.5);
    for bb in 0..b {
        for hh in 0..h {
            let st = &mut s[(bb * h + hh) * dk * dv..][..dk * dv];
            for tt in 0..t {
                let gi = (bb * t + tt) * h + hh;
                let (qi, vi) = (gi * dk, gi * dv);
                let a = g[gi].exp();
                st.iter_mut().for_each(|x| *x *= a);
                for j in 0..dv {
                    let sk: f64 = (0..dk).map(|i| st[i * dv + j] * k[qi + i]).sum();
                    let u = beta[gi] * (v[vi + j] - sk);
                    for i in 0..dk {
                        st[i * dv + j] += k[qi + i] * u;
                    }
                    o[vi + j] = (0..dk).map(|i| st[i * dv + j] * q[qi + i] * scale).sum();
                }
            }
        }
    }
    (o, s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, rand_tensor};
    use candle_core::Device;

    /// (I + L)·T = I for odd and power-of-two sizes, and T matches row-by-row substitution.
    #[test]
    fn unit_lower_inverse_is_exact() {
        for c in [1usize, 2, 7, 16, 37, 64] {
            let m = Tensor::tril2(c, DType::F64, &Device::Cpu).unwrap();
            let strict = (&m - Tensor::eye(c, DType::F64, &Device::Cpu).unwrap()).unwrap();
            let l = rand_tensor(&[3, c, c], 0.5, c as u64).broadcast_mul(&strict).unwrap();
            let t = unit_lower_inverse(&l).unwrap();
            let eye = Tensor::eye(c, DType::F64, &Device::Cpu).unwrap().unsqueeze(0).unwrap().repeat((3, 1, 1)).unwrap();
            let prod = (&eye + &l).unwrap().matmul(&t).unwrap();
            assert_close(&format!("(I+L)T c{c}"), &eye, &prod, 1e-12);
            // Row-by-row forward substitution: T_i = e_i − Σ_{j<i} L_ij T_j.
            let lv = crate::testing::to_vec(&l);
            let mut want = vec![0.0; 3 * c * c];
            for bb in 0..3 {
                for i in 0..c {
                    for col in 0..c {
                        let mut x = if i == col { 1.0 } else { 0.0 };
                        for j in 0..i {
                            x -= lv[bb * c * c + i * c + j] * want[bb * c * c + j * c + col];
                        }
                        want[bb * c * c + i * c + col] = x;
                    }
                }
            }
            let want = Tensor::from_vec(want, (3, c, c), &Device::Cpu).unwrap();
            assert_close(&format!("substitution c{c}"), &want, &t, 1e-12);
        }
    }
}
