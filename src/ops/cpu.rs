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
