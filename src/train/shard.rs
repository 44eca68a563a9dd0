//! Data parallelism across the cores inside one micro-batch.
//!
//! A micro-batch's sequences are cut into `S` contiguous shards (S = the rayon pool's threads,
//! at most one per sequence); each shard's forward and backward runs on its own rayon pool (one
//! thread, or threads / S of them when there are more threads than sequences), all at once, and
//! shard `s` contributes `w_s ×` the gradients of its mean loss, with `w_s` its share of the
//! micro-batch's scored positions. The sum is the gradient of the micro-batch's mean loss, as
//! with one pass over the whole micro-batch (PyTorch DDP's gradient averaging, Li et al. 2020,
//! arXiv:2006.15704, inside one process), up to the order of floating-point additions. Gradients are added in shard order, so a run is reproducible for a
//! given thread count (`MIXSCALE_SHARDS` fixes `S` independently of it; `1` turns this off).
//!
//! Why: at the quickstart sizes (d_model 128, 4096 tokens per step) the fused kernels split
//! each op's work between the 2 cores and wait at every op boundary; a 2-thread step ran at
//! 1.58–1.75× a 1-thread step. Each shard's ops run single-threaded end to end instead, and the
//! cores meet once per micro-batch. A/B (`mixscale bench`, 2 threads, alternating runs, tokens/s):
//! see the README's CPU training speed section.
//!
//! MoE layers: the auxiliary balance loss with micro-batch statistics needs the whole
//! micro-batch's selection counts, which the shards sum between them at each MoE layer
//! ([`crate::model::collective`]); with per-sequence statistics a shard's term is already
//! exact. The z-loss is a mean over tokens, weighted like the cross-entropy.
//!
//! Exactness limits where it applies ([`shards_for`]); elsewhere the micro-batch runs whole:
//! - MoE with global-batch statistics (running counts across micro-batches) or a capacity
//!   factor (which slots are dropped depends on every token of the micro-batch).
//! - A mask together with MTP heads or MoE layers: each head's mean has its own count of scored
//!   positions and the MoE terms count every token, so one weight per shard would not be exact
//!   (the cross-entropy alone, masked or not, is).
//! - Mixed precision: the compute copies are refreshed in place at every forward.
//! - Devices other than the CPU (one device, nothing to split).

use crate::error::Result;
use crate::config::moe::BalanceStats;
use crate::model::moe::RouteStats;
use crate::model::{collective, objective, LanguageModel};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Adds `scale ×` the gradients of the training loss of micro-batch `b` to `grads`
/// ([`objective::micro_grads`]), its shards run concurrently where [`shards_for`] allows.
pub fn micro_grads(model: &LanguageModel, b: &crate::data::Batch, scale: f64, grads: &mut BTreeMap<String, Tensor>) -> Result<objective::MicroOut> {
    let shards = shards_for(model, b, rayon::current_num_threads())?;
    if shards < 2 {
        return Ok(objective::micro_grads(model, b, scale, grads)?);
    }
    let rows = b.inputs.dim(0)?;
    let bounds: Vec<(usize, usize)> = (0..shards).map(|s| (s * rows / shards, (s + 1) * rows / shards)).collect();
    let parts: Vec<crate::data::Batch> = bounds
        .iter()
        .map(|&(r0, r1)| {
            let cut = |t: &Tensor| t.narrow(0, r0, r1 - r0);
            Ok(crate::data::Batch {
                inputs: cut(&b.inputs)?,
                targets: cut(&b.targets)?,
                true_nlp: None,
                mask: b.mask.as_ref().map(cut).transpose()?,
            })
        })
        .collect::<Result<_>>()?;
    // Weight of each shard: its share of the scored positions (of the rows without a mask).
    let counts: Vec<f64> = match &b.mask {
        None => bounds.iter().map(|&(r0, r1)| (r1 - r0) as f64).collect(),
        Some(_) => parts.iter().map(|p| scored(p.mask.as_ref().expect("mask"))).collect::<Result<_>>()?,
    };
    let total: f64 = counts.iter().sum();
    if total == 0.0 {
        // No scored position: the whole micro-batch reports it as it always does.
        return Ok(objective::micro_grads(model, b, scale, grads)?);
    }
    // More threads than sequences: each shard's ops use threads / shards of them.
    let pools = pools(shards, (rayon::current_num_threads() / shards).max(1));
    // Shards without a scored position (masks without MoE only) sit out, also of the MoE sums.
    let group = collective::Group::new(counts.iter().filter(|&&c| c > 0.0).count());
    let run = |s: usize| -> Result<Option<(objective::MicroOut, BTreeMap<String, Tensor>)>> {
        if counts[s] == 0.0 {
            return Ok(None);
        }
        let mut g = BTreeMap::new();
        let out = pools[s].install(|| {
            let member = collective::join(&group);
            let out = objective::micro_grads(model, &parts[s], scale * counts[s] / total, &mut g)?;
            member.done();
            Ok::<_, crate::error::Error>(out)
        })?;
        Ok(Some((out, g)))
    };
    let results: Vec<Result<_>> = std::thread::scope(|sc| {
        let others: Vec<_> = (1..shards).map(|s| sc.spawn(move || run(s))).collect();
        let first = run(0);
        std::iter::once(first)
            .chain(others.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))))
            .collect()
    });
    let mut main = 0.0;
    let mut extra: Vec<Option<f64>> = Vec::new();
    let mut routes: Vec<RouteStats> = Vec::new();
    let mut shard_grads: Vec<BTreeMap<String, Tensor>> = Vec::with_capacity(shards);
    for (s, r) in results.into_iter().enumerate() {
        let Some((out, g)) = r? else { continue };
        let w = counts[s] / total;
        main += w * out.main;
        if extra.is_empty() {
            extra = vec![Some(0.0); out.extra.len()];
        }
        for (acc, e) in extra.iter_mut().zip(&out.extra) {
            // A head without scored positions in a shard has none in the micro-batch either
            // (no mask, so every shard's heads see the same positions per row).
            *acc = match (*acc, e) {
                (Some(a), Some(v)) => Some(a + w * v),
                _ => None,
            };
        }
        // Per MoE layer: counts add up; the loss values are token means, weighted as the loss.
        if routes.is_empty() {
            routes = out.routes.iter().map(|r| RouteStats { selected: vec![0.0; r.selected.len()], dropped: 0, slots: 0, aux_loss: 0.0, z_loss: 0.0 }).collect();
        }
        for (acc, r) in routes.iter_mut().zip(&out.routes) {
            acc.selected.iter_mut().zip(&r.selected).for_each(|(a, b)| *a += b);
            acc.dropped += r.dropped;
            acc.slots += r.slots;
            acc.aux_loss += w * r.aux_loss;
            acc.z_loss += w * r.z_loss;
        }
        shard_grads.push(g);
    }
    // Per parameter, in shard order after what `grads` held: prev + g_0 + g_1 + …; parameters
    // summed in parallel (one core would otherwise add while the other waits).
    let mut names: Vec<String> = shard_grads.iter().flat_map(|g| g.keys().cloned()).collect();
    names.sort();
    names.dedup();
    let sums: Vec<(String, Tensor)> = {
        use rayon::prelude::*;
        let grads = &*grads;
        names
            .into_par_iter()
            .map(|name| {
                let mut parts = grads.get(&name).into_iter().chain(shard_grads.iter().filter_map(|g| g.get(&name)));
                let first = parts.next().expect("a name from the shards").clone();
                let sum = parts.try_fold(first, |acc, g| acc + g)?;
                Ok((name, sum))
            })
            .collect::<Result<_>>()?
    };
    grads.extend(sums);
    Ok(objective::MicroOut { main, extra, routes })
}

/// How many shards micro-batch `b` runs in with `threads` threads: 1 (run it whole) unless the
/// split is exact (module doc) and worth it (at least 2 threads and 2 sequences). The
/// `MIXSCALE_SHARDS` environment variable, when set, replaces `threads`.
pub fn shards_for(model: &LanguageModel, b: &crate::data::Batch, threads: usize) -> Result<usize> {
    let threads = match std::env::var("MIXSCALE_SHARDS") {
        Ok(v) => v.trim().parse::<usize>().unwrap_or(threads),
        Err(_) => threads,
    };
    let rows = b.inputs.dim(0)?;
    let has_moe = objective::all_moe(model).next().is_some();
    let moe_exact = objective::all_moe(model).all(|m| m.spec.capacity_factor.is_none() && m.spec.balance.stats != BalanceStats::GlobalBatch);
    let exact = b.inputs.device().is_cpu()
        && moe_exact
        && !(b.mask.is_some() && (has_moe || model.mtp.as_ref().is_some_and(|m| m.extra() > 0)))
        && !model.params.has_casts();
    Ok(if exact { threads.min(rows).max(1) } else { 1 })
}

/// Total weight of a mask: the denominator of the masked mean ([`crate::model::mtp::mean_ce`]).
fn scored(mask: &Tensor) -> Result<f64> {
    Ok(mask.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
}

/// `n` rayon pools of `size` threads each, created once and kept (threads `mixscale-shard-<i>`).
fn pools(n: usize, size: usize) -> Vec<Arc<rayon::ThreadPool>> {
    type Pools = Vec<(usize, Vec<Arc<rayon::ThreadPool>>)>;
    static POOLS: Mutex<Pools> = Mutex::new(Vec::new());
    let mut all = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    let at = match all.iter().position(|(s, _)| *s == size) {
        Some(i) => i,
        None => {
            all.push((size, Vec::new()));
            all.len() - 1
        }
    };
    let p = &mut all[at].1;
    while p.len() < n {
        let i = p.len();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(size).thread_name(move |_| format!("mixscale-shard-{i}")).build().expect("shard thread pool");
        p.push(Arc::new(pool));
    }
    p[..n].to_vec()
}
