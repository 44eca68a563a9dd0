//! Tests of the IsoFLOP, DeepSeek, MoE-sparsity and annealing laws on synthetic data generated
//! by each law with known parameters and noise, plus degenerate inputs.

use mixscale::data::rng::Rng;
use mixscale::fit::bootstrap::BootstrapOptions;
use mixscale::fit::csv::Table;
use mixscale::fit::laws::annealing::{self, Annealing};
use mixscale::fit::laws::chinchilla::Chinchilla;
use mixscale::fit::laws::deepseek::DeepSeek;
use mixscale::fit::laws::moe_sparsity::{self, MoeLaw};
use mixscale::fit::{fit_table, FitError, FitOptions, FitResult, StartGrid};
use std::path::Path;

fn table(header: &str, rows: &[String]) -> Table {
    let mut text = format!("{header}\n");
    for r in rows {
        text.push_str(r);
        text.push('\n');
    }
    Table::parse(Path::new("synthetic.csv"), &text).unwrap()
}

fn boot(resamples: usize) -> BootstrapOptions {
    BootstrapOptions { resamples, seed: 5, level: 0.95 }
}

fn assert_in_ci(r: &FitResult, k: &str, truth: f64) {
    let [lo, hi] = r.ci[k];
    assert!(lo <= truth && truth <= hi, "{k}: truth {truth} outside ({lo}, {hi}); estimate {}", r.params[k]);
    assert!(hi > lo, "{k}: empty CI");
}

// ---------------------------------------------------------------- IsoFLOP (Approach 2)

/// α = β makes each profile symmetric in ln N around the true optimum (a cosh), so a parabola
/// on a grid symmetric around it has its vertex at the optimum; a = β/(α+β) = 0.5.
fn isoflop_rows(truth: &Chinchilla, sigma: f64, seed: u64, edge_budget: bool) -> Vec<String> {
    let mut rng = Rng::new(seed);
    let mut rows = Vec::new();
    for (b, &c) in [1e18, 3e18, 1e19, 3e19, 1e20, 3e20].iter().enumerate() {
        let n_star = truth.allocation(c).n_opt;
        for k in -3..=3 {
            for seed_run in 0..2 {
                let n = n_star * 2f64.powi(k);
                let d = c / (6.0 * n);
                let loss = truth.loss(n, d) * (sigma * rng.normal()).exp();
                rows.push(format!("{n:e},{d:e},{c:e},{loss},b{b}k{k}s{seed_run}"));
            }
        }
    }
    if edge_budget {
        // A budget whose sizes are all far below the optimum: lowest loss at the largest N.
        let c = 1e21;
        let n_star = truth.allocation(c).n_opt;
        for k in 0..4 {
            let n = n_star / 64.0 * 2f64.powi(k);
            let d = c / (6.0 * n);
            rows.push(format!("{n:e},{d:e},{c:e},{},edge{k}", truth.loss(n, d)));
        }
    }
    rows
}

#[test]
fn isoflop_recovers_exponents_and_drops_edge_budgets() {
    let truth = Chinchilla { e: 1.8, a: 480.0, b: 2100.0, alpha: 0.34, beta: 0.34 };
    let t = table("N,D,C,loss,run", &isoflop_rows(&truth, 0.002, 3, true));
    let o = FitOptions { bootstrap: boot(200), budgets: vec![1e21], ..Default::default() };
    let (_, r) = fit_table(&t, &[], "isoflop", &o).unwrap();
    assert_in_ci(&r, "a", 0.5);
    assert_in_ci(&r, "b", 0.5);
    assert!((r.params["a"] - 0.5).abs() < 0.03, "{:?}", r.params);
    let g = truth.g();
    assert_in_ci(&r, "N_coef", g * 6f64.powf(-0.5));
    let edge: Vec<&String> = r.exclusions.iter().filter(|e| e.contains("grid edge")).collect();
    assert_eq!(edge.len(), 1, "{:?}", r.exclusions);
    assert!(edge[0].contains("largest") && edge[0].contains("1.000e21"), "{}", edge[0]);
    let profiles = r.extra["profiles"].as_array().unwrap();
    assert_eq!(profiles.len(), 7);
    assert_eq!(profiles.iter().filter(|p| p["N_opt"].is_null()).count(), 1);
    // Prediction at 1e21 (extrapolated from the kept budgets) matches the true allocation.
    let n21 = r.extra["allocation"][0]["N_opt"].as_f64().unwrap();
    assert!((n21 / truth.allocation(1e21).n_opt - 1.0).abs() < 0.1, "{n21}");
}

#[test]
fn isoflop_without_bracketed_optima_is_a_clear_error() {
    let truth = Chinchilla { e: 1.8, a: 480.0, b: 2100.0, alpha: 0.34, beta: 0.34 };
    let mut rows = Vec::new();
    for &c in &[1e19, 1e20] {
        let n_star = truth.allocation(c).n_opt;
        for k in 1..5 {
            let n = n_star * 2f64.powi(k); // all above the optimum: lowest loss at the smallest N
            rows.push(format!("{n:e},{c:e},{}", truth.loss(n, c / (6.0 * n))));
        }
    }
    let e = fit_table(&table("N,C,loss", &rows), &[], "isoflop", &FitOptions::default()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, FitError::Degenerate { .. }) && msg.contains("0 of 2 budgets") && msg.contains("grid edge"), "{msg}");
}

// ---------------------------------------------------------------- DeepSeek

fn deepseek_rows(truth: &DeepSeek, sigma: f64, seed: u64) -> Vec<String> {
    let mut rng = Rng::new(seed);
    let mut rows = Vec::new();
    for &c in &[1e17, 3e17, 1e18, 3e18, 1e19, 3e19] {
        let (eta, bs) = (truth.lr(c), truth.batch_tokens(c));
        for i in -4..=4 {
            for j in -3..=3 {
                let lr = eta * 2f64.powf(i as f64 / 2.0);
                let b = bs * 2f64.powf(j as f64 / 2.0);
                let base = 2.0 + 30.0 * c.powf(-0.08);
                let loss = base * (1.0 + 0.004 * (lr / eta).ln().powi(2) + 0.002 * (b / bs).ln().powi(2)) * (sigma * rng.normal()).exp();
                rows.push(format!("{c:e},{lr:e},{b:e},{loss},c{c:e}i{i}j{j}"));
            }
        }
    }
    rows
}

#[test]
fn deepseek_recovers_lr_and_batch_laws() {
    let truth = DeepSeek::published();
    let t = table("C,lr,batch_tokens,loss,run", &deepseek_rows(&truth, 0.0002, 9));
    let o = FitOptions { bootstrap: boot(300), budgets: vec![1e21], ..Default::default() };
    let (_, r) = fit_table(&t, &[], "deepseek", &o).unwrap();
    assert!(r.converged);
    assert_in_ci(&r, "eta_exp", truth.eta_exp);
    assert_in_ci(&r, "B_exp", truth.b_exp);
    assert_in_ci(&r, "eta_c", truth.eta_c);
    assert_in_ci(&r, "B_c", truth.b_c);
    assert!((r.params["eta_exp"] - truth.eta_exp).abs() < 0.02 && (r.params["B_exp"] - truth.b_exp).abs() < 0.02, "{:?}", r.params);
    let cells = r.extra["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 6);
    for c in cells {
        // The interpolated optimum sits close to the true one (grid spacing is a factor 1.41).
        let cc = c["C"].as_f64().unwrap();
        let il = c["interp_lr"].as_f64().unwrap();
        assert!((il / truth.lr(cc)).ln().abs() < 0.1, "{c}");
    }
    let pred = r.extra["predictions"][0]["lr"].as_f64().unwrap();
    assert!((pred / truth.lr(1e21) - 1.0).abs() < 0.15, "{pred}");
}

#[test]
fn deepseek_single_budget_is_too_few() {
    let rows: Vec<String> = deepseek_rows(&DeepSeek::published(), 0.0, 1).into_iter().take(63).collect();
    let e = fit_table(&table("C,lr,batch_tokens,loss,run", &rows), &[], "deepseek", &FitOptions::default()).unwrap_err();
    assert!(matches!(e, FitError::TooFewPoints { .. }) && e.to_string().contains("1 compute budget"), "{e}");
}

// ---------------------------------------------------------------- MoE sparsity (Abnar et al.)

#[test]
fn moe_sparsity_law_recovered_within_cis() {
    let truth = MoeLaw::published();
    let mut rng = Rng::new(21);
    let mut rows = Vec::new();
    for &n in &[5e7, 1e8, 2e8, 5e8, 1e9, 2e9, 5e9] {
        for &d in &[2e9, 1e10, 5e10, 2e11] {
            for &s in &[0.0, 0.25, 0.5, 0.75, 0.9, 0.95] {
                let loss = truth.loss(n, d, s) * (0.002 * rng.normal()).exp();
                rows.push(format!("{n:e},{d:e},{s},{loss}"));
            }
        }
    }
    let t = table("N,D,S,loss", &rows);
    // A small grid around plausible magnitudes (the default grid has 576 starts).
    let grid: Vec<Vec<f64>> = [0.0, 8.0]
        .iter()
        .flat_map(|&la| [0.3, 0.6].into_iter().map(move |al| vec![la, 8.0, -1.0, 2.0, 0.0, al, 0.4, -0.2, 0.2, 0.2]))
        .collect();
    let o = FitOptions { grid: StartGrid::Custom(grid), bootstrap: boot(100), budgets: vec![1e21], ..Default::default() };
    let (_, r) = fit_table(&t, &[], "moe_sparsity", &o).unwrap();
    assert!(r.converged, "{}", r.extra["optimizer"]);
    assert_eq!(r.n_points, 168);
    for (k, v) in [("alpha", truth.alpha), ("beta", truth.beta), ("lambda", truth.lambda), ("delta", truth.delta), ("gamma", truth.gamma), ("e", truth.e)] {
        assert_in_ci(&r, k, v);
    }
    assert!((r.params["beta"] - truth.beta).abs() < 0.05, "{:?}", r.params);
    let opt = &r.extra["optimum"][0];
    let s = opt["S_opt"].as_f64().unwrap();
    assert!((0.0..=0.95).contains(&s), "{opt}");
    let (n, na, d) = (opt["N_opt"].as_f64().unwrap(), opt["N_active_opt"].as_f64().unwrap(), opt["D_opt"].as_f64().unwrap());
    assert!((6.0 * na * d / 1e21 - 1.0).abs() < 1e-9 && (na / ((1.0 - s) * n) - 1.0).abs() < 1e-12, "{opt}");
    // The reported optimum is no worse than the law at a dense model of the same compute.
    let dense = truth.optimum(1e21, (0.0, 0.0), (5e7f64.ln() - 4.6, 5e9f64.ln() + 6.9));
    let fitted = MoeLaw::from_log(&moe_sparsity::PARAM_NAMES.iter().enumerate().map(|(i, k)| if i < 5 { r.params[*k].ln() } else { r.params[*k] }).collect::<Vec<_>>());
    assert!(fitted.loss(n, d, s) <= fitted.loss(dense.n, dense.d, 0.0) + 1e-12);
}

#[test]
fn moe_sparsity_needs_three_sparsities() {
    let truth = MoeLaw::published();
    let rows: Vec<String> = [1e8, 1e9, 1e10]
        .iter()
        .flat_map(|&n| [1e9, 1e10, 1e11].into_iter().flat_map(move |d| [0.0, 0.5].into_iter().map(move |s| format!("{n:e},{d:e},{s},{}", truth.loss(n, d, s)))))
        .collect();
    let e = fit_table(&table("N,D,S,loss", &rows), &[], "moe_sparsity", &FitOptions::default()).unwrap_err();
    assert!(e.to_string().contains("2 distinct sparsities"), "{e}");
}

// ---------------------------------------------------------------- annealing (Tissue et al.)

/// Per-step schedules (warmup 50 steps to `peak`).
fn schedule(kind: &str, total: usize, peak: f64) -> Vec<f64> {
    (0..=total)
        .map(|s| {
            let w = 50;
            if s < w {
                return peak * (s as f64 + 1.0) / w as f64;
            }
            let t = (s - w) as f64 / (total - w) as f64;
            match kind {
                "cosine" => peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())),
                "constant" => peak,
                "wsd" => {
                    let start = 0.8;
                    if t < start {
                        peak
                    } else {
                        peak * (1.0 - 0.9 * (t - start) / (1.0 - start))
                    }
                }
                _ => unreachable!(),
            }
        })
        .collect()
}

fn curve_rows(run: &str, lr: &[f64], truth: &Annealing, sigma: f64, rng: &mut Rng) -> Vec<String> {
    // Logged every 20 steps (from step 0); the schedule the law sees is the logged one, linearly
    // interpolated, so the data are generated from exactly that schedule.
    let logged: Vec<f64> = (0..lr.len()).filter(|s| s % 20 == 0).map(|s| s as f64).collect();
    let lr_logged: Vec<f64> = logged.iter().map(|s| lr[*s as usize]).collect();
    let clean = annealing::predict(truth, &logged, &lr_logged, &logged, 0.999);
    logged.iter().zip(clean).map(|(s, l)| format!("{run},{s},{:e},{}", lr[*s as usize], l * (sigma * rng.normal()).exp())).collect()
}

#[test]
fn annealing_law_recovered_and_predicts_held_out_wsd_curve() {
    let truth = Annealing { l0: 2.0, a: 0.6, alpha: 0.5, c: 0.08 };
    let mut rng = Rng::new(17);
    let mut rows = Vec::new();
    // Eight cosine curves (lengths and peaks vary) carry the annealing term; four constant ones.
    for k in 0..8 {
        let total = 1000 + 200 * k;
        rows.extend(curve_rows(&format!("cos{k}"), &schedule("cosine", total, 2e-3 + 2.5e-4 * (k % 4) as f64), &truth, 0.002, &mut rng));
        if k % 2 == 0 {
            rows.extend(curve_rows(&format!("const{k}"), &schedule("constant", total, 2e-3 + 5e-4 * (k / 2) as f64), &truth, 0.002, &mut rng));
        }
    }
    let wsd = schedule("wsd", 2000, 3e-3);
    rows.extend(curve_rows("wsd", &wsd, &truth, 0.0, &mut rng));
    let t = table("run,step,lr,loss", &rows);
    let o = FitOptions { holdout: vec!["wsd".into()], bootstrap: boot(100), ..Default::default() };
    let (_, r) = fit_table(&t, &[], "annealing", &o).unwrap();
    assert!(r.converged, "{}", r.extra["optimizer"]);
    for (k, v) in [("L0", truth.l0), ("A", truth.a), ("alpha", truth.alpha), ("C", truth.c)] {
        assert_in_ci(&r, k, v);
    }
    assert!(!r.extra["fitted_runs"].as_array().unwrap().iter().any(|v| v == "wsd"));
    // The held-out WSD curve (never fitted) is predicted from its schedule alone.
    let ho = &r.extra["holdout"][0];
    assert_eq!(ho["run"], "wsd");
    assert!(ho["max_abs_rel_error"].as_f64().unwrap() < 0.005, "{ho}");
    // ... including the drop during the decay, which a law without S2 cannot produce.
    let law = Annealing { l0: r.params["L0"], a: r.params["A"], alpha: r.params["alpha"], c: r.params["C"] };
    let steps: Vec<f64> = (0..wsd.len()).map(|s| s as f64).collect();
    let p = annealing::predict(&law, &steps, &wsd, &[1600.0, 2000.0], 0.999);
    let q = annealing::predict(&truth, &steps, &wsd, &[1600.0, 2000.0], 0.999);
    assert!(q[0] - q[1] > 0.02, "the decay must matter: {q:?}");
    assert!(((p[0] - p[1]) / (q[0] - q[1]) - 1.0).abs() < 0.1, "predicted decay gain {} vs true {}", p[0] - p[1], q[0] - q[1]);
}

#[test]
fn annealing_areas_follow_the_paper_definitions() {
    // Constant schedule after warmup: S1 = peak·s (warmup counts as peak), S2 = 0.
    let lr = [0.5, 1.0, 1.0, 1.0, 1.0];
    let steps = [0.0, 1.0, 2.0, 3.0, 4.0];
    let (s1, s2) = annealing::areas(&steps, &lr, &[1.0, 4.0], 0.9);
    assert_eq!(s1, vec![1.0, 4.0]);
    assert_eq!(s2, vec![0.0, 0.0]);
    // A drop of 0.5 at step 3: m3 = 0.5, m4 = 0.9·0.5 ⇒ S2(4) = 0.95; S1(4) = 1+1+0.5+0.5.
    let lr = [1.0, 1.0, 1.0, 0.5, 0.5];
    let (s1, s2) = annealing::areas(&steps, &lr, &[4.0], 0.9);
    assert!((s1[0] - 3.0).abs() < 1e-12 && (s2[0] - 0.95).abs() < 1e-12, "{s1:?} {s2:?}");
    // Sparse logging is interpolated: logging every 2 steps of a linear decay gives the same areas.
    let dense: Vec<f64> = (0..=10).map(|s| 1.0 - 0.05 * s as f64).collect();
    let all: Vec<f64> = (0..=10).map(|s| s as f64).collect();
    let (a1, a2) = annealing::areas(&all, &dense, &[10.0], 0.999);
    let sparse_s: Vec<f64> = all.iter().copied().step_by(2).collect();
    let sparse_l: Vec<f64> = dense.iter().copied().step_by(2).collect();
    let (b1, b2) = annealing::areas(&sparse_s, &sparse_l, &[10.0], 0.999);
    assert!((a1[0] - b1[0]).abs() < 1e-12 && (a2[0] - b2[0]).abs() < 1e-12);
}

#[test]
fn annealing_degenerate_inputs() {
    let e = fit_table(&table("run,step,lr,loss", &["a,10,1e-3,3.0".into(), "a,20,1e-3,2.9".into()]), &[], "annealing", &FitOptions::default()).unwrap_err();
    assert!(matches!(e, FitError::TooFewPoints { .. }), "{e}");
    let rows: Vec<String> = (1..20).map(|s| format!("a,{},1e-3,{}", s * 10, 3.0 - 0.01 * s as f64)).collect();
    let o = FitOptions { holdout: vec!["nope".into()], ..Default::default() };
    let e = fit_table(&table("run,step,lr,loss", &rows), &[], "annealing", &o).unwrap_err();
    assert!(e.to_string().contains("holdout run `nope`") && e.to_string().contains("a"), "{e}");
    // NaN losses are excluded and recorded, not a panic.
    let mut rows = rows;
    rows[3] = "a,40,1e-3,nan".into();
    let (_, r) = fit_table(&table("run,step,lr,loss", &rows), &[], "annealing", &FitOptions::default()).unwrap();
    assert!(r.exclusions.iter().any(|e| e.contains("synthetic.csv:5") && e.contains("NaN")), "{:?}", r.exclusions);
}
