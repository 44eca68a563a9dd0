//! CPU vs CUDA parity. Skipped, with a message, where the binary has no CUDA or no GPU is
//! present (CI); run on a GPU machine with a `--features cuda` test binary.

use candle_core::{DType, Device, Tensor, Var};
use mixscale::model::LanguageModel;
use mixscale::ops::{attn, norm, rope::Rope, softmax};
use mixscale::testing::{assert_close, rand_tensor};

fn gpu() -> Option<Device> {
    match mixscale::device::parse("cuda:0") {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("SKIPPED (no GPU): {e}");
            None
        }
    }
}

fn on(t: &Tensor, d: &Device) -> Tensor {
    t.to_dtype(DType::F32).unwrap().to_device(d).unwrap()
}

/// Core ops (forward and input gradients) agree between the fused CPU forms and CUDA.
#[test]
fn gpu_ops_match_cpu() {
    let Some(g) = gpu() else { return };
    let cpu = Device::Cpu;
    let (q, k, v) = (rand_tensor(&[2, 37, 4, 16], 1.0, 1), rand_tensor(&[2, 37, 2, 16], 1.0, 2), rand_tensor(&[2, 37, 2, 16], 1.0, 3));
    let w = rand_tensor(&[2, 37, 4, 16], 1.0, 4);
    let run = |d: &Device| {
        let vars: Vec<Var> = [&q, &k, &v].iter().map(|t| Var::from_tensor(&on(t, d)).unwrap()).collect();
        let o = attn::attn(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor()).unwrap();
        let gr = (&o * on(&w, d)).unwrap().sum_all().unwrap().backward().unwrap();
        let grads: Vec<Tensor> = vars.iter().map(|x| gr.get(x.as_tensor()).unwrap().to_device(&Device::Cpu).unwrap()).collect();
        (o.to_device(&Device::Cpu).unwrap(), grads)
    };
    let (oc, gc) = run(&cpu);
    let (og, gg) = run(&g);
    assert_close("attn cuda", &oc, &og, 1e-4);
    for (a, b) in gc.iter().zip(&gg) {
        assert_close("attn grad cuda", a, b, 1e-4);
    }
    let x = rand_tensor(&[3, 5, 32], 1.0, 5);
    let gain = rand_tensor(&[32], 1.0, 6);
    assert_close("rms_norm cuda", &norm::rms_norm(&on(&x, &cpu), &on(&gain, &cpu), 1e-6).unwrap(), &norm::rms_norm(&on(&x, &g), &on(&gain, &g), 1e-6).unwrap().to_device(&cpu).unwrap(), 1e-5);
    let r = Rope::new(8, 16, 10000.0, DType::F32, &g).unwrap();
    let rc = Rope::new(8, 16, 10000.0, DType::F32, &cpu).unwrap();
    let xr = rand_tensor(&[2, 8, 3, 16], 1.0, 7);
    assert_close("rope cuda", &rc.apply(&on(&xr, &cpu)).unwrap(), &r.apply(&on(&xr, &g)).unwrap().to_device(&cpu).unwrap(), 1e-5);
    let logits = rand_tensor(&[10, 50], 2.0, 8);
    let t = Tensor::new(&[1u32, 4, 9, 49, 0, 3, 3, 7, 20, 11], &cpu).unwrap();
    assert_close(
        "cross_entropy cuda",
        &softmax::cross_entropy_each(&on(&logits, &cpu), &t).unwrap(),
        &softmax::cross_entropy_each(&on(&logits, &g), &t.to_device(&g).unwrap()).unwrap().to_device(&cpu).unwrap(),
        1e-5,
    );
}

/// The whole model: same init on both devices, same loss and parameter gradients (f32).
#[test]
fn gpu_model_matches_cpu() {
    let Some(g) = gpu() else { return };
    let spec = crate::util::spec_from(crate::util::TINY, &["model.tied_embeddings=false", "model.blocks.attention.qk_norm=true"]).unwrap();
    let mut r = mixscale::data::rng::Rng::new(3);
    let toks: Vec<u32> = (0..2 * 17).map(|_| r.below(64) as u32).collect();
    let run = |d: &Device| {
        let m = LanguageModel::new(&spec.model, 16, 1, DType::F32, d).unwrap();
        let t = Tensor::from_vec(toks.clone(), (2, 17), d).unwrap();
        let loss = m.loss(&t.narrow(1, 0, 16).unwrap(), &t.narrow(1, 1, 16).unwrap()).unwrap();
        let gr = loss.backward().unwrap();
        let grads: Vec<(String, Tensor)> =
            m.params.params.iter().map(|(k, p)| (k.clone(), gr.get(p.var.as_tensor()).unwrap().to_device(&Device::Cpu).unwrap())).collect();
        (loss.to_scalar::<f32>().unwrap(), grads)
    };
    let (lc, gc) = run(&Device::Cpu);
    let (lg, gg) = run(&g);
    assert!((lc - lg).abs() < 1e-5 * lc.abs(), "loss cpu {lc} vs cuda {lg}");
    for ((name, a), (_, b)) in gc.iter().zip(&gg) {
        assert_close(&format!("grad {name} cuda"), a, b, 1e-4);
    }
}
