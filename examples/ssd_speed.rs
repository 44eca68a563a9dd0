//! Timing of the fused SSD scan kernel at the Mamba2 bench size (development aid).
use candle_core::{Device, Tensor, Var};
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::time::Instant;
fn main() {
    let dev = Device::Cpu;
    let (b, t, h, p, g, n) = (16, 256, 4, 64, 1, 64);
    let x = Var::randn(0f32, 1.0, (b, t, h, p), &dev).unwrap();
    let dt = (Tensor::rand(0f32, 1.0, (b, t, h), &dev).unwrap() * 0.1).unwrap();
    let a = Tensor::new(&[-1f32, -2.0, -4.0, -8.0], &dev).unwrap();
    let bm = Tensor::randn(0f32, 1.0, (b, t, g, n), &dev).unwrap();
    let cm = Tensor::randn(0f32, 1.0, (b, t, g, n), &dev).unwrap();
    let (mut best, mut best_b) = (f64::MAX, f64::MAX);
    for _ in 0..20 {
        let t0 = Instant::now();
        let (y, _) = mixscale::ops::ssd_fused::ssd_fused(x.as_tensor(), &dt, &a, &bm, &cm, None).unwrap();
        best = best.min(t0.elapsed().as_secs_f64() * 1e3);
        let l = y.sum_all().unwrap();
        let t1 = Instant::now();
        let g = l.backward().unwrap();
        best_b = best_b.min(t1.elapsed().as_secs_f64() * 1e3);
        drop((y, g));
    }
    println!("ssd forward {best:.2} ms, backward {best_b:.2} ms (fastest of 20)");
}
