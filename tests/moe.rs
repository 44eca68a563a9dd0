use crate::util::{opts, spec_from, tempdir, TINY};
use candle_core::{DType, Device, Tensor, Var};
use mixscale::config::moe::{BalanceSpec, BalanceStats, MoeSpec, RouterScore};
use mixscale::model::count::Accounting;
use mixscale::model::moe::Moe;
use mixscale::model::objective::load_stats;
use mixscale::model::params::{ParamBuilder, ParamKind, ParamStore};
use mixscale::model::LanguageModel;
use mixscale::testing::{assert_close, check_grads, rand_tensor, to_vec};
use mixscale::train::{compute_grads, train, Outcome};

fn spec(e: usize, k: usize) -> MoeSpec {
    MoeSpec {
        num_experts: e,
        top_k: k,
        num_shared_experts: 0,
        expert_hidden_size: None,
        first_dense_layers: 0,
        score: RouterScore::Softmax,
        normalize_top_k: None,
        route_scale: 1.0,
        balance: BalanceSpec { aux_loss_coef: 0.0, stats: BalanceStats::MicroBatch, bias_update_rate: 0.0 },
        z_loss_coef: 0.0,
        capacity_factor: None,
    }
}

fn build(s: &MoeSpec, d: usize, h: usize, std: f64, seed: u64) -> (Moe, ParamStore) {
    let mut store = ParamStore::default();
    let moe = {
        let mut pb = ParamBuilder::new(&mut store, seed, DType::F64, &Device::Cpu);
        Moe::new(s, d, h, std, std, &mut pb).unwrap()
    };
    (moe, store)
}

fn trainable(store: &ParamStore) -> Vec<(String, Var)> {
    store.params.iter().filter(|(_, p)| p.kind != ParamKind::Buffer).map(|(k, p)| (k.clone(), p.var.clone())).collect()
}

fn tokens(b: usize, t: usize, v: u32, seed: u64) -> Tensor {
    let mut r = mixscale::data::rng::Rng::new(seed);
    let data: Vec<u32> = (0..b * t).map(|_| r.below(v as u64) as u32).collect();
    Tensor::from_vec(data, (b, t), &Device::Cpu).unwrap()
}

fn model(sets: &[&str], dtype: DType) -> LanguageModel {
    let spec = spec_from(TINY, sets).unwrap();
    LanguageModel::new(&spec.model, 16, 5, dtype, &Device::Cpu).unwrap()
}

/// Copies every dense FFN weight `layers.<i>.ffn.<w>` into each expert `layers.<i>.ffn.experts.<j>.<w>`.
fn copy_dense_into_experts(dense: &LanguageModel, moe: &LanguageModel) {
    let mut copied = 0;
    for (name, p) in &moe.params.params {
        let src = match name.split_once(".ffn.experts.") {
            Some((layer, rest)) => format!("{layer}.ffn.{}", rest.split_once('.').unwrap().1),
            None if name.contains(".ffn.router") => continue,
            None => name.clone(),
        };
        p.var.set(dense.params.params[&src].var.as_tensor()).unwrap();
        copied += 1;
    }
    assert!(copied > 0);
}

/// With E = K every expert is selected for every token; with equal expert weights and gates that
/// sum to 1 (softmax over all experts, or normalized sigmoid), the MoE is exactly the dense FFN
/// whatever the router — so the whole model's loss agrees.
#[test]
fn moe_with_all_experts_selected_equals_dense_ffn() {
    let dense = model(&["model.init.std=0.3"], DType::F64);
    let (inp, tgt) = (tokens(2, 9, 64, 1), tokens(2, 9, 64, 2));
    let want = dense.loss(&inp, &tgt).unwrap().to_scalar::<f64>().unwrap();
    for extra in [
        "model.moe={num_experts: 3, top_k: 3, expert_hidden_size: 32, balance: {aux_loss_coef: 0}}",
        "model.moe={num_experts: 1, top_k: 1, expert_hidden_size: 32}",
        "model.moe={num_experts: 4, top_k: 4, expert_hidden_size: 32, score: sigmoid}",
    ] {
        let moe = model(&["model.init.std=0.3", extra], DType::F64);
        copy_dense_into_experts(&dense, &moe);
        let got = moe.loss(&inp, &tgt).unwrap().to_scalar::<f64>().unwrap();
        assert!((got - want).abs() < 1e-12 * want.abs(), "{extra}: {got} vs dense {want}");
        // A different router changes nothing; different experts do (the test can fail).
        let p = &moe.params.params["layers.0.ffn.router"];
        p.var.set(&rand_tensor(p.var.dims(), 2.0, 9)).unwrap();
        let again = moe.loss(&inp, &tgt).unwrap().to_scalar::<f64>().unwrap();
        assert!((again - want).abs() < 1e-12 * want.abs(), "{extra}: router changed the loss");
    }
    let moe = model(&["model.init.std=0.3", "model.moe={num_experts: 3, top_k: 3, expert_hidden_size: 32}"], DType::F64);
    copy_dense_into_experts(&dense, &moe);
    let p = &moe.params.params["layers.1.ffn.experts.2.w_up"];
    p.var.set(&rand_tensor(p.var.dims(), 0.3, 10)).unwrap();
    let changed = moe.loss(&inp, &tgt).unwrap().to_scalar::<f64>().unwrap();
    assert!((changed - want).abs() > 1e-6, "a changed expert must change the loss");
}

/// Finite differences of the layer (router included) for the routing variants: softmax with
/// capacity drops and z-loss, sigmoid with normalization, route scale, shared experts and each
/// form of the auxiliary loss.
#[test]
fn moe_layer_grads_match_finite_differences() {
    let mut variants = Vec::new();
    let mut a = spec(5, 2);
    a.capacity_factor = Some(0.8);
    a.z_loss_coef = 0.1;
    a.balance.aux_loss_coef = 0.5;
    variants.push(a);
    let mut b = spec(4, 2);
    b.score = RouterScore::Sigmoid;
    b.route_scale = 2.5;
    b.num_shared_experts = 1;
    b.balance = BalanceSpec { aux_loss_coef: 0.3, stats: BalanceStats::Sequence, bias_update_rate: 0.01 };
    variants.push(b);
    let mut c = spec(3, 1);
    c.balance = BalanceSpec { aux_loss_coef: 0.3, stats: BalanceStats::GlobalBatch, bias_update_rate: 0.0 };
    c.normalize_top_k = Some(true);
    variants.push(c);
    for (i, s) in variants.iter().enumerate() {
        let (moe, store) = build(s, 6, 5, 0.5, 7 + i as u64);
        let x = Var::from_tensor(&rand_tensor(&[2, 5, 6], 1.0, 11)).unwrap();
        let w = rand_tensor(&[2, 5, 6], 1.0, 12);
        let mut vars = trainable(&store);
        vars.push(("x".into(), x.clone()));
        let loss = || {
            moe.begin_step();
            let o = moe.forward(x.as_tensor()).unwrap();
            let y = (o.y * &w).unwrap().sum_all().unwrap();
            match o.loss {
                Some(l) => (y + l).unwrap(),
                None => y,
            }
        };
        let o = moe.forward(x.as_tensor()).unwrap();
        assert!(o.loss.is_some());
        if s.capacity_factor.is_some() {
            assert!(o.stats.dropped > 0, "variant {i}: the capacity limit should drop slots");
        }
        check_grads(&format!("moe variant {i}"), &vars, &loss, 25);
    }
}

/// The gather/compute/combine dispatch equals the dense reference (every expert on every
/// token, dense gate matrix): values and the gradients of every parameter and the input.
#[test]
fn dispatch_matches_dense_reference_forward_and_backward() {
    let mut s = spec(6, 2);
    s.capacity_factor = Some(1.0);
    s.num_shared_experts = 1;
    let (moe, store) = build(&s, 8, 6, 0.4, 3);
    let x = Var::from_tensor(&rand_tensor(&[3, 7, 8], 1.0, 4)).unwrap();
    let w = rand_tensor(&[3, 7, 8], 1.0, 5);
    let fast = moe.forward(x.as_tensor()).unwrap();
    assert!(fast.stats.dropped > 0 && fast.stats.dropped < fast.stats.slots);
    let dense = moe.forward_dense_reference(x.as_tensor()).unwrap();
    assert_close("moe forward", &dense, &fast.y, 1e-13);
    let gf = (fast.y * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gd = (dense * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let mut vars = trainable(&store);
    vars.push(("x".into(), x.clone()));
    for (name, v) in &vars {
        match (gd.get(v.as_tensor()), gf.get(v.as_tensor())) {
            (Some(a), Some(b)) => assert_close(&format!("d/d {name}"), a, b, 1e-12),
            (None, None) => {}
            (a, b) => panic!("{name}: gradient present in dense {} vs dispatch {}", a.is_some(), b.is_some()),
        }
    }
}

/// The Switch/GShard auxiliary loss value.
#[test]
fn switch_aux_loss_value() {
    // Zero router: softmax is uniform (P_i = 1/E); ties go to the lowest indices, so f_i = 1/K
    // for the first K experts: α·E·Σ f_i P_i = α·E·K·(1/K)(1/E) = α.
    let mut s = spec(8, 2);
    s.balance.aux_loss_coef = 0.01;
    let (moe, store) = build(&s, 4, 3, 0.5, 1);
    store.params["router"].var.set(&Tensor::zeros((4, 8), DType::F64, &Device::Cpu).unwrap()).unwrap();
    let o = moe.forward(&rand_tensor(&[2, 5, 4], 1.0, 2)).unwrap();
    assert!((o.stats.aux_loss - 0.01).abs() < 1e-15, "{}", o.stats.aux_loss);
    assert_eq!(o.stats.selected, vec![10.0, 10.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    // Random router: against f and P computed here from the router output, for each kind of
    // statistics (micro-batch, per sequence, global batch over two micro-batches).
    let (x1, x2) = (rand_tensor(&[2, 5, 4], 1.0, 3), rand_tensor(&[2, 5, 4], 1.0, 4));
    let (b, t, e, k) = (2usize, 5usize, 8usize, 2usize);
    for stats in [BalanceStats::MicroBatch, BalanceStats::Sequence, BalanceStats::GlobalBatch] {
        let mut s = s.clone();
        s.balance.stats = stats;
        let (moe, store) = build(&s, 4, 3, 1.0, 2);
        let router = store.params["router"].var.as_tensor().clone();
        // Per sequence: (f_i, P_i) of that sequence.
        let fp = |x: &Tensor| -> Vec<(Vec<f64>, Vec<f64>)> {
            let l = to_vec(&x.reshape((b * t, 4)).unwrap().matmul(&router).unwrap());
            (0..b)
                .map(|bi| {
                    let (mut f, mut p) = (vec![0.0; e], vec![0.0; e]);
                    for tt in 0..t {
                        let row = &l[(bi * t + tt) * e..(bi * t + tt + 1) * e];
                        let z: f64 = row.iter().map(|v| v.exp()).sum();
                        row.iter().enumerate().for_each(|(i, v)| p[i] += v.exp() / z / t as f64);
                        let mut idx: Vec<usize> = (0..e).collect();
                        idx.sort_by(|&a, &c| row[c].total_cmp(&row[a]));
                        idx[..k].iter().for_each(|&i| f[i] += 1.0 / (t * k) as f64);
                    }
                    (f, p)
                })
                .collect()
        };
        let dot = |f: &[f64], p: &[f64]| f.iter().zip(p).map(|(a, c)| a * c).sum::<f64>();
        let mean2 = |a: &[f64], c: &[f64]| a.iter().zip(c).map(|(x, y)| (x + y) / 2.0).collect::<Vec<f64>>();
        let (s1, s2) = (fp(&x1), fp(&x2));
        let batch = |v: &[(Vec<f64>, Vec<f64>)]| (mean2(&v[0].0, &v[1].0), mean2(&v[0].1, &v[1].1));
        let ((f1, _), (f2, p2)) = (batch(&s1), batch(&s2));
        let want = 0.01 * 8.0
            * match stats {
                BalanceStats::MicroBatch => dot(&f2, &p2),
                BalanceStats::Sequence => (dot(&s2[0].0, &s2[0].1) + dot(&s2[1].0, &s2[1].1)) / 2.0,
                BalanceStats::GlobalBatch => dot(&mean2(&f1, &f2), &p2),
            };
        moe.begin_step();
        moe.forward(&x1).unwrap();
        let o = moe.forward(&x2).unwrap();
        assert!((o.stats.aux_loss - want).abs() < 1e-14, "{stats:?}: {} vs {want}", o.stats.aux_loss);
    }
}

/// DeepSeek-V3's auxiliary-loss-free update: an expert the router overloads gets its bias
/// lowered each step until the loads even out.
#[test]
fn bias_update_moves_load_toward_balance() {
    let mut s = spec(4, 1);
    s.score = RouterScore::Sigmoid;
    s.balance.bias_update_rate = 0.02;
    let (moe, store) = build(&s, 4, 3, 0.3, 5);
    // Skew the router toward expert 0: input feature 0 is a constant 2 and its router weight
    // toward expert 0 is raised by 1 (+2 on expert 0's logit for every token).
    let mut r = to_vec(store.params["router"].var.as_tensor());
    r[0] += 1.0;
    store.params["router"].var.set(&Tensor::from_vec(r, (4, 4), &Device::Cpu).unwrap()).unwrap();
    let mut xv = to_vec(&rand_tensor(&[4, 16, 4], 1.0, 6));
    (0..64).for_each(|t| xv[t * 4] = 2.0);
    let x = Tensor::from_vec(xv, (4, 16, 4), &Device::Cpu).unwrap();
    let cv = |sel: &[f64]| load_stats(sel).0;
    let first = moe.forward(&x).unwrap().stats.selected;
    let mut last = first.clone();
    for _ in 0..60 {
        let sel = moe.forward(&x).unwrap().stats.selected;
        moe.update_bias(&sel).unwrap();
        last = moe.forward(&x).unwrap().stats.selected;
    }
    eprintln!("loads before {first:?} after {last:?}");
    assert!(first[0] > 32.0, "the skew should overload expert 0: {first:?}");
    assert!(cv(&last) < 0.5 * cv(&first), "cv {} -> {}", cv(&first), cv(&last));
    let bias = moe.selection_bias().unwrap();
    assert!(bias[0] < 0.0 && bias.iter().skip(1).any(|&b| b > 0.0), "{bias:?}");
    // The bias never reaches the gate values: y with and without it differs only by selection.
    assert_eq!(store.params["router_bias"].kind, ParamKind::Buffer);
}

/// The auxiliary loss alone, minimized by gradient descent on the router, balances the load of
/// a router skewed toward expert 0 (its gradient points the right way).
#[test]
fn aux_loss_descent_balances_load() {
    let mut s = spec(4, 1);
    s.balance.aux_loss_coef = 1.0;
    let (moe, store) = build(&s, 4, 3, 0.3, 5);
    let router = store.params["router"].var.clone();
    let mut r = to_vec(router.as_tensor());
    r[0] += 1.0;
    router.set(&Tensor::from_vec(r, (4, 4), &Device::Cpu).unwrap()).unwrap();
    let mut xv = to_vec(&rand_tensor(&[4, 16, 4], 1.0, 6));
    (0..64).for_each(|t| xv[t * 4] = 2.0);
    let x = Tensor::from_vec(xv, (4, 16, 4), &Device::Cpu).unwrap();
    let first = moe.forward(&x).unwrap().stats;
    let mut last = first.clone();
    for _ in 0..200 {
        let o = moe.forward(&x).unwrap();
        let g = o.loss.unwrap().backward().unwrap();
        let gr = g.get(router.as_tensor()).unwrap();
        router.set(&(router.as_tensor() - (gr * 0.5).unwrap()).unwrap()).unwrap();
        last = o.stats;
    }
    eprintln!("loads {:?} -> {:?}, aux {} -> {}", first.selected, last.selected, first.aux_loss, last.aux_loss);
    assert!(first.selected[0] > 40.0, "{:?}", first.selected);
    assert!(load_stats(&last.selected).0 < 0.5 * load_stats(&first.selected).0);
    assert!(last.aux_loss < first.aux_loss);
}

/// Total vs active parameters, FLOPs from active parameters, sparsity.
#[test]
fn accounting_counts_active_parameters_and_sparsity() {
    let (d, v, l, h_exp, e, k, sh) = (16usize, 64usize, 2usize, 8usize, 8usize, 2usize, 1usize);
    let dense = model(&[], DType::F32);
    let moe = model(&["model.moe={num_experts: 8, top_k: 2, num_shared_experts: 1, expert_hidden_size: 8, first_dense_layers: 1}"], DType::F32);
    let (ad, am) = (Accounting::of(&dense, 16), Accounting::of(&moe, 16));
    let dense_ffn = 3 * d * 32;
    let moe_total = d * e + (e + sh) * 3 * d * h_exp;
    let moe_active = d * e + (k + sh) * 3 * d * h_exp;
    assert_eq!(am.params_total, ad.params_total - dense_ffn + moe_total);
    assert_eq!(am.params_active, ad.params_active - dense_ffn + moe_active);
    assert_eq!(ad.params_active, ad.params_total);
    assert!((am.sparsity - 0.75).abs() < 1e-15 && ad.sparsity == 0.0);
    let want_fwd = ad.flops_per_token_forward - 2.0 * dense_ffn as f64 + 2.0 * moe_active as f64;
    assert!((am.flops_per_token_forward - want_fwd).abs() < 1e-6, "{} vs {want_fwd}", am.flops_per_token_forward);
    assert_eq!(am.flops_per_token, 3.0 * am.flops_per_token_forward);
    assert_eq!(am.flops_per_token_6n, 6.0 * (am.params_active - am.params_embedding) as f64);
    let _ = (v, l);
    // The bias buffer is not a parameter.
    let b = model(&["model.moe={num_experts: 8, top_k: 2, num_shared_experts: 1, expert_hidden_size: 8, first_dense_layers: 1, balance: {bias_update_rate: 0.001}}"], DType::F32);
    assert_eq!(Accounting::of(&b, 16).params_total, am.params_total);
}

/// In a whole model (f32, real init) every trainable parameter gets a nonzero gradient through
/// the training objective (aux + z-loss on, two MoE layers, shared expert).
#[test]
fn every_moe_parameter_gets_gradient() {
    let spec = spec_from(
        TINY,
        &["model.moe={num_experts: 4, top_k: 2, num_shared_experts: 1, z_loss_coef: 0.001, balance: {bias_update_rate: 0.01}}"],
    )
    .unwrap();
    let m = LanguageModel::new(&spec.model, 16, 5, DType::F32, &Device::Cpu).unwrap();
    let b = mixscale::data::Batch { inputs: tokens(4, 16, 64, 1), targets: tokens(4, 16, 64, 2), true_nlp: None, mask: None };
    let (_, grads) = compute_grads(&m, 1, |_| Ok(copy(&b))).unwrap();
    for (name, p) in &m.params.params {
        if p.kind == ParamKind::Buffer {
            assert!(!grads.contains_key(name), "{name} is a buffer");
            continue;
        }
        let g = grads.get(name).unwrap_or_else(|| panic!("{name}: no gradient"));
        let n = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(n > 0.0, "{name}: zero gradient");
    }
}

/// The MoE preset trains from YAML: loss falls; metrics carry the load statistics; the summary
/// carries sparsity and active parameters; the bias buffer moves and resumes bit-exactly.
#[test]
fn moe_trains_and_records_statistics() {
    let sets = [
        "model.moe={num_experts: 4, top_k: 1, num_shared_experts: 1, score: sigmoid, z_loss_coef: 0.001, capacity_factor: 1.0, balance: {aux_loss_coef: 0.01, bias_update_rate: 0.01}}",
        "train.steps=12",
        "train.optimizer.lr=0.02",
        "train.checkpoint_every=5",
    ];
    let spec = spec_from(TINY, &sets).unwrap();
    let dir = tempdir();
    let Outcome::Finished(s) = train(&spec, &opts(dir.path())).unwrap() else { panic!("not finished") };
    assert!((s.accounting.sparsity - 0.75).abs() < 1e-15);
    assert!(s.accounting.params_active < s.accounting.params_total);
    let text = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    for c in ["moe_aux_loss", "moe_z_loss", "moe_load_cv", "moe_maxvio", "moe_load_min", "moe_drop_rate"] {
        assert!(header.contains(&c), "missing column {c}: {header:?}");
        assert!(s.last_step_metrics.contains_key(c), "summary lacks {c}");
    }
    let rows: Vec<Vec<f64>> = lines.map(|l| l.split(',').map(|x| x.parse().unwrap_or(f64::NAN)).collect()).collect();
    assert_eq!(rows.len(), 12);
    let col = |c: &str| header.iter().position(|h| *h == c).unwrap();
    let first = rows[0][col("train_loss")];
    let last = rows[11][col("train_loss")];
    assert!(last < first - 0.1, "loss {first} -> {last}");
    for r in &rows {
        assert!(r[col("moe_aux_loss")] > 0.0 && r[col("moe_z_loss")] > 0.0);
        assert!((0.0..1.0).contains(&r[col("moe_drop_rate")]));
        assert!(r[col("moe_load_min")] <= 1.0 && r[col("moe_maxvio")] >= 0.0);
    }
    // Resume: stop at 7 (checkpoint at 5), continue: identical rows.
    let split = tempdir();
    let mut o = opts(split.path());
    o.stop_at_step = Some(7);
    train(&spec, &o).unwrap();
    o.stop_at_step = None;
    o.resume = true;
    train(&spec, &o).unwrap();
    let a: Vec<String> = text.lines().map(|l| l.split(',').enumerate().filter(|(i, _)| *i != 6).map(|(_, x)| x).collect::<Vec<_>>().join(",")).collect();
    let t2 = std::fs::read_to_string(split.path().join("metrics.csv")).unwrap();
    let b: Vec<String> = t2.lines().map(|l| l.split(',').enumerate().filter(|(i, _)| *i != 6).map(|(_, x)| x).collect::<Vec<_>>().join(",")).collect();
    assert_eq!(a, b, "resume must reproduce every column but tokens_per_s");
}

/// Bad MoE options are located errors.
#[test]
fn moe_config_errors_are_located() {
    let e = spec_from(TINY, &["model.moe={num_experts: 4, top_k: 5}"]).unwrap_err().to_string();
    assert!(e.contains("model.moe.top_k") && e.contains("1..=num_experts"), "{e}");
    let e = spec_from(TINY, &["model.moe={num_experts: 4, top_k: 1, experts: 3}"]).unwrap_err().to_string();
    assert!(e.contains("model.moe") && e.contains("unknown field"), "{e}");
    let e = spec_from(TINY, &["model.moe={num_experts: 4, top_k: 1, score: relu}"]).unwrap_err().to_string();
    assert!(e.contains("model.moe.score"), "{e}");
    let e = spec_from(TINY, &["model.moe={num_experts: 4, top_k: 1, capacity_factor: 0}"]).unwrap_err().to_string();
    assert!(e.contains("model.moe.capacity_factor"), "{e}");
}

fn copy(b: &mixscale::data::Batch) -> mixscale::data::Batch {
    mixscale::data::Batch { inputs: b.inputs.clone(), targets: b.targets.clone(), true_nlp: b.true_nlp.clone(), mask: b.mask.clone() }
}
