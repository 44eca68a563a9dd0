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
            *g = parts.into_iter().map(T::to_cpu_storage_owned).collect();
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
