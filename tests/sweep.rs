use crate::util::{mixscale, tempdir, write, TINY};
use mixscale::config::YamlDoc;
use mixscale::sweep::expand::expand;
use mixscale::sweep::journal::{Journal, TrialRecord, TrialState};
use mixscale::sweep::plan::Plan;
use mixscale::sweep::spec::SweepSpec;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Writes the tiny base config and a sweep file into `dir`; returns the sweep path.
fn sweep_file(dir: &Path, body: &str) -> PathBuf {
    write(dir, "tiny.yaml", TINY);
    write(dir, "s.yaml", &format!("name: t\nbase: tiny.yaml\n{body}"))
}

fn load(dir: &Path, body: &str) -> mixscale::Result<SweepSpec> {
    SweepSpec::load(&sweep_file(dir, body))
}

fn runs(dir: &Path) -> String {
    dir.join("runs").display().to_string()
}

/// The study's trials.
fn trials(dir: &Path) -> Vec<TrialRecord> {
    let j = Journal::open(&dir.join("runs/t/study.journal")).unwrap();
    let mut s = j.read().unwrap();
    assert_eq!(s.len(), 1);
    s.remove(0).trials
}

fn attr<'a>(t: &'a TrialRecord, k: &str) -> &'a str {
    t.user_attrs.get(k).and_then(|v| v.as_str()).unwrap_or("")
}

/// run → loss column of results.csv.
fn results(dir: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(dir.join("runs/t/results.csv")).unwrap();
    let mut lines = text.lines();
    let h: Vec<&str> = lines.next().unwrap().split(',').collect();
    let (ri, li) = (h.iter().position(|c| *c == "run").unwrap(), h.iter().position(|c| *c == "loss").unwrap());
    lines.map(|l| l.split(',').collect::<Vec<_>>()).map(|c| (c[ri].to_string(), c[li].to_string())).collect()
}

#[test]
fn grid_zip_ablate_seeds_expand_to_the_product() {
    let d = tempdir();
    let s = load(
        d.path(),
        "grid:\n  train.optimizer.lr: [0.001, 0.003, 0.01]\n  size:\n    zip:\n      model.d_model: [16, 32]\n      model.n_layers: [1, 2]\nablate:\n  train.schedule.kind: [constant, wsd]\nseeds: [0, 1]\n",
    )
    .unwrap();
    let points = expand(&s);
    // 3 lr × 2 sizes × (base + 2 ablations) × 2 seeds.
    assert_eq!(points.len(), 3 * 2 * 3 * 2);
    let plan = Plan::build(&s).unwrap();
    let keys: std::collections::BTreeSet<&str> = plan.trials.iter().map(|t| t.key.as_str()).collect();
    assert_eq!(keys.len(), points.len(), "every trial has its own identity");
    // Zip: d_model and n_layers advance together.
    for t in &plan.trials {
        assert_eq!(t.spec.model.n_layers, if t.spec.model.d_model == 16 { 1 } else { 2 });
    }
    // Ablation: one factor at a time around the base (cosine).
    let kinds: Vec<String> = plan.trials.iter().map(|t| format!("{:?}", t.spec.train.schedule.kind)).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "Cosine").count(), 3 * 2 * 2);
    assert_eq!(kinds.iter().filter(|k| *k == "Wsd").count(), 3 * 2 * 2);
    // Seeds: replicates share the config hash, not the key.
    let t0 = &plan.trials[0];
    let t1 = &plan.trials[1];
    assert_eq!(t0.hash, t1.hash);
    assert_eq!((t0.seed, t1.seed), (0, 1));
    assert_eq!(t0.key, format!("{}-s0", t0.hash));
}

#[test]
fn derived_expressions_use_the_parameter_count_and_config_keys() {
    let d = tempdir();
    let s = load(
        d.path(),
        "grid:\n  model.d_model: [16, 32]\nderived:\n  train.tokens: 20 * params\n  train.optimizer.lr: 0.01 * (params / 1000) ^ -0.5\n  train.eval_sequences: train.batch_size * 2\n",
    )
    .unwrap();
    let plan = Plan::build(&s).unwrap();
    for t in &plan.trials {
        let n = t.accounting.params_non_embedding as f64;
        assert_eq!(t.spec.train.tokens, Some((20.0 * n) as u64));
        assert_eq!(t.spec.train.steps, None, "setting train.tokens clears the base's train.steps");
        assert_eq!(t.steps(), ((20.0 * n) / 64.0).ceil() as usize);
        assert!((t.spec.train.optimizer.lr - 0.01 * (n / 1000.0).powf(-0.5)).abs() < 1e-15);
        assert_eq!(t.spec.train.eval_sequences, 8);
    }
    assert!(plan.trials[1].accounting.params_non_embedding > plan.trials[0].accounting.params_non_embedding);
}

#[test]
fn search_is_reproducible_from_its_seed() {
    let d = tempdir();
    let body = |seed: u64| {
        format!("search:\n  method: random\n  n_trials: 5\n  seed: {seed}\n  parameters:\n    train.optimizer.lr: {{distribution: log_uniform_values, min: 1.0e-4, max: 1.0e-1}}\n    train.batch_size: {{values: [2, 4]}}\n")
    };
    let lrs = |seed| Plan::build(&load(d.path(), &body(seed)).unwrap()).unwrap().trials.iter().map(|t| (t.spec.train.optimizer.lr, t.spec.train.batch_size)).collect::<Vec<_>>();
    let a = lrs(1);
    assert_eq!(a, lrs(1));
    assert_ne!(a, lrs(2));
    assert_eq!(a.len(), 5);
    assert!(a.iter().all(|(lr, b)| (1e-4..=1e-1).contains(lr) && (*b == 2 || *b == 4)));
}

#[test]
fn errors_name_file_line_and_key_path() {
    let d = tempdir();
    let cases: &[(&str, &str, &str)] = &[
        ("grid:\n  train.optimizer.lr: [0.1]\nbogus: 1\n", "s.yaml", "unknown field `bogus`"),
        ("grid:\n  size:\n    zip:\n      model.d_model: [16, 32]\n      model.n_layers: [1]\n", "s.yaml:7: grid.size.zip.model.n_layers", "equally long"),
        ("derived:\n  train.tokens: 20 * nparams\n", "s.yaml:4: derived.train.tokens", "unknown name `nparams`"),
        ("derived:\n  train.tokens: 20 * (params\n", "s.yaml:4: derived.train.tokens", "missing `)`"),
        ("grid:\n  optimizer.lr: [0.1]\n", "s.yaml:4: grid.optimizer.lr", "not a config key path"),
        ("search:\n  method: tpe\n  n_trials: 3\n  parameters:\n    train.optimizer.lr: {distribution: log_normal, min: 1, max: 2}\n", "s.yaml:7: search.parameters.train.optimizer.lr", "unknown distribution"),
        ("early_terminate: {type: asha, min_iter: 0}\n", "s.yaml:3: early_terminate", "min_iter"),
        ("analysis:\n  fits:\n    - law: nope\n", "s.yaml:5: analysis.fits[0].law", "unknown law `nope`"),
    ];
    for (body, loc, msg) in cases {
        let e = load(d.path(), body).and_then(|s| Plan::build(&s).map(|_| ())).unwrap_err().to_string();
        assert!(e.contains(loc) && e.contains(msg), "{body:?}: {e}");
    }
    // A value the base config rejects: located in the base, naming the sweep entry that set it.
    let e = Plan::build(&load(d.path(), "grid:\n  model.d_model: [16, 15]\n").unwrap()).unwrap_err().to_string();
    assert!(e.contains("tiny.yaml") && e.contains("model.d_model=15") && e.contains("s.yaml:4 grid.model.d_model"), "{e}");
}

#[test]
fn hash_ignores_yaml_spelling_and_seed_but_not_values() {
    let d = tempdir();
    let a = Plan::build(&load(d.path(), "grid:\n  train.optimizer.lr: [0.01, 0.02]\nseeds: [5]\n").unwrap()).unwrap();
    // The same configs written differently: explicit defaults, other key order.
    let reordered = TINY.replace("  steps: 8\n", "  steps: 8\n  grad_clip: 1.0\n");
    write(d.path(), "tiny2.yaml", &reordered);
    let b = Plan::build(&SweepSpec::from_doc(YamlDoc::from_text(&d.path().join("s2.yaml"), "name: t\nbase: tiny2.yaml\nseeds: [7]\ngrid: {train.optimizer.lr: [0.01, 0.02]}\n".into()).unwrap()).unwrap()).unwrap();
    assert_eq!(a.trials[0].hash, b.trials[0].hash);
    assert_eq!(a.trials[1].hash, b.trials[1].hash);
    assert_ne!(a.trials[0].hash, a.trials[1].hash);
    assert_eq!(a.trials[0].key, format!("{}-s5", a.trials[0].hash));
    assert_eq!(b.trials[0].key, format!("{}-s7", a.trials[0].hash));
}

#[test]
fn plan_prints_the_table_and_total_compute() {
    let d = tempdir();
    let f = sweep_file(d.path(), "grid:\n  train.optimizer.lr: [0.01, 0.02]\n  model.d_model: [16, 32]\n");
    let (code, out, err) = mixscale(&["sweep", "plan", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("4 trials"), "{out}");
    assert!(out.contains("train.optimizer.lr") && out.contains("model.d_model") && out.contains("total: 4 trials"), "{out}");
    assert_eq!(out.lines().filter(|l| l.contains("-s3")).count(), 4, "{out}");
    assert!(!d.path().join("runs").exists() && !Path::new("runs/t").exists(), "plan runs nothing");
}

#[test]
fn a_tiny_sweep_runs_records_and_resumes_as_a_no_op() {
    let d = tempdir();
    let f = sweep_file(d.path(), "grid:\n  train.optimizer.lr: [0.003, 0.01]\nseeds: [0, 1]\ntrials_per_device: 2\n");
    let (code, out, err) = mixscale(&["sweep", "run", f.to_str().unwrap(), "--runs-dir", &runs(d.path())]);
    assert_eq!(code, 0, "{out}\n{err}");
    let ts = trials(d.path());
    assert_eq!(ts.len(), 4);
    for t in &ts {
        assert_eq!(t.state, TrialState::Complete);
        let v = t.values.as_ref().unwrap()[0];
        // The objective is the final validation loss of the run's summary.
        let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(Path::new(attr(t, "run_dir")).join("summary.json")).unwrap()).unwrap();
        assert_eq!(s["val_loss"].as_f64().unwrap(), v);
        // Intermediate values: the validation curve (eval_every 4 of 8 steps).
        assert_eq!(t.intermediate.keys().copied().collect::<Vec<_>>(), vec![4, 8]);
        assert!((t.intermediate[&8] - v).abs() < 5.1e-7, "{} vs {v}", t.intermediate[&8]);
        assert_eq!(attr(t, "status"), "completed");
        assert!(t.params.contains_key("train.optimizer.lr") && t.params.contains_key("seed"));
        assert!(attr(t, "run_dir").ends_with(attr(t, "trial_key")));
    }
    let r = results(d.path());
    assert_eq!(r.len(), 4);
    let (code, out, _) = mixscale(&["sweep", "status", f.to_str().unwrap(), "--runs-dir", &runs(d.path())]);
    assert_eq!(code, 0);
    assert!(out.contains("4 completed") && out.contains("best: "), "{out}");
    // Running again does nothing.
    let (code, _, err) = mixscale(&["sweep", "run", f.to_str().unwrap(), "--runs-dir", &runs(d.path())]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(trials(d.path()).len(), 4);
    assert_eq!(results(d.path()), r);
}

#[test]
fn diverged_is_recorded_not_retried_and_failures_retry_up_to_the_limit() {
    let d = tempdir();
    // lr 50 diverges; a missing token file fails at train time (exit 2) every attempt.
    let f = sweep_file(
        d.path(),
        "grid:\n  trial:\n    zip:\n      train.optimizer.lr: [50.0, 0.01]\n      data: [{kind: synthetic_language, vocab_size: 64}, {kind: tokens, train: missing.bin, val: missing.bin, format: u16, vocab_size: 64}]\nmax_retries: 2\ntrials_per_device: 2\n",
    );
    let (code, out, err) = mixscale(&["sweep", "run", f.to_str().unwrap(), "--runs-dir", &runs(d.path())]);
    assert_eq!(code, 0, "{out}\n{err}");
    let ts = trials(d.path());
    let diverged: Vec<&TrialRecord> = ts.iter().filter(|t| attr(t, "status") == "diverged").collect();
    assert_eq!(diverged.len(), 1, "diverged once, never retried");
    assert_eq!(diverged[0].state, TrialState::Fail);
    let failed: Vec<&TrialRecord> = ts.iter().filter(|t| attr(t, "status") == "failed").collect();
    assert_eq!(failed.len(), 3, "1 attempt + 2 retries");
    assert!(failed.iter().all(|t| t.state == TrialState::Fail && attr(t, "reason").contains("exit code 2")));
    assert_eq!(ts.len(), 4);
    let r = std::fs::read_to_string(d.path().join("runs/t/results.csv")).unwrap();
    assert!(r.contains(",diverged,") && r.contains(",failed,"), "{r}");
}

/// Pids of the `mixscale train` processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            let rest = &s[s.rfind(')').unwrap() + 2..];
            let is_train = std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"train"));
            if is_train && rest.split_whitespace().nth(1).and_then(|x| x.parse::<u32>().ok()) == Some(pid) {
                out.push(p);
            }
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
}

fn spawn_run(f: &Path, runs: &str, sub: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_mixscale"))
        .args(["sweep", sub, f.to_str().unwrap(), "--runs-dir", runs, "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until a run folder of the sweep has a checkpoint but no summary (a trial mid-way).
fn wait_mid_trial(runs: &Path, timeout: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if let Ok(rd) = std::fs::read_dir(runs.join("t")) {
            for e in rd.flatten() {
                let p = e.path();
                if p.join("checkpoint.json").exists() && !p.join("summary.json").exists() {
                    return true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

const KILL_SWEEP: &str = "set:\n  train.steps: 120\n  train.checkpoint_every: 10\n  train.eval_every: 40\ngrid:\n  train.optimizer.lr: [0.003, 0.01, 0.02]\nmax_retries: 3\nheartbeat_s: 0.2\nstale_after_s: 30\n";

#[test]
fn kill_9_of_runner_and_of_a_trial_then_rerun_completes_each_trial_once_with_identical_results() {
    // Reference: the same sweep, uninterrupted.
    let reference = tempdir();
    let f = sweep_file(reference.path(), KILL_SWEEP);
    let (code, _, err) = mixscale(&["sweep", "run", f.to_str().unwrap(), "--runs-dir", &runs(reference.path()), "--quiet"]);
    assert_eq!(code, 0, "{err}");
    let want = results(reference.path());
    assert_eq!(want.len(), 3);

    let d = tempdir();
    let f = sweep_file(d.path(), KILL_SWEEP);
    let rd = runs(d.path());
    // 1. kill -9 the runner mid-trial: its trial child must die with it.
    let mut runner = spawn_run(&f, &rd, "run");
    assert!(wait_mid_trial(&d.path().join("runs"), Duration::from_secs(60)), "no trial started");
    let kids = children_of(runner.id());
    assert!(!kids.is_empty());
    runner.kill().unwrap();
    runner.wait().unwrap();
    let t0 = Instant::now();
    while kids.iter().any(|&k| alive(k)) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(kids.iter().all(|&k| !alive(k)), "trial children outlived the killed runner");
    // 2. Rerun, and kill -9 a trial child mid-way: the runner records the failure and retries.
    let mut runner = spawn_run(&f, &rd, "run");
    let t0 = Instant::now();
    let mut killed_child = false;
    while t0.elapsed() < Duration::from_secs(60) && !killed_child {
        if wait_mid_trial(&d.path().join("runs"), Duration::from_millis(200)) {
            for k in children_of(runner.id()) {
                unsafe { libc::kill(k as i32, libc::SIGKILL) };
                killed_child = true;
            }
        }
        if runner.try_wait().unwrap().is_some() {
            break;
        }
    }
    let status = runner.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(killed_child, "found no trial to kill");
    // Every planned trial completed exactly once; the interrupted ones were recorded.
    let ts = trials(d.path());
    let complete: Vec<&str> = ts.iter().filter(|t| t.state == TrialState::Complete).map(|t| attr(t, "slot")).collect();
    let mut uniq = complete.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!((complete.len(), uniq.len()), (3, 3), "{complete:?}");
    assert!(ts.iter().any(|t| attr(t, "status") == "stale"), "the killed runner's trial was re-queued as stale");
    assert!(ts.iter().any(|t| attr(t, "status") == "failed" && attr(t, "reason").contains("killed")), "the killed trial was recorded");
    assert!(ts.iter().all(|t| t.state != TrialState::Running));
    // Results equal the uninterrupted sweep's (resume is bit-exact).
    assert_eq!(results(d.path()), want);
}

#[test]
fn concurrent_workers_claim_each_trial_exactly_once() {
    let d = tempdir();
    let f = sweep_file(d.path(), "grid:\n  train.optimizer.lr: [0.002, 0.004, 0.006, 0.008, 0.01, 0.012, 0.014, 0.016]\nheartbeat_s: 0.2\n");
    let rd = runs(d.path());
    let workers: Vec<Child> = (0..4).map(|_| spawn_run(&f, &rd, "worker")).collect();
    for mut w in workers {
        assert!(w.wait().unwrap().success());
    }
    let ts = trials(d.path());
    let mut slots: Vec<&str> = ts.iter().map(|t| attr(t, "slot")).collect();
    assert_eq!(slots.len(), 8, "one claim per trial");
    slots.sort();
    slots.dedup();
    assert_eq!(slots.len(), 8, "no trial claimed twice");
    assert!(ts.iter().all(|t| t.state == TrialState::Complete));
    let pids: std::collections::BTreeSet<String> = ts.iter().filter_map(|t| t.user_attrs.get("pid")).map(|p| p.to_string()).collect();
    assert!(pids.len() >= 2, "work was shared between workers");
    assert_eq!(results(d.path()).len(), 8);
}

#[test]
fn asha_prunes_a_hopeless_trial_mid_run_and_records_it() {
    let d = tempdir();
    // Trials run one after another; the first sets the bar at each rung (20, 60, 180, … steps).
    let f = sweep_file(
        d.path(),
        "set:\n  train.steps: 1500\n  train.eval_every: 20\n  train.checkpoint_every: 500\ngrid:\n  train.optimizer.lr: [0.01, 1.0e-7]\nearly_terminate: {type: asha, min_iter: 20, eta: 3}\nheartbeat_s: 0.2\n",
    );
    let (code, out, err) = mixscale(&["sweep", "run", f.to_str().unwrap(), "--runs-dir", &runs(d.path())]);
    assert_eq!(code, 0, "{out}\n{err}");
    let ts = trials(d.path());
    assert_eq!(ts.len(), 2, "a pruned trial is a result, not retried");
    assert_eq!(ts[0].state, TrialState::Complete);
    let p = &ts[1];
    assert_eq!((p.state, attr(p, "status")), (TrialState::Pruned, "pruned"));
    let last_step = *p.intermediate.keys().last().unwrap();
    assert!(last_step < 1500, "stopped before the end: {last_step}");
    assert_eq!(p.values.as_ref().unwrap()[0], p.intermediate[&last_step]);
    assert!(p.intermediate[&20] > ts[0].intermediate[&20]);
    assert!(!Path::new(attr(p, "run_dir")).join("summary.json").exists());
}
