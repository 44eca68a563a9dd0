//! Grouping points into compute budgets (IsoFLOP profiles, DeepSeek-style per-budget optima,
//! loss vs sparsity at fixed compute). Budgets in real sweeps are nominal (e.g. 1e19 FLOPs) but
//! the recorded C of each run differs slightly (rounding of steps, attention FLOPs), and
//! digitised data (Epoch's Chinchilla table) is noisy, so budgets are clusters of C values.

/// A compute budget: the geometric mean of its members' C and their row indices.
#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    pub c: f64,
    pub rows: Vec<usize>,
}

/// Groups rows by compute: sorted by C, a row joins the current budget while its C is within a
/// factor `1 + rel_tol` of the budget's smallest C. Non-finite or non-positive C values are
/// skipped (callers exclude them first). Budgets come out in increasing C.
pub fn by_budget(c: &[f64], rel_tol: f64) -> Vec<Budget> {
    let mut idx: Vec<usize> = (0..c.len()).filter(|&i| c[i].is_finite() && c[i] > 0.0).collect();
    idx.sort_by(|&a, &b| c[a].total_cmp(&c[b]).then(a.cmp(&b)));
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut first = f64::NAN;
    for i in idx {
        if out.is_empty() || c[i] > first * (1.0 + rel_tol) {
            out.push(vec![i]);
            first = c[i];
        } else {
            out.last_mut().unwrap().push(i);
        }
    }
    out.into_iter()
        .map(|rows| {
            let c = (rows.iter().map(|&i| c[i].ln()).sum::<f64>() / rows.len() as f64).exp();
            Budget { c, rows }
        })
        .collect()
}

/// Number of distinct values among `v[rows]` (exact equality).
pub fn distinct(v: &[f64], rows: &[usize]) -> usize {
    let mut s: Vec<f64> = rows.iter().map(|&i| v[i]).collect();
    s.sort_by(f64::total_cmp);
    s.dedup();
    s.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn clusters_nearby_budgets() {
        let c = [1e19, 1.02e19, 3e19, 1e18, 2.98e19, f64::NAN];
        let b = by_budget(&c, 0.05);
        assert_eq!(b.len(), 3);
        assert_eq!(b[0].rows, vec![3]);
        assert_eq!(b[1].rows, vec![0, 1]);
        assert_eq!(b[2].rows, vec![4, 2]);
        assert!((b[1].c / 1.01e19 - 1.0).abs() < 1e-3);
    }
}
