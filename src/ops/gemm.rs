//! Strided matrix products on the `gemm` crate (the library candle's CPU matmul uses), for the
//! fused CPU kernels: [`mm`] single-threaded inside a kernel's own rayon tasks, [`mm_par`] on
//! the rayon pool for whole-batch products.

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

/// `dst[m×n] (row stride ldd) = (accumulate ? dst : 0) + alpha · a[m×k] · b[k×n]`, single-threaded.
#[allow(clippy::too_many_arguments)]
pub(super) fn mm<T: WithDType>(m: usize, n: usize, k: usize, dst: &mut [T], ldd: usize, accumulate: bool, a: Mat<T>, b: Mat<T>, alpha: T) {
    if T::DTYPE == candle_core::DType::F32 && b.cs == 1 && m > 0 && n > 0 && k > 0 {
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
    let par = if threads > 1 && m * n * k >= 1 << 16 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    product(m, n, k, dst, ldd, accumulate, a, b, alpha, par)
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
