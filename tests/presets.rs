use candle_core::{DType, Device};
use mixscale::model::LanguageModel;

/// Every architecture preset parses, resolves its blocks and builds.
#[test]
fn every_preset_resolves_and_builds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("architectures");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().map(|x| x == "yaml").unwrap_or(false) {
            let text = std::fs::read_to_string(&p).unwrap();
            let spec = crate::util::spec_from(&text, &[]).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            LanguageModel::new(&spec.model, spec.train.seq_len, 0, DType::F32, &Device::Cpu).unwrap();
            n += 1;
        }
    }
    assert!(n >= 1);
}
