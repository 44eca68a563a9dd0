use crate::util::{mixscale, tempdir};
use candle_core::{DType, Device, Tensor, Var};
use mixscale::ops::attn::attn_reference;
use mixscale::ops::moba::{moba, moba_composed, moba_reference};
use mixscale::ops::moba_fused::moba_fused;
use mixscale::testing::{assert_close, check_grads, rand_tensor, to_vec};
use std::collections::HashMap;

/// (B, T, Hq, Hkv, D, block_size, top_k): T not a multiple of the block, T = 1, GQA, a block
/// wider than the kernel's 64-column tile, top_k = 1 (own block only), many small blocks.
const SHAPES: [(usize, usize, usize, usize, usize, usize, usize); 7] = [
    (2, 37, 4, 2, 8, 5, 3),
    (1, 1, 2, 2, 4, 4, 2),
    (1, 130, 2, 2, 16, 16, 3),
    (1, 200, 2, 1, 8, 100, 2),
    (1, 150, 2, 2, 8, 70, 2),
    (2, 50, 3, 3, 4, 8, 1),
    (1, 300, 2, 2, 8, 4, 4),
];

fn f32s(x: &Tensor) -> Tensor {
    x.to_dtype(DType::F32).unwrap()
}

fn qkv(b: usize, t: usize, hq: usize, hkv: usize, d: usize, seed: u64) -> [Tensor; 3] {
    [rand_tensor(&[b, t, hq, d], 1.0, seed), rand_tensor(&[b, t, hkv, d], 1.0, seed + 1), rand_tensor(&[b, t, hkv, d], 1.0, seed + 2)]
}

fn reference(x: &[Tensor; 3], bs: usize, top_k: usize) -> Tensor {
    let (b, t, hq, d) = x[0].dims4().unwrap();
    let hkv = x[1].dim(2).unwrap();
    let o = moba_reference(&to_vec(&x[0]), &to_vec(&x[1]), &to_vec(&x[2]), b, t, hq, hkv, d, bs, top_k);
    Tensor::from_vec(o, (b, t, hq, d), &Device::Cpu).unwrap()
}

fn full_attention(x: &[Tensor; 3]) -> Tensor {
    let (b, t, hq, d) = x[0].dims4().unwrap();
    let hkv = x[1].dim(2).unwrap();
    Tensor::from_vec(attn_reference(&to_vec(&x[0]), &to_vec(&x[1]), &to_vec(&x[2]), b, t, hq, hkv, d), (b, t, hq, d), &Device::Cpu).unwrap()
}

/// Fused == composed == f64 reference, f64 to 1e-12 and f32 to 1e-5; and the sparsity is real:
/// wherever some query has more past blocks than top_k − 1, the output differs from full attention.
#[test]
fn moba_forms_match_reference() {
    for (b, t, hq, hkv, d, bs, k) in SHAPES {
        let name = format!("b{b}_t{t}_h{hq}_kv{hkv}_d{d}_bs{bs}_k{k}");
        let x = qkv(b, t, hq, hkv, d, 10);
        let want = reference(&x, bs, k);
        assert_close(&format!("moba fused f64 {name}"), &want, &moba_fused(&x[0], &x[1], &x[2], bs, k).unwrap(), 1e-12);
        assert_close(&format!("moba composed f64 {name}"), &want, &moba_composed(&x[0], &x[1], &x[2], bs, k).unwrap(), 1e-12);
        let x32 = x.clone().map(|t| f32s(&t));
        let o32 = moba(&x32[0], &x32[1], &x32[2], bs, k).unwrap();
        assert_eq!(o32.dtype(), DType::F32);
        assert_close(&format!("moba fused f32 {name}"), &want, &o32, 1e-5);
        assert_close(&format!("moba composed f32 {name}"), &want, &moba_composed(&x32[0], &x32[1], &x32[2], bs, k).unwrap(), 1e-5);
        let sparse = (t - 1) / bs >= k; // the last query has more past blocks than it may pick
        let gap = to_vec(&(&want - full_attention(&x)).unwrap()).iter().fold(0f64, |m, v| m.max(v.abs()));
        assert_eq!(gap > 1e-6, sparse, "{name}: max|moba − full| = {gap:e}");
    }
}

/// With top_k ≥ number of blocks every query sees its whole causal prefix: MoBA is full attention.
#[test]
fn moba_with_all_blocks_is_full_attention() {
    for (b, t, hq, hkv, d, bs, _) in SHAPES {
        let x = qkv(b, t, hq, hkv, d, 50);
        let want = full_attention(&x);
        let nb = t.div_ceil(bs);
        for k in [nb, nb + 3] {
            assert_close("moba(top_k >= blocks) fused", &want, &moba_fused(&x[0], &x[1], &x[2], bs, k).unwrap(), 1e-12);
            assert_close("moba(top_k >= blocks) composed", &want, &moba_composed(&x[0], &x[1], &x[2], bs, k).unwrap(), 1e-12);
        }
    }
}

/// A planted block: keys of block 2 are aligned with every query, so with top_k = 2 each query
/// from block 3 on attends to exactly its own block and block 2.
#[test]
fn moba_selects_the_best_matching_block() {
    let (t, d, bs) = (40, 4, 5);
    let dir = [1.0, 0.5, -0.5, 0.25];
    let mut qv = to_vec(&rand_tensor(&[1, t, 1, d], 0.1, 60));
    let mut kv = to_vec(&rand_tensor(&[1, t, 1, d], 0.1, 61));
    for i in 0..t {
        for x in 0..d {
            qv[i * d + x] += dir[x];
            if i / bs == 2 {
                kv[i * d + x] += 3.0 * dir[x];
            }
        }
    }
    let q = Tensor::from_vec(qv.clone(), (1, t, 1, d), &Device::Cpu).unwrap();
    let k = Tensor::from_vec(kv.clone(), (1, t, 1, d), &Device::Cpu).unwrap();
    let v = rand_tensor(&[1, t, 1, d], 1.0, 62);
    let o = moba_fused(&q, &k, &v, bs, 2).unwrap();
    // Explicit attention over the own block and the best past block (block 2 from block 3 on).
    let (vv, scale) = (to_vec(&v), 1.0 / (d as f64).sqrt());
    let mut want = vec![0.0; t * d];
    for i in 0..t {
        let c = i / bs;
        let best = (c > 0).then(|| best_of(&qv, &kv, i, d, bs, c));
        if c > 2 {
            assert_eq!(best, Some(2), "query {i}: the planted block must win");
        }
        let keys: Vec<usize> = (0..=i).filter(|&j| j / bs == c || Some(j / bs) == best).collect();
        let s: Vec<f64> = keys.iter().map(|&j| (0..d).map(|x| qv[i * d + x] * kv[j * d + x]).sum::<f64>() * scale).collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        for (&j, sj) in keys.iter().zip(&s) {
            for x in 0..d {
                want[i * d + x] += (sj - m).exp() / z * vv[j * d + x];
            }
        }
    }
    assert_close("planted block", &Tensor::from_vec(want, (1, t, 1, d), &Device::Cpu).unwrap(), &o, 1e-12);
}

/// The best of the fully past blocks `0..c` for query i by q·mean(k).
fn best_of(q: &[f64], k: &[f64], i: usize, d: usize, bs: usize, c: usize) -> usize {
    let score = |n: usize| (0..d).map(|x| q[i * d + x] * (n * bs..(n + 1) * bs).map(|j| k[j * d + x]).sum::<f64>()).sum::<f64>();
    (0..c).max_by(|&a, &b| score(a).partial_cmp(&score(b)).unwrap()).unwrap()
}

type Op = fn(&Tensor, &Tensor, &Tensor, usize, usize) -> candle_core::Result<Tensor>;

fn grads(f: Op, x: &[Tensor; 3], w: &Tensor, bs: usize, k: usize) -> Vec<Tensor> {
    let vars: Vec<Var> = x.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let o = f(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), bs, k).unwrap();
    let g = (o * w).unwrap().sum_all().unwrap().backward().unwrap();
    vars.iter().map(|v| g.get(v.as_tensor()).expect("missing gradient").clone()).collect()
}

fn close_or_zero(name: &str, reference: &Tensor, other: &Tensor, tol: f64) {
    if to_vec(reference).iter().all(|x| *x == 0.0) {
        let worst = to_vec(other).iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!(worst <= tol, "{name}: reference is zero, max|other| = {worst:e}");
    } else {
        assert_close(name, reference, other, tol);
    }
}

/// Fused backward == composed autograd: f64 to 1e-10, f32 to 1e-4.
#[test]
fn moba_fused_grads_match_composed() {
    for (b, t, hq, hkv, d, bs, k) in SHAPES {
        let x = qkv(b, t, hq, hkv, d, 20);
        let w = rand_tensor(&[b, t, hq, d], 1.0, 25);
        let want = grads(moba_composed, &x, &w, bs, k);
        let got = grads(moba_fused, &x, &w, bs, k);
        let got32 = grads(moba_fused, &x.clone().map(|t| f32s(&t)), &f32s(&w), bs, k);
        for (i, n) in ["dq", "dk", "dv"].iter().enumerate() {
            let name = format!("{n} b{b}_t{t}_h{hq}_kv{hkv}_d{d}_bs{bs}_k{k}");
            close_or_zero(&format!("{name} f64"), &want[i], &got[i], 1e-10);
            close_or_zero(&format!("{name} f32"), &want[i], &got32[i], 1e-4);
        }
    }
}

/// Finite differences of the fused op in f64 (the selection is locally constant: random data
/// has no near-ties, so ±1e-5 never flips it).
#[test]
fn moba_fused_grads_match_finite_differences() {
    for (b, t, hq, hkv, d, bs, k) in [(1, 23, 2, 1, 4, 4, 3), (1, 140, 1, 1, 4, 33, 2)] {
        let x = qkv(b, t, hq, hkv, d, 30);
        let vars: Vec<Var> = x.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let w = rand_tensor(&[b, t, hq, d], 1.0, 33);
        let loss = || (moba_fused(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), bs, k).unwrap() * &w).unwrap().sum_all().unwrap();
        let named: Vec<(String, Var)> = ["q", "k", "v"].iter().zip(&vars).map(|(n, v)| (n.to_string(), v.clone())).collect();
        check_grads(&format!("moba_fused t{t}"), &named, &loss, 30);
    }
}

/// `mixscale op moba` reads block_size / top_k as 0-d int64 tensors, writes o and grad_{q,k,v}.
#[test]
fn moba_op_cli_roundtrip_with_gradients() {
    let dir = tempdir();
    let (b, t, h, d, bs, k) = (2, 45, 2, 6, 8, 3);
    let x = qkv(b, t, h, h, d, 40);
    let d_o = f32s(&rand_tensor(&[b, t, h, d], 1.0, 45));
    let mut files = HashMap::new();
    for (n, v) in ["q", "k", "v"].iter().zip(&x) {
        files.insert(n.to_string(), f32s(v));
    }
    files.insert("dO".to_string(), d_o.clone());
    files.insert("block_size".to_string(), Tensor::new(bs as i64, &Device::Cpu).unwrap());
    files.insert("top_k".to_string(), Tensor::new(k as i64, &Device::Cpu).unwrap());
    let (inp, out) = (dir.path().join("in.safetensors"), dir.path().join("out.safetensors"));
    candle_core::safetensors::save(&files, &inp).unwrap();
    let (code, _, err) = mixscale(&["op", "moba", "--inputs", inp.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let x64 = ["q", "k", "v"].map(|n| files[n].to_dtype(DType::F64).unwrap());
    assert_close("moba op o", &reference(&x64, bs, k), &got["o"], 1e-5);
    let want = grads(moba_composed, &x64, &d_o.to_dtype(DType::F64).unwrap(), bs, k);
    for (i, n) in ["q", "k", "v"].iter().enumerate() {
        assert_close(&format!("moba op grad_{n}"), &want[i], &got[&format!("grad_{n}")], 1e-4);
    }
    assert!(!got.contains_key("grad_block_size") && !got.contains_key("grad_top_k"));
    files.insert("top_k".to_string(), Tensor::new(0i64, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&files, &inp).unwrap();
    let (code, _, err) = mixscale(&["op", "moba", "--inputs", inp.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("top_k") && err.contains(">= 1"), "{err}");
}

/// The golden fixtures of `tests/golden/make_moba.py` (port of MoBA's `moba_attn_varlen_naive`,
/// float32): our op through the op runner (fused f32) matches outputs to 1e-4 and gradients to
/// 1e-3 (ops.md), and our f64 loop matches the reference output to float32 accuracy.
#[test]
fn moba_matches_reference_golden_fixtures() {
    let fixtures = crate::fox::golden("moba_");
    assert!(fixtures.len() >= 4, "expected the moba_*.safetensors fixtures in tests/golden");
    for (name, f) in fixtures {
        let inputs: HashMap<String, Tensor> = ["q", "k", "v", "dO", "block_size", "top_k"].iter().map(|n| (n.to_string(), f[*n].clone())).collect();
        let got = mixscale::ops::run_op(mixscale::ops::find_op("moba").unwrap(), inputs).unwrap();
        assert_close(&format!("{name} o"), &f["o"], &got["o"], 1e-4);
        for n in ["q", "k", "v"] {
            close_or_zero(&format!("{name} grad_{n}"), &f[&format!("grad_{n}")], &got[&format!("grad_{n}")], 1e-3);
        }
        let attr = |n: &str| f[n].to_scalar::<i64>().unwrap() as usize;
        let x64 = ["q", "k", "v"].map(|n| f[n].to_dtype(DType::F64).unwrap());
        assert_close(&format!("{name} f64 loop vs reference"), &f["o"], &reference(&x64, attr("block_size"), attr("top_k")), 1e-5);
    }
}

/// A tiny hybrid of FoX Pro and MoBA layers (block 4, top-2 at seq_len 16: sparse) learns the
/// built-in language through the real training loop.
#[test]
fn tiny_fox_pro_and_moba_model_learns() {
    use mixscale::train::{train, Outcome};
    let yaml = crate::util::TINY.replace("layer_pattern: [attention]", "layer_pattern: [fox, moba]").replace(
        "    attention: {num_heads: 2}",
        "    fox: {num_heads: 2, qk_norm: true, use_output_gate: true, use_output_norm: true, use_k_shift: true, use_v_shift: true}\n    moba: {num_heads: 2, block_size: 4, top_k: 2}",
    );
    let spec = crate::util::spec_from(&yaml, &["train.steps=80", "train.optimizer.lr=0.03", "train.eval_every=20", "train.eval_sequences=8"]).unwrap();
    assert_eq!(spec.model.layer_pattern, ["fox", "moba"]);
    let dir = tempdir();
    let Outcome::Finished(s) = train(&spec, &crate::util::opts(dir.path())).unwrap() else { panic!("not finished") };
    let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    let first: f64 = csv.lines().nth(1).unwrap().split(',').nth(3).unwrap().parse().unwrap();
    let val = s.val_loss.unwrap();
    assert!(val < first - 0.3, "val {val} vs first train loss {first}");
}
