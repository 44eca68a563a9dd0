//! Small, fast, seedable pseudo-random number generator for data generation.
//!
//! [`Rng`] is xoshiro256** (Blackman & Vigna, 2018) seeded through SplitMix64, so any `u64`
//! seed (including 0) gives a well-mixed, non-zero state. The whole state is four `u64`
//! words ([`Rng::state`] / [`Rng::from_state`]), so a generator can be checkpointed exactly;
//! [`Rng::normal`] keeps no cached spare for that reason. [`mix`] derives independent seeds
//! from `(seed, index)` pairs, e.g. one generator per sequence of a data stream.

/// The golden-ratio increment used by SplitMix64.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 output function (a bijective 64-bit finaliser with full avalanche).
#[inline]
fn fmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Combines two 64-bit values into a well-mixed 64-bit hash.
///
/// Intended for deriving independent seeds, e.g. `mix(stream_seed, sequence_index)`.
/// For a fixed `b` the map `a -> mix(a, b)` is a bijection, so distinct `a` never collide;
/// the function is not symmetric (`mix(a, b) != mix(b, a)` in general).
#[inline]
pub fn mix(a: u64, b: u64) -> u64 {
    let h = fmix64(b.wrapping_add(GOLDEN));
    fmix64(a.wrapping_mul(GOLDEN | 1) ^ h)
}

/// xoshiro256** generator seeded by SplitMix64. Deterministic across platforms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// Creates a generator from a 64-bit seed (every seed, including 0, is valid).
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut s = [0u64; 4];
        for w in &mut s {
            x = x.wrapping_add(GOLDEN);
            *w = fmix64(x);
        }
        if s == [0; 4] {
            s[0] = GOLDEN; // unreachable in practice; xoshiro must not start all-zero
        }
        Rng { s }
    }

    /// The full internal state, for checkpointing; restore with [`Rng::from_state`].
    pub fn state(&self) -> [u64; 4] {
        self.s
    }

    /// Restores a generator from [`Rng::state`]. The all-zero state (a fixed point of
    /// xoshiro, never produced by [`Rng::new`]) is replaced by the state of `Rng::new(0)`.
    pub fn from_state(s: [u64; 4]) -> Self {
        if s == [0; 4] {
            Rng::new(0)
        } else {
            Rng { s }
        }
    }

    /// Next uniformly distributed 64-bit value.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform `f64` in `[0, 1)` with 53 random bits.
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Unbiased uniform integer in `[0, n)` (Lemire's multiply-and-reject method).
    ///
    /// # Panics
    /// If `n == 0`.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        let threshold = n.wrapping_neg() % n; // (2^64 - n) mod n
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Standard normal sample (Box–Muller; draws two uniforms, keeps no spare).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1], so ln is finite
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_seed_sensitive() {
        let a: Vec<u64> = (0..8)
            .map({
                let mut r = Rng::new(7);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..8)
            .map({
                let mut r = Rng::new(7);
                move |_| r.next_u64()
            })
            .collect();
        let c: Vec<u64> = (0..8)
            .map({
                let mut r = Rng::new(8);
                move |_| r.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(Rng::new(0).next_u64(), 0);
    }

    #[test]
    fn state_roundtrip() {
        let mut r = Rng::new(42);
        for _ in 0..5 {
            r.next_u64();
        }
        let mut s = Rng::from_state(r.state());
        assert_eq!(s, r);
        assert_eq!(s.next_u64(), r.next_u64());
        assert_eq!(Rng::from_state([0; 4]), Rng::new(0));
    }

    #[test]
    fn mix_is_injective_in_a_and_asymmetric() {
        let mut seen = std::collections::HashSet::new();
        for a in 0..10_000u64 {
            assert!(seen.insert(mix(a, 3)));
        }
        assert_ne!(mix(1, 2), mix(2, 1));
        assert_ne!(mix(0, 0), mix(0, 1));
    }

    #[test]
    fn uniformity_chi_square() {
        // 16 bins, 160k draws: chi-square with 15 dof has mean 15, sd ~5.5; 50 is ~p<1e-5.
        let mut r = Rng::new(1);
        let n = 160_000;
        let mut bins = [0u64; 16];
        for _ in 0..n {
            bins[r.below(16) as usize] += 1;
        }
        let e = n as f64 / 16.0;
        let chi: f64 = bins.iter().map(|&c| (c as f64 - e).powi(2) / e).sum();
        assert!(chi < 50.0, "chi-square {chi}");
        // Same for next_f64 bins, and a non-power-of-two range for below().
        let mut bins = [0u64; 10];
        for _ in 0..n {
            let x = r.next_f64();
            assert!((0.0..1.0).contains(&x));
            bins[(x * 10.0) as usize] += 1;
        }
        let e = n as f64 / 10.0;
        let chi: f64 = bins.iter().map(|&c| (c as f64 - e).powi(2) / e).sum();
        assert!(chi < 40.0, "chi-square {chi}");
        let mut bins = [0u64; 7];
        for _ in 0..n {
            bins[r.below(7) as usize] += 1;
        }
        let e = n as f64 / 7.0;
        let chi: f64 = bins.iter().map(|&c| (c as f64 - e).powi(2) / e).sum();
        assert!(chi < 35.0, "chi-square {chi}");
    }

    #[test]
    fn normal_moments() {
        let mut r = Rng::new(3);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        // Standard errors: mean 1/sqrt(n) ~ 0.0022, var sqrt(2/n) ~ 0.0032.
        assert!(mean.abs() < 0.012, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
        assert!(xs.iter().all(|x| x.is_finite()));
    }
}
