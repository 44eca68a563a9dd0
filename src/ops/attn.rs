//! Core op `attn`: causal softmax attention with GQA, layout `[B, T, H, D]`
//! (semantics: `../shared/reference/ops.md` §1; reference fla `fla/ops/attn/naive.py::naive_parallel_attn`).
//!
//! `o[i] = Σ_{j≤i} softmax_j(q_i·k_j / √D) v_j`; query head h reads kv head `h / (Hq/Hkv)`
//! (contiguous groups). [`attn`] is the parallel training form: on the CPU in f32/f64 it runs the
//! fused kernel [`crate::ops::attn_fused::attn_fused`], elsewhere [`attn_composed`] (materialises
//! T×T scores per head; composed ops, exact autograd). [`attn_reference`] is a plain f64 loop
//! used by tests.

use candle_core::{DType, Result, Tensor};

/// Causal attention. q `[B,T,Hq,D]`, k/v `[B,T,Hkv,D]` → o `[B,T,Hq,D]`.
/// Dispatches to the fused CPU kernel for CPU f32/f64 inputs, else to [`attn_composed`].
pub fn attn(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let fusable = |x: &Tensor| x.device().is_cpu() && x.dtype() == q.dtype();
    if matches!(q.dtype(), DType::F32 | DType::F64) && [q, k, v].into_iter().all(fusable) {
        return crate::ops::attn_fused::attn_fused(q, k, v);
    }
    attn_composed(q, k, v)
}

/// Causal attention composed from candle primitives (materialises `[B,Hq,T,T]` scores; exact
/// autograd through candle). Any device and float dtype; the reference the fused op is tested against.
pub fn attn_composed(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (_b, t, hq, d) = q.dims4()?;
    let hkv = k.dim(2)?;
    if hq % hkv != 0 {
        candle_core::bail!("attn: Hq={hq} is not a multiple of Hkv={hkv}");
    }
    // Scores, softmax and P·V in the reduction dtype (f32 for bf16 inputs, as flash-attention's
    // f32 accumulators), output in the input dtype.
    let (dt, rt) = (v.dtype(), super::reduction_dtype(v.dtype()));
    let q = q.transpose(1, 2)?.contiguous()?.to_dtype(rt)?; // [B,Hq,T,D]
    let k = expand_kv(&k.transpose(1, 2)?, hq / hkv)?.to_dtype(rt)?; // [B,Hq,T,D]
    let v = expand_kv(&v.transpose(1, 2)?, hq / hkv)?.to_dtype(rt)?;
    let scale = 1.0 / (d as f64).sqrt();
    let s = (q.matmul(&k.transpose(2, 3)?)? * scale)?; // [B,Hq,T,T]
    let s = s.broadcast_add(&causal_mask(t, s.dtype(), s.device())?)?;
    let p = crate::ops::softmax::softmax_last_dim(&s)?;
    let o = p.matmul(&v)?.to_dtype(dt)?; // [B,Hq,T,D]
    o.transpose(1, 2)?.contiguous()
}

/// Repeats each kv head `groups` times: `[B,Hkv,T,D]` → `[B,Hkv·groups,T,D]`, head h ← h / groups.
pub fn expand_kv(x: &Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        return x.contiguous();
    }
    let (b, h, t, d) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, h, groups, t, d))?.reshape((b, h * groups, t, d))
}

/// `[T, T]` additive mask: 0 on and below the diagonal, −∞ above.
pub fn causal_mask(t: usize, dtype: DType, dev: &candle_core::Device) -> Result<Tensor> {
    let mut m = vec![0f32; t * t];
    for i in 0..t {
        for j in i + 1..t {
            m[i * t + j] = f32::NEG_INFINITY;
        }
    }
    Tensor::from_vec(m, (t, t), dev)?.to_dtype(dtype)
}

/// Plain f64 reference: token by token, each query against its causal prefix.
/// Slices are row-major `[B,T,H,D]`.
pub fn attn_reference(q: &[f64], k: &[f64], v: &[f64], b: usize, t: usize, hq: usize, hkv: usize, d: usize) -> Vec<f64> {
    let g = hq / hkv;
    let qi = |bb: usize, tt: usize, h: usize| ((bb * t + tt) * hq + h) * d;
    let ki = |bb: usize, tt: usize, h: usize| ((bb * t + tt) * hkv + h) * d;
    let mut o = vec![0.0; b * t * hq * d];
    let scale = 1.0 / (d as f64).sqrt();
    for bb in 0..b {
        for h in 0..hq {
            let kh = h / g;
            for i in 0..t {
                let s: Vec<f64> = (0..=i)
                    .map(|j| (0..d).map(|x| q[qi(bb, i, h) + x] * k[ki(bb, j, kh) + x]).sum::<f64>() * scale)
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for x in 0..d {
                        o[qi(bb, i, h) + x] += ej / z * v[ki(bb, j, kh) + x];
                    }
                }
            }
        }
    }
    o
}

/// Shape check shared by the op CLI.
pub fn check_shapes(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
    let (b, t, hq, d) = q.dims4()?;
    let (bk, tk, hkv, dk) = k.dims4()?;
    if (b, t, d) != (bk, tk, dk) || k.dims() != v.dims() || hkv == 0 || hq % hkv != 0 {
        candle_core::bail!(
            "attn: expected q [B,T,Hq,D] and k, v [B,T,Hkv,D] with Hq % Hkv == 0; got q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    Ok(())
}
