#!/usr/bin/env python3
"""Reference fixtures for zerokit's tokenizer and `prepare`, produced with OpenAI's tiktoken.

Writes tests/fixtures/tokenizer/:
  cases.json       token ids of tricky strings under r50k_base (= gpt2) and p50k_base
  shakespeare.json sha256 and token counts of the train.bin/val.bin that nanoGPT's
                   data/shakespeare/prepare.py writes for data/tinyshakespeare.txt

Run with the reference environment:  .deps/py/bin/python tools/gen_tokenizer_fixtures.py
Works offline: the rank files are copied from tiktoken-rs's bundled assets (the same bytes
OpenAI publishes) into a private tiktoken cache.
"""
import atexit
import glob
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
BLOB = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"


def offline_cache():
    """Points tiktoken at a cache holding tiktoken-rs's rank files, keyed as tiktoken expects."""
    if os.environ.get("ZEROKIT_TIKTOKEN_ASSETS"):
        # A copy of those files, for machines without the cargo registry (GPU machines).
        assets = [os.environ["ZEROKIT_TIKTOKEN_ASSETS"]]
    else:
        registry = os.path.expanduser("~/.cargo/registry/src")
        assets = sorted(glob.glob(os.path.join(registry, "*", "tiktoken-rs-0.12.*", "assets")))
    if not assets:
        sys.exit("tiktoken-rs 0.12 sources not found under ~/.cargo/registry (run `cargo fetch`)")
    cache = tempfile.mkdtemp(prefix="tiktoken-cache-")
    atexit.register(shutil.rmtree, cache, True)
    for name in ("r50k_base", "p50k_base"):
        key = hashlib.sha1(BLOB.format(name).encode()).hexdigest()
        with open(os.path.join(assets[-1], name + ".tiktoken"), "rb") as src:
            data = src.read()
        with open(os.path.join(cache, key), "wb") as dst:
            dst.write(data)
    os.environ["TIKTOKEN_CACHE_DIR"] = cache
    return assets[-1]


def gpt2_from_merges(assets):
    """tiktoken's "gpt2" encoding, built as tiktoken builds it: ranks derived from GPT-2's original
    merge list (vocab.bpe, sha256 checked against tiktoken's pin) and cross-checked against
    encoder.json. This is an independent route to the r50k_base ranks zerokit embeds."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext import openai_public

    vocab_bpe = os.path.join(assets, "vocab.bpe")
    with open(vocab_bpe, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert digest == "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5", digest
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, os.path.join(assets, "encoder.json"))
    return tiktoken.Encoding(name="gpt2", pat_str=openai_public.r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


def tricky_strings():
    cases = {
        "empty": "",
        "hello": "Hello, world!",
        "space_runs": "a  b   c    d\t\te \t f",
        "trailing_spaces": "end with spaces   ",
        "leading_spaces": "   leading",
        "only_spaces": "     ",
        "only_newlines": "\n\n\n",
        "newline_then_space_word": "line\n  word\n\n\nnext \n x",
        "space_before_punct": "wait  !  ?? ...  (x)",
        "tabs_and_newlines": "\tindented\n\t\tmore\n",
        "contractions": "I'm sure you'll see we've they're he'd it's don't can't",
        "contractions_upper": "I'M YOU'LL WE'VE THEY'RE HE'D IT'S DON'T",
        "contraction_edge": "'s 'll' ''t x's's ' s 'x 'ss '",
        "quotes_unicode": "\u2019s it\u2019ll \u201cquoted\u201d",
        "digits": "0 12 345 6789 12345678901234567890 3.14159 1,000,000 v2.0.1",
        "digits_unicode": "\u0663\u0664\u0665 \u00b2\u00b3 \u2167\u2168 \uff11\uff12",
        "emoji": "I \u2764\ufe0f Rust \U0001f980\U0001f680 \U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f44d\U0001f3fd",
        "mixed_scripts": "English \u4e2d\u6587 \u65e5\u672c\u8a9e \ud55c\uad6d\uc5b4 \u0420\u0443\u0441\u0441\u043a\u0438\u0439 "
        "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u0939\u093f\u0928\u094d\u0926\u0940 \u0e44\u0e17\u0e22 \u05e2\u05d1\u05e8\u05d9\u05ea",
        "cjk_no_spaces": "\u6211\u7231\u5317\u4eac\u5929\u5b89\u95e8\u3002\u4f60\u597d\uff0c\u4e16\u754c\uff01",
        "combining_marks": "cafe\u0301 nai\u0308ve e\u0301\u0301\u0301",
        "crlf": "line one\r\nline two\r\n\r\nline four\r\n",
        "lone_cr": "a\rb\r\r c",
        "unicode_spaces": "a\u00a0b\u3000c\u2003d\u2028e\u0085f",
        "control_chars": "nul\x00bel\x07esc\x1b[0m del\x7f",
        "long_repeated_letter": "a" * 1000,
        "long_repeated_punct": "!" * 600 + "?" * 300,
        "long_repeated_space_word": " " * 500 + "word",
        "long_repeated_newlines": "\n" * 300 + "x",
        "long_repeated_emoji": "\U0001f600" * 200,
        "long_repeated_digits": "7" * 700,
        "long_mixed_run": "ab" * 400 + " " + "xyz" * 300,
        "special_token_text": "<|endoftext|> is plain text here",
        "code": "fn main() {\n    let x: Vec<u8> = vec![1, 2, 3];\n    println!(\"{x:?}\");\n}\n",
        "url_email": "https://example.com/a/b?c=d&e=f#g user@example.org",
        "bom": "\ufeffstarts with a BOM",
    }
    # A seeded random string over an alphabet that exercises every class the pretokenizer
    # distinguishes (letters, numbers, whitespace, other) across scripts and plane boundaries.
    alphabet = list("abcXYZ019 '\n\t\r.,!?-_\"") + [
        "\u00a0", "\u3000", "\u2003", "\u0085", "\u00e9", "\u0301", "\u0308", "\u4e2d", "\u6587",
        "\u3002", "\uff0c", "\u0939", "\u093f", "\u094d", "\u0663", "\u00b2", "\u2167", "\u0410",
        "\u044f", "\u05d0", "\u0627", "\U0001f980", "\U0001f600", "\u200d", "\ufe0f", "\U00010330",
        "\U0001d400", "\u01c5", "\u02b0", "\u2019", "\u00ad", "\u0000",
    ]
    rng = random.Random(1234)
    for i in range(3):
        cases[f"random_mixed_{i}"] = "".join(rng.choice(alphabet) for _ in range(2000))
    # Word salad with the statistics of prose: mostly single spaces, some double, newlines.
    words = ["the", "The", "of", "and", "zerokit", "tokenizer", "isn't", "we'll", "42", "3.5", "--",
             "(see", "below)", "\u00fcber", "na\u00efve", "\u4e2d\u6587", "\U0001f980", "x"]
    seps = [" "] * 12 + ["  ", "\n", "\n\n", " \n", "\t", ", ", ". "]
    cases["word_salad"] = "".join(rng.choice(words) + rng.choice(seps) for _ in range(1500))
    return cases


def shakespeare(enc):
    """nanoGPT's data/shakespeare/prepare.py, step for step (the file is read as UTF-8 text)."""
    import numpy as np

    with open(os.path.join(ROOT, "data", "tinyshakespeare.txt"), "r", encoding="utf-8") as f:
        data = f.read()
    n = len(data)
    train_data = data[: int(n * 0.9)]
    val_data = data[int(n * 0.9):]
    out = {"source": "nanoGPT data/shakespeare/prepare.py with tiktoken gpt2", "characters": n,
           "train_characters": len(train_data)}
    for split, text in (("train", train_data), ("val", val_data)):
        ids = np.array(enc.encode_ordinary(text), dtype=np.uint16)
        raw = ids.tobytes()
        out[split] = {"tokens": int(ids.size), "sha256": hashlib.sha256(raw).hexdigest(),
                      "first_tokens": ids[:16].tolist(), "last_tokens": ids[-16:].tolist()}
    return out


def main():
    assets = offline_cache()
    import tiktoken

    os.makedirs(OUT, exist_ok=True)
    encs = {"r50k_base": tiktoken.get_encoding("r50k_base"),
            "p50k_base": tiktoken.get_encoding("p50k_base")}
    gpt2 = gpt2_from_merges(assets)
    cases = []
    for name, text in tricky_strings().items():
        ids = {k: e.encode_ordinary(text) for k, e in encs.items()}
        assert ids["r50k_base"] == gpt2.encode_ordinary(text), name
        cases.append({"name": name, "text": text, "ids": ids})
    meta = {"generator": "tools/gen_tokenizer_fixtures.py", "tiktoken": tiktoken.__version__,
            "cases": cases}
    with open(os.path.join(OUT, "cases.json"), "w", encoding="utf-8") as f:
        # One case a line: reviewable diffs without a line per token id.
        head = {k: v for k, v in meta.items() if k != "cases"}
        f.write(json.dumps(head)[:-1] + ', "cases": [\n')
        f.write(",\n".join(json.dumps(c, ensure_ascii=True, separators=(",", ":")) for c in cases))
        f.write("\n]}\n")
    shk = shakespeare(gpt2)
    shk["tiktoken"] = tiktoken.__version__
    with open(os.path.join(OUT, "shakespeare.json"), "w", encoding="utf-8") as f:
        json.dump(shk, f, indent=1)
        f.write("\n")
    print(f"wrote {len(cases)} cases; shakespeare train {shk['train']['tokens']} val {shk['val']['tokens']}")


if __name__ == "__main__":
    main()
