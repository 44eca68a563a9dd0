use mixscale::config::model::FfnKind;
use mixscale::model::ffn::Ffn;
use mixscale::model::params::{ParamBuilder, ParamStore};
use mixscale::model::LanguageModel;
use mixscale::ops::{norm, rope::Rope, softmax};
use mixscale::testing::{assert_close, check_grads, rand_tensor, to_vec};
use candle_core::{DType, Device, Tensor, Var};

fn var(shape: &[usize], seed: u64) -> Var {
    Var::from_tensor(&rand_tensor(shape, 1.0, seed)).unwrap()
}

#[test]
fn rms_norm_grad() {
    let x = var(&[3, 5, 7], 1);
    let g = var(&[7], 2);
    let w = rand_tensor(&[3, 5, 7], 1.0, 3);
    let loss = || (norm::rms_norm(x.as_tensor(), g.as_tensor(), 1e-6).unwrap() * &w).unwrap().sum_all().unwrap();
    check_grads("rms_norm", &[("x".into(), x.clone()), ("gain".into(), g.clone())], &loss, 40);
}

#[test]
fn rms_norm_matches_formula() {
    let x = rand_tensor(&[2, 6], 1.0, 5);
    let g = rand_tensor(&[6], 1.0, 6);
    let y = to_vec(&norm::rms_norm(&x, &g, 1e-6).unwrap());
    let (xv, gv) = (to_vec(&x), to_vec(&g));
    for r in 0..2 {
        let row = &xv[r * 6..r * 6 + 6];
        let inv = 1.0 / (row.iter().map(|a| a * a).sum::<f64>() / 6.0 + 1e-6).sqrt();
        for i in 0..6 {
            assert!((y[r * 6 + i] - row[i] * inv * gv[i]).abs() < 1e-12);
        }
    }
}

#[test]
fn softmax_and_cross_entropy_grads() {
    let x = var(&[4, 9], 7);
    let w = rand_tensor(&[4, 9], 1.0, 8);
    let loss = || (softmax::softmax_last_dim(x.as_tensor()).unwrap() * &w).unwrap().sum_all().unwrap();
    check_grads("softmax", &[("x".into(), x.clone())], &loss, 36);
    let targets = Tensor::new(&[3u32, 0, 8, 5], &Device::Cpu).unwrap();
    let loss = || softmax::cross_entropy(x.as_tensor(), &targets).unwrap();
    check_grads("cross_entropy", &[("x".into(), x.clone())], &loss, 36);
    // Value: mean of −log softmax at the targets.
    let xv = to_vec(x.as_tensor());
    let mut want = 0.0;
    for (r, &t) in [3usize, 0, 8, 5].iter().enumerate() {
        let row = &xv[r * 9..r * 9 + 9];
        let lse = row.iter().map(|a| a.exp()).sum::<f64>().ln();
        want += lse - row[t];
    }
    let got = softmax::cross_entropy(x.as_tensor(), &targets).unwrap().to_scalar::<f64>().unwrap();
    assert!((got - want / 4.0).abs() < 1e-12);
}

#[test]
fn rope_half_split_values_and_grad() {
    let (t, h, d) = (5, 2, 6);
    let rope = Rope::new(t, d, 10000.0, DType::F64, &Device::Cpu).unwrap();
    let x = var(&[1, t, h, d], 9);
    let y = to_vec(&rope.apply(x.as_tensor()).unwrap());
    let xv = to_vec(x.as_tensor());
    for p in 0..t {
        for hh in 0..h {
            let base = (p * h + hh) * d;
            for i in 0..d / 2 {
                let phi = p as f64 * 10000f64.powf(-2.0 * i as f64 / d as f64);
                let (a, b) = (xv[base + i], xv[base + i + d / 2]);
                assert!((y[base + i] - (a * phi.cos() - b * phi.sin())).abs() < 1e-12);
                assert!((y[base + i + d / 2] - (a * phi.sin() + b * phi.cos())).abs() < 1e-12);
            }
        }
    }
    let w = rand_tensor(&[1, t, h, d], 1.0, 10);
    let loss = || (rope.apply(x.as_tensor()).unwrap() * &w).unwrap().sum_all().unwrap();
    check_grads("rope", &[("x".into(), x.clone())], &loss, 60);
}

#[test]
fn ffn_grads() {
    for kind in [FfnKind::Swiglu, FfnKind::Relu2] {
        let mut store = ParamStore::default();
        let mut pb = ParamBuilder::new(&mut store, 1, DType::F64, &Device::Cpu);
        let ffn = Ffn::new(kind, 6, 10, 0.5, 0.5, &mut pb).unwrap();
        let x = var(&[2, 3, 6], 11);
        let w = rand_tensor(&[2, 3, 6], 1.0, 12);
        let mut vars: Vec<(String, Var)> = store.params.iter().map(|(k, p)| (k.clone(), p.var.clone())).collect();
        vars.push(("x".into(), x.clone()));
        let loss = || (ffn.forward(x.as_tensor()).unwrap() * &w).unwrap().sum_all().unwrap();
        check_grads(&format!("{kind:?}"), &vars, &loss, 20);
    }
}

fn tiny_model(sets: &[&str], dtype: DType) -> LanguageModel {
    let spec = crate::util::spec_from(crate::util::TINY, sets).unwrap();
    LanguageModel::new(&spec.model, 16, 5, dtype, &Device::Cpu).unwrap()
}

fn tokens(b: usize, t: usize, v: u32, seed: u64) -> Tensor {
    let mut r = mixscale::data::rng::Rng::new(seed);
    let data: Vec<u32> = (0..b * t).map(|_| r.below(v as u64) as u32).collect();
    Tensor::from_vec(data, (b, t), &Device::Cpu).unwrap()
}

/// The whole model in f64 (large init so every path matters) against central differences,
/// for tied/untied heads, GQA + QK-norm, and both FFNs.
#[test]
fn whole_model_grads_match_finite_differences() {
    let variants: &[&[&str]] = &[
        &["model.init.std=0.4"],
        &["model.init.std=0.4", "model.tied_embeddings=false", "model.ffn.kind=relu2"],
        &["model.init.std=0.4", "model.blocks.attention.num_kv_heads=1", "model.blocks.attention.qk_norm=true"],
    ];
    for sets in variants {
        let m = tiny_model(sets, DType::F64);
        let (inp, tgt) = (tokens(2, 7, 64, 1), tokens(2, 7, 64, 2));
        let vars: Vec<(String, Var)> = m.params.params.iter().map(|(k, p)| (k.clone(), p.var.clone())).collect();
        let loss = || m.loss(&inp, &tgt).unwrap();
        check_grads(&format!("model {sets:?}"), &vars, &loss, 6);
    }
}

/// With the real init (f32), every parameter gets a non-zero gradient.
#[test]
fn every_parameter_gets_gradient() {
    let m = tiny_model(&["model.tied_embeddings=false", "model.blocks.attention.qk_norm=true"], DType::F32);
    let g = m.loss(&tokens(2, 16, 64, 3), &tokens(2, 16, 64, 4)).unwrap().backward().unwrap();
    for (name, p) in &m.params.params {
        let gr = g.get(p.var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
        let n = gr.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(n > 0.0 && n.is_finite(), "{name}: gradient norm² {n}");
    }
}

/// f32 and f64 forward agree (the training dtype computes the same function).
#[test]
fn f32_matches_f64_forward() {
    let a = tiny_model(&[], DType::F64);
    let b = tiny_model(&[], DType::F32);
    let x = tokens(2, 16, 64, 9);
    let la = a.forward(&x).unwrap();
    let lb = b.forward(&x).unwrap().to_dtype(DType::F64).unwrap();
    assert_close("f32 vs f64 logits", &la, &lb, 1e-5);
}

/// Fused CPU RMSNorm == composed reference, forward and gradients (x and gain), f64 and f32,
/// for row counts that do and do not fill the parallel chunk.
#[test]
fn fused_rms_norm_matches_composed() {
    for (shape, seed) in [(vec![3usize, 5, 7], 1u64), (vec![2, 97, 12], 2), (vec![1, 1, 130], 3)] {
        let d = *shape.last().unwrap();
        for dt in [DType::F64, DType::F32] {
            let x = Var::from_tensor(&rand_tensor(&shape, 1.0, seed).to_dtype(dt).unwrap()).unwrap();
            let g = Var::from_tensor(&rand_tensor(&[d], 1.0, seed + 10).to_dtype(dt).unwrap()).unwrap();
            let w = rand_tensor(&shape, 1.0, seed + 20).to_dtype(dt).unwrap();
            let tol = if dt == DType::F64 { 1e-12 } else { 1e-5 };
            let yf = norm::rms_norm(x.as_tensor(), g.as_tensor(), 1e-6).unwrap();
            let yc = norm::rms_norm_composed(x.as_tensor(), g.as_tensor(), 1e-6).unwrap();
            assert_close("rms_norm fwd", &yc, &yf, tol);
            let gf = (yf * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (yc * &w).unwrap().sum_all().unwrap().backward().unwrap();
            assert_close("rms_norm dx", gc.get(x.as_tensor()).unwrap(), gf.get(x.as_tensor()).unwrap(), tol * 10.0);
            assert_close("rms_norm dgain", gc.get(g.as_tensor()).unwrap(), gf.get(g.as_tensor()).unwrap(), tol * 10.0);
        }
    }
}

/// Fused CPU RoPE == composed reference (forward and gradient), also at a position offset.
#[test]
fn fused_rope_matches_composed() {
    let rope = Rope::new(40, 10, 10000.0, DType::F64, &Device::Cpu).unwrap();
    for (r, t) in [(rope.clone(), 37usize), (rope.at(5).unwrap(), 35)] {
        let x = Var::from_tensor(&rand_tensor(&[2, t, 3, 10], 1.0, 4)).unwrap();
        let w = rand_tensor(&[2, t, 3, 10], 1.0, 5);
        let yf = r.apply(x.as_tensor()).unwrap();
        let yc = r.apply_composed(x.as_tensor()).unwrap();
        assert_close("rope fwd", &yc, &yf, 1e-12);
        let gf = (yf * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (yc * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close("rope dx", gc.get(x.as_tensor()).unwrap(), gf.get(x.as_tensor()).unwrap(), 1e-12);
    }
}

/// Fused CPU cross-entropy == composed log-softmax + gather, values and logits gradient.
#[test]
fn fused_cross_entropy_matches_composed() {
    for (n, v) in [(130usize, 513usize), (1, 7), (64, 64)] {
        for dt in [DType::F64, DType::F32] {
            let x = Var::from_tensor(&rand_tensor(&[n, v], 3.0, 7).to_dtype(dt).unwrap()).unwrap();
            let mut r = mixscale::data::rng::Rng::new(1);
            let t = Tensor::from_vec((0..n).map(|_| r.below(v as u64) as u32).collect::<Vec<_>>(), n, &Device::Cpu).unwrap();
            let w = rand_tensor(&[n], 1.0, 8).to_dtype(dt).unwrap();
            let tol = if dt == DType::F64 { 1e-12 } else { 1e-5 };
            let lf = softmax::cross_entropy_each(x.as_tensor(), &t).unwrap();
            let lc = softmax::cross_entropy_each_composed(x.as_tensor(), &t).unwrap();
            assert_close("ce fwd", &lc, &lf, tol);
            let gf = (lf * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (lc * &w).unwrap().sum_all().unwrap().backward().unwrap();
            assert_close("ce dlogits", gc.get(x.as_tensor()).unwrap(), gf.get(x.as_tensor()).unwrap(), tol * 10.0);
        }
    }
    let bad = Tensor::new(&[9u32], &Device::Cpu).unwrap();
    let err = softmax::cross_entropy_each(&rand_tensor(&[1, 7], 1.0, 1), &bad).unwrap_err().to_string();
    assert!(err.contains("target 9"), "{err}");
}
