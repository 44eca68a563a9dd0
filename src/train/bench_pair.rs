//! `mixscale bench --interleave`: the two sides of a preset as two long-lived processes that
//! take turns, a few steps each, so that every round's ratio compares steps run seconds apart.
//!
//! Why: on a shared VM the CPU's speed changes from one minute to the next (this project's
//! 2-core VM measured a 1024³ sgemm anywhere between 82 and 186 GFLOP/s within one session).
//! A round of the plain protocol (`--rounds`) runs all of mixscale's steps in one process and
//! then all of PyTorch's in another, ~10 s apart, and one attention-preset run read 1.27, 1.48,
//! 1.64, 1.89 and 1.05 for its five rounds. Here both processes start once, each runs its
//! `warmup` untimed steps, and then round `r` asks one side for `steps` timed steps, then the
//! other, in the order mixscale–PyTorch for even `r` and PyTorch–mixscale for odd `r` (ABBA, so
//! a steady drift favours neither). Each round gives both sides' tokens/s and their ratio; the
//! row reports the medians as the plain protocol does. Only the steps' own time is counted
//! (each side times its steps itself), never the hand-over; the idle side waits on a pipe, and
//! [`GAP`] passes between turns so that spinning worker threads of the previous side go idle.
//!
//! Protocol (one JSON object per line on stdout; commands on stdin): after its warmup a side
//! prints `{"ready": true}`; `run N` runs the next N timed steps and prints `{"elapsed": SECS}`;
//! `done` ends it: the mixscale worker writes `DIR/mixscale.json` and exits, `torch_lm.py
//! --serve` prints its usual result line and exits. Both sides train on the same batches (the
//! worker writes them before it reports ready) and report the usual losses, norms and peak RSS.

use super::torch::{self, TorchJob, TorchRun};
use super::{BenchOptions, BenchRow, MixSession};
use crate::config::RunSpec;
use crate::error::{Error, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

/// Pause between two turns (not timed).
const GAP: Duration = Duration::from_millis(50);

/// The worker's side of `--interleave` (`mixscale bench CONFIG --worker DIR --interleave`):
/// `o.steps` is the total number of timed steps over all rounds.
pub fn serve_worker(spec: &RunSpec, o: &BenchOptions, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.to_path_buf(), source: e })?;
    let mut s = MixSession::new(spec, o, Some(&dir.join("tokens.u32")), None)?;
    s.warmup()?;
    let mut out = std::io::stdout().lock();
    let say = |out: &mut std::io::StdoutLock, v: serde_json::Value| -> Result<()> {
        writeln!(out, "{v}").and_then(|_| out.flush()).map_err(|e| Error::Other(format!("bench worker: stdout: {e}")))
    };
    say(&mut out, serde_json::json!({ "ready": true }))?;
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| Error::Other(format!("bench worker: stdin: {e}")))?;
        let cmd: Vec<&str> = line.split_whitespace().collect();
        match cmd.as_slice() {
            ["run", n] => {
                let n: usize = n.parse().map_err(|_| Error::Other(format!("bench worker: bad command {line:?}")))?;
                let secs = s.run(n)?;
                say(&mut out, serde_json::json!({ "elapsed": secs }))?;
            }
            ["done"] => break,
            _ => return Err(Error::Other(format!("bench worker: unknown command {line:?} (run N, done)"))),
        }
    }
    super::write_run(dir, &s.finish())
}

/// One side as a child process speaking the protocol above; its stderr goes to a file whose
/// last line is quoted if the side fails.
struct Side {
    name: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    log: std::path::PathBuf,
}

impl Side {
    fn spawn(name: &'static str, mut cmd: Command, log: std::path::PathBuf) -> Result<Self> {
        let err = std::fs::File::create(&log).map_err(|e| Error::Io { path: log.clone(), source: e })?;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|e| Error::Other(format!("could not start the {name} side: {e}")))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        Ok(Self { name, child, stdin, stdout, log })
    }

    fn failure(&mut self, what: &str) -> Error {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let last = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(no message)");
        Error::Other(format!("{} side failed ({what}): {}", self.name, last.trim()))
    }

    /// The next JSON line (other lines are skipped).
    fn reply(&mut self) -> Result<serde_json::Value> {
        let mut line = String::new();
        loop {
            line.clear();
            match self.stdout.read_line(&mut line) {
                Ok(0) | Err(_) => return Err(self.failure("no reply")),
                Ok(_) if line.trim_start().starts_with('{') => {
                    return serde_json::from_str(line.trim()).map_err(|e| Error::Other(format!("{} side: unreadable reply ({e}): {}", self.name, line.trim())));
                }
                Ok(_) => {}
            }
        }
    }

    fn send(&mut self, cmd: &str) -> Result<()> {
        let ok = self.stdin.as_mut().map(|s| writeln!(s, "{cmd}").and_then(|_| s.flush()).is_ok()).unwrap_or(false);
        if ok {
            Ok(())
        } else {
            Err(self.failure("closed its input"))
        }
    }

    fn ready(&mut self) -> Result<()> {
        match self.reply()?.get("ready") {
            Some(serde_json::Value::Bool(true)) => Ok(()),
            _ => Err(self.failure("no ready line")),
        }
    }

    /// Runs `n` timed steps; their seconds as the side measured them.
    fn run(&mut self, n: usize) -> Result<f64> {
        self.send(&format!("run {n}"))?;
        let v = self.reply()?;
        v.get("elapsed").and_then(|e| e.as_f64()).ok_or_else(|| Error::Other(format!("{} side: expected {{\"elapsed\": ..}}, got {v}", self.name)))
    }

    /// Sends `done`, reads the result line when the side prints one (`result`), and waits for
    /// the process to exit.
    fn finish(&mut self, result: bool) -> Result<Option<serde_json::Value>> {
        self.send("done")?;
        let v = if result { Some(self.reply()?) } else { None };
        self.stdin.take();
        match self.child.wait() {
            Ok(st) if st.success() => Ok(v),
            _ => Err(self.failure("exit status")),
        }
    }
}

/// One preset, interleaved: `o.rounds` rounds of `o.steps` timed steps per side.
#[allow(clippy::too_many_arguments)]
pub fn bench_preset(exe: &Path, name: &str, config: &Path, sets: &[String], spec: &RunSpec, o: &BenchOptions, device: &str, work: &Path, sgemm: f64) -> Result<BenchRow> {
    let rounds = o.rounds.max(1);
    let total = BenchOptions { steps: o.steps * rounds, ..o.clone() };
    let mut mix = Side::spawn("mixscale", super::worker_command(exe, config, sets, &total, device, work), work.join("mixscale.stderr"))?;
    mix.ready()?;
    let mut th: std::result::Result<Side, String> = torch_side(spec, &total, work).and_then(|mut t| t.ready().map(|_| t).map_err(|e| e.to_string()));
    let tokens = (o.steps * o.batch * o.seq_len) as f64;
    let mut pairs: Vec<(f64, Option<f64>)> = Vec::new();
    for r in 0..rounds {
        let mut m = 0.0;
        let mut t = None;
        for turn in 0..2 {
            std::thread::sleep(GAP);
            if (turn == 0) == (r % 2 == 0) {
                m = tokens / mix.run(o.steps)?;
            } else if let Ok(side) = th.as_mut() {
                match side.run(o.steps) {
                    Ok(secs) => t = Some(tokens / secs),
                    Err(e) => th = Err(e.to_string()),
                }
            }
        }
        pairs.push((m, t));
    }
    mix.finish(false)?;
    let mrun = super::read_run(work)?;
    let trun: std::result::Result<TorchRun, String> = match th {
        Ok(mut side) => match side.finish(true) {
            Ok(Some(v)) => serde_json::from_value(v).map_err(|e| format!("unreadable PyTorch result: {e}")),
            Ok(None) => Err("the PyTorch side printed no result".into()),
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(e),
    };
    let rows = pairs
        .iter()
        .map(|&(m, t)| {
            let mut mr = mrun.clone();
            mr.step_ms *= mr.tokens_per_s / m;
            mr.tokens_per_s = m;
            let tr = match (&trun, t) {
                (Ok(tr), Some(t)) => {
                    let mut tr = tr.clone();
                    tr.step_ms *= tr.tokens_per_s / t;
                    tr.tokens_per_s = t;
                    Ok(tr)
                }
                (Err(e), _) => Err(e.clone()),
                (Ok(_), None) => Err("the PyTorch side stopped before this round".to_string()),
            };
            BenchRow::new(name.to_string(), mr, tr, sgemm)
        })
        .collect();
    Ok(BenchRow::from_rounds(rows).expect("at least one round"))
}

/// Starts `torch_lm.py --serve` on the job (the batches the worker wrote); an error when there
/// is no comparison to run (no torch, not f32, not the CPU).
fn torch_side(spec: &RunSpec, o: &BenchOptions, work: &Path) -> std::result::Result<Side, String> {
    if let Some(why) = super::no_torch_reference(spec, o) {
        return Err(why);
    }
    let job = TorchJob::new(spec, o.batch, o.seq_len, o.warmup, o.steps, o.threads, Some(work.join("tokens.u32")));
    let mut cmd = torch::torch_command(&o.torch_python, &o.bench_dir, work, &[job], false)?;
    cmd.arg("--serve");
    Side::spawn("PyTorch", cmd, work.join("torch.stderr")).map_err(|e| e.to_string())
}
