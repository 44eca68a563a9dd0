//! Ordinary least squares for small designs (a handful of columns), via Householder QR on the
//! design with an intercept column — numerically safer than the normal equations.

/// Coefficients `[intercept, b_1, …, b_p]` of y ≈ b_0 + Σ b_j x_j, or `None` when the design is
/// rank-deficient (fewer points than coefficients, or a constant/collinear column).
pub fn ols(xs: &[&[f64]], y: &[f64]) -> Option<Vec<f64>> {
    let n = y.len();
    let p = xs.len() + 1;
    if n < p || xs.iter().any(|x| x.len() != n) {
        return None;
    }
    // Column-major design matrix with intercept.
    let mut a: Vec<Vec<f64>> = std::iter::once(vec![1.0; n]).chain(xs.iter().map(|x| x.to_vec())).collect();
    let mut b = y.to_vec();
    let scale: Vec<f64> = a.iter().map(|c| c.iter().fold(0.0f64, |m, v| m.max(v.abs()))).collect();
    for k in 0..p {
        let norm = a[k][k..].iter().map(|v| v * v).sum::<f64>().sqrt();
        if !(norm > 1e-12 * scale[k].max(f64::MIN_POSITIVE) * (n as f64).sqrt()) {
            return None;
        }
        let alpha = if a[k][k] > 0.0 { -norm } else { norm };
        let mut v: Vec<f64> = a[k][k..].to_vec();
        v[0] -= alpha;
        let vnorm2: f64 = v.iter().map(|x| x * x).sum();
        if vnorm2 == 0.0 {
            continue;
        }
        for col in a.iter_mut().skip(k) {
            let proj = 2.0 * v.iter().zip(&col[k..]).map(|(x, y)| x * y).sum::<f64>() / vnorm2;
            for (c, vi) in col[k..].iter_mut().zip(&v) {
                *c -= proj * vi;
            }
        }
        let proj = 2.0 * v.iter().zip(&b[k..]).map(|(x, y)| x * y).sum::<f64>() / vnorm2;
        for (c, vi) in b[k..].iter_mut().zip(&v) {
            *c -= proj * vi;
        }
        // Relative rank check after the reflection: the remaining diagonal must not vanish.
        if a[k][k].abs() < 1e-10 * scale[k].max(1e-300) {
            return None;
        }
    }
    let mut coef = vec![0.0; p];
    for k in (0..p).rev() {
        let s: f64 = ((k + 1)..p).map(|j| a[j][k] * coef[j]).sum();
        coef[k] = (b[k] - s) / a[k][k];
    }
    coef.iter().all(|c| c.is_finite()).then_some(coef)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn recovers_exact_plane_and_rejects_collinear() {
        let x1: Vec<f64> = (0..10).map(|i| 20.0 + i as f64 * 0.3).collect();
        let x2: Vec<f64> = (0..10).map(|i| 25.0 + ((i * 3) % 7) as f64 * 0.5).collect();
        let y: Vec<f64> = x1.iter().zip(&x2).map(|(a, b)| 0.5863 - 0.7129 * a + 0.3075 * b).collect();
        let c = ols(&[&x1, &x2], &y).unwrap();
        assert!((c[0] - 0.5863).abs() < 1e-9 && (c[1] + 0.7129).abs() < 1e-11 && (c[2] - 0.3075).abs() < 1e-11, "{c:?}");
        let dup: Vec<f64> = x1.iter().map(|v| 2.0 * v).collect();
        assert!(ols(&[&x1, &dup], &y).is_none());
        assert!(ols(&[&x1], &y[..1]).is_none());
        assert!(ols(&[&[3.0; 10]], &y).is_none());
    }
}
