//! The routed experts of a MoE feed-forward as one autograd node: for each token n,
//! `y_n = Σ_r gate[n, r] · E_{e(n,r)}(x_n)` with SwiGLU experts `E_e(x) = (silu(x W_gate,e) ⊙
//! x W_up,e) W_down,e` (Shazeer et al. 2017; DeepSeek-V3, arXiv:2412.19437; `../shared/reference/
//! mixers.md` §MoE). The routing (which slots each expert serves, capacity drops) is decided
//! outside, from detached scores; the gates carry the router's gradient.
//!
//! Why one node: composed, the experts are a gather of the kept slots, three grouped projections
//! ([`super::grouped_linear`]), the SwiGLU, a concatenation with a zero row, a gather of each
//! token's slots, a product with the gates and a sum, and candle 0.11 zero-fills and adds a
//! gradient for every activation-sized input of each (`examples/graph_nodes.rs`). As one node
//! the activation inputs are x and the gates only.
//!
//! Forward per expert (its rows contiguous, grouped GEMMs with the `gemm` crate): `a = x W_gate`,
//! `b = x W_up`, `h = silu(a) ⊙ b`, `o = h W_down`; then each token sums its slots' outputs times
//! the gates. a, b and o stay in the op ([`Stash`]). Backward: `dgate[n, r] = dy_n · o_slot`,
//! `do_slot = gate · dy_n`, then per expert `dW_down = hᵀ do`, `dh = do W_downᵀ`, the SwiGLU
//! backward, `dW_gate = xᵀ da`, `dW_up = xᵀ db`, `dx_slot = da W_gateᵀ + db W_upᵀ`, added into
//! each slot's token in slot order (deterministic). [`moe_experts_composed`] is the reference.

use super::simd::with_fast_isa;
use super::attn_fused::{contiguous, cpu_slice, Elem};
use super::cpu::{give, take, Stash};
use super::gemm::{mm, Mat};
use super::swiglu::{gate_bwd_into, gate_into};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Which slots each expert serves.
#[derive(Clone, Debug)]
pub struct SlotPlan {
    /// Per expert, the tokens it processes (kept slots), in token order.
    pub tokens: Vec<Vec<u32>>,
    /// Per (token, rank), row-major `[N·K]`: the slot's row in the experts' concatenated
    /// outputs, or the kept-slot count for a dropped slot (contributes zero).
    pub pos: Vec<u32>,
}

impl SlotPlan {
    fn kept(&self) -> usize {
        self.tokens.iter().map(|t| t.len()).sum()
    }
    fn offsets(&self) -> Vec<usize> {
        let mut o = vec![0];
        self.tokens.iter().for_each(|t| o.push(o[o.len() - 1] + t.len()));
        o
    }
}

/// The routed experts' output `[N, d]` for x `[N, d]`, gates `[N, K]`, and per-expert weights
/// `w_gate`, `w_up` `[d, h]`, `w_down` `[h, d]`. One fused node on CPU for f32/f64, composed
/// elsewhere.
pub fn moe_experts(x: &Tensor, gates: &Tensor, w_gate: &[Tensor], w_up: &[Tensor], w_down: &[Tensor], plan: &SlotPlan) -> Result<Tensor> {
    let (n, d) = x.dims2()?;
    let (n2, k) = gates.dims2()?;
    let e = w_gate.len();
    let h = w_gate.first().map(|w| w.dim(1)).transpose()?.unwrap_or(0);
    let fits = n2 == n
        && e > 0
        && w_up.len() == e
        && w_down.len() == e
        && plan.tokens.len() == e
        && plan.pos.len() == n * k
        && (0..e).all(|i| w_gate[i].dims() == [d, h] && w_up[i].dims() == [d, h] && w_down[i].dims() == [h, d])
        && plan.tokens.iter().flatten().all(|&t| (t as usize) < n)
        && plan.pos.iter().all(|&p| (p as usize) <= plan.kept());
    if !fits {
        bail!("moe_experts: x {:?}, gates {:?}, {e} experts of {:?} / {:?} / {:?} and the slot plan do not fit", x.dims(), gates.dims(), w_gate.first().map(|w| w.dims().to_vec()), w_up.first().map(|w| w.dims().to_vec()), w_down.first().map(|w| w.dims().to_vec()));
    }
    let all: Vec<&Tensor> = [x, gates].into_iter().chain(w_gate).chain(w_up).chain(w_down).collect();
    if !super::cpu_fusable(&all) {
        return moe_experts_composed(x, gates, w_gate, w_up, w_down, plan);
    }
    let flat = w_gate.iter().chain(w_up).chain(w_down).map(|w| w.flatten_all()).collect::<Result<Vec<_>>>()?;
    let p = Tensor::cat(&flat, 0)?;
    let op = MoeExperts { n, d, h, k, plan: Arc::new(plan.clone()), saved: Stash::default() };
    x.contiguous()?.apply_op3(&gates.contiguous()?, &p, op)
}

/// Reference form from candle ops: gather, grouped projections, SwiGLU, gather of each token's
/// slots (a zero row for dropped ones), product with the gates, sum over ranks.
pub fn moe_experts_composed(x: &Tensor, gates: &Tensor, w_gate: &[Tensor], w_up: &[Tensor], w_down: &[Tensor], plan: &SlotPlan) -> Result<Tensor> {
    let (n, d) = x.dims2()?;
    let k = gates.dim(1)?;
    let dev = x.device();
    let zero_row = Tensor::zeros((1, d), x.dtype(), dev)?;
    let kept = plan.kept();
    let all = if kept == 0 {
        zero_row
    } else {
        let offsets = plan.offsets();
        let idx = Tensor::from_vec(plan.tokens.concat(), kept, dev)?;
        let xs = x.index_select(&idx, 0)?;
        let gl = super::grouped_linear::grouped_linear;
        let gate = gl(&xs, &Tensor::stack(w_gate, 0)?, &offsets)?;
        let up = gl(&xs, &Tensor::stack(w_up, 0)?, &offsets)?;
        let ys = gl(&super::swiglu::swiglu(&gate, &up)?, &Tensor::stack(w_down, 0)?, &offsets)?;
        Tensor::cat(&[&ys, &zero_row], 0)?
    };
    let pos = Tensor::from_vec(plan.pos.clone(), n * k, dev)?;
    let slots = all.index_select(&pos, 0)?.reshape((n, k, d))?;
    slots.broadcast_mul(&gates.unsqueeze(2)?)?.sum(1)
}

/// `buf` (`offsets.last()` rows of `width`) split at the row offsets: one slice per expert.
fn split_rows<'a, T>(mut buf: &'a mut [T], offsets: &[usize], width: usize) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(offsets.len().saturating_sub(1));
    for w in offsets.windows(2) {
        let (head, rest) = std::mem::take(&mut buf).split_at_mut((w[1] - w[0]) * width);
        out.push(head);
        buf = rest;
    }
    out
}

struct MoeExperts {
    n: usize,
    d: usize,
    h: usize,
    k: usize,
    plan: Arc<SlotPlan>,
    /// `[a, b, o]`: gate and up projections `[kept, h]` and the experts' outputs `[kept, d]`.
    saved: Stash,
}


impl MoeExperts {
    fn experts(&self) -> usize {
        self.plan.tokens.len()
    }

    /// Weight `which` (0 gate, 1 up, 2 down) of expert `e` in the packed parameters.
    fn weight<'a, T>(&self, p: &'a [T], which: usize, e: usize) -> &'a [T] {
        let sz = self.d * self.h;
        let start = (which * self.experts() + e) * sz;
        &p[start..start + sz]
    }

    /// The kept slots' token rows `[kept, d]`.
    fn gather<T: Elem>(&self, x: &[T]) -> Vec<T> {
        let d = self.d;
        let idx: Vec<u32> = self.plan.tokens.concat();
        let mut xs = take(idx.len() * d);
        xs.par_chunks_mut(d).zip(idx.par_iter()).for_each(|(r, &t)| r.copy_from_slice(&x[t as usize * d..(t as usize + 1) * d]));
        xs
    }

    fn forward<T: Elem>(&self, x: &[T], gates: &[T], p: &[T]) -> Vec<T> {
        let (d, h, k) = (self.d, self.h, self.k);
        let off = self.plan.offsets();
        let kept = off[off.len() - 1];
        let xs = self.gather(x);
        // The experts' row ranges tile 0..kept: every row of a, b, o and hs is written.
        let mut a = take(kept * h);
        let mut b = take(kept * h);
        let mut o = take(kept * d);
        let mut hs = take(kept * h);
        {
            let tasks = split_rows(&mut a, &off, h).into_iter().zip(split_rows(&mut b, &off, h)).zip(split_rows(&mut hs, &off, h).into_iter().zip(split_rows(&mut o, &off, d)));
            let tasks: Vec<_> = tasks.enumerate().filter(|(e, _)| off[e + 1] > off[*e]).collect();
            // One task per expert, each product single-threaded: the experts' products are small
            // (N·K/E rows), and splitting each over the threads costs a fork-join per product.
            tasks.into_par_iter().for_each(|(e, ((ae, be), (he, oe)))| {
                let rows = off[e + 1] - off[e];
                let xe = &xs[off[e] * d..];
                mm(rows, h, d, ae, h, false, Mat::rows(xe, d, 0), Mat::rows(self.weight(p, 0, e), h, 0), T::one());
                mm(rows, h, d, be, h, false, Mat::rows(xe, d, 0), Mat::rows(self.weight(p, 1, e), h, 0), T::one());
                gate_into(ae, be, he);
                mm(rows, d, h, oe, d, false, Mat::rows(he, h, 0), Mat::rows(self.weight(p, 2, e), d, 0), T::one());
            });
        }
        give(xs);
        give(hs);
        let mut y = vec![T::zero(); self.n * d];
        let pos = &self.plan.pos;
        y.par_chunks_mut(d).enumerate().for_each(|(t, yr)| {
            for r in 0..k {
                let slot = pos[t * k + r] as usize;
                if slot < kept {
                    let g = gates[t * k + r];
                    yr.iter_mut().zip(&o[slot * d..(slot + 1) * d]).for_each(|(y, &v)| *y += g * v);
                }
            }
        });
        self.saved.put_parts(vec![a, b, o]);
        y
    }

    /// Returns (dx, dgates, dp).
    fn backward<T: Elem>(&self, x: &[T], gates: &[T], p: &[T], s: &[&[T]], dy: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (n, d, h, k) = (self.n, self.d, self.h, self.k);
        let (a, b, o) = (s[0], s[1], s[2]);
        let off = self.plan.offsets();
        let kept = off[off.len() - 1];
        let pos = &self.plan.pos;
        // dgates and each slot's output gradient (every kept slot belongs to one (token, rank)).
        let mut dgates = vec![T::zero(); n * k];
        // Every kept slot belongs to one (token, rank): all rows of d_o are written.
        let mut d_o = take(kept * d);
        let mut slot_of = vec![(0usize, T::zero()); kept];
        for t in 0..n {
            for r in 0..k {
                let slot = pos[t * k + r] as usize;
                if slot < kept {
                    slot_of[slot] = (t, gates[t * k + r]);
                }
            }
        }
        dgates.par_chunks_mut(k).enumerate().for_each(|(t, dg)| {
            for r in 0..k {
                let slot = pos[t * k + r] as usize;
                if slot < kept {
                    dg[r] = with_fast_isa(#[inline(always)] || super::simd::dot(&o[slot * d..(slot + 1) * d], &dy[t * d..(t + 1) * d]));
                }
            }
        });
        d_o.par_chunks_mut(d).zip(slot_of.par_iter()).for_each(|(dr, &(t, g))| dr.iter_mut().zip(&dy[t * d..(t + 1) * d]).for_each(|(v, &gy)| *v = g * gy));
        // Per expert (one task each, products single-threaded as in the forward): the SwiGLU
        // FFN backward into its rows of dxs and its three weight gradients.
        let xs = self.gather(x);
        let ex = self.experts();
        let sz = d * h;
        let mut dp = vec![T::zero(); 3 * ex * sz];
        let mut da = take(kept * h);
        let mut db = take(kept * h);
        let mut hs = take(kept * h);
        let mut dxs = take(kept * d);
        {
            // dp is [gate experts ‖ up experts ‖ down experts]: expert e's three blocks.
            let mut blocks: Vec<&mut [T]> = dp.chunks_mut(sz).collect();
            let down: Vec<&mut [T]> = blocks.drain(2 * ex..).collect();
            let up: Vec<&mut [T]> = blocks.drain(ex..).collect();
            let grads = blocks.into_iter().zip(up).zip(down);
            let rows_of = split_rows(&mut da, &off, h).into_iter().zip(split_rows(&mut db, &off, h)).zip(split_rows(&mut hs, &off, h).into_iter().zip(split_rows(&mut dxs, &off, d)));
            let tasks: Vec<_> = grads.zip(rows_of).enumerate().filter(|(e, _)| off[e + 1] > off[*e]).collect();
            tasks.into_par_iter().for_each(|(e, (((dwg, dwu), dwd), ((dae, dbe), (he, dxe))))| {
                let (r0, rows) = (off[e], off[e + 1] - off[e]);
                let (xe, doe) = (&xs[r0 * d..(r0 + rows) * d], &d_o[r0 * d..(r0 + rows) * d]);
                mm(rows, h, d, dae, h, false, Mat::rows(doe, d, 0), Mat::rows_t(self.weight(p, 2, e), d, 0), T::one());
                gate_bwd_into(&a[r0 * h..(r0 + rows) * h], &b[r0 * h..(r0 + rows) * h], dae, dbe, he);
                mm(h, d, rows, dwd, d, false, Mat::rows_t(he, h, 0), Mat::rows(doe, d, 0), T::one());
                mm(d, h, rows, dwg, h, false, Mat::rows_t(xe, d, 0), Mat::rows(dae, h, 0), T::one());
                mm(d, h, rows, dwu, h, false, Mat::rows_t(xe, d, 0), Mat::rows(dbe, h, 0), T::one());
                mm(rows, d, h, dxe, d, false, Mat::rows(dae, h, 0), Mat::rows_t(self.weight(p, 0, e), h, 0), T::one());
                mm(rows, d, h, dxe, d, true, Mat::rows(dbe, h, 0), Mat::rows_t(self.weight(p, 1, e), h, 0), T::one());
            });
        }
        // Each slot's gradient into its token, in slot order; tokens in parallel.
        let mut dx = vec![T::zero(); n * d];
        dx.par_chunks_mut(d).enumerate().for_each(|(t, dxr)| {
            let mut slots: Vec<usize> = (0..k).map(|r| pos[t * k + r] as usize).filter(|&sl| sl < kept).collect();
            slots.sort_unstable();
            for sl in slots {
                dxr.iter_mut().zip(&dxs[sl * d..(sl + 1) * d]).for_each(|(v, &g)| *v += g);
            }
        });
        [xs, d_o, da, db, hs, dxs].into_iter().for_each(give);
        (dx, dgates, dp)
    }

    fn grads<T: Elem>(&self, x: &Tensor, gates: &Tensor, p: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let guards: Vec<_> = [x, gates, p, dy].iter().map(|t| t.storage_and_layout()).collect();
        let sl = guards.iter().map(|(st, l)| cpu_slice::<T>(st, l)).collect::<Result<Vec<_>>>()?;
        let (dx, dg, dp) = self.saved.with_parts(|s| self.backward(sl[0], sl[1], sl[2], s, sl[3]))?;
        drop(sl);
        drop(guards);
        let dev = x.device();
        Ok((Tensor::from_vec(dx, x.shape(), dev)?, Tensor::from_vec(dg, gates.shape(), dev)?, Tensor::from_vec(dp, p.shape(), dev)?))
    }
}

impl CustomOp3 for MoeExperts {
    fn name(&self) -> &'static str {
        "moe_experts"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        if l1.dims() != [self.n, self.d] || l2.dims() != [self.n, self.k] || l3.shape().elem_count() != 3 * self.experts() * self.d * self.h {
            bail!("moe_experts: x {:?}, gates {:?}, packed weights {:?} do not fit the op", l1.dims(), l2.dims(), l3.dims());
        }
        let y = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(p)) => CpuStorage::F32(self.forward(contiguous(x, l1)?, contiguous(g, l2)?, contiguous(p, l3)?)),
            (CpuStorage::F64(x), CpuStorage::F64(g), CpuStorage::F64(p)) => CpuStorage::F64(self.forward(contiguous(x, l1)?, contiguous(g, l2)?, contiguous(p, l3)?)),
            _ => bail!("moe_experts: inputs must all be f32 or all f64; got {:?}, {:?}, {:?}", s1.dtype(), s2.dtype(), s3.dtype()),
        };
        Ok((y, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, gates: &Tensor, p: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !x.device().is_cpu() {
            bail!("moe_experts: CPU only, got inputs on {:?}", x.device().location());
        }
        let dy = dy.contiguous()?;
        let (dx, dg, dp) = match x.dtype() {
            DType::F32 => self.grads::<f32>(x, gates, p, &dy)?,
            DType::F64 => self.grads::<f64>(x, gates, p, &dy)?,
            dt => bail!("moe_experts: unsupported dtype {dt:?}"),
        };
        Ok((Some(dx), Some(dg), Some(dp)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grads, rand_tensor};
    use candle_core::Var;

    /// 3 experts, 9 tokens, top-2, with one dropped slot and an expert that serves nothing.
    fn plan() -> SlotPlan {
        // (token, rank) → expert; slot rows grouped by expert in token order; (4, 1) dropped.
        let chosen = [[0, 1], [1, 0], [0, 1], [1, 0], [0, 1], [1, 0], [0, 1], [0, 1], [1, 0]];
        let mut tokens = vec![Vec::new(), Vec::new(), Vec::new()];
        for (t, c) in chosen.iter().enumerate() {
            for (r, &e) in c.iter().enumerate() {
                if (t, r) != (4, 1) {
                    tokens[e].push(t as u32);
                }
            }
        }
        let off = [0, tokens[0].len(), tokens[0].len() + tokens[1].len()];
        let kept = off[2];
        let mut pos = vec![kept as u32; 18];
        for (t, c) in chosen.iter().enumerate() {
            for (r, &e) in c.iter().enumerate() {
                if let Some(i) = tokens[e].iter().position(|&x| x as usize == t) {
                    if (t, r) != (4, 1) {
                        pos[t * 2 + r] = (off[e] + i) as u32;
                    }
                }
            }
        }
        SlotPlan { tokens, pos }
    }

    fn vars(dt: DType) -> Vec<Var> {
        let (d, h) = (6, 5);
        let mut v = vec![Var::from_tensor(&rand_tensor(&[9, d], 1.0, 1).to_dtype(dt).unwrap()).unwrap()];
        v.push(Var::from_tensor(&rand_tensor(&[9, 2], 1.0, 2).to_dtype(dt).unwrap()).unwrap());
        for i in 0..9 {
            let shape: &[usize] = if i < 6 { &[d, h] } else { &[h, d] };
            v.push(Var::from_tensor(&rand_tensor(shape, 0.5, 10 + i).to_dtype(dt).unwrap()).unwrap());
        }
        v
    }

    fn run(v: &[Var], fused: bool) -> Tensor {
        let w: Vec<Tensor> = v[2..].iter().map(|x| x.as_tensor().clone()).collect();
        let f = if fused { moe_experts } else { moe_experts_composed };
        f(v[0].as_tensor(), v[1].as_tensor(), &w[0..3], &w[3..6], &w[6..9], &plan()).unwrap()
    }

    /// Fused == composed, forward and every gradient (x, gates, each expert weight), f64 and
    /// f32; finite differences in f64.
    #[test]
    fn fused_matches_composed_and_finite_differences() {
        for (dt, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let v = vars(dt);
            let wy = rand_tensor(&[9, 6], 1.0, 30).to_dtype(dt).unwrap();
            let (yf, yc) = (run(&v, true), run(&v, false));
            assert_close("moe experts fwd", &yc, &yf, tol);
            let gf = (&yf * &wy).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (&yc * &wy).unwrap().sum_all().unwrap().backward().unwrap();
            for (i, x) in v.iter().enumerate() {
                assert_close(&format!("moe experts grad {i}"), gc.get(x.as_tensor()).unwrap(), gf.get(x.as_tensor()).unwrap(), tol);
            }
        }
        let v = vars(DType::F64);
        let wy = rand_tensor(&[9, 6], 1.0, 30);
        let named: Vec<(String, Var)> = v.iter().enumerate().map(|(i, x)| (format!("input {i}"), x.clone())).collect();
        check_grads("moe_experts", &named, &|| (run(&v, true) * &wy).unwrap().sum_all().unwrap(), 12);
    }

    /// A plan that does not fit the inputs is an error.
    #[test]
    fn bad_plan_errors() {
        let v = vars(DType::F64);
        let w: Vec<Tensor> = v[2..].iter().map(|x| x.as_tensor().clone()).collect();
        let mut p = plan();
        p.pos.pop();
        assert!(moe_experts(v[0].as_tensor(), v[1].as_tensor(), &w[0..3], &w[3..6], &w[6..9], &p).is_err());
        let mut p = plan();
        p.tokens[0].push(99);
        assert!(moe_experts(v[0].as_tensor(), v[1].as_tensor(), &w[0..3], &w[3..6], &w[6..9], &p).is_err());
    }
}
