use crate::util::{mixscale, opts, spec_from, tempdir, write, TINY};
use candle_core::{DType, Device, Tensor};
use mixscale::data::shards::write_llmc;
use mixscale::data::DataSource;
use mixscale::model::LanguageModel;
use mixscale::train::{batch_loss, evaluate, train, Outcome};
use std::path::Path;

/// TINY with an MQAR data section (vocab 64 > seq_len 16, 2 pairs).
fn mqar_text() -> String {
    TINY.replace("data:\n  kind: synthetic_language\n  vocab_size: 64\n", "data:\n  kind: mqar\n  vocab_size: 64\n  num_kv_pairs: 2\n")
}

/// TINY reading llm.c shards written into `dir`.
fn tokens_text(dir: &Path) -> String {
    let toks: Vec<u32> = (0..3000u32).map(|i| (i * 7 + i / 13) % 64).collect();
    write_llmc(&dir.join("tr_000.bin"), &toks[..1500], false).unwrap();
    write_llmc(&dir.join("tr_001.bin"), &toks[1500..2500], false).unwrap();
    write_llmc(&dir.join("va_000.bin"), &toks[2500..], false).unwrap();
    TINY.replace(
        "data:\n  kind: synthetic_language\n  vocab_size: 64\n",
        &format!("data:\n  kind: tokens\n  train: {0}/tr_*.bin\n  val: {0}/va_000.bin\n  format: llmc\n  vocab_size: 64\n", dir.display()),
    )
}

/// Only answer positions are scored: the masked loss is the mean of the per-position losses
/// over the mask, and changing an unscored target changes nothing.
#[test]
fn mqar_loss_counts_only_answer_positions() {
    let spec = spec_from(&mqar_text(), &[]).unwrap();
    let dev = Device::Cpu;
    let model = LanguageModel::new(&spec.model, 16, 0, DType::F32, &dev).unwrap();
    let data = DataSource::new(&spec.data, 3, 16).unwrap();
    assert!(data.is_masked());
    let b = data.train_batch(0, 4, &dev).unwrap();
    let mask: Vec<u8> = b.mask.as_ref().unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(mask.iter().filter(|&&m| m == 1).count(), 4 * 2, "num_kv_pairs scored per sequence");
    let each: Vec<f32> = model.loss_each(&b.inputs, &b.targets).unwrap().to_vec1().unwrap();
    let want = each.iter().zip(&mask).filter(|(_, &m)| m == 1).map(|(l, _)| *l as f64).sum::<f64>() / 8.0;
    let got = batch_loss(&model, &b).unwrap().to_scalar::<f32>().unwrap() as f64;
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    let mut t: Vec<u32> = b.targets.flatten_all().unwrap().to_vec1().unwrap();
    for (x, &m) in t.iter_mut().zip(&mask) {
        if m == 0 {
            *x = (*x + 17) % 64;
        }
    }
    let b2 = mixscale::data::Batch { targets: Tensor::from_vec(t, (4, 16), &dev).unwrap(), ..b };
    assert_eq!(batch_loss(&model, &b2).unwrap().to_scalar::<f32>().unwrap() as f64, got);
    // Evaluation scores the same positions: accuracy is a multiple of 1/(pairs · sequences).
    let e = evaluate(&model, &data, 4, 2, &dev).unwrap();
    assert!((e.accuracy * 8.0 - (e.accuracy * 8.0).round()).abs() < 1e-9 && (0.0..=1.0).contains(&e.accuracy));
    assert!(e.floor.is_none());
}

/// MQAR runs are deterministic, and record accuracy in metrics.csv (extra last column) and
/// summary.json.
#[test]
fn mqar_training_records_accuracy() {
    let spec = spec_from(&mqar_text(), &[]).unwrap();
    let (a, b) = (tempdir(), tempdir());
    let Outcome::Finished(s) = train(&spec, &opts(a.path())).unwrap() else { panic!("not finished") };
    train(&spec, &opts(b.path())).unwrap();
    let ma = std::fs::read_to_string(a.path().join("metrics.csv")).unwrap();
    let mb = std::fs::read_to_string(b.path().join("metrics.csv")).unwrap();
    let strip = |m: &str| m.lines().map(|l| l.split(',').enumerate().filter(|(i, _)| *i != 6).map(|(_, c)| c).collect::<Vec<_>>().join(",")).collect::<Vec<_>>();
    assert_eq!(strip(&ma), strip(&mb), "deterministic (tokens_per_s aside)");
    assert!(ma.starts_with("step,tokens,lr,train_loss,val_loss,grad_norm,tokens_per_s,val_accuracy\n"), "{ma}");
    let last = ma.lines().last().unwrap();
    let acc: f64 = last.split(',').nth(7).unwrap().parse().unwrap();
    assert_eq!(Some(acc), s.val_accuracy.map(|a| (a * 1e6).round() / 1e6));
    assert!(s.entropy_floor.is_none());
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(a.path().join("summary.json")).unwrap()).unwrap();
    assert!(json["val_accuracy"].as_f64().is_some());
}

/// Token files train end to end; the metrics header is unchanged for unmasked sources.
#[test]
fn token_files_train_end_to_end() {
    let dir = tempdir();
    let spec = spec_from(&tokens_text(dir.path()), &["train.eval_sequences=8"]).unwrap();
    let out = tempdir();
    let Outcome::Finished(s) = train(&spec, &opts(out.path())).unwrap() else { panic!("not finished") };
    assert!(s.val_loss.unwrap().is_finite() && s.val_accuracy.is_some() && s.entropy_floor.is_none());
    let m = std::fs::read_to_string(out.path().join("metrics.csv")).unwrap();
    assert!(m.starts_with("step,tokens,lr,train_loss,val_loss,grad_norm,tokens_per_s\n"));
    // Windows come from the files: inputs shifted by one are the targets.
    let data = DataSource::new(&spec.data, 3, 16).unwrap();
    let b = data.train_batch(5, 2, &Device::Cpu).unwrap();
    let i: Vec<Vec<u32>> = b.inputs.to_vec2().unwrap();
    let t: Vec<Vec<u32>> = b.targets.to_vec2().unwrap();
    assert_eq!(i[0][1..], t[0][..15]);
    // Too few validation windows for eval_sequences is caught before training.
    let e = train(&spec_from(&tokens_text(dir.path()), &["train.eval_sequences=40"]).unwrap(), &opts(tempdir().path())).unwrap_err();
    assert!(e.to_string().contains("data.val: validation window 39 requested but the files hold only 31 windows"), "{e}");
}

#[test]
fn data_config_errors_are_located() {
    let dir = tempdir();
    let cfg = write(dir.path(), "arch.yaml", &mqar_text());
    let p = cfg.to_str().unwrap();
    let (code, _, err) = mixscale(&["check", p, "--set", "data.num_kv_pairs=5"]);
    assert_eq!(code, 2);
    assert!(err.contains("data.num_kv_pairs: must be in 1..=4"), "{err}");
    let (code, _, err) = mixscale(&["check", p, "--set", "data.setting=zoology_t64_kv4"]);
    assert_eq!(code, 2);
    assert!(err.contains("train.seq_len: MQAR setting `zoology_t64_kv4` needs train.seq_len 64"), "{err}");
    let (code, _, err) = mixscale(&["check", p, "--set", "data.vocab_size=65"]);
    assert_eq!(code, 2);
    assert!(err.contains("data.vocab_size: MQAR uses 65 tokens but model.vocab_size is 64"), "{err}");
    let (code, _, err) = mixscale(&["check", p, "--set", "data.kind=tokens"]);
    assert_eq!(code, 2, "{err}");
    let t = write(dir.path(), "tok.yaml", &tokens_text(dir.path()));
    let out = dir.path().join("run");
    let (code, _, err) = mixscale(&[
        "train", t.to_str().unwrap(), "--out", out.to_str().unwrap(), "--quiet", "--set", "data.train=/nonexistent/x_*.bin",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("data.train: `/nonexistent/x_*.bin`: cannot list /nonexistent"), "{err}");
}
