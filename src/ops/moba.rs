//! Core op `moba`: Mixture of Block Attention (Lu et al., Moonshot AI 2025, "MoBA: Mixture of
//! Block Attention for Long-Context LLMs", arXiv:2502.13189), layout `[B, T, H, D]`
//! (semantics: `../shared/reference/ops.md` §3; reference MoonshotAI/MoBA
//! `moba/moba_naive.py::moba_attn_varlen_naive`; `../shared/reference/mixers.md` §5).
//!
//! Keys are cut into blocks of `block_size` tokens (block n = `[n·bs, min(T, (n+1)·bs))`). For
//! query i with own block `c = i / bs`:
//! ```text
//! s_n = q_i · mean_{j∈block n} k_j            for fully past blocks n < c (unscaled; ranking only)
//! selected = {c} ∪ the min(top_k − 1, c) blocks n < c with the largest s_n
//! o_i = Σ_{j≤i, block(j) selected} softmax_j(q_i·k_j/√D) v_j
//! ```
//! The own block counts toward `top_k`; blocks after c never compete (the reference writes −∞ to
//! their gate and +∞ to the own block's). Ties in s_n go to the lower block index (the reference
//! leaves them to `torch.topk`). Selection is discrete: no gradient flows through the gate, as in
//! the reference (its gate only enters as 0/−∞).
//!
//! GQA is supported beyond the reference (query head h reads kv head `h / (Hq/Hkv)`, and scores
//! its blocks with its own q against that kv head's mean keys); with Hq = Hkv it is the reference.
//!
//! Forms: [`moba`] dispatches to [`crate::ops::moba_fused::moba_fused`] on CPU f32/f64 (visits
//! only the selected blocks: O(T·top_k·bs·D) work, no T×T matrix; hand-written backward) or to
//! [`moba_composed`] (a `[B,Hq,T,T]` 0/−∞ mask on causal attention; candle autograd; any device).
//! [`moba_reference`] is a plain f64 loop used by tests.

use super::attn::{causal_mask, expand_kv};
use candle_core::{bail, DType, Result, Tensor, WithDType};

/// MoBA attention. q `[B,T,Hq,D]`, k/v `[B,T,Hkv,D]` → o `[B,T,Hq,D]`.
pub fn moba(q: &Tensor, k: &Tensor, v: &Tensor, block_size: usize, top_k: usize) -> Result<Tensor> {
    let cpu = [q, k, v].iter().all(|x| x.device().is_cpu());
    if cpu && matches!(q.dtype(), DType::F32 | DType::F64) && k.dtype() == q.dtype() && v.dtype() == q.dtype() {
        return super::moba_fused::moba_fused(q, k, v, block_size, top_k);
    }
    moba_composed(q, k, v, block_size, top_k)
}

/// MoBA as masked causal attention from candle primitives: the block selection (from detached
/// q, k) becomes a 0/−∞ mask `[B,Hq,T,T]`; scores and softmax in f32 (f64 for f64 inputs).
pub fn moba_composed(q: &Tensor, k: &Tensor, v: &Tensor, block_size: usize, top_k: usize) -> Result<Tensor> {
    check_shapes(q, k, v, block_size, top_k)?;
    let (b, t, hq, d) = q.dims4()?;
    let hkv = k.dim(2)?;
    let rt = super::reduction_dtype(q.dtype());
    let qv: Vec<f64> = q.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let kv: Vec<f64> = k.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let mut mask = vec![f32::NEG_INFINITY; b * hq * t * t];
    for bb in 0..b {
        for h in 0..hq {
            let qh = head_rows(&qv, bb, h, hq, t, d);
            let kh = head_rows(&kv, bb, h / (hq / hkv), hkv, t, d);
            let sel = select_blocks(&qh, &block_means(&kh, t, d, block_size), t, d, block_size, top_k);
            let base = (bb * hq + h) * t * t;
            for i in 0..t {
                let c = i / block_size;
                for n in sel[i].iter().copied().chain([c]) {
                    let j1 = ((n + 1) * block_size).min(t);
                    mask[base + i * t + n * block_size..base + i * t + j1].fill(0.0);
                }
            }
        }
    }
    let mask = Tensor::from_vec(mask, (b, hq, t, t), q.device())?.to_dtype(rt)?;
    let qh = q.transpose(1, 2)?.contiguous()?.to_dtype(rt)?; // [B,Hq,T,D]
    let kh = expand_kv(&k.transpose(1, 2)?, hq / hkv)?.to_dtype(rt)?;
    let vh = expand_kv(&v.transpose(1, 2)?, hq / hkv)?;
    let s = (qh.matmul(&kh.transpose(2, 3)?)? * (1.0 / (d as f64).sqrt()))?;
    let s = (s + mask)?.broadcast_add(&causal_mask(t, rt, q.device())?)?;
    // P·V in the reduction dtype too (as flash-attention's f32 accumulators): for bf16 inputs
    // the backward's dP = dO·Vᵀ stays f32 before the softmax backward's cancellation.
    let p = super::softmax::softmax_last_dim(&s)?;
    p.matmul(&vh.to_dtype(rt)?)?.to_dtype(v.dtype())?.transpose(1, 2)?.contiguous()
}

/// Dense `[T,D]` copy of head h of batch bb from `[B,T,H,D]` values.
fn head_rows(x: &[f64], bb: usize, h: usize, heads: usize, t: usize, d: usize) -> Vec<f64> {
    (0..t).flat_map(|i| x[((bb * t + i) * heads + h) * d..][..d].iter().copied()).collect()
}

/// Mean key of every block: `[ceil(T/bs), D]` from a dense `[T,D]` head (the last block's mean
/// is over its own, possibly fewer, tokens).
pub fn block_means<T: WithDType>(k: &[T], t: usize, d: usize, bs: usize) -> Vec<f64> {
    let nb = t.div_ceil(bs);
    let mut out = vec![0f64; nb * d];
    for n in 0..nb {
        let (j0, j1) = (n * bs, ((n + 1) * bs).min(t));
        for j in j0..j1 {
            for x in 0..d {
                out[n * d + x] += k[j * d + x].to_f64();
            }
        }
        out[n * d..(n + 1) * d].iter_mut().for_each(|v| *v /= (j1 - j0) as f64);
    }
    out
}

/// The past blocks each query selects besides its own: for every row i of a dense `[T,D]` q,
/// the (up to `top_k − 1`) blocks n < i/bs with the largest `q_i·kbar_n`, in increasing order;
/// ties go to the lower index. `kbar` is [`block_means`].
pub fn select_blocks<T: WithDType>(q: &[T], kbar: &[f64], t: usize, d: usize, bs: usize, top_k: usize) -> Vec<Vec<usize>> {
    let want = top_k.saturating_sub(1);
    let nb = t.div_ceil(bs);
    // kbar transposed to `[D, nb]`, so that one query's scores of all past blocks advance together
    // over x: each score is still summed in order x = 0..d from −0.0 (the bits of
    // `Iterator::sum`), but the adds of different blocks overlap (and vectorise) instead of forming
    // one dependent chain per block.
    let kbar_t = super::attn_fused::transpose(super::attn_fused::Rows::dense(kbar, d), nb, d);
    let mut dots = vec![0f64; nb];
    let mut scored: Vec<(f64, usize)> = Vec::with_capacity(nb);
    let picks = (0..t)
        .map(|i| {
            let c = i / bs;
            if c <= want {
                return (0..c).collect();
            }
            let dots = &mut dots[..c];
            dots.fill(-0.0);
            for (x, qx) in q[i * d..(i + 1) * d].iter().enumerate() {
                let qx = qx.to_f64();
                dots.iter_mut().zip(&kbar_t[x * nb..x * nb + c]).for_each(|(acc, &kb)| *acc += qx * kb);
            }
            scored.clear();
            scored.extend(dots.iter().enumerate().map(|(n, &s)| (s, n)));
            scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let mut picked: Vec<usize> = scored[..want].iter().map(|&(_, n)| n).collect();
            picked.sort_unstable();
            picked
        })
        .collect();
    super::cpu::give(kbar_t);
    picks
}

/// Plain f64 reference, row-major slices q `[B,T,Hq,D]`, k, v `[B,T,Hkv,D]`: every query scores
/// the fully past blocks, keeps its own block and the best `top_k − 1`, and attends to the keys
/// of those blocks at or before it.
#[allow(clippy::too_many_arguments)]
pub fn moba_reference(q: &[f64], k: &[f64], v: &[f64], b: usize, t: usize, hq: usize, hkv: usize, d: usize, bs: usize, top_k: usize) -> Vec<f64> {
    let grp = hq / hkv;
    let qi = |bb: usize, tt: usize, h: usize| ((bb * t + tt) * hq + h) * d;
    let ki = |bb: usize, tt: usize, h: usize| ((bb * t + tt) * hkv + h) * d;
    let scale = 1.0 / (d as f64).sqrt();
    let mut o = vec![0.0; b * t * hq * d];
    for bb in 0..b {
        for h in 0..hq {
            let kh = h / grp;
            for i in 0..t {
                let c = i / bs;
                // Gate: mean key of every fully past block, scored by the unscaled query.
                let mut gate: Vec<(f64, usize)> = (0..c)
                    .map(|n| {
                        let mean: Vec<f64> = (0..d).map(|x| (n * bs..(n + 1) * bs).map(|j| k[ki(bb, j, kh) + x]).sum::<f64>() / bs as f64).collect();
                        ((0..d).map(|x| q[qi(bb, i, h) + x] * mean[x]).sum::<f64>(), n)
                    })
                    .collect();
                gate.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
                let mut chosen = vec![false; c + 1];
                chosen[c] = true;
                for &(_, n) in gate.iter().take(top_k - 1) {
                    chosen[n] = true;
                }
                let keys: Vec<usize> = (0..=i).filter(|&j| chosen[j / bs]).collect();
                let s: Vec<f64> = keys.iter().map(|&j| (0..d).map(|x| q[qi(bb, i, h) + x] * k[ki(bb, j, kh) + x]).sum::<f64>() * scale).collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (&j, ej) in keys.iter().zip(&e) {
                    for x in 0..d {
                        o[qi(bb, i, h) + x] += ej / z * v[ki(bb, j, kh) + x];
                    }
                }
            }
        }
    }
    o
}

/// Shape and attribute check: attention shapes, `block_size ≥ 1`, `top_k ≥ 1`.
pub fn check_shapes(q: &Tensor, k: &Tensor, v: &Tensor, block_size: usize, top_k: usize) -> Result<()> {
    super::attn::check_shapes(q, k, v)?;
    if block_size == 0 || top_k == 0 {
        bail!("moba: block_size and top_k must be >= 1; got block_size {block_size}, top_k {top_k}");
    }
    Ok(())
}
