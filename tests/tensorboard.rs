//! TensorBoard event files written beside metrics.csv: TFRecord framing and CRCs, one scalar
//! per metrics column and logged step, resume without duplicate steps, and TensorBoard's own
//! EventAccumulator reading them (when the `tensorboard` package is importable).

use crate::journal::{python_with, run_py};
use crate::util::{opts, spec_from, tempdir, TINY};
use mixscale::train::tensorboard::{event_files, frame, read_events, Event};
use mixscale::train::{train, Outcome};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Half a unit of the last digit the CSV printed (`3.141593`, `1.000000e-2`, `1234.5`).
fn csv_half_unit(s: &str) -> f64 {
    let (mant, exp) = s.split_once(['e', 'E']).map(|(m, e)| (m, e.parse::<i32>().unwrap())).unwrap_or((s, 0));
    let decimals = mant.split_once('.').map(|(_, f)| f.len() as i32).unwrap_or(0);
    0.5 * 10f64.powi(exp - decimals)
}

/// step → (column → printed value) of metrics.csv, empty cells left out.
fn csv_rows(run: &Path) -> BTreeMap<i64, BTreeMap<String, String>> {
    let text = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    lines
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            let step = cells[0].parse().unwrap();
            let cols = header.iter().zip(&cells).skip(1).filter(|(_, v)| !v.is_empty()).map(|(h, v)| (h.to_string(), v.to_string())).collect();
            (step, cols)
        })
        .collect()
}

/// All summary events of the run's `tb/` (in file order) equal metrics.csv: each logged step
/// exactly once, every column a tag, values equal to the CSV's printed precision.
fn check_run(run: &Path) {
    let mut seen: Vec<i64> = Vec::new();
    let rows = csv_rows(run);
    for file in event_files(&run.join("tb")).unwrap() {
        let events = read_events(&file).unwrap();
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"), "{}", file.display());
        for e in events.iter().filter(|e| !e.scalars.is_empty()) {
            seen.push(e.step);
            let row = rows.get(&e.step).unwrap_or_else(|| panic!("step {} not in metrics.csv", e.step));
            let tags: BTreeSet<&str> = e.scalars.iter().map(|(t, _)| t.as_str()).collect();
            assert_eq!(tags.len(), e.scalars.len(), "step {}: a tag twice", e.step);
            assert_eq!(tags, row.keys().map(|k| k.as_str()).collect(), "step {}: tags vs metrics.csv columns", e.step);
            for (tag, x) in &e.scalars {
                let printed = &row[tag];
                let want: f64 = printed.parse().unwrap();
                let tol = csv_half_unit(printed) * 1.0001 + want.abs() * f64::from(f32::EPSILON);
                assert!((f64::from(*x) - want).abs() <= tol, "step {} {tag}: event {x} vs csv {printed}", e.step);
            }
        }
    }
    assert_eq!(seen, rows.keys().copied().collect::<Vec<_>>(), "each logged step once, in order");
}

#[test]
fn training_writes_event_files_matching_metrics_csv() {
    let spec = spec_from(TINY, &[]).unwrap();
    let dir = tempdir();
    train(&spec, &opts(dir.path())).unwrap();
    let files = event_files(&dir.path().join("tb")).unwrap();
    assert_eq!(files.len(), 1);
    let name = files[0].file_name().unwrap().to_str().unwrap().to_string();
    let parts: Vec<&str> = name.strip_prefix("events.out.tfevents.").unwrap().split('.').collect();
    assert!(parts[0].parse::<u64>().unwrap() > 1_700_000_000, "{name}");
    assert_eq!(parts[parts.len() - 2], std::process::id().to_string(), "{name}");
    check_run(dir.path());
    assert_eq!(csv_rows(dir.path()).len(), 8);
    // The framing is checked: a flipped byte in any record is a CRC error.
    let bytes = std::fs::read(&files[0]).unwrap();
    for at in [3, 10, 20, bytes.len() - 2] {
        let mut bad = bytes.clone();
        bad[at] ^= 0x40;
        std::fs::write(&files[0], &bad).unwrap();
        let err = read_events(&files[0]).unwrap_err().to_string();
        assert!(err.contains("CRC"), "byte {at}: {err}");
    }
}

/// A run stopped at a checkpoint, whose process had logged steps past it before dying, then
/// resumed: the event files hold each step once, equal to metrics.csv, and TensorBoard's
/// EventAccumulator reads exactly metrics.csv.
#[test]
fn resume_keeps_each_step_once() {
    let spec = spec_from(TINY, &["train.steps=10", "train.eval_every=3"]).unwrap();
    let dir = tempdir();
    let mut o = opts(dir.path());
    o.stop_at_step = Some(5);
    assert!(matches!(train(&spec, &o).unwrap(), Outcome::Stopped { step: 5 }));
    // What a process killed after step 7 leaves: rows and events past the checkpoint.
    let tb = event_files(&dir.path().join("tb")).unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&tb[0]).unwrap();
    for step in [6, 7] {
        let e = Event { wall_time: 1.0, step, file_version: None, scalars: vec![("train_loss".into(), 99.0)] };
        std::io::Write::write_all(&mut f, &frame(&e.encode())).unwrap();
    }
    drop(f);
    let mut csv = std::fs::OpenOptions::new().append(true).open(dir.path().join("metrics.csv")).unwrap();
    std::io::Write::write_all(&mut csv, b"6,1,1e-2,99.0,,1.0,1.0\n").unwrap();
    drop(csv);
    o.stop_at_step = None;
    o.resume = true;
    assert!(matches!(train(&spec, &o).unwrap(), Outcome::Finished(_)));
    assert_eq!(event_files(&dir.path().join("tb")).unwrap().len(), 2);
    check_run(dir.path());
    assert_eq!(csv_rows(dir.path()).keys().copied().collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
    if let Some(py) = python_with("tensorboard") {
        run_py(&py, "check_tb.py", &[dir.path().join("tb").to_str().unwrap(), dir.path().join("metrics.csv").to_str().unwrap()]);
    }
}
