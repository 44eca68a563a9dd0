//! Fused MoBA for the CPU: visits only the blocks each query selected, flash style (online
//! softmax, saved log-sum-exp, recomputing backward), so work is O(T·top_k·bs·D) and memory
//! O(T·D) instead of the T×T of [`crate::ops::moba::moba_composed`]. Semantics:
//! [`crate::ops::moba`] (`../shared/reference/ops.md` §3); the split follows MoBA's own
//! efficient kernel (MoonshotAI/MoBA `moba/moba_efficient.py`): causal attention inside the own
//! block, plus, for every past block, attention of exactly the queries that selected it, merged
//! through the running max / sum.
//!
//! Per (batch, query head) the selection is recomputed from q and the block means of k with
//! [`crate::ops::moba::select_blocks`] (deterministic, so forward and backward agree), then
//! inverted into "queries of block n". Queries are processed in groups of at most [`BLOCK`]
//! rows against key tiles of at most [`BLOCK`] columns with the gemm helpers of
//! [`crate::ops::attn_fused`].
//!
//! Backward: `P = exp(S − L)`, `Dᵢ = rowsum(dOᵢ ⊙ Oᵢ)`, `dS = P ⊙ (dO Vᵀ − D)`,
//! `dQ = dS K/√D`, `dK = dSᵀ Q/√D`, `dV = Pᵀ dO` over the same tiles; one task per
//! (batch, kv head) that sums its query heads. No gradient through the selection.
//!
//! The op output is o `[B,T,Hq,D]`; the forward's L `(B·Hq·T)` stays in the op ([`Stash`]).

use super::attn_fused::{contiguous, cpu_slice, gather, pack_heads, scatter, transpose, Elem, Rows, BLOCK};
use super::simd::{dot, max, sum, with_fast_isa};
use super::gemm::{mm, Mat};
use super::moba::{block_means, select_blocks};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use super::cpu::Stash;
use rayon::prelude::*;

/// Fused MoBA. q `[B,T,Hq,D]`, k/v `[B,T,Hkv,D]` → o `[B,T,Hq,D]`; CPU, f32 or f64.
pub fn moba_fused(q: &Tensor, k: &Tensor, v: &Tensor, block_size: usize, top_k: usize) -> Result<Tensor> {
    super::moba::check_shapes(q, k, v, block_size, top_k)?;
    for (name, x) in [("q", q), ("k", k), ("v", v)] {
        if !x.device().is_cpu() {
            bail!("moba_fused: CPU only; `{name}` is on {:?}", x.device().location());
        }
        if !matches!(x.dtype(), DType::F32 | DType::F64) || x.dtype() != q.dtype() {
            bail!("moba_fused: q, k, v must all be f32 or all f64; got {:?}, {:?}, {:?}", q.dtype(), k.dtype(), v.dtype());
        }
    }
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, FusedMoba { bs: block_size, top_k, lse: Stash::default() })
}

/// The MoBA kernel's forward over contiguous q `[b,t,hq,d]`, k/v `[b,t,hkv,d]`: `[o ‖ L]` (o as
/// q, then the per-row log-sum-exp `[b,hq,t]`), for fused ops that run it inside their own.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_raw<T: Elem>((b, t, hq, hkv, d): (usize, usize, usize, usize, usize), bs: usize, top_k: usize, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
    FusedMoba { bs, top_k, lse: Stash::default() }.forward(Dims { b, t, hq, hkv, d }, q, k, v)
}

/// The MoBA kernel's backward: (dq, dk, dv) from q, k, v, the forward's o and L, and dO.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_raw<T: Elem>((b, t, hq, hkv, d): (usize, usize, usize, usize, usize), bs: usize, top_k: usize, q: &[T], k: &[T], v: &[T], o: &[T], lse: &[T], d_o: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
    FusedMoba { bs, top_k, lse: Stash::default() }.backward(Dims { b, t, hq, hkv, d }, q, k, v, o, lse, d_o)
}

struct FusedMoba {
    bs: usize,
    top_k: usize,
    /// The per-row log-sum-exp of the forward (see [`Stash`]).
    lse: Stash,
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    hq: usize,
    hkv: usize,
    d: usize,
}

impl Dims {
    fn new(q: &Shape, k: &Shape) -> Result<Self> {
        let (b, t, hq, d) = q.dims4()?;
        Ok(Self { b, t, hq, hkv: k.dims4()?.2, d })
    }
    fn n_out(&self) -> usize {
        self.b * self.t * self.hq * self.d
    }
}

/// The work list of one head: (query rows, first key, key count, causal) groups, each with at
/// most [`BLOCK`] queries. Own blocks come first (causal), then every past block with the
/// queries that selected it.
fn plan<T: Elem>(q: &[T], k: &[T], t: usize, d: usize, bs: usize, top_k: usize) -> Vec<(Vec<usize>, usize, usize, bool)> {
    let kbar = block_means(k, t, d, bs);
    let sel = select_blocks(q, &kbar, t, d, bs, top_k);
    let nb = t.div_ceil(bs);
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); nb];
    for (i, blocks) in sel.iter().enumerate() {
        for &n in blocks {
            users[n].push(i);
        }
    }
    let mut work = Vec::new();
    for n in 0..nb {
        let (j0, j1) = (n * bs, ((n + 1) * bs).min(t));
        let own: Vec<usize> = (j0..j1).collect();
        for rows in own.chunks(BLOCK) {
            work.push((rows.to_vec(), j0, j1 - j0, true));
        }
    }
    for (n, qs) in users.iter().enumerate() {
        for rows in qs.chunks(BLOCK) {
            work.push((rows.to_vec(), n * bs, bs, false));
        }
    }
    work
}

/// Rows `idx` of a dense `[T,D]` matrix, stacked into `out` (cleared first).
fn pick<T: Elem>(out: &mut Vec<T>, x: &[T], idx: &[usize], d: usize) {
    out.clear();
    for &i in idx {
        out.extend_from_slice(&x[i * d..(i + 1) * d]);
    }
}

/// Keys of tile column c (absolute key j) a query at position i may see.
fn visible(causal: bool, i: usize, j: usize) -> bool {
    !causal || j <= i
}

impl CustomOp3 for FusedMoba {
    fn name(&self) -> &'static str {
        "moba_fused"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::new(l1.shape(), l2.shape())?;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                self.lse.keep_tail(self.forward(dims, contiguous(q, l1)?, contiguous(k, l2)?, contiguous(v, l3)?), dims.n_out())
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                self.lse.keep_tail(self.forward(dims, contiguous(q, l1)?, contiguous(k, l2)?, contiguous(v, l3)?), dims.n_out())
            }
            _ => bail!("moba_fused: q, k, v must all be f32 or all f64; got {:?}, {:?}, {:?}", s1.dtype(), s2.dtype(), s3.dtype()),
        };
        Ok((out, Shape::from((dims.b, dims.t, dims.hq, dims.d))))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = Dims::new(q.shape(), k.shape())?;
        let d_o = grad_res.contiguous()?;
        let res = res.contiguous()?;
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => self.backward_tensors::<f32>(dims, q, k, v, &res, &self.lse, &d_o)?,
            DType::F64 => self.backward_tensors::<f64>(dims, q, k, v, &res, &self.lse, &d_o)?,
            dt => bail!("moba_fused: unsupported dtype {dt:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

impl FusedMoba {
    fn forward<T: Elem>(&self, dims: Dims, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        let Dims { b, t, hq, hkv, d } = dims;
        let g = hq / hkv;
        let heads: Vec<(Vec<T>, Vec<T>)> = (0..b * hq)
            .into_par_iter()
            .map(|bh| {
                let (bb, h) = (bh / hq, bh % hq);
                let qh = gather(q, bb, h, hq, t, d);
                let kh = gather(k, bb, h / g, hkv, t, d);
                let vh = gather(v, bb, h / g, hkv, t, d);
                with_fast_isa(#[inline(always)] || self.forward_head(&qh, &kh, &vh, t, d))
            })
            .collect();
        pack_heads(&heads, b, hq, t, d)
    }

    /// One head (dense `[T,D]`): o `[T,D]` and the row log-sum-exps `[T]`.
    #[inline(always)] // into with_fast_isa: the row loops get the wide ISA
    fn forward_head<T: Elem>(&self, q: &[T], k: &[T], v: &[T], t: usize, d: usize) -> (Vec<T>, Vec<T>) {
        let scale = T::from_f64(1.0 / (d as f64).sqrt());
        let mut acc = vec![T::zero(); t * d];
        let mut m = vec![T::NEG_INF; t];
        let mut l = vec![T::zero(); t];
        let mut s = vec![T::zero(); BLOCK * BLOCK];
        let mut pv = vec![T::zero(); BLOCK * d];
        // Kᵀ `[D,T]`: the score tiles' right operand row-major (see `attn_fused::transpose`).
        let kt = transpose(Rows::dense(k, d), t, d);
        let mut qg = Vec::with_capacity(BLOCK * d);
        for (rows, k0, klen, causal) in plan(q, k, t, d, self.bs, self.top_k) {
            pick(&mut qg, q, &rows, d);
            let nr = rows.len();
            for j0 in (k0..k0 + klen).step_by(BLOCK) {
                let cols = BLOCK.min(k0 + klen - j0);
                // Causal tiles wholly after every row of the group hold nothing visible.
                if causal && j0 > *rows.last().expect("non-empty group") {
                    break;
                }
                mm(nr, cols, d, &mut s, BLOCK, false, Mat::rows(&qg, d, 0), Mat::rows(&kt[j0..], t, 0), scale);
                for (r, &i) in rows.iter().enumerate() {
                    let row = &mut s[r * BLOCK..r * BLOCK + cols];
                    let valid = (0..cols).take_while(|&c| visible(causal, i, j0 + c)).count();
                    if valid == 0 {
                        row.fill(T::zero());
                        continue;
                    }
                    let mx = max(&row[..valid], m[i]);
                    let corr = (m[i] - mx).exp();
                    T::exp_shifted(&mut row[..valid], mx);
                    row[valid..].fill(T::zero());
                    l[i] = l[i] * corr + sum(&row[..valid]);
                    m[i] = mx;
                    if corr != T::one() {
                        acc[i * d..(i + 1) * d].iter_mut().for_each(|x| *x *= corr);
                    }
                }
                mm(nr, d, cols, &mut pv, d, false, Mat::rows(&s, BLOCK, 0), Mat::rows(v, d, j0), T::one());
                for (r, &i) in rows.iter().enumerate() {
                    acc[i * d..(i + 1) * d].iter_mut().zip(&pv[r * d..(r + 1) * d]).for_each(|(a, &p)| *a += p);
                }
            }
        }
        let mut lse = vec![T::zero(); t];
        for i in 0..t {
            let inv = T::one() / l[i];
            acc[i * d..(i + 1) * d].iter_mut().for_each(|x| *x *= inv);
            lse[i] = m[i] + l[i].ln();
        }
        super::cpu::give(kt);
        (acc, lse)
    }

    fn backward_tensors<T: Elem>(&self, dims: Dims, q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, lse: &Stash, d_o: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let guards: Vec<_> = [q, k, v, o, d_o].iter().map(|x| x.storage_and_layout()).collect();
        let s = guards.iter().map(|(st, l)| cpu_slice::<T>(st, l)).collect::<Result<Vec<_>>>()?;
        let (dq, dk, dv) = lse.with(|lse| self.backward(dims, s[0], s[1], s[2], s[3], lse, s[4]))?;
        drop(s);
        drop(guards);
        let dev = q.device();
        Ok((Tensor::from_vec(dq, q.shape(), dev)?, Tensor::from_vec(dk, k.shape(), dev)?, Tensor::from_vec(dv, v.shape(), dev)?))
    }

    #[allow(clippy::type_complexity)]
    fn backward<T: Elem>(&self, dims: Dims, q: &[T], k: &[T], v: &[T], o: &[T], lse: &[T], d_o: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        let Dims { b, t, hq, hkv, d } = dims;
        let g = hq / hkv;
        let n_o = dims.n_out();
        let per_kv: Vec<(Vec<Vec<T>>, Vec<T>, Vec<T>)> = (0..b * hkv)
            .into_par_iter()
            .map(|bk| {
                let (bb, kh) = (bk / hkv, bk % hkv);
                let kd = gather(k, bb, kh, hkv, t, d);
                let vd = gather(v, bb, kh, hkv, t, d);
                let mut dk = vec![T::zero(); t * d];
                let mut dv = vec![T::zero(); t * d];
                let dqs = (kh * g..(kh + 1) * g)
                    .map(|h| {
                        let qh = gather(q, bb, h, hq, t, d);
                        let oh = gather(o, bb, h, hq, t, d);
                        let doh = gather(d_o, bb, h, hq, t, d);
                        let lh = &lse[(bb * hq + h) * t..(bb * hq + h + 1) * t];
                        with_fast_isa(#[inline(always)] || self.backward_head(&qh, &kd, &vd, &oh, &doh, lh, t, d, &mut dk, &mut dv))
                    })
                    .collect();
                (dqs, dk, dv)
            })
            .collect();
        // Every (batch, head) block of the three is written below, one batch per task.
        let mut dq = super::cpu::take(n_o);
        let mut dk = super::cpu::take(b * t * hkv * d);
        let mut dv = super::cpu::take(b * t * hkv * d);
        let batches = dq.par_chunks_mut(t * hq * d).zip(dk.par_chunks_mut(t * hkv * d).zip(dv.par_chunks_mut(t * hkv * d)));
        batches.enumerate().for_each(|(bb, (dq, (dk, dv)))| {
            for kh in 0..hkv {
                let (dqs, dkh, dvh) = &per_kv[bb * hkv + kh];
                for (i, dqh) in dqs.iter().enumerate() {
                    scatter(dq, dqh, 0, kh * g + i, hq, t, d);
                }
                scatter(dk, dkh, 0, kh, hkv, t, d);
                scatter(dv, dvh, 0, kh, hkv, t, d);
            }
        });
        (dq, dk, dv)
    }

    /// One query head: returns dq `[T,D]`, adds into dk, dv `[T,D]`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)] // into with_fast_isa, as forward_head
    fn backward_head<T: Elem>(&self, q: &[T], k: &[T], v: &[T], o: &[T], d_o: &[T], lse: &[T], t: usize, d: usize, dk: &mut [T], dv: &mut [T]) -> Vec<T> {
        let scale = T::from_f64(1.0 / (d as f64).sqrt());
        let dvec: Vec<T> = d_o.chunks_exact(d).zip(o.chunks_exact(d)).take(t).map(|(a, b)| dot(a, b)).collect();
        let mut dq = vec![T::zero(); t * d];
        let mut p = vec![T::zero(); BLOCK * BLOCK];
        let mut ds = vec![T::zero(); BLOCK * BLOCK];
        let mut dqg = vec![T::zero(); BLOCK * d];
        let (kt, vt) = (transpose(Rows::dense(k, d), t, d), transpose(Rows::dense(v, d), t, d));
        let (mut qg, mut dog) = (Vec::with_capacity(BLOCK * d), Vec::with_capacity(BLOCK * d));
        for (rows, k0, klen, causal) in plan(q, k, t, d, self.bs, self.top_k) {
            let nr = rows.len();
            pick(&mut qg, q, &rows, d);
            pick(&mut dog, d_o, &rows, d);
            dqg[..nr * d].fill(T::zero());
            for j0 in (k0..k0 + klen).step_by(BLOCK) {
                let cols = BLOCK.min(k0 + klen - j0);
                if causal && j0 > *rows.last().expect("non-empty group") {
                    break;
                }
                mm(nr, cols, d, &mut p, BLOCK, false, Mat::rows(&qg, d, 0), Mat::rows(&kt[j0..], t, 0), scale);
                mm(nr, cols, d, &mut ds, BLOCK, false, Mat::rows(&dog, d, 0), Mat::rows(&vt[j0..], t, 0), T::one());
                for (r, &i) in rows.iter().enumerate() {
                    let valid = (0..cols).take_while(|&c| visible(causal, i, j0 + c)).count();
                    let prow = &mut p[r * BLOCK..r * BLOCK + cols];
                    let srow = &mut ds[r * BLOCK..r * BLOCK + cols];
                    T::exp_shifted(&mut prow[..valid], lse[i]);
                    for (sv, &pv) in srow[..valid].iter_mut().zip(prow[..valid].iter()) {
                        *sv = pv * (*sv - dvec[i]);
                    }
                    prow[valid..].fill(T::zero());
                    srow[valid..].fill(T::zero());
                }
                mm(cols, d, nr, &mut dv[j0 * d..], d, true, Mat::rows_t(&p, BLOCK, 0), Mat::rows(&dog, d, 0), T::one());
                mm(nr, d, cols, &mut dqg, d, true, Mat::rows(&ds, BLOCK, 0), Mat::rows(k, d, j0), scale);
                mm(cols, d, nr, &mut dk[j0 * d..], d, true, Mat::rows_t(&ds, BLOCK, 0), Mat::rows(&qg, d, 0), scale);
            }
            for (r, &i) in rows.iter().enumerate() {
                dq[i * d..(i + 1) * d].iter_mut().zip(&dqg[r * d..(r + 1) * d]).for_each(|(a, &x)| *a += x);
            }
        }
        super::cpu::give(kt);
        super::cpu::give(vt);
        dq
    }
}
