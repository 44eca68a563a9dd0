use crate::util::{mixscale, tempdir};
use candle_core::{DType, Device, Tensor, Var};
use mixscale::ops::attn::{attn, attn_composed, attn_reference};
use mixscale::ops::attn_fused::attn_fused;
use mixscale::testing::{assert_close, check_grads, rand_tensor, to_vec};
use std::collections::HashMap;

/// Parallel attn == f64 token-by-token reference, awkward shapes, GQA groups.
#[test]
fn attn_matches_reference_b2_t37_h6_kv2_d10() {
    for (b, t, hq, hkv, d) in [(2, 37, 6, 2, 10), (1, 1, 3, 3, 4), (1, 65, 4, 1, 8)] {
        let q = rand_tensor(&[b, t, hq, d], 1.0, 1);
        let k = rand_tensor(&[b, t, hkv, d], 1.0, 2);
        let v = rand_tensor(&[b, t, hkv, d], 1.0, 3);
        let o = attn(&q, &k, &v).unwrap();
        let want = attn_reference(&to_vec(&q), &to_vec(&k), &to_vec(&v), b, t, hq, hkv, d);
        let want = Tensor::from_vec(want, (b, t, hq, d), &Device::Cpu).unwrap();
        assert_close(&format!("attn b{b}_t{t}_h{hq}_kv{hkv}_d{d}"), &want, &o, 1e-12);
        // f32 path within f32 tolerance.
        let o32 = attn(&q.to_dtype(DType::F32).unwrap(), &k.to_dtype(DType::F32).unwrap(), &v.to_dtype(DType::F32).unwrap()).unwrap();
        assert_close("attn f32", &want, &o32, 1e-5);
    }
}

/// (B, T, Hq, Hkv, D): GQA groups, T = 1, T crossing the 64-row block size once and several times.
const FUSED_SHAPES: [(usize, usize, usize, usize, usize); 5] = [(2, 37, 6, 2, 10), (1, 1, 3, 3, 4), (1, 65, 4, 1, 8), (2, 130, 2, 2, 16), (1, 300, 4, 2, 32)];

fn qkv(b: usize, t: usize, hq: usize, hkv: usize, d: usize, seed: u64) -> (Tensor, Tensor, Tensor) {
    (rand_tensor(&[b, t, hq, d], 1.0, seed), rand_tensor(&[b, t, hkv, d], 1.0, seed + 1), rand_tensor(&[b, t, hkv, d], 1.0, seed + 2))
}

fn f32s(x: &Tensor) -> Tensor {
    x.to_dtype(DType::F32).unwrap()
}

/// Fused == composed == f64 reference, in f64 (1e-12) and f32 (1e-5).
#[test]
fn attn_fused_matches_composed_and_reference() {
    for (b, t, hq, hkv, d) in FUSED_SHAPES {
        let name = format!("b{b}_t{t}_h{hq}_kv{hkv}_d{d}");
        let (q, k, v) = qkv(b, t, hq, hkv, d, 10);
        let want = Tensor::from_vec(attn_reference(&to_vec(&q), &to_vec(&k), &to_vec(&v), b, t, hq, hkv, d), (b, t, hq, d), &Device::Cpu).unwrap();
        let fused = attn_fused(&q, &k, &v).unwrap();
        assert_eq!(fused.dtype(), DType::F64);
        assert_close(&format!("fused f64 {name}"), &want, &fused, 1e-12);
        assert_close(&format!("composed f64 {name}"), &want, &attn_composed(&q, &k, &v).unwrap(), 1e-12);
        let (q32, k32, v32) = (f32s(&q), f32s(&k), f32s(&v));
        let fused32 = attn_fused(&q32, &k32, &v32).unwrap();
        assert_eq!(fused32.dtype(), DType::F32);
        assert_close(&format!("fused f32 {name}"), &want, &fused32, 1e-5);
        assert_close(&format!("composed f32 {name}"), &want, &attn_composed(&q32, &k32, &v32).unwrap(), 1e-5);
    }
}

/// Gradients of sum(o·w) w.r.t. (q, k, v) for an attention function.
fn attn_grads(f: fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>, q: &Tensor, k: &Tensor, v: &Tensor, w: &Tensor) -> Vec<Tensor> {
    let vars: Vec<Var> = [q, k, v].iter().map(|x| Var::from_tensor(x).unwrap()).collect();
    let o = f(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor()).unwrap();
    let g = (o * w).unwrap().sum_all().unwrap().backward().unwrap();
    vars.iter().map(|x| g.get(x.as_tensor()).expect("missing gradient").clone()).collect()
}

/// [`assert_close`], except that an exactly zero reference (dq, dk at T = 1: softmax over one
/// key has zero gradient) needs `max|other| ≤ tol` in absolute terms, as rounding is not exact zero.
fn assert_close_or_zero(name: &str, reference: &Tensor, other: &Tensor, tol: f64) {
    if to_vec(reference).iter().all(|x| *x == 0.0) {
        let worst = to_vec(other).iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!(worst <= tol, "{name}: reference is zero, max|other| = {worst:e} > {tol:e}");
    } else {
        assert_close(name, reference, other, tol);
    }
}

/// Fused backward == composed autograd: f64 to 1e-10, f32 to 1e-4.
#[test]
fn attn_fused_grads_match_composed() {
    for (b, t, hq, hkv, d) in FUSED_SHAPES {
        let (q, k, v) = qkv(b, t, hq, hkv, d, 20);
        let w = rand_tensor(&[b, t, hq, d], 1.0, 23);
        let want = attn_grads(attn_composed, &q, &k, &v, &w);
        let got = attn_grads(attn_fused, &q, &k, &v, &w);
        let got32 = attn_grads(attn_fused, &f32s(&q), &f32s(&k), &f32s(&v), &f32s(&w));
        for (i, x) in ["dq", "dk", "dv"].iter().enumerate() {
            let name = format!("{x} b{b}_t{t}_h{hq}_kv{hkv}_d{d}");
            assert_eq!(got32[i].dtype(), DType::F32);
            assert_close_or_zero(&format!("{name} f64"), &want[i], &got[i], 1e-10);
            assert_close_or_zero(&format!("{name} f32"), &want[i], &got32[i], 1e-4);
        }
    }
}

/// Finite differences of the fused op in f64, one shape inside one block and one crossing it.
#[test]
fn attn_fused_grads_match_finite_differences() {
    for (b, t, hq, hkv, d) in [(1, 6, 4, 2, 4), (1, 70, 2, 1, 4)] {
        let (q, k, v) = qkv(b, t, hq, hkv, d, 30);
        let (q, k, v) = (Var::from_tensor(&q).unwrap(), Var::from_tensor(&k).unwrap(), Var::from_tensor(&v).unwrap());
        let w = rand_tensor(&[b, t, hq, d], 1.0, 33);
        let loss = || (attn_fused(q.as_tensor(), k.as_tensor(), v.as_tensor()).unwrap() * &w).unwrap().sum_all().unwrap();
        check_grads(&format!("attn_fused t{t}"), &[("q".into(), q.clone()), ("k".into(), k.clone()), ("v".into(), v.clone())], &loss, 30);
    }
}

/// One fused forward inside a larger graph (input projection, two uses of o), backpropagated
/// twice through two different losses: both gradients match the composed op's.
#[test]
fn attn_fused_backward_twice_through_same_output() {
    let (b, t, hq, hkv, d) = (2, 70, 4, 2, 8);
    let x = Var::from_tensor(&rand_tensor(&[b, t, 16], 1.0, 40)).unwrap();
    let wq = rand_tensor(&[16, hq * d], 0.3, 41);
    let wkv = rand_tensor(&[16, hkv * d], 0.3, 42);
    let (w1, w2) = (rand_tensor(&[b, t, hq, d], 1.0, 43), rand_tensor(&[b, t, hq, d], 1.0, 44));
    let run = |f: fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>| {
        let proj = |w: &Tensor, h: usize| x.as_tensor().broadcast_matmul(w).unwrap().reshape((b, t, h, d)).unwrap();
        let (q, k) = (proj(&wq, hq), proj(&wkv, hkv));
        let v = k.tanh().unwrap();
        let o = f(&q, &k, &v).unwrap();
        let loss1 = ((&o * &w1).unwrap().sum_all().unwrap() + o.sqr().unwrap().sum_all().unwrap()).unwrap();
        let loss2 = (o.tanh().unwrap() * &w2).unwrap().sum_all().unwrap();
        let g1 = loss1.backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let g2 = loss2.backward().unwrap().get(x.as_tensor()).unwrap().clone();
        (g1, g2)
    };
    let (want1, want2) = run(attn_composed);
    let (got1, got2) = run(attn_fused);
    assert_close("first backward", &want1, &got1, 1e-10);
    assert_close("second backward", &want2, &got2, 1e-10);
    let diff = (&want1 - &want2).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    assert!(diff > 1e-3, "the two losses must have different gradients");
}

/// Unsupported dtypes and mismatched shapes are clear errors; `attn` falls back to the composed op.
#[test]
fn attn_fused_rejects_other_dtypes() {
    let (q, k, v) = qkv(1, 5, 2, 1, 4, 50);
    let h = |x: &Tensor| x.to_dtype(DType::F16).unwrap();
    let err = attn_fused(&h(&q), &h(&k), &h(&v)).unwrap_err().to_string();
    assert!(err.contains("must all be f32 or all f64"), "{err}");
    let err = attn_fused(&q, &f32s(&k), &v).unwrap_err().to_string();
    assert!(err.contains("must all be f32 or all f64"), "{err}");
    let err = attn_fused(&q, &q, &v).unwrap_err().to_string();
    assert!(err.contains("Hq % Hkv"), "{err}");
    let o = attn(&h(&q), &h(&k), &h(&v)).unwrap();
    assert_close("attn f16 fallback", &attn_composed(&q, &k, &v).unwrap(), &o, 1e-2);
}

#[test]
fn attn_grads_match_finite_differences() {
    let q = Var::from_tensor(&rand_tensor(&[1, 6, 4, 4], 1.0, 4)).unwrap();
    let k = Var::from_tensor(&rand_tensor(&[1, 6, 2, 4], 1.0, 5)).unwrap();
    let v = Var::from_tensor(&rand_tensor(&[1, 6, 2, 4], 1.0, 6)).unwrap();
    let w = rand_tensor(&[1, 6, 4, 4], 1.0, 7);
    let loss = || (attn(q.as_tensor(), k.as_tensor(), v.as_tensor()).unwrap() * &w).unwrap().sum_all().unwrap();
    check_grads("attn", &[("q".into(), q.clone()), ("k".into(), k.clone()), ("v".into(), v.clone())], &loss, 30);
}

/// `mixscale op attn` writes o and the gradients of sum(o·dO) for every float input.
#[test]
fn op_cli_roundtrip_with_gradients() {
    let dir = tempdir();
    let (b, t, hq, hkv, d) = (2, 9, 4, 2, 6);
    let mut inputs = HashMap::new();
    for (name, h, seed) in [("q", hq, 1), ("k", hkv, 2), ("v", hkv, 3), ("dO", hq, 4)] {
        inputs.insert(name.to_string(), rand_tensor(&[b, t, h, d], 1.0, seed).to_dtype(DType::F32).unwrap());
    }
    let inp = dir.path().join("in.safetensors");
    let out = dir.path().join("out.safetensors");
    candle_core::safetensors::save(&inputs, &inp).unwrap();
    let (code, _, err) = mixscale(&["op", "attn", "--inputs", inp.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    // Reference: f64 autograd of the same loss through the composed op (independent of the fused kernel the CLI runs).
    let f64v = |n: &str| Var::from_tensor(&inputs[n].to_dtype(DType::F64).unwrap()).unwrap();
    let (q, k, v) = (f64v("q"), f64v("k"), f64v("v"));
    let o = attn_composed(q.as_tensor(), k.as_tensor(), v.as_tensor()).unwrap();
    let ref_o = Tensor::from_vec(
        attn_reference(&to_vec(q.as_tensor()), &to_vec(k.as_tensor()), &to_vec(v.as_tensor()), b, t, hq, hkv, d),
        (b, t, hq, d),
        &Device::Cpu,
    )
    .unwrap();
    assert_close("op o", &ref_o, &got["o"], 1e-5);
    let g = (o * inputs["dO"].to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
        assert_close(&format!("grad_{name}"), g.get(var.as_tensor()).unwrap(), &got[&format!("grad_{name}")], 1e-4);
    }
    assert!(!got.contains_key("grad_dO"));
}

#[test]
fn op_cli_errors_are_clear() {
    let dir = tempdir();
    let inp = dir.path().join("in.safetensors");
    let out = dir.path().join("out.safetensors");
    let mut inputs = HashMap::new();
    inputs.insert("q".to_string(), Tensor::zeros((1, 2, 2, 4), DType::F32, &Device::Cpu).unwrap());
    inputs.insert("k".to_string(), Tensor::zeros((1, 2, 3, 4), DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&inputs, &inp).unwrap();
    let (code, _, err) = mixscale(&["op", "attn", "--inputs", inp.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("missing input `v`"), "{err}");
    inputs.insert("v".to_string(), Tensor::zeros((1, 2, 3, 4), DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&inputs, &inp).unwrap();
    let (code, _, err) = mixscale(&["op", "attn", "--inputs", inp.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("Hq % Hkv"), "{err}");
    let (code, _, err) = mixscale(&["op", "nope", "--inputs", inp.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown op `nope`") && err.contains("attn"), "{err}");
    assert!(!out.exists());
}
