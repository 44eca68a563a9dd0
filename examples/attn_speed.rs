//! Times composed vs fused causal attention (forward, and forward + backward of sum(o·w)),
//! f32 on the CPU, at the attention preset's per-layer shape (B=16, T=256, Hq=4, D=32) and at T=1024.
//!     cargo run --release --example attn_speed [-- --fused-only] [--t256 (the preset's shape only, 200 runs: for perf)]
use candle_core::{Device, Result, Tensor, Var};
use mixscale::ops::attn::attn_composed;
use mixscale::ops::attn_fused::attn_fused;
use mixscale::testing::best_ms;

type AttnFn = fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let only_fused = std::env::args().any(|a| a == "--fused-only");
    let short = std::env::args().any(|a| a == "--t256");
    let shapes = if short { vec![(16, 256, 4, 32, 200)] } else { vec![(16, 256, 4, 32, 20), (16, 1024, 4, 32, 6)] };
    for (b, t, h, d, reps) in shapes {
        let x = || Tensor::randn(0f32, 1.0, (b, t, h, d), &dev);
        let (q, k, v) = (Var::from_tensor(&x()?)?, Var::from_tensor(&x()?)?, Var::from_tensor(&x()?)?);
        let w = x()?;
        println!("B={b} T={t} Hq=Hkv={h} D={d} f32 (best of {reps}):");
        for (name, f) in [("composed", attn_composed as AttnFn), ("fused", attn_fused as AttnFn)] {
            if only_fused && name == "composed" {
                continue;
            }
            let fwd = best_ms(reps, || {
                f(q.as_tensor(), k.as_tensor(), v.as_tensor()).unwrap();
            });
            let fwd_bwd = best_ms(reps, || {
                let o = f(q.as_tensor(), k.as_tensor(), v.as_tensor()).unwrap();
                (o * &w).unwrap().sum_all().unwrap().backward().unwrap();
            });
            println!("  {name:>8}: forward {fwd:8.2} ms   forward+backward {fwd_bwd:8.2} ms");
        }
    }
    Ok(())
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
