//! Small helpers for CPU CustomOps: typed contiguous slices and deterministic parallel loops.

use candle_core::{CpuStorage, Layout, Result, WithDType};

/// The contiguous slice of `s` described by `l` (errors on strided layouts).
pub fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("custom op needs contiguous input".into()))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

/// Rows per parallel task. Work is split in fixed-size chunks and partial results are combined
/// in chunk order, so results do not depend on the number of threads (bit-exact determinism).
pub const ROW_CHUNK: usize = 64;

/// `Σ_rows f(row)` for vectors of `len`: `f` adds one row's terms into its accumulator; rows run
/// in fixed chunks of [`ROW_CHUNK`] on the rayon pool and the partials are added in chunk order
/// (the result does not depend on the thread count).
pub fn row_sums<T: WithDType>(rows: usize, len: usize, f: impl Fn(usize, &mut [T]) + Sync) -> Vec<T> {
    use rayon::prelude::*;
    let parts: Vec<Vec<T>> = (0..rows.div_ceil(ROW_CHUNK))
        .into_par_iter()
        .map(|k| {
            let mut acc = vec![T::zero(); len];
            for r in k * ROW_CHUNK..((k + 1) * ROW_CHUNK).min(rows) {
                f(r, &mut acc);
            }
            acc
        })
        .collect();
    let mut sum = vec![T::zero(); len];
    for p in &parts {
        sum.iter_mut().zip(p).for_each(|(s, &v)| *s += v);
    }
    sum
}

/// Process-wide CPU threading defaults, called by the CLI before the first tensor op: candle's
/// element-wise ops run on the calling thread (`CANDLE_NUM_THREADS=1`) unless the user set
/// `CANDLE_NUM_THREADS`. Matrix products (gemm) and mixscale's fused ops still use the rayon
/// pool (`RAYON_NUM_THREADS`, `--threads`).
///
/// Why: candle 0.11 runs element-wise ops over 64 Ki elements on its own "barrier pool", a second
/// set of N−1 threads beside rayon's N, whose workers busy-wait ~25 000 spins after each op and
/// whose caller busy-waits until every worker has finished. Between two ops those spinning
/// threads compete with gemm's rayon threads for the same cores, and on a shared machine a
/// descheduled worker leaves the caller spinning for a whole time slice. Measured with
/// `scripts/profile-step.sh` on the attention preset (2 threads, contended machine): 35% of
/// the CPU samples were in the pool's spin loops, and disabling the pool cut the CPU time of
/// the benchmark by about a third and the step time by 1.6–2.8x.
pub fn set_threading_defaults() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Recycled buffers of the fused CPU kernels ([`take`] / [`give`]).
///
/// Why: a kernel's scratch and output buffers used to be `vec![0; n]`, and mimalloc zero-fills
/// every such allocation (it reuses freed memory, so fresh-page zeroes cannot be assumed): an
/// attention-preset step zero-filled 445 MB and a Mamba2 step 990 MB (`examples/alloc_hist.rs`),
/// 7–8% of their CPU samples in `memset`. The same shapes come back every step, so buffers a
/// kernel is done with are kept here and handed out again without the fill.
struct Pool {
    /// (length, bytes, `Vec<T>`) with T f32 or f64, oldest first.
    bufs: Vec<(usize, usize, Box<dyn std::any::Any + Send>)>,
    bytes: usize,
}

static POOL: std::sync::Mutex<Pool> = std::sync::Mutex::new(Pool { bufs: Vec::new(), bytes: 0 });

/// The pool holds at most this many bytes (the oldest buffers are freed first).
const POOL_BYTES: usize = 256 << 20;
/// Smaller buffers are not pooled (zero-filling them costs less than the bookkeeping).
const POOL_MIN_BYTES: usize = 64 << 10;

/// False when `MIXSCALE_NO_POOL` is set (every [`take`] is then a zero-filled allocation: for
/// A/B timings, or to rule the pool out when chasing a wrong value).
fn pool_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("MIXSCALE_NO_POOL").is_none())
}

/// A buffer of `n` values **whose contents are unspecified**: a recycled one of exactly that
/// length when the pool has one (values left from its earlier use), else a fresh allocation left
/// unfilled (zeros with `MIXSCALE_NO_POOL`). Only for buffers
/// the caller writes entirely before it reads them (a product with `accumulate = false`, a
/// row-wise kernel that assigns every element, a copy); accumulators need `vec![0; n]`.
pub fn take<T: WithDType>(n: usize) -> Vec<T> {
    if !pool_on() {
        return vec![T::zero(); n];
    }
    if n * std::mem::size_of::<T>() >= POOL_MIN_BYTES {
        if let Ok(mut p) = POOL.lock() {
            if let Some(i) = p.bufs.iter().position(|(len, _, b)| *len == n && b.is::<Vec<T>>()) {
                let (_, bytes, b) = p.bufs.remove(i);
                p.bytes -= bytes;
                if let Ok(v) = b.downcast::<Vec<T>>() {
                    return *v;
                }
            }
        }
    }
    uninit(n)
}

/// `n` values as the allocator hands them out, without the zero fill: what candle's own
/// `CpuDevice::alloc_uninit` does for op outputs. Why: most buffers a kernel takes are outputs that
/// leave as tensors and are freed by candle, so the pool misses on them every step, and their
/// zero fill was 1.7% of an attention-preset step and 1.3% of an MoE step (`perf --call-graph
/// dwarf`: `memset` under `take`). T is one of candle's plain numeric types (every bit pattern is a
/// value), and [`take`]'s callers assign every element before they read it.
#[allow(clippy::uninit_vec)] // the point of the function; see above
fn uninit<T: WithDType>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: `n` elements of capacity were just reserved; see above for why they may keep
    // whatever bytes the allocator returns.
    unsafe { v.set_len(n) };
    v
}

/// A copy of `x` in a [`take`]n buffer (`x.to_vec()` without the zero fill).
pub fn copy_of<T: WithDType>(x: &[T]) -> Vec<T> {
    let mut v = take(x.len());
    v.copy_from_slice(x);
    v
}

/// Returns a buffer to the pool for a later [`take`] of the same length and type.
pub fn give<T: WithDType>(v: Vec<T>) {
    let bytes = v.len() * std::mem::size_of::<T>();
    if !(POOL_MIN_BYTES..=POOL_BYTES / 4).contains(&bytes) || !pool_on() {
        return;
    }
    if let Ok(mut p) = POOL.lock() {
        p.bytes += bytes;
        p.bufs.push((v.len(), bytes, Box::new(v)));
        while p.bytes > POOL_BYTES {
            let (_, b, _) = p.bufs.remove(0);
            p.bytes -= b;
        }
    }
}

/// [`give`] for a stashed storage (f32/f64; other dtypes are just freed).
fn give_storage(s: CpuStorage) {
    match s {
        CpuStorage::F32(v) => give(v),
        CpuStorage::F64(v) => give(v),
        _ => {}
    }
}

/// A buffer a fused op keeps from its forward for its backward, outside its output tensor: the
/// state checkpoints of the scan kernels (`ssd_fused`, `gdr_fused`, `rwkv7_fused`), the gate and
/// up projections of the fused feed-forward (`ffn_fused`).
///
/// Why not in the output: an op returns one tensor, so the checkpoints used to travel as the tail
/// of a packed output of which callers narrow the exposed part. In candle 0.11 the backward of
/// that narrow builds a zero-padded gradient of the whole packed buffer and adds it into another
/// zero-filled one: for Mamba2 at the bench size, 3–4 passes over 4.2 M checkpoint values per
/// layer, all zeros. The stash lives as long as the op's graph node (like the output did) and
/// is only read, so backpropagating the same output several times stays correct.
#[derive(Default)]
pub struct Stash(std::sync::Mutex<Vec<CpuStorage>>);

impl Stash {
    /// Keeps `out[keep..]` in the stash and returns `out[..keep]` as storage.
    pub fn keep_tail<T: WithDType>(&self, mut out: Vec<T>, keep: usize) -> CpuStorage {
        let tail = out.split_off(keep.min(out.len()));
        self.put(tail);
        T::to_cpu_storage_owned(out)
    }

    /// Keeps `values` in the stash (replacing what it held).
    pub fn put<T: WithDType>(&self, values: Vec<T>) {
        self.put_parts(vec![values]);
    }

    /// Keeps several buffers (replacing what it held), without copying them into one.
    pub fn put_parts<T: WithDType>(&self, parts: Vec<Vec<T>>) {
        if let Ok(mut g) = self.0.lock() {
            let old = std::mem::replace(&mut *g, parts.into_iter().map(T::to_cpu_storage_owned).collect());
            old.into_iter().for_each(give_storage);
        }
    }

    /// Runs `f` on the stashed values (the first buffer; errors when the forward has not run or
    /// the dtype differs).
    pub fn with<T: WithDType, R>(&self, f: impl FnOnce(&[T]) -> R) -> Result<R> {
        self.with_parts(|p: &[&[T]]| f(p[0]))
    }

    /// Runs `f` on every stashed buffer, in the order they were put.
    pub fn with_parts<T: WithDType, R>(&self, f: impl FnOnce(&[&[T]]) -> R) -> Result<R> {
        let g = self.0.lock().map_err(|_| candle_core::Error::Msg("stash: poisoned lock".into()))?;
        if g.is_empty() {
            candle_core::bail!("stash: backward before forward");
        }
        let parts = g.iter().map(|s| T::cpu_storage_as_slice(s)).collect::<Result<Vec<_>>>()?;
        Ok(f(&parts))
    }
}

/// The stashed buffers go back to the pool when the op (its graph node) is dropped.
impl Drop for Stash {
    fn drop(&mut self) {
        if let Ok(g) = self.0.get_mut() {
            std::mem::take(g).into_iter().for_each(give_storage);
        }
    }
}

/// mimalloc's option index of `mi_option_purge_delay` (v3 `mimalloc.h`, enum `mi_option_e`;
/// libmimalloc-sys exports no constant for it). The unit test checks that the index reads
/// `MIMALLOC_PURGE_DELAY`.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Process-wide allocator default, called by the CLI before the first tensor op: mimalloc never
/// returns freed memory to the OS (`purge_delay = -1`) unless the user set `MIMALLOC_PURGE_DELAY`.
///
/// Why: a training step frees and re-allocates the same few hundred MiB of activations and
/// gradients every step. With mimalloc's default (purge pages 1 s after they are freed, 10 s in arenas) those
/// pages go back to the kernel between ops and come back as fresh zeroed pages: `clear_page_erms`
/// in the kernel was 6.6% of the CPU samples of an attention-preset step
/// (`scripts/profile-step.sh`). Keeping them costs nothing beyond the step's peak memory,
/// which the process reaches anyway.
pub fn set_allocator_defaults() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mi_option_set only stores the value in mimalloc's option table.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer given back is handed out again for the same length and type only; small ones are
    /// not pooled; a stash's buffers return when it is dropped. (Other tests run in parallel and
    /// share the pool, so this test uses lengths no kernel uses.)
    #[test]
    fn pool_recycles_by_length_and_type() {
        let pooled = |n: usize, f32: bool| POOL.lock().unwrap().bufs.iter().any(|(len, _, b)| *len == n && b.is::<Vec<f32>>() == f32);
        let n = (POOL_MIN_BYTES / 4) + 12_345;
        let mut v: Vec<f32> = take(n);
        assert_eq!(v.len(), n);
        v.iter_mut().for_each(|x| *x = 7.0);
        let ptr = v.as_ptr();
        give(v);
        assert!(pooled(n, true));
        let w: Vec<f64> = take(n);
        assert!(w.len() == n && w.as_ptr() as usize != ptr as usize, "another type does not get the f32 buffer");
        let again: Vec<f32> = take(n + 1);
        assert!(again.len() == n + 1 && again.as_ptr() != ptr, "another length does not get it");
        assert!(pooled(n, true), "the f32 buffer of length n is still there");
        let back: Vec<f32> = take(n);
        assert_eq!(back.as_ptr(), ptr, "the same length and type gets the recycled buffer");
        assert!(back.iter().all(|x| *x == 7.0), "its contents are left as they were");
        give(vec![1f32; 16]);
        assert!(!pooled(16, true), "small buffers are not pooled");
        let m = n + 777;
        let stash = Stash::default();
        stash.put(vec![3f32; m]);
        drop(stash);
        assert!(take::<f32>(m).iter().all(|x| *x == 3.0), "a dropped stash returns its buffers");
    }

    /// The hard-coded option index is `purge_delay`. mimalloc reads every option's environment
    /// variable (`MIMALLOC_<NAME>`) when the process starts, so this test runs
    /// [`purge_delay_child`] in a child process with `MIMALLOC_PURGE_DELAY=1234` and checks what
    /// it read through the index.
    #[test]
    fn purge_delay_option_index() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "ops::cpu::tests::purge_delay_child", "--nocapture", "--test-threads", "1"])
            .env("MIMALLOC_PURGE_DELAY", "1234")
            .env("MIXSCALE_PURGE_CHILD", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("purge_delay=1234 set=-1"), "child printed: {text}");
    }

    /// The child half of [`purge_delay_option_index`] (does nothing in a normal test run).
    #[test]
    fn purge_delay_child() {
        if std::env::var_os("MIXSCALE_PURGE_CHILD").is_none() {
            return;
        }
        // SAFETY: option get/set only touch mimalloc's option table.
        let (read, set) = unsafe {
            let read = libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY);
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
            (read, libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY))
        };
        println!("purge_delay={read} set={set}");
    }
}
