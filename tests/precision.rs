//! Mixed precision (`train.precision: bf16`): bf16 activations and matmuls, f32 master weights,
//! for every block kind, on the CPU (candle's CPU backend has bf16 kernels).
//!
//! Tolerances, from bf16's unit roundoff u = 2⁻⁹ ≈ 1.95e-3 (8 significand bits):
//! - one forward pass: logits within 16u ≈ 3.1e-2 of f32, relative to max|logit|. Each logit is
//!   a chain of ~10 bf16-rounded tensors (embedding, per layer: norm, projections, core output,
//!   output projection, FFN; final norm, head); rounding errors of independent ops add roughly
//!   as a random walk, so ~√10·u·(growth) ≈ 4–8u is typical; 16u leaves room for the
//!   cancellation in residual sums while a wrong or f32-skipped op (error O(1)) fails.
//!   A lower bound (> u/16) checks that bf16 is really used.
//! - gradients: each parameter's bf16 gradient within 0.15 relative L2 of the f32 one. The
//!   backward multiplies rounded activations by rounded incoming gradients through the whole
//!   depth, and small gradients (gates, decay parameters, norm gains) are sums over all positions
//!   with cancellation, which amplifies relative error; measured worst cases are 0.02-0.05
//!   (Mamba-2's D, GDN's A_log, RWKV-7's norm gain; the test prints each kind's worst next to
//!   the error of f32 compute with bf16-rounded weights), so 0.15 is ~3x headroom while a
//!   missing or mis-scaled term (error O(1)) fails. Before the attention cores computed P·V in
//!   f32, FoX Pro's forget-gate bias failed this bound (0.22): rounding dP = dO·Vᵀ to bf16
//!   ahead of the softmax backward's cancellation (see src/ops/attn.rs).
//! - losses over 6 AdamW steps: within 2% of the f32 run's loss at every step (measured: < 0.05%) (loss ≈ ln 64 ≈
//!   4.2: 2% ≈ 0.08 nats ≈ 40u relative). Forward error alone is a few u; after the first update
//!   the two runs' weights differ by O(lr·u)-relative amounts that Adam's normalised steps do not
//!   amplify in 6 steps. Both runs must also lower the loss.

use candle_core::{DType, Device, Tensor};
use mixscale::config::train::Precision;
use mixscale::config::RunSpec;
use mixscale::data::DataSource;
use mixscale::model::params::ParamKind;
use mixscale::model::{objective, LanguageModel};
use mixscale::testing::to_vec;
use mixscale::train::optim::AdamW;
use std::collections::BTreeMap;

const U: f64 = 1.0 / 512.0;

/// Every block kind (and option family) as overrides of the tiny attention config.
pub const KINDS: &[(&str, &[&str])] = &[
    ("attention", &["model.blocks.attention.qk_norm=true", "model.tied_embeddings=false"]),
    ("gated_deltanet", &["model.layer_pattern=[gated_deltanet]", "model.blocks={gated_deltanet: {num_heads: 2, chunk_size: 8}}"]),
    ("mamba2", &["model.layer_pattern=[mamba2]", "model.blocks={mamba2: {d_state: 8, headdim: 8, chunk_size: 8}}"]),
    ("rwkv7", &["model.layer_pattern=[rwkv7]", "model.blocks={rwkv7: {head_size: 8, chunk_size: 8}}", "model.ffn={kind: rwkv7_cmix, hidden_size: 32}"]),
    ("fox", &["model.layer_pattern=[fox]", "model.blocks={fox: {num_heads: 2}}"]),
    (
        "fox_pro",
        &["model.layer_pattern=[fox]", "model.blocks={fox: {num_heads: 2, use_rope: false, qk_norm: true, use_output_gate: true, use_output_norm: true, use_k_shift: true, use_v_shift: true}}"],
    ),
    ("moba", &["model.layer_pattern=[moba]", "model.blocks={moba: {num_heads: 2, block_size: 4, top_k: 2}}"]),
    ("moe", &["model.moe={num_experts: 4, top_k: 2, num_shared_experts: 1, expert_hidden_size: 16, z_loss_coef: 0.001, balance: {bias_update_rate: 0.01}}"]),
    ("mtp_gloeckle", &["model.mtp={kind: gloeckle, n: 2}"]),
    ("mtp_deepseek", &["model.mtp={kind: deepseek, depth: 1}"]),
];

/// The overrides of `kind` for gradient comparisons. MoBA's top-k block selection is
/// discontinuous: a near-tie of gating scores q·mean(k_block) flips under bf16 rounding of q, and
/// a query then attends to other keys (an O(1) change of its gradient, not a precision error).
/// Gradient comparisons therefore select every block (top_k = T / block_size: the selection code
/// still runs); the forward and training comparisons keep the sparse selection.
pub fn grad_sets(kind: &str, sets: &'static [&'static str]) -> Vec<&'static str> {
    match kind {
        "moba" => vec!["model.layer_pattern=[moba]", "model.blocks={moba: {num_heads: 2, block_size: 4, top_k: 4}}"],
        _ => sets.to_vec(),
    }
}

fn spec(sets: &[&str]) -> RunSpec {
    crate::util::spec_from(crate::util::TINY, sets).unwrap()
}

fn model(spec: &RunSpec, p: Precision) -> LanguageModel {
    LanguageModel::new_mixed(&spec.model, spec.train.seq_len, 5, DType::F32, p.compute_dtype(DType::F32), &Device::Cpu).unwrap()
}

/// Moves every master weight off its init by N(0, 0.05²) (same values for both precisions), so
/// that no gradient is zero for structural reasons (e.g. RWKV-7's channel-mix W_down = 0 at
/// init zeroes W_up's gradient).
fn perturb(m: &LanguageModel) {
    let mut r = mixscale::data::rng::Rng::new(11);
    for p in m.params.params.values().filter(|p| p.kind != ParamKind::Buffer) {
        let t = p.var.as_tensor();
        let noise: Vec<f32> = (0..t.elem_count()).map(|_| (0.05 * r.normal()) as f32).collect();
        let noise = Tensor::from_vec(noise, t.shape(), t.device()).unwrap();
        p.var.set(&(t.detach() + noise).unwrap()).unwrap();
    }
}

fn batch(spec: &RunSpec, at: u64) -> mixscale::data::Batch {
    let data = DataSource::new(&spec.data, spec.train.seed, spec.train.seq_len).unwrap();
    data.train_batch(at, 2, &Device::Cpu).unwrap()
}

fn copy(b: &mixscale::data::Batch) -> mixscale::data::Batch {
    mixscale::data::Batch { inputs: b.inputs.clone(), targets: b.targets.clone(), true_nlp: b.true_nlp.clone(), mask: b.mask.clone() }
}

/// Every `*.safetensors` under `dir`.
fn safetensors_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()) {
        let p = e.path();
        if p.is_dir() {
            out.extend(safetensors_under(&p));
        } else if p.extension().is_some_and(|x| x == "safetensors") {
            out.push(p);
        }
    }
    out
}

fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (to_vec(a), to_vec(b));
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = a.iter().map(|x| x * x).sum();
    (num / den.max(1e-300)).sqrt()
}

/// One forward pass: bf16 logits are bf16, within 16u of f32, and not identical to f32.
#[test]
fn bf16_forward_matches_f32_within_rounding_every_block() {
    for (kind, sets) in KINDS {
        let s = spec(sets);
        let (f, h) = (model(&s, Precision::F32), model(&s, Precision::Bf16));
        let b = batch(&s, 0);
        let lf = f.forward(&b.inputs).unwrap();
        let lh = h.forward(&b.inputs).unwrap();
        assert_eq!(lh.dtype(), DType::BF16, "{kind}: bf16 model computes in {:?}", lh.dtype());
        let (a, c) = (to_vec(&lf), to_vec(&lh));
        let scale = a.iter().fold(0f64, |m, x| m.max(x.abs()));
        let diff = a.iter().zip(&c).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale;
        eprintln!("{kind}: bf16 vs f32 logits max|diff|/max|ref| = {diff:.3e} ({:.1}u)", diff / U);
        assert!(diff <= 16.0 * U, "{kind}: bf16 logits differ by {diff:e} > 16u");
        assert!(diff > U / 16.0, "{kind}: bf16 logits equal f32 to {diff:e}: not computing in bf16?");
    }
}

/// Forward + backward of the whole training objective (MTP heads, MoE balancing losses included):
/// master weights and their gradients are f32, every gradient is finite and non-zero, and close
/// to the f32 model's.
#[test]
fn bf16_gradients_reach_f32_masters_every_block() {
    let mut failures = Vec::new();
    for (kind, sets) in KINDS {
        let s = spec(&grad_sets(kind, sets));
        let (f, h) = (model(&s, Precision::F32), model(&s, Precision::Bf16));
        perturb(&f);
        perturb(&h);
        let b = batch(&s, 4);
        let (mut gf, mut gh) = (BTreeMap::new(), BTreeMap::new());
        objective::begin_step(&f);
        objective::begin_step(&h);
        let of = objective::micro_grads(&f, &b, 1.0, &mut gf).unwrap();
        let oh = objective::micro_grads(&h, &b, 1.0, &mut gh).unwrap();
        // Conditioning yardstick (printed only): f32 compute with the masters rounded to bf16.
        let r = model(&s, Precision::F32);
        perturb(&r);
        for p in r.params.params.values() {
            p.var.set(&p.var.as_tensor().to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap()).unwrap();
        }
        let mut gr = BTreeMap::new();
        objective::begin_step(&r);
        objective::micro_grads(&r, &b, 1.0, &mut gr).unwrap();
        assert!((of.main - oh.main).abs() <= 16.0 * U * of.main, "{kind}: loss f32 {} bf16 {}", of.main, oh.main);
        let mut worst = (0.0, String::new());
        let mut bad = Vec::new();
        for (name, p) in h.params.params.iter().filter(|(_, p)| p.kind != ParamKind::Buffer) {
            assert_eq!(p.var.dtype(), DType::F32, "{kind}: master {name} is {:?}", p.var.dtype());
            let g = gh.get(name).unwrap_or_else(|| panic!("{kind}: {name} got no gradient in bf16"));
            assert_eq!(g.dtype(), DType::F32, "{kind}: gradient of {name} is {:?}", g.dtype());
            let v = to_vec(g);
            assert!(v.iter().all(|x| x.is_finite()), "{kind}: {name}: non-finite bf16 gradient");
            assert!(v.iter().any(|x| *x != 0.0), "{kind}: {name}: zero bf16 gradient");
            let e = rel_l2(&gf[name], g);
            if e > worst.0 {
                worst = (e, name.clone());
            }
            if e > 0.15 {
                bad.push(format!("{name}: {e:.3} (f32 with bf16-rounded weights alone: {:.3})", rel_l2(&gf[name], &gr[name])));
            }
        }
        assert_eq!(gf.len(), gh.len(), "{kind}: f32 and bf16 runs give gradients to different parameters");
        eprintln!("{kind}: worst gradient rel. L2 {:.3e} ({}; f32 with bf16-rounded weights: {:.3e})", worst.0, worst.1, rel_l2(&gf[&worst.1], &gr[&worst.1]));
        failures.extend(bad.into_iter().map(|b| format!("{kind}: {b}")));
    }
    assert!(failures.is_empty(), "bf16 gradients differ from f32 by > 0.15 relative L2:\n{}", failures.join("\n"));
}

/// Six AdamW steps from the same init on the same batches: bf16 losses track f32 within 2%,
/// both decrease; masters stay f32 and the forward pass sees the updated masters.
#[test]
fn bf16_training_tracks_f32_every_block() {
    for (kind, sets) in KINDS {
        let s = spec(sets);
        let run = |p: Precision| {
            let m = model(&s, p);
            let mut opt = AdamW::new(&s.train.optimizer, &m.params).unwrap();
            let mut losses = Vec::new();
            for step in 0..6u64 {
                let b = batch(&s, 2 * step);
                let (loss, grads, stats) = mixscale::train::compute_grads_with_stats(&m, 1, |_| Ok(copy(&b))).unwrap();
                opt.step(&m.params, &grads, 3e-3).unwrap();
                objective::after_step(&m, &stats).unwrap();
                losses.push(loss);
            }
            (m, losses)
        };
        let (_, lf) = run(Precision::F32);
        let (m, lh) = run(Precision::Bf16);
        eprintln!("{kind}: f32 {lf:.4?}\n{kind}: bf16 {lh:.4?}");
        for (i, (a, b)) in lf.iter().zip(&lh).enumerate() {
            assert!((a - b).abs() <= 0.02 * a, "{kind}: step {i}: bf16 loss {b} vs f32 {a}");
        }
        assert!(lf[5] < lf[0] && lh[5] < lh[0], "{kind}: no progress: f32 {lf:?} bf16 {lh:?}");
        // Masters are f32 and were updated; a forward pass refreshes the bf16 copies from them.
        let b = batch(&s, 0);
        m.forward(&b.inputs).unwrap();
        for (name, p) in m.params.params.iter().filter(|(_, p)| p.kind != ParamKind::Buffer) {
            assert_eq!(p.var.dtype(), DType::F32);
            let cast = m.params.cast_of(name).unwrap_or_else(|| panic!("{kind}: {name} has no bf16 copy"));
            let want = p.var.as_tensor().to_dtype(DType::BF16).unwrap();
            assert_eq!(to_vec(cast), to_vec(&want), "{kind}: bf16 copy of {name} is stale");
        }
    }
}

/// `train.precision: bf16` through `mixscale train`: recorded in config.yaml and summary.json,
/// checkpoint weights stay f32; the default (f32) keeps config.yaml free of the key.
#[test]
fn train_records_precision_and_saves_f32_masters() {
    let dir = crate::util::tempdir();
    let cfg = crate::util::write(dir.path(), "tiny.yaml", crate::util::TINY);
    let out = dir.path().join("run");
    let (code, stdout, stderr) = crate::util::mixscale(&[
        "train",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
        "--precision",
        "bf16",
        "--set",
        "train.steps=3",
    ]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let config = std::fs::read_to_string(out.join("config.yaml")).unwrap();
    assert!(config.contains("precision: bf16"), "{config}");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["precision"], "bf16");
    assert_eq!(summary["status"], "completed");
    let mut saw = false;
    for w in safetensors_under(&out) {
        for (name, t) in candle_core::safetensors::load(&w, &Device::Cpu).unwrap() {
            assert_eq!(t.dtype(), DType::F32, "{}: {name} saved as {:?}", w.display(), t.dtype());
            saw = true;
        }
    }
    assert!(saw, "no safetensors checkpoint found in {}", out.display());

    let out32 = dir.path().join("run32");
    let (code, _, stderr) = crate::util::mixscale(&["train", cfg.to_str().unwrap(), "--out", out32.to_str().unwrap(), "--quiet", "--set", "train.steps=1"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!std::fs::read_to_string(out32.join("config.yaml")).unwrap().contains("precision"));
    let s32: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out32.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s32["precision"], "f32");

    let (code, _, stderr) = crate::util::mixscale(&["check", cfg.to_str().unwrap(), "--set", "train.precision=fp8"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("train.precision"), "{stderr}");
}
