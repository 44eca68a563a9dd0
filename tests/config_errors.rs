use crate::util::{mixscale, spec_from, tempdir, write, TINY};

/// Runs `mixscale check` on `text`; returns (code, stderr).
fn check(text: &str, sets: &[&str]) -> (i32, String) {
    let dir = tempdir();
    let p = write(dir.path(), "arch.yaml", text);
    let mut args = vec!["check", p.to_str().unwrap()];
    for s in sets {
        args.push("--set");
        args.push(s);
    }
    let (code, _, err) = mixscale(&args);
    (code, err.replace(p.to_str().unwrap(), "arch.yaml"))
}

#[test]
fn tiny_config_is_valid() {
    let (code, err) = check(TINY, &[]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn malformed_yaml_names_file_and_line() {
    let bad = TINY.replace("  d_model: 16\n", "  d_model: [16\n");
    let (code, err) = check(&bad, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("error: arch.yaml:"), "{err}");
}

#[test]
fn unknown_key_names_line_and_path() {
    let bad = TINY.replace("  n_layers: 2\n", "  n_layers: 2\n  n_layerz: 3\n");
    let (code, err) = check(&bad, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("arch.yaml:5: model.n_layerz: unknown field `n_layerz`"), "{err}");
}

#[test]
fn wrong_type_names_line_and_path() {
    let bad = TINY.replace("  seq_len: 16\n", "  seq_len: sixteen\n");
    let (code, err) = check(&bad, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("arch.yaml:11: train.seq_len: invalid type: string \"sixteen\""), "{err}");
}

#[test]
fn block_option_errors_name_the_nested_path() {
    let bad = TINY.replace("attention: {num_heads: 2}", "attention:\n      num_heads: 2\n      qk_nrom: true");
    let (code, err) = check(&bad, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("arch.yaml:9: model.blocks.attention.qk_nrom: unknown field `qk_nrom`"), "{err}");
    let bad = TINY.replace("attention: {num_heads: 2}", "attention:\n      num_heads: 3");
    let (code, err) = check(&bad, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("arch.yaml:8: model.blocks.attention.num_heads: d_model 16 is not divisible by num_heads 3"), "{err}");
}

#[test]
fn unknown_block_lists_known_ones() {
    let bad = TINY.replace("layer_pattern: [attention]", "layer_pattern: [attention, mamba9]");
    let (code, err) = check(&bad, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("model.layer_pattern[1]: unknown block `mamba9`; known blocks: attention"), "{err}");
}

#[test]
fn override_errors_say_which_override() {
    let (code, err) = check(TINY, &["model.d_model=abc"]);
    assert_eq!(code, 2);
    assert!(err.contains("model.d_model: invalid type") && err.contains("(set by --set model.d_model=abc)"), "{err}");
    let (code, err) = check(TINY, &["model.nonsense=1"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown field `nonsense`"), "{err}");
    let (code, err) = check(TINY, &["noequals"]);
    assert_eq!(code, 2);
    assert!(err.contains("expected KEY=VALUE"), "{err}");
}

#[test]
fn semantic_checks() {
    assert!(spec_from(TINY, &["train.micro_batch_size=3"]).unwrap_err().to_string().contains("must divide train.batch_size"));
    assert!(spec_from(TINY, &["train.tokens=1000"]).unwrap_err().to_string().contains("not both"));
    assert!(spec_from(TINY, &["model.vocab_size=32"]).unwrap_err().to_string().contains("data.vocab_size"));
    assert!(spec_from(TINY, &["train.optimizer.beta2=1.5"]).unwrap_err().to_string().contains("train.optimizer.beta2"));
    let s = spec_from(TINY, &["train.steps=null", "train.tokens=1000"]).unwrap();
    assert_eq!(s.train.total_steps(), 16, "ceil(1000 / (4·16))");
}

/// A bad config leaves no run folder behind.
#[test]
fn failed_train_leaves_nothing() {
    let dir = tempdir();
    let p = write(dir.path(), "arch.yaml", &TINY.replace("d_model: 16", "d_model: -1"));
    let out = dir.path().join("run");
    let (code, _, err) = mixscale(&["train", p.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(!out.exists());
    let (code, _, err) = mixscale(&["train", dir.path().join("missing.yaml").to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("missing.yaml"), "{err}");
}
