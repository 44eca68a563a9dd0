use super::*;
use crate::data::language::Split;
use std::collections::HashMap;

fn mad(task: MadTask, o: MadOptions) -> Mad {
    Mad::new(&MadParams::resolve(task, &o).unwrap()).unwrap()
}

/// The baselines of data.md §4b, and MAD's constraints as located errors.
#[test]
fn baselines_and_checks() {
    let p = MadParams::resolve(MadTask::NoisyInContextRecall, &MadOptions::default()).unwrap();
    assert_eq!((p.vocab_size, p.seq_len, p.noise_vocab_size, p.frac_noise, p.multi_query), (32, 128, 16, 0.2, true));
    assert_eq!((p.num_train_examples, p.num_test_examples, p.out_len()), (12_800, 1_280, 127));
    let p = MadParams::resolve(MadTask::Memorization, &MadOptions::default()).unwrap();
    assert_eq!((p.vocab_size, p.seq_len, p.num_train_examples, p.out_len()), (256, 32, 256, 32));
    let p = MadParams::resolve(MadTask::SelectiveCopying, &MadOptions::default()).unwrap();
    assert_eq!((p.vocab_size, p.seq_len, p.num_tokens_to_copy, p.out_len()), (16, 256, 16, 256));
    let bad = |t, o: MadOptions| MadParams::resolve(t, &o).unwrap_err().0;
    assert_eq!(bad(MadTask::SelectiveCopying, MadOptions { seq_len: Some(33), ..Default::default() }), "seq_len");
    assert_eq!(bad(MadTask::InContextRecall, MadOptions { frac_noise: Some(0.3), ..Default::default() }), "noise_vocab_size");
    assert_eq!(bad(MadTask::InContextRecall, MadOptions { seq_len: Some(127), ..Default::default() }), "seq_len");
    assert_eq!(bad(MadTask::NoisyInContextRecall, MadOptions { vocab_size: Some(17), ..Default::default() }), "vocab_size");
    assert!(trainable(MadTask::Compression).is_err() && trainable(MadTask::Memorization).is_ok());
}

/// Examples are pure functions of (split, seed, index); training cycles a finite set.
#[test]
fn deterministic_and_finite_training_set() {
    let m = mad(MadTask::InContextRecall, MadOptions { num_train_examples: Some(5), ..Default::default() });
    let a = m.example(Split::Train, 3, 2);
    assert_eq!(a.inputs, m.example(Split::Train, 3, 2).inputs);
    assert_eq!(a.inputs, m.example(Split::Train, 3, 7).inputs, "index 7 = index 2 of a 5-example set");
    assert_ne!(a.inputs, m.example(Split::Train, 3, 3).inputs);
    assert_ne!(a.inputs, m.example(Split::Train, 4, 2).inputs);
    assert_ne!(m.example(Split::Val, 3, 2).inputs, m.example(Split::Val, 3, 7).inputs, "the test set is not cycled");
}

/// Recall, noisy recall: train = next-token targets everywhere; test scores exactly the
/// values whose key was seen before (multi-query) plus the probe, each the value bound earlier.
#[test]
fn recall_semantics_and_noise_rate() {
    for (task, frac) in [(MadTask::InContextRecall, 0.0), (MadTask::NoisyInContextRecall, 0.4)] {
        let m = mad(task, MadOptions { frac_noise: Some(frac), ..Default::default() });
        let p = m.params().clone();
        let ns = (p.vocab_size - p.noise_vocab_size) as u32;
        let (mut noise_slots, mut slots) = (0usize, 0usize);
        for i in 0..200 {
            let tr = m.example(Split::Train, 1, i);
            assert_eq!(tr.inputs.len(), p.out_len());
            assert!(tr.scored.iter().all(|&s| s));
            assert_eq!(&tr.inputs[1..], &tr.targets[..tr.targets.len() - 1], "train targets are the next inputs");
            let te = m.example(Split::Val, 1, i);
            let n = te.inputs.len();
            assert_eq!(n, p.out_len());
            // Rebuild the full sequence: inputs plus the last target.
            let mut full = te.inputs.clone();
            full.push(te.targets[n - 1]);
            let mut bound: HashMap<u32, u32> = HashMap::new();
            let mut want_scored = vec![false; n];
            for s in (0..full.len()).step_by(2) {
                let (k, v) = (full[s], full[s + 1]);
                slots += 1;
                if k >= ns {
                    assert!(v >= ns, "noise comes in pairs of noise tokens");
                    noise_slots += 1;
                    continue;
                }
                assert!(k < ns / 2 && (ns / 2..ns).contains(&v), "key/value ranges: {k} {v}");
                if let Some(&b) = bound.get(&k) {
                    assert_eq!(b, v, "a key keeps its value within a sequence");
                    want_scored[s] = true; // predicting full[s+1] from position s
                }
                bound.insert(k, v);
            }
            assert!(want_scored[n - 1], "the final probe is always scored");
            assert_eq!(te.scored, want_scored);
            for j in (0..n).filter(|&j| te.scored[j]) {
                assert_eq!(te.targets[j], full[j + 1]);
            }
        }
        let rate = noise_slots as f64 / slots as f64;
        // The probe slot and one guaranteed pair are never noise: expected ≈ frac·(1 − 2/64).
        assert!((rate - frac * (1.0 - 2.0 / 64.0)).abs() < 0.02, "{task:?} noise rate {rate}");
    }
}

/// Fuzzy recall: left padding only, key/value motifs from their halves, test keys at the
/// maximum motif size, the probe value scored at the end.
#[test]
fn fuzzy_recall_shape() {
    let m = mad(MadTask::FuzzyInContextRecall, MadOptions::default());
    let p = m.params().clone();
    let pad = p.vocab_size as u32 - 1;
    for i in 0..100 {
        for split in [Split::Train, Split::Val] {
            let ex = m.example(split, 2, i);
            assert_eq!(ex.inputs.len(), p.out_len());
            let first = ex.inputs.iter().position(|&x| x != pad).unwrap();
            assert!(ex.inputs[first..].iter().all(|&x| x != pad), "padding only at the front");
            if split == Split::Val {
                let scored: Vec<usize> = (0..ex.scored.len()).filter(|&j| ex.scored[j]).collect();
                assert!(!scored.is_empty() && *scored.last().unwrap() == p.out_len() - 1);
                let ns = p.vocab_size as u32 - 1;
                assert!(scored.iter().all(|&j| (ns / 2..ns).contains(&ex.targets[j])), "scored targets are value tokens");
            }
        }
    }
}

/// Selective copying: the data tokens reappear in order after the copy token, blanks elsewhere.
#[test]
fn selective_copying_semantics() {
    let m = mad(MadTask::SelectiveCopying, MadOptions { seq_len: Some(64), num_tokens_to_copy: Some(8), ..Default::default() });
    let (copy, blank) = (15u32, 14u32);
    for i in 0..50 {
        let ex = m.example(Split::Train, 0, i);
        assert_eq!(ex.inputs.len(), 64);
        let c = ex.inputs.iter().position(|&x| x == copy).unwrap();
        assert_eq!(c, 64 - 8 - 1);
        let data: Vec<u32> = ex.inputs[..c].iter().copied().filter(|&x| x != blank).collect();
        assert_eq!(data.len(), 8);
        assert_ne!(ex.inputs[c - 1], blank, "no blank after the last data token");
        assert!(ex.inputs[c + 1..].iter().all(|&x| x == blank));
        assert_eq!(ex.scored.iter().filter(|&&s| s).count(), 8);
        assert!(ex.scored[c + 1..].iter().all(|&s| s));
        assert_eq!(&ex.targets[c + 1..], &data[..]);
    }
}

/// Memorization: one fixed global map (independent of run seed and split), targets at INSERT.
#[test]
fn memorization_uses_one_fixed_map() {
    let m = mad(MadTask::Memorization, MadOptions::default());
    let mut map: HashMap<u32, u32> = HashMap::new();
    for (seed, split) in [(0, Split::Train), (9, Split::Train), (0, Split::Val)] {
        for i in 0..30 {
            let ex = m.example(split, seed, i);
            assert_eq!(ex.inputs.len(), 32);
            for s in (0..32).step_by(2) {
                assert_eq!(ex.inputs[s + 1], 255);
                assert!(!ex.scored[s] && ex.scored[s + 1]);
                let (k, v) = (ex.inputs[s], ex.targets[s + 1]);
                assert!(k < 127 && (127..255).contains(&v));
                assert_eq!(*map.entry(k).or_insert(v), v, "the map is global");
            }
        }
    }
    let values: std::collections::BTreeSet<u32> = map.values().copied().collect();
    assert_eq!(values.len(), map.len(), "the map is injective");
    let fresh = mad(MadTask::Memorization, MadOptions::default());
    assert_eq!(fresh.example(Split::Train, 0, 0).targets, m.example(Split::Train, 0, 0).targets);
}

/// Compression: targets are the inputs, ending with the compression token.
#[test]
fn compression_generator() {
    let m = mad(MadTask::Compression, MadOptions::default());
    let ex = m.example(Split::Train, 0, 0);
    assert_eq!(ex.inputs.len(), 32);
    assert_eq!(ex.inputs, ex.targets);
    assert_eq!(*ex.inputs.last().unwrap(), 15);
    assert!(ex.inputs[..31].iter().all(|&x| x < 15));
}
