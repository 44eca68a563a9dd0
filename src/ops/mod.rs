//! Core token-mixing ops with exact autograd, and the `mixscale op` runner that applies one to
//! named tensors from a safetensors file (for cross-checking against other implementations).
//! Semantics and layouts: `../shared/reference/ops.md`.

pub mod attn;
pub mod attn_fused;
pub mod attn_sublayer;
pub mod channel;
pub mod cpu;
pub mod ffn_fused;
pub mod fox;
pub mod gated_delta_rule;
pub mod gdn_sublayer;
pub mod gemm;
pub mod gdr_fused;
pub mod head_ce;
mod gdr_token;
pub mod grouped_linear;
pub mod linear;
pub mod mamba2_sublayer;
pub mod moba;
pub mod moba_fused;
pub mod moe_experts;
pub mod norm;
mod norm_x86;
pub mod rope;
mod rope_x86;
pub mod row_norm;
pub mod rwkv7;
pub mod rwkv7_chunk;
pub mod rwkv7_fused;
mod rwkv7_token;
mod scan_op;
pub mod sgemm;
pub mod short_conv;
pub mod short_conv_fused;
pub mod simd;
pub mod softmax;
pub mod ssd;
pub mod ssd_chunked;
pub mod ssd_fused;
mod ssd_token;
pub mod sublayer_op;
pub mod sigmoid_gate;
pub mod swiglu;
pub mod tile_mm;
pub mod token_shift;
mod zmm_row;

use crate::error::{Error, Result};

/// Whether a fused CPU kernel (a CustomOp with only `cpu_fwd`) may run on `xs`: all on the
/// CPU, all the same dtype, f32 or f64.
///
/// **Guard pattern for CPU-only CustomOps** (CUDA binaries run the same code): the public op
/// dispatches `if cpu_fusable(&[..]) { fused(..) } else { composed(..) }`, where the composed
/// form is built from candle primitives (any device, any float dtype incl. bf16, exact
/// autograd); the fused entry point itself bails on non-CPU inputs. A CustomOp without
/// `cuda_fwd` reached from a CUDA tensor fails the whole GPU run ("no cuda implementation"),
/// and bf16 inputs (mixed precision) must take the composed path unless the kernel has a bf16
/// instantiation. `tests/gpu.rs` checks statically that every file implementing a CustomOp
/// without `cuda_fwd` is CPU-guarded, and on a GPU machine runs every block on CUDA.
pub fn cpu_fusable(xs: &[&Tensor]) -> bool {
    let Some(first) = xs.first() else { return false };
    matches!(first.dtype(), DType::F32 | DType::F64) && xs.iter().all(|x| x.device().is_cpu() && x.dtype() == first.dtype())
}

/// The dtype reductions (softmax, norms, losses) run in: f64 for f64 inputs, else f32.
pub fn reduction_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// One op the CLI can run: required and optional float inputs, and the forward function
/// (returns named outputs; the first is the one `dO` refers to).
pub struct OpEntry {
    pub name: &'static str,
    pub about: &'static str,
    pub inputs: &'static [&'static str],
    pub optional: &'static [&'static str],
    pub forward: fn(&HashMap<String, Tensor>) -> candle_core::Result<Vec<(String, Tensor)>>,
}

/// Every op `mixscale op` knows. New ops add one line here.
pub static OPS: &[OpEntry] = &[
    OpEntry {
        name: "attn",
        about: "causal softmax attention with GQA; q [B,T,Hq,D], k, v [B,T,Hkv,D] -> o",
        inputs: &["q", "k", "v"],
        optional: &[],
        forward: |t| {
            attn::check_shapes(&t["q"], &t["k"], &t["v"])?;
            Ok(vec![("o".into(), attn::attn(&t["q"], &t["k"], &t["v"])?)])
        },
    },
    OpEntry {
        name: "gated_delta_rule",
        about: "gated delta rule (fused CPU kernel); q, k [B,T,H,K], v [B,T,H,V], g, beta [B,T,H], initial_state [B,H,K,V] -> o, final_state",
        inputs: &["q", "k", "v", "g", "beta"],
        optional: &["initial_state"],
        forward: |t| {
            let s0 = t.get("initial_state");
            let (o, s) = gdr_fused::gdr_train(&t["q"], &t["k"], &t["v"], &t["g"], &t["beta"], s0, gated_delta_rule::DEFAULT_CHUNK, true)?;
            Ok(vec![("o".into(), o), ("final_state".into(), s)])
        },
    },
    OpEntry {
        name: "gated_delta_rule_chunked",
        about: "gated delta rule, composed chunked WY form (C=64); inputs and outputs as gated_delta_rule",
        inputs: &["q", "k", "v", "g", "beta"],
        optional: &["initial_state"],
        forward: |t| {
            let s0 = t.get("initial_state");
            let (o, s) = gated_delta_rule::gdr_chunked(&t["q"], &t["k"], &t["v"], &t["g"], &t["beta"], s0, gated_delta_rule::DEFAULT_CHUNK)?;
            Ok(vec![("o".into(), o), ("final_state".into(), s)])
        },
    },
    OpEntry {
        name: "ssd",
        about: "Mamba-2 SSD (fused CPU kernel); x [B,T,H,P], dt [B,T,H], A [H], Bm, Cm [B,T,G,N], initial_state [B,H,P,N] -> y, final_state",
        inputs: &["x", "dt", "A", "Bm", "Cm"],
        optional: &["initial_state"],
        forward: |t| {
            let (y, s) = ssd_fused::ssd_train(&t["x"], &t["dt"], &t["A"], &t["Bm"], &t["Cm"], t.get("initial_state"), ssd::DEFAULT_CHUNK, true)?;
            Ok(vec![("y".into(), y), ("final_state".into(), s)])
        },
    },
    OpEntry {
        name: "ssd_chunked",
        about: "Mamba-2 SSD, composed chunked form (C=256); inputs and outputs as ssd",
        inputs: &["x", "dt", "A", "Bm", "Cm"],
        optional: &["initial_state"],
        forward: |t| {
            let (y, s) = ssd::ssd_chunked(&t["x"], &t["dt"], &t["A"], &t["Bm"], &t["Cm"], t.get("initial_state"), ssd::DEFAULT_CHUNK)?;
            Ok(vec![("y".into(), y), ("final_state".into(), s)])
        },
    },
    OpEntry {
        name: "fox",
        about: "forgetting attention (FoX) with GQA; q [B,T,Hq,D], k, v [B,T,Hkv,D], g [B,T,Hq] (log forget gate) -> o",
        inputs: &["q", "k", "v", "g"],
        optional: &[],
        forward: |t| Ok(vec![("o".into(), fox::fox(&t["q"], &t["k"], &t["v"], &t["g"])?)]),
    },
    OpEntry {
        name: "moba",
        about: "MoBA block-sparse attention; q [B,T,Hq,D], k, v [B,T,Hkv,D], block_size, top_k (0-d int64) -> o",
        inputs: &["q", "k", "v", "block_size", "top_k"],
        optional: &[],
        forward: |t| {
            let attr = |n: &str| -> candle_core::Result<usize> {
                let x = t[n].flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
                match x.as_slice() {
                    [v] if *v >= 1 => Ok(*v as usize),
                    _ => candle_core::bail!("`{n}` must be one integer >= 1; got {x:?}"),
                }
            };
            Ok(vec![("o".into(), moba::moba(&t["q"], &t["k"], &t["v"], attr("block_size")?, attr("top_k")?)?)])
        },
    },
    OpEntry {
        name: "rwkv7",
        about: "RWKV-7 WKV (DPLR delta rule, fused CPU kernel); r, w (decay in (0,1)), k, a, b [B,T,H,K], v [B,T,H,V], initial_state [B,H,V,K] -> o, final_state",
        inputs: &["r", "w", "k", "v", "a", "b"],
        optional: &["initial_state"],
        forward: |t| {
            let s0 = t.get("initial_state");
            let (o, s) = rwkv7_fused::rwkv7_train(&t["r"], &t["w"], &t["k"], &t["v"], &t["a"], &t["b"], s0, rwkv7::DEFAULT_CHUNK, true)?;
            Ok(vec![("o".into(), o), ("final_state".into(), s)])
        },
    },
    OpEntry {
        name: "rwkv7_chunked",
        about: "RWKV-7 WKV, composed chunked form (C=16); inputs and outputs as rwkv7",
        inputs: &["r", "w", "k", "v", "a", "b"],
        optional: &["initial_state"],
        forward: |t| {
            let s0 = t.get("initial_state");
            let (o, s) = rwkv7::rwkv7_chunked(&t["r"], &t["w"], &t["k"], &t["v"], &t["a"], &t["b"], s0, rwkv7::DEFAULT_CHUNK)?;
            Ok(vec![("o".into(), o), ("final_state".into(), s)])
        },
    },
];

pub fn find_op(name: &str) -> Result<&'static OpEntry> {
    OPS.iter().find(|o| o.name == name).ok_or_else(|| Error::UnknownName {
        kind: "op",
        name: name.to_string(),
        known: OPS.iter().map(|o| o.name.to_string()).collect(),
    })
}

/// Runs op `name` on the tensors in `inputs` and writes `out`: the outputs, plus `grad_<x>` for
/// every float input when the inputs hold `dO` (gradient of `sum(o · dO)`). Computes in f32.
pub fn run_op_files(name: &str, inputs: &Path, out: &Path) -> Result<()> {
    let op = find_op(name)?;
    let dev = Device::Cpu;
    let raw = candle_core::safetensors::load(inputs, &dev)
        .map_err(|e| Error::Input(format!("{}: cannot read safetensors: {e}", inputs.display())))?;
    let outputs = run_op(op, raw)?;
    let tmp = out.with_extension("tmp.safetensors");
    candle_core::safetensors::save(&outputs, &tmp)?;
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    Ok(())
}

/// In-memory form of [`run_op_files`].
pub fn run_op(op: &OpEntry, raw: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    for need in op.inputs {
        if !raw.contains_key(*need) {
            return Err(Error::Input(format!(
                "op {}: missing input `{need}` (needs {}; optional {})",
                op.name,
                op.inputs.join(", "),
                if op.optional.is_empty() { "none".to_string() } else { op.optional.join(", ") }
            )));
        }
    }
    let d_out = raw.get("dO").map(|t| t.to_dtype(DType::F32)).transpose()?;
    let mut vars: Vec<(String, Var)> = Vec::new();
    let mut tensors = HashMap::new();
    for (k, t) in raw {
        if k == "dO" {
            continue;
        }
        let is_float = matches!(t.dtype(), DType::F16 | DType::BF16 | DType::F32 | DType::F64);
        let is_input = op.inputs.contains(&k.as_str()) || op.optional.contains(&k.as_str());
        if is_float && is_input {
            let v = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
            tensors.insert(k.clone(), v.as_tensor().clone());
            vars.push((k, v));
        } else {
            tensors.insert(k, t);
        }
    }
    let outs = (op.forward)(&tensors).map_err(|e| Error::Input(format!("op {}: {e}", op.name)))?;
    let mut result: HashMap<String, Tensor> = HashMap::new();
    if let Some(d_o) = d_out {
        let o = &outs[0].1;
        if o.dims() != d_o.dims() {
            return Err(Error::Input(format!("op {}: dO has shape {:?}, output {} has {:?}", op.name, d_o.dims(), outs[0].0, o.dims())));
        }
        let loss = (o * &d_o)?.sum_all()?;
        let grads = loss.backward()?;
        for (k, v) in &vars {
            let g = match grads.get(v.as_tensor()) {
                Some(g) => g.clone(),
                None => v.as_tensor().zeros_like()?,
            };
            result.insert(format!("grad_{k}"), g);
        }
    }
    for (k, t) in outs {
        result.insert(k, t.detach());
    }
    Ok(result)
}
