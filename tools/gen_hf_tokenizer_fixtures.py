#!/usr/bin/env python3
"""Reference fixtures for `prepare --tokenizer` (Hugging Face tokenizer.json files), produced with
the Python `tokenizers` library.

Writes tests/fixtures/tokenizer/hf/:
  llama3.json   a Llama-3-style tokenizer: byte-level BPE behind Llama 3's split regex, BPE with
                ignore_merges, <|begin_of_text|>/<|end_of_text|> added after the trained vocabulary,
                a template post-processor that adds BOS
  gemma.json    a Gemma-style (SentencePiece-like) tokenizer: " " replaced by "▁", Gemma's
                Split(" ", merged_with_previous) pre-tokenizer, BPE with byte fallback
                (<0x00>..<0xFF> in the vocabulary), <pad>/<eos>/<bos>/<unk> at ids 0..3, a template
                post-processor that adds <bos>
  wide.json     a word-level tokenizer whose ids are above 65535 (prepare writes uint32 for it)
  corpus/       a small corpus: a.txt (a slice of Shakespeare, one document) and b.jsonl (tricky
                documents, one a line)
  expected.json for each tokenizer: the ids of every tricky string and the token stream prepare
                must write for corpus/a.txt then corpus/b.jsonl with --val-fraction 0 (each
                document's ids with the tokenizer's boundary: EOS after for llama3 and wide, BOS
                before for gemma)

Ids are `encode(text, add_special_tokens=False)` with `encode_special_tokens = True`: text that
spells a special token is encoded as plain text, as prepare does (only the boundary writes
special ids).

The two trained tokenizers are trained on a slice of data/tinyshakespeare.txt plus the tricky
strings in Latin scripts (so some non-ASCII merges exist, and CJK or emoji fall back to bytes),
several hundred merges each: small enough to commit.

Run with the reference environment:  .deps/py/bin/python tools/gen_hf_tokenizer_fixtures.py
Works offline (nothing is downloaded).
"""
import json
import os

import tokenizers

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer", "hf")

# Llama 3's pre-tokenizer pattern, as its tokenizer.json spells it.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

EXTRA_CASES = [
    "<|begin_of_text|>Hello<|end_of_text|>",
    "<bos>text<eos> <pad> <unk> </s>",
    "▁already▁has▁the▁marker ▁ ▁▁",
    "<0x41> is not a byte token here",
    "e\u0301\u0302\u0303 a\u0308 n\u0303o\u0303 Z\u0336\u0336",
    "tabs\tand\t\ttabs\t \t\n\t",
    "  \n  \n\n   \t  trailing  ",
    "3.14159 2,718 1e-10 0x1F 007 123456789012",
    "don't won't I'd they're we've y'all 'tis ''",
    "日本語のテキストと한국어와中文混合",
    "🏳️‍🌈👩🏽‍💻🇫🇷 emoji sequences",
    "supercalifragilisticexpialidocious" * 8,
    "x" * 1000,
    "Pneumonoultramicroscopicsilicovolcanoconiosis" + "é" * 300,
]


def cases():
    with open(os.path.join(ROOT, "tests", "fixtures", "tokenizer", "cases.json"), encoding="utf-8") as f:
        base = [c["text"] for c in json.load(f)["cases"]]
    return base + EXTRA_CASES


def training_text(strings):
    """Shakespeare and the tricky strings written in Latin scripts: characters outside them (CJK,
    emoji, ...) stay out of the alphabet, so Gemma-style encodes them by byte fallback."""
    with open(os.path.join(ROOT, "data", "tinyshakespeare.txt"), encoding="utf-8") as f:
        text = f.read()[:200_000]
    return text.split("\n\n") + [s for s in strings if all(ord(c) < 0x250 for c in s)]


def llama3(strings):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(training_text(strings), trainer)
    # Llama 3's specials come after the trained vocabulary (128000, 128001), as here.
    tok.add_special_tokens([AddedToken("<|begin_of_text|>", special=True), AddedToken("<|end_of_text|>", special=True)])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A:0 <|begin_of_text|>:1 $B:1",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    spec = json.loads(tok.to_str())
    spec["model"]["ignore_merges"] = True  # as Llama 3's tokenizer.json
    return Tokenizer.from_str(json.dumps(spec))


def gemma(strings):
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    # Trained with a Metaspace split so that, as in SentencePiece, no merge crosses a "▁" that
    # starts a word; the result is then given Gemma's own normalizer and pre-tokenizer.
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=specials, show_progress=False)
    trainer_tok.train_from_iterator(training_text(strings), trainer)
    trained = json.loads(trainer_tok.to_str())["model"]

    # Gemma's layout: specials, then the 256 byte-fallback pieces, then the learned pieces.
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if t not in vocab:
            vocab[t] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return tok


def wide():
    words = ["the", "king", "queen", "of", "england", "and", "france", "is", "dead", ".", ","]
    vocab = {"<unk>": 70000}
    for w in words:
        vocab[w] = 70001 + len(vocab)
    vocab["</s>"] = 99999
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("</s>", special=True)])
    return tok


def corpus(strings):
    os.makedirs(os.path.join(OUT, "corpus"), exist_ok=True)
    with open(os.path.join(ROOT, "data", "tinyshakespeare.txt"), encoding="utf-8") as f:
        # A long document (prepare cuts it into chunks under a small --chunk-bytes).
        a = f.read()[300_000:312_000]
    docs = [s for s in strings if s.strip()] + ["The king is dead, and the queen of France."]
    with open(os.path.join(OUT, "corpus", "a.txt"), "w", encoding="utf-8", newline="") as f:
        f.write(a)
    with open(os.path.join(OUT, "corpus", "b.jsonl"), "w", encoding="utf-8", newline="\n") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    return [a] + docs


def main():
    os.makedirs(OUT, exist_ok=True)
    strings = cases()
    docs = corpus(strings)
    made = {
        "llama3": (llama3(strings), "eos", "<|end_of_text|>"),
        "gemma": (gemma(strings), "bos", "<bos>"),
        "wide": (wide(), "eos", "</s>"),
    }
    expected = {
        "generator": "tools/gen_hf_tokenizer_fixtures.py",
        "python_tokenizers": tokenizers.__version__,
        "corpus": ["corpus/a.txt", "corpus/b.jsonl"],
        "tokenizers": {},
    }
    for name, (tok, boundary, special) in made.items():
        tok.save(os.path.join(OUT, f"{name}.json"))
        tok = Tokenizer.from_file(os.path.join(OUT, f"{name}.json"))
        tok.encode_special_tokens = True
        ids = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
        boundary_id = tok.token_to_id(special)
        stream = []
        for d in docs:
            stream += ids(d) + [boundary_id] if boundary == "eos" else [boundary_id] + ids(d)
        vocab = tok.get_vocab(with_added_tokens=True)
        expected["tokenizers"][name] = {
            "file": f"{name}.json",
            "vocab_size": max(vocab.values()) + 1,
            "boundary": boundary,
            "boundary_token": special,
            "boundary_id": boundary_id,
            "cases": [{"text": s, "ids": ids(s)} for s in strings],
            "stream": stream,
        }
        print(f"{name}: {len(vocab)} tokens, largest id {max(vocab.values())}, stream of {len(stream)} tokens")
    with open(os.path.join(OUT, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
