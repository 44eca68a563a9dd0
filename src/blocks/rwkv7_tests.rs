use super::*;
use crate::model::params::ParamStore;
use crate::testing::{assert_close, check_block_grads, check_grads, rand_tensor, to_vec};
use candle_core::{Device, Var};

fn cfg(chunk_size: usize) -> Rwkv7Config {
    Rwkv7Config {
        head_size: 4,
        decay_low_rank_dim: Some(3),
        a_low_rank_dim: Some(2),
        v_low_rank_dim: Some(2),
        gate_low_rank_dim: Some(3),
        chunk_size,
        ..Default::default()
    }
}

fn build(cfg: &Rwkv7Config, c: usize, layer: usize, n_layers: usize, store: &mut ParamStore, dtype: DType) -> Rwkv7 {
    let dims = BlockDims { d_model: c, max_seq_len: 64, n_layers, layer_idx: layer, init_std: 0.02, out_std: 0.02 };
    let mut pb = ParamBuilder::new(store, 7, dtype, &Device::Cpu);
    let mut lb = pb.pp(format!("layers.{layer}"));
    Rwkv7::new(cfg, &dims, &mut lb).unwrap()
}

/// Moves every parameter off its init by N(0, 0.3²): W_o and the LoRA down-projections start
/// at zero, which would zero every upstream gradient and hide missing terms.
fn perturb(store: &ParamStore, seed: u64) {
    for (i, p) in store.params.values().enumerate() {
        let t = p.var.as_tensor();
        let noise = rand_tensor(t.dims(), 0.3, seed + i as u64).to_dtype(t.dtype()).unwrap();
        p.var.set(&(t + noise).unwrap()).unwrap();
    }
}

/// Layer 0 then layer 1 (value residual) on the same input: chunked forward, the one-token step
/// loop, and two carried segments all agree (f64), T = 11 crossing chunks of 4 with padding;
/// through the fused kernel and the composed chunked form.
#[test]
fn parallel_matches_step_and_segments() {
    for fused_kernel in [true, false] {
        parallel_matches_step_and_segments_with(Rwkv7Config { fused_kernel, ..cfg(4) });
    }
}

fn parallel_matches_step_and_segments_with(c: Rwkv7Config) {
    let mut store = ParamStore::default();
    let l0 = build(&c, 8, 0, 2, &mut store, DType::F64);
    let l1 = build(&c, 8, 1, 2, &mut store, DType::F64);
    perturb(&store, 40);
    let x = rand_tensor(&[2, 11, 8], 1.0, 3);
    let mut ctx = ForwardCtx::default();
    let y0 = l0.forward(&x, &mut ctx).unwrap();
    let y1 = l1.forward(&x, &mut ctx).unwrap();
    let (mut s0, mut s1) = (Rwkv7State::default(), Rwkv7State::default());
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..11 {
        let xt = x.narrow(1, i, 1).unwrap().squeeze(1).unwrap();
        let mut c = ForwardCtx::default();
        a.push(l0.step(&xt, &mut c, &mut s0).unwrap());
        b.push(l1.step(&xt, &mut c, &mut s1).unwrap());
    }
    assert_close("layer0 parallel vs step", &y0, &Tensor::stack(&a, 1).unwrap(), 1e-10);
    assert_close("layer1 parallel vs step", &y1, &Tensor::stack(&b, 1).unwrap(), 1e-10);
    let (mut s0, mut s1) = (Rwkv7State::default(), Rwkv7State::default());
    let mut seg = |from: usize, len: usize| {
        let xs = x.narrow(1, from, len).unwrap();
        let mut c = ForwardCtx::default();
        let p = l0.forward_with_state(&xs, &mut c, &mut s0, false).unwrap();
        let q = l1.forward_with_state(&xs, &mut c, &mut s1, false).unwrap();
        (p, q)
    };
    let (p1, q1) = seg(0, 6);
    let (p2, q2) = seg(6, 5);
    assert_close("layer0 segments", &y0, &Tensor::cat(&[p1, p2], 1).unwrap(), 1e-10);
    assert_close("layer1 segments", &y1, &Tensor::cat(&[q1, q2], 1).unwrap(), 1e-10);
}

/// Finite-difference check of layer 0 (w.r.t. input and every parameter) and of layer 1 with
/// v_first as an extra input (so the value-residual LoRA and v0 are checked too).
#[test]
fn gradients_match_finite_differences() {
    let mut store = ParamStore::default();
    let l0 = build(&cfg(2), 8, 0, 3, &mut store, DType::F64);
    perturb(&store, 50);
    check_block_grads(&l0, &store, &[2, 5, 8]);

    // Layer 0 through the composed chunked form (the default above is the fused kernel).
    let mut store = ParamStore::default();
    let l0 = build(&Rwkv7Config { fused_kernel: false, ..cfg(2) }, 8, 0, 3, &mut store, DType::F64);
    perturb(&store, 55);
    check_block_grads(&l0, &store, &[2, 5, 8]);

    let mut store = ParamStore::default();
    let l1 = build(&cfg(3), 8, 1, 3, &mut store, DType::F64);
    perturb(&store, 60);
    let x = Var::from_tensor(&rand_tensor(&[2, 5, 8], 1.0, 11)).unwrap();
    let vf = Var::from_tensor(&rand_tensor(&[2, 5, 8], 1.0, 12)).unwrap();
    let w = rand_tensor(&[2, 5, 8], 1.0, 13);
    let mut vars: Vec<(String, Var)> = store.params.iter().map(|(k, p)| (k.clone(), p.var.clone())).collect();
    vars.push(("input".into(), x.clone()));
    vars.push(("v_first".into(), vf.clone()));
    let loss = || {
        let mut ctx = ForwardCtx::default();
        ctx.v_first = Some(vf.as_tensor().clone());
        (l1.forward(x.as_tensor(), &mut ctx).unwrap() * &w).unwrap().sum_all().unwrap()
    };
    check_grads("rwkv7 layer 1", &vars, &loss, 12);
}

/// Every parameter receives a non-zero finite gradient (off the zero init, f32); only W_r, W_k,
/// W_v, W_o are weight-decayed; layer 0 has no value-residual parameters.
#[test]
fn every_parameter_gets_a_gradient() {
    let mut store = ParamStore::default();
    let l0 = build(&cfg(4), 8, 0, 2, &mut store, DType::F32);
    let l1 = build(&cfg(4), 8, 1, 2, &mut store, DType::F32);
    perturb(&store, 70);
    assert_eq!(store.params.len(), 23 + 26);
    assert!(!store.params.contains_key("layers.0.v1") && store.params.contains_key("layers.1.v1"));
    let x = rand_tensor(&[2, 9, 8], 1.0, 5).to_dtype(DType::F32).unwrap();
    let w = rand_tensor(&[2, 9, 8], 1.0, 6).to_dtype(DType::F32).unwrap();
    let mut ctx = ForwardCtx::default();
    let h = (&x + l0.forward(&x, &mut ctx).unwrap()).unwrap();
    let y = l1.forward(&h, &mut ctx).unwrap();
    assert_eq!(y.dtype(), DType::F32);
    let grads = (y * w).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, p) in &store.params {
        let g = grads.get(p.var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
        let m = g.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(m > 0.0 && m.is_finite(), "{name}: max|grad| = {m}");
        let short = name.rsplit('.').next().unwrap();
        assert_eq!(p.decay, ["wr", "wk", "wv", "wo"].contains(&short), "{name}: decay flag");
    }
}

/// The reference init: LoRA ranks, μ, w0/a0/v0/k_k formulas, ranges, orthogonal LoRA-ups, zero
/// W_o, ln_x gain by depth; the decay at init lies in (e^{−e^{−½}}, 1).
#[test]
fn init_follows_the_reference() {
    assert_eq!(Rwkv7Config::default().lora_dims(768), (64, 64, 32, 128));
    assert_eq!(Rwkv7Config::default().lora_dims(128), (32, 32, 32, 64));
    assert!(Rwkv7Config::default().check(128).is_ok());
    assert_eq!(Rwkv7Config::default().check(100).unwrap_err().0, "head_size");
    assert_eq!(Rwkv7Config { gate_low_rank_dim: Some(0), ..Default::default() }.check(128).unwrap_err().0, "gate_low_rank_dim");

    let mut store = ParamStore::default();
    let (c, layer, nl) = (16usize, 1usize, 4usize);
    let l = build(&Rwkv7Config { head_size: 8, ..cfg(4) }, c, layer, nl, &mut store, DType::F64);
    let r1 = 1.0 - layer as f64 / nl as f64;
    let r0 = layer as f64 / (nl as f64 - 1.0);
    let mu_w = to_vec(&l.mu[1]);
    for (i, m) in mu_w.iter().enumerate() {
        assert!((m - (1.0 - (i as f64 / c as f64).powf(0.9 * r1))).abs() < 1e-12);
    }
    // Channel 9 of head size 8: zigzag z = (1 − 3.5)/3.5, zz = z|z|; linear = 9/15 − 0.5.
    let z = (1.0 - 3.5) / 3.5;
    let (zz, lin) = (z * f64::abs(z), 9.0 / 15.0 - 0.5);
    let w0 = -6.0 + 6.0 * (9.0f64 / 15.0).powf(1.0 + r0.powf(0.3)) + 0.5 + 2.5 * zz;
    assert!((to_vec(&l.w0)[9] - w0).abs() < 1e-12);
    assert!((to_vec(&l.a0)[9] - (-0.19 + 0.3 * zz + 0.4 * lin)).abs() < 1e-12);
    assert!((to_vec(&l.v_res.as_ref().unwrap().0)[9] - (0.73 - 0.4 * lin)).abs() < 1e-12);
    assert!((to_vec(&l.k_k)[9] - (0.71 - 0.1 * lin)).abs() < 1e-12);
    assert!(to_vec(&l.wo).iter().all(|&x| x == 0.0));
    assert!(to_vec(&l.w_lora.w1).iter().all(|&x| x == 0.0));
    let bound = 0.05 / (c as f64).sqrt();
    let wk = to_vec(&l.wk);
    assert!(wk.iter().all(|x| x.abs() <= bound) && wk.iter().any(|x| x.abs() > 0.5 * bound));
    assert!(to_vec(&l.ln_w).iter().all(|&x| (x - (2.0f64 / 4.0).powf(0.7)).abs() < 1e-12));
    // LoRA-up [D, C] with D < C: orthonormal rows × 0.1.
    let w2 = &l.w_lora.w2;
    let gram = w2.matmul(&w2.t().unwrap()).unwrap();
    let d = w2.dim(0).unwrap();
    assert_close("w2 w2ᵀ", &(Tensor::eye(d, DType::F64, &Device::Cpu).unwrap() * 0.01).unwrap(), &gram, 1e-12);
    // Decay at init: w = exp(−e^{−½} σ(w0)) ∈ (0.545, 1).
    let lo = (-(-0.5f64).exp()).exp();
    for w0 in to_vec(&l.w0) {
        let w = (-(-0.5f64).exp() / (1.0 + (-w0).exp())).exp();
        assert!(w > lo && w < 1.0, "decay {w}");
    }
    // torch-style gain for tall matrices: √(rows/cols) × scale, orthonormal columns.
    let mut rng = crate::data::rng::Rng::new(1);
    let tall = Tensor::from_vec(orthogonal(&mut rng, 6, 3, 0.1), (6, 3), &Device::Cpu).unwrap();
    let g = tall.t().unwrap().matmul(&tall).unwrap();
    assert_close("tall ortho", &(Tensor::eye(3, DType::F64, &Device::Cpu).unwrap() * 0.02).unwrap(), &g, 1e-12);
}
