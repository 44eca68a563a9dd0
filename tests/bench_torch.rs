//! The PyTorch references in bench/ are the same models as mixscale's (issue #9): for every
//! preset in architectures/, the torch model has exactly mixscale's parameter table (names,
//! shapes, weight-decay flags), and on tiny versions of the presets both start at the same
//! loss (≈ ln V) and follow the same loss trend on the same batches.
//!
//! Needs python with torch: `MIXSCALE_TORCH_PYTHON`, else `bench/.venv/bin/python`
//! (bench/setup_torch.sh). Without it the tests print why and pass (CI has no torch).

use candle_core::{DType, Device};
use mixscale::config::RunSpec;
use mixscale::model::LanguageModel;
use mixscale::train::bench::{self, torch};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> Option<PathBuf> {
    let p = std::env::var_os("MIXSCALE_TORCH_PYTHON").map(PathBuf::from).unwrap_or_else(|| root().join("bench/.venv/bin/python"));
    if torch::python_exists(&p) {
        Some(p)
    } else {
        eprintln!("SKIPPED: no PyTorch at {} (set MIXSCALE_TORCH_PYTHON or run bench/setup_torch.sh)", p.display());
        None
    }
}

/// Every preset, resolved with `sets`: (file stem, spec).
fn presets(sets: &[&str]) -> Vec<(String, RunSpec)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(root().join("architectures"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            let spec = crate::util::spec_from(&text, sets).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_stem().unwrap().to_string_lossy().into_owned(), spec)
        })
        .collect()
}

fn opts(python: &Path, batch: usize, seq_len: usize, warmup: usize, steps: usize) -> bench::BenchOptions {
    bench::BenchOptions { batch, seq_len, steps, warmup, threads: 1, torch_python: python.to_path_buf(), bench_dir: root().join("bench"), device: Device::Cpu, profile: false, rounds: 1, interleave: false }
}

/// Parameter tables equal for every preset at its real size (one python process, no training).
#[test]
fn torch_reference_has_mixscales_parameters_for_every_preset() {
    let Some(py) = python() else { return };
    let dir = crate::util::tempdir();
    let all = presets(&[]);
    let jobs: Vec<_> = all.iter().map(|(_, s)| torch::TorchJob::new(s, 1, s.train.seq_len, 0, 1, 1, None)).collect();
    let runs = torch::run_torch(&py, &root().join("bench"), dir.path(), &jobs, true).unwrap();
    for ((name, spec), t) in all.iter().zip(&runs) {
        let model = LanguageModel::new(&spec.model, spec.train.seq_len, 0, DType::F32, &Device::Cpu).unwrap();
        let ours = torch::param_table(&model);
        assert_eq!(torch::compare_params(&ours, &t.param_table), None, "{name}");
        let n = mixscale::model::count::Accounting::of(&model, spec.train.seq_len).params_total;
        assert_eq!(t.params_total, n, "{name}: parameter count");
    }
    assert!(runs.len() >= 11);
}

/// The strongest check: tiny presets started from mixscale's *own initial weights* (written as
/// safetensors, loaded by torch_lm.py) on the same batches compute the same first loss and
/// gradient norm (forward and backward agree) and the same 6-step loss trajectory (optimizer
/// and clipping agree), to f32 rounding.
#[test]
fn torch_reference_matches_mixscale_from_the_same_weights() {
    let Some(py) = python() else { return };
    let dir = crate::util::tempdir();
    // The MAD preset's data fix seq_len 127; its model is the attention one.
    let mut all: Vec<_> = presets(&["model.d_model=64"]).into_iter().filter(|(n, _)| !n.starts_with("mad_")).collect();
    for (_, spec) in &mut all {
        spec.model.n_layers = spec.model.layer_pattern.len().max(2);
    }
    let o = opts(&py, 2, 128, 0, 6);
    let mut jobs = Vec::new();
    let mut ours = Vec::new();
    for (i, (name, spec)) in all.iter().enumerate() {
        let tokens = dir.path().join(format!("tokens_{i}.u32"));
        let weights = dir.path().join(format!("init_{i}.safetensors"));
        let m = bench::run_mixscale(spec, &o, Some(&tokens), Some(&weights)).unwrap();
        let mut job = torch::TorchJob::new(spec, o.batch, o.seq_len, o.warmup, o.steps, 1, Some(tokens));
        job.init_weights = Some(weights);
        jobs.push(job);
        ours.push((name.clone(), m));
    }
    let runs = torch::run_torch(&py, &root().join("bench"), dir.path(), &jobs, false).unwrap();
    let mut failures = Vec::new();
    for ((name, m), t) in ours.iter().zip(&runs) {
        let rel = |a: f64, b: f64| (a - b).abs() / a.abs().max(b.abs()).max(1e-12);
        let loss_gap = m.losses.iter().zip(&t.losses).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        eprintln!(
            "{name}: loss0 {:.6}/{:.6}, grad norm0 {:.6}/{:.6}, max loss gap over {} steps {loss_gap:.2e}",
            m.losses[0], t.losses[0], m.grad_norms[0], t.grad_norms[0], m.losses.len()
        );
        if rel(m.losses[0], t.losses[0]) > 1e-6 {
            failures.push(format!("{name}: first loss {} vs torch {}", m.losses[0], t.losses[0]));
        }
        if rel(m.grad_norms[0], t.grad_norms[0]) > 1e-5 {
            failures.push(format!("{name}: first grad norm {} vs torch {}", m.grad_norms[0], t.grad_norms[0]));
        }
        if m.losses.len() != t.losses.len() || loss_gap > 2e-4 {
            failures.push(format!("{name}: losses {:?} vs torch {:?}", m.losses, t.losses));
        }
    }
    assert!(ours.len() >= 11);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Presets whose loss trend is not (yet) checked, and why.
const TREND_OPEN: &[(&str, &str)] = &[
    ("mamba2", "2 heads per layer: the 6-step drop hinges on the dt_bias draws (0.03-0.09 from seed to seed on either side); from the same weights the two agree to 1e-6 (test above)"),
    ("mqar_attention", "loss over 16 answer positions per sequence: a 6-step drop of ~0.02 is within noise"),
    ("mad_in_context_recall", "vocab 16: ln V too small for the trend check"),
];

/// Tiny presets (d 64, 2 layers or the whole layer pattern, seq 128, batch 2) trained 6 steps on the same batches:
/// both start at ≈ ln V and the loss drops agree within 35 % (all presets but [`TREND_OPEN`]).
#[test]
fn torch_reference_trains_like_mixscale_on_tiny_presets() {
    trend_check(&|name| !TREND_OPEN.iter().any(|(n, _)| *n == name));
}

/// The presets of [`TREND_OPEN`] (seed-dependent; run with --ignored to see the numbers).
#[test]
#[ignore = "init-variance-dominated trends, see TREND_OPEN"]
fn torch_reference_trend_open_presets() {
    trend_check(&|name| name == "mamba2" || name == "mqar_attention");
}

fn trend_check(select: &dyn Fn(&str) -> bool) {
    let Some(py) = python() else { return };
    let dir = crate::util::tempdir();
    let mut all: Vec<_> = presets(&["model.d_model=64"]).into_iter().filter(|(n, _)| select(n)).collect();
    for (_, spec) in &mut all {
        // 2 layers, or the whole layer pattern (the hybrid's GDN, GDN, GDN, attention).
        spec.model.n_layers = spec.model.layer_pattern.len().max(2);
    }
    let o = opts(&py, 2, 128, 0, 6);
    let mut jobs = Vec::new();
    let mut ours = Vec::new();
    for (i, (name, spec)) in all.iter().enumerate() {
        let tokens = dir.path().join(format!("tokens_{i}.u32"));
        let m = bench::run_mixscale(spec, &o, Some(&tokens), None).unwrap();
        jobs.push(torch::TorchJob::new(spec, o.batch, o.seq_len, o.warmup, o.steps, 1, Some(tokens)));
        ours.push((name.clone(), spec.model.vocab_size, m));
    }
    let runs = torch::run_torch(&py, &root().join("bench"), dir.path(), &jobs, false).unwrap();
    let mut failures = Vec::new();
    for ((name, vocab, m), t) in ours.iter().zip(&runs) {
        let ln_v = (*vocab as f64).ln();
        let (m0, t0) = (m.losses[0], t.losses[0]);
        let (m1, t1) = (*m.losses.last().unwrap(), *t.losses.last().unwrap());
        let (dm, dt) = (m0 - m1, t0 - t1);
        eprintln!("{name}: mixscale {m0:.4} -> {m1:.4} (drop {dm:.4}), torch {t0:.4} -> {t1:.4} (drop {dt:.4})");
        if let Some(d) = torch::compare_params(&m.param_table, &t.param_table) {
            failures.push(format!("{name}: {d}"));
        }
        if (m0 - ln_v).abs() > 0.1 || (t0 - ln_v).abs() > 0.1 {
            failures.push(format!("{name}: initial losses {m0}, {t0} vs ln V {ln_v}"));
        }
        // The slowest learner (Gated DeltaNet) drops ~0.045 in 6 steps on both sides.
        if dm < 0.02 || dt < 0.02 {
            failures.push(format!("{name}: losses must fall: mixscale {m0} -> {m1}, torch {t0} -> {t1}"));
        }
        if (dm - dt).abs() > 0.35 * dm.max(dt) {
            failures.push(format!("{name}: loss drops differ: mixscale {dm:.4}, torch {dt:.4}"));
        }
    }
    assert!(!ours.is_empty());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `bench --interleave` (`bench::pair`): one long-lived worker per side, taking turns. Every
/// round is a turn of each side; the worker trains on the same batches in the same order as the
/// in-process run (its losses match `run_mixscale`'s over warmup + rounds × steps); the PyTorch
/// side, when there is one, reports as many losses and one ratio per round; without it the
/// mixscale side still runs every round and the row says why there is no comparison.
#[test]
fn interleaved_bench_takes_turns_on_the_same_batches() {
    let dir = crate::util::tempdir();
    let cfg = root().join("architectures/attention.yaml");
    let sets = ["model.d_model=64", "model.n_layers=1"];
    let spec = crate::util::spec_from(&std::fs::read_to_string(&cfg).unwrap(), &sets).unwrap();
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_mixscale"));
    let py = python().unwrap_or_else(|| PathBuf::from("/nonexistent/python"));
    let mut o = opts(&py, 2, 64, 1, 2);
    o.rounds = 3;
    o.interleave = true;
    let row = bench::bench_preset(&exe, "attention", &cfg, &sets, &spec, &o, "cpu", dir.path(), 1e9).unwrap();
    let plain = bench::run_mixscale(&spec, &bench::BenchOptions { steps: 6, interleave: false, ..o.clone() }, None, None).unwrap();
    assert_eq!(row.mixscale.losses.len(), 7, "warmup + rounds × steps");
    for (i, (a, b)) in row.mixscale.losses.iter().zip(&plain.losses).enumerate() {
        assert!((a - b).abs() <= 1e-5 * b.abs(), "step {i}: interleaved worker loss {a} vs in-process {b}");
    }
    assert!(row.mixscale.tokens_per_s.is_finite() && row.mixscale.tokens_per_s > 0.0);
    match &row.torch {
        Some(t) => {
            assert!(row.comparable, "{:?}", row.note);
            assert_eq!(t.losses.len(), 7);
            assert_eq!(row.round_ratios.len(), 3);
            assert!(row.round_ratios.iter().all(|r| r.is_finite() && *r > 0.0));
        }
        None => {
            assert!(row.round_ratios.is_empty());
            assert!(row.note.as_deref().unwrap_or("").contains("not found"), "{:?}", row.note);
        }
    }
}
