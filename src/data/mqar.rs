//! Multi-query associative recall (MQAR), as Zoology generates it (Arora, Eyuboglu et al. 2023,
//! "Zoology: Measuring and Improving Recall in Efficient Language Models";
//! HazyResearch/zoology `zoology/data/multiquery_ar.py`; research notes `shared/reference/data.md` §4a).
//!
//! One example of length `T` = `train.seq_len` with `n` = `num_kv_pairs`, vocabulary `V`:
//! 1. `n` distinct keys from `[1, V/2)` and `n` distinct values from `[V/2, V)`, in random order.
//! 2. The context `k1 v1 k2 v2 … kn vn` fills positions `0..C`, `C = 2n`.
//! 3. The query region has `space = (T − C)/2` slots. Each key gets a distinct gap `g`, drawn
//!    without replacement with p(g) ∝ `power_a·(g+1)^(power_a−1)` over `g ∈ [0, space)` — a
//!    power law favouring queries soon after the context (`power_a = 1` is uniform). Draws are
//!    successive: each next gap is drawn ∝ p among the gaps not yet taken.
//! 4. Key `k_i` is re-presented at input position `C + 2·g_i`; its target there is `v_i`. Those
//!    `n` positions are the only scored ones (Zoology's label −100 everywhere else): the model
//!    must emit the value at the step where the key reappears.
//! 5. Every other query-region input is 0, or with `random_non_queries` a uniform token of
//!    `[0, V)` (which may collide with keys or values, as in Zoology).
//!
//! Unscored targets are 0 (the mask says they do not count). Zoology's `num_passes` (JRT
//! repetition) is not offered: in the referenced snapshot it fails for `num_passes > 1`.
//! Example `i` of a stream is a pure function of (split, seed, i); the generator itself is
//! independent of Zoology's numpy RNG, so examples match Zoology's in distribution, not draw
//! for draw.

use super::language::Split;
use super::rng::{mix, Rng};

/// A standard Zoology configuration: name, sequence length, key-value pairs, random non-queries.
/// Vocabulary 8192 and power_a 0.01 throughout.
pub struct Setting {
    pub name: &'static str,
    pub seq_len: usize,
    pub num_kv_pairs: usize,
    pub random_non_queries: bool,
}

const fn s(name: &'static str, seq_len: usize, num_kv_pairs: usize, random_non_queries: bool) -> Setting {
    Setting { name, seq_len, num_kv_pairs, random_non_queries }
}

/// Zoology's `original_mqar_configs.py` train (T, kv) ∈ {(64,4), (128,8), (256,16), (256,32),
/// (256,64)} and test {(64,8), (64,16), (128,32), (512,128), (1024,256)} shapes, with random
/// non-queries; and the ICLR'24 Figure 2 shapes (`paper_configs/iclr24_zoology_figure2`), which
/// turn random non-queries off.
pub const SETTINGS: &[Setting] = &[
    s("zoology_t64_kv4", 64, 4, true),
    s("zoology_t64_kv8", 64, 8, true),
    s("zoology_t64_kv16", 64, 16, true),
    s("zoology_t128_kv8", 128, 8, true),
    s("zoology_t128_kv32", 128, 32, true),
    s("zoology_t256_kv16", 256, 16, true),
    s("zoology_t256_kv32", 256, 32, true),
    s("zoology_t256_kv64", 256, 64, true),
    s("zoology_t512_kv128", 512, 128, true),
    s("zoology_t1024_kv256", 1024, 256, true),
    s("iclr24_fig2_t64_kv4", 64, 4, false),
    s("iclr24_fig2_t128_kv8", 128, 8, false),
    s("iclr24_fig2_t256_kv16", 256, 16, false),
];

/// Zoology's defaults.
pub const DEFAULT_VOCAB: usize = 8192;
pub const DEFAULT_KV: usize = 8;
pub const DEFAULT_POWER_A: f64 = 0.01;

/// Resolved MQAR parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct MqarParams {
    pub vocab_size: usize,
    pub num_kv_pairs: usize,
    pub power_a: f64,
    pub random_non_queries: bool,
    pub seq_len: usize,
}

/// A configuration error: (key path under `data.`/`train.`, message).
pub type ParamError = (&'static str, String);

impl MqarParams {
    /// Fills unset fields from `setting` (a [`SETTINGS`] name), then Zoology's defaults, and
    /// checks Zoology's constraints.
    pub fn resolve(
        setting: Option<&str>,
        vocab_size: Option<usize>,
        num_kv_pairs: Option<usize>,
        power_a: Option<f64>,
        random_non_queries: Option<bool>,
        seq_len: usize,
    ) -> Result<Self, ParamError> {
        let base = match setting {
            None => None,
            Some(name) => {
                let st = SETTINGS.iter().find(|s| s.name == name).ok_or_else(|| {
                    let known: Vec<&str> = SETTINGS.iter().map(|s| s.name).collect();
                    ("data.setting", format!("unknown MQAR setting `{name}`; known: {}", known.join(", ")))
                })?;
                if st.seq_len != seq_len {
                    return Err(("train.seq_len", format!("MQAR setting `{name}` needs train.seq_len {}; got {seq_len}", st.seq_len)));
                }
                Some(st)
            }
        };
        let p = MqarParams {
            vocab_size: vocab_size.unwrap_or(DEFAULT_VOCAB),
            num_kv_pairs: num_kv_pairs.or(base.map(|b| b.num_kv_pairs)).unwrap_or(DEFAULT_KV),
            power_a: power_a.unwrap_or(DEFAULT_POWER_A),
            random_non_queries: random_non_queries.or(base.map(|b| b.random_non_queries)).unwrap_or(true),
            seq_len,
        };
        p.check()?;
        Ok(p)
    }

    /// Zoology's asserts (`input_seq_len` even, `vocab_size > input_seq_len`,
    /// `4·num_kv_pairs ≤ input_seq_len`) plus enough keys and values to draw without replacement.
    pub fn check(&self) -> Result<(), ParamError> {
        let (v, n, t) = (self.vocab_size, self.num_kv_pairs, self.seq_len);
        if t % 2 != 0 {
            return Err(("train.seq_len", format!("MQAR needs an even sequence length; got {t}")));
        }
        if v <= t {
            return Err(("data.vocab_size", format!("MQAR needs vocab_size > train.seq_len ({t}); got {v}")));
        }
        if n == 0 || 4 * n > t {
            return Err(("data.num_kv_pairs", format!("must be in 1..={} (4·num_kv_pairs ≤ train.seq_len {t}); got {n}", t / 4)));
        }
        if n > v / 2 - 1 {
            return Err(("data.num_kv_pairs", format!("{n} distinct keys do not fit the key range [1, {})", v / 2)));
        }
        if !(self.power_a > 0.0 && self.power_a.is_finite()) {
            return Err(("data.power_a", format!("must be a positive number; got {}", self.power_a)));
        }
        Ok(())
    }
}

/// One example: inputs and targets of length `T`, and which targets are scored.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub scored: Vec<bool>,
}

/// The MQAR generator.
pub struct Mqar {
    p: MqarParams,
    /// Unnormalised gap weights (g+1)^(power_a−1), g ∈ [0, space).
    gap_weights: Vec<f64>,
}

impl Mqar {
    pub fn new(p: &MqarParams) -> Result<Self, ParamError> {
        p.check()?;
        let space = (p.seq_len - 2 * p.num_kv_pairs) / 2;
        let gap_weights = (0..space).map(|g| ((g + 1) as f64).powf(p.power_a - 1.0)).collect();
        Ok(Self { p: p.clone(), gap_weights })
    }

    pub fn params(&self) -> &MqarParams {
        &self.p
    }

    /// Normalised gap distribution p(g), g ∈ [0, space).
    pub fn gap_pmf(&self) -> Vec<f64> {
        let z: f64 = self.gap_weights.iter().sum();
        self.gap_weights.iter().map(|w| w / z).collect()
    }

    pub fn describe(&self) -> String {
        let p = &self.p;
        format!(
            "MQAR: vocab {} (keys [1, {}), values [{}, {})), {} key-value pairs, power_a {}, {} non-queries, seq_len {}",
            p.vocab_size,
            p.vocab_size / 2,
            p.vocab_size / 2,
            p.vocab_size,
            p.num_kv_pairs,
            p.power_a,
            if p.random_non_queries { "random" } else { "zero" },
            p.seq_len
        )
    }

    /// Example `index` of stream (`split`, `seed`).
    pub fn example(&self, split: Split, seed: u64, index: u64) -> Example {
        let tag = match split {
            Split::Train => 0x4d51_4152_0000_0001,
            Split::Val => 0x4d51_4152_0000_0002,
        };
        let mut rng = Rng::new(mix(mix(seed, tag), index));
        let (v, n, t) = (self.p.vocab_size as u32, self.p.num_kv_pairs, self.p.seq_len);
        let keys = distinct(&mut rng, 1, v / 2, n);
        let values = distinct(&mut rng, v / 2, v, n);
        let c = 2 * n;
        let mut inputs = vec![0u32; t];
        let mut targets = vec![0u32; t];
        let mut scored = vec![false; t];
        for i in 0..n {
            inputs[2 * i] = keys[i];
            inputs[2 * i + 1] = values[i];
        }
        let mut w = self.gap_weights.clone();
        for i in 0..n {
            let g = weighted(&mut rng, &w);
            w[g] = 0.0;
            let pos = c + 2 * g;
            inputs[pos] = keys[i];
            targets[pos] = values[i];
            scored[pos] = true;
        }
        if self.p.random_non_queries {
            for x in inputs.iter_mut().filter(|x| **x == 0) {
                *x = rng.below(v as u64) as u32;
            }
        }
        Example { inputs, targets, scored }
    }
}

/// `n` distinct integers of `[lo, hi)` in random order (a partial Fisher–Yates shuffle).
pub(super) fn distinct(rng: &mut Rng, lo: u32, hi: u32, n: usize) -> Vec<u32> {
    let mut pool: Vec<u32> = (lo..hi).collect();
    for i in 0..n {
        let j = i + rng.below((pool.len() - i) as u64) as usize;
        pool.swap(i, j);
    }
    pool.truncate(n);
    pool
}

/// An index drawn ∝ `w` (some weight positive).
fn weighted(rng: &mut Rng, w: &[f64]) -> usize {
    let total: f64 = w.iter().sum();
    let mut u = rng.next_f64() * total;
    for (i, &x) in w.iter().enumerate() {
        if x > 0.0 {
            if u < x {
                return i;
            }
            u -= x;
        }
    }
    w.iter().rposition(|&x| x > 0.0).expect("a positive weight")
}

#[cfg(test)]
#[path = "mqar_tests.rs"]
mod tests;
