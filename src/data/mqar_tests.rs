use super::*;

fn params(v: usize, n: usize, t: usize, a: f64, random: bool) -> MqarParams {
    MqarParams { vocab_size: v, num_kv_pairs: n, power_a: a, random_non_queries: random, seq_len: t }
}

/// Checks one example against the definition; returns the gaps of its queries.
fn check_example(ex: &Example, p: &MqarParams) -> Vec<usize> {
    let (v, n, t) = (p.vocab_size as u32, p.num_kv_pairs, p.seq_len);
    let c = 2 * n;
    assert_eq!((ex.inputs.len(), ex.targets.len(), ex.scored.len()), (t, t, t));
    let keys: Vec<u32> = (0..n).map(|i| ex.inputs[2 * i]).collect();
    let values: Vec<u32> = (0..n).map(|i| ex.inputs[2 * i + 1]).collect();
    assert!(keys.iter().all(|&k| (1..v / 2).contains(&k)), "keys in [1, V/2): {keys:?}");
    assert!(values.iter().all(|&x| (v / 2..v).contains(&x)), "values in [V/2, V): {values:?}");
    let distinct = |xs: &[u32]| xs.iter().collect::<std::collections::BTreeSet<_>>().len() == xs.len();
    assert!(distinct(&keys) && distinct(&values));
    assert!(ex.scored[..c].iter().all(|s| !s), "nothing scored in the context");
    let mut gaps = Vec::new();
    for pos in (0..t).filter(|&p| ex.scored[p]) {
        assert!(pos >= c && (pos - c) % 2 == 0, "answer positions are C + 2g: {pos}");
        let k = ex.inputs[pos];
        let i = keys.iter().position(|&x| x == k).expect("a scored position re-presents a key");
        assert_eq!(ex.targets[pos], values[i], "the answer is the value bound to the key earlier");
        gaps.push((pos - c) / 2);
    }
    assert_eq!(gaps.len(), n, "every key queried exactly once");
    let mut q: Vec<u32> = gaps.iter().map(|g| ex.inputs[c + 2 * g]).collect();
    q.sort();
    let mut ks = keys.clone();
    ks.sort();
    assert_eq!(q, ks);
    assert!((0..t).filter(|&i| !ex.scored[i]).all(|i| ex.targets[i] == 0), "unscored targets are 0");
    if !p.random_non_queries {
        assert!((c..t).filter(|&i| !ex.scored[i]).all(|i| ex.inputs[i] == 0), "non-queries are 0");
    } else {
        assert!(ex.inputs.iter().all(|&x| x < v));
    }
    gaps
}

#[test]
fn examples_follow_the_definition() {
    for (v, n, t, random) in [(8192, 16, 256, true), (8192, 16, 256, false), (100, 4, 64, true), (66, 16, 64, false)] {
        let p = params(v, n, t, 0.01, random);
        let m = Mqar::new(&p).unwrap();
        for i in 0..200 {
            check_example(&m.example(Split::Train, 5, i), &p);
            check_example(&m.example(Split::Val, 0, i), &p);
        }
    }
}

#[test]
fn random_non_queries_fill_the_zeros() {
    let p = params(8192, 4, 64, 0.01, true);
    let m = Mqar::new(&p).unwrap();
    let ex = m.example(Split::Train, 1, 0);
    let fillers: Vec<u32> = (8..64).filter(|&i| !ex.scored[i]).map(|i| ex.inputs[i]).collect();
    assert!(fillers.iter().filter(|&&x| x == 0).count() <= 1, "{fillers:?}");
    let distinct = fillers.iter().collect::<std::collections::BTreeSet<_>>().len();
    assert!(distinct > 40, "uniform random fillers: {distinct} distinct of {}", fillers.len());
}

#[test]
fn query_gaps_follow_the_power_law() {
    // One pair: the gap is a single draw from p(g) ∝ (g+1)^(a−1) over g < space = 31.
    for a in [0.01, 0.5, 1.0] {
        let p = params(8192, 1, 64, a, false);
        let m = Mqar::new(&p).unwrap();
        let pmf = m.gap_pmf();
        assert_eq!(pmf.len(), 31);
        let n = 40_000;
        let mut hist = vec![0usize; 31];
        for i in 0..n {
            hist[check_example(&m.example(Split::Train, 3, i), &p)[0]] += 1;
        }
        for (g, (&h, &q)) in hist.iter().zip(&pmf).enumerate() {
            let want = q * n as f64;
            let sd = (want * (1.0 - q)).sqrt();
            assert!((h as f64 - want).abs() < 5.0 * sd + 1.0, "a={a} g={g}: {h} vs {want:.0}");
        }
    }
    // power_a = 0.01: p(0) ≈ 0.25 of 31 slots, far above uniform; power_a = 1 is uniform.
    let p = Mqar::new(&params(8192, 1, 64, 0.01, false)).unwrap().gap_pmf();
    assert!(p[0] > 0.2 && p[0] > 20.0 * p[30], "{:?}", &p[..3]);
    let u = Mqar::new(&params(8192, 1, 64, 1.0, false)).unwrap().gap_pmf();
    assert!(u.iter().all(|&x| (x - 1.0 / 31.0).abs() < 1e-12));
}

#[test]
fn many_pairs_still_favour_early_gaps() {
    let p = params(8192, 16, 256, 0.01, true);
    let m = Mqar::new(&p).unwrap();
    let mut early = 0;
    let mut late = 0;
    for i in 0..500 {
        for g in check_example(&m.example(Split::Train, 9, i), &p) {
            if g < 16 {
                early += 1;
            } else if g >= 96 {
                late += 1;
            }
        }
    }
    assert!(early > 2 * late, "early {early} late {late}");
}

#[test]
fn streams_are_deterministic_and_distinct() {
    let p = params(8192, 8, 128, 0.01, true);
    let (a, b) = (Mqar::new(&p).unwrap(), Mqar::new(&p).unwrap());
    assert_eq!(a.example(Split::Train, 4, 17), b.example(Split::Train, 4, 17));
    assert_ne!(a.example(Split::Train, 4, 17), a.example(Split::Train, 4, 18));
    assert_ne!(a.example(Split::Train, 4, 17), a.example(Split::Train, 5, 17));
    assert_ne!(a.example(Split::Train, 0, 17), a.example(Split::Val, 0, 17));
}

#[test]
fn settings_and_constraints() {
    let p = MqarParams::resolve(Some("iclr24_fig2_t256_kv16"), None, None, None, None, 256).unwrap();
    assert_eq!(p, params(8192, 16, 256, 0.01, false));
    let p = MqarParams::resolve(Some("zoology_t64_kv4"), Some(1024), Some(8), None, None, 64).unwrap();
    assert_eq!(p, params(1024, 8, 64, 0.01, true), "explicit fields override the setting");
    assert_eq!(MqarParams::resolve(None, None, None, None, None, 64).unwrap(), params(8192, 8, 64, 0.01, true));
    for s in SETTINGS {
        MqarParams::resolve(Some(s.name), None, None, None, None, s.seq_len).unwrap();
    }
    let e = |r: Result<MqarParams, ParamError>| r.unwrap_err();
    assert_eq!(e(MqarParams::resolve(Some("zoology_t64_kv4"), None, None, None, None, 128)).0, "train.seq_len");
    let (k, m) = e(MqarParams::resolve(Some("nope"), None, None, None, None, 64));
    assert!(k == "data.setting" && m.contains("known: zoology_t64_kv4"), "{m}");
    assert_eq!(e(MqarParams::resolve(None, None, None, None, None, 63)).0, "train.seq_len");
    assert_eq!(e(MqarParams::resolve(None, Some(64), None, None, None, 64)).0, "data.vocab_size");
    assert_eq!(e(MqarParams::resolve(None, None, Some(17), None, None, 64)).0, "data.num_kv_pairs");
    assert_eq!(e(MqarParams::resolve(None, None, None, Some(0.0), None, 64)).0, "data.power_a");
}
