//! Truncated Zipf laws (Zipf 1935) with inverse-CDF sampling.

use super::rng::Rng;

/// A Zipf law over ranks `0..n`: p(r) ∝ (r + 1)^−s.
#[derive(Clone, Debug)]
pub struct Zipf {
    /// p(rank).
    pub pmf: Vec<f64>,
    /// Cumulative p, for sampling.
    pub cdf: Vec<f64>,
}

impl Zipf {
    /// Ranks `0..n`, exponent `s`.
    pub fn new(n: usize, s: f64) -> Self {
        let w: Vec<f64> = (0..n).map(|r| ((r + 1) as f64).powf(-s)).collect();
        let z: f64 = w.iter().sum();
        let pmf: Vec<f64> = w.iter().map(|x| x / z).collect();
        let mut acc = 0.0;
        let cdf = pmf
            .iter()
            .map(|p| {
                acc += p;
                acc
            })
            .collect();
        Zipf { pmf, cdf }
    }

    /// A rank drawn by inverse CDF.
    #[inline]
    pub fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.next_f64();
        self.cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len() - 1)
    }
}
