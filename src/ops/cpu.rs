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
