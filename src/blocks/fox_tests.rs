//! Tests of the FoX layer: parallel == decode form, finite-difference gradients of every
//! parameter, and the no-forgetting limit equals the attention layer.

use super::*;
use crate::blocks::attention::{Attention, AttentionConfig};
use crate::model::params::ParamStore;
use crate::testing::{assert_close, check_block_grads, rand_tensor};
use candle_core::{DType, Device};

fn dims(d: usize, t: usize) -> BlockDims {
    BlockDims { d_model: d, max_seq_len: t, n_layers: 2, layer_idx: 0, init_std: 0.3, out_std: 0.3 }
}

fn build(cfg: &FoxConfig, d: usize, t: usize, store: &mut ParamStore) -> Fox {
    let mut pb = ParamBuilder::new(store, 7, DType::F64, &Device::Cpu);
    Fox::new(cfg, &dims(d, t), &mut pb).unwrap()
}

fn pro(num_kv_heads: Option<usize>) -> FoxConfig {
    FoxConfig {
        num_heads: 4,
        num_kv_heads,
        head_dim: Some(6),
        qk_norm: true,
        use_output_gate: true,
        use_output_norm: true,
        use_k_shift: true,
        use_v_shift: true,
        ..Default::default()
    }
}

/// Parallel (fused op) == token-by-token decode (KV cache, cumulative gate, shift buffers), f64,
/// for plain FoX, FoX Pro with GQA, each Pro switch alone, and with RoPE.
#[test]
fn parallel_matches_step() {
    let base = FoxConfig { num_heads: 4, head_dim: Some(6), ..Default::default() };
    let mut cfgs = vec![base.clone(), pro(Some(2)), FoxConfig { use_rope: true, ..pro(None) }];
    cfgs.push(FoxConfig { qk_norm: true, ..base.clone() });
    cfgs.push(FoxConfig { use_output_gate: true, ..base.clone() });
    cfgs.push(FoxConfig { use_output_norm: true, ..base.clone() });
    cfgs.push(FoxConfig { use_k_shift: true, ..base.clone() });
    cfgs.push(FoxConfig { use_v_shift: true, ..base.clone() });
    for cfg in cfgs {
        let mut store = ParamStore::default();
        let f = build(&cfg, 12, 13, &mut store);
        let x = rand_tensor(&[2, 13, 12], 1.0, 3);
        let par = f.forward(&x, &mut ForwardCtx::default()).unwrap();
        let mut cache = FoxCache::default();
        let steps: Vec<Tensor> = (0..13).map(|i| f.step(&x.narrow(1, i, 1).unwrap().squeeze(1).unwrap(), &mut cache).unwrap()).collect();
        assert_close(&format!("fox parallel vs step {cfg:?}"), &par, &Tensor::stack(&steps, 1).unwrap(), 1e-12);
    }
}

/// Every parameter of FoX Pro (GQA) and of plain FoX gets the finite-difference gradient.
#[test]
fn gradients_match_finite_differences() {
    for cfg in [pro(Some(1)), FoxConfig { num_heads: 2, ..Default::default() }] {
        let cfg = FoxConfig { num_heads: 2, head_dim: Some(4), ..cfg };
        let mut store = ParamStore::default();
        let f = build(&cfg, 8, 5, &mut store);
        check_block_grads(&f, &store, &[2, 5, 8]);
    }
}

/// With the forget gate pinned at 1 (bias 40: log σ(40) ≈ −4e−18) and RoPE on, FoX is the
/// attention layer with the same weights (same parameter names, same seed).
#[test]
fn no_forgetting_is_attention() {
    let (d, t) = (16, 17);
    let fcfg = FoxConfig { num_heads: 4, num_kv_heads: Some(2), use_rope: true, rope_theta: 10000.0, fgate_bias_init: 40.0, ..Default::default() };
    let acfg = AttentionConfig { num_heads: 4, num_kv_heads: Some(2), rope_theta: 10000.0, ..Default::default() };
    let (mut s1, mut s2) = (ParamStore::default(), ParamStore::default());
    let f = build(&fcfg, d, t, &mut s1);
    let a = Attention::new(&acfg, &dims(d, t), &mut ParamBuilder::new(&mut s2, 7, DType::F64, &Device::Cpu)).unwrap();
    let x = rand_tensor(&[2, t, d], 1.0, 4);
    let want = a.forward(&x, &mut ForwardCtx::default()).unwrap();
    assert_close("fox(f = 1) vs attention", &want, &f.forward(&x, &mut ForwardCtx::default()).unwrap(), 1e-12);
    // And with the reference's zero bias the gate forgets: the outputs differ.
    let mut s3 = ParamStore::default();
    let f0 = build(&FoxConfig { fgate_bias_init: 0.0, ..fcfg }, d, t, &mut s3);
    let diff = (want - f0.forward(&x, &mut ForwardCtx::default()).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    assert!(diff > 1e-3, "f ≈ 0.5 must change the output; max diff {diff:e}");
}

/// Parameter shapes, init values and weight-decay flags of the Pro block.
#[test]
fn pro_parameters_and_init() {
    let mut store = ParamStore::default();
    let cfg = pro(Some(2));
    let _ = build(&cfg, 12, 4, &mut store);
    let shape = |n: &str| store.params[n].var.dims().to_vec();
    assert_eq!(shape("wf"), [12, 4]);
    assert_eq!(shape("bf"), [4]);
    assert_eq!(shape("wks"), [12, 2]);
    assert_eq!(shape("wvs"), [12, 2]);
    assert_eq!(shape("wog"), [12, 24]);
    assert_eq!(shape("q_norm"), [4, 6]);
    assert_eq!(shape("k_norm"), [2, 6]);
    assert_eq!(shape("o_norm"), [4, 6]);
    assert!(crate::testing::to_vec(store.params["bf"].var.as_tensor()).iter().all(|b| *b == 0.0));
    for n in ["bf", "q_norm", "k_norm", "o_norm"] {
        assert!(!store.params[n].decay, "{n} must not be weight-decayed");
    }
    assert!(store.params["wf"].decay && store.params["wks"].decay);
    let mut plain = ParamStore::default();
    let _ = build(&FoxConfig::default(), 12, 4, &mut plain);
    let names: Vec<&str> = plain.params.keys().map(|s| s.as_str()).collect();
    assert_eq!(names, ["bf", "wf", "wk", "wo", "wq", "wv"]);
}
