//! Chunkwise (DPLR / WY-style) form of the `rwkv7` op; semantics in [`super::rwkv7`].
//! Derivation after fla `fla/ops/rwkv7/RWKV7(Goose).md` and `dplr_chunkwise` (mixers.md §4),
//! written here in our own notation and layout.
//!
//! Work with Z = Sᵀ `[K,V]`: `Z_t = diag(w_t) Z_{t−1} + b_t u_tᵀ + k_t v_tᵀ` with
//! `u_t = Z_{t−1}ᵀ a_t` (`[V]`). This is a diagonal-decay recurrence with two rank-1 writes, so
//! with chunk-local log-decay cumsums `G_t = Σ_{s≤t} ln w_s`, `G⁻_t = G_{t−1}` and incoming Z₀:
//! ```text
//! E[t,i,:]  = exp(G⁻_t − G_i)  (i < t; the difference is formed and masked before exp)
//! A_ak[t,i] = Σ_c a_t E k_i,   A_ab[t,i] = Σ_c a_t E b_i                  (strictly lower)
//! A_rk[t,i] = Σ_c r_t w_t E k_i (+ r_t·k_t on the diagonal),  A_rb likewise with b
//! U   = (I − A_ab)⁻¹ ((a ⊙ e^{G⁻}) Z₀ + A_ak V)
//! O   = (r ⊙ e^{G}) Z₀ + A_rk V + A_rb U
//! Z_C = diag(e^{G_C}) Z₀ + (k ⊙ e^{G_C − G})ᵀ V + (b ⊙ e^{G_C − G})ᵀ U
//! ```
//! Every exponent is ≤ 0 (w ∈ (0,1)): no overflow for any decay, any chunk size. The relative
//! decays of a vector-valued w cannot be factored as e^{G_t}·e^{−G_i} safely (e^{−G_i}
//! overflows for strong decay, mixers.md §0), so E is materialised, `[C, C, K]` per chunk and
//! head; memory and work per token grow linearly with the chunk length C.

use super::gated_delta_rule::unit_lower_inverse;
use super::rwkv7::{check_shapes, compute_dtype};
use candle_core::{Result, Tensor, D};

/// Chunkwise form. Same inputs and outputs as [`super::rwkv7::rwkv7_recurrent`]. T is padded to
/// a multiple of C = min(chunk, T) with w = 1 and r = k = v = a = b = 0 (padded tokens leave the
/// state unchanged); the chunk loop is the only sequential part.
/// Cost per token: [`flops_per_token`].
pub fn rwkv7_chunked(r: &Tensor, w: &Tensor, k: &Tensor, v: &Tensor, a: &Tensor, b: &Tensor, s0: Option<&Tensor>, chunk: usize) -> Result<(Tensor, Tensor)> {
    check_shapes(r, w, k, v, a, b, s0)?;
    if chunk == 0 {
        candle_core::bail!("rwkv7: chunk size must be at least 1");
    }
    let (bs, t, h, dk) = r.dims4()?;
    let dv = v.dim(3)?;
    let dt = r.dtype();
    let ct = compute_dtype(dt);
    let dev = r.device();
    let mut z = match s0 {
        Some(s) => s.to_dtype(ct)?.transpose(2, 3)?.reshape((bs * h, dk, dv))?,
        None => Tensor::zeros((bs * h, dk, dv), ct, dev)?,
    };
    if t == 0 {
        let s = z.reshape((bs, h, dk, dv))?.transpose(2, 3)?.contiguous()?;
        return Ok((Tensor::zeros((bs, 0, h, dv), dt, dev)?, s));
    }
    let c = chunk.min(t);
    let n = t.div_ceil(c);
    let pad = n * c - t;
    let m = n * bs * h; // (chunk, batch, head) items
    // [B,T,H,X] → [N·B·H, C, X] (contiguous; chunk n is rows n·B·H .. (n+1)·B·H).
    let to_chunks = |x: &Tensor| -> Result<Tensor> {
        let x = x.pad_with_zeros(1, 0, pad)?;
        let d = x.dim(3)?;
        x.reshape((bs, n, c, h, d))?.permute((1, 0, 3, 2, 4))?.contiguous()?.reshape((m, c, d))
    };
    let lw = to_chunks(&w.to_dtype(ct)?.log()?)?; // padding: ln w = 0
    let r = to_chunks(&r.to_dtype(ct)?)?;
    let k = to_chunks(&k.to_dtype(ct)?)?;
    let v = to_chunks(&v.to_dtype(ct)?)?;
    let a = to_chunks(&a.to_dtype(ct)?)?;
    let b = to_chunks(&b.to_dtype(ct)?)?;

    let eye = Tensor::eye(c, ct, dev)?;
    let strict = (Tensor::tril2(c, ct, dev)? - &eye)?; // 1 for i < t (row t, column i)
    let g = Tensor::tril2(c, ct, dev)?.broadcast_matmul(&lw)?; // G_t = Σ_{s≤t} ln w_s
    let g_ex = strict.broadcast_matmul(&lw)?; // G⁻_t = Σ_{s<t} ln w_s
    let to_end = strict.t()?.broadcast_matmul(&lw)?; // G_C − G_i = Σ_{s>i} ln w_s
    // G⁻_t − G_i = Σ_{i<s<t} ln w_s, summed directly rather than as a difference of cumsums:
    // the difference would carry, in d/d ln w_s for i ≤ s < t, two O(1) terms that cancel, and
    // dw = (d/d ln w)/w then amplifies that rounding by 1/w (catastrophic for strong decay).
    let between: Vec<f64> = (0..c * c * c).map(|x| (x / (c * c), (x / c) % c, x % c)).map(|(t, i, s)| if i < s && s < t { 1.0 } else { 0.0 }).collect();
    let between = Tensor::from_vec(between, (c * c, c), dev)?.to_dtype(ct)?;
    let diff = between.broadcast_matmul(&lw)?.reshape((m, c, c, dk))?; // [M, C, C, K], 0 for i ≥ t−1
    let e = diff.exp()?.broadcast_mul(&strict.unsqueeze(2)?)?;
    let queries = Tensor::stack(&[&a, &(&r * lw.exp()?)?], 3)?.reshape((m * c, dk, 2))?; // [a_t | r_t w_t]
    let mix = |key: &Tensor| -> Result<(Tensor, Tensor)> {
        let p = e.broadcast_mul(&key.unsqueeze(1)?)?.reshape((m * c, c, dk))?;
        let out = p.matmul(&queries)?.reshape((m, c, c, 2))?;
        // Contiguous halves: they are matmul operands, and candle's CUDA matmul rejects the
        // stride-2 views that `narrow` leaves (the CPU one takes them).
        Ok((out.narrow(3, 0, 1)?.squeeze(3)?.contiguous()?, out.narrow(3, 1, 1)?.squeeze(3)?.contiguous()?))
    };
    let (a_ak, a_rk) = mix(&k)?;
    let (a_ab, a_rb) = mix(&b)?;
    let diag = |x: &Tensor| -> Result<Tensor> { eye.broadcast_mul(&(&r * x)?.sum_keepdim(D::Minus1)?) };
    let a_rk = (a_rk + diag(&k)?)?;
    let a_rb = (a_rb + diag(&b)?)?;
    let tinv = unit_lower_inverse(&a_ab.neg()?.contiguous()?)?; // (I − A_ab)⁻¹
    let wmat = tinv.matmul(&(&a * g_ex.exp()?)?)?; // [M, C, K]
    let u_base = tinv.matmul(&a_ak.matmul(&v)?)?; // [M, C, V]
    let o_base = a_rk.matmul(&v)?; // [M, C, V]
    let rg = (&r * g.exp()?)?; // [M, C, K]
    let tail = to_end.exp()?;
    let kd = (&k * &tail)?.transpose(1, 2)?.contiguous()?; // [M, K, C]
    let bd = (&b * &tail)?.transpose(1, 2)?.contiguous()?;
    let z_in = kd.matmul(&v)?; // [M, K, V]
    let z_decay = g.narrow(1, c - 1, 1)?.exp()?.transpose(1, 2)?; // [M, K, 1]

    let bh = bs * h;
    let at = |x: &Tensor, i: usize| x.narrow(0, i * bh, bh);
    let mut os = Vec::with_capacity(n);
    for i in 0..n {
        let u = (at(&u_base, i)? + at(&wmat, i)?.matmul(&z)?)?; // [BH, C, V]
        let o = ((at(&rg, i)?.matmul(&z)? + at(&o_base, i)?)? + at(&a_rb, i)?.matmul(&u)?)?;
        os.push(o);
        z = ((z.broadcast_mul(&at(&z_decay, i)?)? + at(&z_in, i)?)? + at(&bd, i)?.matmul(&u)?)?;
    }
    let o = Tensor::cat(&os, 0)?; // [N·B·H, C, V]
    let o = o.reshape((n, bs, h, c, dv))?.permute((1, 0, 3, 2, 4))?.reshape((bs, n * c, h, dv))?.narrow(1, 0, t)?.to_dtype(dt)?;
    let s = z.reshape((bs, h, dk, dv))?.transpose(2, 3)?.contiguous()?;
    Ok((o, s))
}

/// Forward FLOPs per token of [`rwkv7_chunked`] for H heads of key dim K, value dim V and
/// chunk C (2 per multiply-add; element-wise work counted once per element): the relative
/// log-decay sums (C²·K) and decays and weighted keys (≈ 4·C·K), the four A matrices (2·C·K·2·2), the solve (≈ C²/2 per
/// column), W and the U/O intra products (C·K + 3·C·V), and the state products (4·K·V).
pub fn flops_per_token(h: usize, k: usize, v: usize, c: usize) -> f64 {
    let (h, k, v, c) = (h as f64, k as f64, v as f64, c as f64);
    h * (c * c * k + 4.0 * c * k + 8.0 * c * k + c * c + 2.0 * (c * k + 3.0 * c * v) + 8.0 * k * v)
}
