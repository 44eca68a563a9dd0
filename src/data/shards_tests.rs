use super::*;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn raw(path: &Path, tokens: &[u32], wide: bool) {
    let bytes: Vec<u8> = if wide {
        tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
    } else {
        tokens.iter().flat_map(|&t| (t as u16).to_le_bytes()).collect()
    };
    std::fs::write(path, bytes).unwrap();
}

fn header(magic: i32, version: i32, count: i32) -> Vec<u8> {
    let mut h = [0i32; 256];
    h[..3].copy_from_slice(&[magic, version, count]);
    h.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn read_all(s: &Shard, vocab: usize) -> Vec<u32> {
    let mut out = Vec::new();
    s.read(0, s.len(), vocab, &mut out).unwrap();
    out
}

fn err(r: Result<impl Sized>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn each_format_reads_back_exact_tokens() {
    let d = tmp();
    let small: Vec<u32> = (0..1000).map(|i| (i * 37 % 65536) as u32).collect();
    let big: Vec<u32> = (0..1000).map(|i| 70_000 + i * 1_000_003 % 3_000_000).collect();
    let cases = [
        ("a.bin", TokenFormat::Llmc, &small, false, true),
        ("b.bin", TokenFormat::Llmc, &big, true, true),
        ("c.bin", TokenFormat::U16, &small, false, false),
        ("d.bin", TokenFormat::U32, &big, true, false),
    ];
    for (name, fmt, toks, wide, llmc) in cases {
        let p = d.path().join(name);
        if llmc {
            write_llmc(&p, toks, wide).unwrap();
        } else {
            raw(&p, toks, wide);
        }
        let s = Shard::open(&p, fmt).unwrap();
        assert_eq!(s.len(), toks.len(), "{name}");
        assert_eq!(&read_all(&s, usize::MAX), toks, "{name}");
        let mut part = Vec::new();
        s.read(17, 5, usize::MAX, &mut part).unwrap();
        assert_eq!(part, toks[17..22], "{name}");
    }
    // The header layout is llm.c's: magic, version, count as int32 LE, 1024 bytes, then tokens.
    let bytes = std::fs::read(d.path().join("a.bin")).unwrap();
    assert_eq!(bytes.len(), 1024 + 2 * 1000);
    assert_eq!(&bytes[..12], &header(20240520, 1, 1000)[..12]);
    assert!(bytes[12..1024].iter().all(|&b| b == 0));
    assert_eq!(u16::from_le_bytes([bytes[1024 + 2], bytes[1024 + 3]]), 37);
    let bytes = std::fs::read(d.path().join("b.bin")).unwrap();
    assert_eq!(&bytes[..12], &header(20240801, 7, 1000)[..12]);
}

#[test]
fn header_errors_name_the_file() {
    let d = tmp();
    let p = d.path().join("x.bin");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        ([header(12345, 1, 0), vec![]].concat(), "bad magic 12345"),
        ([header(20240520, 7, 0), vec![]].concat(), "needs version 1; the header says version 7"),
        ([header(20240801, 1, 0), vec![]].concat(), "needs version 7; the header says version 1"),
        ([header(20240520, 1, 10), vec![0; 19]].concat(), "truncated: the header promises 10 tokens (20 bytes) but only 19 bytes"),
        ([header(20240801, 7, 10), vec![0; 20]].concat(), "truncated: the header promises 10 tokens (40 bytes)"),
        ([header(20240520, 1, 2), vec![0; 6]].concat(), "2 bytes after the 2 tokens"),
        ([header(20240520, 1, -3), vec![]].concat(), "negative token count"),
        (vec![0; 100], "shorter than the 1024-byte llm.c header"),
    ];
    for (bytes, want) in cases {
        std::fs::write(&p, bytes).unwrap();
        let e = err(Shard::open(&p, TokenFormat::Llmc));
        assert!(e.contains(want) && e.contains("x.bin"), "{e} / {want}");
    }
    std::fs::write(&p, [0u8; 7]).unwrap();
    let e = err(Shard::open(&p, TokenFormat::U32));
    assert!(e.contains("x.bin") && e.contains("7 bytes is not a whole number of 4-byte tokens"), "{e}");
    let e = err(Shard::open(&d.path().join("missing.bin"), TokenFormat::U16));
    assert!(e.contains("missing.bin"), "{e}");
}

#[test]
fn token_ids_are_checked_when_read() {
    let d = tmp();
    let p = d.path().join("v.bin");
    write_llmc(&p, &[1, 2, 3, 99, 4], false).unwrap();
    let s = Shard::open(&p, TokenFormat::Llmc).unwrap();
    let mut out = Vec::new();
    s.read(0, 3, 50, &mut out).unwrap();
    let e = err(s.read(1, 4, 50, &mut out));
    assert!(e.contains("v.bin") && e.contains("token id 99 at token position 3 is ≥ data.vocab_size 50"), "{e}");
}

#[test]
fn glob_matching() {
    assert!(wildcard_match("fineweb_train_*.bin", "fineweb_train_000001.bin"));
    assert!(!wildcard_match("fineweb_train_*.bin", "fineweb_val_000001.bin"));
    assert!(wildcard_match("a?c*", "abc"));
    assert!(wildcard_match("*", ""));
    assert!(!wildcard_match("a?c", "ac"));
    assert!(wildcard_match("*a*b*", "xxaxxbxx"));
    let d = tmp();
    for n in ["t_2.bin", "t_10.bin", "t_1.bin", "v_1.bin"] {
        write_llmc(&d.path().join(n), &[1; 40], false).unwrap();
    }
    std::fs::create_dir(d.path().join("t_dir.bin")).unwrap();
    let pat = format!("{}/t_*.bin", d.path().display());
    let names: Vec<String> = expand(&pat, "data.train").unwrap().iter().map(|p| p.file_name().unwrap().to_string_lossy().to_string()).collect();
    assert_eq!(names, ["t_1.bin", "t_10.bin", "t_2.bin"], "sorted, files only");
    let e = err(expand(&format!("{}/w_*.bin", d.path().display()), "data.train"));
    assert!(e.starts_with("data.train: ") && e.contains("w_*.bin` matches no file"), "{e}");
    let e = err(expand(&format!("{}/nope.bin", d.path().display()), "data.val"));
    assert!(e.starts_with("data.val: ") && e.contains("nope.bin: no such file"), "{e}");
    let e = err(expand(&format!("{}/*/x.bin", d.path().display()), "data.val"));
    assert!(e.contains("only supported in the last path component"), "{e}");
}

fn corpus(d: &Path, lens: &[usize]) -> String {
    let mut base = 0u32;
    for (k, &n) in lens.iter().enumerate() {
        let toks: Vec<u32> = (base..base + n as u32).collect();
        write_llmc(&d.join(format!("s_{k}.bin")), &toks, true).unwrap();
        base += n as u32;
    }
    format!("{}/s_*.bin", d.display())
}

#[test]
fn training_windows_are_deterministic_and_cover_every_start() {
    let d = tmp();
    // Tokens are their global index, so a window's first token tells where it came from.
    let pat = corpus(d.path(), &[20, 9, 33]);
    let f = TokenFiles::open(&pat, "data.train", TokenFormat::Llmc, 1000, 9).unwrap();
    assert_eq!(f.tokens(), 62);
    let g = TokenFiles::open(&pat, "data.train", TokenFormat::Llmc, 1000, 9).unwrap();
    let mut seen = std::collections::BTreeMap::new();
    for i in 0..4000u64 {
        let pos = f.train_position(7, i);
        assert_eq!(pos, g.train_position(7, i), "pure function of (seed, i)");
        let mut w = Vec::new();
        f.read(pos, &mut w).unwrap();
        assert_eq!(w.len(), 9);
        assert!(w.windows(2).all(|p| p[1] == p[0] + 1), "a window never crosses files: {w:?}");
        *seen.entry(w[0]).or_insert(0usize) += 1;
    }
    // Starts: 12 in file 0 (0..=11), 1 in file 1 (20), 25 in file 2 (29..=53) = 38 in all.
    let want: Vec<u32> = (0..=11).chain([20]).chain(29..=53).collect();
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), want);
    let (lo, hi) = (seen.values().min().unwrap(), seen.values().max().unwrap());
    assert!(*lo > 60 && *hi < 160, "roughly uniform over starts (mean 105): {lo}..{hi}");
    // Another seed gives another stream.
    let other: Vec<_> = (0..20).map(|i| f.train_position(8, i)).collect();
    assert_ne!(other, (0..20).map(|i| f.train_position(7, i)).collect::<Vec<_>>());
}

#[test]
fn validation_windows_are_consecutive() {
    let d = tmp();
    let pat = corpus(d.path(), &[20, 9, 33]);
    let f = TokenFiles::open(&pat, "data.val", TokenFormat::Llmc, 1000, 9).unwrap();
    // Stride 8 inside each file: file 0 has 2 windows (0, 8), file 1 one (20), file 2 four (29, 37, 45, 53).
    assert_eq!(f.val_windows(), 7);
    let firsts: Vec<u32> = (0..7)
        .map(|j| {
            let mut w = Vec::new();
            f.read(f.val_position(j).unwrap(), &mut w).unwrap();
            w[0]
        })
        .collect();
    assert_eq!(firsts, [0, 8, 20, 29, 37, 45, 53]);
    let e = err(f.val_position(7));
    assert!(e.contains("data.val: validation window 7 requested but the files hold only 7 windows of 9 tokens"), "{e}");
}

#[test]
fn corpus_errors() {
    let d = tmp();
    std::fs::write(d.path().join("e_0.bin"), header(20240520, 1, 0)).unwrap();
    std::fs::write(d.path().join("e_1.bin"), header(20240520, 1, 0)).unwrap();
    let pat = format!("{}/e_*.bin", d.path().display());
    let e = err(TokenFiles::open(&pat, "data.train", TokenFormat::Llmc, 100, 9));
    assert!(e.contains("data.train: the 2 file(s) matching") && e.contains("hold no tokens"), "{e}");
    // A file shorter than one window contributes no window (like the tail of any file)...
    let pat = corpus(d.path(), &[20, 5, 12]);
    let f = TokenFiles::open(&pat, "data.train", TokenFormat::Llmc, 100, 9).unwrap();
    assert_eq!((f.short_files(), f.val_windows()), (1, 2 + 1));
    for i in 0..500 {
        let (file, _) = f.train_position(1, i);
        assert_ne!(file, 1, "no window from the short file");
    }
    assert_eq!(f.val_position(2).unwrap(), (2, 0));
    // ...but a corpus without any whole window is an error naming its longest file.
    let d = tmp();
    let pat = corpus(d.path(), &[5, 8]);
    let e = err(TokenFiles::open(&pat, "data.train", TokenFormat::Llmc, 100, 9));
    assert!(e.contains("s_1.bin: data.train: no file matching") && e.contains("holds one window of train.seq_len + 1 = 9 tokens (the longest, this one, has 8)"), "{e}");
}
