//! Data-parallel shards of a micro-batch (`mixscale::train::shard`): the same losses and
//! gradients as the whole micro-batch, and a whole-batch fallback where a split is not exact.

use crate::util::{spec_from, TINY};
use candle_core::{DType, Device, Tensor};
use mixscale::data::Batch;
use mixscale::model::objective::micro_grads;
use mixscale::model::LanguageModel;
use mixscale::testing::to_vec;
use mixscale::train::shard;
use std::collections::BTreeMap;

fn model(sets: &[&str]) -> LanguageModel {
    let spec = spec_from(TINY, sets).unwrap();
    LanguageModel::new(&spec.model, 16, 7, DType::F64, &Device::Cpu).unwrap()
}

/// `rows` random sequences of 16 tokens; with `masked`, a 0/1 mask whose first two rows are
/// unscored (so a shard can hold no scored position) and whose other rows score different counts.
fn batch(rows: usize, seed: u64, masked: bool) -> Batch {
    let mut r = mixscale::data::rng::Rng::new(seed);
    let (t, dev) = (16, &Device::Cpu);
    let tok = |r: &mut mixscale::data::rng::Rng| (0..rows * t).map(|_| r.below(64) as u32).collect::<Vec<_>>();
    let (inp, tgt) = (tok(&mut r), tok(&mut r));
    let mask = masked.then(|| {
        let m: Vec<f32> = (0..rows * t).map(|i| if i / t < 2 { 0.0 } else { (r.below(3) == 0) as u32 as f32 }).collect();
        Tensor::from_vec(m, (rows, t), dev).unwrap()
    });
    Batch { inputs: Tensor::from_vec(inp, (rows, t), dev).unwrap(), targets: Tensor::from_vec(tgt, (rows, t), dev).unwrap(), true_nlp: None, mask }
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
}

/// 2, 3 and up to 8 shards against one pass over the micro-batch (f64 model, so only the order of
/// additions differs): plain attention with even and odd row counts, a mask with a shard that
/// scores nothing, Gloeckle and DeepSeek MTP (extra-head losses too). The gradients are
/// pre-scaled (`scale` 0.5) and added onto gradients already in the map, as in accumulation.
#[test]
fn shards_give_the_whole_micro_batch_gradients() {
    let moe = "model.moe={num_experts: 4, top_k: 2, expert_hidden_size: 8, z_loss_coef: 0.001, balance: {aux_loss_coef: 0.01}}";
    let moe_seq = "model.moe={num_experts: 4, top_k: 1, expert_hidden_size: 8, balance: {stats: sequence, aux_loss_coef: 0.1}}";
    let moe_ds = "model.moe={num_experts: 8, top_k: 2, num_shared_experts: 1, expert_hidden_size: 8, score: sigmoid, balance: {aux_loss_coef: 0.01, bias_update_rate: 0.001}}";
    let cases: [(&[&str], usize, bool); 9] = [
        (&[], 4, false),
        (&[], 5, false),
        (&[], 6, true),
        (&["model.mtp={kind: gloeckle, n: 2}"], 4, false),
        (&["model.mtp={kind: deepseek, depth: 2, lambda: 0.6}"], 5, false),
        (&["model.layer_pattern=[gated_deltanet, attention]"], 3, false),
        (&[moe], 4, false),
        (&[moe_seq, "model.mtp={kind: gloeckle, n: 2}"], 5, false),
        (&[moe_ds, "model.mtp={kind: deepseek, depth: 1}"], 4, false),
    ];
    for (ci, (sets, rows, masked)) in cases.into_iter().enumerate() {
        let m = model(sets);
        let b = batch(rows, 40 + ci as u64, masked);
        let seed_grads = |m: &LanguageModel| -> BTreeMap<String, Tensor> {
            m.params.params.iter().map(|(k, p)| (k.clone(), p.var.as_tensor().ones_like().unwrap())).collect()
        };
        let mut whole = seed_grads(&m);
        let w = pool(1).install(|| micro_grads(&m, &b, 0.5, &mut whole)).unwrap();
        // 8 threads: fewer sequences than threads, so each shard gets a multi-threaded pool.
        for threads in [2, 3, 8] {
            let p = pool(threads);
            let shards = p.install(|| shard::shards_for(&m, &b, rayon::current_num_threads())).unwrap();
            assert_eq!(shards, threads.min(rows), "case {ci}: {sets:?}");
            let mut g = seed_grads(&m);
            let s = p.install(|| shard::micro_grads(&m, &b, 0.5, &mut g)).unwrap();
            let ctx = format!("case {ci} {sets:?} rows {rows} masked {masked}, {threads} shards");
            assert!((s.main - w.main).abs() < 1e-12 * (1.0 + w.main.abs()), "{ctx}: main {} vs {}", s.main, w.main);
            assert_eq!(s.extra.len(), w.extra.len(), "{ctx}");
            for (a, e) in s.extra.iter().zip(&w.extra) {
                let (a, e) = (a.unwrap(), e.unwrap());
                assert!((a - e).abs() < 1e-12 * (1.0 + e.abs()), "{ctx}: extra {a} vs {e}");
            }
            // MoE statistics per layer: counts of the whole micro-batch, loss values as its means.
            assert_eq!(s.routes.len(), w.routes.len(), "{ctx}");
            for (a, e) in s.routes.iter().zip(&w.routes) {
                assert_eq!((&a.selected, a.dropped, a.slots), (&e.selected, e.dropped, e.slots), "{ctx}");
                assert!((a.aux_loss - e.aux_loss).abs() < 1e-12 && (a.z_loss - e.z_loss).abs() < 1e-12, "{ctx}: aux {} vs {}, z {} vs {}", a.aux_loss, e.aux_loss, a.z_loss, e.z_loss);
            }
            assert_eq!(g.keys().collect::<Vec<_>>(), whole.keys().collect::<Vec<_>>(), "{ctx}");
            let mut moved = 0.0f64;
            for (k, v) in &whole {
                let (want, got) = (to_vec(v), to_vec(&g[k]));
                for (x, y) in want.iter().zip(&got) {
                    assert!((x - y).abs() < 1e-12 * (1.0 + x.abs()), "{ctx}: d/d {k}: {y} vs {x}");
                    moved = moved.max((x - 1.0).abs());
                }
            }
            assert!(moved > 1e-6, "{ctx}: the gradients added nothing");
        }
    }
}

/// Where shards would not be exact, the micro-batch runs whole: MoE with global-batch statistics
/// or a capacity factor, a mask with MoE or MTP heads (each term has its own count), one row,
/// one thread. `MIXSCALE_SHARDS` is not set in the test environment.
#[test]
fn inexact_splits_run_whole() {
    let moe = model(&["model.moe={num_experts: 4, top_k: 2}"]);
    assert_eq!(shard::shards_for(&moe, &batch(4, 1, false), 2).unwrap(), 2);
    assert_eq!(shard::shards_for(&moe, &batch(4, 1, true), 2).unwrap(), 1);
    for other in ["model.moe={num_experts: 4, top_k: 2, balance: {stats: global_batch}}", "model.moe={num_experts: 4, top_k: 2, capacity_factor: 1.25}"] {
        assert_eq!(shard::shards_for(&model(&[other]), &batch(4, 1, false), 2).unwrap(), 1, "{other}");
    }
    let mtp = model(&["model.mtp={kind: deepseek, depth: 1}"]);
    assert_eq!(shard::shards_for(&mtp, &batch(4, 2, true), 2).unwrap(), 1);
    assert_eq!(shard::shards_for(&mtp, &batch(4, 2, false), 2).unwrap(), 2);
    let plain = model(&[]);
    assert_eq!(shard::shards_for(&plain, &batch(1, 3, false), 4).unwrap(), 1);
    assert_eq!(shard::shards_for(&plain, &batch(4, 3, true), 1).unwrap(), 1);
    assert_eq!(shard::shards_for(&plain, &batch(4, 3, true), 8).unwrap(), 4);
}
