//! The MAD generators (see [`super`] for the conventions); each follows the corresponding
//! function of `mad-lab` `mad/data/instances.py`, drawing from mixscale's [`Rng`].

use super::{Mad, MadTask};
use crate::data::mqar::{distinct, Example};
use crate::data::rng::Rng;
use std::collections::HashMap;

/// A target: `None` is MAD's ignore index −100.
type Target = Option<u32>;

impl Mad {
    /// In-context recall and its noisy variant (`generate_in_context_recall_instance`):
    /// `seq_len/2 − 1` slots, each a (key, value) pair or, with probability `frac_noise`, two
    /// noise tokens; a key always maps to the same value within a sequence; then (copy prefix
    /// unless multi-query) a probe pair of a key seen before. Returns the unshifted sequence.
    pub(super) fn recall(&self, rng: &mut Rng) -> (Vec<u32>, Vec<Target>) {
        let p = &self.p;
        let ns = p.data_vocab() as u32;
        let (k_lo, k_hi, v_hi) = (0, ns / 2, ns);
        let pairs = p.seq_len / 2;
        // MAD keeps slot `not_noise_idx` a real pair; drawn over the pair slots that precede the
        // probe so a sequence always has a key to probe (MAD draws over all `pairs` slots and
        // fails on the rare draw where every earlier slot became noise).
        let not_noise = rng.below((pairs - 1) as u64) as usize;
        let (mut inputs, mut targets) = (Vec::with_capacity(p.seq_len + 1), Vec::with_capacity(p.seq_len + 1));
        let mut map: HashMap<u32, u32> = HashMap::new();
        let mut presented: Vec<u32> = Vec::new(); // distinct keys in first-seen order
        for i in 0..pairs - 1 {
            if p.frac_noise > 0.0 && i != not_noise && rng.next_f64() < p.frac_noise {
                for _ in 0..2 {
                    inputs.push(ns + rng.below(p.noise_vocab_size as u64) as u32);
                    targets.push(None);
                }
                continue;
            }
            let k = k_lo + rng.below((k_hi - k_lo) as u64) as u32;
            let seen = map.contains_key(&k);
            let v = *map.entry(k).or_insert_with(|| k_hi + rng.below((v_hi - k_hi) as u64) as u32);
            inputs.extend([k, v]);
            targets.extend([None, if seen && p.multi_query { Some(v) } else { None }]);
            if !seen {
                presented.push(k);
            }
        }
        let k_probe = presented[rng.below(presented.len() as u64) as usize];
        let v_probe = map[&k_probe];
        if !p.multi_query {
            inputs.push(p.vocab_size as u32 - 1);
            targets.push(None);
        }
        inputs.extend([k_probe, v_probe]);
        targets.extend([None, Some(v_probe)]);
        (inputs, targets)
    }

    /// Fuzzy in-context recall (`generate_fuzzy_in_context_recall_instance`): keys and values
    /// are tuples of 1..=motif distinct tokens (keys always of the maximum size at test time);
    /// a probe pair is planted at a random point and asked again at the end; left-padded to
    /// `seq_len + 1`. Returns the unshifted sequence.
    pub(super) fn fuzzy_recall(&self, rng: &mut Rng, train: bool) -> (Vec<u32>, Vec<Target>) {
        let p = &self.p;
        let ns = p.data_vocab() as u32;
        let (kv, vv) = (ns / 2, ns - ns / 2);
        let pad = if p.multi_query { p.vocab_size - 1 } else { p.vocab_size - 2 } as u32;
        let (km, vm) = (p.k_motif_size, p.v_motif_size);
        let k_size = |rng: &mut Rng| if train { 1 + rng.below(km as u64) as usize } else { km };
        let v_size = |rng: &mut Rng| 1 + rng.below(vm as u64) as usize;
        let key = |rng: &mut Rng, s: usize| distinct(rng, 0, kv, s);
        let value = |rng: &mut Rng, s: usize| distinct(rng, kv, kv + vv, s);
        let kps = k_size(rng);
        let vps = v_size(rng);
        let k_probe = key(rng, kps);
        let v_probe = value(rng, vps);
        let probe_size = kps + vps;
        let probe_idx = rng.below((p.seq_len - 2 * probe_size) as u64) as usize;
        let mut probe_added = false;
        let mut map: HashMap<Vec<u32>, Vec<u32>> = HashMap::new();
        let mut presented: HashMap<Vec<u32>, Vec<u32>> = HashMap::new();
        let (mut inputs, mut targets): (Vec<u32>, Vec<Target>) = (Vec::new(), Vec::new());
        while inputs.len() < p.seq_len - probe_size - (km + vm) {
            let ks = k_size(rng);
            let vs = v_size(rng);
            if inputs.len() >= probe_idx && !probe_added {
                inputs.extend(&k_probe);
                inputs.extend(&v_probe);
                targets.extend(std::iter::repeat(None).take(probe_size));
                map.insert(k_probe.clone(), v_probe.clone());
                presented.insert(k_probe.clone(), v_probe.clone());
                probe_added = true;
                continue;
            }
            if p.frac_noise > 0.0 && rng.next_f64() < p.frac_noise {
                for _ in 0..ks + vs {
                    inputs.push(ns + rng.below(p.noise_vocab_size as u64) as u32);
                    targets.push(None);
                }
                continue;
            }
            let k = key(rng, ks);
            let v = if k == k_probe {
                probe_added = true;
                v_probe.clone()
            } else {
                map.entry(k.clone()).or_insert_with(|| value(rng, vs)).clone()
            };
            inputs.extend(&k);
            inputs.extend(&v);
            targets.extend(std::iter::repeat(None).take(k.len()));
            let ask = presented.contains_key(&k) && p.multi_query;
            targets.extend(v.iter().map(|&x| if ask { Some(x) } else { None }));
            presented.insert(k, v);
        }
        if !p.multi_query {
            inputs.push(p.vocab_size as u32 - 1);
            targets.push(None);
        }
        inputs.extend(&k_probe);
        targets.extend(std::iter::repeat(None).take(kps));
        inputs.extend(&v_probe);
        targets.extend(v_probe.iter().map(|&x| Some(x)));
        let n_pad = (p.seq_len + 1).saturating_sub(inputs.len());
        let mut x = vec![pad; n_pad];
        x.extend(inputs);
        let mut y = vec![None; n_pad];
        y.extend(targets);
        (x, y)
    }

    /// Selective copying (`generate_copying_instance(selective=True)`): `n` data tokens with
    /// `seq_len − 2n − 1` blanks inserted before random data tokens (never after the last, as
    /// `np.insert` at indices `< n` does), the copy token, then `n` blanks whose targets are
    /// the data tokens in order. Only those `n` positions are scored, in both splits.
    pub(super) fn selective_copying(&self, rng: &mut Rng) -> Example {
        let p = &self.p;
        let n = p.num_tokens_to_copy;
        let (copy, blank) = (p.vocab_size as u32 - 1, p.vocab_size as u32 - 2);
        let nb = p.seq_len - 2 * n - 1;
        let data: Vec<u32> = (0..n).map(|_| rng.below(p.data_vocab() as u64) as u32).collect();
        let mut before = vec![0usize; n];
        for _ in 0..nb {
            before[rng.below(n as u64) as usize] += 1;
        }
        let mut inputs = Vec::with_capacity(p.seq_len);
        for (d, &c) in data.iter().zip(&before) {
            inputs.extend(std::iter::repeat(blank).take(c));
            inputs.push(*d);
        }
        inputs.push(copy);
        inputs.extend(std::iter::repeat(blank).take(n));
        let mut targets = vec![0u32; n + nb + 1];
        targets.extend(&data);
        let mut scored = vec![false; n + nb + 1];
        scored.extend(std::iter::repeat(true).take(n));
        Example { inputs, targets, scored }
    }

    /// Compression (`generate_compression_instance`): `seq_len − 1` uniform tokens (each
    /// replaced by a noise token with probability `frac_noise`) and the compression token;
    /// targets = inputs, every position scored (MAD returns `inputs, inputs`).
    pub(super) fn compression(&self, rng: &mut Rng) -> Example {
        let p = &self.p;
        let ns = p.data_vocab() as u32;
        let mut inputs: Vec<u32> = (0..p.seq_len - 1).map(|_| rng.below(ns as u64) as u32).collect();
        if p.frac_noise > 0.0 {
            for x in inputs.iter_mut() {
                if rng.next_f64() < p.frac_noise {
                    *x = ns + rng.below(p.noise_vocab_size as u64) as u32;
                }
            }
        }
        inputs.push(p.vocab_size as u32 - 1);
        Example { targets: inputs.clone(), scored: vec![true; inputs.len()], inputs }
    }

    /// Memorization (`generate_memorization_instance`): `seq_len/2` slots of (key, INSERT)
    /// (or two noise tokens), the target at INSERT being the key's value under the fixed global
    /// map ([`super::KV_MAP_SEED`]); the key positions are not scored. Same in both splits.
    pub(super) fn memorization(&self, rng: &mut Rng) -> Example {
        let p = &self.p;
        let ns = p.data_vocab() as u32;
        let insert = p.vocab_size as u32 - 1;
        let pairs = p.seq_len / 2;
        let not_noise = rng.below(pairs as u64) as usize;
        let (mut inputs, mut targets, mut scored) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..pairs {
            if p.frac_noise > 0.0 && i != not_noise && rng.next_f64() < p.frac_noise {
                for _ in 0..2 {
                    inputs.push(ns + rng.below(p.noise_vocab_size as u64) as u32);
                    targets.push(0);
                    scored.push(false);
                }
                continue;
            }
            let k = rng.below(self.kv_map.len() as u64) as u32;
            inputs.extend([k, insert]);
            targets.extend([0, self.kv_map[k as usize]]);
            scored.extend([false, true]);
        }
        Example { inputs, targets, scored }
    }
}

/// Whether a run can train `task` with mixscale's causal language models.
pub fn trainable(task: MadTask) -> Result<(), String> {
    match task {
        MadTask::Compression => Err("MAD's compression task needs its encoder-decoder backbone \
             (mad/model/auto_encoder.py: the last token's state must reconstruct the sequence); \
             mixscale builds causal language models only, where the task is a trivial copy"
            .into()),
        _ => Ok(()),
    }
}
