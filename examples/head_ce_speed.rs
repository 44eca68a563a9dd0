//! Times the output head + cross-entropy, forward and backward of the mean loss, as two nodes
//! (`linear` on `Eᵀ` + `cross_entropy_each`: `ops::head_ce::head_ce_composed`) and as the fused
//! `ops::head_ce::head_ce`, alternating, on one thread at a shard's shape (2048 rows, d 128,
//! V 512; the attention preset's tied head):
//!     cargo run --release --example head_ce_speed
use candle_core::{Device, Tensor, Var};
use mixscale::ops::head_ce::{head_ce, head_ce_composed};
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    mixscale::ops::cpu::set_allocator_defaults();
    mixscale::ops::cpu::set_threading_defaults();
    rayon::ThreadPoolBuilder::new().num_threads(1).build_global().unwrap();
    let (n, d, v) = (2048, 128, 512);
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (8, n / 8, d), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.02, (v, d), &dev).unwrap()).unwrap();
    let t = Tensor::from_vec((0..n).map(|i| ((i * 7919) % v) as u32).collect::<Vec<_>>(), n, &dev).unwrap();
    let fwd_only = std::env::args().any(|a| a == "--fwd");
    let run = |fused: bool| {
        let t0 = Instant::now();
        let ce = if fused { head_ce(x.as_tensor(), w.as_tensor(), &t) } else { head_ce_composed(x.as_tensor(), w.as_tensor(), &t) }.unwrap();
        if !fwd_only {
            let g = ce.mean_all().unwrap().backward().unwrap();
            drop(g);
        }
        t0.elapsed().as_secs_f64() * 1e3
    };
    let mut ms = [Vec::new(), Vec::new()];
    for rep in 0..60 {
        for (i, fused) in [false, true].into_iter().enumerate() {
            let m = run(fused);
            if rep >= 5 {
                ms[i].push(m);
            }
        }
    }
    for (i, name) in ["linear + cross_entropy", "head_ce (fused)"].iter().enumerate() {
        ms[i].sort_by(f64::total_cmp);
        println!("{name:24} {}: median {:.2} ms, best {:.2} ms", if fwd_only { "fwd" } else { "fwd+bwd" }, ms[i][ms[i].len() / 2], ms[i][0]);
    }
}
