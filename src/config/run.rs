//! A run: `model:` + `train:` + `data:` — what one architecture file describes, and what a run
//! folder's resolved `config.yaml` records.

use super::data::DataSpec;
use super::model::ModelSpec;
use super::train::TrainSpec;
use super::YamlDoc;
use crate::data::mad::MadParams;
use crate::data::mqar::MqarParams;
use crate::error::Result;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    pub model: ModelSpec,
    pub train: TrainSpec,
    #[serde(default)]
    pub data: DataSpec,
}

impl RunSpec {
    /// Deserializes and checks everything that does not need the block registry.
    pub fn from_doc(doc: &YamlDoc) -> Result<Self> {
        let spec: RunSpec = doc.deserialize()?;
        spec.check(doc)?;
        Ok(spec)
    }

    fn check(&self, doc: &YamlDoc) -> Result<()> {
        let m = &self.model;
        let t = &self.train;
        let positive = [
            ("model.vocab_size", m.vocab_size),
            ("model.d_model", m.d_model),
            ("model.n_layers", m.n_layers),
            ("train.seq_len", t.seq_len),
            ("train.batch_size", t.batch_size),
        ];
        for (k, v) in positive {
            if v == 0 {
                return Err(doc.error(k, "must be at least 1"));
            }
        }
        if m.layer_pattern.is_empty() {
            return Err(doc.error("model.layer_pattern", "must name at least one block"));
        }
        if m.ffn.hidden(m.d_model) == 0 {
            return Err(doc.error("model.ffn", "hidden width is 0"));
        }
        if let Some(moe) = &m.moe {
            moe.check(m.n_layers).map_err(|(k, msg)| doc.error(&format!("model.moe.{k}"), msg))?;
        }
        if let Some(mtp) = &m.mtp {
            mtp.check(t.seq_len).map_err(|(k, msg)| doc.error(&format!("model.mtp.{k}"), msg))?;
        }
        if !(m.norm_eps > 0.0) {
            return Err(doc.error("model.norm_eps", "must be > 0"));
        }
        if !(m.init.std > 0.0) {
            return Err(doc.error("model.init.std", "must be > 0"));
        }
        let mb = t.micro_batch();
        if mb == 0 || t.batch_size % mb != 0 {
            return Err(doc.error(
                "train.micro_batch_size",
                format!("must divide train.batch_size ({}); got {mb}", t.batch_size),
            ));
        }
        match (t.steps, t.tokens) {
            (Some(_), Some(_)) => return Err(doc.error("train.tokens", "give either train.steps or train.tokens, not both")),
            (None, None) => return Err(doc.error("train", "missing the training budget: set train.steps or train.tokens")),
            _ => {}
        }
        if t.total_steps() == 0 {
            return Err(doc.error("train.steps", "must be at least 1"));
        }
        let o = &t.optimizer;
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            return Err(doc.error("train.optimizer.lr", format!("must be a positive number; got {}", o.lr)));
        }
        for (k, b) in [("train.optimizer.beta1", o.beta1), ("train.optimizer.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(doc.error(k, format!("must be in [0, 1); got {b}")));
            }
        }
        if !(o.eps > 0.0) || o.weight_decay < 0.0 {
            return Err(doc.error("train.optimizer", "eps must be > 0 and weight_decay ≥ 0"));
        }
        let s = &t.schedule;
        if !(0.0..=1.0).contains(&s.min_lr_ratio) {
            return Err(doc.error("train.schedule.min_lr_ratio", "must be in [0, 1]"));
        }
        if !(0.0..=1.0).contains(&s.cooldown_fraction) {
            return Err(doc.error("train.schedule.cooldown_fraction", "must be in [0, 1]"));
        }
        if t.grad_clip < 0.0 {
            return Err(doc.error("train.grad_clip", "must be ≥ 0"));
        }
        if t.eval_sequences == 0 {
            return Err(doc.error("train.eval_sequences", "must be at least 1"));
        }
        if !(t.divergence_factor > 1.0) {
            return Err(doc.error("train.divergence_factor", "must be > 1"));
        }
        match &self.data {
            DataSpec::SyntheticLanguage { vocab_size, .. } => {
                if *vocab_size > m.vocab_size {
                    return Err(doc.error(
                        "data.vocab_size",
                        format!("the language has {vocab_size} tokens but model.vocab_size is {}", m.vocab_size),
                    ));
                }
            }
            DataSpec::Tokens { vocab_size, .. } => {
                if *vocab_size == 0 || *vocab_size > m.vocab_size {
                    return Err(doc.error(
                        "data.vocab_size",
                        format!("must be in 1..=model.vocab_size ({}); got {vocab_size}", m.vocab_size),
                    ));
                }
            }
            DataSpec::Mqar { setting, vocab_size, num_kv_pairs, power_a, random_non_queries } => {
                let p = MqarParams::resolve(setting.as_deref(), *vocab_size, *num_kv_pairs, *power_a, *random_non_queries, t.seq_len)
                    .map_err(|(k, msg)| doc.error(k, msg))?;
                if p.vocab_size > m.vocab_size {
                    return Err(doc.error(
                        "data.vocab_size",
                        format!("MQAR uses {} tokens but model.vocab_size is {}", p.vocab_size, m.vocab_size),
                    ));
                }
            }
            DataSpec::Mad { .. } => {
                let (task, o) = self.data.mad_options().expect("a MAD spec");
                let p = MadParams::resolve(task, &o).map_err(|(k, msg)| doc.error(&format!("data.{k}"), msg))?;
                crate::data::mad::trainable(task).map_err(|msg| doc.error("data.task", msg))?;
                if p.vocab_size > m.vocab_size {
                    return Err(doc.error(
                        "data.vocab_size",
                        format!("MAD {task:?} uses {} tokens but model.vocab_size is {}", p.vocab_size, m.vocab_size),
                    ));
                }
                if p.out_len() != t.seq_len {
                    return Err(doc.error(
                        "train.seq_len",
                        format!("MAD {task:?} with data.seq_len {} yields {} tokens per example; set train.seq_len: {}", p.seq_len, p.out_len(), p.out_len()),
                    ));
                }
                if t.eval_sequences > p.num_test_examples {
                    return Err(doc.error(
                        "train.eval_sequences",
                        format!("the MAD test set has {} examples (data.num_test_examples); got {}", p.num_test_examples, t.eval_sequences),
                    ));
                }
            }
        }
        Ok(())
    }
}
