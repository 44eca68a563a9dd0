use crate::util::{mixscale, tempdir};
use candle_core::{DType, Device, Tensor, Var};
use mixscale::ops::attn::{attn, attn_reference};
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
    // Reference: f64 autograd of the same loss.
    let f64v = |n: &str| Var::from_tensor(&inputs[n].to_dtype(DType::F64).unwrap()).unwrap();
    let (q, k, v) = (f64v("q"), f64v("k"), f64v("v"));
    let o = attn(q.as_tensor(), k.as_tensor(), v.as_tensor()).unwrap();
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
