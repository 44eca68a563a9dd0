//! Test helpers shared by unit and integration tests: seeded random tensors, a relative
//! closeness assertion, and finite-difference gradient checks in f64.

use crate::blocks::{ForwardCtx, Mixer};
use crate::data::rng::Rng;
use crate::model::params::ParamStore;
use candle_core::{DType, Device, Tensor, Var};

/// f64 tensor with N(0, std²) entries from `seed`.
pub fn rand_tensor(shape: &[usize], std: f64, seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut r = Rng::new(seed);
    Tensor::from_vec((0..n).map(|_| r.normal() * std).collect::<Vec<f64>>(), shape, &Device::Cpu).unwrap()
}

/// `n` values N(0, 1) from `seed` (the values of [`rand_tensor`]).
pub fn rand_vec(n: usize, seed: u64) -> Vec<f64> {
    rand_tensor(&[n], 1.0, seed).to_vec1().unwrap()
}

/// Asserts `|got_i − want_i| ≤ tol·(1 + |want_i|)` element by element: an f32 kernel against its
/// f64 reference.
pub fn assert_close_f32(name: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: lengths differ");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g as f64 - w).abs() <= tol * (1.0 + w.abs()), "{name}[{i}]: {g} vs {w}");
    }
}

/// Asserts that `got` (`m` rows of stride `ldd`) is `(accumulate ? init : 0) + alpha · A·B` for
/// the strided operands `A[i,p] = a.0[i·a.1 + p·a.2]`, `B[p,j] = b.0[p·b.1 + j·b.2]`, within
/// `tol · (1 + |want|)` against the product in f64, and that columns `n .. ldd` still hold
/// `init`'s bits: an f32 matrix-product kernel against its reference.
#[allow(clippy::too_many_arguments)]
pub fn assert_product(ctx: &str, got: &[f32], init: &[f32], (m, n, k, ldd): (usize, usize, usize, usize), a: (&[f32], usize, usize), b: (&[f32], usize, usize), accumulate: bool, alpha: f64, tol: f64) {
    for i in 0..m {
        for j in 0..ldd {
            let idx = i * ldd + j;
            if j >= n {
                assert_eq!(got[idx].to_bits(), init[idx].to_bits(), "{ctx}: padding written at ({i},{j})");
                continue;
            }
            let s: f64 = (0..k).map(|p| a.0[i * a.1 + p * a.2] as f64 * b.0[p * b.1 + j * b.2] as f64).sum();
            let want = if accumulate { init[idx] as f64 } else { 0.0 } + alpha * s;
            assert!((got[idx] as f64 - want).abs() < tol * (1.0 + want.abs()), "{ctx} ({i},{j}): {} vs {want}", got[idx]);
        }
    }
}

/// Flattened values as f64.
pub fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Asserts `max|a − b| ≤ tol · max(max|a|, 1e-30)` and equal shapes; prints the ratio.
pub fn assert_close(name: &str, reference: &Tensor, other: &Tensor, tol: f64) {
    assert_eq!(reference.dims(), other.dims(), "{name}: shapes differ");
    let a = to_vec(reference);
    let b = to_vec(other);
    let scale = a.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    let diff = a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    let ratio = diff / scale;
    eprintln!("{name}: max|diff|/max|ref| = {ratio:.3e}");
    assert!(ratio <= tol && ratio.is_finite(), "{name}: max|diff|/max|ref| = {ratio:e} > {tol:e}");
}

/// Central-difference check of d loss / d var for up to `samples` entries of each var.
/// `loss` must recompute the scalar loss from the current var values (f64).
/// Passes when |numeric − analytic| ≤ 1e-5·max(|numeric|, |analytic|) + 1e-9 for every probed
/// entry (f64 central differences with h = 1e-5 are accurate to ~1e-10 here; the absolute floor
/// is far below the gradients of the test shapes, so a missing term cannot hide under it).
pub fn check_grads(name: &str, vars: &[(String, Var)], loss: &dyn Fn() -> Tensor, samples: usize) {
    let l = loss();
    let grads = l.backward().unwrap();
    let h = 1e-5;
    let mut rng = Rng::new(0xfd);
    for (vname, var) in vars {
        let n = var.elem_count();
        let analytic: Vec<f64> = match grads.get(var.as_tensor()) {
            Some(g) => to_vec(g),
            None => panic!("{name}: `{vname}` received no gradient"),
        };
        let base = to_vec(var.as_tensor());
        let shape = var.dims().to_vec();
        let idx: Vec<usize> = if n <= samples { (0..n).collect() } else { (0..samples).map(|_| rng.below(n as u64) as usize).collect() };
        for i in idx {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap()).unwrap();
                loss().to_scalar::<f64>().unwrap()
            };
            let num = (eval(h) - eval(-h)) / (2.0 * h);
            var.set(&Tensor::from_vec(base.clone(), shape.as_slice(), &Device::Cpu).unwrap()).unwrap();
            let ana = analytic[i];
            assert!(
                (num - ana).abs() <= 1e-5 * num.abs().max(ana.abs()) + 1e-9,
                "{name}: d/d {vname}[{i}]: finite difference {num:e} vs autograd {ana:e}"
            );
        }
    }
}

/// Finite-difference check of a mixer (built in f64) w.r.t. its input and all its parameters,
/// with loss `sum(y · w)` for a fixed random `w`.
pub fn check_block_grads(block: &dyn Mixer, store: &ParamStore, x_shape: &[usize]) {
    let x = Var::from_tensor(&rand_tensor(x_shape, 1.0, 11)).unwrap();
    let w = rand_tensor(x_shape, 1.0, 12);
    let mut vars: Vec<(String, Var)> = store.params.iter().map(|(k, p)| (k.clone(), p.var.clone())).collect();
    vars.push(("input".into(), x.clone()));
    let loss = || (block.forward(x.as_tensor(), &mut ForwardCtx::default()).unwrap() * &w).unwrap().sum_all().unwrap();
    check_grads("block", &vars, &loss, 12);
}

/// Checks a block's fused pre-norm sublayer ([`Mixer::forward_residual`], which must take these
/// inputs) against the composed `x + block(RMSNorm(x; g))` (norm from candle primitives): the
/// outputs and the gradients of x, g and every parameter agree to `tol` (relative, in the
/// parameters' dtype, with the loss `sum(y · w)` for a fixed random `w`); in f64 it also checks
/// the fused form's gradients by finite differences.
pub fn check_sublayer(block: &dyn Mixer, store: &ParamStore, x_shape: &[usize], tol: f64) {
    let dt = store.params.values().next().expect("a parameter").var.dtype();
    let d = *x_shape.last().unwrap();
    let x = Var::from_tensor(&rand_tensor(x_shape, 1.0, 11).to_dtype(dt).unwrap()).unwrap();
    let g = Var::from_tensor(&(rand_tensor(&[d], 0.3, 13) + 1.0).unwrap().to_dtype(dt).unwrap()).unwrap();
    let w = rand_tensor(x_shape, 1.0, 12).to_dtype(dt).unwrap();
    let eps = 1e-6;
    let fused = || block.forward_residual(x.as_tensor(), g.as_tensor(), eps, &mut ForwardCtx::default()).expect("the block has a fused sublayer for these inputs").unwrap();
    let composed = || {
        let n = crate::ops::norm::rms_norm_composed(x.as_tensor(), g.as_tensor(), eps).unwrap();
        (x.as_tensor() + block.forward(&n, &mut ForwardCtx::default()).unwrap()).unwrap()
    };
    let mut vars: Vec<(String, Var)> = store.params.iter().map(|(k, p)| (k.clone(), p.var.clone())).collect();
    vars.push(("input".into(), x.clone()));
    vars.push(("norm gain".into(), g.clone()));
    let (yf, yc) = (fused(), composed());
    assert_close("sublayer forward", &yc, &yf, tol);
    let gf = (&yf * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gc = (&yc * &w).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in &vars {
        let (a, b) = (gc.get(v.as_tensor()), gf.get(v.as_tensor()));
        let (a, b) = (a.unwrap_or_else(|| panic!("composed: no gradient for {name}")), b.unwrap_or_else(|| panic!("fused: no gradient for {name}")));
        assert_close(&format!("sublayer d/d {name}"), a, b, tol);
    }
    if dt == DType::F64 {
        let loss = || (fused() * &w).unwrap().sum_all().unwrap();
        check_grads("fused sublayer", &vars, &loss, 12);
    }
}

/// Best (minimum) milliseconds of `reps` runs of `f` after one warm-up run, the least disturbed by
/// other load on the machine: the timer of the development examples (`examples/*_speed.rs`).
pub fn best_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t0 = std::time::Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

/// A preset's f32 model on the CPU (seed 0) and its first training batch of `train.batch_size`
/// sequences: the set-up of the development examples (`examples/graph_nodes.rs`, `prof.rs`,
/// `alloc_hist.rs`). Panics with the error on a bad preset (development aid).
pub fn preset_model_and_batch(path: &str) -> (crate::model::LanguageModel, crate::data::Batch) {
    let doc = crate::config::YamlDoc::load(std::path::Path::new(path)).unwrap_or_else(|e| panic!("{e}"));
    let mut spec = crate::config::RunSpec::from_doc(&doc).unwrap_or_else(|e| panic!("{e}"));
    crate::blocks::resolve_blocks(&doc, &mut spec.model).unwrap_or_else(|e| panic!("{e}"));
    let (t, b) = (spec.train.seq_len, spec.train.batch_size);
    let model = crate::model::LanguageModel::new(&spec.model, t, 0, DType::F32, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
    let data = crate::data::DataSource::new(&spec.data, 0, t).unwrap_or_else(|e| panic!("{e}"));
    let batch = data.train_batch(0, b, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
    (model, batch)
}
