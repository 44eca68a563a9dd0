//! Vector math shared by the fused CPU kernels: a branch-free f32 `exp` the compiler vectorises,
//! lane-wise reductions (sum, max, dot, the f64 [`lanes_sum`]) and `axpy`, and [`with_fast_isa`],
//! which runs a kernel compiled for the widest x86 vector extension the CPU has (AVX-512, else
//! AVX2+FMA, else the build's baseline) without building the whole crate for a `target-cpu`
//! (binaries are copied between machines, e.g. to the GPU hosts).

/// Runs `f` compiled for AVX-512 (F+VL) or else AVX2+FMA when the CPU has them. The closure and
/// the generic kernels it calls must be `#[inline(always)]` (write `with_fast_isa(#[inline(always)]
/// || ...)`) to be compiled for the wider ISA: a closure LLVM declines to inline keeps the
/// baseline's SSE code (seen in the Mamba2 scan backward: 4-wide `mulps`, no FMA),
/// else for the build's baseline. Only the instruction set changes: every kernel is written so
/// that its results do not depend on the vector width (fixed accumulation order).
#[inline(always)]
pub fn with_fast_isa<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") && is_x86_feature_detected!("fma") {
            #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
            unsafe fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: the CPU supports AVX-512 F/VL, AVX2 and FMA (checked just above).
            return unsafe { with_avx512(f) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { with_avx2(f) };
        }
    }
    f()
}

/// Branch-free `exp` for f32 (Cephes `expf` polynomial, relative error ~1e-7) that the compiler
/// vectorises, unlike the libm call: `exp(x) = 2ⁿ·exp(r)`, `n = round(x·log₂e)`, `|r| ≤ ln2/2`.
/// Returns 0 below −87 (where the result would be subnormal) and for −∞; saturates above 88.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    exp_f32_with(x, |a, b, c| a * b + c)
}

/// [`exp_f32`] with fused multiply-adds (`f32::mul_add`, one rounding each). Only for code that
/// runs under [`with_fast_isa`]'s AVX-512/AVX2 paths, which enable FMA: there each step is one
/// `vfmadd` instead of a `vmulps` + `vaddps`, and the loop of [`exp_shifted_f32`] ran 1.6× faster
/// (rows of 128, AVX-512). Elsewhere `mul_add` may be a libm call.
#[inline(always)]
pub fn exp_f32_fma(x: f32) -> f32 {
    exp_f32_with(x, f32::mul_add)
}

#[inline(always)]
fn exp_f32_with(x: f32, fma: impl Fn(f32, f32, f32) -> f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer kept in the low mantissa bits
    let xc = x.clamp(-87.0, 88.0);
    let t = fma(xc, std::f32::consts::LOG2_E, MAGIC);
    let n = t - MAGIC;
    let r = fma(n, 2.121_944_4e-4, fma(n, -0.693_359_4, xc));
    let mut p = 1.987_569_1e-4f32;
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = fma(p, r, c);
    }
    let y = fma(p * r, r, r) + 1.0;
    let two_n = f32::from_bits(((t.to_bits() as i32 - MAGIC.to_bits() as i32 + 127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        y * two_n
    }
}

/// Independent f64 accumulators of the kernels' row reductions: the compiler keeps them in one
/// vector register, where a single running sum is a chain of dependent adds that no ISA speeds
/// up. Combined in a fixed order ([`lanes_total`]), so results do not depend on the vector width.
pub const LANES: usize = 8;

/// The fixed-order total of [`LANES`] accumulators.
#[inline(always)]
pub fn lanes_total(a: &[f64; LANES]) -> f64 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// `Σ f(x_i)` in f64 over [`LANES`] accumulators (element i into lane i mod 8; the elements past
/// the last full group are added last).
#[inline(always)]
pub fn lanes_sum<T: Copy>(x: &[T], f: impl Fn(T) -> f64) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(0f64, |s, &v| s + f(v));
    for c in chunks {
        for l in 0..LANES {
            acc[l] += f(c[l]);
        }
    }
    lanes_total(&acc) + tail
}

/// `Σ f(a_i, b_i)` in f64 over [`LANES`] accumulators, as [`lanes_sum`].
#[inline(always)]
pub fn lanes_sum_pairs<T: Copy>(a: &[T], b: &[T], f: impl Fn(T, T) -> f64) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f64; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = ca.remainder().iter().zip(cb.remainder()).fold(0f64, |s, (&x, &y)| s + f(x, y));
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += f(x[l], y[l]);
        }
    }
    lanes_total(&acc) + tail
}

/// Sum with 8 independent accumulators (vectorisable; fixed order, so deterministic).
#[inline(always)]
pub(super) fn sum<T: super::attn_fused::Elem>(x: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(T::zero(), |a, &v| a + v);
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().fold(tail, |a, &v| a + v)
}

/// Maximum of `init` and the elements, with 8 independent lanes.
#[inline(always)]
pub(super) fn max<T: super::attn_fused::Elem>(x: &[T], init: T) -> T {
    let mx = |a: T, b: T| if b > a { b } else { a };
    let mut acc = [init; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(init, |a, &v| mx(a, v));
    for c in chunks {
        for i in 0..8 {
            acc[i] = mx(acc[i], c[i]);
        }
    }
    acc.iter().fold(tail, |a, &v| mx(a, v))
}

/// `Σ a_i b_i` with 8 independent accumulators (vectorisable, fixed order).
#[inline(always)]
pub(super) fn dot<T: super::attn_fused::Elem>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = ca.remainder().iter().zip(cb.remainder()).fold(T::zero(), |s, (&x, &y)| s + x * y);
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().fold(tail, |s, &x| s + x)
}

/// `y += a·x`.
#[inline(always)]
pub(super) fn axpy<T: super::attn_fused::Elem>(y: &mut [T], a: T, x: &[T]) {
    y.iter_mut().zip(x).for_each(|(y, &x)| *y += a * x);
}

/// `x ← exp(x − shift)` with [`exp_f32`], in the widest vector ISA the CPU has.
#[inline(always)]
pub fn exp_shifted_f32(x: &mut [f32], shift: f32) {
    with_fast_isa(#[inline(always)] || x.iter_mut().for_each(|v| *v = exp_f32_fma(*v - shift)))
}

/// `σ(v) = 1/(1 + exp(−v))` with the kernels' `exp` (f32: [`exp_f32`]).
#[inline(always)]
pub(super) fn sigmoid<T: super::attn_fused::Elem>(v: T) -> T {
    T::one() / (T::one() + (T::zero() - v).exp())
}

/// `max(v, 0) + ln(1 + exp(−|v|))`, the composed softplus of the blocks (never overflows).
#[inline(always)]
pub(super) fn softplus<T: super::attn_fused::Elem>(v: T) -> T {
    let abs = if v < T::zero() { T::zero() - v } else { v };
    let relu = if v > T::zero() { v } else { T::zero() };
    relu + (T::one() + (T::zero() - abs).exp()).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorisable f32 exp against f64 exp: relative error < 4e-7 over the useful range,
    /// exactly 0 for −∞ and below −87 (masked and fully decayed scores).
    #[test]
    fn exp_f32_is_accurate() {
        // exp_f32_fma here runs outside with_fast_isa (mul_add may be a libm call): same values.
        for exp in [exp_f32 as fn(f32) -> f32, exp_f32_fma] {
            let mut worst = 0f64;
            for i in 0..=200_000 {
                let x = -87.0 + 175.0 * i as f64 / 200_000.0;
                let got = exp(x as f32) as f64;
                let want = (x as f32 as f64).exp();
                worst = worst.max((got - want).abs() / want);
            }
            assert!(worst < 4e-7, "max relative error {worst:e}");
            assert_eq!(exp(f32::NEG_INFINITY), 0.0);
            assert_eq!(exp(-1000.0), 0.0);
            assert_eq!(exp(0.0), 1.0);
            assert_eq!(exp(88.0), exp(1000.0), "saturates");
        }
        // The shifted row kernel (exp_f32_fma under the CPU's widest ISA), full vectors and a tail.
        let mut row: Vec<f32> = [0.0f32, -1.0, 2.5, f32::NEG_INFINITY, -30.0, 1.0, 0.5, -0.25, 3.0, -7.0].repeat(4);
        let want: Vec<f32> = row.iter().map(|x| (x - 1.5f32).exp()).collect();
        exp_shifted_f32(&mut row, 1.5);
        for (g, w) in row.iter().zip(&want) {
            assert!((g - w).abs() <= 4e-7 * w, "{g} vs {w}");
        }
    }

    /// The lane-wise sum covers every element (full groups and tail) for every length, and its
    /// fixed order gives the same bits under any ISA.
    #[test]
    fn lanes_sum_covers_every_element() {
        for n in 0..40usize {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let got = lanes_sum(&x, |v| v as f64 * v as f64);
            let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
            assert!((got - want).abs() <= 1e-12 * want.max(1.0), "n={n}: {got} vs {want}");
            assert_eq!(with_fast_isa(#[inline(always)] || lanes_sum(&x, |v| v as f64)).to_bits(), lanes_sum(&x, |v| v as f64).to_bits());
        }
    }

    /// The dispatcher runs the closure exactly once and returns its value on every ISA path.
    #[test]
    fn with_fast_isa_runs_once() {
        let mut n = 0;
        let v = with_fast_isa(#[inline(always)] || {
            n += 1;
            (0..100).map(|i| i as f32 * 0.5).sum::<f32>()
        });
        assert_eq!((n, v), (1, 2475.0));
    }
}
