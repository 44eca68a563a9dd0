use crate::util::{mixscale, tempdir};
use candle_core::{DType, Device, Tensor, Var};
use mixscale::ops::ssd::{ssd_chunked, ssd_recurrent, ssd_reference, ssd_step};
use mixscale::ops::ssd_fused::{self, ssd_fused};
use mixscale::testing::{assert_close, check_grads, rand_tensor, to_vec};
use std::collections::HashMap;

/// Inputs as the Mamba2 layer produces them: dt = softplus(·) > 0 (about 0.05..3), A ∈ [−4, −0.5]
/// per head, x, Bm, Cm N(0, 1), plus a random initial state. All f64.
/// x `[B,T,H,P]`, dt `[B,T,H]`, A `[H]`, Bm, Cm `[B,T,G,N]`, s0 `[B,H,P,N]`.
fn inputs((b, t, h, p, g, n): (usize, usize, usize, usize, usize, usize), seed: u64) -> Vec<Tensor> {
    let x = rand_tensor(&[b, t, h, p], 1.0, seed);
    let z = (rand_tensor(&[b, t, h], 1.2, seed + 1) - 1.0).unwrap();
    let dt = (z.exp().unwrap() + 1.0).unwrap().log().unwrap();
    let a = rand_tensor(&[h], 0.6, seed + 2).tanh().unwrap().affine(1.75, -2.25).unwrap(); // (−4, −0.5)
    let bm = rand_tensor(&[b, t, g, n], 1.0, seed + 3);
    let cm = rand_tensor(&[b, t, g, n], 1.0, seed + 4);
    let s0 = rand_tensor(&[b, h, p, n], 0.5, seed + 5);
    vec![x, dt, a, bm, cm, s0]
}

const NAMES: [&str; 6] = ["x", "dt", "A", "Bm", "Cm", "initial_state"];

type Form = dyn Fn(&[Tensor], bool) -> (Tensor, Tensor);

fn chunked(chunk: usize) -> impl Fn(&[Tensor], bool) -> (Tensor, Tensor) {
    move |x: &[Tensor], init: bool| ssd_chunked(&x[0], &x[1], &x[2], &x[3], &x[4], init.then_some(&x[5]), chunk).unwrap()
}

fn fused(x: &[Tensor], init: bool) -> (Tensor, Tensor) {
    ssd_fused(&x[0], &x[1], &x[2], &x[3], &x[4], init.then_some(&x[5])).unwrap()
}

fn recurrent(x: &[Tensor], init: bool) -> (Tensor, Tensor) {
    ssd_recurrent(&x[0], &x[1], &x[2], &x[3], &x[4], init.then_some(&x[5])).unwrap()
}

pub fn reference(x: &[Tensor], init: bool) -> (Tensor, Tensor) {
    let (b, t, h, p) = x[0].dims4().unwrap();
    let (_, _, g, n) = x[3].dims4().unwrap();
    let s0 = to_vec(&x[5]);
    let (y, s) = ssd_reference(&to_vec(&x[0]), &to_vec(&x[1]), &to_vec(&x[2]), &to_vec(&x[3]), &to_vec(&x[4]), init.then_some(&s0[..]), (b, t, h, p, g, n));
    (Tensor::from_vec(y, (b, t, h, p), &Device::Cpu).unwrap(), Tensor::from_vec(s, (b, h, p, n), &Device::Cpu).unwrap())
}

/// Gradients of `sum(y·wy) + sum(final_state·ws)` w.r.t. every input (the state weight puts
/// the final state's gradient path into the check).
fn grads(f: &Form, x: &[Tensor], init: bool, wy: &Tensor, ws: &Tensor) -> Vec<Tensor> {
    let vars: Vec<Var> = x.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (y, s) = f(&ts, init);
    let dt = x[0].dtype();
    let loss = ((y * wy.to_dtype(dt).unwrap()).unwrap().sum_all().unwrap() + (s.to_dtype(dt).unwrap() * ws.to_dtype(dt).unwrap()).unwrap().sum_all().unwrap()).unwrap();
    let g = loss.backward().unwrap();
    let n = if init { 6 } else { 5 };
    vars[..n].iter().map(|v| g.get(v.as_tensor()).expect("missing gradient").clone()).collect()
}

fn f32s(x: &[Tensor]) -> Vec<Tensor> {
    x.iter().map(|t| t.to_dtype(DType::F32).unwrap()).collect()
}

/// (B, T, H, P, G, N) cases: one group, two groups of two heads, one head per group; T = 1, T
/// not a multiple of the chunk, T a multiple, several chunks.
/// The last shape has P = 20 and N = 35 (full 16-column blocks plus remainders in the fused
/// kernel's blocked token steps).
const SHAPES: [(usize, usize, usize, usize, usize, usize); 5] = [(2, 1, 2, 3, 1, 4), (2, 37, 4, 3, 2, 5), (1, 64, 3, 4, 1, 2), (2, 130, 2, 5, 2, 3), (1, 40, 2, 20, 1, 35)];

/// chunked == recurrent (loop of ssd_step) == plain f64 loop, outputs and final states: f64 to
/// 1e-10 (recurrent 1e-12), f32 to 1e-4, chunks 16 and 64, with and without initial state.
#[test]
fn ssd_chunked_matches_recurrent_and_reference() {
    for chunk in [16, 64] {
        for (i, shape) in SHAPES.into_iter().enumerate() {
            let init = i % 2 == 1 || shape.1 == 130;
            let name = format!("{shape:?}_c{chunk}_init{init}");
            let x = inputs(shape, 100 + i as u64);
            let (y_ref, s_ref) = reference(&x, init);
            let (y_rec, s_rec) = recurrent(&x, init);
            assert_close(&format!("recurrent y {name}"), &y_ref, &y_rec, 1e-12);
            assert_close(&format!("recurrent state {name}"), &s_ref, &s_rec, 1e-12);
            let (y, s) = chunked(chunk)(&x, init);
            assert_close(&format!("chunked y {name}"), &y_ref, &y, 1e-10);
            assert_close(&format!("chunked state {name}"), &s_ref, &s, 1e-10);
            let (y32, s32) = chunked(chunk)(&f32s(&x), init);
            assert_eq!((y32.dtype(), s32.dtype()), (DType::F32, DType::F32));
            assert_close(&format!("chunked f32 y {name}"), &y_ref, &y32, 1e-4);
            assert_close(&format!("chunked f32 state {name}"), &s_ref, &s32, 1e-4);
        }
    }
}

/// The step form advances exactly one token: state after T tokens from the chunked form, then
/// one ssd_step, equals the chunked form over T+1 tokens (output of the last token and state).
#[test]
fn ssd_step_continues_chunked_state() {
    let (b, t, h, p, g, n) = (2, 21, 4, 3, 2, 5);
    let x = inputs((b, t + 1, h, p, g, n), 600);
    let head: Vec<Tensor> = x.iter().enumerate().map(|(i, z)| if i == 2 || i == 5 { z.clone() } else { z.narrow(1, 0, t).unwrap() }).collect();
    let (_, s_t) = chunked(8)(&head, true);
    let last = |z: &Tensor| z.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
    let (y_step, s_step) = ssd_step(&last(&x[0]), &last(&x[1]), &x[2], &last(&x[3]), &last(&x[4]), &s_t).unwrap();
    let (y_all, s_all) = reference(&x, true);
    assert_close("step y", &y_all.narrow(1, t, 1).unwrap().squeeze(1).unwrap(), &y_step, 1e-12);
    assert_close("step state", &s_all, &s_step, 1e-12);
}

/// Gradients of the chunked form == autograd through the token loop, for x, dt, A, Bm, Cm and
/// initial_state: f64 to 1e-10, f32 to 1e-4.
#[test]
fn ssd_chunked_grads_match_recurrent() {
    for (i, (shape, chunk)) in [(SHAPES[0], 16usize), (SHAPES[1], 16), (SHAPES[2], 16), (SHAPES[3], 64), (SHAPES[1], 64)].into_iter().enumerate() {
        let (b, t, h, p, _, n) = shape;
        let x = inputs(shape, 200 + i as u64);
        let wy = rand_tensor(&[b, t, h, p], 1.0, 7);
        let ws = rand_tensor(&[b, h, p, n], 1.0, 8);
        for init in [false, true] {
            let want = grads(&recurrent, &x, init, &wy, &ws);
            let got = grads(&chunked(chunk), &x, init, &wy, &ws);
            let got32 = grads(&chunked(chunk), &f32s(&x), init, &wy, &ws);
            for (j, w) in want.iter().enumerate() {
                let name = format!("d{} {shape:?}_c{chunk}_init{init}", NAMES[j]);
                assert_close(&format!("{name} f64"), w, &got[j], 1e-10);
                assert_close(&format!("{name} f32"), w, &got32[j], 1e-4);
            }
        }
    }
}

/// Finite differences of the chunked form in f64 (three chunks plus padding, two groups).
#[test]
fn ssd_chunked_grads_match_finite_differences() {
    let shape = (1, 10, 4, 2, 2, 3);
    let x = inputs(shape, 300);
    let vars: Vec<(String, Var)> = x.iter().enumerate().map(|(i, t)| (NAMES[i].to_string(), Var::from_tensor(t).unwrap())).collect();
    let wy = rand_tensor(&[1, 10, 4, 2], 1.0, 9);
    let ws = rand_tensor(&[1, 4, 2, 3], 1.0, 10);
    let loss = || {
        let t: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
        let (y, s) = ssd_chunked(&t[0], &t[1], &t[2], &t[3], &t[4], Some(&t[5]), 4).unwrap();
        ((y * &wy).unwrap().sum_all().unwrap() + (s * &ws).unwrap().sum_all().unwrap()).unwrap()
    };
    check_grads("ssd_chunked", &vars, &loss, 20);
}

/// A "reset" token with dt·A ≈ −3000 in the middle of a chunk, small decays around it: the
/// in-chunk cumulative sum jumps to −3000, so segment sums formed as f32 differences of it
/// carry ~2e-4 absolute error (a relative error of exp(seg) near the diagonal; with the f32
/// differences this test measured 1.2e-4 on y and failed), and exp of it as a ratio would
/// underflow to 0/0. The chunked f32 form (f64 differences) stays finite and within 1e-4 of
/// the f64 loop, values and gradients (measured ~2e-7).
#[test]
fn ssd_reset_token_is_stable_in_f32() {
    let shape = (1, 96, 2, 3, 1, 4);
    let mut x = inputs(shape, 400);
    let mut dt = to_vec(&x[1]).iter().map(|v| v * 0.01).collect::<Vec<_>>();
    for hh in 0..2 {
        dt[40 * 2 + hh] = 1000.0;
    }
    x[1] = Tensor::from_vec(dt, (1, 96, 2), &Device::Cpu).unwrap();
    x[2] = Tensor::new(&[-3.0f64, -3.5], &Device::Cpu).unwrap();
    x[0] = (&x[0] * 0.01).unwrap(); // keep dt·x O(1)
    let (y_ref, s_ref) = reference(&x, true);
    let (y, s) = chunked(64)(&f32s(&x), true);
    assert_close("reset y", &y_ref, &y, 1e-4);
    assert_close("reset state", &s_ref, &s, 1e-4);
    let wy = rand_tensor(&[1, 96, 2, 3], 1.0, 11);
    let ws = rand_tensor(&[1, 2, 3, 4], 1.0, 12);
    let want = grads(&recurrent, &x, true, &wy, &ws);
    let got = grads(&chunked(64), &f32s(&x), true, &wy, &ws);
    for (j, w) in want.iter().enumerate() {
        assert_close(&format!("reset d{}", NAMES[j]), w, &got[j], 1e-4);
    }
}

/// `mixscale op ssd` writes y, final_state and the gradients of sum(y·dO) for every float
/// input, initial_state included; without initial_state there is no grad for it; bad shapes
/// are a clear error (exit 2).
#[test]
fn ssd_op_cli_roundtrip_with_gradients() {
    let dir = tempdir();
    let shape @ (b, t, h, p, _, n) = (2, 70, 4, 3, 2, 5);
    let x = inputs(shape, 500);
    let d_o = rand_tensor(&[b, t, h, p], 1.0, 13);
    let mut files = HashMap::new();
    for (i, name) in NAMES.iter().enumerate() {
        files.insert(name.to_string(), x[i].to_dtype(DType::F32).unwrap());
    }
    files.insert("dO".to_string(), d_o.to_dtype(DType::F32).unwrap());
    let inp = dir.path().join("in.safetensors");
    let out = dir.path().join("out.safetensors");
    let run = |files: &HashMap<String, Tensor>| {
        candle_core::safetensors::save(files, &inp).unwrap();
        mixscale(&["op", "ssd", "--inputs", inp.to_str().unwrap(), "--out", out.to_str().unwrap()])
    };
    let (code, _, err) = run(&files);
    assert_eq!(code, 0, "{err}");
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let x64: Vec<Tensor> = NAMES.iter().map(|k| files[*k].to_dtype(DType::F64).unwrap()).collect();
    let (y_ref, s_ref) = reference(&x64, true);
    assert_close("op y", &y_ref, &got["y"], 1e-5);
    assert_close("op final_state", &s_ref, &got["final_state"], 1e-5);
    let zero_ws = Tensor::zeros((b, h, p, n), DType::F64, &Device::Cpu).unwrap();
    let want = grads(&recurrent, &x64, true, &files["dO"].to_dtype(DType::F64).unwrap(), &zero_ws);
    for (j, name) in NAMES.iter().enumerate() {
        assert_close(&format!("grad_{name}"), &want[j], &got[&format!("grad_{name}")], 1e-4);
    }
    assert!(!got.contains_key("grad_dO"));
    files.remove("initial_state");
    let (code, _, err) = run(&files);
    assert_eq!(code, 0, "{err}");
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert!(!got.contains_key("grad_initial_state"));
    assert_close("op y without state", &reference(&x64, false).0, &got["y"], 1e-5);
    files.insert("A".to_string(), Tensor::zeros(h + 1, DType::F32, &Device::Cpu).unwrap());
    let (code, _, err) = run(&files);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("ssd: expected"), "{err}");
}

/// Fused CPU kernel == plain f64 loop (f64 to 1e-12, f32 to 1e-4) and == the composed chunked
/// form in f32 (1e-4), outputs and final states, for [`SHAPES`] (groups shared by several heads,
/// T not a multiple of the checkpoint segment) with and without an initial state.
#[test]
fn ssd_fused_matches_reference_and_chunked() {
    for (i, shape) in SHAPES.into_iter().enumerate() {
        for init in [false, true] {
            let name = format!("{shape:?}_init{init}");
            let x = inputs(shape, 800 + i as u64);
            let (y_ref, s_ref) = reference(&x, init);
            let (y, s) = fused(&x, init);
            assert_close(&format!("fused y {name}"), &y_ref, &y, 1e-12);
            assert_close(&format!("fused state {name}"), &s_ref, &s, 1e-12);
            let (y32, s32) = fused(&f32s(&x), init);
            assert_eq!((y32.dtype(), s32.dtype()), (DType::F32, DType::F32));
            assert_close(&format!("fused f32 y {name}"), &y_ref, &y32, 1e-4);
            assert_close(&format!("fused f32 state {name}"), &s_ref, &s32, 1e-4);
            let (yc, sc) = chunked(16)(&f32s(&x), init);
            assert_close(&format!("fused vs chunked f32 y {name}"), &yc, &y32, 1e-4);
            assert_close(&format!("fused vs chunked f32 state {name}"), &sc, &s32, 1e-4);
        }
    }
}

/// Gradients of the fused kernel w.r.t. x, dt, A, Bm, Cm and initial_state == autograd through
/// the token loop (f64 to 1e-10, fused f32 to 1e-4) and == the chunked form in f32 (1e-4). The
/// last two shapes cover the blocked token steps: partial 16-column blocks, and P, N > 64 (more
/// than one register group of the AVX-512 form).
#[test]
fn ssd_fused_grads_match_recurrent_and_chunked() {
    for (i, shape) in [(2, 1, 2, 3, 1, 4), (2, 37, 4, 3, 2, 5), (1, 40, 3, 4, 3, 2), (1, 40, 2, 20, 1, 35), (1, 20, 1, 70, 1, 70)].into_iter().enumerate() {
        let (b, t, h, p, _, n) = shape;
        let x = inputs(shape, 900 + i as u64);
        let wy = rand_tensor(&[b, t, h, p], 1.0, 41);
        let ws = rand_tensor(&[b, h, p, n], 1.0, 42);
        for init in [false, true] {
            let want = grads(&recurrent, &x, init, &wy, &ws);
            let got = grads(&fused, &x, init, &wy, &ws);
            let got32 = grads(&fused, &f32s(&x), init, &wy, &ws);
            let chunk32 = grads(&chunked(16), &f32s(&x), init, &wy, &ws);
            for (j, w) in want.iter().enumerate() {
                let name = format!("fused d{} {shape:?}_init{init}", NAMES[j]);
                assert_close(&format!("{name} f64"), w, &got[j], 1e-10);
                assert_close(&format!("{name} f32"), w, &got32[j], 1e-4);
                assert_close(&format!("{name} f32 vs chunked f32"), &chunk32[j], &got32[j], 1e-4);
            }
        }
    }
}

/// Finite differences of the fused kernel in f64: two groups of two heads, T = 19 (two
/// checkpoint segments).
#[test]
fn ssd_fused_grads_match_finite_differences() {
    let x = inputs((1, 19, 4, 2, 2, 3), 910);
    let vars: Vec<(String, Var)> = x.iter().enumerate().map(|(i, t)| (NAMES[i].to_string(), Var::from_tensor(t).unwrap())).collect();
    let wy = rand_tensor(&[1, 19, 4, 2], 1.0, 43);
    let ws = rand_tensor(&[1, 4, 2, 3], 1.0, 44);
    let loss = || {
        let t: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
        let (y, s) = ssd_fused(&t[0], &t[1], &t[2], &t[3], &t[4], Some(&t[5])).unwrap();
        ((y * &wy).unwrap().sum_all().unwrap() + (s * &ws).unwrap().sum_all().unwrap()).unwrap()
    };
    check_grads("ssd_fused", &vars, &loss, 20);
}

/// The training dispatcher uses the composed chunked form for bf16, and `ssd_fused` refuses it.
#[test]
fn ssd_train_dispatch_falls_back_for_bf16() {
    let x = inputs((1, 9, 2, 3, 1, 4), 920);
    let bf: Vec<Tensor> = x.iter().map(|t| t.to_dtype(DType::BF16).unwrap()).collect();
    assert!(!ssd_fused::supported(&bf[0], &bf[1], &bf[2], &bf[3], &bf[4], Some(&bf[5])));
    assert!(ssd_fused(&bf[0], &bf[1], &bf[2], &bf[3], &bf[4], Some(&bf[5])).is_err());
    let (y, _) = ssd_fused::ssd_train(&bf[0], &bf[1], &bf[2], &bf[3], &bf[4], Some(&bf[5]), 4, true).unwrap();
    let (yc, _) = ssd_chunked(&bf[0], &bf[1], &bf[2], &bf[3], &bf[4], Some(&bf[5]), 4).unwrap();
    assert_close("bf16 dispatch y", &yc, &y, 0.0);
}
