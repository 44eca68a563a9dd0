//! Core ops against golden fixtures written by the reference implementations themselves
//! (`tests/golden/make_*.py`, see `tests/golden/README.md`): mamba_ssm's `ssd_minimal` for `ssd`,
//! fla's `naive_recurrent_gated_delta_rule` for `gated_delta_rule`. Each fixture holds the
//! op's inputs under their ops.md names, `dO`, and the reference's outputs and input gradients
//! (float32). The inputs go through the same path as `mixscale op` ([`run_op`], f32).
//!
//! Tolerance: `max|ours − ref| / max|ref|` ≤ 1e-5 on outputs and ≤ 1e-4 on gradients, ten times
//! tighter than ops.md's agreement target (1e-4 / 1e-3); both sides compute in fp32.

use candle_core::{Device, Tensor};
use mixscale::ops::{find_op, run_op};
use mixscale::testing::assert_close;
use std::collections::HashMap;
use std::path::PathBuf;

fn fixture(name: &str) -> HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(format!("{name}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e} (regenerate: tests/golden/README.md)", path.display()))
}

/// Runs `op` on the fixture's inputs and compares every output and every `grad_<input>` the
/// fixture holds; also checks that we produce exactly the gradients the reference has.
fn check_against_golden(op_name: &str, name: &str, outputs: &[&str]) {
    let fx = fixture(name);
    let op = find_op(op_name).unwrap();
    let inputs: HashMap<String, Tensor> = fx
        .iter()
        .filter(|(k, _)| op.inputs.contains(&k.as_str()) || op.optional.contains(&k.as_str()) || *k == "dO")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for need in op.inputs {
        assert!(inputs.contains_key(*need), "{name}: fixture lacks input {need}");
    }
    let got = run_op(op, inputs.clone()).unwrap();
    for out in outputs {
        assert_close(&format!("{name} {out}"), &fx[*out], &got[*out], 1e-5);
    }
    let mut want_grads: Vec<&String> = fx.keys().filter(|k| k.starts_with("grad_")).collect();
    let mut got_grads: Vec<&String> = got.keys().filter(|k| k.starts_with("grad_")).collect();
    want_grads.sort();
    got_grads.sort();
    assert_eq!(want_grads, got_grads, "{name}: gradient sets differ");
    assert_eq!(want_grads.len(), inputs.len() - 1, "{name}: every float input has a reference gradient");
    for g in want_grads {
        assert_close(&format!("{name} {g}"), &fx[g], &got[g], 1e-4);
    }
}

/// mamba_ssm `ssd_minimal_discrete`, one group, with an initial state, T = 21 (chunks of 8 there,
/// one chunk of 21 here).
#[test]
fn ssd_matches_mamba_ssm_one_group_with_state() {
    check_against_golden("ssd", "ssd_g1_state", &["y", "final_state"]);
    check_against_golden("ssd_chunked", "ssd_g1_state", &["y", "final_state"]);
}

/// Two groups of two heads, no initial state, T = 19.
#[test]
fn ssd_matches_mamba_ssm_two_groups() {
    check_against_golden("ssd", "ssd_g2", &["y", "final_state"]);
    check_against_golden("ssd_chunked", "ssd_g2", &["y", "final_state"]);
}

/// fla `naive_recurrent_gated_delta_rule` with an initial state, T = 21; fused kernel and
/// composed chunked form.
#[test]
fn gated_delta_rule_matches_fla_with_state() {
    check_against_golden("gated_delta_rule", "gated_delta_rule_state", &["o", "final_state"]);
    check_against_golden("gated_delta_rule_chunked", "gated_delta_rule_state", &["o", "final_state"]);
}

/// No initial state, T = 70 (fused: five checkpoint segments; chunked: two chunks of 64, the
/// second padded).
#[test]
fn gated_delta_rule_matches_fla_t70() {
    check_against_golden("gated_delta_rule", "gated_delta_rule_t70", &["o", "final_state"]);
    check_against_golden("gated_delta_rule_chunked", "gated_delta_rule_t70", &["o", "final_state"]);
}
