//! The MAD suite through the training loop: masking per split, macro accuracy in summary.json,
//! located configuration errors.

use crate::util::{mixscale, opts, spec_from, tempdir, write, TINY};
use candle_core::{DType, Device};
use mixscale::data::DataSource;
use mixscale::model::LanguageModel;
use mixscale::train::{evaluate, train, Outcome};

/// TINY on MAD selective copying (vocab 16, 4 tokens to copy in 16).
fn mad_text(task: &str, extra: &str) -> String {
    TINY.replace(
        "data:\n  kind: synthetic_language\n  vocab_size: 64\n",
        &format!("data:\n  kind: mad\n  task: {task}\n  vocab_size: 16\n  seq_len: 16\n{extra}"),
    )
}

/// Recall trains on every position but is tested on probed values only; the macro accuracy
/// is the mean of per-class accuracies, which the test recomputes from the predictions.
#[test]
fn recall_masks_per_split_and_macro_accuracy_is_per_class() {
    let text = mad_text("in_context_recall", "  num_test_examples: 8\n").replace("seq_len: 16\n  batch", "seq_len: 15\n  batch");
    let spec = spec_from(&text, &[]).unwrap();
    let dev = Device::Cpu;
    let data = DataSource::new(&spec.data, 3, 15).unwrap();
    let tr = data.train_batch(0, 4, &dev).unwrap();
    let m: Vec<u8> = tr.mask.unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(m.iter().all(|&x| x == 1), "training scores every position");
    let va = data.val_batch(0, 8, &dev).unwrap();
    let vm: Vec<u8> = va.mask.as_ref().unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let scored = vm.iter().filter(|&&x| x == 1).count();
    assert!(scored >= 8 && scored < vm.len() / 2, "test scores probes only: {scored}");
    let model = LanguageModel::new(&spec.model, 15, 0, DType::F32, &dev).unwrap();
    let e = evaluate(&model, &data, 8, 4, &dev).unwrap();
    // Recompute both accuracies from argmax predictions.
    let logits = model.forward(&va.inputs).unwrap(); // [B, T, V]
    let pred: Vec<u32> = logits.argmax(candle_core::D::Minus1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let tg: Vec<u32> = va.targets.flatten_all().unwrap().to_vec1().unwrap();
    let mut per: std::collections::BTreeMap<u32, (f64, f64)> = Default::default();
    let (mut n, mut c) = (0.0, 0.0);
    for i in (0..tg.len()).filter(|&i| vm[i] == 1) {
        let ok = (pred[i] == tg[i]) as u8 as f64;
        let s = per.entry(tg[i]).or_default();
        s.0 += 1.0;
        s.1 += ok;
        n += 1.0;
        c += ok;
    }
    let macro_acc = per.values().map(|(a, b)| b / a).sum::<f64>() / per.len() as f64;
    assert!((e.accuracy - c / n).abs() < 1e-12, "{} vs {}", e.accuracy, c / n);
    assert!((e.accuracy_macro.unwrap() - macro_acc).abs() < 1e-12);
}

/// A MAD run records val_accuracy and val_accuracy_macro; selective copying scores exactly
/// `num_tokens_to_copy` positions per sequence.
#[test]
fn selective_copying_trains_and_records_accuracy() {
    let text = mad_text("selective_copying", "  num_tokens_to_copy: 4\n");
    let spec = spec_from(&text, &[]).unwrap();
    let data = DataSource::new(&spec.data, 3, 16).unwrap();
    let b = data.train_batch(0, 3, &Device::Cpu).unwrap();
    let m: Vec<u8> = b.mask.unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(m.iter().filter(|&&x| x == 1).count(), 3 * 4);
    let dir = tempdir();
    let Outcome::Finished(s) = train(&spec, &opts(dir.path())).unwrap() else { panic!("not finished") };
    assert!(s.val_accuracy.is_some() && s.val_accuracy_macro.is_some());
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("summary.json")).unwrap()).unwrap();
    assert!(json["val_accuracy_macro"].as_f64().is_some());
    let metrics = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    assert!(metrics.starts_with("step,tokens,lr,train_loss,val_loss,grad_norm,tokens_per_s,val_accuracy\n"));
}

/// Errors name the key: the wrong train.seq_len (with the one needed), a bad task name,
/// compression (needs an encoder-decoder), an unknown option, a test set smaller than eval.
#[test]
fn mad_config_errors_are_located() {
    let dir = tempdir();
    let cfg = write(dir.path(), "mad.yaml", &mad_text("in_context_recall", ""));
    let p = cfg.to_str().unwrap();
    let (code, _, err) = mixscale(&["check", p]);
    assert_eq!(code, 2);
    assert!(err.contains("train.seq_len: MAD InContextRecall with data.seq_len 16 yields 15 tokens per example; set train.seq_len: 15"), "{err}");
    let (code, _, err) = mixscale(&["check", p, "--set", "data.task=recal"]);
    assert_eq!(code, 2);
    assert!(err.contains("data") && err.contains("in_context_recall"), "{err}");
    let (code, _, err) = mixscale(&["check", p, "--set", "data.task=compression"]);
    assert_eq!(code, 2);
    assert!(err.contains("data.task: MAD's compression task needs its encoder-decoder backbone"), "{err}");
    let (code, _, err) = mixscale(&["check", p, "--set", "data.num_tokens_to_cpy=3"]);
    assert_eq!(code, 2);
    assert!(err.contains("num_tokens_to_cpy"), "{err}");
    let (code, _, err) = mixscale(&["check", p, "--set", "train.seq_len=15", "--set", "data.num_test_examples=2"]);
    assert_eq!(code, 2);
    assert!(err.contains("train.eval_sequences: the MAD test set has 2 examples"), "{err}");
    let (code, _, err) = mixscale(&["check", p, "--set", "train.seq_len=15"]);
    assert_eq!(code, 0, "{err}");
}
