//! Strided matrix products for the fused CPU kernels, on the `gemm` crate (the library candle's
//! CPU matmul uses) or, for f32 on CPUs with AVX2 but no AVX-512, [`super::sgemm`]: [`mm`]
//! single-threaded inside a kernel's own rayon tasks, [`mm_par`] on the rayon pool for
//! whole-batch products.

use candle_core::WithDType;

/// A strided read-only matrix operand: element (r, c) is `data[r·rs + c·cs]`.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a, T> {
    data: &'a [T],
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// Row-major with row stride `rs`, starting at row `r0`.
    pub(super) fn rows(data: &'a [T], rs: usize, r0: usize) -> Self {
        Self { data: &data[r0 * rs..], rs, cs: 1 }
    }
    /// The transpose of [`Mat::rows`].
    pub(super) fn rows_t(data: &'a [T], rs: usize, r0: usize) -> Self {
        Self { data: &data[r0 * rs..], rs: 1, cs: rs }
    }
}

/// Inner dimension from which a product with a transposed left operand (`Aᵀ·B`, e.g. the MoE
/// experts' weight gradients `xₑᵀ·daₑ` over the expert's rows) goes to the packed
/// [`super::sgemm`] where it is enabled, instead of [`super::tile_mm`], whose broadcasts then
/// read A down a column. One core, hot caches (`examples/gemm_shapes.rs -- 1 --tiles`, two
/// runs): 176×128 and 128×176 over k = 1024 at 65.6–70.4 GFLOP/s packed vs 54.0–57.8 tile_mm.
/// The attention kernels' `Pᵀ dO`, `dSᵀ Q` (k = a 16-row block) stay on tile_mm.
const PACKED_AT_MIN_K: usize = 256;

/// `dst[m×n] (row stride ldd) = (accumulate ? dst : 0) + alpha · a[m×k] · b[k×n]`, single-threaded.
#[allow(clippy::too_many_arguments)]
pub(super) fn mm<T: WithDType>(m: usize, n: usize, k: usize, dst: &mut [T], ldd: usize, accumulate: bool, a: Mat<T>, b: Mat<T>, alpha: T) {
    let packed_at = a.rs == 1 && a.cs != 1 && k >= PACKED_AT_MIN_K && super::sgemm::enabled();
    if T::DTYPE == candle_core::DType::F32 && b.cs == 1 && m > 0 && n > 0 && k > 0 && !packed_at {
        check(m, n, k, dst, ldd, a, b);
        // SAFETY: T is f32 (checked above), so the casts only rename the element type.
        let (dst32, a32, b32) = unsafe { (cast_mut(dst), cast(a.data), cast(b.data)) };
        if super::tile_mm::try_mm_f32(m, n, k, dst32, ldd, accumulate, (a32, a.rs, a.cs), (b32, b.rs), alpha.to_f64() as f32) {
            return;
        }
    }
    product(m, n, k, dst, ldd, accumulate, a, b, alpha, gemm::Parallelism::None)
}

/// [`mm`] on the rayon pool (all its threads when the product has at least 2¹⁶ multiply-adds).
#[allow(clippy::too_many_arguments)]
pub(super) fn mm_par<T: WithDType>(m: usize, n: usize, k: usize, dst: &mut [T], ldd: usize, accumulate: bool, a: Mat<T>, b: Mat<T>, alpha: T) {
    let threads = rayon::current_num_threads();
    if threads > 1 && k >= SPLIT_K_MIN && k >= 8 * m.max(n) && m > 0 && n > 0 {
        return mm_split_k(threads, m, n, k, dst, ldd, accumulate, a, b, alpha);
    }
    let par = if threads > 1 && m * n * k >= 1 << 16 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    product(m, n, k, dst, ldd, accumulate, a, b, alpha, par)
}

/// [`mm_par`] splits the inner dimension across the threads from this length up (and when it is
/// at least 8× the larger side of the result).
const SPLIT_K_MIN: usize = 1024;

/// A product with a long inner dimension and a small result (the weight gradients `dW = xᵀ·dy`
/// of the fused sublayers: `[d, n]` from `B·T` rows): each thread multiplies its own run of the
/// inner dimension, single-threaded, and the runs' results are added to the first in a fixed
/// order (so the result does not depend on scheduling). gemm's own threading splits the small
/// result between the threads instead: 128×128×4096 ran at 128 GFLOP/s on 2 threads, 168 split
/// by k; 128×384×4096 at 110 vs 155 with cold caches (scratch bench of the gemm crate, 2 cores).
#[allow(clippy::too_many_arguments)]
fn mm_split_k<T: WithDType>(parts: usize, m: usize, n: usize, k: usize, dst: &mut [T], ldd: usize, accumulate: bool, a: Mat<T>, b: Mat<T>, alpha: T) {
    check(m, n, k, dst, ldd, a, b);
    let step = k.div_ceil(parts);
    let runs = k.div_ceil(step);
    // Run p covers k0 = p·step .. min(k0 + step, k): a's columns and b's rows from k0.
    let run = |p: usize| {
        let k0 = p * step;
        (step.min(k - k0), Mat { data: &a.data[k0 * a.cs..], ..a }, Mat { data: &b.data[k0 * b.rs..], ..b })
    };
    let (_, partials) = rayon::join(
        || {
            let (kl, a0, b0) = run(0);
            product(m, n, kl, dst, ldd, accumulate, a0, b0, alpha, gemm::Parallelism::None)
        },
        || {
            use rayon::prelude::*;
            (1..runs)
                .into_par_iter()
                .map(|p| {
                    let (kl, ap, bp) = run(p);
                    let mut c = super::cpu::take(m * n); // overwritten (accumulate = false)
                    product(m, n, kl, &mut c, n, false, ap, bp, alpha, gemm::Parallelism::None);
                    c
                })
                .collect::<Vec<_>>()
        },
    );
    for c in partials {
        for (row, part) in dst.chunks_mut(ldd).zip(c.chunks(n)) {
            row[..n].iter_mut().zip(part).for_each(|(d, &v)| *d += v);
        }
        super::cpu::give(c);
    }
}

#[allow(clippy::too_many_arguments)]
fn product<T: WithDType>(m: usize, n: usize, k: usize, dst: &mut [T], ldd: usize, accumulate: bool, a: Mat<T>, b: Mat<T>, alpha: T, par: gemm::Parallelism) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        assert!((m - 1) * ldd + n <= dst.len(), "mm: destination too short");
        if !accumulate {
            dst.chunks_mut(ldd).take(m).for_each(|r| r[..n].iter_mut().for_each(|v| *v = T::zero()));
        }
        return;
    }
    check(m, n, k, dst, ldd, a, b);
    if T::DTYPE == candle_core::DType::F32 && super::sgemm::enabled() {
        let threads = match par {
            gemm::Parallelism::Rayon(t) => t,
            _ => 1,
        };
        // SAFETY: T is f32 (checked above), so the casts only rename the element type.
        let (dst32, a32, b32) = unsafe { (cast_mut(dst), cast(a.data), cast(b.data)) };
        let (a32, b32) = (super::sgemm::Operand { data: a32, rs: a.rs, cs: a.cs }, super::sgemm::Operand { data: b32, rs: b.rs, cs: b.cs });
        if super::sgemm::try_sgemm(m, n, k, dst32, ldd, accumulate, a32, b32, alpha.to_f64() as f32, threads) {
            return;
        }
    }
    // SAFETY: the asserts above keep every index gemm touches inside the three slices, and
    // `dst` does not alias `a` or `b` (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ldd as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::one(),
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}

/// Panics unless every index of an `m×n·k` product lies inside the three slices (`m, n, k > 0`).
fn check<T: Copy>(m: usize, n: usize, k: usize, dst: &[T], ldd: usize, a: Mat<T>, b: Mat<T>) {
    assert!((m - 1) * ldd + n <= dst.len(), "mm: destination too short");
    let last = |x: Mat<T>, r: usize, c: usize| (r - 1) * x.rs + (c - 1) * x.cs;
    assert!(last(a, m, k) < a.data.len() && last(b, k, n) < b.data.len(), "mm: operand too short");
}

/// # Safety
/// `T` must be `f32`.
unsafe fn cast<T>(x: &[T]) -> &[f32] {
    std::slice::from_raw_parts(x.as_ptr().cast(), x.len())
}

/// # Safety
/// `T` must be `f32`.
unsafe fn cast_mut<T>(x: &mut [T]) -> &mut [f32] {
    std::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), x.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f32 through every path of [`mm_par`] (the k-split, the row split, a transposed B, the small
    /// single-threaded product), whichever backend runs it, against an f64 triple loop.
    #[test]
    fn f32_paths_match_f64() {
        let val = |i: usize, s: usize| ((i * 7919 + s * 104_729) % 1000) as f32 / 500.0 - 1.0;
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for (m, n, k, tb) in [(5usize, 7usize, 1100usize, false), (300, 50, 40, false), (300, 50, 40, true), (3, 4, 5, false)] {
            let a: Vec<f32> = (0..m * k).map(|i| val(i, 1)).collect(); // [m, k]
            let b: Vec<f32> = (0..k * n).map(|i| val(i, 2)).collect(); // [k, n], or [n, k] when tb
            let bm = if tb { Mat::rows_t(&b, k, 0) } else { Mat::rows(&b, n, 0) };
            let init = vec![1f32; m * n];
            let mut dst = init.clone();
            pool.install(|| mm_par(m, n, k, &mut dst, n, true, Mat::rows(&a, k, 0), bm, 0.5f32));
            let (brs, bcs) = if tb { (1, k) } else { (n, 1) };
            crate::testing::assert_product(&format!("m{m} n{n} k{k} tb{tb}"), &dst, &init, (m, n, k, n), (&a, k, 1), (&b, brs, bcs), true, 0.5, 1e-4);
        }
    }

    /// `mm` with a transposed left operand on both sides of [`PACKED_AT_MIN_K`] (tile_mm below,
    /// the packed sgemm from it where enabled), row-major A alongside: f32 against f64.
    #[test]
    fn mm_transposed_left_operand_matches_f64() {
        let val = |i: usize, s: usize| ((i * 7919 + s * 104_729) % 1000) as f32 / 500.0 - 1.0;
        for (m, n, k) in [(13usize, 21usize, PACKED_AT_MIN_K - 1), (13, 21, PACKED_AT_MIN_K), (176, 40, 517)] {
            for ta in [false, true] {
                let a: Vec<f32> = (0..m * k).map(|i| val(i, 1)).collect(); // [m, k], or [k, m] when ta
                let b: Vec<f32> = (0..k * n).map(|i| val(i, 2)).collect(); // [k, n]
                let (am, ars, acs) = if ta { (Mat::rows_t(&a, m, 0), 1, m) } else { (Mat::rows(&a, k, 0), k, 1) };
                let ldd = n + 3;
                let init: Vec<f32> = (0..m * ldd).map(|i| val(i, 3)).collect();
                for accumulate in [false, true] {
                    let mut dst = init.clone();
                    mm(m, n, k, &mut dst, ldd, accumulate, am, Mat::rows(&b, n, 0), 0.75f32);
                    let ctx = format!("m{m} n{n} k{k} ta{ta} acc{accumulate}");
                    crate::testing::assert_product(&ctx, &dst, &init, (m, n, k, ldd), (&a, ars, acs), (&b, n, 1), accumulate, 0.75, 1e-4);
                }
            }
        }
    }

    /// The k-split product (3 threads, so the runs are uneven) equals a plain f64 triple loop:
    /// transposed and row-major a, accumulate on and off, alpha ≠ 1, a destination row stride
    /// wider than the result; and it leaves the padding columns alone.
    #[test]
    fn split_k_matches_reference() {
        let (m, n, k, ldd) = (5usize, 7usize, 1100usize, 9usize);
        let val = |i: usize, s: usize| ((i * 7919 + s * 104_729) % 1000) as f64 / 500.0 - 1.0;
        let a_rm: Vec<f64> = (0..m * k).map(|i| val(i, 1)).collect(); // [m, k]
        let a_t: Vec<f64> = (0..k * m).map(|i| a_rm[(i % m) * k + i / m]).collect(); // [k, m]
        let b: Vec<f64> = (0..k * n).map(|i| val(i, 2)).collect(); // [k, n]
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for accumulate in [false, true] {
            for (name, a) in [("row-major", Mat::rows(&a_rm, k, 0)), ("transposed", Mat::rows_t(&a_t, m, 0))] {
                let start: Vec<f64> = (0..m * ldd).map(|i| val(i, 3)).collect();
                let mut dst = start.clone();
                pool.install(|| {
                    assert!(k >= SPLIT_K_MIN && k >= 8 * m.max(n) && rayon::current_num_threads() == 3);
                    mm_par(m, n, k, &mut dst, ldd, accumulate, a, Mat::rows(&b, n, 0), 0.5)
                });
                for r in 0..m {
                    for c in 0..ldd {
                        let want = if c >= n {
                            start[r * ldd + c]
                        } else {
                            let dot: f64 = (0..k).map(|i| a_rm[r * k + i] * b[i * n + c]).sum();
                            (if accumulate { start[r * ldd + c] } else { 0.0 }) + 0.5 * dot
                        };
                        assert!((dst[r * ldd + c] - want).abs() < 1e-10, "{name} acc={accumulate} ({r},{c}): {} vs {want}", dst[r * ldd + c]);
                    }
                }
            }
        }
    }
}
