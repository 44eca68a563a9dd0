use crate::util::{opts, spec_from, tempdir, TINY};
use candle_core::{DType, Device, Tensor, Var};
use mixscale::data::Batch;
use mixscale::model::count::Accounting;
use mixscale::model::mtp::{collect_grads, loss_terms, reference_logits};
use mixscale::model::objective::micro_grads;
use mixscale::model::LanguageModel;
use mixscale::testing::{assert_close, check_grads, to_vec};
use mixscale::train::{compute_grads, train, Outcome};
use std::collections::BTreeMap;

const GLOECKLE: &str = "model.mtp={kind: gloeckle, n: 3}";
const DEEPSEEK: &str = "model.mtp={kind: deepseek, depth: 2, lambda: 0.6}";

fn model(sets: &[&str], dtype: DType) -> LanguageModel {
    let spec = spec_from(TINY, sets).unwrap();
    LanguageModel::new(&spec.model, 16, 5, dtype, &Device::Cpu).unwrap()
}

/// A random sequence of T+1 tokens as (inputs, targets) = (seq[..T], seq[1..]).
fn batch(b: usize, t: usize, seed: u64) -> (Tensor, Tensor, Vec<u32>) {
    let mut r = mixscale::data::rng::Rng::new(seed);
    let seq: Vec<u32> = (0..b * (t + 1)).map(|_| r.below(64) as u32).collect();
    let inp: Vec<u32> = (0..b * t).map(|i| seq[i / t * (t + 1) + i % t]).collect();
    let tgt: Vec<u32> = (0..b * t).map(|i| seq[i / t * (t + 1) + i % t + 1]).collect();
    let dev = &Device::Cpu;
    (Tensor::from_vec(inp, (b, t), dev).unwrap(), Tensor::from_vec(tgt, (b, t), dev).unwrap(), seq)
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn vars(m: &LanguageModel) -> Vec<(String, Var)> {
    m.params.params.iter().map(|(k, p)| (k.clone(), p.var.clone())).collect()
}

/// Both designs against central differences (f64, large init), whole training loss.
#[test]
fn mtp_grads_match_finite_differences() {
    for (sets, samples) in [
        (vec!["model.init.std=0.4", GLOECKLE], 5),
        (vec!["model.init.std=0.4", DEEPSEEK, "model.tied_embeddings=false"], 5),
        (vec!["model.init.std=0.4", "model.mtp={kind: deepseek, depth: 1}", "model.moe={num_experts: 3, top_k: 2, z_loss_coef: 0.01}"], 3),
    ] {
        let m = model(&sets, DType::F64);
        let (inp, tgt, _) = batch(2, 6, 1);
        let loss = || loss_terms(&m, &inp, &tgt, None).unwrap().total().unwrap();
        check_grads(&format!("{sets:?}"), &vars(&m), &loss, samples);
    }
}

/// Gloeckle's head-by-head backward (memory-bounded) gives the gradients of the one-graph sum
/// of losses, MoE balancing losses in trunk and heads included, and a mask.
#[test]
fn gloeckle_head_by_head_equals_one_graph() {
    for sets in [
        vec!["model.init.std=0.3", GLOECKLE],
        vec!["model.init.std=0.3", "model.mtp={kind: gloeckle, n: 2}", "model.moe={num_experts: 4, top_k: 2, z_loss_coef: 0.01}"],
    ] {
        let m = model(&sets, DType::F64);
        let (inp, tgt, _) = batch(2, 8, 2);
        let mask = Tensor::from_vec((0..16u32).map(|i| (i % 3 != 1) as u32 as f64).collect::<Vec<f64>>(), (2, 8), &Device::Cpu).unwrap();
        let b = Batch { inputs: inp.clone(), targets: tgt.clone(), true_nlp: None, mask: Some(mask.clone()) };
        let mut fast = BTreeMap::new();
        let out = micro_grads(&m, &b, 0.5, &mut fast).unwrap();
        let terms = loss_terms(&m, &inp, &tgt, Some(&mask)).unwrap();
        let mut slow = BTreeMap::new();
        collect_grads(&m, &(terms.total().unwrap() * 0.5).unwrap().backward().unwrap(), &mut slow).unwrap();
        assert_eq!(fast.keys().collect::<Vec<_>>(), slow.keys().collect::<Vec<_>>());
        for (k, g) in &slow {
            assert_close(&format!("{sets:?} d/d {k}"), g, &fast[k], 1e-11);
        }
        assert!((out.main - scalar(&terms.main)).abs() < 1e-13);
        for (a, b) in out.extra.iter().zip(&terms.extra) {
            assert!((a.unwrap() - scalar(b.as_ref().unwrap())).abs() < 1e-13);
        }
    }
}

/// −log softmax(row)[target], plain f64.
fn nll(row: &[f64], target: u32) -> f64 {
    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln() - row[target as usize]
}

/// Label shifts and masking against a direct computation: head/module with offset s at
/// position p predicts seq[p + 1 + s] and exists only for p + 1 + s ≤ T; a mask on target
/// positions applies at p + s. The DeepSeek reference is Megatron's full-length rolled form.
#[test]
fn label_shift_and_masking_match_direct_reference() {
    let (b, t, v) = (2usize, 7usize, 64usize);
    for sets in [vec!["model.init.std=0.3", GLOECKLE], vec!["model.init.std=0.3", DEEPSEEK]] {
        let m = model(&sets, DType::F64);
        let (inp, tgt, seq) = batch(b, t, 3);
        let maskv: Vec<f64> = (0..b * t).map(|i| ((i * 7 + 3) % 4 != 0) as u32 as f64).collect();
        let mask = Tensor::from_vec(maskv.clone(), (b, t), &Device::Cpu).unwrap();
        let logits: Vec<Vec<f64>> = reference_logits(&m, &inp).unwrap().iter().map(to_vec).collect();
        assert_eq!(logits.len(), 3);
        for masked in [false, true] {
            let terms = loss_terms(&m, &inp, &tgt, masked.then_some(&mask)).unwrap();
            let got: Vec<f64> = std::iter::once(scalar(&terms.main)).chain(terms.extra.iter().map(|e| scalar(e.as_ref().unwrap()))).collect();
            for (s, lg) in logits.iter().enumerate() {
                let (mut sum, mut n) = (0.0, 0.0);
                for bi in 0..b {
                    for p in 0..t {
                        if p + 1 + s > t {
                            continue;
                        }
                        let w = if masked { maskv[bi * t + p + s] } else { 1.0 };
                        let row = &lg[(bi * t + p) * v..(bi * t + p + 1) * v];
                        sum += w * nll(row, seq[bi * (t + 1) + p + 1 + s]);
                        n += w;
                    }
                }
                assert!((got[s] - sum / n).abs() < 1e-12, "{sets:?} masked={masked} offset {s}: {} vs {}", got[s], sum / n);
            }
        }
        // The training loss weights: Gloeckle sums, DeepSeek adds λ/D per module.
        let terms = loss_terms(&m, &inp, &tgt, None).unwrap();
        let total = scalar(&terms.total().unwrap());
        let (main, e1, e2) = (scalar(&terms.main), scalar(terms.extra[0].as_ref().unwrap()), scalar(terms.extra[1].as_ref().unwrap()));
        let want = if sets[1] == GLOECKLE { main + e1 + e2 } else { main + 0.3 * (e1 + e2) };
        assert!((total - want).abs() < 1e-12);
    }
}

/// Gloeckle n = 1 and DeepSeek depth 0 are the plain model: same parameters, loss, gradients
/// and accounting.
#[test]
fn trivial_mtp_equals_plain_model() {
    let plain = model(&["model.init.std=0.3"], DType::F64);
    let (inp, tgt, _) = batch(2, 8, 4);
    let b = Batch { inputs: inp.clone(), targets: tgt.clone(), true_nlp: None, mask: None };
    let (lp, gp) = compute_grads(&plain, 1, |_| Ok(copy(&b))).unwrap();
    assert!((lp - scalar(&plain.loss(&inp, &tgt).unwrap())).abs() < 1e-13);
    for extra in ["model.mtp={kind: gloeckle, n: 1}", "model.mtp={kind: deepseek, depth: 0}"] {
        let m = model(&["model.init.std=0.3", extra], DType::F64);
        assert_eq!(m.params.params.keys().collect::<Vec<_>>(), plain.params.params.keys().collect::<Vec<_>>());
        let (l, g) = compute_grads(&m, 1, |_| Ok(copy(&b))).unwrap();
        assert_eq!(l, lp, "{extra}");
        for (k, v) in &gp {
            assert_eq!(to_vec(v), to_vec(&g[k]), "{extra}: d/d {k}");
        }
        assert_eq!(Accounting::of(&m, 16), Accounting::of(&plain, 16));
    }
}

/// Only the main head is the objective: the reported training loss is the main head's
/// cross-entropy (not the MTP sum), val_loss is the plain next-token loss, and the per-head
/// losses land in their own columns. Both presets' designs train (loss falls).
#[test]
fn mtp_trains_and_reports_main_loss() {
    for (mtp, cols) in [(GLOECKLE, vec!["mtp_head2_loss", "mtp_head3_loss"]), (DEEPSEEK, vec!["mtp_depth1_loss", "mtp_depth2_loss"])] {
        let spec = spec_from(TINY, &[mtp, "train.steps=12", "train.optimizer.lr=0.02"]).unwrap();
        // The first step's reported loss is the main head's mean CE on the first batch.
        let m = LanguageModel::new(&spec.model, 16, spec.train.seed, DType::F32, &Device::Cpu).unwrap();
        let data = mixscale::data::DataSource::new(&spec.data, spec.train.seed, 16).unwrap();
        let b0 = data.train_batch(0, 2, &Device::Cpu).unwrap();
        let b1 = data.train_batch(2, 2, &Device::Cpu).unwrap();
        let want = (scalar(&m.loss(&b0.inputs, &b0.targets).unwrap()) + scalar(&m.loss(&b1.inputs, &b1.targets).unwrap())) / 2.0;
        let dir = tempdir();
        let Outcome::Finished(s) = train(&spec, &opts(dir.path())).unwrap() else { panic!() };
        let text = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
        let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
        let rows: Vec<Vec<f64>> = text.lines().skip(1).map(|l| l.split(',').map(|x| x.parse().unwrap_or(f64::NAN)).collect()).collect();
        let first = rows[0][3];
        assert!((first - want).abs() < 2e-6, "{mtp}: reported {first} vs main CE {want}");
        let last = rows.last().unwrap()[3];
        assert!(last < first - 0.1, "{mtp}: loss {first} -> {last}");
        for c in &cols {
            let i = header.iter().position(|h| h == c).unwrap_or_else(|| panic!("{mtp}: no column {c}"));
            assert!(rows.iter().all(|r| r[i].is_finite() && r[i] > 0.0));
            assert!(rows.last().unwrap()[i] < rows[0][i], "{c} should fall");
            assert!(s.last_step_metrics.contains_key(*c));
        }
        assert!(s.accounting.params_mtp > 0);
        assert_eq!(s.accounting.params_active + s.accounting.params_mtp, s.accounting.params_total);
    }
}

/// Bad MTP options are located errors.
#[test]
fn mtp_config_errors_are_located() {
    let e = spec_from(TINY, &["model.mtp={kind: medusa, n: 2}"]).unwrap_err().to_string();
    assert!(e.contains("model.mtp") && e.contains("medusa"), "{e}");
    let e = spec_from(TINY, &["model.mtp={kind: gloeckle, n: 0}"]).unwrap_err().to_string();
    assert!(e.contains("model.mtp.n"), "{e}");
    let e = spec_from(TINY, &["model.mtp={kind: deepseek, depth: 1, lamda: 0.1}"]).unwrap_err().to_string();
    assert!(e.contains("model.mtp") && e.contains("lamda"), "{e}");
    let e = spec_from(TINY, &["model.mtp={kind: deepseek, depth: 16}"]).unwrap_err().to_string();
    assert!(e.contains("model.mtp.depth"), "{e}");
}

fn copy(b: &mixscale::data::Batch) -> mixscale::data::Batch {
    mixscale::data::Batch { inputs: b.inputs.clone(), targets: b.targets.clone(), true_nlp: b.true_nlp.clone(), mask: b.mask.clone() }
}
