//! Plots, report and the analysis hook (`fit::analysis`): every plot kind is written as SVG with
//! its axis labels and as a PNG that decodes at the stated size; the report references every
//! plot and inlines the PNGs; analysis specs give located errors; sweep inputs skip
//! non-completed trials and record them.

use mixscale::config::YamlDoc;
use mixscale::data::rng::Rng;
use mixscale::fit::analysis::{check_analysis, parse_analysis, run_analysis, run_spec};
use mixscale::fit::input;
use mixscale::fit::laws::chinchilla::Chinchilla;
use mixscale::fit::laws::deepseek::DeepSeek;
use std::path::{Path, PathBuf};

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-scratch").join(format!("plot-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn png_size(path: &Path) -> (u32, u32) {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut rd = dec.read_info().unwrap();
    let mut buf = vec![0; rd.output_buffer_size()];
    let info = rd.next_frame(&mut buf).unwrap();
    // Not blank: some pixels differ from the white background.
    assert!(buf[..info.buffer_size()].iter().any(|&b| b < 200), "{} is blank", path.display());
    (info.width, info.height)
}

/// A synthetic sweep results table: a Chinchilla loss surface over an N × D grid, a learning
/// rate × batch grid per budget (loss minimal at the DeepSeek law), two architectures, one
/// diverged trial and one whole diverged cell.
fn write_results(dir: &Path) -> PathBuf {
    let truth = Chinchilla { e: 1.8, a: 480.0, b: 2100.0, alpha: 0.34, beta: 0.34 };
    let ds = DeepSeek::published();
    let mut rng = Rng::new(4);
    let mut text = String::from("run,arch,seed,status,N,N_total,D,C,loss,lr,batch_tokens,S,step\n");
    let mut k = 0;
    for (bi, &c) in [1e17, 1e18, 1e19].iter().enumerate() {
        let n_star = truth.allocation(c).n_opt;
        for j in -2..=2 {
            let n = n_star * 2f64.powi(j);
            let d = c / (6.0 * n);
            for (li, lm) in [0.5, 1.0, 2.0].iter().enumerate() {
                for (bj, bm) in [0.5, 1.0, 2.0].iter().enumerate() {
                    let (lr, bs) = (ds.lr(c) * lm, ds.batch_tokens(c) * bm);
                    let pen = 1.0 + 0.004 * lm.ln().powi(2) + 0.002 * bm.ln().powi(2);
                    let arch = if (li + bj) % 2 == 0 { "attention" } else { "mamba2" };
                    let mut loss = truth.loss(n, d) * pen * (0.001 * rng.normal()).exp();
                    let mut status = "completed";
                    if bi == 0 && j == -2 {
                        status = "diverged"; // a whole (N, D) cell diverged
                        loss = f64::NAN;
                    }
                    if k == 20 {
                        status = "failed";
                    }
                    text.push_str(&format!("t{k},{arch},0,{status},{n:e},{:e},{d:e},{c:e},{loss},{lr:e},{bs:e},0,{}\n", n * 1.2, (d / bs).round()));
                    k += 1;
                }
            }
        }
    }
    let runs = dir.join("runs/demo");
    std::fs::create_dir_all(&runs).unwrap();
    let p = runs.join("results.csv");
    std::fs::write(&p, text).unwrap();
    // Two run folders with metrics.csv for the loss-curve plot.
    for r in ["t0", "t1"] {
        let rd = runs.join(r);
        std::fs::create_dir_all(&rd).unwrap();
        let mut m = String::from("step,tokens,lr,train_loss,val_loss,grad_norm,tokens_per_s\n");
        for s in 1..=20 {
            m.push_str(&format!("{s},{},1e-3,{},{},1.0,1000\n", s * 4096, 5.0 / (s as f64).powf(0.3), if s % 5 == 0 { format!("{}", 5.1 / (s as f64).powf(0.3)) } else { String::new() }));
        }
        std::fs::write(rd.join("metrics.csv"), m).unwrap();
    }
    p
}

const SPEC: &str = "name: demo
analysis:
  title: Demo sweep
  fits:
    - law: chinchilla
      options: {grid: [[6, 7, 0.5, 0.3, 0.3], [5, 8, 0.6, 0.4, 0.4]], bootstrap: {resamples: 30}}
      predict_at: [1.0e21]
      plots: [frontier, residuals, arch, curves]
    - law: isoflop
      options: {bootstrap: {resamples: 30}}
      predict_at: [1.0e21]
    - law: deepseek
      options: {bootstrap: {resamples: 30}}
      predict_at: [1.0e21]
    - law: power
      name: attention_only
      where: {arch: attention}
      options: {x: C, y: loss}
      plots: [frontier]
";

#[test]
fn analysis_writes_fits_plots_and_report() {
    let dir = scratch("analysis");
    let results = write_results(&dir);
    let doc = YamlDoc::from_text(&dir.join("demo.yaml"), SPEC.into()).unwrap();
    let value = doc.value.get("analysis").unwrap().clone();
    check_analysis(&doc, "analysis", &value).unwrap();
    let out = dir.join("analysis");
    run_analysis(&doc, "analysis", &value, &results, &out).unwrap();
    for f in ["chinchilla", "isoflop", "deepseek", "attention_only"] {
        let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join(f).join("fit.json")).unwrap()).unwrap();
        assert!(j["params"].as_object().is_some_and(|p| !p.is_empty()), "{f}: {j}");
        // Non-completed trials are excluded and named.
        let ex: Vec<&str> = j["exclusions"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert!(ex.iter().any(|e| e.contains("`t20`") && e.contains("failed")), "{f}: {ex:?}");
        assert_eq!(ex.iter().filter(|e| e.contains("diverged")).count(), 9, "{f}");
    }
    let ds: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("deepseek/fit.json")).unwrap()).unwrap();
    assert!((ds["params"]["eta_exp"].as_f64().unwrap() - DeepSeek::published().eta_exp).abs() < 0.03, "{}", ds["params"]);
    let pw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("attention_only/fit.json")).unwrap()).unwrap();
    assert!(pw["exclusions"].as_array().unwrap().iter().any(|e| e.as_str().unwrap().contains("not matching `where: arch = attention`")));

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    let mut n_figs = 0;
    let labels = [
        ("frontier", "training compute C (FLOPs)"),
        ("residuals", "ln(predicted) - ln(observed)"),
        ("arch", "loss (nats/token)"),
        ("curves", "tokens seen"),
        ("isoflop", "non-embedding parameters N"),
        ("heatmap", "peak learning rate"),
        ("hparams", "optimal batch size (tokens)"),
    ];
    for f in ["chinchilla", "isoflop", "deepseek", "attention_only"] {
        for e in std::fs::read_dir(out.join(f)).unwrap().flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("png") {
                continue;
            }
            n_figs += 1;
            let stem = p.file_stem().unwrap().to_str().unwrap().to_string();
            let (w, h) = png_size(&p);
            assert!(w >= 900 && h >= 400, "{}: {w}x{h}", p.display());
            let svg = std::fs::read_to_string(p.with_extension("svg")).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains(&format!("width=\"{w}\"")), "{}", p.display());
            if let Some((_, label)) = labels.iter().find(|(k, _)| *k == stem) {
                assert!(svg.contains(label), "{stem}.svg lacks axis label {label:?}");
            }
            let rel = format!("{f}/{stem}.png");
            assert!(md.contains(&rel), "report.md does not reference {rel}");
        }
    }
    // chinchilla: 4 plots, isoflop: isoflop + frontier + arch + curves, deepseek: heatmap +
    // hparams + arch + curves, attention_only: frontier.
    assert_eq!(n_figs, 13, "{md}");
    assert_eq!(html.matches("src=\"data:image/png;base64,").count(), n_figs);
    assert!(md.contains("Predictions at target budgets") && md.contains("| 1e21 | chinchilla | N_opt |"), "{md}");
    assert!(md.contains("learning rate") && md.contains("Exclusions ("), "{md}");
}

#[test]
fn sweep_file_input_reads_results_of_completed_trials() {
    let dir = scratch("sweepin");
    write_results(&dir);
    let y = dir.join("demo.yaml");
    std::fs::write(&y, SPEC).unwrap();
    let inp = input::load(&y).unwrap();
    assert_eq!(inp.exclusions.len(), 10, "{:?}", inp.exclusions);
    assert_eq!(inp.table.records.len(), 135 - 10);
    assert_eq!(inp.run_dirs.len(), 2);
    let (doc, value) = inp.sweep.clone().unwrap();
    let spec = parse_analysis(&doc, "analysis", value.as_ref().unwrap()).unwrap();
    assert_eq!(spec.fits.len(), 4);
    // A law that cannot be fitted is reported, the others still run, the report is written.
    let bad = mixscale::fit::analysis::AnalysisSpec {
        title: None,
        fits: vec![
            mixscale::fit::analysis::FitSpec { law: "moe_sparsity".into(), ..Default::default() },
            mixscale::fit::analysis::FitSpec { law: "chinchilla".into(), options: mixscale::fit::FitOptions { grid: mixscale::fit::StartGrid::Custom(vec![vec![6.0, 7.0, 0.5, 0.3, 0.3]]), ..Default::default() }, plots: Some(vec![]), ..Default::default() },
        ],
    };
    let out = dir.join("bad");
    let outcomes = run_spec(&bad, &inp, &out, false).unwrap();
    assert!(outcomes[0].result.as_ref().unwrap_err().contains("2 distinct sparsities") || outcomes[0].result.as_ref().unwrap_err().contains("sparsit"), "{:?}", outcomes[0].result);
    assert!(outcomes[1].result.is_ok());
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("Fit failed:"), "{md}");
    let e = mixscale::fit::analysis::failures(&outcomes, &out).unwrap_err().to_string();
    assert!(e.contains("1 of 2 fits failed") && e.contains("moe_sparsity"), "{e}");
    // A sweep without results yet is a clear error.
    let y2 = dir.join("other.yaml");
    std::fs::write(&y2, "name: not_run\n").unwrap();
    let e = input::load(&y2).unwrap_err().to_string();
    assert!(e.contains("not_run") && e.contains("results.csv") && e.contains("run the sweep first"), "{e}");
}

#[test]
fn analysis_spec_errors_are_located() {
    let check = |text: &str| {
        let doc = YamlDoc::from_text(Path::new("s.yaml"), text.into()).unwrap();
        let v = doc.value.get("analysis").unwrap().clone();
        check_analysis(&doc, "analysis", &v).map_err(|e| e.to_string())
    };
    let e = check("name: x\nanalysis:\n  fits:\n    - law: chinchila\n").unwrap_err();
    assert!(e.starts_with("s.yaml:4: analysis.fits[0].law:") && e.contains("known laws: chinchilla"), "{e}");
    let e = check("analysis:\n  fits:\n    - law: steplaw\n      options:\n        bnd: 0.01\n").unwrap_err();
    assert!(e.contains("s.yaml:5") && e.contains("analysis.fits[0].options.bnd") && e.contains("unknown field"), "{e}");
    let e = check("analysis:\n  - law: isoflop\n    plots: [frontier, heatmapp]\n").unwrap_err();
    assert!(e.contains("analysis[0].plots[1]") && e.contains("known plots"), "{e}");
    let e = check("analysis:\n  fits:\n    - law: power\n    - law: power\n      name: power_0\n    - {law: chinchilla, name: power_0}\n").unwrap_err();
    assert!(e.contains("fits[2].name") && e.contains("two fits"), "{e}");
    let e = check("analysis:\n  fits:\n    - law: deepseek\n      predict_at: [-1]\n").unwrap_err();
    assert!(e.contains("s.yaml:4") && e.contains("predict_at"), "{e}");
    let e = check("analysis:\n  fits: []\n").unwrap_err();
    assert!(e.contains("no fits"), "{e}");
    // The shipped examples are valid.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("analysis");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        if e.path().extension().and_then(|x| x.to_str()) == Some("yaml") {
            let doc = YamlDoc::load(&e.path()).unwrap();
            let v = doc.value.get("analysis").unwrap().clone();
            check_analysis(&doc, "analysis", &v).unwrap();
            n += 1;
        }
    }
    assert!(n >= 4);
}

#[test]
fn steplaw_heatmap_and_hparams_on_released_runs() {
    let dir = scratch("steplaw");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/steplaw_dense_lr_bs_loss.csv");
    let inp = input::load(&data).unwrap();
    let spec = mixscale::fit::analysis::AnalysisSpec {
        title: Some("Step Law".into()),
        fits: vec![mixscale::fit::analysis::FitSpec {
            law: "steplaw".into(),
            options: mixscale::fit::FitOptions { columns: mixscale::fit::ColumnMap::steplaw(), bootstrap: mixscale::fit::BootstrapOptions { resamples: 50, seed: 1, level: 0.95 }, ..Default::default() },
            ..Default::default()
        }],
    };
    let outcomes = run_spec(&spec, &inp, &dir, true).unwrap();
    let o = &outcomes[0];
    assert!(o.plot_errors.is_empty(), "{:?}", o.plot_errors);
    let kinds: Vec<&str> = o.figures.iter().map(|f| f.kind.as_str()).collect();
    assert_eq!(kinds, vec!["heatmap", "hparams"]);
    for f in &o.figures {
        assert_eq!(png_size(&f.png), f.size);
    }
    let svg = std::fs::read_to_string(dir.join("hparams.svg")).unwrap();
    assert!(svg.contains("non-embedding parameters N") && svg.contains("training tokens D") && svg.contains("bootstrap band"));
    assert!(dir.join("fit.json").is_file() && dir.join("report.html").is_file());
}

/// `best_per: [N]` keeps the best row (lowest loss over lr × batch) of every size after `where`,
/// records the removals, and the `arch` plot still shows every architecture of the input.
#[test]
fn best_per_selects_the_frontier_and_arch_plot_sees_all_rows() {
    let dir = scratch("bestper");
    let results = write_results(&dir);
    let spec = "analysis:
  fits:
    - law: power
      name: frontier_attention
      where: {arch: attention}
      best_per: [N]
      options: {x: C, y: loss}
      plots: [frontier, arch]
";
    let doc = YamlDoc::from_text(&dir.join("bp.yaml"), spec.into()).unwrap();
    let value = doc.value.get("analysis").unwrap().clone();
    let out = dir.join("analysis");
    run_analysis(&doc, "analysis", &value, &results, &out).unwrap();
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("frontier_attention/fit.json")).unwrap()).unwrap();
    // Completed attention rows: 3 budgets × 5 sizes, minus the diverged cell (1 size) and the
    // failed trial's size keeps its other rows: one point per distinct N.
    let table = mixscale::fit::csv::Table::read(&results).unwrap();
    let (jn, ja, js) = (table.column("N").unwrap(), table.column("arch").unwrap(), table.column("status").unwrap());
    let mut sizes: Vec<&str> = table.records.iter().filter(|(_, f)| f[ja] == "attention" && f[js] == "completed").map(|(_, f)| f[jn].as_str()).collect();
    sizes.sort();
    sizes.dedup();
    assert_eq!(j["n_points"].as_u64().unwrap() as usize, sizes.len(), "{j}");
    let ex: Vec<&str> = j["exclusions"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(ex.iter().any(|e| e.contains("not the lowest `loss` of their (N) group (`best_per`)")), "{ex:?}");
    let svg = std::fs::read_to_string(out.join("frontier_attention/arch.svg")).unwrap();
    assert!(svg.contains("attention") && svg.contains("mamba2"), "arch plot should list both architectures (legend)");
    // An unknown key next to best_per is a located error listing the known ones.
    let bad = "analysis:\n  fits:\n    - law: power\n      best_pre: [N]\n";
    let doc = YamlDoc::from_text(&dir.join("bad.yaml"), bad.into()).unwrap();
    let e = check_analysis(&doc, "analysis", doc.value.get("analysis").unwrap()).unwrap_err().to_string();
    assert!(e.contains("bad.yaml:4") && e.contains("best_pre") && e.contains("best_per"), "{e}");
}
