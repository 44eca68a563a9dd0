use crate::util::{mixscale, tempdir};
use candle_core::{DType, Device, Tensor, Var};
use mixscale::ops::rwkv7::{rwkv7_chunked, rwkv7_recurrent, rwkv7_reference, rwkv7_step};
use mixscale::ops::rwkv7_fused::{self, rwkv7_fused};
use mixscale::testing::{assert_close, check_grads, rand_tensor, to_vec};
use std::collections::HashMap;

const NAMES: [&str; 7] = ["r", "w", "k", "v", "a", "b", "initial_state"];

/// Inputs as the RWKV-7 layer produces them: w = exp(−e^{−½}·σ(z)) ∈ (0.545, 1) (or, with
/// `strong`, w = exp(−20·σ(z)) down to e^{−20}), a = −kk, b = kk ⊙ σ(·) with kk L2-normalised per
/// head, r, k, v Gaussian, plus a random initial state. All f64, order of [`NAMES`].
fn inputs(b: usize, t: usize, h: usize, dk: usize, dv: usize, seed: u64, strong: bool) -> Vec<Tensor> {
    let sig = |x: Tensor| (x.neg().unwrap().exp().unwrap() + 1.0).unwrap().recip().unwrap();
    let r = rand_tensor(&[b, t, h, dk], 1.0, seed);
    let scale = if strong { 20.0 } else { (-0.5f64).exp() };
    let w = (sig(rand_tensor(&[b, t, h, dk], 2.0, seed + 1)) * -scale).unwrap().exp().unwrap();
    let k = rand_tensor(&[b, t, h, dk], 1.0, seed + 2);
    let v = rand_tensor(&[b, t, h, dv], 1.0, seed + 3);
    let kk = rand_tensor(&[b, t, h, dk], 1.0, seed + 4);
    let kk = kk.broadcast_div(&kk.sqr().unwrap().sum_keepdim(3).unwrap().sqrt().unwrap()).unwrap();
    let lr = sig(rand_tensor(&[b, t, h, dk], 1.5, seed + 5));
    let s0 = rand_tensor(&[b, h, dv, dk], 0.5, seed + 6);
    vec![r, w, k, v, kk.neg().unwrap(), (kk * lr).unwrap(), s0]
}

type Form = dyn Fn(&[Tensor], bool) -> (Tensor, Tensor);

fn chunked(chunk: usize) -> impl Fn(&[Tensor], bool) -> (Tensor, Tensor) {
    move |x: &[Tensor], init: bool| rwkv7_chunked(&x[0], &x[1], &x[2], &x[3], &x[4], &x[5], init.then_some(&x[6]), chunk).unwrap()
}

fn fused(x: &[Tensor], init: bool) -> (Tensor, Tensor) {
    rwkv7_fused(&x[0], &x[1], &x[2], &x[3], &x[4], &x[5], init.then_some(&x[6])).unwrap()
}

fn recurrent(x: &[Tensor], init: bool) -> (Tensor, Tensor) {
    rwkv7_recurrent(&x[0], &x[1], &x[2], &x[3], &x[4], &x[5], init.then_some(&x[6])).unwrap()
}

/// The step form driven by hand (state threaded by the caller, zero state when `!init`).
fn stepped(x: &[Tensor], init: bool) -> (Tensor, Tensor) {
    let (b, t, h, dk) = x[0].dims4().unwrap();
    let dv = x[3].dim(3).unwrap();
    let mut s = if init { x[6].clone() } else { Tensor::zeros((b, h, dv, dk), x[0].dtype(), &Device::Cpu).unwrap() };
    let mut os = Vec::new();
    for i in 0..t {
        let at = |j: usize| x[j].narrow(1, i, 1).unwrap().squeeze(1).unwrap();
        let (o, s2) = rwkv7_step(&at(0), &at(1), &at(2), &at(3), &at(4), &at(5), &s).unwrap();
        os.push(o);
        s = s2;
    }
    (Tensor::stack(&os, 1).unwrap(), s)
}

fn reference(x: &[Tensor], init: bool) -> (Tensor, Tensor) {
    let (b, t, h, dk) = x[0].dims4().unwrap();
    let dv = x[3].dim(3).unwrap();
    let v: Vec<Vec<f64>> = x.iter().map(to_vec).collect();
    let (o, s) = rwkv7_reference(&v[0], &v[1], &v[2], &v[3], &v[4], &v[5], init.then_some(&v[6][..]), (b, t, h, dk, dv));
    (Tensor::from_vec(o, (b, t, h, dv), &Device::Cpu).unwrap(), Tensor::from_vec(s, (b, h, dv, dk), &Device::Cpu).unwrap())
}

/// Gradients of `sum(o·wo) + sum(final_state·ws)` w.r.t. every input (initial_state when used).
fn grads(f: &Form, x: &[Tensor], init: bool, wo: &Tensor, ws: &Tensor) -> Vec<Tensor> {
    let vars: Vec<Var> = x.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (o, s) = f(&ts, init);
    let dt = x[0].dtype();
    let loss = ((o * wo.to_dtype(dt).unwrap()).unwrap().sum_all().unwrap()
        + (s.to_dtype(dt).unwrap() * ws.to_dtype(dt).unwrap()).unwrap().sum_all().unwrap())
    .unwrap();
    let g = loss.backward().unwrap();
    let n = if init { 7 } else { 6 };
    vars[..n].iter().map(|v| g.get(v.as_tensor()).expect("missing gradient").clone()).collect()
}

fn f32s(x: &[Tensor]) -> Vec<Tensor> {
    x.iter().map(|t| t.to_dtype(DType::F32).unwrap()).collect()
}

/// chunked == recurrent == step == plain f64 loop (outputs, final states): f64 to 1e-10
/// (recurrent/step to 1e-12), f32 to 1e-4; T = 1, 23, 32, 45, 70 with chunks 4, 16 and 64 (T not
/// a multiple of the chunk, T shorter than the chunk, a full 64-chunk), with and without an
/// initial state, key and value dims that differ and are not powers of two.
#[test]
fn rwkv7_op_forms_agree_forward() {
    for chunk in [4, 16, 64] {
        for (i, t) in [1usize, 23, 32, 45, 70].into_iter().enumerate() {
            for strong in [false, true] {
                let init = i % 2 == 1 || t >= 45;
                let (b, h, dk, dv) = (2, 3, 6, 5);
                let name = format!("t{t}_c{chunk}_init{init}_strong{strong}");
                let x = inputs(b, t, h, dk, dv, 100 + t as u64, strong);
                let (o_ref, s_ref) = reference(&x, init);
                let (o_rec, s_rec) = recurrent(&x, init);
                assert_close(&format!("recurrent o {name}"), &o_ref, &o_rec, 1e-12);
                assert_close(&format!("recurrent state {name}"), &s_ref, &s_rec, 1e-12);
                let (o_st, s_st) = stepped(&x, init);
                assert_close(&format!("step o {name}"), &o_ref, &o_st, 1e-12);
                assert_close(&format!("step state {name}"), &s_ref, &s_st, 1e-12);
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
}

/// Gradients w.r.t. r, w, k, v, a, b and initial_state: chunked (f64 to 1e-10, f32 to 1e-4) and
/// the step loop (1e-12) against autograd through the recurrent form, strong decay included
/// (w down to e^−20: dw = (d/d ln w)/w would amplify any cancellation in d/d ln w by 1/w).
#[test]
fn rwkv7_op_forms_agree_gradients() {
    for (t, chunk, strong) in [(1usize, 16usize, false), (23, 4, false), (32, 16, true), (45, 16, false), (45, 64, true)] {
        let (b, h, dk, dv) = (2, 2, 6, 5);
        let x = inputs(b, t, h, dk, dv, 200 + t as u64, strong);
        let wo = rand_tensor(&[b, t, h, dv], 1.0, 7);
        let ws = rand_tensor(&[b, h, dv, dk], 1.0, 8);
        for init in [false, true] {
            let want = grads(&recurrent, &x, init, &wo, &ws);
            let step = grads(&stepped, &x, init, &wo, &ws);
            let got = grads(&chunked(chunk), &x, init, &wo, &ws);
            let got32 = grads(&chunked(chunk), &f32s(&x), init, &wo, &ws);
            for (j, w) in want.iter().enumerate() {
                let name = format!("d{} t{t}_c{chunk}_init{init}_strong{strong}", NAMES[j]);
                assert_close(&format!("{name} step"), w, &step[j], 1e-12);
                assert_close(&format!("{name} f64"), w, &got[j], 1e-10);
                assert_close(&format!("{name} f32"), w, &got32[j], 1e-4);
            }
        }
    }
}

/// Finite differences of the chunked form in f64 (two chunks plus padding), every input.
#[test]
fn rwkv7_op_chunked_grads_match_finite_differences() {
    let x = inputs(1, 7, 2, 3, 2, 300, false);
    let vars: Vec<(String, Var)> = x.iter().enumerate().map(|(i, t)| (NAMES[i].to_string(), Var::from_tensor(t).unwrap())).collect();
    let wo = rand_tensor(&[1, 7, 2, 2], 1.0, 9);
    let ws = rand_tensor(&[1, 2, 2, 3], 1.0, 10);
    let loss = || {
        let t: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
        let (o, s) = rwkv7_chunked(&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], Some(&t[6]), 4).unwrap();
        ((o * &wo).unwrap().sum_all().unwrap() + (s * &ws).unwrap().sum_all().unwrap()).unwrap()
    };
    check_grads("rwkv7_chunked", &vars, &loss, 20);
}

fn run_cli(files: &HashMap<String, Tensor>) -> (i32, String, HashMap<String, Tensor>) {
    let dir = tempdir();
    let inp = dir.path().join("in.safetensors");
    let out = dir.path().join("out.safetensors");
    candle_core::safetensors::save(files, &inp).unwrap();
    let (code, _, err) = mixscale(&["op", "rwkv7", "--inputs", inp.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let got = if code == 0 { candle_core::safetensors::load(&out, &Device::Cpu).unwrap() } else { HashMap::new() };
    (code, err, got)
}

/// `mixscale op rwkv7` writes o, final_state and the gradients of sum(o·dO) for every float
/// input (initial_state included when given); a wrong shape is a clear error.
#[test]
fn rwkv7_op_cli_roundtrip_with_gradients() {
    let (b, t, h, dk, dv) = (2, 21, 2, 6, 5);
    let x = inputs(b, t, h, dk, dv, 500, false);
    let d_o = rand_tensor(&[b, t, h, dv], 1.0, 13);
    let mut files: HashMap<String, Tensor> = NAMES.iter().enumerate().map(|(i, n)| (n.to_string(), x[i].to_dtype(DType::F32).unwrap())).collect();
    files.insert("dO".to_string(), d_o.to_dtype(DType::F32).unwrap());
    let (code, err, got) = run_cli(&files);
    assert_eq!(code, 0, "{err}");
    // The reference sees the same f32-rounded inputs, in f64.
    let x64: Vec<Tensor> = NAMES.iter().map(|n| files[*n].to_dtype(DType::F64).unwrap()).collect();
    let (o_ref, s_ref) = reference(&x64, true);
    assert_close("op o", &o_ref, &got["o"], 1e-5);
    assert_close("op final_state", &s_ref, &got["final_state"], 1e-5);
    let zero_ws = Tensor::zeros((b, h, dv, dk), DType::F64, &Device::Cpu).unwrap();
    let want = grads(&recurrent, &x64, true, &files["dO"].to_dtype(DType::F64).unwrap(), &zero_ws);
    for (j, n) in NAMES.iter().enumerate() {
        assert_close(&format!("grad_{n}"), &want[j], &got[&format!("grad_{n}")], 1e-4);
    }
    files.remove("initial_state");
    let (code, err, got) = run_cli(&files);
    assert_eq!(code, 0, "{err}");
    assert!(!got.contains_key("grad_initial_state"));
    assert_close("op o without state", &reference(&x64, false).0, &got["o"], 1e-5);
    files.insert("a".to_string(), Tensor::zeros((b, t, h, dk + 1), DType::F32, &Device::Cpu).unwrap());
    let (code, err, _) = run_cli(&files);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("rwkv7: expected"), "{err}");
}

fn golden(name: &str) -> HashMap<String, Tensor> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The op against fla-core's `dplr_recurrence` (torch, fp32; made by tests/golden/make_rwkv7.py,
/// which also cross-checks it against BlinkDL's numpy WKV line): outputs, final state and the
/// gradients of sum(o·dO) for every input, chunked form in f64 and f32 (chunks 4 and 16), the
/// fused CPU kernel in f64 and f32, and the recurrent form; with and without initial state, T not a multiple of the chunk.
#[test]
fn rwkv7_op_matches_fla_golden() {
    let g = golden("rwkv7_op.safetensors");
    for case in ["state_t21", "nostate_t9", "strong_t19"] {
        let get = |n: &str| g.get(&format!("{case}.{n}")).cloned();
        let init = get("initial_state").is_some();
        let mut x: Vec<Tensor> = NAMES[..6].iter().map(|n| get(n).unwrap().to_dtype(DType::F64).unwrap()).collect();
        let (b, _, h, dk) = x[0].dims4().unwrap();
        let dv = x[3].dim(3).unwrap();
        x.push(get("initial_state").map(|s| s.to_dtype(DType::F64).unwrap()).unwrap_or_else(|| Tensor::zeros((b, h, dv, dk), DType::F64, &Device::Cpu).unwrap()));
        let d_o = get("dO").unwrap().to_dtype(DType::F64).unwrap();
        let zero_ws = Tensor::zeros((b, h, dv, dk), DType::F64, &Device::Cpu).unwrap();
        let forms: [(&str, Box<Form>, bool); 6] = [
            ("recurrent f64", Box::new(recurrent), false),
            ("chunked4 f64", Box::new(chunked(4)), false),
            ("chunked16 f64", Box::new(chunked(16)), false),
            ("chunked16 f32", Box::new(chunked(16)), true),
            ("fused f64", Box::new(fused), false),
            ("fused f32", Box::new(fused), true),
        ];
        for (fname, f, f32) in forms {
            let xin = if f32 { f32s(&x) } else { x.clone() };
            let (o, s) = f(&xin, init);
            assert_close(&format!("{case} {fname} o"), &get("o").unwrap(), &o, 1e-5);
            assert_close(&format!("{case} {fname} final_state"), &get("final_state").unwrap(), &s, 1e-5);
            let gr = grads(f.as_ref(), &xin, init, &d_o, &zero_ws);
            for (j, gj) in gr.iter().enumerate() {
                assert_close(&format!("{case} {fname} grad_{}", NAMES[j]), &get(&format!("grad_{}", NAMES[j])).unwrap(), gj, 1e-4);
            }
        }
    }
}

fn set_params(store: &mixscale::model::params::ParamStore, g: &HashMap<String, Tensor>, prefix: &str, from: &str) {
    let mut n = 0;
    for (name, p) in &store.params {
        let Some(rest) = name.strip_prefix(prefix) else { continue };
        let t = g.get(&format!("{from}{rest}")).unwrap_or_else(|| panic!("golden lacks {from}{rest}"));
        assert_eq!(t.dims(), p.var.dims(), "{name}");
        p.var.set(t).unwrap();
        n += 1;
    }
    assert!(n > 0, "no parameters under {prefix}");
}

/// Two time-mix layers (layer 0 sets v_first, layer 1 uses it) and the channel-mix against
/// BlinkDL's `rwkv_v7_numpy.py` `time_mixing` / `channel_mixing` run token by token (f64,
/// random parameters), through the chunked form.
#[test]
fn rwkv7_layer_and_channel_mix_match_blinkdl_numpy_golden() {
    use mixscale::blocks::rwkv7::{Rwkv7, Rwkv7Config};
    use mixscale::blocks::{BlockDims, ForwardCtx, Mixer};
    use mixscale::config::model::FfnKind;
    use mixscale::model::ffn::Ffn;
    use mixscale::model::params::{ParamBuilder, ParamStore};
    let g = golden("rwkv7_layer.safetensors");
    let cfg = Rwkv7Config { head_size: 4, decay_low_rank_dim: Some(4), a_low_rank_dim: Some(3), v_low_rank_dim: Some(2), gate_low_rank_dim: Some(5), chunk_size: 4, ..Default::default() };
    let mut store = ParamStore::default();
    let mut pb = ParamBuilder::new(&mut store, 1, DType::F64, &Device::Cpu);
    let mut layers = Vec::new();
    for i in 0..2 {
        let dims = BlockDims { d_model: 8, max_seq_len: 16, n_layers: 2, layer_idx: i, init_std: 0.02, out_std: 0.02 };
        layers.push(Rwkv7::new(&cfg, &dims, &mut pb.pp(format!("layers.{i}"))).unwrap());
    }
    let ffn = Ffn::new_at(FfnKind::Rwkv7Cmix, 8, 12, 0.02, 0.02, (0, 2), &mut pb.pp("cmix")).unwrap();
    set_params(&store, &g, "layers.", "layers.");
    set_params(&store, &g, "cmix.", "cmix.");
    let x = &g["x"];
    let mut ctx = ForwardCtx::default();
    let y0 = layers[0].forward(x, &mut ctx).unwrap();
    let y1 = layers[1].forward(x, &mut ctx).unwrap();
    assert_close("layer 0 vs numpy", &g["y0"], &y0, 1e-10);
    assert_close("layer 1 (value residual) vs numpy", &g["y1"], &y1, 1e-10);
    assert_close("channel-mix vs numpy", &g["cmix_y"], &ffn.forward(x).unwrap(), 1e-12);
}

/// The RWKV-7 channel-mix FFN (token shift + squared ReLU) against finite differences, off its
/// zero init (W_down = 0 at init).
#[test]
fn rwkv7_channel_mix_grads_match_finite_differences() {
    use mixscale::config::model::FfnKind;
    use mixscale::model::ffn::Ffn;
    use mixscale::model::params::{ParamBuilder, ParamStore};
    let mut store = ParamStore::default();
    let mut pb = ParamBuilder::new(&mut store, 1, DType::F64, &Device::Cpu);
    let ffn = Ffn::new_at(FfnKind::Rwkv7Cmix, 6, 10, 0.5, 0.5, (1, 3), &mut pb).unwrap();
    assert_eq!(store.params.len(), 3);
    for (i, p) in store.params.values().enumerate() {
        let t = p.var.as_tensor();
        p.var.set(&(t + rand_tensor(t.dims(), 0.5, 30 + i as u64)).unwrap()).unwrap();
    }
    assert!(!store.params["x_k"].decay && store.params["w_up"].decay && store.params["w_down"].decay);
    let x = Var::from_tensor(&rand_tensor(&[2, 4, 6], 1.0, 11)).unwrap();
    let w = rand_tensor(&[2, 4, 6], 1.0, 12);
    let mut vars: Vec<(String, Var)> = store.params.iter().map(|(k, p)| (k.clone(), p.var.clone())).collect();
    vars.push(("x".into(), x.clone()));
    let loss = || (ffn.forward(x.as_tensor()).unwrap() * &w).unwrap().sum_all().unwrap();
    check_grads("rwkv7_cmix", &vars, &loss, 20);
}

const TINY_RWKV: &str = "\
model:
  vocab_size: 32
  d_model: 8
  n_layers: 2
  layer_pattern: [rwkv7]
  blocks:
    rwkv7: {head_size: 4, decay_low_rank_dim: 3, a_low_rank_dim: 2, v_low_rank_dim: 2, gate_low_rank_dim: 3, chunk_size: 3}
  ffn: {kind: rwkv7_cmix, hidden_size: 12}
  tied_embeddings: false
train:
  seed: 3
  seq_len: 8
  batch_size: 2
  micro_batch_size: 2
  steps: 2
  optimizer: {lr: 0.01}
data:
  kind: synthetic_language
  vocab_size: 32
";

/// A 2-layer RWKV-7 model (v_first threaded from layer 0 into layer 1, channel-mix FFNs)
/// against finite differences, every parameter off its init.
#[test]
fn rwkv7_two_layer_model_grads_match_finite_differences() {
    let spec = crate::util::spec_from(TINY_RWKV, &[]).unwrap();
    let m = mixscale::model::LanguageModel::new(&spec.model, 8, 5, DType::F64, &Device::Cpu).unwrap();
    for (i, p) in m.params.params.values().enumerate() {
        let t = p.var.as_tensor();
        p.var.set(&(t + rand_tensor(t.dims(), 0.3, 90 + i as u64)).unwrap()).unwrap();
    }
    assert!(m.params.params.contains_key("layers.1.mixer.v1") && !m.params.params.contains_key("layers.0.mixer.v1"));
    let mut r = mixscale::data::rng::Rng::new(4);
    let mut tok = |n: usize| Tensor::from_vec((0..n).map(|_| r.below(32) as u32).collect::<Vec<_>>(), (2, n / 2), &Device::Cpu).unwrap();
    let (inp, tgt) = (tok(14), tok(14));
    let vars: Vec<(String, Var)> = m.params.params.iter().map(|(k, p)| (k.clone(), p.var.clone())).collect();
    let loss = || m.loss(&inp, &tgt).unwrap();
    check_grads("rwkv7 model", &vars, &loss, 4);
}

/// Fused CPU kernel == plain f64 loop (f64 to 1e-12, f32 to 1e-4) and == the composed chunked
/// form in f32 (1e-4), outputs and final states; T = 1, 16, 23, 45 (checkpoint segments of 16),
/// with and without an initial state, normal and strong decay.
#[test]
fn rwkv7_fused_matches_reference_and_chunked() {
    for (i, t) in [1usize, 16, 23, 45].into_iter().enumerate() {
        for init in [false, true] {
            let strong = i % 2 == 1;
            let (b, h, dk, dv) = (2, 2, 5, 3);
            let name = format!("t{t}_init{init}_strong{strong}");
            let x = inputs(b, t, h, dk, dv, 600 + t as u64, strong);
            let (o_ref, s_ref) = reference(&x, init);
            let (o, s) = fused(&x, init);
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

/// Gradients of the fused kernel w.r.t. r, w, k, v, a, b and initial_state == autograd through
/// the token loop (f64 to 1e-10, fused f32 to 1e-4) and == the chunked form in f32 (1e-4).
/// K = 4 and 37 (a masked last vector of the AVX-512 token steps) and 70 (beyond their 64
/// columns: the generic steps).
#[test]
fn rwkv7_fused_grads_match_recurrent_and_chunked() {
    for (t, strong, dk, dv) in [(1usize, false, 4usize, 3usize), (16, true, 4, 3), (37, false, 4, 3), (21, false, 37, 9), (18, true, 70, 5)] {
        let (b, h) = (2, 2);
        let x = inputs(b, t, h, dk, dv, 700 + t as u64, strong);
        let wo = rand_tensor(&[b, t, h, dv], 1.0, 31);
        let ws = rand_tensor(&[b, h, dv, dk], 1.0, 32);
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
fn rwkv7_fused_grads_match_finite_differences() {
    let x = inputs(1, 19, 2, 3, 2, 710, false);
    let vars: Vec<(String, Var)> = x.iter().enumerate().map(|(i, t)| (NAMES[i].to_string(), Var::from_tensor(t).unwrap())).collect();
    let wo = rand_tensor(&[1, 19, 2, 2], 1.0, 33);
    let ws = rand_tensor(&[1, 2, 2, 3], 1.0, 34);
    let loss = || {
        let t: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
        let (o, s) = rwkv7_fused(&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], Some(&t[6])).unwrap();
        ((o * &wo).unwrap().sum_all().unwrap() + (s * &ws).unwrap().sum_all().unwrap()).unwrap()
    };
    check_grads("rwkv7_fused", &vars, &loss, 20);
}

/// The training dispatcher uses the composed chunked form for bf16, and `rwkv7_fused` refuses it.
#[test]
fn rwkv7_train_dispatch_falls_back_for_bf16() {
    let x = inputs(1, 9, 2, 4, 4, 720, false);
    let bf: Vec<Tensor> = x.iter().map(|t| t.to_dtype(DType::BF16).unwrap()).collect();
    assert!(!rwkv7_fused::supported(&bf[0], &bf[1], &bf[2], &bf[3], &bf[4], &bf[5], Some(&bf[6])));
    assert!(rwkv7_fused(&bf[0], &bf[1], &bf[2], &bf[3], &bf[4], &bf[5], Some(&bf[6])).is_err());
    let (o, _) = rwkv7_fused::rwkv7_train(&bf[0], &bf[1], &bf[2], &bf[3], &bf[4], &bf[5], Some(&bf[6]), 4, true).unwrap();
    let (oc, _) = rwkv7_chunked(&bf[0], &bf[1], &bf[2], &bf[3], &bf[4], &bf[5], Some(&bf[6]), 4).unwrap();
    assert_close("bf16 dispatch o", &oc, &o, 0.0);
}
