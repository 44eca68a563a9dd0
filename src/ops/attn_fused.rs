//! Fused causal attention for the CPU: FlashAttention-2 (Dao 2023, arXiv:2307.08691) adapted
//! to CPU cores, with a hand-written backward.
//!
//! Same semantics as [`crate::ops::attn::attn`] (`../shared/reference/ops.md` §1): q `[B,T,Hq,D]`,
//! k, v `[B,T,Hkv,D]`, query head h reads kv head `h / (Hq/Hkv)`,
//! `o[i] = Σ_{j≤i} softmax_j(q_i·k_j/√D) v_j`.
//!
//! Forward: one rayon task per (batch, query head). Queries are processed in row blocks of
//! [`ROWS`] rows against key chunks of up to [`KEYS`] columns; keys past a block's last row
//! are skipped, softmax is computed online (running max and running sum), so no `T×T` matrix
//! is ever held. The per-row log-sum-exp `L_i = m_i + ln l_i` is saved for the backward.
//! Block matmuls use the `gemm` crate single-threaded inside the rayon tasks (at D=32 it took
//! about a third of the CPU time of plain auto-vectorised loops); the f32 `exp` is a branch-free
//! polynomial ([`exp_f32`]) compiled for AVX-512/AVX2 where the CPU has them.
//!
//! Backward (flash-style, recomputes P): `P = exp(S − L)`, `D_i = rowsum(dO_i ⊙ O_i)`,
//! `dS = P ⊙ (dO Vᵀ − D)`, `dQ = dS K/√D`, `dK = dSᵀ Q/√D`, `dV = Pᵀ dO`; one task per
//! (batch, kv head), which sums dK, dV over the query heads of its group (no races).
//!
//! Forgetting attention (FoX, Lin et al. 2025, arXiv:2503.02130; `../shared/reference/ops.md` §2)
//! runs through the same kernel: [`fox_fused`] adds the bias `G_i − G_j` (`G = cumsum(g)`, the
//! cumulative log forget gate per query head) to every logit. `G` is accumulated in f64 and each
//! tile adds `(G_i − G_{j0}) + (G_{j0} − G_j)` with `j0` the tile's first key, so the f32 terms
//! stay as small as the distance inside the tile allows (never `exp` of a raw cumsum). Its
//! gradient: `dG_i = Σ_j dS_ij − Σ_j dS_ji` (row minus column sums of dS), `dg_t = Σ_{i≥t} dG_i`.
//! To fit candle's three-input CustomOp, g travels as an extra last column of q (`[B,T,Hq,D+1]`).
//!
//! State: the op output is `o`; the forward's `L (B·Hq·T)` stays in the op ([`Stash`],
//! read-only afterwards), and the backward gets `o` back as `res`. Backpropagating the same
//! output any number of times is correct. (A packed `[o | L]` output, narrowed by the caller,
//! cost candle two extra graph nodes and a zero-padded gradient of the whole buffer.)

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, WithDType};
use rayon::prelude::*;

use super::cpu::Stash;
use super::gemm::{mm, Mat};
use super::simd::{dot, exp_f32, exp_shifted_f32, lanes_sum, max, sum, with_fast_isa};

/// Rows of a query block and columns of a key block (MoBA's tiles).
pub const BLOCK: usize = 64;

/// Rows of a query block of the causal kernels. A row block computes its products up to its last
/// row's key, so the masked work above the diagonal is one `ROWS × ROWS` triangle per block: at
/// T = 256 the score tiles hold 53% of the full `T × T` products with 16 rows, 56% with 32 and
/// 62.5% with 64. Fewer rows also make the `dV`/`dK` products shorter (K = ROWS), but
/// `examples/foxmoba_speed.rs` (forward + backward at the preset shape B=16, T=256, H=4, D=32,
/// one thread, best of 10 per run, runs alternating with the other build on the noisy AVX2 VM)
/// measured attention 43.6–51.3 ms with 16 rows (6 runs) against 49.6–58.3 with 64 and
/// 46.9–67.5 with 32 (3 runs each); FoX 48.8–65.1 against 52.3–73.8 (64) and 52.6–57.7 (32).
pub const ROWS: usize = 16;

/// Columns of a key chunk of the causal kernels: a multiple of [`ROWS`], so every query row of a
/// row block that reaches a chunk has at least one valid key in it. One chunk spans a whole
/// row at T ≤ 256 (no online-softmax rescaling, one product per row block for S and one for P·V),
/// and the score products get N = 256; the scratch stays `ROWS × KEYS` at any T.
pub const KEYS: usize = 256;

/// Valid keys of row `row` in a chunk starting at key `j0` with `cols` columns (causal).
#[inline]
fn valid_keys(row: usize, j0: usize, cols: usize) -> usize {
    (row + 1 - j0).min(cols)
}

/// Fused causal attention with GQA. q `[B,T,Hq,D]`, k/v `[B,T,Hkv,D]` → o `[B,T,Hq,D]`.
/// CPU only, f32 or f64 (all three inputs the same dtype); other devices or dtypes are errors.
/// Differentiable w.r.t. q, k and v.
pub fn attn_fused(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    super::attn::check_shapes(q, k, v)?;
    for (name, x) in [("q", q), ("k", k), ("v", v)] {
        if !x.device().is_cpu() {
            bail!("attn_fused: CPU only; `{name}` is on {:?}", x.device().location());
        }
        if !matches!(x.dtype(), DType::F32 | DType::F64) || x.dtype() != q.dtype() {
            bail!("attn_fused: q, k, v must all be f32 or all f64; got {:?}, {:?}, {:?}", q.dtype(), k.dtype(), v.dtype());
        }
    }
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, FusedAttn { fox: false, lse: Stash::default() })
}

/// Fused forgetting attention: [`attn_fused`] with logits `q_i·k_j/√D + G_i − G_j`,
/// `G = cumsum_t(g)`; g `[B,T,Hq]` is the log forget gate per query head (same dtype as q).
/// Differentiable w.r.t. q, k, v and g.
pub fn fox_fused(q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor) -> Result<Tensor> {
    super::fox::check_shapes(q, k, v, g)?;
    for (name, x) in [("q", q), ("k", k), ("v", v), ("g", g)] {
        if !x.device().is_cpu() {
            bail!("fox_fused: CPU only; `{name}` is on {:?}", x.device().location());
        }
        if !matches!(x.dtype(), DType::F32 | DType::F64) || x.dtype() != q.dtype() {
            bail!("fox_fused: q, k, v, g must all be f32 or all f64; got {:?}, {:?}, {:?}, {:?}", q.dtype(), k.dtype(), v.dtype(), g.dtype());
        }
    }
    let qg = Tensor::cat(&[q, &g.unsqueeze(3)?], 3)?.contiguous()?;
    qg.apply_op3(&k.contiguous()?, &v.contiguous()?, FusedAttn { fox: true, lse: Stash::default() })
}

/// The op: forward produces o (and stashes L), backward the three input gradients.
/// With `fox`, the first input is q with g as an extra last column.
struct FusedAttn {
    fox: bool,
    /// The per-row log-sum-exp L of the forward (see [`Stash`]).
    lse: Stash,
}

/// Problem sizes, read from the argument shapes.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    b: usize,
    t: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    /// Row width of the first input: d, or d + 1 when it carries g (FoX).
    qw: usize,
}

impl Dims {
    /// Plain attention (no FoX gate) over q `[b,t,hq,d]`, k/v `[b,t,hkv,d]`.
    pub(super) fn plain(b: usize, t: usize, hq: usize, hkv: usize, d: usize) -> Self {
        Self { b, t, hq, hkv, d, qw: d }
    }
    fn new(q: &Shape, k: &Shape, fox: bool) -> Result<Self> {
        let (b, t, hq, qw) = q.dims4()?;
        let (_, _, hkv, d) = k.dims4()?;
        if qw != d + fox as usize {
            bail!("attn_fused: q row width {qw} does not fit head dim {d} (fox: {fox})");
        }
        Ok(Self { b, t, hq, hkv, d, qw })
    }
    /// Query heads per kv head.
    fn groups(&self) -> usize {
        self.hq / self.hkv
    }
    fn n_out(&self) -> usize {
        self.b * self.t * self.hq * self.d
    }
    fn scale(&self) -> f64 {
        1.0 / (self.d as f64).sqrt()
    }
}

/// Element types the kernels run in.
pub(super) trait Elem: WithDType {
    const NEG_INF: Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    /// `x ← exp(x − shift)` for every element.
    fn exp_shifted(x: &mut [Self], shift: Self);
}

impl Elem for f32 {
    const NEG_INF: Self = f32::NEG_INFINITY;
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f32::ln(self)
    }
    fn exp_shifted(x: &mut [Self], shift: Self) {
        exp_shifted_f32(x, shift)
    }
}

impl Elem for f64 {
    const NEG_INF: Self = f64::NEG_INFINITY;
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn exp_shifted(x: &mut [Self], shift: Self) {
        x.iter_mut().for_each(|v| *v = (*v - shift).exp());
    }
}

impl CustomOp3 for FusedAttn {
    fn name(&self) -> &'static str {
        "attn_fused"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::new(l1.shape(), l2.shape(), self.fox)?;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                self.lse.keep_tail(forward(dims, contiguous(q, l1)?, contiguous(k, l2)?, contiguous(v, l3)?), dims.n_out())
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                self.lse.keep_tail(forward(dims, contiguous(q, l1)?, contiguous(k, l2)?, contiguous(v, l3)?), dims.n_out())
            }
            _ => bail!("attn_fused: q, k, v must all be f32 or all f64; got {:?}, {:?}, {:?}", s1.dtype(), s2.dtype(), s3.dtype()),
        };
        Ok((out, Shape::from((dims.b, dims.t, dims.hq, dims.d))))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = Dims::new(q.shape(), k.shape(), self.fox)?;
        let d_o = grad_res.contiguous()?;
        let res = res.contiguous()?;
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => backward_tensors::<f32>(dims, q, k, v, &res, &self.lse, &d_o)?,
            DType::F64 => backward_tensors::<f64>(dims, q, k, v, &res, &self.lse, &d_o)?,
            dt => bail!("attn_fused: unsupported dtype {dt:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The contiguous elements a layout addresses.
pub(super) fn contiguous<'a, T>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => bail!("attn_fused: expected contiguous inputs"),
    }
}

/// A CPU storage's contiguous elements as `&[T]`.
pub(super) fn cpu_slice<'a, T: WithDType>(storage: &'a Storage, layout: &Layout) -> Result<&'a [T]> {
    match storage {
        Storage::Cpu(s) => contiguous(T::cpu_storage_as_slice(s)?, layout),
        _ => bail!("attn_fused: CPU only"),
    }
}

/// Copies head `h` of batch `bb` out of `[B,T,H,D]` into a dense `[T,D]` (MoBA; attention reads
/// its heads in place through [`Rows`]).
pub(super) fn gather<T: Copy>(x: &[T], bb: usize, h: usize, heads: usize, t: usize, d: usize) -> Vec<T> {
    let rows = Rows::head(x, bb, h, heads, t, d);
    let mut out = Vec::with_capacity(t * d);
    (0..t).for_each(|i| out.extend_from_slice(rows.row(i, d)));
    out
}

/// Writes a dense `[T,D]` head back into `[B,T,H,D]`.
pub(super) fn scatter<T: Copy>(dst: &mut [T], src: &[T], bb: usize, h: usize, heads: usize, t: usize, d: usize) {
    scatter_w(dst, src, bb, h, heads, t, d, 0, d)
}

/// Writes a dense `[T,d]` head into columns `c0..c0+d` of `[B,T,H,W]`.
#[allow(clippy::too_many_arguments)]
fn scatter_w<T: Copy>(dst: &mut [T], src: &[T], bb: usize, h: usize, heads: usize, t: usize, w: usize, c0: usize, d: usize) {
    for i in 0..t {
        let at = ((bb * t + i) * heads + h) * w + c0;
        dst[at..at + d].copy_from_slice(&src[i * d..(i + 1) * d]);
    }
}

/// Inclusive cumulative sum in f64 of column `d` (g) of head `h`, batch `bb` of `[B,T,H,D+1]`.
fn cum_g<T: Elem>(x: &[T], bb: usize, h: usize, heads: usize, t: usize, d: usize) -> Vec<f64> {
    let mut acc = 0f64;
    (0..t)
        .map(|i| {
            acc += x[((bb * t + i) * heads + h) * (d + 1) + d].to_f64();
            acc
        })
        .collect()
}

/// Adds the FoX bias `G_{i0+r} − G_{j0+c}` to rows `0..rows`, columns `0..valid(r)` of a tile
/// (row stride [`KEYS`]), as `(G_i − G_{j0}) + (G_{j0} − G_j)`.
fn add_bias<T: Elem>(s: &mut [T], cum: &[f64], i0: usize, j0: usize, rows: usize, cols: usize) {
    let base = cum[j0];
    let col: Vec<T> = (0..cols).map(|c| T::from_f64(base - cum[j0 + c])).collect();
    for r in 0..rows {
        let valid = valid_keys(i0 + r, j0, cols);
        let a = T::from_f64(cum[i0 + r] - base);
        for (x, &b) in s[r * KEYS..r * KEYS + valid].iter_mut().zip(&col) {
            *x += a + b;
        }
    }
}

/// Forward over all heads: `[o | L]` in one buffer (the op keeps `o` and stashes `L`).
pub(super) fn forward<T: Elem>(dims: Dims, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
    let Dims { b, t, hq, hkv, d, qw } = dims;
    let g = dims.groups();
    let heads: Vec<(Vec<T>, Vec<T>)> = (0..b * hq)
        .into_par_iter()
        .map(|bh| {
            let (bb, h) = (bh / hq, bh % hq);
            let (qh, kh, vh) = (Rows::head(q, bb, h, hq, t, qw), Rows::head(k, bb, h / g, hkv, t, d), Rows::head(v, bb, h / g, hkv, t, d));
            let cum = (qw > d).then(|| cum_g(q, bb, h, hq, t, d));
            with_fast_isa(#[inline(always)] || forward_head(qh, kh, vh, t, d, T::from_f64(dims.scale()), cum.as_deref()))
        })
        .collect();
    pack_heads(&heads, b, hq, t, d)
}

/// `[o | L]` in one buffer from per-(batch, head) dense o `[T,D]` and `L` `[T]` (`heads` in
/// batch-major order): o as `[B,T,H,D]`, then L as `[B,H,T]`.
pub(super) fn pack_heads<T: Copy + WithDType>(heads: &[(Vec<T>, Vec<T>)], b: usize, hq: usize, t: usize, d: usize) -> Vec<T> {
    let n_o = b * t * hq * d;
    // Every head's rows and log-sum-exps are written below; the rows one batch (a contiguous
    // `[T,H,D]` block) per task, so the copy does not leave the other cores idle.
    let mut out = super::cpu::take(n_o + b * hq * t);
    let (o_all, l_all) = out.split_at_mut(n_o);
    o_all.par_chunks_mut(t * hq * d).enumerate().for_each(|(bb, dst)| {
        for h in 0..hq {
            scatter(dst, &heads[bb * hq + h].0, 0, h, hq, t, d);
        }
    });
    for (bh, (_, lse)) in heads.iter().enumerate() {
        l_all[bh * t..(bh + 1) * t].copy_from_slice(lse);
    }
    out
}

/// One head, its `[T,D]` q, k, v read in place (and the FoX cumulative gate `G` `[T]`, if any):
/// returns o `[T,D]` and the row log-sum-exps `L` `[T]`.
#[inline(always)] // into with_fast_isa: the row loops (max, sums, dS) get the wide ISA
fn forward_head<T: Elem>(q: Rows<T>, k: Rows<T>, v: Rows<T>, t: usize, d: usize, scale: T, cum: Option<&[f64]>) -> (Vec<T>, Vec<T>) {
    let mut o = vec![T::zero(); t * d];
    let mut lse = vec![T::zero(); t];
    // Scratch: each tile's products are written before they are read.
    let mut s = super::cpu::take(ROWS * KEYS);
    let mut m = [T::NEG_INF; ROWS];
    let mut l = [T::zero(); ROWS];
    let kt = transpose(k, t, d);
    for i0 in (0..t).step_by(ROWS) {
        let rows = ROWS.min(t - i0);
        m.fill(T::NEG_INF);
        l.fill(T::zero());
        let acc = &mut o[i0 * d..(i0 + rows) * d];
        // Key chunks start at multiples of KEYS ≤ i0, so every row has a valid key in each.
        for j0 in (0..i0 + rows).step_by(KEYS) {
            let cols = KEYS.min(i0 + rows - j0);
            mm(rows, cols, d, &mut s, KEYS, false, q.mat(i0), Mat::rows(&kt[j0..], t, 0), scale);
            if let Some(cum) = cum {
                add_bias(&mut s, cum, i0, j0, rows, cols);
            }
            for r in 0..rows {
                let valid = valid_keys(i0 + r, j0, cols);
                let row = &mut s[r * KEYS..r * KEYS + cols];
                let mx = max(&row[..valid], m[r]);
                let corr = (m[r] - mx).exp();
                T::exp_shifted(&mut row[..valid], mx);
                row[valid..].fill(T::zero());
                l[r] = l[r] * corr + sum(&row[..valid]);
                m[r] = mx;
                if corr != T::one() {
                    acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= corr);
                }
            }
            mm(rows, d, cols, acc, d, true, Mat::rows(&s, KEYS, 0), v.mat(j0), T::one());
        }
        for r in 0..rows {
            let inv = T::one() / l[r];
            acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= inv);
            lse[i0 + r] = m[r] + l[r].ln();
        }
    }
    super::cpu::give(s);
    super::cpu::give(kt);
    (o, lse)
}

/// `[D, T]` copy of a `[T, D]` head: the key-side operand of `Q Kᵀ` (and `dO Vᵀ`) as a
/// row-major matrix. gemm packs a transposed right operand slowly at these shapes: 64×32×256
/// products measured 54 GFLOP/s with `Kᵀ` as a strided view vs 125 with the copy (one core,
/// `examples/gemm_shapes.rs --tiles`), and [`super::tile_mm`] needs a row-major right operand.
///
/// In blocks of 16 rows: each block's rows stay in L1 while its columns are written out as
/// 16-element runs (a column-at-a-time loop over the strided rows was ~9% of an attention
/// fwd+bwd in `perf`, against ~1.6% for a dense copy plus transpose).
pub(super) fn transpose<T: Copy + WithDType>(x: Rows<T>, t: usize, d: usize) -> Vec<T> {
    const R: usize = 16;
    let mut out = super::cpu::take(t * d); // every element is written below
    #[cfg(target_arch = "x86_64")]
    let gather = super::zmm_row::f32_avx512::<T>() && 15 * x.stride <= i32::MAX as usize;
    #[cfg(target_arch = "x86_64")]
    let avx2 = super::zmm_row::f32_avx2::<T>();
    for i0 in (0..t).step_by(R) {
        let n = R.min(t - i0);
        #[cfg(target_arch = "x86_64")]
        if (gather || avx2) && n == R {
            let src = super::zmm_row::f32s(&x.data[i0 * x.stride..]).as_ptr();
            assert!((i0 + R - 1) * x.stride + d <= x.data.len());
            let dst = super::zmm_row::f32s_mut(&mut out).as_mut_ptr();
            // SAFETY: AVX-512F (f32_avx512) or AVX2 (f32_avx2) checked; T = f32 (f32s asserts);
            // rows i0..i0+16 of d columns lie in x.data (asserted) and the 16-wide runs of `out`
            // at c·t + i0 end by (d−1)·t + t.
            unsafe {
                if gather {
                    super::zmm_row::x86::transpose16(src, x.stride, d, dst.add(i0), t)
                } else {
                    super::zmm_row::x86_avx2::transpose16(src, x.stride, d, dst.add(i0), t)
                }
            }
            continue;
        }
        let rows: [&[T]; R] = std::array::from_fn(|r| if r < n { x.row(i0 + r, d) } else { x.row(i0, d) });
        for c in 0..d {
            for (o, row) in out[c * t + i0..c * t + i0 + n].iter_mut().zip(&rows) {
                *o = row[c];
            }
        }
    }
    out
}

/// One head of a `[B,T,H,W]` tensor read in place: row i (`W` wide, the head's first columns
/// used) starts at `data[i·stride]`, `stride = H·W`. The kernels used to copy each head into a
/// dense `[T,D]` first (five copies per head in the backward, ~4% of an attention-preset step in
/// `memmove`); the products take the row stride as it is.
#[derive(Clone, Copy)]
pub(super) struct Rows<'a, T> {
    data: &'a [T],
    stride: usize,
}

impl<'a, T> Rows<'a, T> {
    /// A dense row-major `[·, d]` matrix.
    pub(super) fn dense(x: &'a [T], d: usize) -> Self {
        Self { data: x, stride: d }
    }
    /// Head `h` of batch `bb` of `[B,T,heads,w]`.
    fn head(x: &'a [T], bb: usize, h: usize, heads: usize, t: usize, w: usize) -> Self {
        Self { data: &x[(bb * t * heads + h) * w..], stride: heads * w }
    }
    /// Row i, `d` wide.
    #[inline(always)]
    fn row(&self, i: usize, d: usize) -> &'a [T] {
        &self.data[i * self.stride..i * self.stride + d]
    }
    /// The rows from `r0` on as a product operand.
    fn mat(&self, r0: usize) -> Mat<'a, T> {
        Mat::rows(self.data, self.stride, r0)
    }
}

/// Backward as tensors shaped like q, k, v.
fn backward_tensors<T: Elem>(dims: Dims, q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, lse: &Stash, d_o: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let guards: Vec<_> = [q, k, v, o, d_o].iter().map(|x| x.storage_and_layout()).collect();
    let s = guards.iter().map(|(st, l)| cpu_slice::<T>(st, l)).collect::<Result<Vec<_>>>()?;
    let (dq, dk, dv) = lse.with(|lse| backward(dims, s[0], s[1], s[2], s[3], lse, s[4]))?;
    drop(s);
    drop(guards);
    let dev = q.device();
    Ok((Tensor::from_vec(dq, q.shape(), dev)?, Tensor::from_vec(dk, k.shape(), dev)?, Tensor::from_vec(dv, v.shape(), dev)?))
}

/// Backward over all heads: dq `[B,T,Hq,D]`, dk, dv `[B,T,Hkv,D]` from q, k, v, the forward's
/// o and L, and dO.
pub(super) fn backward<T: Elem>(dims: Dims, q: &[T], k: &[T], v: &[T], o: &[T], lse: &[T], d_o: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
    let Dims { b, t, hq, hkv, d, qw } = dims;
    let g = dims.groups();
    let scale = T::from_f64(dims.scale());
    type PerKv<T> = (Vec<(Vec<T>, Vec<T>)>, Vec<T>, Vec<T>);
    let per_kv: Vec<PerKv<T>> = (0..b * hkv)
        .into_par_iter()
        .map(|bk| {
            let (bb, kh) = (bk / hkv, bk % hkv);
            let (kd, vd) = (Rows::head(k, bb, kh, hkv, t, d), Rows::head(v, bb, kh, hkv, t, d));
            let mut dk = vec![T::zero(); t * d];
            let mut dv = vec![T::zero(); t * d];
            let dqs = (kh * g..(kh + 1) * g)
                .map(|h| {
                    let cum = (qw > d).then(|| cum_g(q, bb, h, hq, t, d));
                    let head = Head {
                        q: Rows::head(q, bb, h, hq, t, qw),
                        k: kd,
                        v: vd,
                        o: Rows::head(o, bb, h, hq, t, d),
                        d_o: Rows::head(d_o, bb, h, hq, t, d),
                        lse: &lse[(bb * hq + h) * t..(bb * hq + h + 1) * t],
                        cum: cum.as_deref(),
                    };
                    with_fast_isa(#[inline(always)] || backward_head(&head, t, d, scale, &mut dk, &mut dv))
                })
                .collect();
            (dqs, dk, dv)
        })
        .collect();
    // Every (batch, head) block of the three is written below (dq's FoX column too).
    let mut dq = super::cpu::take(b * t * hq * qw);
    let mut dk = super::cpu::take(b * t * hkv * d);
    let mut dv = super::cpu::take(b * t * hkv * d);
    // One batch (contiguous `[T,H,·]` blocks of the three) per task.
    let batches = dq.par_chunks_mut(t * hq * qw).zip(dk.par_chunks_mut(t * hkv * d).zip(dv.par_chunks_mut(t * hkv * d)));
    batches.enumerate().for_each(|(bb, (dq, (dk, dv)))| {
        for kh in 0..hkv {
            let (dqs, dkh, dvh) = &per_kv[bb * hkv + kh];
            for (i, (dqh, dgh)) in dqs.iter().enumerate() {
                scatter_w(dq, dqh, 0, kh * g + i, hq, t, qw, 0, d);
                if qw > d {
                    scatter_w(dq, dgh, 0, kh * g + i, hq, t, qw, d, 1);
                }
            }
            scatter(dk, dkh, 0, kh, hkv, t, d);
            scatter(dv, dvh, 0, kh, hkv, t, d);
        }
    });
    (dq, dk, dv)
}

/// The `[T,D]` operands of one query head's backward (read in place), and its saved `L` `[T]`.
struct Head<'a, T> {
    q: Rows<'a, T>,
    k: Rows<'a, T>,
    v: Rows<'a, T>,
    o: Rows<'a, T>,
    d_o: Rows<'a, T>,
    lse: &'a [T],
    /// FoX: cumulative log forget gate `G` `[T]`.
    cum: Option<&'a [f64]>,
}

/// One query head: returns its dq `[T,D]` and (FoX) dg `[T]` (empty without FoX), and adds its
/// contributions into dk, dv `[T,D]`.
#[inline(always)] // into with_fast_isa, as forward_head
fn backward_head<T: Elem>(x: &Head<T>, t: usize, d: usize, scale: T, dk: &mut [T], dv: &mut [T]) -> (Vec<T>, Vec<T>) {
    let mut dq = vec![T::zero(); t * d];
    // FoX: dG_i = Σ_j dS_ij − Σ_j dS_ji, accumulated in f64.
    let mut d_cum = vec![0f64; if x.cum.is_some() { t } else { 0 }];
    let dvec: Vec<T> = (0..t).map(|i| dot(x.d_o.row(i, d), x.o.row(i, d))).collect();
    // Scratch: each tile's products are written before they are read.
    let mut p = super::cpu::take(ROWS * KEYS);
    let mut ds = super::cpu::take(ROWS * KEYS);
    let (kt, vt) = (transpose(x.k, t, d), transpose(x.v, t, d));
    for i0 in (0..t).step_by(ROWS) {
        let rows = ROWS.min(t - i0);
        for j0 in (0..i0 + rows).step_by(KEYS) {
            let cols = KEYS.min(i0 + rows - j0);
            mm(rows, cols, d, &mut p, KEYS, false, x.q.mat(i0), Mat::rows(&kt[j0..], t, 0), scale);
            mm(rows, cols, d, &mut ds, KEYS, false, x.d_o.mat(i0), Mat::rows(&vt[j0..], t, 0), T::one());
            if let Some(cum) = x.cum {
                add_bias(&mut p, cum, i0, j0, rows, cols);
            }
            for r in 0..rows {
                let valid = valid_keys(i0 + r, j0, cols);
                let (lr, dr) = (x.lse[i0 + r], dvec[i0 + r]);
                let prow = &mut p[r * KEYS..r * KEYS + cols];
                let srow = &mut ds[r * KEYS..r * KEYS + cols];
                T::exp_shifted(&mut prow[..valid], lr);
                for (sv, &pv) in srow[..valid].iter_mut().zip(prow[..valid].iter()) {
                    *sv = pv * (*sv - dr);
                }
                prow[valid..].fill(T::zero());
                srow[valid..].fill(T::zero());
                if x.cum.is_some() {
                    d_cum[i0 + r] += lanes_sum(&srow[..valid], |v| v.to_f64());
                    for (dc, v) in d_cum[j0..j0 + valid].iter_mut().zip(&srow[..valid]) {
                        *dc -= v.to_f64();
                    }
                }
            }
            mm(cols, d, rows, &mut dv[j0 * d..], d, true, Mat::rows_t(&p, KEYS, 0), x.d_o.mat(i0), T::one());
            mm(rows, d, cols, &mut dq[i0 * d..], d, true, Mat::rows(&ds, KEYS, 0), x.k.mat(j0), scale);
            mm(cols, d, rows, &mut dk[j0 * d..], d, true, Mat::rows_t(&ds, KEYS, 0), x.q.mat(i0), scale);
        }
    }
    // dg_t = Σ_{i≥t} dG_i (G is the inclusive cumsum of g).
    let mut acc = 0f64;
    let mut dg = vec![T::zero(); d_cum.len()];
    for i in (0..d_cum.len()).rev() {
        acc += d_cum[i];
        dg[i] = T::from_f64(acc);
    }
    super::cpu::give(p);
    super::cpu::give(ds);
    super::cpu::give(kt);
    super::cpu::give(vt);
    (dq, dg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The head transpose (the AVX-512 gather or the AVX2 8×8 blocks for full 16-row blocks, the
    /// scalar loop for the rest and for f64) is `out[c·T + i] = x[i·stride + c]`, with a row
    /// stride wider than d. The AVX2 block is also checked directly where AVX-512 is dispatched.
    #[test]
    fn transpose_is_exact() {
        for (t, d, stride) in [(37usize, 32usize, 4 * 32), (64, 24, 24), (5, 3, 7), (48, 13, 13), (32, 19, 40)] {
            let data: Vec<f32> = (0..t * stride).map(|i| i as f32 * 0.5 - 3.0).collect();
            let x = Rows { data: &data[..], stride };
            let out = transpose(x, t, d);
            let data64: Vec<f64> = data.iter().map(|&v| v as f64).collect();
            let out64 = transpose(Rows { data: &data64[..], stride }, t, d);
            for i in 0..t {
                for c in 0..d {
                    assert_eq!(out[c * t + i], data[i * stride + c], "t={t} d={d} ({i},{c})");
                    assert_eq!(out64[c * t + i], data64[i * stride + c]);
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            let (stride, ldo) = (11, 13);
            let src: Vec<f32> = (0..8 * stride).map(|i| i as f32 + 0.25).collect();
            let mut out = vec![-1f32; 8 * ldo];
            // SAFETY: AVX2 checked; 8 rows of stride 11 and 8 runs of 13 fit the buffers.
            unsafe { crate::ops::zmm_row::x86_avx2::transpose8x8(src.as_ptr(), stride, out.as_mut_ptr(), ldo) };
            for c in 0..8 {
                for r in 0..ldo {
                    let want = if r < 8 { src[r * stride + c] } else { -1.0 };
                    assert_eq!(out[c * ldo + r], want, "8x8 block ({r},{c})");
                }
            }
        }
    }
}
