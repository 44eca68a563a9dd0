//! Rough per-phase timing of one training step of a preset (development aid).
use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() {
    let path = std::env::args().nth(1).unwrap_or("architectures/attention.yaml".into());
    let (m, batch) = mixscale::testing::preset_model_and_batch(&path);
    let dev = Device::Cpu;
    let (b, t) = batch.inputs.dims2().unwrap();
    for _ in 0..3 {
        let t0 = Instant::now();
        let h = m.hidden(&batch.inputs).unwrap();
        let t1 = Instant::now();
        let loss = m.loss(&batch.inputs, &batch.targets).unwrap();
        let t2 = Instant::now();
        let g = loss.backward().unwrap();
        let t3 = Instant::now();
        let _ = (h, g);
        println!("hidden fwd {:.0} ms | full fwd+loss {:.0} ms | backward {:.0} ms", (t1 - t0).as_secs_f64() * 1e3, (t2 - t1).as_secs_f64() * 1e3, (t3 - t2).as_secs_f64() * 1e3);
    }
    let x = Tensor::randn(0f32, 1.0, (b, t, 4, 32), &dev).unwrap();
    let t0 = Instant::now();
    for _ in 0..4 { let _ = mixscale::ops::attn::attn(&x, &x, &x).unwrap(); }
    println!("attn op fwd x4 layers: {:.0} ms", t0.elapsed().as_secs_f64() * 1e3);
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
