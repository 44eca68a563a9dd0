use candle_core::{DType, Device, Tensor};
use std::time::Instant;
fn main() {
    let dev = Device::Cpu;
    for n in [256usize, 1024] {
        let a = Tensor::randn(0f32, 1.0, (n, n), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (n, n), &dev).unwrap();
        let _ = a.matmul(&b).unwrap();
        let t = Instant::now();
        for _ in 0..5 { let _ = a.matmul(&b).unwrap(); }
        let s = t.elapsed().as_secs_f64() / 5.0;
        println!("sgemm {n}: {:.1} GFLOP/s", 2.0 * (n as f64).powi(3) / s / 1e9);
    }
    // Attention-like batched matmul [64, 256, 32] x [64, 32, 256]
    let q = Tensor::randn(0f32, 1.0, (64, 256, 32), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (64, 32, 256), &dev).unwrap();
    let t = Instant::now();
    for _ in 0..5 { let _ = q.matmul(&k).unwrap(); }
    let s = t.elapsed().as_secs_f64() / 5.0;
    println!("bmm qk: {:.1} ms {:.1} GFLOP/s", s * 1e3, 2.0 * 64.0 * 256.0 * 256.0 * 32.0 / s / 1e9);
    let x = Tensor::randn(0f32, 1.0, (64, 256, 256), &dev).unwrap();
    let t = Instant::now();
    for _ in 0..5 { let _ = mixscale::ops::softmax::softmax_last_dim(&x).unwrap(); }
    println!("softmax 64x256x256: {:.1} ms", t.elapsed().as_secs_f64() / 5.0 * 1e3);
    let t = Instant::now();
    for _ in 0..5 { let _ = x.exp().unwrap(); }
    println!("exp 4M: {:.1} ms", t.elapsed().as_secs_f64() / 5.0 * 1e3);
    let t = Instant::now();
    for _ in 0..5 { let _ = (&x + &x).unwrap(); }
    println!("add 4M: {:.1} ms", t.elapsed().as_secs_f64() / 5.0 * 1e3);
    let _ = DType::F32;
}
