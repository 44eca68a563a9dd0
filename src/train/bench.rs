//! `mixscale bench`: training throughput of one or more architectures at a given batch and
//! sequence length, side by side with the same model in PyTorch eager (`bench/torch_lm.py`),
//! when `bench/.venv` (or `--torch-python`) holds torch.
//!
//! Per preset, back to back with the same thread count: mixscale in a child process
//! (`mixscale bench CONFIG --worker DIR`, so its peak RSS is its own), then PyTorch on the very
//! batches mixscale trained on. Both time full optimizer steps (forward, backward, global-norm
//! clip, AdamW) after `warmup` untimed steps. Reported: tokens/s, the ratio, model FLOP/s
//! (mixscale's accounting, [`crate::model::count`]) as a fraction of the sgemm peak measured in
//! the same run (best of 1024³ f32 candle matmuls, same threads, measured before every preset
//! and after the last; the best measurement is used), peak RSS of each process
//! (`getrusage(RUSAGE_SELF).ru_maxrss` at the end of the run, both sides: the whole process,
//! data and interpreter included), and the first/last training losses. A comparison whose
//! parameter tables (names, shapes, weight-decay flags) differ is marked *not comparable*.

#[path = "bench_torch.rs"]
pub mod torch;
#[path = "bench_pair.rs"]
pub mod pair;

use super::{compute_grads_with_stats, global_norm, optim::{clip_coef, AdamW}};
use crate::config::RunSpec;
use crate::data::DataSource;
use crate::error::{Error, Result};
use crate::model::count::Accounting;
use crate::model::LanguageModel;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use torch::{ParamTable, TorchJob, TorchRun};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub batch: usize,
    pub seq_len: usize,
    pub steps: usize,
    pub warmup: usize,
    pub threads: usize,
    /// Python with torch; the comparison is skipped when it does not exist.
    pub torch_python: PathBuf,
    /// Folder holding `torch_lm.py`.
    pub bench_dir: PathBuf,
    pub device: Device,
    /// Also time the phases of each step (forward, backward, grad norm, clipped optimizer step).
    pub profile: bool,
    /// Rounds per preset, each mixscale then PyTorch (at least 1): the row reports the median
    /// of each side's tokens/s and the median of the per-round ratios, so that load changes on
    /// a shared machine, which move both sides of a round together, move the ratio less.
    pub rounds: usize,
    /// Rounds as turns of two long-lived processes, `steps` steps each ([`pair`]).
    pub interleave: bool,
}

/// The mixscale side of one preset.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MixscaleRun {
    pub tokens_per_s: f64,
    pub step_ms: f64,
    pub flops_per_token: f64,
    pub params_total: usize,
    pub param_table: ParamTable,
    /// Main-head training loss of every step (warmup included).
    pub losses: Vec<f64>,
    /// Global gradient norm (before clipping) of every step.
    #[serde(default)]
    pub grad_norms: Vec<f64>,
    /// Peak RSS of the process that ran it (KiB; None off Linux/Unix).
    pub peak_rss_kb: Option<u64>,
    /// Mean milliseconds per timed step of each phase (with `profile`), in step order.
    #[serde(default)]
    pub phases: Vec<(String, f64)>,
}

/// Times `o.steps` optimizer steps after `o.warmup` untimed ones, in this process. With
/// `tokens_out`, writes the batches (u32 LE inputs, targets, mask per step) for PyTorch; with
/// `weights_out`, the initial weights (safetensors, mixscale's names) so PyTorch can start from
/// the very same values.
pub fn run_mixscale(spec: &RunSpec, o: &BenchOptions, tokens_out: Option<&Path>, weights_out: Option<&Path>) -> Result<MixscaleRun> {
    let mut s = MixSession::new(spec, o, tokens_out, weights_out)?;
    s.warmup()?;
    s.run(o.steps)?;
    Ok(s.finish())
}

/// The mixscale side of a benchmark as steps on demand: the model, optimizer and the
/// `o.warmup + o.steps` batches, the next step to run, and what the timed steps measured.
/// [`run_mixscale`] runs it in one go; [`pair`] interleaves its chunks with PyTorch's.
pub struct MixSession {
    model: LanguageModel,
    opt: AdamW,
    batches: Vec<crate::data::Batch>,
    o: BenchOptions,
    lr: f64,
    grad_clip: f64,
    flops_per_token: f64,
    params_total: usize,
    next: usize,
    timed: usize,
    elapsed: f64,
    losses: Vec<f64>,
    grad_norms: Vec<f64>,
    /// Summed milliseconds of each phase over the timed steps.
    phases: Vec<(String, f64)>,
}

impl MixSession {
    pub fn new(spec: &RunSpec, o: &BenchOptions, tokens_out: Option<&Path>, weights_out: Option<&Path>) -> Result<Self> {
        let dev = o.device.clone();
        // f32 master weights; bf16 compute under `train.precision: bf16` (as `mixscale train`).
        let model = LanguageModel::new_mixed(&spec.model, o.seq_len, spec.train.seed, DType::F32, spec.train.precision.compute_dtype(DType::F32), &dev)?;
        let acc = Accounting::of(&model, o.seq_len);
        let data = DataSource::new(&spec.data, spec.train.seed, o.seq_len)?;
        let opt = AdamW::new(&spec.train.optimizer, &model.params)?;
        let batches: Vec<_> = (0..o.warmup + o.steps).map(|i| data.train_batch((i * o.batch) as u64, o.batch, &dev)).collect::<Result<_>>()?;
        if let Some(path) = tokens_out {
            write_tokens(&batches, path)?;
        }
        if let Some(path) = weights_out {
            candle_core::safetensors::save(&model.params.tensors(), path)?;
        }
        let n = batches.len();
        Ok(Self {
            model,
            opt,
            batches,
            o: o.clone(),
            lr: spec.train.optimizer.lr,
            grad_clip: spec.train.grad_clip,
            flops_per_token: acc.flops_per_token,
            params_total: acc.params_total,
            next: 0,
            timed: 0,
            elapsed: 0.0,
            losses: Vec::with_capacity(n),
            grad_norms: Vec::with_capacity(n),
            phases: Vec::new(),
        })
    }

    /// The `o.warmup` untimed steps (once, before any timed step).
    pub fn warmup(&mut self) -> Result<()> {
        while self.next < self.o.warmup {
            self.step()?;
        }
        Ok(())
    }

    /// The next `n` timed steps; returns their seconds. Errors past the prepared batches.
    pub fn run(&mut self, n: usize) -> Result<f64> {
        self.warmup()?;
        if self.next + n > self.batches.len() {
            return Err(Error::Other(format!("bench: {n} more steps asked for, {} of {} prepared left", self.batches.len() - self.next, self.batches.len())));
        }
        let mut secs = 0.0;
        for _ in 0..n {
            secs += self.step()?;
        }
        Ok(secs)
    }

    /// One optimizer step on the next batch; returns its seconds (added to the totals when it
    /// is past the warmup).
    fn step(&mut self) -> Result<f64> {
        let (model, o) = (&self.model, &self.o);
        let b = &self.batches[self.next];
        let t0 = Instant::now();
        let mut marks: Vec<(&str, Instant)> = Vec::new();
        let (loss, grads) = if o.profile && !matches!(model.mtp, Some(crate::model::mtp::Mtp::Gloeckle { .. })) {
            // The same computation as `compute_grads` (one micro-batch), split at the phases;
            // run whole (`compute_grads` runs it as concurrent shards: `super::shard`).
            crate::model::objective::begin_step(model);
            let terms = crate::model::mtp::loss_terms(model, &b.inputs, &b.targets, b.mask.as_ref())?;
            let total = terms.total()?;
            let loss = total.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            marks.push(("forward", Instant::now()));
            let g = total.backward()?;
            let mut grads = std::collections::BTreeMap::new();
            crate::model::mtp::collect_grads(model, &g, &mut grads)?;
            drop(g);
            marks.push(("backward", Instant::now()));
            // The objective including auxiliary terms (MoE balance, MTP), not only the main head.
            (loss, grads)
        } else {
            let (loss, grads, _) = compute_grads_with_stats(model, 1, |_| Ok(crate::data::Batch { inputs: b.inputs.clone(), targets: b.targets.clone(), true_nlp: None, mask: b.mask.clone() }))?;
            marks.push(("forward+backward", Instant::now()));
            (loss, grads)
        };
        let n = global_norm(&grads)?;
        marks.push(("grad norm", Instant::now()));
        // As the training loop: clipping folded into the fused AdamW step.
        self.opt.step_clipped(&model.params, &grads, self.lr, clip_coef(n, self.grad_clip))?;
        o.device.synchronize()?;
        marks.push(("optimizer", Instant::now()));
        drop(grads);
        marks.push(("free", Instant::now()));
        let secs = t0.elapsed().as_secs_f64();
        if self.next >= o.warmup {
            self.elapsed += secs;
            self.timed += 1;
            let mut prev = t0;
            for (k, (name, t)) in marks.iter().enumerate() {
                let ms = 1000.0 * (*t - prev).as_secs_f64();
                match self.phases.get_mut(k) {
                    Some(p) => p.1 += ms,
                    None => self.phases.push((name.to_string(), ms)),
                }
                prev = *t;
            }
        }
        self.losses.push(loss);
        self.grad_norms.push(n);
        self.next += 1;
        Ok(secs)
    }

    /// What the timed steps so far measured (phase times per step with `o.profile`).
    pub fn finish(self) -> MixscaleRun {
        let steps = self.timed.max(1) as f64;
        let phases = if self.o.profile { self.phases.into_iter().map(|(k, ms)| (k, ms / steps)).collect() } else { Vec::new() };
        MixscaleRun {
            tokens_per_s: (self.timed * self.o.batch * self.o.seq_len) as f64 / self.elapsed,
            step_ms: 1000.0 * self.elapsed / steps,
            flops_per_token: self.flops_per_token,
            params_total: self.params_total,
            param_table: torch::param_table(&self.model),
            losses: self.losses,
            grad_norms: self.grad_norms,
            peak_rss_kb: peak_rss_kb(),
            phases,
        }
    }
}

/// Per step: inputs `[B,T]`, targets `[B,T]`, mask `[B,T]` (1 = scored), u32 little-endian.
fn write_tokens(batches: &[crate::data::Batch], path: &Path) -> Result<()> {
    let mut out = Vec::new();
    for b in batches {
        let ones;
        let mask = match &b.mask {
            Some(m) => m.to_dtype(DType::F32)?.ne(0f32)?.to_dtype(DType::U32)?,
            None => {
                ones = b.inputs.ones_like()?.to_dtype(DType::U32)?;
                ones
            }
        };
        for t in [&b.inputs, &b.targets, &mask] {
            let v: Vec<u32> = t.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
            v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
    }
    std::fs::write(path, out).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })
}

/// Peak resident set size of this process in KiB (`getrusage(RUSAGE_SELF).ru_maxrss`).
pub fn peak_rss_kb() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut r: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes into the zeroed struct we own.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) } == 0 {
            let v = r.ru_maxrss as u64;
            return Some(if cfg!(target_os = "macos") { v / 1024 } else { v });
        }
    }
    None
}

/// Best FLOP/s of `reps` 1024×1024×1024 f32 matmuls through candle on `dev` (after two
/// untimed ones), with the threads candle is using now.
pub fn sgemm_peak(dev: &Device, reps: usize) -> Result<f64> {
    let n = 1024;
    let a = Tensor::randn(0f32, 1.0, (n, n), dev)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), dev)?;
    let mut best = f64::INFINITY;
    for i in 0..reps + 2 {
        let t0 = Instant::now();
        let c = a.matmul(&b)?;
        dev.synchronize()?;
        let dt = t0.elapsed().as_secs_f64();
        drop(c);
        if i >= 2 {
            best = best.min(dt);
        }
    }
    Ok(2.0 * (n * n * n) as f64 / best)
}

/// Runs the mixscale side in a child process (`exe bench CONFIG --worker DIR ...`), so its peak
/// RSS is its own; the batches land in `DIR/tokens.u32`.
pub fn run_worker(exe: &Path, config: &Path, sets: &[String], o: &BenchOptions, device: &str, dir: &Path) -> Result<MixscaleRun> {
    let mut cmd = worker_command(exe, config, sets, o, device, dir);
    let out = cmd.output().map_err(|e| Error::Other(format!("could not run {}: {e}", exe.display())))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(Error::Other(format!("mixscale bench worker for {} failed: {}", config.display(), err.trim())));
    }
    read_run(dir)
}

/// The worker's result, `DIR/mixscale.json`.
fn read_run(dir: &Path) -> Result<MixscaleRun> {
    let path = dir.join("mixscale.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Io { path: path.clone(), source: e })?;
    serde_json::from_str(&text).map_err(|e| Error::Other(format!("{}: {e}", path.display())))
}

/// Writes the worker's result to `DIR/mixscale.json`.
fn write_run(dir: &Path, r: &MixscaleRun) -> Result<()> {
    let path = dir.join("mixscale.json");
    let text = serde_json::to_string(r).map_err(|e| Error::Other(e.to_string()))?;
    std::fs::write(&path, text).map_err(|e| Error::Io { path, source: e })
}

/// `exe bench CONFIG --worker DIR` with the options (and `--interleave` when `o.interleave`).
fn worker_command(exe: &Path, config: &Path, sets: &[String], o: &BenchOptions, device: &str, dir: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("bench").arg(config).arg("--worker").arg(dir);
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    for (k, v) in [("--batch", o.batch), ("--seq-len", o.seq_len), ("--steps", o.steps), ("--warmup", o.warmup), ("--threads", o.threads)] {
        cmd.arg(k).arg(v.to_string());
    }
    if o.profile {
        cmd.arg("--profile");
    }
    if o.interleave {
        cmd.arg("--interleave");
    }
    cmd.arg("--device").arg(device).env("RAYON_NUM_THREADS", o.threads.to_string());
    cmd
}

/// The worker's side: run in-process and write `DIR/mixscale.json` (+ `DIR/tokens.u32`).
pub fn worker_main(spec: &RunSpec, o: &BenchOptions, dir: &Path) -> Result<()> {
    if o.interleave {
        return pair::serve_worker(spec, o, dir);
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.to_path_buf(), source: e })?;
    let r = run_mixscale(spec, o, Some(&dir.join("tokens.u32")), None)?;
    write_run(dir, &r)
}

/// One row of the table.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub name: String,
    pub mixscale: MixscaleRun,
    pub torch: Option<TorchRun>,
    /// Why there is no (comparable) PyTorch number; None when comparable.
    pub note: Option<String>,
    pub comparable: bool,
    pub sgemm_flops: f64,
    /// mixscale/PyTorch tokens/s of each round (`--rounds`), in order; empty when not comparable.
    pub round_ratios: Vec<f64>,
}

impl BenchRow {
    /// Pairs the two sides; parameter tables must be equal for the row to be comparable.
    pub fn new(name: String, mixscale: MixscaleRun, torch: std::result::Result<TorchRun, String>, sgemm_flops: f64) -> Self {
        let (torch, note) = match torch {
            Ok(t) => {
                let diff = torch::compare_params(&mixscale.param_table, &t.param_table);
                let note = diff.map(|d| format!("NOT COMPARABLE: torch {} params vs mixscale {}; {d}", t.params_total, mixscale.params_total));
                (Some(t), note)
            }
            Err(e) => (None, Some(e)),
        };
        let comparable = torch.is_some() && note.is_none();
        let round_ratios = match (&torch, comparable) {
            (Some(t), true) => vec![mixscale.tokens_per_s / t.tokens_per_s],
            _ => Vec::new(),
        };
        Self { name, mixscale, torch, note, comparable, sgemm_flops, round_ratios }
    }

    /// Several rounds of the same preset as one row: each side's median tokens/s (and step time),
    /// the median of the per-round ratios; the rest (parameters, losses, memory) from round 1.
    /// Rounds whose PyTorch side failed or is not comparable count for mixscale only.
    pub fn from_rounds(mut rounds: Vec<BenchRow>) -> Option<Self> {
        let mixs: Vec<f64> = rounds.iter().map(|r| r.mixscale.tokens_per_s).collect();
        let torch: Vec<f64> = rounds.iter().filter(|r| r.comparable).filter_map(|r| r.torch.as_ref().map(|t| t.tokens_per_s)).collect();
        let ratios: Vec<f64> = rounds.iter().flat_map(|r| r.round_ratios.clone()).collect();
        let mut row = if rounds.is_empty() { return None } else { rounds.remove(0) };
        let mixed = median(&mixs);
        row.mixscale.step_ms *= row.mixscale.tokens_per_s / mixed;
        row.mixscale.tokens_per_s = mixed;
        if let (Some(t), false) = (row.torch.as_mut(), torch.is_empty()) {
            let med = median(&torch);
            t.step_ms *= t.tokens_per_s / med;
            t.tokens_per_s = med;
        }
        row.round_ratios = ratios;
        Some(row)
    }

    /// mixscale/PyTorch tokens/s: the median of the rounds' ratios.
    pub fn ratio(&self) -> Option<f64> {
        self.torch.as_ref().filter(|_| self.comparable)?;
        (!self.round_ratios.is_empty()).then(|| median(&self.round_ratios))
    }

    fn mfu(&self, tps: f64) -> f64 {
        tps * self.mixscale.flops_per_token / self.sgemm_flops
    }
}

/// Median (mean of the middle two for an even count); NaN for none.
pub fn median(x: &[f64]) -> f64 {
    let mut v = x.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

fn mib(kb: Option<u64>) -> String {
    kb.map(|k| format!("{:.0}", k as f64 / 1024.0)).unwrap_or_else(|| "-".into())
}

fn loss_pair(l: &[f64]) -> String {
    match (l.first(), l.last()) {
        (Some(a), Some(b)) => format!("{a:.3}>{b:.3}"),
        _ => "-".into(),
    }
}

/// Prints the table (one line per preset, notes below).
pub fn print_table(out: &mut dyn Write, rows: &[BenchRow], header: &str) -> std::io::Result<()> {
    writeln!(out, "{header}")?;
    if let Some(r) = rows.first() {
        writeln!(out, "sgemm peak (1024^3 f32, candle, same threads; the best measurement): {:.1} GFLOP/s; MFU = model FLOP/s / sgemm peak", r.sgemm_flops / 1e9)?;
    }
    writeln!(
        out,
        "{:<22} {:>9} {:>11} {:>11} {:>6} {:>9} {:>6} {:>6} {:>7} {:>7} {:>13} {:>13}",
        "preset", "params", "mix tok/s", "torch tok/s", "ratio", "mixGF/s", "mixMFU", "thMFU", "mixMiB", "thMiB", "mix loss", "torch loss"
    )?;
    for r in rows {
        let m = &r.mixscale;
        let (ttps, tmfu, trss, tloss) = match (&r.torch, r.comparable) {
            (Some(t), true) => (format!("{:.0}", t.tokens_per_s), format!("{:.3}", r.mfu(t.tokens_per_s)), mib(t.peak_rss_kb), loss_pair(&t.losses)),
            (Some(_), false) => ("n/c".into(), "-".into(), "-".into(), "-".into()),
            _ => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let ratio = r.ratio().map(|x| format!("{x:.2}x")).unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "{:<22} {:>9} {:>11.0} {:>11} {:>6} {:>9.2} {:>6.3} {:>6} {:>7} {:>7} {:>13} {:>13}",
            r.name,
            m.params_total,
            m.tokens_per_s,
            ttps,
            ratio,
            m.tokens_per_s * m.flops_per_token / 1e9,
            r.mfu(m.tokens_per_s),
            tmfu,
            mib(m.peak_rss_kb),
            trss,
            loss_pair(&m.losses),
            tloss
        )?;
    }
    for r in rows.iter().filter(|r| !r.mixscale.phases.is_empty()) {
        let p: Vec<String> = r.mixscale.phases.iter().map(|(k, ms)| format!("{k} {ms:.1} ms")).collect();
        writeln!(out, "{} phases per step: {}", r.name, p.join(", "))?;
    }
    for r in rows.iter().filter(|r| r.round_ratios.len() > 1) {
        let each: Vec<String> = r.round_ratios.iter().map(|x| format!("{x:.2}")).collect();
        writeln!(out, "{} ratio per round: {} (median {:.2}x)", r.name, each.join(" "), median(&r.round_ratios))?;
    }
    for r in rows {
        match &r.note {
            Some(n) => writeln!(out, "{}: {n}", r.name)?,
            None => writeln!(out, "{}: comparable (same {} parameters, names, shapes, decay flags; torch {})", r.name, r.mixscale.params_total, r.torch.as_ref().map(|t| t.torch_version.as_str()).unwrap_or("?"))?,
        }
    }
    Ok(())
}

/// Benchmarks one preset: mixscale in a worker process, then PyTorch on the same batches.
/// `work` is a scratch folder for this preset.
#[allow(clippy::too_many_arguments)]
pub fn bench_preset(exe: &Path, name: &str, config: &Path, sets: &[String], spec: &RunSpec, o: &BenchOptions, device: &str, work: &Path, sgemm: f64) -> Result<BenchRow> {
    if o.interleave {
        return pair::bench_preset(exe, name, config, sets, spec, o, device, work, sgemm);
    }
    let mut rounds = Vec::new();
    for _ in 0..o.rounds.max(1) {
        let m = run_worker(exe, config, sets, o, device, work)?;
        let torch = match no_torch_reference(spec, o) {
            Some(why) => Err(why),
            None => {
                let job = TorchJob::new(spec, o.batch, o.seq_len, o.warmup, o.steps, o.threads, Some(work.join("tokens.u32")));
                torch::run_torch(&o.torch_python, &o.bench_dir, work, &[job], false).map(|mut v| v.remove(0))
            }
        };
        rounds.push(BenchRow::new(name.to_string(), m, torch, sgemm));
    }
    Ok(BenchRow::from_rounds(rounds).expect("at least one round"))
}

/// Why there is no PyTorch side to compare with at these settings (it runs f32 on the CPU only).
fn no_torch_reference(spec: &RunSpec, o: &BenchOptions) -> Option<String> {
    if !spec.train.precision.is_f32() {
        Some("the PyTorch reference runs in f32 only".into())
    } else if !o.device.is_cpu() {
        Some("the PyTorch reference runs on the CPU only".into())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(tps: f64) -> MixscaleRun {
        MixscaleRun { tokens_per_s: tps, step_ms: 1000.0 / tps, flops_per_token: 1.0, params_total: 3, param_table: Default::default(), losses: vec![], grad_norms: vec![], peak_rss_kb: None, phases: vec![] }
    }

    fn torch(tps: f64) -> TorchRun {
        TorchRun { torch_version: "t".into(), tokens_per_s: tps, step_ms: 1000.0 / tps, params_total: 3, param_table: Default::default(), peak_rss_kb: None, losses: vec![], grad_norms: vec![] }
    }

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    /// The row of several rounds: medians of each side, the median of the per-round ratios (not
    /// the ratio of the medians), step times consistent with the medians; a round whose PyTorch
    /// side failed counts for mixscale only.
    #[test]
    fn rounds_report_medians_and_round_ratios() {
        let rows = vec![
            BenchRow::new("p".into(), run(100.0), Ok(torch(50.0)), 1.0),
            BenchRow::new("p".into(), run(60.0), Ok(torch(60.0)), 1.0),
            BenchRow::new("p".into(), run(90.0), Ok(torch(100.0)), 1.0),
            BenchRow::new("p".into(), run(80.0), Err("no torch".into()), 1.0),
        ];
        let r = BenchRow::from_rounds(rows).unwrap();
        assert_eq!(r.round_ratios, vec![2.0, 1.0, 0.9]);
        assert_eq!(r.ratio(), Some(1.0));
        assert_eq!(r.mixscale.tokens_per_s, 85.0);
        assert!((r.mixscale.step_ms - 1000.0 / 85.0).abs() < 1e-9);
        let t = r.torch.as_ref().unwrap();
        assert_eq!(t.tokens_per_s, 60.0);
        assert!((t.step_ms - 1000.0 / 60.0).abs() < 1e-9);
        let mut out = Vec::new();
        print_table(&mut out, &[r], "h").unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("p ratio per round: 2.00 1.00 0.90 (median 1.00x)"), "{text}");
        assert!(BenchRow::from_rounds(vec![]).is_none());
    }
}
