//! Times the FoX and MoBA core ops against causal attention, f32 on the CPU, forward + backward
//! of sum(o·w): FoX fused vs composed vs the attention kernel at the preset's per-layer shape
//! (B=16, T=256, H=4, D=32); MoBA fused (selected blocks only) vs its masked composed form vs
//! full fused attention at long T (block 64, top-3), where MoBA's work is O(T·top_k·block).
//!     cargo run --release --example foxmoba_speed
use candle_core::{Device, Result, Tensor, Var};
use mixscale::ops::attn_fused::{attn_fused, fox_fused};
use mixscale::ops::fox::{fox_composed, log_sigmoid};
use mixscale::ops::moba::moba_composed;
use mixscale::ops::moba_fused::moba_fused;
use mixscale::testing::best_ms;

/// Forward + backward of sum(o·w) through `f`.
fn fwd_bwd(xs: &[Var], w: &Tensor, f: &dyn Fn(&[Tensor]) -> Result<Tensor>) -> Result<()> {
    let ts: Vec<Tensor> = xs.iter().map(|v| v.as_tensor().clone()).collect();
    let _ = (f(&ts)? * w)?.sum_all()?.backward()?;
    Ok(())
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let (b, t, h, d) = (16, 256, 4, 32);
    let r = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev);
    let xs: Vec<Var> = [r(&[b, t, h, d])?, r(&[b, t, h, d])?, r(&[b, t, h, d])?, log_sigmoid(&(r(&[b, t, h])? + 2.0)?)?]
        .iter()
        .map(Var::from_tensor)
        .collect::<Result<_>>()?;
    let w = r(&[b, t, h, d])?;
    println!("B={b} T={t} H={h} D={d}, forward+backward, best of 10 (ms):");
    println!("  attn_fused   {:8.2}", best_ms(10, || fwd_bwd(&xs, &w, &|x| attn_fused(&x[0], &x[1], &x[2])).unwrap()));
    println!("  fox_fused    {:8.2}", best_ms(10, || fwd_bwd(&xs, &w, &|x| fox_fused(&x[0], &x[1], &x[2], &x[3])).unwrap()));
    println!("  fox_composed {:8.2}", best_ms(10, || fwd_bwd(&xs, &w, &|x| fox_composed(&x[0], &x[1], &x[2], &x[3])).unwrap()));
    for t in [1024, 4096] {
        let (b, h, bs, k) = (1, 4, 64, 3);
        let xs: Vec<Var> = (0..3).map(|_| r(&[b, t, h, d]).and_then(|x| Var::from_tensor(&x))).collect::<Result<_>>()?;
        let w = r(&[b, t, h, d])?;
        println!("B={b} T={t} H={h} D={d}, MoBA block {bs} top-{k}, forward+backward, best of 3 (ms):");
        println!("  attn_fused    {:8.2}", best_ms(3, || fwd_bwd(&xs, &w, &|x| attn_fused(&x[0], &x[1], &x[2])).unwrap()));
        println!("  moba_fused    {:8.2}", best_ms(3, || fwd_bwd(&xs, &w, &|x| moba_fused(&x[0], &x[1], &x[2], bs, k)).unwrap()));
        println!("  moba_composed {:8.2}", best_ms(3, || fwd_bwd(&xs, &w, &|x| moba_composed(&x[0], &x[1], &x[2], bs, k)).unwrap()));
    }
    Ok(())
}
