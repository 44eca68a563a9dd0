//! Clustered (by-run) nonparametric bootstrap with percentile intervals.
//!
//! Runs — rows sharing a `run` id, e.g. intermediate checkpoints of one training run — are
//! resampled with replacement, as Besiroglu et al. 2024 (arXiv:2404.10102, §on intra-run
//! correlation) recommend; rows without a run id are their own run. Each resample draws from its
//! own PRNG stream `Rng::new(mix(seed, i))`, so results are identical for a given seed whatever
//! the number of threads. Resamples run in parallel with rayon.

use crate::data::rng::{mix, Rng};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;

/// Bootstrap settings.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BootstrapOptions {
    /// Number of resamples (0 disables the bootstrap).
    pub resamples: usize,
    pub seed: u64,
    /// Two-sided percentile-interval level, e.g. 0.95.
    pub level: f64,
}

impl Default for BootstrapOptions {
    fn default() -> Self {
        BootstrapOptions { resamples: 0, seed: 42, level: 0.95 }
    }
}

/// Summary of a bootstrap over named statistics.
#[derive(Clone, Debug, Serialize)]
pub struct BootstrapSummary {
    pub resamples: usize,
    /// Resamples whose refit failed (no finite estimate); excluded from the summaries.
    pub failed: usize,
    pub seed: u64,
    pub level: f64,
    pub mean: BTreeMap<String, f64>,
    pub sd: BTreeMap<String, f64>,
    pub ci: BTreeMap<String, [f64; 2]>,
    /// Per-resample estimates (successful ones, in resample order), `samples[i][k]` = stat k.
    #[serde(skip)]
    pub samples: Vec<Vec<f64>>,
}

/// Row indices of one by-run resample: as many runs as `groups`, drawn with replacement.
pub fn resample_runs(groups: &[Vec<usize>], rng: &mut Rng) -> Vec<usize> {
    let mut idx = Vec::new();
    for _ in 0..groups.len() {
        idx.extend_from_slice(&groups[rng.below(groups.len() as u64) as usize]);
    }
    idx
}

/// Quantile `q` ∈ [0,1] of sorted data, linear interpolation (numpy's default "linear").
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let h = (sorted.len() - 1) as f64 * q.clamp(0.0, 1.0);
    let lo = h.floor() as usize;
    let hi = h.ceil() as usize;
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

/// Runs `fit` on `opts.resamples` by-run resamples of `groups` and summarises the statistics
/// named `names` (the order of `fit`'s output). A resample whose fit returns `None` or a
/// non-finite value is counted in `failed`.
pub fn bootstrap<F>(groups: &[Vec<usize>], names: &[String], opts: &BootstrapOptions, fit: F) -> BootstrapSummary
where
    F: Fn(&[usize]) -> Option<Vec<f64>> + Sync,
{
    let results: Vec<Option<Vec<f64>>> = (0..opts.resamples)
        .into_par_iter()
        .map(|i| {
            let mut rng = Rng::new(mix(opts.seed, i as u64));
            let idx = resample_runs(groups, &mut rng);
            fit(&idx).filter(|v| v.len() == names.len() && v.iter().all(|x| x.is_finite()))
        })
        .collect();
    let samples: Vec<Vec<f64>> = results.iter().flatten().cloned().collect();
    summarize(names, samples, opts, results.len())
}

/// Summaries (mean, SD, percentile CI) of precomputed samples.
pub fn summarize(names: &[String], samples: Vec<Vec<f64>>, opts: &BootstrapOptions, attempted: usize) -> BootstrapSummary {
    let (lo_q, hi_q) = ((1.0 - opts.level) / 2.0, 1.0 - (1.0 - opts.level) / 2.0);
    let mut mean = BTreeMap::new();
    let mut sd = BTreeMap::new();
    let mut ci = BTreeMap::new();
    for (k, name) in names.iter().enumerate() {
        let mut v: Vec<f64> = samples.iter().map(|s| s[k]).collect();
        if v.is_empty() {
            continue;
        }
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let var = if v.len() > 1 { v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64 } else { 0.0 };
        v.sort_by(f64::total_cmp);
        mean.insert(name.clone(), m);
        sd.insert(name.clone(), var.sqrt());
        ci.insert(name.clone(), [quantile_sorted(&v, lo_q), quantile_sorted(&v, hi_q)]);
    }
    BootstrapSummary {
        resamples: attempted,
        failed: attempted - samples.len(),
        seed: opts.seed,
        level: opts.level,
        mean,
        sd,
        ci,
        samples,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_reproducibility() {
        assert_eq!(quantile_sorted(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.5);
        assert_eq!(quantile_sorted(&[1.0, 2.0, 3.0], 0.0), 1.0);
        let data: Vec<f64> = (0..50).map(|i| (i as f64 * 0.37).sin()).collect();
        let groups: Vec<Vec<usize>> = (0..25).map(|g| vec![2 * g, 2 * g + 1]).collect();
        let names = vec!["mean".to_string()];
        let o = BootstrapOptions { resamples: 300, seed: 9, level: 0.9 };
        let f = |idx: &[usize]| {
            assert_eq!(idx.len(), 50); // whole runs of two rows each
            assert!(idx.chunks(2).all(|c| c[0] % 2 == 0 && c[1] == c[0] + 1), "runs split: {idx:?}");
            Some(vec![idx.iter().map(|&i| data[i]).sum::<f64>() / idx.len() as f64])
        };
        let a = bootstrap(&groups, &names, &o, f);
        let b = bootstrap(&groups, &names, &o, f);
        assert_eq!(a.samples, b.samples);
        let c = bootstrap(&groups, &names, &BootstrapOptions { seed: 10, ..o.clone() }, f);
        assert_ne!(a.samples, c.samples);
        let [lo, hi] = a.ci["mean"];
        let m = data.iter().sum::<f64>() / 50.0;
        assert!(lo < m && m < hi);
    }
}
