use crate::util::{mixscale, tempdir};
use candle_core::{DType, Device, Tensor, Var};
use mixscale::ops::gated_delta_rule::{gdr_chunked, gdr_recurrent, gdr_reference};
use mixscale::ops::gdr_fused::{self, gdr_fused};
use mixscale::testing::{assert_close, check_grads, rand_tensor, to_vec};
use std::collections::HashMap;

/// Inputs as the layer produces them: k L2-normalised, β ∈ (0, 1), g = −softplus(·) ∈ (−∞, 0)
/// (values down to about −3 per step), plus a random initial state. All f64 `[B,T,H,·]`.
fn inputs(b: usize, t: usize, h: usize, dk: usize, dv: usize, seed: u64) -> Vec<Tensor> {
    let q = rand_tensor(&[b, t, h, dk], 1.0, seed);
    let k = rand_tensor(&[b, t, h, dk], 1.0, seed + 1);
    let k = k.broadcast_div(&k.sqr().unwrap().sum_keepdim(3).unwrap().sqrt().unwrap()).unwrap();
    let v = rand_tensor(&[b, t, h, dv], 1.0, seed + 2);
    let z = rand_tensor(&[b, t, h], 1.5, seed + 3);
    let g = ((z.exp().unwrap() + 1.0).unwrap().log().unwrap().neg().unwrap() * 0.7).unwrap();
    let beta = (rand_tensor(&[b, t, h], 1.5, seed + 4).neg().unwrap().exp().unwrap() + 1.0).unwrap().recip().unwrap();
    let s0 = rand_tensor(&[b, h, dk, dv], 0.5, seed + 5);
    vec![q, k, v, g, beta, s0]
}

const NAMES: [&str; 6] = ["q", "k", "v", "g", "beta", "initial_state"];

type Form = dyn Fn(&[Tensor], bool) -> (Tensor, Tensor);

fn chunked(chunk: usize) -> impl Fn(&[Tensor], bool) -> (Tensor, Tensor) {
    move |x: &[Tensor], init: bool| gdr_chunked(&x[0], &x[1], &x[2], &x[3], &x[4], init.then_some(&x[5]), chunk).unwrap()
}

fn recurrent(x: &[Tensor], init: bool) -> (Tensor, Tensor) {
    gdr_recurrent(&x[0], &x[1], &x[2], &x[3], &x[4], init.then_some(&x[5])).unwrap()
}

fn reference(x: &[Tensor], init: bool) -> (Tensor, Tensor) {
    let (b, t, h, dk) = x[0].dims4().unwrap();
    let dv = x[2].dim(3).unwrap();
    let s0 = to_vec(&x[5]);
    let (o, s) = gdr_reference(&to_vec(&x[0]), &to_vec(&x[1]), &to_vec(&x[2]), &to_vec(&x[3]), &to_vec(&x[4]), init.then_some(&s0[..]), (b, t, h, dk, dv));
    (Tensor::from_vec(o, (b, t, h, dv), &Device::Cpu).unwrap(), Tensor::from_vec(s, (b, h, dk, dv), &Device::Cpu).unwrap())
}

/// Gradients of `sum(o·wo) + sum(final_state·ws)` w.r.t. every input (the state weight makes
/// the final state's gradient path part of the check).
fn grads(f: &Form, x: &[Tensor], init: bool, wo: &Tensor, ws: &Tensor) -> Vec<Tensor> {
    let vars: Vec<Var> = x.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (o, s) = f(&ts, init);
    let loss = ((o * wo.to_dtype(x[0].dtype()).unwrap()).unwrap().sum_all().unwrap()
        + (s.to_dtype(x[0].dtype()).unwrap() * ws.to_dtype(x[0].dtype()).unwrap()).unwrap().sum_all().unwrap())
    .unwrap();
    let g = loss.backward().unwrap();
    let n = if init { 6 } else { 5 };
    vars[..n].iter().map(|v| g.get(v.as_tensor()).expect("missing gradient").clone()).collect()
}

fn f32s(x: &[Tensor]) -> Vec<Tensor> {
    x.iter().map(|t| t.to_dtype(DType::F32).unwrap()).collect()
}

/// chunked == recurrent (step loop) == plain f64 loop, outputs and final states: f64 to 1e-10
/// (recurrent to 1e-12), f32 to 1e-4; T = 1, 37, 64, 130 with chunks 16 and 64, with and
/// without an initial state, head dims that are not powers of two.
#[test]
fn gdn_op_chunked_matches_recurrent_and_reference() {
    for chunk in [16, 64] {
        for (i, t) in [1usize, 37, 64, 130].into_iter().enumerate() {
            let init = i % 2 == 1 || t == 130;
            let (b, h, dk, dv) = (2, 3, 6, 5);
            let name = format!("b{b}_t{t}_h{h}_k{dk}_v{dv}_c{chunk}_init{init}");
            let x = inputs(b, t, h, dk, dv, 100 + t as u64);
            let (o_ref, s_ref) = reference(&x, init);
            let (o_rec, s_rec) = recurrent(&x, init);
            assert_close(&format!("recurrent o {name}"), &o_ref, &o_rec, 1e-12);
            assert_close(&format!("recurrent state {name}"), &s_ref, &s_rec, 1e-12);
            let (o, s) = chunked(chunk)(&x, init);
            assert_close(&format!("chunked o {name}"), &o_ref, &o, 1e-10);
            assert_close(&format!("chunked state {name}"), &s_ref, &s, 1e-10);
            let (o32, s32) = chunked(chunk)(&f32s(&x), init);
            assert_eq!((o32.dtype(), s32.dtype()), (DType::F32, DType::F32));
            assert_close(&format!("chunked f32 o {name}"), &o_ref, &o32, 1e-4);
            assert_close(&format!("chunked f32 state {name}"), &s_ref, &s32, 1e-4);
        }
    }
}

/// Gradients of the chunked form == autograd through the token loop, for q, k, v, g, beta and
/// initial_state: f64 to 1e-10, f32 to 1e-4.
#[test]
fn gdn_op_chunked_grads_match_recurrent() {
    for (t, chunk) in [(1usize, 16usize), (37, 16), (64, 16), (130, 16), (37, 64), (130, 64)] {
        let (b, h, dk, dv) = (2, 2, 6, 5);
        let x = inputs(b, t, h, dk, dv, 200 + t as u64);
        let wo = rand_tensor(&[b, t, h, dv], 1.0, 7);
        let ws = rand_tensor(&[b, h, dk, dv], 1.0, 8);
        for init in [false, true] {
            let want = grads(&recurrent, &x, init, &wo, &ws);
            let got = grads(&chunked(chunk), &x, init, &wo, &ws);
            let got32 = grads(&chunked(chunk), &f32s(&x), init, &wo, &ws);
            for (j, w) in want.iter().enumerate() {
                let name = format!("d{} t{t}_c{chunk}_init{init}", NAMES[j]);
                assert_close(&format!("{name} f64"), w, &got[j], 1e-10);
                assert_close(&format!("{name} f32"), w, &got32[j], 1e-4);
            }
        }
    }
}

/// Finite differences of the chunked form in f64 (two chunks plus padding).
#[test]
fn gdn_op_chunked_grads_match_finite_differences() {
    let x = inputs(1, 7, 2, 3, 2, 300);
    let vars: Vec<(String, Var)> = x.iter().enumerate().map(|(i, t)| (NAMES[i].to_string(), Var::from_tensor(t).unwrap())).collect();
    let wo = rand_tensor(&[1, 7, 2, 2], 1.0, 9);
    let ws = rand_tensor(&[1, 2, 3, 2], 1.0, 10);
    let loss = || {
        let t: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
        let (o, s) = gdr_chunked(&t[0], &t[1], &t[2], &t[3], &t[4], Some(&t[5]), 4).unwrap();
        ((o * &wo).unwrap().sum_all().unwrap() + (s * &ws).unwrap().sum_all().unwrap()).unwrap()
    };
    check_grads("gdr_chunked", &vars, &loss, 20);
}

/// Strong decay (g ≈ −20 per step: the chunk cumsum reaches −1280, far below f32's exp range)
/// stays finite and exact in f32, since only masked differences G_i − G_j are exponentiated.
#[test]
fn gdn_op_strong_decay_is_stable_in_f32() {
    let mut x = inputs(1, 130, 2, 4, 4, 400);
    x[3] = ((x[3].clone() * 0.0).unwrap() - 20.0).unwrap();
    let (o_ref, s_ref) = reference(&x, true);
    let (o, s) = chunked(64)(&f32s(&x), true);
    assert_close("strong decay o", &o_ref, &o, 1e-4);
    assert_close("strong decay state", &s_ref, &s, 1e-4);
    let wo = rand_tensor(&[1, 130, 2, 4], 1.0, 11);
    let ws = rand_tensor(&[1, 2, 4, 4], 1.0, 12);
    let want = grads(&recurrent, &x, true, &wo, &ws);
    let got = grads(&chunked(64), &f32s(&x), true, &wo, &ws);
    for (j, w) in want.iter().enumerate() {
        assert_close(&format!("strong decay d{}", NAMES[j]), w, &got[j], 1e-4);
    }
}

/// `mixscale op gated_delta_rule` writes o, final_state and the gradients of sum(o·dO) for every
/// float input, initial_state included.
#[test]
fn gdn_op_cli_roundtrip_with_gradients() {
    let dir = tempdir();
    let (b, t, h, dk, dv) = (2, 70, 2, 6, 5);
    let x = inputs(b, t, h, dk, dv, 500);
    let d_o = rand_tensor(&[b, t, h, dv], 1.0, 13);
    let mut files = HashMap::new();
    for (i, n) in NAMES.iter().enumerate() {
        files.insert(n.to_string(), x[i].to_dtype(DType::F32).unwrap());
    }
    files.insert("dO".to_string(), d_o.to_dtype(DType::F32).unwrap());
    let inp = dir.path().join("in.safetensors");
    let out = dir.path().join("out.safetensors");
    candle_core::safetensors::save(&files, &inp).unwrap();
    let (code, _, err) = mixscale(&["op", "gated_delta_rule", "--inputs", inp.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    // The reference sees the same f32-rounded inputs, in f64.
    let x64: Vec<Tensor> = NAMES.iter().map(|n| files[*n].to_dtype(DType::F64).unwrap()).collect();
    let (o_ref, s_ref) = reference(&x64, true);
    assert_close("op o", &o_ref, &got["o"], 1e-5);
    assert_close("op final_state", &s_ref, &got["final_state"], 1e-5);
    let zero_ws = Tensor::zeros((b, h, dk, dv), DType::F64, &Device::Cpu).unwrap();
    let want = grads(&recurrent, &x64, true, &files["dO"].to_dtype(DType::F64).unwrap(), &zero_ws);
    for (j, n) in NAMES.iter().enumerate() {
        assert_close(&format!("grad_{n}"), &want[j], &got[&format!("grad_{n}")], 1e-4);
    }
    assert!(!got.contains_key("grad_dO"));
    // Without initial_state: no grad_initial_state, and a zero initial state.
    files.remove("initial_state");
    candle_core::safetensors::save(&files, &inp).unwrap();
    let (code, _, err) = mixscale(&["op", "gated_delta_rule", "--inputs", inp.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert!(!got.contains_key("grad_initial_state"));
    assert_close("op o without state", &reference(&x64, false).0, &got["o"], 1e-5);
    // A wrong shape is a clear error.
    files.insert("beta".to_string(), Tensor::zeros((b, t, h + 1), DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&files, &inp).unwrap();
    let (code, _, err) = mixscale(&["op", "gated_delta_rule", "--inputs", inp.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("gated_delta_rule: expected"), "{err}");
}

/// B = 1, H = 1 with the default chunk of 64 and two chunks (regression: the triangular
/// inverse used to add one tensor dim per recursion level, and backward through the rank-9+
/// strided tensors panicked in candle; found by the fla golden fixture of tests/golden.rs).
#[test]
fn gdn_op_single_sequence_single_head_chunk64_grads() {
    let x = inputs(1, 70, 1, 3, 2, 700);
    let wo = rand_tensor(&[1, 70, 1, 2], 1.0, 14);
    let ws = rand_tensor(&[1, 1, 3, 2], 1.0, 15);
    let want = grads(&recurrent, &x, true, &wo, &ws);
    let got = grads(&chunked(64), &f32s(&x), true, &wo, &ws);
    for (j, w) in want.iter().enumerate() {
        assert_close(&format!("b1 h1 d{}", NAMES[j]), w, &got[j], 1e-4);
    }
}

fn fused(x: &[Tensor], init: bool) -> (Tensor, Tensor) {
    gdr_fused(&x[0], &x[1], &x[2], &x[3], &x[4], init.then_some(&x[5])).unwrap()
}

/// Fused CPU kernel == plain f64 loop (f64 to 1e-12; f32 to 1e-4) and == the composed chunked
/// form in f32 (1e-4): outputs and final states, T = 1, 15, 16, 37, 130 (checkpoint segments of
/// 16, partial last segment), with and without an initial state.
#[test]
fn gdn_fused_matches_reference_and_chunked() {
    for (i, t) in [1usize, 15, 16, 37, 130].into_iter().enumerate() {
        for init in [i % 2 == 0, i % 2 == 1] {
            let (b, h, dk, dv) = (2, 3, 6, 5);
            let name = format!("t{t}_init{init}");
            let x = inputs(b, t, h, dk, dv, 800 + t as u64);
            let (o_ref, s_ref) = reference(&x, init);
            let (o, s) = fused(&x, init);
            assert_eq!((o.dtype(), s.dtype()), (DType::F64, DType::F64));
            assert_close(&format!("fused o {name}"), &o_ref, &o, 1e-12);
            assert_close(&format!("fused state {name}"), &s_ref, &s, 1e-12);
            let (o32, s32) = fused(&f32s(&x), init);
            assert_eq!((o32.dtype(), s32.dtype()), (DType::F32, DType::F32));
            assert_close(&format!("fused f32 o {name}"), &o_ref, &o32, 1e-4);
            assert_close(&format!("fused f32 state {name}"), &s_ref, &s32, 1e-4);
            let (oc, sc) = chunked(16)(&f32s(&x), init);
            assert_close(&format!("fused vs chunked f32 o {name}"), &oc, &o32, 1e-4);
            assert_close(&format!("fused vs chunked f32 state {name}"), &sc, &s32, 1e-4);
        }
    }
}

/// Gradients of the fused kernel w.r.t. q, k, v, g, beta and initial_state == autograd through
/// the token loop (f64 to 1e-10, fused f32 to 1e-4) and == the composed chunked form in f32
/// (1e-4); the loss weights the final state too. Besides K = 6, V = 5 at several lengths, the
/// preset's K = 24 with V = 37 (a masked last vector of the AVX-512 token steps) and V = 70
/// (beyond their 64 columns: the generic steps).
#[test]
fn gdn_fused_grads_match_recurrent_and_chunked() {
    let cases = [(1usize, 6usize, 5usize), (16, 6, 5), (37, 6, 5), (130, 6, 5), (21, 24, 37), (18, 5, 70)];
    for (t, dk, dv) in cases {
        let (b, h) = (2, 2);
        let x = inputs(b, t, h, dk, dv, 900 + t as u64);
        let wo = rand_tensor(&[b, t, h, dv], 1.0, 17);
        let ws = rand_tensor(&[b, h, dk, dv], 1.0, 18);
        for init in [false, true] {
            let want = grads(&recurrent, &x, init, &wo, &ws);
            let got = grads(&fused, &x, init, &wo, &ws);
            let got32 = grads(&fused, &f32s(&x), init, &wo, &ws);
            let chunk32 = grads(&chunked(16), &f32s(&x), init, &wo, &ws);
            for (j, w) in want.iter().enumerate() {
                let name = format!("fused d{} t{t}_k{dk}_v{dv}_init{init}", NAMES[j]);
                assert_close(&format!("{name} f64"), w, &got[j], 1e-10);
                assert_close(&format!("{name} f32"), w, &got32[j], 1e-4);
                assert_close(&format!("{name} f32 vs chunked f32"), &chunk32[j], &got32[j], 1e-4);
            }
        }
    }
}

/// Finite differences of the fused kernel in f64, T = 19 (two checkpoint segments).
#[test]
fn gdn_fused_grads_match_finite_differences() {
    let x = inputs(1, 19, 2, 3, 2, 310);
    let vars: Vec<(String, Var)> = x.iter().enumerate().map(|(i, t)| (NAMES[i].to_string(), Var::from_tensor(t).unwrap())).collect();
    let wo = rand_tensor(&[1, 19, 2, 2], 1.0, 19);
    let ws = rand_tensor(&[1, 2, 3, 2], 1.0, 20);
    let loss = || {
        let t: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
        let (o, s) = gdr_fused(&t[0], &t[1], &t[2], &t[3], &t[4], Some(&t[5])).unwrap();
        ((o * &wo).unwrap().sum_all().unwrap() + (s * &ws).unwrap().sum_all().unwrap()).unwrap()
    };
    check_grads("gdr_fused", &vars, &loss, 20);
}

/// Strong decay (g = −20 per step) and a second backward through the same graph (the op keeps
/// no state between calls) give the reference's values and gradients in f32.
#[test]
fn gdn_fused_strong_decay_and_repeated_backward() {
    let mut x = inputs(1, 40, 2, 4, 4, 410);
    x[3] = ((x[3].clone() * 0.0).unwrap() - 20.0).unwrap();
    let (o_ref, s_ref) = reference(&x, true);
    let (o, s) = fused(&f32s(&x), true);
    assert_close("fused strong decay o", &o_ref, &o, 1e-4);
    assert_close("fused strong decay state", &s_ref, &s, 1e-4);
    let wo = rand_tensor(&[1, 40, 2, 4], 1.0, 21);
    let ws = rand_tensor(&[1, 2, 4, 4], 1.0, 22);
    let want = grads(&recurrent, &x, true, &wo, &ws);
    let vars: Vec<Var> = f32s(&x).iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (o, s) = fused(&ts, true);
    let loss = ((o * wo.to_dtype(DType::F32).unwrap()).unwrap().sum_all().unwrap() + (s * ws.to_dtype(DType::F32).unwrap()).unwrap().sum_all().unwrap()).unwrap();
    for round in 0..2 {
        let g = loss.backward().unwrap();
        for (j, w) in want.iter().enumerate() {
            assert_close(&format!("fused strong decay d{} round {round}", NAMES[j]), w, g.get(vars[j].as_tensor()).unwrap(), 1e-4);
        }
    }
}

/// The training dispatcher: fused for f32/f64 on the CPU, the composed chunked form for bf16
/// (or when asked); `gdr_fused` itself refuses bf16 with a clear error.
#[test]
fn gdn_train_dispatch_falls_back_for_bf16() {
    let x = inputs(1, 9, 2, 4, 4, 420);
    let bf: Vec<Tensor> = x.iter().map(|t| t.to_dtype(DType::BF16).unwrap()).collect();
    assert!(!gdr_fused::supported(&bf[0], &bf[1], &bf[2], &bf[3], &bf[4], Some(&bf[5])));
    let err = gdr_fused::gdr_fused(&bf[0], &bf[1], &bf[2], &bf[3], &bf[4], Some(&bf[5])).unwrap_err().to_string();
    assert!(err.contains("f32 or all f64"), "{err}");
    let (o, s) = gdr_fused::gdr_train(&bf[0], &bf[1], &bf[2], &bf[3], &bf[4], Some(&bf[5]), 4, true).unwrap();
    let (oc, sc) = gdr_chunked(&bf[0], &bf[1], &bf[2], &bf[3], &bf[4], Some(&bf[5]), 4).unwrap();
    assert_eq!(o.dtype(), DType::BF16);
    assert_close("bf16 dispatch o", &oc, &o, 0.0);
    assert_close("bf16 dispatch state", &sc, &s, 0.0);
    let (of, _) = gdr_fused::gdr_train(&x[0], &x[1], &x[2], &x[3], &x[4], Some(&x[5]), 4, true).unwrap();
    let (oc, _) = gdr_fused::gdr_train(&x[0], &x[1], &x[2], &x[3], &x[4], Some(&x[5]), 4, false).unwrap();
    assert_close("f64 fused vs forced composed", &oc, &of, 1e-10);
}
