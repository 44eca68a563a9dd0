//! Tests of the synthetic language (included from `language.rs`).

use super::*;
use std::collections::HashMap;

fn lang(vocab: usize) -> Language {
    Language::new(&LanguageParams {
        vocab_size: vocab,
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn rejects_bad_params() {
    assert!(Language::new(&LanguageParams {
        vocab_size: 63,
        ..Default::default()
    })
    .is_err());
    assert!(Language::new(&LanguageParams {
        p_word: 0.0,
        ..Default::default()
    })
    .is_err());
    assert!(Language::new(&LanguageParams {
        p_ref: f64::NAN,
        ..Default::default()
    })
    .is_err());
    assert!(Language::new(&LanguageParams {
        def_len: 0,
        ..Default::default()
    })
    .is_err());
    assert!(Language::new(&LanguageParams {
        vocab_size: 64,
        n_names: 40,
        ..Default::default()
    })
    .is_err());
    assert!(Language::new(&LanguageParams {
        vocab_size: 64,
        ..Default::default()
    })
    .is_ok());
}

#[test]
fn deterministic_and_distinct_streams() {
    let l = lang(512);
    let a = l.sequence(Split::Train, 1, 5, 200);
    assert_eq!(a, l.sequence(Split::Train, 1, 5, 200));
    assert_eq!(
        a,
        lang(512).sequence(Split::Train, 1, 5, 200),
        "rebuilt language differs"
    );
    assert_ne!(a.0, l.sequence(Split::Train, 1, 6, 200).0);
    assert_ne!(a.0, l.sequence(Split::Train, 2, 5, 200).0);
    assert_ne!(a.0, l.sequence(Split::Val, 1, 5, 200).0);
    // A shorter request is a prefix of a longer one.
    let short = l.sequence(Split::Train, 1, 5, 50);
    assert_eq!(short.0[..], a.0[..50]);
    assert_eq!(short.1[..], a.1[..50]);
    // Different language seeds give different languages.
    let other = Language::new(&LanguageParams {
        language_seed: 9,
        ..Default::default()
    })
    .unwrap();
    assert_ne!(a.0, other.sequence(Split::Train, 1, 5, 200).0);
    // Train and val never share a whole sequence in a sample.
    let train: std::collections::HashSet<Vec<u32>> = (0..300)
        .map(|i| l.sequence(Split::Train, 0, i, 64).0)
        .collect();
    assert!((0..300).all(|i| !train.contains(&l.sequence(Split::Val, 0, i, 64).0)));
    assert!(l.sequence(Split::Val, 0, 0, 0).0.is_empty());
    assert_eq!(l.sequence(Split::Val, 0, 0, 1), (vec![BOS], vec![0.0]));
}

#[test]
fn tokens_in_range_and_nlp_valid() {
    for vocab in [64, 512, 1000, 4096] {
        let l = lang(vocab);
        for i in 0..50 {
            let (t, n) = l.sequence(Split::Val, 3, i, 300);
            assert_eq!((t[0], n[0]), (BOS, 0.0));
            assert!(t.iter().all(|&x| (x as usize) < vocab));
            assert!(t[1..].iter().all(|&x| x != BOS), "BOS only at position 0");
            assert!(n.iter().all(|x| x.is_finite() && *x >= 0.0));
        }
    }
}

/// Full next-token distributions by replay agree with the generator's reported −ln p,
/// for the defaults and for a few edge settings of the knobs.
#[test]
fn exact_conditionals_by_replay() {
    let variants = [
        LanguageParams {
            vocab_size: 64,
            ..Default::default()
        },
        LanguageParams {
            vocab_size: 80,
            n_names: 0,
            max_depth: 0,
            word_topic_weight: 1.0,
            ..Default::default()
        },
        LanguageParams {
            vocab_size: 100,
            n_names: 2,
            def_len: 1,
            min_doc_len: 0,
            p_eod: 0.2,
            class_ctx_weights: [0.0, 0.0, 1.0],
            word_topic_weight: 0.0,
            ..Default::default()
        },
    ];
    for (v, p) in variants.iter().enumerate() {
        let l = Language::new(p).unwrap();
        let (mut checked, mut copies) = (0, 0);
        for i in 0..30 {
            let (t, n) = l.sequence(Split::Train, 11, i, 120);
            for pos in 1..t.len() {
                let d = l.next_distribution(&t[..pos]);
                assert_eq!(d.len(), p.vocab_size);
                let s: f64 = d.iter().sum();
                assert!(
                    (s - 1.0).abs() < 1e-9,
                    "variant {v}: sum {s} at seq {i} pos {pos}"
                );
                let q = d[t[pos] as usize];
                assert!(
                    (q - (-n[pos]).exp()).abs() < 1e-9,
                    "variant {v}: p {q} vs nlp {}",
                    n[pos]
                );
                assert!(
                    (q.ln() + n[pos]).abs() < 1e-9,
                    "variant {v}: seq {i} pos {pos}"
                );
                copies += (q == 1.0) as usize;
                checked += 1;
            }
        }
        assert_eq!(checked, 30 * 119);
        assert_eq!(copies > 0, p.n_names > 0, "variant {v}: copies {copies}");
    }
}

/// The sampler draws from the distribution it reports. (1) The mean −ln p of the sampled
/// tokens matches the mean entropy H_t of the replayed conditionals: the differences
/// nlp_t − H_t have conditional mean 0 (a martingale), so they are uncorrelated and their sum
/// has variance Σ Var_t, with Var_t = Σ p (ln p)² − H_t² computed exactly; we allow 5 σ.
/// (2) The randomised probability integral transform u_t = F_t(x_t−) + V·p_t(x_t) (V uniform,
/// F_t the conditional CDF in token-id order) is exactly i.i.d. Uniform(0, 1) given any
/// history when the sampler matches; a 20-bin chi-square (19 dof) must stay below 50
/// (p ≈ 1e-4). Vocab 128 gives classes of ~6 words, so word-level errors show up.
#[test]
fn sampler_matches_reported_distribution() {
    let l = lang(128);
    let mut rng = Rng::new(99);
    let (mut diff, mut var, mut count) = (0.0, 0.0, 0usize);
    let mut bins = [0usize; 20];
    for i in 0..300 {
        let (t, n) = l.sequence(Split::Val, 5, i, 64);
        for pos in 1..t.len() {
            let d = l.next_distribution(&t[..pos]);
            let h: f64 = d.iter().filter(|&&p| p > 0.0).map(|p| -p * p.ln()).sum();
            let m2: f64 = d
                .iter()
                .filter(|&&p| p > 0.0)
                .map(|p| p * p.ln() * p.ln())
                .sum();
            diff += n[pos] - h;
            var += m2 - h * h;
            count += 1;
            let below: f64 = d[..t[pos] as usize].iter().sum();
            let u = below + rng.next_f64() * d[t[pos] as usize];
            bins[((u * 20.0) as usize).min(19)] += 1;
        }
    }
    let sigma = var.sqrt() / count as f64;
    let diff = diff / count as f64;
    assert!(sigma > 0.0 && sigma < 0.05, "sigma {sigma}");
    assert!(
        diff.abs() < 5.0 * sigma,
        "mean nlp - mean H = {diff}, sigma {sigma}"
    );
    let e = count as f64 / 20.0;
    let chi: f64 = bins.iter().map(|&b| (b as f64 - e).powi(2) / e).sum();
    println!("PIT chi-square {chi:.1}, mean nlp - H = {diff:.5} (sigma {sigma:.5})");
    assert!(chi < 50.0, "PIT chi-square {chi}, bins {bins:?}");
}

/// Structural checks from the tokens alone: definitions, exact copies, balanced brackets.
#[test]
fn references_copy_and_brackets_balance() {
    let l = lang(512);
    let p = l.params().clone();
    let (name0, word0) = (l.name0, l.word0);
    let (mut refs, mut defs_seen, mut copied) = (0, 0, 0);
    for i in 0..400 {
        let (t, n) = l.sequence(Split::Train, 7, i, 257);
        let mut stack: Vec<u32> = Vec::new();
        let mut defs: HashMap<u32, Vec<u32>> = HashMap::new();
        let mut pos = 1;
        while pos < t.len() {
            let x = t[pos];
            match l.kind(x) {
                Kind::Open(_) => stack.push(x - l.open0),
                Kind::Close(j) => assert_eq!(stack.pop(), Some(j as u32), "close without open"),
                Kind::Eod => {
                    assert!(stack.is_empty(), "EOD inside brackets");
                    defs.clear();
                }
                Kind::Name(_) => {
                    assert!(!defs.contains_key(&x), "name redefined");
                    let words = &t[pos + 1..(pos + 1 + p.def_len).min(t.len())];
                    assert!(words.iter().all(|&w| w >= word0));
                    defs.insert(x, words.to_vec());
                    defs_seen += 1;
                    pos += words.len();
                }
                Kind::Ref => {
                    let Some(&name) = t.get(pos + 1) else { break };
                    assert!(name >= name0 && name < word0);
                    let def = defs.get(&name).expect("reference to undefined name");
                    let end = (pos + 2 + p.def_len).min(t.len());
                    assert_eq!(t[pos + 2..end], def[..end - pos - 2], "copy differs");
                    assert!(n[pos + 2..end].iter().all(|&x| x == 0.0));
                    refs += 1;
                    copied += end - pos - 2;
                    pos = end - 1;
                }
                Kind::Word(_) => {}
                Kind::Bos => panic!("BOS inside sequence"),
            }
            pos += 1;
        }
    }
    assert!(
        refs > 100 && defs_seen > 100,
        "refs {refs} defs {defs_seen} copied {copied}"
    );
}

/// Unigram and bigram cross-entropy (counts on train, add-k smoothed, evaluated on val).
fn ngram_xent(l: &Language, n_train: u64, n_val: u64, len: usize) -> (f64, f64) {
    let v = l.vocab_size();
    let mut uni = vec![0f64; v];
    let mut bi = vec![0f64; v * v];
    for i in 0..n_train {
        let (t, _) = l.sequence(Split::Train, 0, i, len);
        for w in t.windows(2) {
            uni[w[1] as usize] += 1.0;
            bi[w[0] as usize * v + w[1] as usize] += 1.0;
        }
    }
    let total: f64 = uni.iter().sum();
    let row: Vec<f64> = (0..v)
        .map(|a| bi[a * v..(a + 1) * v].iter().sum())
        .collect();
    let (ku, kb) = (0.5, 0.05);
    let (mut hu, mut hb, mut count) = (0.0, 0.0, 0.0);
    for i in 0..n_val {
        let (t, _) = l.sequence(Split::Val, 0, i, len);
        for w in t.windows(2) {
            let (a, b) = (w[0] as usize, w[1] as usize);
            let pu = (uni[b] + ku) / (total + ku * v as f64);
            // Bigram interpolated with the unigram for unseen pairs.
            let pb = (bi[a * v + b] + kb * v as f64 * pu) / (row[a] + kb * v as f64);
            hu -= pu.ln();
            hb -= pb.ln();
            count += 1.0;
        }
    }
    (hu / count, hb / count)
}

/// The floor is a few nats, and unigram and bigram models are clearly worse than it.
#[test]
fn floor_below_ngram_baselines() {
    let l = lang(512);
    let len = 257;
    let floor = l.mean_nlp(Split::Val, 0, 2000, len);
    let (uni, bi) = ngram_xent(&l, 8000, 2000, len);
    // Fraction of tokens that are copies inside references (probability 1).
    let (mut copies, mut total) = (0usize, 0usize);
    for i in 0..2000 {
        let (t, _) = l.sequence(Split::Val, 0, i, len);
        let mut j = 1;
        while j < t.len() {
            if t[j] == REF {
                let end = (j + 2 + l.params().def_len).min(t.len());
                copies += end.saturating_sub(j + 2);
                j = end;
            } else {
                j += 1;
            }
        }
        total += len - 1;
    }
    let recall = copies as f64 / total as f64;
    println!("vocab 512 len {len}: floor {floor:.4} unigram {uni:.4} bigram {bi:.4} recall frac {recall:.4}");
    println!("{}", l.describe());
    assert!((2.0..6.0).contains(&floor), "floor {floor}");
    assert!(uni > floor + 1.0, "unigram {uni} vs floor {floor}");
    assert!(bi > floor + 0.5, "bigram {bi} vs floor {floor}");
    assert!(uni > bi + 0.1, "bigram {bi} should beat unigram {uni}");
    assert!((0.05..0.15).contains(&recall), "recall fraction {recall}");
}

#[test]
fn throughput_smoke() {
    let l = lang(512);
    let start = std::time::Instant::now();
    let mut n = 0;
    for i in 0..4000 {
        n += l.sequence(Split::Train, 0, i, 257).0.len();
    }
    let dt = start.elapsed().as_secs_f64();
    println!(
        "{n} tokens in {dt:.3}s ({:.1} M tok/s)",
        n as f64 / dt / 1e6
    );
    assert_eq!(n, 4000 * 257);
}
