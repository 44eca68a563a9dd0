//! Packed f32 GEMM for CPUs with AVX2+FMA but no AVX-512 (AMD Zen 2/3, older Intel): every f32
//! product of [`super::gemm`] that is not a small in-kernel tile ([`super::tile_mm`]): the
//! fused sublayers' `[B·T, d] × [d, n]` projections, their `dx = dy Wᵀ` and the per-thread runs
//! of the k-split weight gradients `dW = xᵀ dy`.
//!
//! Why not the `gemm` crate: on a Zen 3 VM (2 cores, 2.9 GHz, 93 GFLOP/s of FMA per core) gemm ran
//! these shapes at 45–60% of the FMA peak on 2 threads, while a packed 6×16 micro-kernel reaches
//! 85–100% of it on L1-resident panels. The GEMMs were ~75% of the CPU samples of an
//! attention-preset training step. A/B of whole training steps (`scripts/ab-bench.sh`, medians):
//! attention 12927 → 13724 tokens/s with the projections and `dx` on this kernel, then
//! 12652 → 13410 with the weight gradients too; mtp_deepseek 8374 → 8942 for the latter.
//!
//! The scheme is the five-loop blocked algorithm of Goto & van de Geijn (2008, "Anatomy of
//! high-performance matrix multiplication") as BLIS implements it (Van Zee & van de Geijn 2015;
//! its Zen `sgemm` micro-kernel is 6×16): blocks of [`KC`] of the inner dimension and [`NC`]
//! columns of `B` are packed into `16`-column panels (`kc × 16`, contiguous, zero-padded), blocks
//! of [`MC`] rows of `A` into `6`-row panels (`kc × 6`); the micro-kernel multiplies one A panel by
//! one B panel into 12 ymm accumulators (one FMA per `p`, in order) and adds `alpha ·` the result
//! into `C` (or stores it, for the first `k` block of a non-accumulating product). Edge tiles are
//! computed in full on the zero padding and only their valid part is written, so nothing outside
//! the `m × n` block of `C` is read or written.
//!
//! Parallel form ([`try_sgemm`] with `threads > 1`): the rows (or, for short wide products, the
//! column blocks) are cut into one contiguous run per thread, each run a single-threaded product
//! with its own packing buffers; every element of `C` is computed by exactly one thread in the
//! same order, so the result does not depend on the thread count.
//!
//! `MIXSCALE_NO_SGEMM=1` sends every product back to the `gemm` crate (A/B switch).

/// Largest inner-dimension block: a `KC × 16` B panel (24 KiB) stays in L1 while the kernel
/// sweeps the A panels of a row block. `k` is cut into equal blocks of at most `KC`, so the
/// projections' `k` = 352 or 384 is one block (C is written once). 256 was up to ~10% slower on
/// those shapes in single-core runs and the same in a preset A/B.
const KC: usize = 384;
/// Rows of A packed at a time (`MC × KC` = 108 KiB, L2-resident).
const MC: usize = 72;
/// Columns of B packed at a time: up to 2048, so that the projections (n ≤ 1536) pack each A
/// block once (256, a B block that fits L2, packed A twice for n = 352..512). Streaming the B
/// panels from L3 instead costs ~4 GB/s at the kernel's rate.
const NC: usize = 2048;
/// Micro-tile: 6 rows × 16 columns (two ymm vectors).
const MR: usize = 6;
const NR: usize = 16;

/// A strided f32 operand: element (r, c) at `data[r·rs + c·cs]`.
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

/// Whether the packed kernel runs: x86_64 with AVX2 and FMA, no AVX-512 (the `gemm` crate and
/// [`super::tile_mm`]'s AVX-512 kernel keep those CPUs), `MIXSCALE_NO_SGEMM` unset.
pub fn enabled() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| std::env::var_os("MIXSCALE_NO_SGEMM").is_none() && avx2_fma() && !is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// `dst[m×n] (row stride ldd) = (accumulate ? dst : 0) + alpha · A·B` on up to `threads` rayon
/// threads. Returns `false` without touching `dst` when [`enabled`] is false. Panics unless
/// `m, n, k > 0` and every index lies inside the three slices.
#[allow(clippy::too_many_arguments)]
pub fn try_sgemm(m: usize, n: usize, k: usize, dst: &mut [f32], ldd: usize, accumulate: bool, a: Operand, b: Operand, alpha: f32, threads: usize) -> bool {
    if !enabled() {
        return false;
    }
    assert!(m > 0 && n > 0 && k > 0 && (m == 1 || n <= ldd) && (m - 1) * ldd + n <= dst.len(), "sgemm: destination too short");
    let last = |x: Operand, r: usize, c: usize| (r - 1) * x.rs + (c - 1) * x.cs;
    assert!(last(a, m, k) < a.data.len() && last(b, k, n) < b.data.len(), "sgemm: operand too short");
    let job = Job { m, n, k, c: dst.as_mut_ptr(), ldd, accumulate, a, b, alpha };
    let threads = threads.max(1);
    if threads > 1 && m >= threads * 4 * MR {
        // One contiguous run of rows (a multiple of MR, balanced) per thread.
        let per = m.div_ceil(threads).next_multiple_of(MR);
        par_runs(m.div_ceil(per), |t| {
            let (r0, r1) = (t * per, ((t + 1) * per).min(m));
            job.run(r0..r1, 0..n)
        });
    } else if threads > 1 && n >= threads * NR {
        let per = n.div_ceil(threads).next_multiple_of(NR);
        par_runs(n.div_ceil(per), |t| {
            let (c0, c1) = (t * per, ((t + 1) * per).min(n));
            job.run(0..m, c0..c1)
        });
    } else {
        job.run(0..m, 0..n);
    }
    true
}

fn par_runs(runs: usize, f: impl Fn(usize) + Sync + Send) {
    use rayon::prelude::*;
    (0..runs).into_par_iter().for_each(f);
}

/// One product; `c` points at `dst[0]` (raw, so that threads can own disjoint column runs).
struct Job<'a> {
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    ldd: usize,
    accumulate: bool,
    a: Operand<'a>,
    b: Operand<'a>,
    alpha: f32,
}

// SAFETY: the threads of `try_sgemm` write disjoint row or column runs of `c`; `a` and `b` are
// shared read-only.
unsafe impl Sync for Job<'_> {}
// SAFETY: as above.
unsafe impl Send for Job<'_> {}

thread_local! {
    /// Packing buffers of this thread (A panels, B panels), grown on demand and kept.
    static PACK: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

impl Job<'_> {
    /// `C[rows, cols]` single-threaded.
    fn run(&self, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>) {
        debug_assert!(rows.end <= self.m && cols.end <= self.n);
        PACK.with(|bufs| {
            let (ap, bp) = &mut *bufs.borrow_mut();
            ap.resize(MC.next_multiple_of(MR) * KC + PACK_SLACK, 0.0);
            bp.resize(NC.min(cols.len().next_multiple_of(NR)) * KC, 0.0);
            for jc in cols.clone().step_by(NC) {
                let nc = NC.min(cols.end - jc);
                let kb = self.k.div_ceil(self.k.div_ceil(KC));
                for pc in (0..self.k).step_by(kb) {
                    let kc = kb.min(self.k - pc);
                    pack_b(bp, self.b, pc, kc, jc, nc);
                    let beta = self.accumulate || pc > 0;
                    for ic in rows.clone().step_by(MC) {
                        let mc = MC.min(rows.end - ic);
                        pack_a(ap, self.a, ic, mc, pc, kc);
                        for jr in (0..nc).step_by(NR) {
                            let bpanel = (&bp[jr * kc..(jr + NR) * kc], NR);
                            for ir in (0..mc).step_by(MR) {
                                let apanel = &ap[ir * kc..(ir + MR) * kc];
                                // SAFETY: (ic + ir, jc + jr) lies inside the m × n block that
                                // `try_sgemm` checked against `dst`; `tile` writes at most its
                                // valid rows/columns.
                                unsafe {
                                    let c = self.c.add((ic + ir) * self.ldd + jc + jr);
                                    tile(kc, apanel, bpanel, c, self.ldd, (MR.min(mc - ir), NR.min(nc - jr)), beta, self.alpha)
                                };
                            }
                        }
                    }
                }
            }
        })
    }
}

/// B rows `pc .. pc+kc`, columns `jc .. jc+nc` into `ceil(nc/16)` panels of `kc × 16` (column
/// `jc + 16q + c` of row `pc + p` at `bp[q·16·kc + 16p + c]`), zero past column `jc + nc`.
fn pack_b(bp: &mut [f32], b: Operand, pc: usize, kc: usize, jc: usize, nc: usize) {
    let full = nc / NR;
    if b.cs == 1 && full > 0 {
        // Whole panels row by row: each source row is read once, in order (a streaming read of
        // a large B, e.g. `dy`), and scattered into the panels. Panel by panel (a strided read)
        // made the weight gradients slower than the gemm crate's.
        for p in 0..kc {
            let src = &b.data[(pc + p) * b.rs + jc..][..full * NR];
            for (q, chunk) in src.chunks_exact(NR).enumerate() {
                bp[q * NR * kc + p * NR..][..NR].copy_from_slice(chunk);
            }
        }
    }
    for (q, panel) in bp.chunks_mut(NR * kc).take(nc.div_ceil(NR)).enumerate() {
        let j0 = jc + q * NR;
        let w = NR.min(jc + nc - j0);
        if b.cs == 1 && w == NR {
            // packed above
        } else if b.cs == 1 {
            for (p, row) in panel.chunks_exact_mut(NR).enumerate() {
                row[..w].copy_from_slice(&b.data[(pc + p) * b.rs + j0..][..w]);
                row[w..].fill(0.0);
            }
        } else {
            if w < NR {
                panel.fill(0.0);
            }
            for c in 0..w {
                let col = (j0 + c) * b.cs;
                for p in 0..kc {
                    panel[p * NR + c] = b.data[col + (pc + p) * b.rs];
                }
            }
        }
    }
}

/// A rows `ic .. ic+mc`, columns `pc .. pc+kc` into `ceil(mc/6)` panels of `kc × 6` (row
/// `ic + 6q + r`, column `pc + p` at `ap[q·6·kc + 6p + r]`), zero past row `ic + mc`. `ap` has
/// [`PACK_SLACK`] floats past the last panel: the row-major form stores whole vectors.
fn pack_a(ap: &mut [f32], a: Operand, ic: usize, mc: usize, pc: usize, kc: usize) {
    let panels = mc.div_ceil(MR);
    assert!(ap.len() >= panels * MR * kc + PACK_SLACK);
    let full = mc / MR;
    if a.rs == 1 && full > 0 {
        // Whole panels column by column: each source column (a contiguous run of A's transpose)
        // is read once, in order, and scattered into the panels.
        for p in 0..kc {
            let src = &a.data[ic + (pc + p) * a.cs..][..full * MR];
            for (q, chunk) in src.chunks_exact(MR).enumerate() {
                ap[q * MR * kc + p * MR..][..MR].copy_from_slice(chunk);
            }
        }
    }
    for q in 0..panels {
        let i0 = ic + q * MR;
        let h = MR.min(ic + mc - i0);
        let at = q * MR * kc;
        if a.rs == 1 && h == MR {
            // packed above
        } else if a.cs == 1 {
            let rows: [&[f32]; MR] = std::array::from_fn(|r| if r < h { &a.data[(i0 + r) * a.rs + pc..][..kc] } else { &[][..] });
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 (`enabled`); rows `r < h` hold `kc` floats; the panel plus the slack
            // (asserted above) is writable.
            unsafe {
                x86_avx2::pack_rows(&rows, h, kc, ap[at..].as_mut_ptr(), a.data.as_ptr().wrapping_add((i0 + MR) * a.rs + pc), a.rs)
            };
            #[cfg(not(target_arch = "x86_64"))]
            {
                let panel = &mut ap[at..at + MR * kc];
                for p in 0..kc {
                    for r in 0..MR {
                        panel[p * MR + r] = if r < h { rows[r][p] } else { 0.0 };
                    }
                }
            }
        } else {
            let panel = &mut ap[at..at + MR * kc];
            if h < MR {
                panel.fill(0.0);
            }
            for r in 0..h {
                let row = &a.data[(i0 + r) * a.rs + pc * a.cs..];
                for p in 0..kc {
                    panel[p * MR + r] = row[p * a.cs];
                }
            }
        }
    }
}

/// Floats past the packed A panels that [`pack_a`]'s vector stores may write.
const PACK_SLACK: usize = 8;

/// `C[rows×cols] = (beta ? C : 0) + alpha · Apanel·Bpanel` for one micro-tile (`rows ≤ 6`,
/// `cols ≤ 16`).
///
/// # Safety
/// `enabled()` is true; `c` row `r < rows`, column `j < cols` at `c + r·ldc + j` is writable.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn tile(kc: usize, ap: &[f32], (bp, ldb): (&[f32], usize), c: *mut f32, ldc: usize, (rows, cols): (usize, usize), beta: bool, alpha: f32) {
    assert!(ap.len() >= MR * kc && bp.len() >= (kc - 1) * ldb + NR);
    #[cfg(target_arch = "x86_64")]
    {
        if rows == MR && cols == NR {
            x86_avx2::kernel(kc, ap.as_ptr(), bp.as_ptr(), ldb, c, ldc, beta, alpha);
        } else {
            let mut tmp = [0f32; MR * NR];
            x86_avx2::kernel(kc, ap.as_ptr(), bp.as_ptr(), ldb, tmp.as_mut_ptr(), NR, false, 1.0);
            for r in 0..rows {
                for j in 0..cols {
                    let d = c.add(r * ldc + j);
                    *d = if beta { *d + alpha * tmp[r * NR + j] } else { alpha * tmp[r * NR + j] };
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kc, ap, bp, ldb, c, ldc, rows, cols, beta, alpha);
        unreachable!("sgemm runs only on x86_64");
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_avx2 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// Rows `r < h` of `rows` (`kc` floats each) into one A panel at `out`: `out[6p + r] =
    /// rows[r][p]`, zero for `r ≥ h`. Eight columns at a time as an 8×8 register transpose whose
    /// 8-float stores overlap (each store's last two lanes are overwritten by the next), so up to
    /// 2 floats past the panel are written. The next panel's rows (`next + r·rs`, only
    /// prefetched, never read: the address may lie outside A) are fetched a line at a time: the
    /// rows come from L3 or memory, and the loads' misses were most of this function's time
    /// (its share of a 4096×128·384 product fell from 3.6% to 2.3%).
    ///
    /// # Safety
    /// AVX2; `out[0 .. 6·kc + 2]` writable.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn pack_rows(rows: &[&[f32]; MR], h: usize, kc: usize, out: *mut f32, next: *const f32, rs: usize) {
        let zero = _mm256_setzero_ps();
        let mut p = 0;
        while p + 8 <= kc {
            if p % 16 == 0 {
                for r in 0..MR {
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(r * rs + p).cast());
                }
            }
            let v: [__m256; 8] = std::array::from_fn(|r| if r < h { _mm256_loadu_ps(rows[r].as_ptr().add(p)) } else { zero });
            let t = crate::ops::zmm_row::x86_avx2::transpose8(v);
            for (j, tj) in t.into_iter().enumerate() {
                _mm256_storeu_ps(out.add((p + j) * MR), tj);
            }
            p += 8;
        }
        for p in p..kc {
            for r in 0..MR {
                *out.add(p * MR + r) = if r < h { rows[r][p] } else { 0.0 };
            }
        }
    }

    /// The 6×16 micro-kernel over packed panels: `C = (beta ? C : 0) + alpha · Σ_p a_p ⊗ b_p`.
    ///
    /// # Safety
    /// AVX2+FMA; `a` holds `6·kc` floats, `b[p·ldb .. p·ldb + 16]` is readable for `p < kc`; the
    /// 6×16 block at `c` (row stride `ldc`) is writable.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, ldb: usize, c: *mut f32, ldc: usize, beta: bool, alpha: f32) {
        // The C tile is touched once, after the whole k loop: fetch its lines now (both lines
        // of each row, as the row need not be line-aligned) so the final loads and stores do not
        // wait for memory.
        for r in 0..MR {
            _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc).cast());
            _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc + NR - 1).cast());
        }
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        let (mut a, mut b) = (a, b);
        for _ in 0..kc {
            let b0 = _mm256_loadu_ps(b);
            let b1 = _mm256_loadu_ps(b.add(8));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*a.add(r));
                acc_r[0] = _mm256_fmadd_ps(x, b0, acc_r[0]);
                acc_r[1] = _mm256_fmadd_ps(x, b1, acc_r[1]);
            }
            a = a.add(MR);
            b = b.add(ldb);
        }
        let alpha = _mm256_set1_ps(alpha);
        for (r, acc_r) in acc.iter().enumerate() {
            for (v, &acc_v) in acc_r.iter().enumerate() {
                let cv = c.add(r * ldc + 8 * v);
                let out = if beta { _mm256_fmadd_ps(acc_v, alpha, _mm256_loadu_ps(cv)) } else { _mm256_mul_ps(acc_v, alpha) };
                _mm256_storeu_ps(cv, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_product, rand_vec};

    fn rv(n: usize, seed: u64) -> Vec<f32> {
        rand_vec(n, seed).into_iter().map(|x| x as f32).collect()
    }

    /// Every edge of the blocking (rows around MR/MC, columns around NR/NC, k around KC), all four
    /// layouts of A and B (row-major, transposed), accumulate on/off, alpha ≠ 1, a padded
    /// destination, 1–3 threads (row and column splits): against an f64 product; the padding
    /// columns must stay untouched.
    #[test]
    fn matches_f64_product() {
        if !enabled() {
            eprintln!("sgemm not enabled on this CPU (needs AVX2+FMA without AVX-512): not exercised");
            return;
        }
        let shapes = [(1, 1, 1), (5, 17, 3), (7, 33, 385), (13, 16, 384), (73, 15, 40), (150, 270, 800), (6, 512, 31), (30, 300, 7), (8, 2100, 5)];
        let pools: Vec<_> = (1..=3).map(|t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap()).collect();
        for (si, &(m, n, k)) in shapes.iter().enumerate() {
            for ta in [false, true] {
                for tb in [false, true] {
                    let a = rv(m * k, 10 + si as u64);
                    let b = rv(k * n, 20 + si as u64);
                    let (ars, acs) = if ta { (1, m) } else { (k, 1) };
                    let (brs, bcs) = if tb { (1, k) } else { (n, 1) };
                    let ldd = n + 3;
                    for (acc, alpha) in [(false, 1.0f32), (true, 0.75)] {
                        let init = rv(m * ldd, 30);
                        for (t, pool) in pools.iter().enumerate() {
                            let mut d = init.clone();
                            let ran = pool.install(|| {
                                try_sgemm(m, n, k, &mut d, ldd, acc, Operand { data: &a, rs: ars, cs: acs }, Operand { data: &b, rs: brs, cs: bcs }, alpha, t + 1)
                            });
                            assert!(ran);
                            let ctx = format!("m{m} n{n} k{k} ta{ta} tb{tb} acc{acc} threads {}", t + 1);
                            let tol = 2e-6 * (1.0 + (k as f64).sqrt());
                            assert_product(&ctx, &d, &init, (m, n, k, ldd), (&a, ars, acs), (&b, brs, bcs), acc, alpha as f64, tol);
                        }
                    }
                }
            }
        }
    }

    /// The thread count does not change a single bit of the result.
    #[test]
    fn thread_count_does_not_change_bits() {
        if !enabled() {
            return;
        }
        let (m, n, k) = (100, 70, 600);
        let a = rv(m * k, 1);
        let b = rv(k * n, 2);
        let run = |t: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
            let mut d = vec![0f32; m * n];
            pool.install(|| try_sgemm(m, n, k, &mut d, n, false, Operand { data: &a, rs: k, cs: 1 }, Operand { data: &b, rs: n, cs: 1 }, 1.0, t));
            d
        };
        let one = run(1);
        for t in [2, 3, 4] {
            assert!(run(t).iter().zip(&one).all(|(x, y)| x.to_bits() == y.to_bits()), "{t} threads differ from 1");
        }
    }
}
