//! The training loop: `mixscale train`.
//!
//! Per optimizer step: the global batch (`train.batch_size` sequences) is split into
//! micro-batches whose mean losses, each scaled by 1/accumulation, are backpropagated and their
//! gradients summed (so the update equals one pass over the whole batch); then global-norm
//! clipping and AdamW. Evaluation on a fixed validation set every `eval_every` steps and at the
//! end; checkpoints every `checkpoint_every` steps and at the end. A non-finite loss or gradient,
//! or a loss above `divergence_factor` × the first step's loss, ends the run as `diverged`.

pub mod bench;
pub mod checkpoint;
pub mod optim;
pub mod record;
pub mod schedule;
pub mod shard;
pub mod tensorboard;

use crate::config::RunSpec;
use crate::data::DataSource;
use crate::error::{Error, Result};
use crate::model::count::Accounting;
use crate::model::{objective, LanguageModel};
use candle_core::{DType, Device, Tensor};
use checkpoint::TrainState;
use optim::AdamW;
use record::{MetricsRow, MetricsWriter, Status, Summary};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

/// How to run (not part of the run's identity).
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub out: PathBuf,
    /// Continue from the folder's checkpoint (a fresh start when it has none).
    pub resume: bool,
    /// Delete an existing folder first.
    pub overwrite: bool,
    /// Stop (with a checkpoint, no summary) after this many steps, as if interrupted.
    pub stop_at_step: Option<usize>,
    /// Draw a progress bar on stderr (only on a terminal).
    pub progress: bool,
    pub device: Device,
    /// Dtype of the master weights (the `Var`s); the compute dtype follows `train.precision`.
    pub dtype: DType,
    /// The architecture file, recorded in the summary.
    pub config_file: String,
}

/// How a call to [`train`] ended.
#[derive(Debug)]
pub enum Outcome {
    /// Completed or diverged; `summary.json` was written.
    Finished(Summary),
    /// Stopped at `--stop-at-step` with a checkpoint; resumable.
    Stopped { step: usize },
}

/// Result of [`evaluate`].
#[derive(Clone, Copy, Debug)]
pub struct Eval {
    /// Mean cross-entropy over the scored targets (all targets without a mask).
    pub loss: f64,
    /// Mean true −ln p of the same targets, when the source knows it.
    pub floor: Option<f64>,
    /// Fraction of scored targets equal to the argmax of the logits.
    pub accuracy: f64,
    /// Mean over target classes of the per-class accuracy (MAD's macro average), when the
    /// source asks for it ([`DataSource::macro_accuracy`]).
    pub accuracy_macro: Option<f64>,
}

/// Evaluates `model` on validation sequences `0..n` (micro-batches of `mb`). With a mask
/// (MQAR) only the scored positions count, as Zoology's `ignore_index = -100`; its accuracy
/// pools all scored positions (Zoology averages per example first, the same number when every
/// example has `num_kv_pairs` scored positions).
pub fn evaluate(model: &LanguageModel, data: &DataSource, n: usize, mb: usize, dev: &Device) -> Result<Eval> {
    let (mut sum, mut count, mut correct, mut floor) = (0.0, 0.0, 0.0, Some(0.0));
    // Per target class: (scored, correct), for the macro average.
    let mut per_class: BTreeMap<u32, (f64, f64)> = BTreeMap::new();
    let mut start = 0;
    while start < n {
        let k = mb.min(n - start);
        let b = data.val_batch(start as u64, k, dev)?;
        let (each, ok) = model.loss_and_correct_each(&b.inputs, &b.targets)?;
        let (each, ok) = (each.to_dtype(DType::F64)?, ok.to_dtype(DType::F64)?);
        match &b.mask {
            None => {
                sum += each.sum_all()?.to_scalar::<f64>()?;
                count += each.elem_count() as f64;
                correct += ok.sum_all()?.to_scalar::<f64>()?;
            }
            Some(m) => {
                let w = m.flatten_all()?.to_dtype(DType::F64)?;
                sum += (each * &w)?.sum_all()?.to_scalar::<f64>()?;
                count += w.sum_all()?.to_scalar::<f64>()?;
                correct += (&ok * &w)?.sum_all()?.to_scalar::<f64>()?;
            }
        }
        if data.macro_accuracy() {
            let tg = b.targets.flatten_all()?.to_vec1::<u32>()?;
            let okv = ok.flatten_all()?.to_vec1::<f64>()?;
            let mv = match &b.mask {
                Some(m) => m.flatten_all()?.to_vec1::<u8>()?,
                None => vec![1; tg.len()],
            };
            for ((t, o), m) in tg.iter().zip(&okv).zip(&mv) {
                if *m != 0 {
                    let e = per_class.entry(*t).or_insert((0.0, 0.0));
                    e.0 += 1.0;
                    e.1 += o;
                }
            }
        }
        floor = match (floor, &b.true_nlp) {
            (Some(f), Some(p)) => Some(f + p.iter().sum::<f64>()),
            _ => None,
        };
        start += k;
    }
    if count == 0.0 {
        return Err(Error::Other("evaluation: no scored validation positions".into()));
    }
    let accuracy_macro = (!per_class.is_empty())
        .then(|| per_class.values().map(|(n, c)| c / n).sum::<f64>() / per_class.len() as f64);
    Ok(Eval { loss: sum / count, floor: floor.map(|f| f / count), accuracy: correct / count, accuracy_macro })
}

/// Training loss of one batch: the model's mean cross-entropy, or with a mask the mean over
/// the scored positions only.
pub fn batch_loss(model: &LanguageModel, b: &crate::data::Batch) -> Result<Tensor> {
    match &b.mask {
        None => Ok(model.loss(&b.inputs, &b.targets)?),
        Some(m) => {
            let each = model.loss_each(&b.inputs, &b.targets)?;
            let w = m.flatten_all()?.to_dtype(each.dtype())?;
            let n = m.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
            if n == 0.0 {
                return Err(Error::Other("training batch has no scored positions".into()));
            }
            Ok(((each * w)?.sum_all()? / n)?)
        }
    }
}

/// Trains `spec` (blocks already resolved) into `opts.out`.
pub fn train(spec: &RunSpec, opts: &TrainOptions) -> Result<Outcome> {
    let t = &spec.train;
    let out = &opts.out;
    let config_text = serde_yaml_ng::to_string(spec).expect("spec serializes");
    let config_path = out.join("config.yaml");
    let summary_path = out.join("summary.json");
    if out.exists() && opts.overwrite {
        std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
    }
    let occupied = out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(false);
    if occupied {
        if !opts.resume {
            return Err(Error::Input(format!(
                "run folder {} already exists; pass --resume to continue it or --overwrite to start over",
                out.display()
            )));
        }
        match std::fs::read_to_string(&config_path) {
            Ok(old) if old != config_text => {
                return Err(Error::Input(format!(
                    "{}: the config differs from this run's; resume with the same config or use another --out",
                    config_path.display()
                )))
            }
            _ => {}
        }
        if let Ok(s) = std::fs::read_to_string(&summary_path) {
            let summary: Summary = serde_json::from_str(&s).map_err(|e| Error::Input(format!("{}: {e}", summary_path.display())))?;
            return Ok(Outcome::Finished(summary));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    checkpoint::write_atomic(&config_path, config_text.as_bytes())?;

    let dev = &opts.device;
    // `opts.dtype` is the master-weight dtype; `train.precision: bf16` computes in bf16.
    let model = LanguageModel::new_mixed(&spec.model, t.seq_len, t.seed, opts.dtype, t.precision.compute_dtype(opts.dtype), dev)?;
    let acc = Accounting::of(&model, t.seq_len);
    let data = DataSource::new(&spec.data, t.seed, t.seq_len)?;
    data.check_val(t.eval_sequences)?;
    let mut opt = AdamW::new(&t.optimizer, &model.params)?;
    let mut state = TrainState { step: 0, tokens: 0, data_position: 0, adam_t: 0, first_loss: None, seed: t.seed };
    let resumed = opts.resume && checkpoint::exists(out);
    if resumed {
        let ck = checkpoint::load(out, dev)?;
        for (name, p) in &model.params.params {
            let w = ck.weights.get(name).ok_or_else(|| Error::Input(format!("checkpoint lacks weight `{name}`")))?;
            p.var.set(&w.to_dtype(opts.dtype)?)?;
        }
        opt.load_state(ck.state.adam_t, &ck.optim)?;
        state = ck.state;
    }
    let mut metrics = MetricsWriter::open_full(out, resumed.then_some(state.step), data.is_masked(), data.val_bytes_per_token(), &objective::StepStats::columns(&model))?;

    let total = t.total_steps();
    let end = opts.stop_at_step.unwrap_or(total).min(total);
    let mb = t.micro_batch();
    let accum = t.accumulation();
    let started = Instant::now();
    let floor = data.val_floor(t.eval_sequences);
    eprintln!(
        "mixscale: {} params ({} non-embedding), {:.3e} FLOPs/token, {} steps × {} tokens{}",
        acc.params_total,
        acc.params_non_embedding,
        acc.flops_per_token,
        total,
        t.tokens_per_step(),
        floor.map(|f| format!(", entropy floor {f:.4} nats/token")).unwrap_or_default()
    );
    let bar = progress_bar(opts.progress, total, state.step);

    let mut last: (Option<f64>, Option<Eval>) = (None, None); // (train_loss, last evaluation)
    let mut window = (0u64, 0f64); // tokens and seconds since the last metrics row
    let mut diverged: Option<String> = None;
    let extra_columns = objective::StepStats::columns(&model);
    let mut last_extra: Vec<Option<f64>> = Vec::new();
    for step in state.step..end {
        let lr = t.optimizer.lr * schedule::lr_factor(&t.schedule, step, total);
        let t0 = Instant::now();
        let pos = state.data_position;
        let (train_loss, grads, step_stats) =
            compute_grads_with_stats(&model, accum, |m| data.train_batch(pos + (m * mb) as u64, mb, dev))?;
        let extra_values = step_stats.values(&model);
        state.data_position += t.batch_size as u64;
        let first = *state.first_loss.get_or_insert(train_loss);
        let grad_norm = global_norm(&grads)?;
        if !train_loss.is_finite() {
            diverged = Some(format!("non-finite training loss at step {}", step + 1));
        } else if !grad_norm.is_finite() {
            diverged = Some(format!("non-finite gradient norm at step {}", step + 1));
        } else if train_loss > t.divergence_factor * first {
            diverged = Some(format!(
                "training loss {train_loss:.4} at step {} exceeds {} × the first loss {first:.4}",
                step + 1,
                t.divergence_factor
            ));
        }
        if diverged.is_some() {
            state.step = step + 1;
            state.tokens += t.tokens_per_step();
            metrics.write_with(&MetricsRow { step: step + 1, tokens: state.tokens, lr, train_loss, val_loss: None, grad_norm, tokens_per_s: 0.0, val_accuracy: None }, &extra_values)?;
            last.0 = Some(train_loss);
            last_extra = extra_values;
            break;
        }
        opt.step_clipped(&model.params, &grads, lr, optim::clip_coef(grad_norm, t.grad_clip))?;
        objective::after_step(&model, &step_stats)?;
        state.step = step + 1;
        state.adam_t = opt.t;
        state.tokens += t.tokens_per_step();
        let dt = t0.elapsed().as_secs_f64();
        window.0 += t.tokens_per_step();
        window.1 += dt;
        last.0 = Some(train_loss);
        last_extra = extra_values.clone();

        let is_last = state.step == total;
        let do_eval = is_last || (t.eval_every > 0 && state.step % t.eval_every == 0);
        let val = if do_eval { Some(evaluate(&model, &data, t.eval_sequences, mb, dev)?) } else { None };
        if val.is_some() {
            last.1 = val;
        }
        if do_eval || is_last || state.step % t.log_every.max(1) == 0 {
            let tps = window.0 as f64 / window.1.max(1e-9);
            metrics.write_with(&MetricsRow { step: state.step, tokens: state.tokens, lr, train_loss, val_loss: val.map(|e| e.loss), grad_norm, tokens_per_s: tps, val_accuracy: val.map(|e| e.accuracy) }, &extra_values)?;
            window = (0, 0.0);
            if let Some(v) = val {
                bar.println(format!(
                    "step {:>6}  train {:.4}  val {:.4}{}{}",
                    state.step,
                    train_loss,
                    v.loss,
                    floor.map(|f| format!("  floor {f:.4}")).unwrap_or_default(),
                    if data.is_masked() { format!("  acc {:.4}", v.accuracy) } else { String::new() }
                ));
            }
        }
        bar.set_position(state.step as u64);
        bar.set_message(format!(
            "loss {train_loss:.4}{} | {:.0} tok/s",
            last.1.map(|v| format!(" val {:.4}", v.loss)).unwrap_or_default(),
            t.tokens_per_step() as f64 / dt
        ));
        let ckpt_due = t.checkpoint_every > 0 && state.step % t.checkpoint_every == 0;
        if ckpt_due || state.step == end {
            checkpoint::save(out, &state, &model.params.tensors(), &opt.state_tensors())?;
        }
    }
    bar.finish_and_clear();
    if diverged.is_none() && state.step < total {
        return Ok(Outcome::Stopped { step: state.step });
    }
    let status = if diverged.is_some() { Status::Diverged } else { Status::Completed };
    let summary = Summary {
        status,
        reason: diverged,
        steps: state.step,
        steps_planned: total,
        tokens: state.tokens,
        train_loss: last.0,
        val_loss: last.1.map(|e| e.loss),
        val_bits_per_token: last.1.map(|e| e.loss / std::f64::consts::LN_2),
        val_bits_per_byte: last.1.zip(data.val_bytes_per_token()).map(|(e, b)| record::bits_per_byte(e.loss, b)),
        val_bytes_per_token: data.val_bytes_per_token(),
        val_accuracy: last.1.map(|e| e.accuracy),
        val_accuracy_macro: last.1.and_then(|e| e.accuracy_macro),
        entropy_floor: floor,
        entropy_floor_bits: floor.map(|f| f / std::f64::consts::LN_2),
        compute: acc.compute(state.tokens),
        accounting: acc,
        seed: t.seed,
        wall_time_s: started.elapsed().as_secs_f64(),
        git_revision: record::git_revision(),
        mixscale_version: env!("CARGO_PKG_VERSION").to_string(),
        config: opts.config_file.clone(),
        precision: t.precision,
        last_step_metrics: extra_columns.iter().cloned().zip(last_extra).filter_map(|(k, v)| v.map(|v| (k, v))).collect(),
    };
    checkpoint::write_atomic(&summary_path, serde_json::to_string_pretty(&summary).expect("summary").as_bytes())?;
    Ok(Outcome::Finished(summary))
}

/// Mean loss over `accum` micro-batches and the summed gradients of loss/accum, by parameter
/// name (parameters that received no gradient are absent). With masks this is the mean of the
/// micro-batches' masked means, which equals the whole batch's masked mean when every
/// micro-batch has the same number of scored positions (MQAR: `num_kv_pairs` per sequence).
/// The loss is the main head's; the gradients are of the whole objective (MTP, MoE losses:
/// [`crate::model::objective`]).
pub fn compute_grads(
    model: &LanguageModel,
    accum: usize,
    batch: impl Fn(usize) -> Result<crate::data::Batch>,
) -> Result<(f64, BTreeMap<String, Tensor>)> {
    let (loss, grads, _) = compute_grads_with_stats(model, accum, batch)?;
    Ok((loss, grads))
}

/// [`compute_grads`] plus the step's MTP/MoE statistics.
pub fn compute_grads_with_stats(
    model: &LanguageModel,
    accum: usize,
    batch: impl Fn(usize) -> Result<crate::data::Batch>,
) -> Result<(f64, BTreeMap<String, Tensor>, objective::StepStats)> {
    let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut stats = objective::StepStats::default();
    let mut loss_sum = 0.0;
    objective::begin_step(model);
    for m in 0..accum {
        let b = batch(m)?;
        let out = shard::micro_grads(model, &b, 1.0 / accum as f64, &mut grads)?;
        loss_sum += out.main;
        stats.add(&out);
    }
    Ok((loss_sum / accum as f64, grads, stats))
}

/// Global L2 norm of all gradients (in f64).
///
/// Gradients the fused CPU kernel does not take (GPU, bf16) are summed on their device and read
/// back once for all of them: one host synchronisation per step instead of one per parameter.
pub fn global_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let mut norm2 = 0.0;
    let mut on_device = Vec::new();
    for g in grads.values() {
        match optim::fused::sum_squares(g)? {
            Some(s) => norm2 += s,
            None => on_device.push(g.to_dtype(DType::F64)?.sqr()?.sum_all()?),
        }
    }
    if !on_device.is_empty() {
        norm2 += Tensor::stack(&on_device, 0)?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(norm2.sqrt())
}

/// Global-norm clipping as PyTorch's `clip_grad_norm_`: scale by max/(norm + 1e-6) when < 1.
/// (The training loop folds this into [`AdamW::step_clipped`].)
pub fn clip_grads(grads: &mut BTreeMap<String, Tensor>, norm: f64, max: f64) -> Result<()> {
    if let Some(coef) = optim::clip_coef(norm, max) {
        for g in grads.values_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(())
}

fn progress_bar(enabled: bool, total: usize, pos: usize) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps | {msg} | ETA {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_position(pos as u64);
    bar
}
