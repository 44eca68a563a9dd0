//! The fused in-place AdamW against the composed form: bit-identical parameters and state.

use super::*;
use crate::model::params::ParamBuilder;
use crate::testing::rand_tensor;
use candle_core::{DType, Device};

/// A store with a decayed matrix larger than one parallel chunk and a non-decayed vector.
fn store(dt: DType) -> ParamStore {
    let mut store = ParamStore::default();
    let mut pb = ParamBuilder::new(&mut store, 3, dt, &Device::Cpu);
    pb.normal("w", &[130, 257], 0.5).unwrap();
    pb.constant("g", &[257], 1.0).unwrap();
    store
}

fn grads(store: &ParamStore, step: u64, dt: DType) -> BTreeMap<String, Tensor> {
    store.params.iter().enumerate().map(|(i, (k, p))| (k.clone(), rand_tensor(p.var.dims(), 0.1, 100 * step + i as u64).to_dtype(dt).unwrap())).collect()
}

fn bits(t: &Tensor) -> Vec<u64> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t.to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits() as u64).collect(),
        _ => t.to_vec1::<f64>().unwrap().iter().map(|x| x.to_bits()).collect(),
    }
}

/// Three steps (with and without clipping, decayed and non-decayed parameters, f32 and f64):
/// the fused step and the composed step on pre-clipped gradients give the same bits.
#[test]
fn fused_step_equals_composed_bitwise() {
    for dt in [DType::F32, DType::F64] {
        let spec = AdamWSpec { lr: 0.01, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let (fused_store, composed_store) = (store(dt), store(dt));
        let mut fused = AdamW::new(&spec, &fused_store).unwrap();
        let mut composed = AdamW::new(&spec, &composed_store).unwrap();
        for step in 0..3u64 {
            let g = grads(&fused_store, step, dt);
            let clip = (step == 1).then_some(0.37);
            let lr = 0.01 / (step + 1) as f64;
            fused.step_clipped(&fused_store, &g, lr, clip).unwrap();
            let mut gc = g.clone();
            if let Some(c) = clip {
                gc.values_mut().for_each(|x| *x = (&*x * c).unwrap());
            }
            composed.step_composed(&composed_store, &gc, lr).unwrap();
        }
        for (k, p) in &fused_store.params {
            assert_eq!(bits(p.var.as_tensor()), bits(composed_store.params[k].var.as_tensor()), "{dt:?} parameter {k}");
            assert_ne!(bits(p.var.as_tensor()), bits(&store(dt).params[k].var.as_tensor().clone()), "{k} was updated");
        }
        let (sf, sc) = (fused.state_tensors(), composed.state_tensors());
        for (k, t) in &sf {
            assert_eq!(bits(t), bits(&sc[k]), "{dt:?} state {k}");
        }
        assert!(fused.state_is_detached());
    }
}

/// A parameter without a gradient is left alone (no decay), as in the composed form.
#[test]
fn missing_gradient_leaves_parameter() {
    let s = store(DType::F32);
    let before = bits(s.params["g"].var.as_tensor());
    let mut opt = AdamW::new(&AdamWSpec { lr: 0.1, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.5 }, &s).unwrap();
    let mut g = grads(&s, 0, DType::F32);
    g.remove("g");
    opt.step(&s, &g, 0.1).unwrap();
    assert_eq!(before, bits(s.params["g"].var.as_tensor()));
}

/// The fused squared norm equals the composed f64 one (to f64 rounding).
#[test]
fn sum_squares_matches_composed() {
    for dt in [DType::F32, DType::F64] {
        let g = rand_tensor(&[70, 513], 1.0, 9).to_dtype(dt).unwrap();
        let want = g.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let got = fused::sum_squares(&g).unwrap().unwrap();
        assert!((got - want).abs() <= 1e-12 * want, "{dt:?}: {got} vs {want}");
    }
    assert!(fused::sum_squares(&Tensor::new(&[1u32], &Device::Cpu).unwrap()).unwrap().is_none());
}

/// `clip_coef` is PyTorch's `clip_grad_norm_` coefficient.
#[test]
fn clip_coefficient() {
    assert_eq!(clip_coef(0.5, 1.0), None);
    assert_eq!(clip_coef(3.0, 0.0), None);
    assert!((clip_coef(4.0, 1.0).unwrap() - 1.0 / (4.0 + 1e-6)).abs() < 1e-15);
}
