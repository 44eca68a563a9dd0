//! Times the fused RMSNorm op (forward, and the backward of sum(y·w)) at the quickstart
//! presets' activation shape [16·256, 128] and at d = 512, f32 on the CPU (dev aid):
//!     cargo run --release --example norm_speed
use candle_core::{Device, Result, Tensor, Var};
use mixscale::ops::norm::rms_norm;
use mixscale::testing::best_ms;

fn main() -> Result<()> {
    let dev = Device::Cpu;
    for d in [128usize, 512] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4096, d), &dev)?)?;
        let g = Var::from_tensor(&Tensor::randn(1f32, 0.1, d, &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (4096, d), &dev)?;
        let fwd = best_ms(50, || {
            rms_norm(x.as_tensor(), g.as_tensor(), 1e-6).unwrap();
        });
        let y = rms_norm(x.as_tensor(), g.as_tensor(), 1e-6)?;
        let loss = (y * &w)?.sum_all()?;
        let fwd_bwd = best_ms(50, || {
            loss.backward().unwrap();
        });
        println!("rms_norm [4096, {d}] f32: forward {fwd:.3} ms, backward of sum(y*w) {fwd_bwd:.3} ms");
    }
    Ok(())
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
