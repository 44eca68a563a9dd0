use crate::util::{mixscale, tempdir};
use candle_core::{DType, Device, Tensor, Var};
use mixscale::ops::attn::attn_reference;
use mixscale::ops::attn_fused::fox_fused;
use mixscale::ops::fox::{fox, fox_composed, fox_reference, log_sigmoid};
use mixscale::testing::{assert_close, check_grads, rand_tensor, to_vec};
use std::collections::HashMap;

/// (B, T, Hq, Hkv, D): GQA, T = 1, T crossing the 64-row tile once and several times.
const SHAPES: [(usize, usize, usize, usize, usize); 5] = [(2, 37, 6, 2, 10), (1, 1, 3, 3, 4), (1, 65, 4, 1, 8), (2, 130, 2, 2, 16), (1, 300, 4, 2, 8)];

fn f32s(x: &Tensor) -> Tensor {
    x.to_dtype(DType::F32).unwrap()
}

/// q, k, v and g = logsigmoid(N(mu, 1.5²)) so that forget gates range from ~0 to ~1.
fn inputs(b: usize, t: usize, hq: usize, hkv: usize, d: usize, mu: f64, seed: u64) -> [Tensor; 4] {
    let g = log_sigmoid(&(rand_tensor(&[b, t, hq], 1.5, seed + 3) + mu).unwrap()).unwrap();
    [rand_tensor(&[b, t, hq, d], 1.0, seed), rand_tensor(&[b, t, hkv, d], 1.0, seed + 1), rand_tensor(&[b, t, hkv, d], 1.0, seed + 2), g]
}

fn reference(x: &[Tensor; 4]) -> Tensor {
    let (b, t, hq, d) = x[0].dims4().unwrap();
    let hkv = x[1].dim(2).unwrap();
    let o = fox_reference(&to_vec(&x[0]), &to_vec(&x[1]), &to_vec(&x[2]), &to_vec(&x[3]), b, t, hq, hkv, d);
    Tensor::from_vec(o, (b, t, hq, d), &Device::Cpu).unwrap()
}

/// logsigmoid is finite and exact far into both tails (log(sigmoid) would give −inf / 0).
#[test]
fn log_sigmoid_is_stable() {
    let x = Tensor::new(&[-200f32, -20.0, 0.0, 3.0, 40.0, 200.0], &Device::Cpu).unwrap();
    let got = to_vec(&log_sigmoid(&x).unwrap());
    for (xi, gi) in [-200f64, -20.0, 0.0, 3.0, 40.0, 200.0].iter().zip(&got) {
        let want = -(1.0 + (-xi).exp()).ln();
        assert!((gi - want).abs() <= 1e-6 * want.abs().max(1e-30) + 1e-30, "logsigmoid({xi}) = {gi}, want {want}");
    }
}

/// Fused == composed == f64 reference (bias summed directly from g), f64 to 1e-12, f32 to 1e-5.
#[test]
fn fox_forms_match_reference() {
    for (b, t, hq, hkv, d) in SHAPES {
        for mu in [1.0, -2.0] {
            let name = format!("b{b}_t{t}_h{hq}_kv{hkv}_d{d}_mu{mu}");
            let x = inputs(b, t, hq, hkv, d, mu, 10);
            let want = reference(&x);
            assert_close(&format!("fox fused f64 {name}"), &want, &fox_fused(&x[0], &x[1], &x[2], &x[3]).unwrap(), 1e-12);
            assert_close(&format!("fox composed f64 {name}"), &want, &fox_composed(&x[0], &x[1], &x[2], &x[3]).unwrap(), 1e-12);
            let x32 = x.clone().map(|t| f32s(&t));
            let fused32 = fox(&x32[0], &x32[1], &x32[2], &x32[3]).unwrap();
            assert_eq!(fused32.dtype(), DType::F32);
            assert_close(&format!("fox fused f32 {name}"), &want, &fused32, 1e-5);
            assert_close(&format!("fox composed f32 {name}"), &want, &fox_composed(&x32[0], &x32[1], &x32[2], &x32[3]).unwrap(), 1e-5);
        }
    }
}

/// Strong forgetting over a long sequence (cumulative log gate down to about −3000): the fused
/// f32 kernel stays at f32 accuracy because it never exponentiates a raw cumsum.
#[test]
fn fox_fused_f32_stable_with_large_cumulative_decay() {
    let (b, t, hq, d) = (1, 600, 2, 8);
    let mut x = inputs(b, t, hq, hq, d, 0.0, 70);
    x[3] = (rand_tensor(&[b, t, hq], 0.5, 74).abs().unwrap() - 5.0).unwrap(); // g in about [−5, −3.5]
    let want = reference(&x);
    assert!(to_vec(&x[3]).iter().sum::<f64>() < -2.0 * t as f64);
    let x32 = x.clone().map(|t| f32s(&t));
    assert_close("fox fused f32, strong decay", &want, &fox(&x32[0], &x32[1], &x32[2], &x32[3]).unwrap(), 1e-5);
}

/// A forget gate of exactly 1 (g = 0) is plain causal attention.
#[test]
fn fox_with_unit_gate_is_attention() {
    for (b, t, hq, hkv, d) in SHAPES {
        let mut x = inputs(b, t, hq, hkv, d, 0.0, 80);
        x[3] = x[3].zeros_like().unwrap();
        let want = attn_reference(&to_vec(&x[0]), &to_vec(&x[1]), &to_vec(&x[2]), b, t, hq, hkv, d);
        let want = Tensor::from_vec(want, (b, t, hq, d), &Device::Cpu).unwrap();
        assert_close("fox(g=0) fused vs attn", &want, &fox_fused(&x[0], &x[1], &x[2], &x[3]).unwrap(), 1e-12);
        assert_close("fox(g=0) composed vs attn", &want, &fox_composed(&x[0], &x[1], &x[2], &x[3]).unwrap(), 1e-12);
    }
}

type Op = fn(&Tensor, &Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>;

fn grads(f: Op, x: &[Tensor; 4], w: &Tensor) -> Vec<Tensor> {
    let vars: Vec<Var> = x.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let o = f(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), vars[3].as_tensor()).unwrap();
    let g = (o * w).unwrap().sum_all().unwrap().backward().unwrap();
    vars.iter().map(|v| g.get(v.as_tensor()).expect("missing gradient").clone()).collect()
}

/// Close, except that an exactly zero reference (T = 1: one key, no gradient) needs |other| ≤ tol.
fn close_or_zero(name: &str, reference: &Tensor, other: &Tensor, tol: f64) {
    if to_vec(reference).iter().all(|x| *x == 0.0) {
        let worst = to_vec(other).iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!(worst <= tol, "{name}: reference is zero, max|other| = {worst:e}");
    } else {
        assert_close(name, reference, other, tol);
    }
}

/// Fused backward (dq, dk, dv and dg) == composed autograd: f64 to 1e-10, f32 to 1e-4.
#[test]
fn fox_fused_grads_match_composed() {
    for (b, t, hq, hkv, d) in SHAPES {
        let x = inputs(b, t, hq, hkv, d, 0.5, 20);
        let w = rand_tensor(&[b, t, hq, d], 1.0, 25);
        let want = grads(fox_composed, &x, &w);
        let got = grads(fox_fused, &x, &w);
        let got32 = grads(fox_fused, &x.clone().map(|t| f32s(&t)), &f32s(&w));
        for (i, n) in ["dq", "dk", "dv", "dg"].iter().enumerate() {
            let name = format!("{n} b{b}_t{t}_h{hq}_kv{hkv}_d{d}");
            close_or_zero(&format!("{name} f64"), &want[i], &got[i], 1e-10);
            close_or_zero(&format!("{name} f32"), &want[i], &got32[i], 1e-4);
        }
    }
}

/// Finite differences of the fused op (q, k, v, g) in f64, inside one tile and across tiles.
#[test]
fn fox_fused_grads_match_finite_differences() {
    for (b, t, hq, hkv, d) in [(1, 6, 4, 2, 4), (1, 70, 2, 1, 4)] {
        let x = inputs(b, t, hq, hkv, d, 0.0, 30);
        let vars: Vec<Var> = x.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let w = rand_tensor(&[b, t, hq, d], 1.0, 33);
        let loss = || (fox_fused(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), vars[3].as_tensor()).unwrap() * &w).unwrap().sum_all().unwrap();
        let named: Vec<(String, Var)> = ["q", "k", "v", "g"].iter().zip(&vars).map(|(n, v)| (n.to_string(), v.clone())).collect();
        check_grads(&format!("fox_fused t{t}"), &named, &loss, 30);
    }
}

/// `mixscale op fox` writes o and grad_{q,k,v,g} of sum(o·dO), checked against f64 composed autograd.
#[test]
fn fox_op_cli_roundtrip_with_gradients() {
    let dir = tempdir();
    let (b, t, hq, hkv, d) = (2, 70, 4, 2, 6);
    let x = inputs(b, t, hq, hkv, d, 1.0, 40);
    let d_o = rand_tensor(&[b, t, hq, d], 1.0, 45);
    let mut files = HashMap::new();
    for (n, v) in ["q", "k", "v", "g"].iter().zip(&x) {
        files.insert(n.to_string(), f32s(v));
    }
    files.insert("dO".to_string(), f32s(&d_o));
    let (inp, out) = (dir.path().join("in.safetensors"), dir.path().join("out.safetensors"));
    candle_core::safetensors::save(&files, &inp).unwrap();
    let (code, _, err) = mixscale(&["op", "fox", "--inputs", inp.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let x64 = ["q", "k", "v", "g"].map(|n| files[n].to_dtype(DType::F64).unwrap());
    assert_close("fox op o", &reference(&x64), &got["o"], 1e-5);
    let want = grads(fox_composed, &x64, &d_o.to_dtype(DType::F32).unwrap().to_dtype(DType::F64).unwrap());
    for (i, n) in ["q", "k", "v", "g"].iter().enumerate() {
        assert_close(&format!("fox op grad_{n}"), &want[i], &got[&format!("grad_{n}")], 1e-4);
    }
    // A g with the kv head count instead of the query head count is a clear error.
    files.insert("g".to_string(), Tensor::zeros((b, t, hkv), DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&files, &inp).unwrap();
    let (code, _, err) = mixscale(&["op", "fox", "--inputs", inp.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("one log forget gate per query head"), "{err}");
}

/// The golden fixtures of `tests/golden/make_fox.py` (fla-core `naive_forgetting_attn`, float32),
/// `fox_*.safetensors`.
pub fn golden(prefix: &str) -> Vec<(String, HashMap<String, Tensor>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut out: Vec<(String, HashMap<String, Tensor>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.file_name().unwrap().to_str().unwrap().starts_with(prefix))
        .map(|p| (p.file_name().unwrap().to_str().unwrap().to_string(), candle_core::safetensors::load(&p, &Device::Cpu).unwrap()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Our op (the fused f32 kernel the CLI runs) reproduces fla's reference outputs and input
/// gradients to ops.md's bar (1e-4 outputs, 1e-3 gradients, relative to max|ref|), and our f64
/// loop matches fla's float32 output to float32 accuracy.
#[test]
fn fox_matches_fla_golden_fixtures() {
    let fixtures = golden("fox_");
    assert!(fixtures.len() >= 3, "expected the fox_*.safetensors fixtures in tests/golden");
    for (name, f) in fixtures {
        let inputs: HashMap<String, Tensor> = ["q", "k", "v", "g", "dO"].iter().map(|n| (n.to_string(), f[*n].clone())).collect();
        let got = mixscale::ops::run_op(mixscale::ops::find_op("fox").unwrap(), inputs).unwrap();
        assert_close(&format!("{name} o"), &f["o"], &got["o"], 1e-4);
        for n in ["q", "k", "v", "g"] {
            close_or_zero(&format!("{name} grad_{n}"), &f[&format!("grad_{n}")], &got[&format!("grad_{n}")], 1e-3);
        }
        let x64 = ["q", "k", "v", "g"].map(|n| f[n].to_dtype(DType::F64).unwrap());
        assert_close(&format!("{name} f64 loop vs fla"), &f["o"], &reference(&x64), 1e-5);
    }
}
