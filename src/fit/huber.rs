//! Huber loss and the log-space log-sum-exp (LSE) objective shared by the parametric laws.
//!
//! Hoffmann et al. 2022 (arXiv:2203.15556, Approach 3) fit L̂(N,D) = E + A/N^α + B/D^β as
//! `min Σ_i Huber_δ( LSE(a − α log N_i, b − β log D_i, e) − log L_i )`, δ = 1e-3, with A = e^a,
//! B = e^b, E = e^e. Besiroglu et al. 2024 (arXiv:2404.10102) show the loss must be **summed**
//! (not averaged) for L-BFGS to reach the optimum; we sum as well, and in addition hand the
//! optimiser the sum divided by δ·n (a constant factor: same minimiser) so its gradient
//! tolerance means the same thing for any data-set size and δ.
//!
//! [`LseModel`] is generic: a prediction `log ŷ = LSE_k( c_k − s_k · x_k )` over terms `k`, each
//! with a free intercept `c_k` and optionally a slope `s_k` on a log-feature `x_k` (Chinchilla:
//! three terms, the power law y = E + A·x^−α: two). Internally features are centred
//! (x − mean x) and intercepts shifted accordingly, which removes the strong a–α correlation
//! and makes the problem far better conditioned; the mapping is exact and linear.

/// Huber loss: r²/2 for |r| ≤ δ, δ(|r| − δ/2) beyond (Huber 1964).
pub fn huber(r: f64, delta: f64) -> f64 {
    let a = r.abs();
    if a <= delta {
        0.5 * r * r
    } else {
        delta * (a - 0.5 * delta)
    }
}

/// Derivative of [`huber`] with respect to `r`: r clipped to [−δ, δ].
pub fn huber_grad(r: f64, delta: f64) -> f64 {
    r.clamp(-delta, delta)
}

/// One LSE term `c − Σ_j s_j·x_j`: intercept parameter index and (slope parameter index,
/// feature index) pairs (none for a constant term, two for e.g. Abnar et al.'s
/// d/((1−S)^δ N^γ)).
#[derive(Clone, Debug)]
pub struct Term {
    pub intercept: usize,
    pub slopes: Vec<(usize, usize)>,
}

impl Term {
    /// A term with at most one slope (the common case).
    pub fn new(intercept: usize, slope: Option<(usize, usize)>) -> Term {
        Term { intercept, slopes: slope.into_iter().collect() }
    }
}

/// The log-space objective Σ Huber_δ(LSE_k(c_k − s_k x_ik) − log y_i).
#[derive(Clone, Debug)]
pub struct LseModel {
    pub terms: Vec<Term>,
    /// Centred log-features: `features[j][i]`.
    pub features: Vec<Vec<f64>>,
    /// Means subtracted from each raw log-feature.
    pub centers: Vec<f64>,
    /// log of the target.
    pub log_y: Vec<f64>,
    pub delta: f64,
    pub n_params: usize,
}

impl LseModel {
    /// Builds a model from raw log-features (centred here) and log-targets.
    pub fn new(terms: Vec<Term>, raw_log_features: Vec<Vec<f64>>, log_y: Vec<f64>, delta: f64) -> Self {
        let mut centers = Vec::new();
        let features = raw_log_features
            .into_iter()
            .map(|f| {
                let m = if f.is_empty() { 0.0 } else { f.iter().sum::<f64>() / f.len() as f64 };
                centers.push(m);
                f.into_iter().map(|v| v - m).collect()
            })
            .collect();
        let n_params = terms.iter().flat_map(|t| std::iter::once(t.intercept).chain(t.slopes.iter().map(|s| s.0))).max().map_or(0, |m| m + 1);
        LseModel { terms, features, centers, log_y, delta, n_params }
    }

    /// Paper parameters (intercepts on raw logs) → internal (intercepts on centred logs):
    /// c − s·x = (c − s·m) − s·(x − m).
    pub fn to_internal(&self, p: &[f64]) -> Vec<f64> {
        let mut q = p.to_vec();
        for t in &self.terms {
            q[t.intercept] = p[t.intercept] - t.slopes.iter().map(|&(s, j)| p[s] * self.centers[j]).sum::<f64>();
        }
        q
    }

    /// Inverse of [`LseModel::to_internal`].
    pub fn to_paper(&self, q: &[f64]) -> Vec<f64> {
        let mut p = q.to_vec();
        for t in &self.terms {
            p[t.intercept] = q[t.intercept] + t.slopes.iter().map(|&(s, j)| q[s] * self.centers[j]).sum::<f64>();
        }
        p
    }

    pub fn n_points(&self) -> usize {
        self.log_y.len()
    }

    /// Σ Huber over points at internal parameters `q`; if `grad` is given, writes ∂/∂q.
    pub fn huber_sum(&self, q: &[f64], mut grad: Option<&mut [f64]>) -> f64 {
        let k = self.terms.len();
        let mut t = vec![0.0; k];
        if let Some(g) = grad.as_deref_mut() {
            g.iter_mut().for_each(|v| *v = 0.0);
        }
        // Neumaier-compensated sum: keeps f accurate to ~1 ulp so the line search can work
        // down to small gradients.
        let (mut total, mut comp) = (0.0f64, 0.0f64);
        for i in 0..self.log_y.len() {
            let mut mx = f64::NEG_INFINITY;
            for (tk, term) in t.iter_mut().zip(&self.terms) {
                let mut v = q[term.intercept];
                for &(s, j) in &term.slopes {
                    v -= q[s] * self.features[j][i];
                }
                *tk = v;
                mx = mx.max(v);
            }
            let mut z = 0.0;
            for tk in t.iter_mut() {
                *tk = (*tk - mx).exp();
                z += *tk;
            }
            let pred = mx + z.ln();
            let r = pred - self.log_y[i];
            let h = huber(r, self.delta);
            let tsum = total + h;
            comp += if total.abs() >= h.abs() { (total - tsum) + h } else { (h - tsum) + total };
            total = tsum;
            if let Some(g) = grad.as_deref_mut() {
                let h = huber_grad(r, self.delta) / z;
                for (tk, term) in t.iter().zip(&self.terms) {
                    let w = h * tk;
                    g[term.intercept] += w;
                    for &(s, j) in &term.slopes {
                        g[s] -= w * self.features[j][i];
                    }
                }
            }
        }
        total + comp
    }

    /// The objective handed to the optimiser: Σ Huber / (δ·n), with gradient.
    pub fn scaled_objective(&self, q: &[f64], grad: &mut [f64]) -> f64 {
        let c = 1.0 / (self.delta * self.n_points().max(1) as f64);
        let v = self.huber_sum(q, Some(grad));
        grad.iter_mut().for_each(|g| *g *= c);
        v * c
    }

    /// ‖∇ Σ Huber‖_∞ with respect to the paper parameters (raw-log intercepts).
    pub fn paper_grad_norm(&self, p: &[f64]) -> f64 {
        let q = self.to_internal(p);
        let mut gq = vec![0.0; self.n_params];
        self.huber_sum(&q, Some(&mut gq));
        // q_c = p_c − Σ p_s m  ⇒ ∂/∂p_c = ∂/∂q_c, ∂/∂p_s = ∂/∂q_s − m ∂/∂q_c (each slope
        // parameter belongs to one term).
        let mut gp = gq.clone();
        for t in &self.terms {
            for &(s, j) in &t.slopes {
                gp[s] -= self.centers[j] * gq[t.intercept];
            }
        }
        gp.iter().fold(0.0f64, |m, v| m.max(v.abs()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huber_pieces() {
        assert_eq!(huber(0.5e-3, 1e-3), 0.125e-6);
        assert!((huber(3e-3, 1e-3) - 1e-3 * 2.5e-3).abs() < 1e-18);
        assert_eq!(huber_grad(-5.0, 1e-3), -1e-3);
    }

    #[test]
    fn gradient_matches_finite_differences_and_centering_is_exact() {
        let ln_n: Vec<f64> = (0..30).map(|i| 18.0 + 0.2 * i as f64).collect();
        let ln_d: Vec<f64> = (0..30).map(|i| 21.0 + 0.13 * ((i * 7) % 30) as f64).collect();
        let y: Vec<f64> = (0..30).map(|i| (2.0 + 0.05 * ((i * 11) % 13) as f64).ln()).collect();
        let terms = vec![
            Term::new(0, Some((3, 0))),
            Term::new(1, Some((4, 1))),
            Term::new(2, None),
        ];
        let m = LseModel::new(terms, vec![ln_n, ln_d], y, 1e-2);
        let p = [6.0, 7.0, 0.5, 0.34, 0.3];
        let q = m.to_internal(&p);
        let back = m.to_paper(&q);
        for (a, b) in p.iter().zip(&back) {
            assert!((a - b).abs() < 1e-12);
        }
        let mut g = vec![0.0; 5];
        let f0 = m.scaled_objective(&q, &mut g);
        for k in 0..5 {
            let h = 1e-6;
            let mut qp = q.clone();
            qp[k] += h;
            let mut qm = q.clone();
            qm[k] -= h;
            let mut tmp = vec![0.0; 5];
            let fd = (m.scaled_objective(&qp, &mut tmp) - m.scaled_objective(&qm, &mut tmp)) / (2.0 * h);
            assert!((fd - g[k]).abs() < 1e-5 * (1.0 + g[k].abs()), "k={k} fd={fd} g={}", g[k]);
        }
        assert!(f0 > 0.0);
    }
}
