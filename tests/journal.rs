//! The study record (an Optuna 5.0 journal): replay of a journal optuna itself wrote, byte-exact
//! re-encoding, round trips, torn tails, NaN/inf, strict batches, concurrent writers (threads,
//! processes, and Python's optuna at the same time), and Python interop both ways.
//!
//! Python checks use `$MIXSCALE_PYTHON` (else `python3`) with `optuna` importable; without it
//! they print SKIP and pass, unless `MIXSCALE_REQUIRE_PY=1` (CI), where they fail.

use crate::util::tempdir;
use mixscale::sweep::journal::{Direction, Distribution, Journal, LockKind, Op, StudyRecord, TrialState};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/journal/optuna5.log");
const FIXTURE_EXPECTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/journal/optuna5.expected.json");
const PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py");

/// A Python with optuna (and `module`) importable, or None (SKIP) — a failure under
/// `MIXSCALE_REQUIRE_PY=1`.
pub fn python_with(module: &str) -> Option<String> {
    let py = std::env::var("MIXSCALE_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py).args(["-c", &format!("import {module}")]).output().map(|o| o.status.success()).unwrap_or(false);
    if ok {
        return Some(py);
    }
    if std::env::var("MIXSCALE_REQUIRE_PY").as_deref() == Ok("1") {
        panic!("MIXSCALE_REQUIRE_PY=1 but `{py} -c 'import {module}'` fails; install it (see .ci/run)");
    }
    eprintln!("SKIP: `{module}` is not importable by {py} (set MIXSCALE_PYTHON to a Python with it)");
    None
}

/// Runs `python tests/py/<script> args...`, panicking with its output on failure.
pub fn run_py(py: &str, script: &str, args: &[&str]) -> String {
    let out = Command::new(py).arg(Path::new(PY).join(script)).args(args).env("PYTHONPATH", PY).output().expect("run python");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{script} failed:\n{text}");
    text
}

fn num(x: f64) -> Value {
    if x.is_nan() {
        json!("NaN")
    } else if x.is_infinite() {
        json!(if x > 0.0 { "Infinity" } else { "-Infinity" })
    } else {
        json!(x)
    }
}

fn dist_json(d: &Distribution) -> Value {
    serde_json::from_str(&d.to_json()).unwrap()
}

/// mixscale's replay in the canonical form of tests/py/journal_dump.py.
fn dump(studies: &[StudyRecord]) -> Value {
    let dir = |d: &Direction| match d {
        Direction::NotSet => "NOT_SET",
        Direction::Minimize => "MINIMIZE",
        Direction::Maximize => "MAXIMIZE",
    };
    let s: Vec<Value> = studies
        .iter()
        .map(|s| {
            let trials: Vec<Value> = s
                .trials
                .iter()
                .map(|t| {
                    json!({
                        "trial_id": t.trial_id, "number": t.number, "state": t.state.name(),
                        "params": t.params.iter().map(|(k, (v, d))| (k.clone(), json!([v, dist_json(d)]))).collect::<serde_json::Map<_, _>>(),
                        "values": t.values.as_ref().map(|v| v.iter().map(|x| num(*x)).collect::<Vec<_>>()),
                        "intermediate": t.intermediate.iter().map(|(k, v)| (k.to_string(), num(*v))).collect::<serde_json::Map<_, _>>(),
                        "user_attrs": t.user_attrs, "system_attrs": t.system_attrs,
                        "datetime_start": t.datetime_start, "datetime_complete": t.datetime_complete,
                    })
                })
                .collect();
            json!({"study_id": s.study_id, "name": s.name, "directions": s.directions.iter().map(dir).collect::<Vec<_>>(),
                   "user_attrs": s.user_attrs, "system_attrs": s.system_attrs, "trials": trials})
        })
        .collect();
    json!({ "studies": s })
}

/// Equality with numbers compared by value (Python writes `256`, mixscale may hold `256.0`).
fn same(a: &Value, b: &Value, at: &str) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>(), "{at}: keys");
            for (k, v) in x {
                same(v, &y[k], &format!("{at}.{k}"));
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{at}: length");
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                same(p, q, &format!("{at}[{i}]"));
            }
        }
        (Value::Number(p), Value::Number(q)) => assert_eq!(p.as_f64(), q.as_f64(), "{at}"),
        _ => assert_eq!(a, b, "{at}"),
    }
}

fn copy_fixture(dir: &Path) -> PathBuf {
    let p = dir.join("study.log");
    std::fs::copy(FIXTURE, &p).unwrap();
    p
}

/// A journal optuna 5.0 wrote (deleted study, enqueue, template trial, NaN/inf, incompatible
/// param, multi-objective) replays to exactly what optuna itself shows.
#[test]
fn replays_a_journal_written_by_optuna_as_optuna_does() {
    let dir = tempdir();
    let j = Journal::open(&copy_fixture(dir.path())).unwrap();
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(FIXTURE_EXPECTED).unwrap()).unwrap();
    let got = dump(&j.read().unwrap());
    same(&got, &expected, "$");
    // Spot checks that do not go through the dump: ids continue across the deleted study.
    let r = j.replay().unwrap();
    assert_eq!(r.next_trial_id(), 18);
    assert_eq!(r.study_id("mixers"), Some(1));
    assert_eq!(r.study_id("scratch"), Some(3));
    let dropped = r.trial(13).unwrap();
    assert!(!dropped.params.contains_key("mixer"), "the incompatible categorical is dropped");
    assert_eq!(dropped.state, TrialState::Running);
}

/// Every op decoded from optuna's file and re-encoded gives the same line (byte for byte, up
/// to the key order inside nested attribute objects, which serde_json sorts).
#[test]
fn re_encoding_optuna_lines_is_byte_exact() {
    let text = std::fs::read_to_string(FIXTURE).unwrap();
    let mut exact = 0;
    for (i, line) in text.lines().enumerate() {
        let worker = line.split("\"worker_id\":\"").nth(1).unwrap().split('"').next().unwrap();
        let (w, op) = mixscale::sweep::journal::decode_line(line).unwrap_or_else(|e| panic!("line {}: {e}", i + 1));
        assert_eq!(w, worker);
        let enc = op.encode(&w).unwrap();
        if enc == line {
            exact += 1;
        } else {
            let norm = |s: &str| -> Value {
                serde_json::from_str(&s.replace("-Infinity", "\"m\"").replace("Infinity", "\"i\"").replace("NaN", "\"n\"")).unwrap()
            };
            assert_eq!(norm(&enc), norm(line), "line {}", i + 1);
            assert_eq!(enc.len(), line.len(), "line {}: only key order may differ\n{enc}\n{line}", i + 1);
        }
    }
    assert!(exact >= text.lines().count() - 3, "{exact} of {} lines byte-identical", text.lines().count());
}

fn float(low: f64, high: f64, log: bool) -> Distribution {
    Distribution::Float { low, high, log, step: None }
}

fn space() -> [(&'static str, Distribution); 4] {
    [
        ("lr", float(1e-4, 1e-2, true)),
        ("d_model", Distribution::Int { low: 128, high: 512, log: false, step: 128 }),
        ("mixer", Distribution::Categorical { choices: vec![json!("attn"), json!("mamba"), json!("hyena")] }),
        ("warmup", float(0.0, 0.2, false)),
    ]
}

/// Writes a study with mixscale: trials complete / pruned / fail / running / waiting, every
/// kind of param, intermediate values (one NaN, one inf), attrs. Returns the journal.
fn write_study(path: &Path) -> Journal {
    let j = Journal::open(path).unwrap();
    let (study, first) = j
        .transact(|r| {
            let study = r.next_study_id();
            let ops = vec![
                Op::CreateStudy { study_name: "mixers".into(), directions: vec![Direction::Minimize] },
                Op::SetStudyUserAttr { study_id: study, key: "sweep".into(), value: json!({"file": "sweeps/m.yaml", "grid": [1, 2]}) },
                Op::SetStudySystemAttr { study_id: study, key: "harness".into(), value: json!("mixscale") },
            ];
            Ok((ops, (study, r.next_trial_id())))
        })
        .unwrap();
    let plan: [(TrialState, f64, &str, i64, f64); 5] = [
        (TrialState::Complete, 0.001, "mamba", 256, 2.85),
        (TrialState::Pruned, 0.01, "attn", 128, f64::NAN),
        (TrialState::Fail, 0.0003, "hyena", 512, f64::NAN),
        (TrialState::Running, 0.002, "attn", 384, f64::NAN),
        (TrialState::Complete, 0.0001, "hyena", 128, f64::INFINITY),
    ];
    for (k, (state, lr, mixer, d, value)) in plan.iter().enumerate() {
        let id = j
            .transact(|r| {
                let id = r.next_trial_id();
                let sp = space();
                let mut ops = vec![
                    Op::create_trial(study),
                    Op::set_param(id, sp[0].0, &json!(lr), &sp[0].1).unwrap(),
                    Op::set_param(id, sp[1].0, &json!(d), &sp[1].1).unwrap(),
                    Op::set_param(id, sp[2].0, &json!(mixer), &sp[2].1).unwrap(),
                    Op::set_param(id, sp[3].0, &json!(0.05 * k as f64), &sp[3].1).unwrap(),
                    Op::SetTrialUserAttr { trial_id: id, key: "n_params".into(), value: json!(d * d * 12) },
                    Op::SetTrialUserAttr { trial_id: id, key: "run_dir".into(), value: json!(format!("runs/t{k}")) },
                    Op::SetTrialSystemAttr { trial_id: id, key: "worker".into(), value: json!({"host": "h", "gpu": k}) },
                ];
                for step in 1..=3u64 {
                    let v = match (k, step) {
                        (1, 2) => f64::NAN,
                        (4, 3) => f64::NEG_INFINITY,
                        _ => 4.0 - step as f64 * 0.5 + k as f64,
                    };
                    ops.push(Op::SetTrialIntermediateValue { trial_id: id, step: step * 100, value: v });
                }
                match state {
                    TrialState::Complete => ops.push(Op::set_state(id, *state, Some(vec![*value]))),
                    TrialState::Pruned => ops.push(Op::set_state(id, *state, Some(vec![3.5]))),
                    TrialState::Fail => ops.push(Op::set_state(id, *state, None)),
                    _ => {}
                }
                Ok((ops, id))
            })
            .unwrap();
        assert_eq!(id, first + k as u64);
    }
    // An enqueued trial (WAITING), as optuna's enqueue_trial writes it.
    j.append(vec![Op::CreateTrial {
        study_id: study,
        datetime_start: None,
        state: Some(TrialState::Waiting),
        values: None,
        datetime_complete: None,
        params: BTreeMap::new(),
        user_attrs: BTreeMap::from([("from".to_string(), json!("mixscale-enqueue"))]),
        system_attrs: BTreeMap::from([("fixed_params".to_string(), json!({"lr": 0.004, "d_model": 256, "mixer": "mamba", "warmup": 0.1}))]),
        intermediate_values: BTreeMap::new(),
    }])
    .unwrap();
    j
}

/// What was written is what a fresh reader replays, checked field by field.
#[test]
fn mixscale_round_trip() {
    let dir = tempdir();
    let path = dir.path().join("sub/dir/study.log");
    write_study(&path);
    let studies = Journal::open(&path).unwrap().read().unwrap();
    assert_eq!(studies.len(), 1);
    let s = &studies[0];
    assert_eq!((s.name.as_str(), s.directions.as_slice()), ("mixers", &[Direction::Minimize][..]));
    assert_eq!(s.user_attrs["sweep"], json!({"file": "sweeps/m.yaml", "grid": [1, 2]}));
    assert_eq!(s.system_attrs["harness"], json!("mixscale"));
    let states: Vec<TrialState> = s.trials.iter().map(|t| t.state).collect();
    use TrialState::*;
    assert_eq!(states, [Complete, Pruned, Fail, Running, Complete, Waiting]);
    let t0 = &s.trials[0];
    assert_eq!((t0.trial_id, t0.number), (0, 0));
    assert_eq!(t0.params["mixer"].0, json!("mamba"));
    assert_eq!(t0.params["d_model"].0, json!(256));
    assert_eq!(t0.params["lr"].0, json!(0.001));
    assert_eq!(t0.params["lr"].1, float(1e-4, 1e-2, true));
    assert_eq!(t0.values, Some(vec![2.85]));
    assert_eq!(t0.intermediate, BTreeMap::from([(100, 3.5), (200, 3.0), (300, 2.5)]));
    assert_eq!(t0.system_attrs["worker"], json!({"host": "h", "gpu": 0}));
    assert!(t0.datetime_start.as_deref().unwrap().ends_with("+00:00") && t0.datetime_complete.is_some());
    assert!(s.trials[1].intermediate[&200].is_nan());
    assert_eq!(s.trials[2].values, None);
    assert!(s.trials[3].datetime_complete.is_none());
    assert_eq!(s.trials[4].values, Some(vec![f64::INFINITY]));
    assert_eq!(s.trials[4].intermediate[&300], f64::NEG_INFINITY);
    assert_eq!(s.trials[5].datetime_start, None);
    // The stored representation: the categorical is the index, NaN/inf are Python's tokens.
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(r#""param_name":"mixer","param_value_internal":1,"#), "{text}");
    assert!(text.contains(r#""step":200,"intermediate_value":NaN}"#));
    assert!(text.contains(r#""values":[Infinity]"#));
    assert!(text.contains(r#""intermediate_value":-Infinity}"#));
}

/// (a) optuna.load_study reads what mixscale wrote; (b) Python's optuna continues the study
/// (TPE, report, prune, fail, enqueue) and mixscale reads it all back as optuna does.
#[test]
fn python_optuna_reads_and_continues_a_mixscale_study() {
    let Some(py) = python_with("optuna") else { return };
    let dir = tempdir();
    let path = dir.path().join("study.log");
    let j = write_study(&path);
    let expected = dir.path().join("expected.json");
    std::fs::write(&expected, serde_json::to_string(&dump(&j.read().unwrap())).unwrap()).unwrap();
    run_py(&py, "check_journal.py", &[path.to_str().unwrap(), expected.to_str().unwrap()]);

    let out = dir.path().join("python.json");
    run_py(&py, "continue_study.py", &[path.to_str().unwrap(), "mixers", "4", out.to_str().unwrap()]);
    let python_view: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let studies = j.read().unwrap();
    same(&dump(&studies), &python_view, "$");
    let s = &studies[0];
    // Python's first ask() ran the trial mixscale enqueued, with its fixed params.
    assert_eq!(s.trials.len(), 6 + 3 + 1);
    let t5 = &s.trials[5];
    assert_eq!((t5.state, &t5.user_attrs["writer"]), (TrialState::Complete, &json!("python")));
    assert_eq!((&t5.params["mixer"].0, &t5.params["d_model"].0, &t5.params["lr"].0), (&json!("mamba"), &json!(256), &json!(0.004)));
    assert_eq!(s.trials[6].state, TrialState::Pruned);
    assert_eq!(s.trials[7].state, TrialState::Fail);
    assert_eq!(s.trials[9].state, TrialState::Waiting);
    assert_eq!(s.user_attrs["continued_by"], json!("python"));
    // mixscale appends after Python again; optuna still reads the whole file.
    let id = s.trials[9].trial_id;
    j.append(vec![Op::set_state(id, TrialState::Running, None), Op::set_state(id, TrialState::Complete, Some(vec![2.5]))]).unwrap();
    std::fs::write(&expected, serde_json::to_string(&dump(&j.read().unwrap())).unwrap()).unwrap();
    run_py(&py, "check_journal.py", &[path.to_str().unwrap(), expected.to_str().unwrap()]);
}

/// A partial last line (a killed writer) is ignored by readers and cut before the next append
/// (kept in `.torn`); an invalid last line likewise; an invalid line in the middle is an error
/// naming file and line.
#[test]
fn torn_tail_is_ignored_then_cut_before_appending() {
    let dir = tempdir();
    let path = copy_fixture(dir.path());
    let good = std::fs::read(&path).unwrap();
    let trials = |j: &Journal| j.replay().unwrap().next_trial_id();
    for tail in [&br#"{"op_code":4,"worker_id":"w","study_id":1,"datet"#[..], b"{\"op_code\":7,\"tri\n", b"\0\0\0\0"] {
        let mut bytes = good.clone();
        bytes.extend_from_slice(tail);
        std::fs::write(&path, &bytes).unwrap();
        // A reader that does not write sees the file as optuna does and changes nothing.
        let reader = mixscale::sweep::journal::replay_file(&path).unwrap();
        assert_eq!(reader.next_trial_id(), 18);
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        // A writer cuts the tail first (open repairs it under the lock).
        let j = Journal::open(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), good, "open cuts the tail exactly");
        j.append(vec![Op::create_trial(1)]).unwrap();
        assert_eq!(trials(&j), 19);
        let torn = std::fs::read(dir.path().join("study.log.torn")).unwrap();
        assert!(torn.windows(tail.len()).any(|w| w == tail), "the cut bytes are kept");
        std::fs::remove_file(dir.path().join("study.log.torn")).unwrap();
        std::fs::write(&path, &good).unwrap();
    }
    // Garbage in the middle: a clear error with the line number; nothing is written.
    let mut lines: Vec<&str> = std::str::from_utf8(&good).unwrap().lines().collect();
    lines.insert(5, "{\"op_code\":4,\"worker_id\":\"x\",\"study_id\":0}{");
    let text = lines.join("\n") + "\n";
    std::fs::write(&path, &text).unwrap();
    let err = Journal::open(&path).err().expect("malformed middle line").to_string();
    assert!(err.contains("study.log:6:"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    // A line optuna would refuse (attr op with two keys) is an error too.
    std::fs::write(&path, "{\"op_code\":0,\"worker_id\":\"w\",\"study_name\":\"s\",\"directions\":[1]}\n{\"op_code\":2,\"worker_id\":\"w\",\"study_id\":0,\"user_attr\":{\"a\":1,\"b\":2}}\n{\"op_code\":0,\"worker_id\":\"w\",\"study_name\":\"t\",\"directions\":[1]}\n").unwrap();
    let err = Journal::open(&path).err().expect("two-key attr").to_string();
    assert!(err.contains(":2:") && err.contains("exactly one key"), "{err}");
}

/// Optuna's python reads a file whose torn tail mixscale cut, and would not have read it had
/// mixscale appended without cutting.
#[test]
fn python_reads_a_file_after_mixscale_cut_its_torn_tail() {
    let Some(py) = python_with("optuna") else { return };
    let dir = tempdir();
    let path = copy_fixture(dir.path());
    let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    std::io::Write::write_all(&mut f, br#"{"op_code":6,"worker_id":"w","trial_id":13,"sta"#).unwrap();
    drop(f);
    let j = Journal::open(&path).unwrap();
    j.append(vec![Op::set_state(13, TrialState::Complete, Some(vec![1.25]))]).unwrap();
    let expected = dir.path().join("expected.json");
    std::fs::write(&expected, serde_json::to_string(&dump(&j.read().unwrap())).unwrap()).unwrap();
    assert_eq!(j.replay().unwrap().trial(13).unwrap().values, Some(vec![1.25]));
    run_py(&py, "check_journal.py", &[path.to_str().unwrap(), expected.to_str().unwrap()]);
}

/// A malformed op is an error where optuna reads it, and skipped where optuna skips it unread
/// (a finished or unknown trial).
#[test]
fn malformed_ops_fail_only_where_optuna_reads_them() {
    let dir = tempdir();
    let path = copy_fixture(dir.path());
    let good = std::fs::read_to_string(&path).unwrap();
    let bad_param = |trial: u64| format!("{{\"op_code\":5,\"worker_id\":\"w\",\"trial_id\":{trial},\"param_name\":\"x\",\"param_value_internal\":1,\"distribution\":\"{{}}\"}}\n");
    let tail = "{\"op_code\":4,\"worker_id\":\"w\",\"study_id\":1,\"datetime_start\":null}\n";
    for (trial, ok) in [(2, true), (99, true), (13, false)] {
        std::fs::write(&path, format!("{good}{}{tail}", bad_param(trial))).unwrap();
        let r = mixscale::sweep::journal::replay_file(&path);
        assert_eq!(r.is_ok(), ok, "trial {trial}: {:?}", r.as_ref().err().map(|e| e.to_string()));
        if let Ok(r) = r {
            assert_eq!(r.next_trial_id(), 19, "the line after it is replayed");
        }
    }
}

/// A batch with an op optuna would refuse from its own writer is an error and writes nothing.
#[test]
fn invalid_batches_write_nothing() {
    let dir = tempdir();
    let path = copy_fixture(dir.path());
    let j = Journal::open(&path).unwrap();
    let before = std::fs::read(&path).unwrap();
    let cat = Distribution::Categorical { choices: vec![json!("a")] };
    let bad: Vec<(Vec<Op>, &str)> = vec![
        (vec![Op::create_trial(1), Op::set_state(2, TrialState::Complete, Some(vec![1.0]))], "already finished"),
        (vec![Op::create_trial(0)], "no study with id 0"),
        (vec![Op::CreateStudy { study_name: "mixers".into(), directions: vec![Direction::Minimize] }], "already exists"),
        (vec![Op::SetTrialParam { trial_id: 13, param_name: "mixer".into(), value_internal: 0.0, distribution: cat.clone() }], "incompatible"),
        (vec![Op::SetTrialParam { trial_id: 13, param_name: "new".into(), value_internal: 3.0, distribution: cat }], "out of range"),
        (vec![Op::set_state(13, TrialState::Running, None)], "already running"),
        (vec![Op::SetTrialIntermediateValue { trial_id: 99, step: 1, value: 1.0 }], "no trial with id 99"),
    ];
    for (ops, why) in bad {
        let err = j.append(ops).unwrap_err().to_string();
        assert!(err.contains(why), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }
    assert!(Op::set_param(13, "mixer", &json!("rwkv"), &space()[2].1).unwrap_err().contains("not in"));
    // The cache was reset by the failures; the next good batch is still right.
    j.append(vec![Op::SetTrialIntermediateValue { trial_id: 13, step: 7, value: 0.5 }]).unwrap();
    assert_eq!(j.replay().unwrap().trial(13).unwrap().intermediate[&7], 0.5);
    // An error from the closure writes nothing either.
    let r: mixscale::Result<()> = j.transact(|_| Err(mixscale::Error::Other("changed my mind".into())));
    assert!(r.is_err());
}

/// Claims one trial per transaction from several writers; returns the claimed trial ids.
fn claim_trials(path: &Path, writer: usize, n: usize) -> Vec<u64> {
    claim_trials_with(path, writer, n, LockKind::Symlink)
}

fn claim_trials_with(path: &Path, writer: usize, n: usize, kind: LockKind) -> Vec<u64> {
    let j = Journal::open_with(path, kind).unwrap();
    (0..n)
        .map(|k| {
            j.transact(|r| {
                let study = r.study_id("race").expect("study exists");
                let id = r.next_trial_id();
                let ops = vec![
                    Op::create_trial(study),
                    Op::SetTrialUserAttr { trial_id: id, key: "writer".into(), value: json!(writer) },
                    Op::SetTrialIntermediateValue { trial_id: id, step: k as u64, value: writer as f64 },
                    Op::set_state(id, TrialState::Complete, Some(vec![writer as f64 + k as f64 / 100.0])),
                ];
                Ok((ops, id))
            })
            .unwrap()
        })
        .collect()
}

fn race_study(dir: &Path) -> PathBuf {
    let path = dir.join("race.log");
    Journal::open(&path).unwrap().append(vec![Op::CreateStudy { study_name: "race".into(), directions: vec![Direction::Minimize] }]).unwrap();
    path
}

/// Every trial holds exactly its creator's ops: nothing lost, duplicated or interleaved.
fn check_race(path: &Path, claimed: &[(usize, Vec<u64>)]) {
    let s = &Journal::open(path).unwrap().read().unwrap()[0];
    let total: usize = claimed.iter().map(|(_, v)| v.len()).sum();
    assert_eq!(s.trials.len(), total);
    for (writer, ids) in claimed {
        for (k, id) in ids.iter().enumerate() {
            let t = &s.trials[*id as usize];
            assert_eq!(t.user_attrs["writer"], json!(writer), "trial {id}");
            assert_eq!(t.intermediate, BTreeMap::from([(k as u64, *writer as f64)]));
            assert_eq!((t.state, t.values.clone()), (TrialState::Complete, Some(vec![*writer as f64 + k as f64 / 100.0])));
        }
    }
    let text = std::fs::read_to_string(path).unwrap();
    assert_eq!(text.lines().count(), 1 + 4 * total);
}

#[test]
fn concurrent_threads_never_lose_or_duplicate_ops() {
    let dir = tempdir();
    let path = race_study(dir.path());
    let handles: Vec<_> = (0..4)
        .map(|w| {
            let p = path.clone();
            // Half use optuna's JournalFileOpenLock: both kinds exclude each other.
            let kind = if w % 2 == 0 { LockKind::Symlink } else { LockKind::Open };
            std::thread::spawn(move || (w, claim_trials_with(&p, w, 15, kind)))
        })
        .collect();
    let claimed: Vec<(usize, Vec<u64>)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    check_race(&path, &claimed);
    assert!(!dir.path().join("race.log.lock").exists(), "the lock is released");
}

/// Child process of `concurrent_processes_never_lose_or_duplicate_ops` (does nothing unless
/// started by it).
#[test]
#[ignore]
fn child_writer() {
    if let (Ok(path), Ok(w)) = (std::env::var("MIXSCALE_JOURNAL_CHILD"), std::env::var("MIXSCALE_JOURNAL_WRITER")) {
        let ids = claim_trials(Path::new(&path), w.parse().unwrap(), 12);
        println!("CLAIMED {}", serde_json::to_string(&ids).unwrap());
    }
}

fn spawn_child(path: &Path, writer: usize) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "journal::child_writer", "--nocapture", "--test-threads=1"])
        .env("MIXSCALE_JOURNAL_CHILD", path)
        .env("MIXSCALE_JOURNAL_WRITER", writer.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn child_ids(c: std::process::Child) -> Vec<u64> {
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.split("CLAIMED ").nth(1).and_then(|t| t.lines().next()).unwrap_or_else(|| panic!("child output: {text}"));
    serde_json::from_str(line).unwrap()
}

#[test]
fn concurrent_processes_never_lose_or_duplicate_ops() {
    let dir = tempdir();
    let path = race_study(dir.path());
    let children: Vec<_> = (0..3).map(|w| (w, spawn_child(&path, w))).collect();
    let mine = claim_trials(&path, 9, 12);
    let mut claimed: Vec<(usize, Vec<u64>)> = children.into_iter().map(|(w, c)| (w, child_ids(c))).collect();
    claimed.push((9, mine));
    check_race(&path, &claimed);
}

/// Python optuna workers (symlink lock) and mixscale writers append at the same time: optuna
/// loads the result and every trial of both is there once.
#[test]
fn python_and_rust_writers_exclude_each_other() {
    let Some(py) = python_with("optuna") else { return };
    let dir = tempdir();
    let path = race_study(dir.path());
    let script = "import sys, optuna\n\
optuna.logging.set_verbosity(optuna.logging.WARNING)\n\
from journal_dump import open_storage\n\
s = optuna.load_study(study_name='race', storage=open_storage(sys.argv[1]), sampler=optuna.samplers.RandomSampler())\n\
def f(t):\n    t.set_user_attr('writer', 'py')\n    t.report(1.0, 0)\n    return t.suggest_float('x', 0, 1)\n\
s.optimize(f, n_trials=25)\n";
    let pys: Vec<_> = (0..2)
        .map(|_| Command::new(&py).args(["-c", script, path.to_str().unwrap()]).env("PYTHONPATH", PY).spawn().unwrap())
        .collect();
    let mine = claim_trials(&path, 7, 25);
    for mut p in pys {
        assert!(p.wait().unwrap().success());
    }
    let s = &Journal::open(&path).unwrap().read().unwrap()[0];
    assert_eq!(s.trials.len(), 75);
    let py_trials: Vec<_> = s.trials.iter().filter(|t| t.user_attrs.get("writer") == Some(&json!("py"))).collect();
    assert_eq!(py_trials.len(), 50);
    assert!(py_trials.iter().all(|t| t.state == TrialState::Complete && t.params.contains_key("x")));
    for (k, id) in mine.iter().enumerate() {
        let t = &s.trials[*id as usize];
        assert_eq!((t.user_attrs["writer"].clone(), t.values.clone()), (json!(7), Some(vec![7.0 + k as f64 / 100.0])));
    }
    let expected = dir.path().join("expected.json");
    std::fs::write(&expected, serde_json::to_string(&dump(&Journal::open(&path).unwrap().read().unwrap())).unwrap()).unwrap();
    run_py(&py, "check_journal.py", &[path.to_str().unwrap(), expected.to_str().unwrap()]);
}

/// The lock is optuna's: a symlink `<file>.lock` while held (an `O_EXCL` file with
/// `LockKind::Open`); a lock left by a killed writer is broken after the grace period.
#[test]
fn lock_is_optunas_and_stale_locks_are_broken() {
    let dir = tempdir();
    let path = race_study(dir.path());
    let lock = dir.path().join("race.log.lock");
    let j = Journal::open(&path).unwrap();
    j.transact(|_| {
        let m = std::fs::symlink_metadata(&lock).unwrap();
        assert!(m.file_type().is_symlink());
        assert_eq!(std::fs::canonicalize(&lock).unwrap(), std::fs::canonicalize(&path).unwrap());
        Ok((vec![], ()))
    })
    .unwrap();
    let o = Journal::open_with(&path, LockKind::Open).unwrap();
    o.transact(|_| {
        assert!(std::fs::symlink_metadata(&lock).unwrap().file_type().is_file());
        Ok((vec![], ()))
    })
    .unwrap();
    // A stale lock (its writer died): broken once its mtime stood still for the grace period.
    std::os::unix::fs::symlink(&path, &lock).unwrap();
    let j = j.with_lock_grace(Some(Duration::from_millis(300)));
    let t0 = std::time::Instant::now();
    j.append(vec![Op::create_trial(0)]).unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert!(!lock.exists());
    assert_eq!(j.replay().unwrap().next_trial_id(), 1);
}
