//! Times the gated delta rule op (chunked vs token loop) and the whole Gated DeltaNet layer,
//! forward and forward + backward, f32 on the CPU, at the GDN preset's per-layer shape
//! (B=16, H=4, K=24, V=48, d=128) for T = 64 and 256.
//!     cargo run --release --example gdn_speed
use candle_core::{DType, Device, Result, Tensor, Var};
use mixscale::blocks::gated_deltanet::{GatedDeltaNet, GatedDeltaNetConfig};
use mixscale::blocks::{BlockDims, ForwardCtx, Mixer};
use mixscale::model::params::{ParamBuilder, ParamStore};
use mixscale::ops::gated_delta_rule::{gdr_chunked, gdr_recurrent};
use mixscale::testing::best_ms;

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let (b, h, dk, dv, d) = (16, 4, 24, 48, 128);
    for (t, reps) in [(64, 5), (256, 3)] {
        let var = |s: &[usize]| Var::from_tensor(&Tensor::randn(0f32, 1.0, s, &dev).unwrap()).unwrap();
        let (q, k, v) = (var(&[b, t, h, dk]), var(&[b, t, h, dk]), var(&[b, t, h, dv]));
        let kn = k.as_tensor().broadcast_div(&k.as_tensor().sqr()?.sum_keepdim(3)?.sqrt()?)?;
        let g = (Tensor::rand(0f32, 1.0, (b, t, h), &dev)? * -0.5)?;
        let beta = Tensor::rand(0f32, 1.0, (b, t, h), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (b, t, h, dv), &dev)?;
        let run = |chunked: bool, bwd: bool| {
            let o = if chunked { gdr_chunked(q.as_tensor(), &kn, v.as_tensor(), &g, &beta, None, 64) } else { gdr_recurrent(q.as_tensor(), &kn, v.as_tensor(), &g, &beta, None) };
            let l = (o.unwrap().0 * &w).unwrap().sum_all().unwrap();
            if bwd {
                l.backward().unwrap();
            }
        };
        for (name, chunked) in [("chunked", true), ("recurrent", false)] {
            println!("op {name:9} T={t:4}: fwd {:8.2} ms  fwd+bwd {:8.2} ms", best_ms(reps, || run(chunked, false)), best_ms(reps, || run(chunked, true)));
        }
        let mut store = ParamStore::default();
        let dims = BlockDims { d_model: d, max_seq_len: t, n_layers: 4, layer_idx: 0, init_std: 0.02, out_std: 0.01 };
        let layer = GatedDeltaNet::new(&GatedDeltaNetConfig::default(), &dims, &mut ParamBuilder::new(&mut store, 0, DType::F32, &dev))?;
        let x = Tensor::randn(0f32, 1.0, (b, t, d), &dev)?;
        let wy = Tensor::randn(0f32, 1.0, (b, t, d), &dev)?;
        let run = |bwd: bool| {
            let y = layer.forward(&x, &mut ForwardCtx::default()).unwrap();
            let l = (y * &wy).unwrap().sum_all().unwrap();
            if bwd {
                l.backward().unwrap();
            }
        };
        println!("layer             T={t:4}: fwd {:8.2} ms  fwd+bwd {:8.2} ms", best_ms(reps, || run(false)), best_ms(reps, || run(true)));
    }
    Ok(())
}
