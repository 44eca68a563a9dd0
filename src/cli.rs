//! Command-line interface (clap). Library types stay clap-free; this file maps arguments to
//! library calls and results to output.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mixscale::blocks;
use mixscale::config::{RunSpec, YamlDoc};
use mixscale::train::{self, bench, record::Status, Outcome, TrainOptions};
use std::path::{Path, PathBuf};

mod data_cmd;

#[derive(Parser)]
#[command(name = "mixscale", version, about = "LLM token-mixer architectures and scaling laws on candle")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train one model described by an architecture YAML.
    Train {
        config: PathBuf,
        /// Override a config value by dotted key path, e.g. --set model.d_model=256 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Run folder (default runs/<config file stem>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue from the run folder's last checkpoint (bit-exact).
        #[arg(long)]
        resume: bool,
        /// Delete an existing run folder first.
        #[arg(long)]
        overwrite: bool,
        /// Stop after this many steps with a checkpoint, as if interrupted (resume later).
        #[arg(long)]
        stop_at_step: Option<usize>,
        /// Hide the progress bar.
        #[arg(long)]
        quiet: bool,
        /// cpu, cuda or cuda:N (CUDA needs a binary built with --features cuda).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Training precision, overriding `train.precision` (f32, bf16 = bf16 compute with f32 master weights).
        #[arg(long, value_parser = ["f32", "bf16"])]
        precision: Option<String>,
    },
    /// Token data: `data prepare` tokenizes text/JSONL into shards.
    #[command(subcommand)]
    Data(data_cmd::DataCmd),
    /// List every token-mixer block with its options and defaults.
    Blocks,
    /// Check an architecture YAML (with overrides) without running anything.
    Check {
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Run a core op on named tensors (see ../shared/reference/ops.md for names and layouts).
    Op {
        /// Op name (`mixscale op --list` to list).
        name: Option<String>,
        #[arg(long)]
        inputs: Option<PathBuf>,
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        list: bool,
    },
    /// Fit a scaling law to a CSV of points (columns N, D, C, loss, lr, batch_tokens, S, run, step)
    /// or to a sweep's results (sweep.yaml → runs/<name>/results.csv); writes DIR/fit.json, SVG+PNG
    /// plots, DIR/report.md and DIR/report.html. Without --law, a sweep file runs its `analysis:`
    /// section (see analysis/README.md) and anything else fits chinchilla.
    Fit {
        input: PathBuf,
        /// chinchilla, isoflop, steplaw, deepseek, moe_sparsity, annealing, power.
        #[arg(long)]
        law: Option<String>,
        #[arg(long)]
        out: PathBuf,
        /// Fit options as YAML (keys of mixscale::fit::FitOptions; e.g. delta, drop_highest,
        /// bootstrap: {resamples, seed, level}, budgets, x, y, band, budget_tol, lambda, holdout, columns).
        #[arg(long)]
        options: Option<PathBuf>,
        /// Column naming of a known public file: chinchilla_svg or steplaw.
        #[arg(long)]
        columns: Option<String>,
        /// Drop the k highest losses (Besiroglu et al. 2024 drop 5).
        #[arg(long)]
        drop_highest: Option<usize>,
        /// Bootstrap resamples (by run) for confidence intervals.
        #[arg(long)]
        bootstrap: Option<usize>,
        /// Compute budget (FLOPs) for predictions, e.g. --predict-at 1e21 (repeatable).
        #[arg(long = "predict-at")]
        predict_at: Vec<f64>,
        /// Run folders (or folders of run folders) whose metrics.csv to plot as loss curves.
        #[arg(long = "runs")]
        runs: Vec<PathBuf>,
        /// No plots (fit.json and the report only).
        #[arg(long)]
        no_plots: bool,
    },
    /// Sweeps: plan, run, worker, status, slurm (see README "Sweeps").
    Sweep {
        #[command(subcommand)]
        cmd: crate::cli_sweep::SweepCmd,
    },
    /// Training throughput of architectures side by side with PyTorch eager (bench/README.md).
    Bench {
        /// Architecture YAMLs (several: one table).
        #[arg(required_unless_present = "all")]
        configs: Vec<PathBuf>,
        /// Every architectures/*.yaml preset.
        #[arg(long, conflicts_with = "configs")]
        all: bool,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Tokens per sequence (default: each preset's `train.seq_len`, 256 for every preset but
        /// the MAD ones, whose data fix it).
        #[arg(long)]
        seq_len: Option<usize>,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Rounds per preset, alternating mixscale and PyTorch; the table shows the medians and
        /// the ratio of each round (a shared machine's load moves both sides of a round alike).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
        rounds: u32,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Threads for both implementations (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long, default_value = "bench/.venv/bin/python")]
        torch_python: PathBuf,
        /// Folder with torch_lm.py.
        #[arg(long, default_value = "bench")]
        bench_dir: PathBuf,
        /// Also write the rows as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Training precision, overriding `train.precision` (f32, bf16 = bf16 compute with f32 master weights).
        #[arg(long, value_parser = ["f32", "bf16"])]
        precision: Option<String>,
        /// Internal: run the mixscale side of one config in this process, results into DIR.
        #[arg(long, hide = true, value_name = "DIR")]
        worker: Option<PathBuf>,
        /// Also print the time per step of each phase (forward, backward, grad norm, clip, optimizer).
        #[arg(long)]
        profile: bool,
        /// Run each side once as a long-lived process and let the two take turns: every round
        /// is `--steps` timed steps of one side, then of the other (ABBA order), seconds apart,
        /// so a shared machine's changing speed moves both sides of a round alike.
        #[arg(long)]
        interleave: bool,
    },
}

/// `--precision P` is `--set train.precision=P` (applied last, so it wins).
fn with_precision(mut sets: Vec<String>, precision: Option<String>) -> Vec<String> {
    sets.extend(precision.map(|p| format!("train.precision={p}")));
    sets
}

/// Loads an architecture file with overrides, checks it and resolves block options.
/// `mixscale bench`: every config back to back (mixscale worker, then PyTorch), one table.
/// `seq_len`: `--seq-len`, else each preset's own `train.seq_len`.
#[allow(clippy::too_many_arguments)]
fn bench_command(configs: Vec<PathBuf>, all: bool, sets: &[String], opts: &bench::BenchOptions, seq_len: Option<usize>, device: &str, json: Option<PathBuf>) -> Result<i32> {
    let configs = if all {
        let mut v: Vec<PathBuf> = std::fs::read_dir("architectures")
            .context("--all reads architectures/ (run from the repository root)")?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        v.sort();
        v
    } else {
        configs
    };
    let specs: Vec<RunSpec> = configs.iter().map(|c| load_run(c, sets)).collect::<mixscale::Result<_>>()?;
    let exe = std::env::current_exe().context("locating the mixscale binary")?;
    // The sgemm peak is measured before every preset and after the last; MFU uses the best of
    // them. On a shared machine one measurement swung 220–325 GFLOP/s between runs, and a low
    // one inflates every MFU of the table.
    let mut peaks = Vec::new();
    let scratch = std::env::temp_dir().join(format!("mixscale-bench-{}", std::process::id()));
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    let mut own_len = Vec::new();
    // The header's sequence length: --seq-len, else the one most presets use.
    let mut lens: Vec<usize> = specs.iter().map(|s| s.train.seq_len).collect();
    lens.sort_unstable();
    let common = seq_len.unwrap_or_else(|| lens.iter().copied().max_by_key(|l| lens.iter().filter(|x| *x == l).count()).unwrap_or(256));
    for (i, (config, spec)) in configs.iter().zip(&specs).enumerate() {
        let name = config.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        eprintln!("[{}/{}] {name}", i + 1, configs.len());
        let work = scratch.join(format!("{i}"));
        std::fs::create_dir_all(&work).with_context(|| format!("{}", work.display()))?;
        // One preset that cannot run at these settings (e.g. MAD's fixed example length) is
        // reported under the table; the others are still measured.
        let opts = bench::BenchOptions { seq_len: seq_len.unwrap_or(spec.train.seq_len), ..opts.clone() };
        if opts.seq_len != common {
            own_len.push(format!("{name}: seq {} (its train.seq_len)", opts.seq_len));
        }
        peaks.push(bench::sgemm_peak(&opts.device, 10).context("sgemm peak")?);
        // Every row's peak is replaced by the best measurement of the run below.
        match bench::bench_preset(&exe, &name, config, sets, spec, &opts, device, &work, peaks[0]) {
            Ok(r) => rows.push(r),
            Err(e) => failed.push(format!("{name}: not benchmarked: {}", e.to_string().trim())),
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    peaks.push(bench::sgemm_peak(&opts.device, 10).context("sgemm peak")?);
    let best = peaks.iter().copied().fold(0.0, f64::max);
    let worst = peaks.iter().copied().fold(f64::INFINITY, f64::min);
    rows.iter_mut().for_each(|r| r.sgemm_flops = best);
    let timing = if opts.interleave {
        format!("{} rounds of {} timed steps per side taking turns (--interleave) after {} warmup", opts.rounds, opts.steps, opts.warmup)
    } else {
        format!("{} timed steps after {} warmup", opts.steps, opts.warmup)
    };
    let header = format!(
        "mixscale bench | batch {} x seq {}, {} threads, {timing}, {}\nsgemm peak measured {} times (before each preset, after the last): {:.1}–{:.1} GFLOP/s",
        opts.batch, common, opts.threads, mixscale::device::describe(&opts.device), peaks.len(), worst / 1e9, best / 1e9
    );
    bench::print_table(&mut std::io::stdout(), &rows, &header)?;
    for l in &own_len {
        println!("{l}");
    }
    for f in &failed {
        println!("{f}");
    }
    if let Some(p) = json {
        std::fs::write(&p, serde_json::to_string_pretty(&rows)?).with_context(|| format!("{}", p.display()))?;
    }
    Ok(if failed.is_empty() { 0 } else { 1 })
}

pub fn load_run(path: &Path, sets: &[String]) -> mixscale::Result<RunSpec> {
    let mut doc = YamlDoc::load(path)?;
    for s in sets {
        doc.apply_override(s)?;
    }
    let mut spec = RunSpec::from_doc(&doc)?;
    blocks::resolve_blocks(&doc, &mut spec.model)?;
    Ok(spec)
}

pub fn run() -> Result<i32> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Train { config, sets, out, resume, overwrite, stop_at_step, quiet, device, precision } => {
            let spec = load_run(&config, &with_precision(sets, precision))?;
            let device = mixscale::device::parse(&device)?;
            let stem = config.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "run".into());
            let out = out.unwrap_or_else(|| Path::new("runs").join(stem));
            let opts = TrainOptions {
                out: out.clone(),
                resume,
                overwrite,
                stop_at_step,
                progress: !quiet,
                device,
                dtype: candle_core::DType::F32,
                config_file: config.display().to_string(),
            };
            match train::train(&spec, &opts)? {
                Outcome::Stopped { step } => {
                    println!("stopped at step {step}; continue with --resume --out {}", out.display());
                    Ok(0)
                }
                Outcome::Finished(s) => {
                    let f = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
                    println!("run folder: {}", out.display());
                    println!("status: {:?}{}", s.status, s.reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default());
                    println!("steps: {}/{}  tokens: {}  wall: {:.1}s", s.steps, s.steps_planned, s.tokens, s.wall_time_s);
                    println!(
                        "params: {} total, {} non-embedding  FLOPs/token: {:.4e}  compute C: {:.4e}",
                        s.accounting.params_total, s.accounting.params_non_embedding, s.accounting.flops_per_token, s.compute
                    );
                    println!(
                        "train loss: {}  val loss: {} nats ({} bits/token)  entropy floor: {} nats ({} bits/token)",
                        f(s.train_loss),
                        f(s.val_loss),
                        f(s.val_bits_per_token),
                        f(s.entropy_floor),
                        f(s.entropy_floor_bits)
                    );
                    if let Some(b) = s.val_bits_per_byte {
                        println!("val bits per byte: {b:.4} (at {:.4} bytes/token)", s.val_bytes_per_token.unwrap_or(f64::NAN));
                    }
                    Ok(if s.status == Status::Diverged { 3 } else { 0 })
                }
            }
        }
        Cmd::Sweep { cmd } => crate::cli_sweep::run(cmd),
        Cmd::Check { config, sets } => {
            let spec = load_run(&config, &sets)?;
            print!("{}", serde_yaml_ng::to_string(&spec)?);
            Ok(0)
        }
        Cmd::Data(cmd) => data_cmd::run(cmd),
        Cmd::Blocks => {
            for b in blocks::REGISTRY {
                println!("{}: {}", b.name, b.about);
                for line in serde_yaml_ng::to_string(&(b.defaults)())?.lines() {
                    println!("    {line}");
                }
            }
            println!("ffn kinds: swiglu, relu2, rwkv7_cmix (model.ffn.kind)");
            Ok(0)
        }
        Cmd::Op { name, inputs, out, list } => {
            if list || name.is_none() {
                for o in mixscale::ops::OPS {
                    println!("{}: {} (inputs: {}; optional: {})", o.name, o.about, o.inputs.join(", "), o.optional.join(", "));
                }
                return Ok(0);
            }
            let (Some(i), Some(o)) = (inputs, out) else {
                anyhow::bail!(mixscale::Error::Input("op needs --inputs IN.safetensors and --out OUT.safetensors".into()));
            };
            mixscale::ops::run_op_files(name.as_deref().unwrap_or_default(), &i, &o)?;
            println!("wrote {}", o.display());
            Ok(0)
        }
        Cmd::Fit { input, law, out, options, columns, drop_highest, bootstrap, predict_at, runs, no_plots } => {
            fit_command(&input, law, &out, options, columns, drop_highest, bootstrap, predict_at, runs, no_plots)
        }
        Cmd::Bench { configs, all, sets, batch, seq_len, steps, rounds, warmup, threads, torch_python, bench_dir, json, device, precision, worker, profile, interleave } => {
            let sets = with_precision(sets, precision);
            let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
            // candle's CPU kernels read the same variable as rayon; set before the first op.
            std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
            let dev = mixscale::device::parse(&device)?;
            let mut opts = bench::BenchOptions { batch, seq_len: seq_len.unwrap_or(0), steps, warmup, threads, torch_python, bench_dir, device: dev, profile, rounds: rounds as usize, interleave };
            if let Some(dir) = worker {
                let spec = load_run(&configs[0], &sets)?;
                opts.seq_len = seq_len.unwrap_or(spec.train.seq_len);
                bench::worker_main(&spec, &opts, &dir).context("benchmark")?;
                return Ok(0);
            }
            bench_command(configs, all, &sets, &opts, seq_len, &device, json)
        }
    }
}

/// `mixscale fit`: one law (flat output in DIR) or a sweep's `analysis:` section.
#[allow(clippy::too_many_arguments)]
fn fit_command(
    input: &Path,
    law: Option<String>,
    out: &Path,
    options: Option<PathBuf>,
    columns: Option<String>,
    drop_highest: Option<usize>,
    bootstrap: Option<usize>,
    predict_at: Vec<f64>,
    runs: Vec<PathBuf>,
    no_plots: bool,
) -> Result<i32> {
    use mixscale::fit::analysis::{self, AnalysisSpec, FitSpec};
    use mixscale::fit::{input as finput, points::ColumnMap, FitOptions};
    let inerr = |e: mixscale::fit::FitError| mixscale::Error::Input(e.to_string());
    let mut inp = finput::load(input).map_err(inerr)?;
    inp.run_dirs.extend(finput::run_dirs_under(&runs));
    let spec = match (&law, &inp.sweep) {
        (None, Some((doc, Some(value)))) => analysis::parse_analysis(doc, "analysis", value)?,
        _ => {
            let mut opts: FitOptions = match &options {
                Some(p) => YamlDoc::load(p)?.deserialize()?,
                None => FitOptions::default(),
            };
            match columns.as_deref() {
                None => {}
                Some("chinchilla_svg") => opts.columns = ColumnMap::chinchilla_svg(),
                Some("steplaw") => opts.columns = ColumnMap::steplaw(),
                Some(other) => anyhow::bail!(mixscale::Error::UnknownName {
                    kind: "column preset",
                    name: other.into(),
                    known: vec!["chinchilla_svg".into(), "steplaw".into()],
                }),
            }
            if let Some(k) = drop_highest {
                opts.drop_highest = k;
            }
            if let Some(n) = bootstrap {
                opts.bootstrap.resamples = n;
            }
            if !predict_at.is_empty() {
                opts.budgets = predict_at.clone();
            }
            let law = law.unwrap_or_else(|| "chinchilla".into());
            if !mixscale::fit::KNOWN_LAWS.contains(&law.as_str()) {
                anyhow::bail!(mixscale::Error::UnknownName { kind: "law", name: law, known: mixscale::fit::KNOWN_LAWS.iter().map(|s| s.to_string()).collect() });
            }
            let plots = no_plots.then(Vec::new);
            AnalysisSpec { title: None, fits: vec![FitSpec { law, options: opts, plots, ..Default::default() }] }
        }
    };
    let outcomes = analysis::run_spec(&spec, &inp, out, true)?;
    let mut code = 0;
    for o in &outcomes {
        let Ok(r) = &o.result else { continue };
        println!("[{}] law: {}  points: {}  objective: {:.6e}  grad norm: {:.2e}  converged: {}", o.name, r.law, r.n_points, r.objective, r.grad_norm, r.converged);
        for (k, v) in &r.params {
            let ci = r.ci.get(k).map(|[lo, hi]| format!("  [{lo:.4}, {hi:.4}]")).unwrap_or_default();
            println!("  {k:>8} = {v:.6}{ci}");
        }
        for e in r.exclusions.iter().take(20) {
            println!("  excluded: {e}");
        }
        if r.exclusions.len() > 20 {
            println!("  ... {} more exclusions in fit.json", r.exclusions.len() - 20);
        }
        for e in &o.plot_errors {
            println!("  not plotted: {e}");
        }
        println!("  wrote {}", o.dir.join("fit.json").display());
        if !r.converged {
            code = 4;
        }
    }
    println!("report: {}", out.join("report.html").display());
    analysis::failures(&outcomes, out)?;
    Ok(code)
}
