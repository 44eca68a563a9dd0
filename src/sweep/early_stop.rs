//! Early termination (`early_terminate:`): pruning decisions on intermediate validation losses.
//!
//! Steps are training steps (the `step` column of metrics.csv, one intermediate value per
//! evaluation). Lower is better. Decisions are recomputed from the study record each time a
//! trial reports, so they survive restarts; a pruned trial is recorded PRUNED with its last
//! intermediate value.
//!
//! - `median` — Optuna's `MedianPruner`: after `warmup_steps`, prune when the trial's best value
//!   so far is worse than the median of the COMPLETE trials' values at the same step, once at
//!   least `min_trials` of them have one.
//! - `asha` (alias `successive_halving`) — asynchronous successive halving (Li et al. 2020,
//!   "A System for Massively Parallel Hyperparameter Tuning"), as Optuna's
//!   `SuccessiveHalvingPruner`: rungs at `min_iter · eta^k` steps; when a trial reaches a rung
//!   (its first value at or after the rung's step) it continues only if that value is among
//!   the best `max(1, ⌊n/eta⌋)` of the `n` trials (itself included) that reached the rung.
//! - `hyperband` — Li et al. 2018, as Optuna's `HyperbandPruner`: brackets
//!   `s = 0..=s_max`, `s_max = ⌊log_eta(max_iter / min_iter)⌋`; a trial's bracket comes from its
//!   identity hash; each bracket is ASHA with first rung `min_iter · eta^s`, trials competing
//!   only within their bracket.

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum EarlyTerminate {
    Median {
        #[serde(default = "five")]
        min_trials: usize,
        #[serde(default)]
        warmup_steps: usize,
    },
    #[serde(alias = "successive_halving")]
    Asha {
        min_iter: usize,
        #[serde(default = "three")]
        eta: usize,
    },
    Hyperband {
        min_iter: usize,
        max_iter: usize,
        #[serde(default = "three")]
        eta: usize,
    },
}

fn five() -> usize {
    5
}
fn three() -> usize {
    3
}

/// A trial's intermediate values, `(step, value)` in increasing step order.
pub type Curve = Vec<(usize, f64)>;

/// Another trial of the study, as the pruner sees it.
pub struct Peer<'a> {
    pub curve: &'a [(usize, f64)],
    pub complete: bool,
    /// Identity hash (for Hyperband brackets).
    pub bracket_key: u64,
}

impl EarlyTerminate {
    pub fn check(&self) -> Result<(), String> {
        match self {
            EarlyTerminate::Median { .. } => Ok(()),
            EarlyTerminate::Asha { min_iter, eta } => {
                if *min_iter == 0 || *eta < 2 {
                    return Err("asha needs min_iter ≥ 1 and eta ≥ 2".into());
                }
                Ok(())
            }
            EarlyTerminate::Hyperband { min_iter, max_iter, eta } => {
                if *min_iter == 0 || *eta < 2 || max_iter < min_iter {
                    return Err("hyperband needs min_iter ≥ 1, max_iter ≥ min_iter and eta ≥ 2".into());
                }
                Ok(())
            }
        }
    }

    /// Hyperband bracket of a trial (0 for the other policies).
    pub fn bracket(&self, key: u64) -> usize {
        match self {
            EarlyTerminate::Hyperband { min_iter, max_iter, eta } => {
                let mut s_max = 0;
                while min_iter * eta.pow(s_max as u32 + 1) <= *max_iter {
                    s_max += 1;
                }
                (key % (s_max as u64 + 1)) as usize
            }
            _ => 0,
        }
    }

    /// Whether the trial with `curve` (and identity hash `key`) should stop now.
    pub fn should_prune(&self, key: u64, curve: &[(usize, f64)], peers: &[Peer]) -> bool {
        let Some(&(step, _)) = curve.last() else { return false };
        match self {
            EarlyTerminate::Median { min_trials, warmup_steps } => {
                if step < *warmup_steps {
                    return false;
                }
                let best = curve.iter().map(|c| c.1).fold(f64::INFINITY, f64::min);
                let mut at: Vec<f64> = peers
                    .iter()
                    .filter(|p| p.complete)
                    .filter_map(|p| p.curve.iter().find(|c| c.0 == step).map(|c| c.1))
                    .filter(|v| !v.is_nan())
                    .collect();
                if at.len() < *min_trials || at.is_empty() {
                    return false;
                }
                at.sort_by(f64::total_cmp);
                let n = at.len();
                let median = if n % 2 == 1 { at[n / 2] } else { 0.5 * (at[n / 2 - 1] + at[n / 2]) };
                best > median || best.is_nan()
            }
            EarlyTerminate::Asha { min_iter, eta } => asha(*min_iter, *eta, curve, peers.iter().map(|p| p.curve)),
            EarlyTerminate::Hyperband { min_iter, eta, .. } => {
                let b = self.bracket(key);
                let first = min_iter * eta.pow(b as u32);
                asha(first, *eta, curve, peers.iter().filter(|p| self.bracket(p.bracket_key) == b).map(|p| p.curve))
            }
        }
    }
}

/// The value of `curve` at a rung: its first value at or after `rung` steps.
fn at_rung(curve: &[(usize, f64)], rung: usize) -> Option<(usize, f64)> {
    curve.iter().find(|c| c.0 >= rung).copied()
}

fn asha<'a>(min_iter: usize, eta: usize, curve: &[(usize, f64)], peers: impl Iterator<Item = &'a [(usize, f64)]>) -> bool {
    let (step, value) = *curve.last().expect("non-empty");
    // The rung this report reaches: the highest rung whose first point is this report.
    let mut rung = min_iter;
    let mut reached = None;
    while rung <= step {
        if at_rung(curve, rung).map(|c| c.0) == Some(step) {
            reached = Some(rung);
        }
        rung = rung.saturating_mul(eta);
    }
    let Some(rung) = reached else { return false };
    if value.is_nan() {
        return true;
    }
    let mut competing: Vec<f64> = peers.filter_map(|c| at_rung(c, rung)).map(|c| c.1).filter(|v| !v.is_nan()).collect();
    competing.push(value);
    competing.sort_by(f64::total_cmp);
    let k = (competing.len() / eta).max(1);
    value > competing[k - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(c: &[(usize, f64)]) -> Peer<'_> {
        Peer { curve: c, complete: true, bracket_key: 0 }
    }

    #[test]
    fn median_prunes_worse_than_median_only_after_min_trials() {
        let m = EarlyTerminate::Median { min_trials: 3, warmup_steps: 10 };
        let a = [(10, 1.0), (20, 0.8)];
        let b = [(10, 1.2), (20, 0.9)];
        let c = [(10, 1.4), (20, 1.0)];
        let peers = [peer(&a), peer(&b), peer(&c)];
        assert!(m.should_prune(0, &[(10, 1.3)], &peers));
        assert!(!m.should_prune(0, &[(10, 1.1)], &peers));
        assert!(!m.should_prune(0, &[(5, 9.0)], &peers), "warmup");
        assert!(!m.should_prune(0, &[(10, 1.3)], &peers[..2]), "too few trials");
    }

    #[test]
    fn asha_keeps_the_top_third_at_each_rung() {
        let a = EarlyTerminate::Asha { min_iter: 10, eta: 3 };
        let others: Vec<Vec<(usize, f64)>> = (0..5).map(|i| vec![(10, 1.0 + i as f64 * 0.1)]).collect();
        let peers: Vec<Peer> = others.iter().map(|c| peer(c)).collect();
        // 6 trials at rung 10 -> the best 2 continue: 1.0, 1.05 (ours).
        assert!(!a.should_prune(0, &[(10, 1.05)], &peers));
        assert!(a.should_prune(0, &[(10, 1.15)], &peers));
        // Between rungs nothing is decided.
        assert!(!a.should_prune(0, &[(10, 1.05), (20, 5.0)], &peers));
        // The first trial at a rung is always promoted.
        assert!(!a.should_prune(0, &[(10, 9.0)], &[]));
    }

    #[test]
    fn hyperband_brackets_cover_all_and_compete_within() {
        let h = EarlyTerminate::Hyperband { min_iter: 10, max_iter: 90, eta: 3 };
        let brackets: std::collections::BTreeSet<usize> = (0..30u64).map(|k| h.bracket(k)).collect();
        assert_eq!(brackets.into_iter().collect::<Vec<_>>(), vec![0, 1, 2]);
        // Bracket 1 starts at 30 steps: a report at 10 steps decides nothing there.
        let k1 = (0..30u64).find(|&k| h.bracket(k) == 1).unwrap();
        let bad = [(10, 0.1)];
        let peers = [Peer { curve: &bad, complete: true, bracket_key: k1 }, Peer { curve: &bad, complete: true, bracket_key: k1 }];
        assert!(!h.should_prune(k1, &[(10, 5.0)], &peers));
        let bad30 = [(30, 0.1)];
        let peers = [Peer { curve: &bad30, complete: true, bracket_key: k1 }, Peer { curve: &bad30, complete: true, bracket_key: k1 }, Peer { curve: &bad30, complete: true, bracket_key: k1 }];
        assert!(h.should_prune(k1, &[(30, 5.0)], &peers));
    }
}
