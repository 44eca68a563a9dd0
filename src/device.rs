//! Device selection: `cpu`, `cuda` or `cuda:N`.

use crate::error::{Error, Result};
use candle_core::Device;

/// Parses a device name; CUDA devices need a binary built with `--features cuda`.
pub fn parse(name: &str) -> Result<Device> {
    let name = name.trim();
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match name.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| Error::Input(format!("device `{name}`: expected cpu, cuda or cuda:N")))?,
        None => return Err(Error::Input(format!("device `{name}`: expected cpu, cuda or cuda:N"))),
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::Input(format!(
            "device `{name}`: this mixscale binary was built without CUDA (build with scripts/build-cuda.sh or --features cuda)"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| Error::Input(format!("device `{name}`: {e}")))
}

/// A short description for logs.
pub fn describe(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}
