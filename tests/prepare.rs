//! `prepare` end to end: tokens against OpenAI's tiktoken, nanoGPT's Shakespeare files byte for
//! byte, determinism across thread counts, the multi-document layout, and every bad input.
//! Fixtures: tools/gen_tokenizer_fixtures.py.

use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use zerokit::data::{BoundaryChoice, Encoding, HfTokenizer, Side, Tokenizer};

const EOT: u32 = 50256;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> Value {
    let path = root().join("tests/fixtures/tokenizer").join(name);
    serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap()
}

fn prepare(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prepare")).args(args).output().expect("prepare runs")
}

fn ok(args: &[&str]) {
    let out = prepare(args);
    assert!(out.status.success(), "prepare {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Runs a failing case: non-zero exit, `needle` in the message, no output directory and no
/// temporary leftovers next to it.
fn fails(args: &[&str], out: &Path, needle: &str) -> String {
    let res = prepare(args);
    let stderr = String::from_utf8_lossy(&res.stderr).into_owned();
    assert!(!res.status.success(), "prepare {args:?} should fail; stderr: {stderr}");
    assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out.exists(), "{} exists after a failure", out.display());
    let parent = out.parent().unwrap();
    let leftovers: Vec<_> = fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    stderr
}

fn tokens(path: &Path, width: usize) -> Vec<u32> {
    let bytes = fs::read(path).unwrap();
    assert_eq!(bytes.len() % width, 0);
    bytes
        .chunks_exact(width)
        .map(|c| {
            if width == 2 {
                u16::from_le_bytes([c[0], c[1]]) as u32
            } else {
                u32::from_le_bytes(c.try_into().unwrap())
            }
        })
        .collect()
}

fn meta(dir: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn token_ids_match_tiktoken_on_tricky_strings() {
    let cases = fixture("cases.json");
    for (encoding, key) in [(Encoding::R50kBase, "r50k_base"), (Encoding::P50kBase, "p50k_base")] {
        let tok = Tokenizer::new(encoding).unwrap();
        for case in cases["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let want: Vec<u32> =
                case["ids"][key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let got = tok.encode_ordinary(text).unwrap();
            assert_eq!(got, want, "{key} case {}", case["name"]);
            assert_eq!(tok.decode_bytes(&got).unwrap(), text.as_bytes(), "{key} round trip {}", case["name"]);
        }
    }
}

#[test]
fn cuts_in_tricky_strings_do_not_change_tokens() {
    // Every chunk boundary prepare may choose, on every fixture text.
    let cases = fixture("cases.json");
    let tok = Tokenizer::new(Encoding::R50kBase).unwrap();
    for case in cases["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let whole = tok.encode_ordinary(text).unwrap();
        let mut end = text.len();
        while let Some(p) = tok.find_cut(&text[..end], 0) {
            let mut two = tok.encode_ordinary(&text[..p]).unwrap();
            two.extend(tok.encode_ordinary(&text[p..]).unwrap());
            assert_eq!(two, whole, "case {} cut at {p}", case["name"]);
            end = p;
        }
    }
}

#[test]
fn shakespeare_is_byte_identical_to_nanogpt() {
    let want = fixture("shakespeare.json");
    let tmp = tempfile::tempdir().unwrap();
    let input = root().join("data/tinyshakespeare.txt");
    // Default settings, then one thread with tiny chunks: both must give nanoGPT's bytes.
    for (name, extra) in [("default", vec![]), ("one-thread", vec!["--threads", "1", "--chunk-bytes", "3000"])] {
        let out = tmp.path().join(name);
        let mut args = vec![s(&input), "--out", s(&out)];
        args.extend(extra);
        ok(&args);
        let m = meta(&out);
        for split in ["train", "val"] {
            let sha = zerokit::fsutil::sha256_file(&out.join(format!("{split}.bin"))).unwrap();
            assert_eq!(sha, want[split]["sha256"].as_str().unwrap(), "{name} {split}.bin");
            assert_eq!(m["splits"][split]["tokens"], want[split]["tokens"], "{name} {split}");
            assert_eq!(m["splits"][split]["sha256"].as_str().unwrap(), sha);
        }
        assert_eq!(want["train"]["tokens"], 301966);
        assert_eq!(want["val"]["tokens"], 36059);
        assert_eq!(m["mode"], "chars");
        assert_eq!(m["dtype"], "uint16");
        assert_eq!(m["eot_token"], EOT);
        assert_eq!(m["vocab_size"], 50257);
        assert_eq!(m["inputs"][0]["bytes"], 1115394);
        assert_eq!(m["inputs"][0]["sha256"].as_str().unwrap(), zerokit::fsutil::sha256_file(&input).unwrap());
        assert_eq!(m["command"][1], s(&input));
    }
}

/// A corpus of every input kind: plain text, zstd text, JSONL (with a blank line and CRLF line
/// ends), zstd JSONL, in nested directories.
fn mixed_corpus(dir: &Path) -> Vec<String> {
    let shakespeare = fs::read_to_string(root().join("data/tinyshakespeare.txt")).unwrap();
    let paras: Vec<&str> = shakespeare.split("\n\n").collect();
    let mut docs = Vec::new();
    fs::create_dir_all(dir.join("b/nested")).unwrap();
    // Sorted order: a.txt, b/c.jsonl, b/nested/d.txt.zst, b/nested/e.jsonl.zst, z.txt
    let a = paras[..40].join("\n\n");
    fs::write(dir.join("a.txt"), &a).unwrap();
    docs.push(a);
    let mut jsonl = String::new();
    for (i, p) in paras[40..140].iter().enumerate() {
        jsonl.push_str(&serde_json::json!({"id": i, "text": p}).to_string());
        jsonl.push_str(if i % 2 == 0 { "\r\n" } else { "\n" });
        if i == 10 {
            jsonl.push_str("   \n");
        }
        docs.push(p.to_string());
    }
    fs::write(dir.join("b/c.jsonl"), jsonl).unwrap();
    let d = paras[140..400].join("\n\n") + " \u{1f980} caf\u{e9} \u{4e2d}\u{6587}\n";
    fs::write(dir.join("b/nested/d.txt.zst"), zstd::encode_all(d.as_bytes(), 3).unwrap()).unwrap();
    docs.push(d);
    let mut jsonl = String::new();
    for p in &paras[400..700] {
        jsonl.push_str(&serde_json::json!({"text": p, "meta": {"n": [1, 2]}}).to_string());
        jsonl.push('\n');
        docs.push(p.to_string());
    }
    fs::write(dir.join("b/nested/e.jsonl.zst"), zstd::encode_all(jsonl.as_bytes(), 3).unwrap()).unwrap();
    let z = paras[700..].join("\n\n");
    fs::write(dir.join("z.txt"), &z).unwrap();
    docs.push(z);
    fs::write(dir.join(".hidden.txt"), "never read").unwrap();
    docs
}

#[test]
fn documents_mode_layout_and_thread_determinism() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    let docs = mixed_corpus(&corpus);
    let mut outputs = Vec::new();
    // A window of one chunk per thread makes the reader wait on nearly every chunk.
    for (threads, chunk, in_flight) in
        [("1", "262144", "32"), ("1", "700", "32"), ("2", "5000", "1"), ("8", "300", "2")]
    {
        let out = tmp.path().join(format!("out-{threads}-{chunk}-{in_flight}"));
        ok(&[
            s(&corpus),
            "--out",
            s(&out),
            "--threads",
            threads,
            "--chunk-bytes",
            chunk,
            "--chunks-in-flight",
            in_flight,
            "--val-fraction",
            "0.2",
        ]);
        outputs.push((fs::read(out.join("train.bin")).unwrap(), fs::read(out.join("val.bin")).unwrap(), out));
    }
    for o in &outputs[1..] {
        assert!(
            o.0 == outputs[0].0 && o.1 == outputs[0].1,
            "{} differs from {}",
            o.2.display(),
            outputs[0].2.display()
        );
    }
    let out = &outputs[0].2;
    let m = meta(out);
    assert_eq!(m["mode"], "documents");
    let names: Vec<String> =
        m["inputs"].as_array().unwrap().iter().map(|i| i["path"].as_str().unwrap().to_string()).collect();
    let expect = ["a.txt", "b/c.jsonl", "b/nested/d.txt.zst", "b/nested/e.jsonl.zst", "z.txt"];
    assert_eq!(names.len(), expect.len(), "{names:?}");
    for (n, e) in names.iter().zip(expect) {
        assert!(n.ends_with(e), "{names:?}");
    }

    // Each split is its documents' tokens, each followed by EOT, in corpus order; every document
    // is in exactly one split.
    let tok = Tokenizer::new(Encoding::R50kBase).unwrap();
    let split_docs = |name: &str| -> Vec<Vec<u32>> {
        let t = tokens(&out.join(name), 2);
        assert_eq!(t.last(), Some(&EOT));
        // Text after the last EOT is the empty tail of split(): drop it.
        let mut docs: Vec<Vec<u32>> = t.split(|&x| x == EOT).map(|d| d.to_vec()).collect();
        docs.pop();
        docs
    };
    let (train, val) = (split_docs("train.bin"), split_docs("val.bin"));
    assert_eq!(train.len() + val.len(), docs.len());
    assert_eq!(m["splits"]["train"]["documents"], train.len());
    assert_eq!(m["splits"]["val"]["documents"], val.len());
    let (mut ti, mut vi) = (0, 0);
    for doc in &docs {
        let want = tok.encode_ordinary(doc).unwrap();
        if ti < train.len() && train[ti] == want {
            ti += 1;
        } else {
            assert_eq!(val.get(vi), Some(&want), "document not found in order");
            vi += 1;
        }
    }
    assert!(val.len() > 20 && train.len() > 300, "train {} val {}", train.len(), val.len());

    // Another seed, another assignment.
    let other = tmp.path().join("seed");
    ok(&[s(&corpus), "--out", s(&other), "--val-fraction", "0.2", "--seed", "1"]);
    assert_ne!(fs::read(other.join("val.bin")).unwrap(), outputs[0].1);
}

#[test]
fn wide_encodings_write_uint32_and_say_so() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.txt");
    let text =
        "Token ids above 65535 need four bytes: \u{4e2d}\u{6587}, emoji \u{1f980}, and plain English text. ".repeat(40);
    fs::write(&input, &text).unwrap();
    let out = tmp.path().join("out");
    ok(&[s(&input), "--out", s(&out), "--encoding", "o200k_base", "--chunk-bytes", "500"]);
    let m = meta(&out);
    assert_eq!(m["dtype"], "uint32");
    assert_eq!(m["encoding"], "o200k_base");
    assert_eq!(m["vocab_size"], 200019);
    let n = text.chars().count();
    let cut = text.char_indices().nth((n as f64 * 0.9) as usize).unwrap().0;
    let tok = Tokenizer::new(Encoding::O200kBase).unwrap();
    assert_eq!(tokens(&out.join("train.bin"), 4), tok.encode_ordinary(&text[..cut]).unwrap());
    assert_eq!(tokens(&out.join("val.bin"), 4), tok.encode_ordinary(&text[cut..]).unwrap());
    assert!(tokens(&out.join("train.bin"), 4).iter().any(|&t| t > 65535));
}

#[test]
fn existing_output_needs_force() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.txt");
    fs::write(&input, "some text to tokenize, long enough for two splits").unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("keep"), "x").unwrap();
    let res = prepare(&[s(&input), "--out", s(&out)]);
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("already exists (pass --force"));
    assert!(out.join("keep").exists() && !out.join("train.bin").exists());
    ok(&[s(&input), "--out", s(&out), "--force"]);
    assert!(!out.join("keep").exists() && out.join("train.bin").exists());
}

#[test]
fn bad_inputs_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let out = t.join("out");
    let o = s(&out).to_string();
    let good = t.join("good.txt");
    fs::write(&good, "A good document with some words in it.").unwrap();

    let bad_utf8 = t.join("bad.txt");
    let mut bytes = b"valid text, then ".to_vec();
    bytes.extend([0xff, 0xfe]);
    bytes.extend(b" more");
    fs::write(&bad_utf8, &bytes).unwrap();
    let msg = fails(&[s(&bad_utf8), "--out", &o], &out, "invalid UTF-8 at byte offset 17");
    assert!(msg.contains("bad.txt"), "{msg}");
    // With --lossy the same file goes through, invalid bytes replaced.
    ok(&[s(&bad_utf8), "--out", &o, "--lossy"]);
    fs::remove_dir_all(&out).unwrap();

    let zbad = t.join("bad.txt.zst");
    fs::write(&zbad, zstd::encode_all(&bytes[..], 3).unwrap()).unwrap();
    fails(&[s(&zbad), "--out", &o], &out, "bad.txt.zst: invalid UTF-8 at byte offset 17 of the decompressed stream");

    let jsonl_utf8 = t.join("u.jsonl");
    let mut j = b"{\"text\": \"ok\"}\n{\"text\": \"bad ".to_vec();
    j.extend([0xc3, 0x28]);
    j.extend(b"\"}\n");
    fs::write(&jsonl_utf8, &j).unwrap();
    fails(&[s(&jsonl_utf8), "--out", &o], &out, "u.jsonl: invalid UTF-8 at byte offset 29 (line 2)");

    let malformed = t.join("m.jsonl");
    fs::write(&malformed, "{\"text\": \"one\"}\n\n{\"text\": \"two\"\n{\"text\": \"three\"}\n").unwrap();
    fails(&[s(&good), s(&malformed), "--out", &o], &out, "m.jsonl:3: malformed JSON line");

    let missing = t.join("f.jsonl");
    fs::write(&missing, "{\"text\": \"one\"}\n{\"body\": \"two\"}\n").unwrap();
    fails(&[s(&missing), "--out", &o], &out, "f.jsonl:2: missing field \"text\"");
    let msg = fails(&[s(&missing), "--out", &o, "--field", "body"], &out, "f.jsonl:1: missing field \"body\"");
    assert!(msg.contains("--field"), "{msg}");
    let not_string = t.join("n.jsonl");
    fs::write(&not_string, "{\"text\": 5}\n").unwrap();
    fails(&[s(&not_string), "--out", &o], &out, "n.jsonl:1: field \"text\" is a number");

    let empty = t.join("empty.txt");
    fs::write(&empty, "").unwrap();
    fails(&[s(&good), s(&empty), "--out", &o], &out, "empty.txt: empty input");
    let blank = t.join("blank.jsonl");
    fs::write(&blank, "\n  \n").unwrap();
    fails(&[s(&good), s(&blank), "--out", &o], &out, "blank.jsonl: empty input (no JSON lines)");
    let empty_dir = t.join("emptydir");
    fs::create_dir(&empty_dir).unwrap();
    fails(&[s(&empty_dir), "--out", &o], &out, "emptydir: empty input");

    fails(&[s(&t.join("nope.txt")), "--out", &o], &out, "nope.txt: no such file or directory");
    let unreadable = t.join("secret.txt");
    fs::write(&unreadable, "text").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&unreadable, fs::Permissions::from_mode(0o000)).unwrap();
    if fs::File::open(&unreadable).is_err() {
        // Not root: permissions hold.
        fails(&[s(&unreadable), "--out", &o], &out, "secret.txt: Permission denied");
    }
    let corrupt = t.join("c.jsonl.zst");
    fs::write(&corrupt, b"this is not a zstd frame at all").unwrap();
    fails(&[s(&corrupt), "--out", &o], &out, "c.jsonl.zst: corrupt or truncated zstd stream");
    let long: String = (0..2000).map(|i| format!("{{\"text\": \"document {i}\"}}\n")).collect();
    let full = zstd::encode_all(long.as_bytes(), 3).unwrap();
    let truncated = t.join("t.jsonl.zst");
    fs::write(&truncated, &full[..full.len() / 2]).unwrap();
    fails(&[s(&truncated), "--out", &o], &out, "t.jsonl.zst: corrupt or truncated zstd stream");

    // Too few documents for a val split, and nonsense arguments.
    fails(&[s(&good), s(&good), "--out", &o, "--val-fraction", "0.01"], &out, "no documents fell in the val split");
    fails(&[s(&good), "--out", &o, "--val-fraction", "1.5"], &out, "--val-fraction 1.5 is not in [0, 1)");
}

#[test]
fn zero_val_fraction_writes_an_empty_val_split() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    fs::write(&input, "{\"text\": \"a\"}\n{\"text\": \"b c\"}\n").unwrap();
    let out = tmp.path().join("out");
    ok(&[s(&input), "--out", s(&out), "--val-fraction", "0"]);
    assert_eq!(fs::read(out.join("val.bin")).unwrap().len(), 0);
    assert_eq!(tokens(&out.join("train.bin"), 2), vec![64, EOT, 65, 269, EOT]);
}

/// `RUST_LOG=debug` reports the serial stages' CPU and the fixed phases, in the lines that
/// tools/bench_prepare.py reads to bound and explain the scaling; each hash reports the bytes it
/// saw, which must be the whole input and each whole output file.
#[test]
fn debug_log_reports_serial_stages_and_phases() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("docs.jsonl");
    let line = "{\"text\": \"Friends, Romans, countrymen, lend me your ears.\"}\n";
    fs::write(&input, line.repeat(2000)).unwrap();
    let out = tmp.path().join("out");
    let res = Command::new(env!("CARGO_BIN_EXE_prepare"))
        .args([s(&input), "--out", s(&out), "--threads", "2", "--chunk-bytes", "4096"])
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{err}");
    let has = |prefix: &str, inner: &str| err.lines().any(|l| l.contains(prefix) && l.contains(inner));
    assert!(has("serial stages: reader ", " s waiting for tokenizing), reordering "), "{err}");
    assert!(has("serial stages: ", "train.bin written with "), "{err}");
    assert!(has("phases: set-up ", ", finishing "), "{err}");
    let hashed: Vec<u64> = err
        .lines()
        .filter_map(|l| l.split("serial stages: sha256 of ").nth(1))
        .map(|rest| rest.split(' ').next().unwrap().parse().unwrap())
        .collect();
    let mut want = vec![
        fs::metadata(&input).unwrap().len(),
        fs::metadata(out.join("train.bin")).unwrap().len(),
        fs::metadata(out.join("val.bin")).unwrap().len(),
    ];
    let mut got = hashed.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want, "{err}");
}

// Hugging Face tokenizer.json files (`--tokenizer`), against the Python `tokenizers` library.
// Fixtures: tools/gen_hf_tokenizer_fixtures.py.

fn hf_dir() -> PathBuf {
    root().join("tests/fixtures/tokenizer/hf")
}

fn hf_expected() -> Value {
    serde_json::from_str(&fs::read_to_string(hf_dir().join("expected.json")).unwrap()).unwrap()
}

/// The choice the fixture's boundary needs: its own convention, except the word-level one
/// (neither byte-level nor with a BOS), which is told.
fn hf_choice(name: &str) -> BoundaryChoice {
    if name == "wide" {
        BoundaryChoice::Eos
    } else {
        BoundaryChoice::Auto
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn hf_token_ids_match_python_tokenizers() {
    let expected = hf_expected();
    for (name, fx) in expected["tokenizers"].as_object().unwrap() {
        let path = hf_dir().join(fx["file"].as_str().unwrap());
        let hf = HfTokenizer::open(&path).unwrap();
        let boundary = hf.boundary(hf_choice(name), None).unwrap();
        let tok = Tokenizer::hugging_face(hf, boundary);
        assert_eq!(tok.vocab_size() as u64, fx["vocab_size"].as_u64().unwrap(), "{name}");
        let b = tok.boundary();
        let side = if fx["boundary"] == "eos" { Side::After } else { Side::Before };
        assert_eq!(
            (b.side, b.id as u64, b.text.as_str()),
            (side, fx["boundary_id"].as_u64().unwrap(), fx["boundary_token"].as_str().unwrap()),
            "{name}"
        );
        let mut cuts = 0;
        for case in fx["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let whole = tok.encode_ordinary(text).unwrap();
            assert_eq!(whole, ids(&case["ids"]), "{name}: {text:?}");
            let mut end = text.len();
            while let Some(p) = tok.find_cut(&text[..end], 0) {
                let mut two = tok.encode_ordinary(&text[..p]).unwrap();
                two.extend(tok.encode_ordinary(&text[p..]).unwrap());
                assert_eq!(two, whole, "{name}: {text:?} cut at {p}");
                end = p;
                cuts += 1;
            }
        }
        // Llama 3's pattern over byte-level BPE is cut at spaces; the others are never cut.
        assert_eq!(cuts > 50, name == "llama3", "{name}: {cuts} cuts");
    }
}

#[test]
fn prepare_with_a_tokenizer_json_writes_pythons_token_stream() {
    let expected = hf_expected();
    let corpus: Vec<PathBuf> =
        expected["corpus"].as_array().unwrap().iter().map(|p| hf_dir().join(p.as_str().unwrap())).collect();
    let tmp = tempfile::tempdir().unwrap();
    // A model directory holding tokenizer.json is read as the file itself.
    let model = tmp.path().join("model");
    fs::create_dir(&model).unwrap();
    fs::copy(hf_dir().join("gemma.json"), model.join("tokenizer.json")).unwrap();
    for (name, fx) in expected["tokenizers"].as_object().unwrap() {
        let file = hf_dir().join(fx["file"].as_str().unwrap());
        let tokenizer = if name == "gemma" { model.clone() } else { file.clone() };
        let want = ids(&fx["stream"]);
        let wide = fx["vocab_size"].as_u64().unwrap() > 65536;
        let width = if wide { 4 } else { 2 };
        // Small chunks, so the long document is cut where the tokenizer allows it, on threads.
        for (threads, chunk) in [("1", "65536"), ("3", "300")] {
            let out = tmp.path().join(format!("{name}-{threads}"));
            let mut args = vec![s(&corpus[0]), s(&corpus[1]), "--out", s(&out), "--tokenizer", s(&tokenizer)];
            args.extend(["--val-fraction", "0", "--threads", threads, "--chunk-bytes", chunk]);
            if name == "wide" {
                args.extend(["--boundary", "eos"]);
            }
            ok(&args);
            assert_eq!(tokens(&out.join("train.bin"), width), want, "{name} with {threads} thread(s)");
            assert_eq!(fs::metadata(out.join("val.bin")).unwrap().len(), 0);
            let m = meta(&out);
            assert_eq!(m["dtype"], if wide { "uint32" } else { "uint16" }, "{name}");
            assert_eq!(m["encoding"], "tokenizer.json");
            assert_eq!(m["vocab_size"], fx["vocab_size"]);
            assert_eq!(m["boundary"]["token"], fx["boundary_id"]);
            assert_eq!(m["boundary"]["text"], fx["boundary_token"]);
            assert_eq!(m["boundary"]["side"], if fx["boundary"] == "eos" { "after" } else { "before" });
            assert_eq!(m["eot_token"], if fx["boundary"] == "eos" { fx["boundary_id"].clone() } else { Value::Null });
            assert_eq!(m["tokenizer"]["sha256"], zerokit::fsutil::sha256_file(&file).unwrap());
            assert_eq!(m["splits"]["train"]["documents"], 1 + fs::read_to_string(&corpus[1]).unwrap().lines().count());
            // What train reads: the dtype from meta.json, every id below the vocabulary.
            let ds =
                zerokit::data::TokenDataset::open(&out, "train", fx["vocab_size"].as_u64().unwrap() as usize).unwrap();
            assert_eq!(ds.len(), want.len());
        }
    }
}

#[test]
fn bad_tokenizer_json_fails_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let out = t.join("out");
    let o = s(&out).to_string();
    let good = t.join("good.txt");
    fs::write(&good, "A good document with some words in it.").unwrap();
    let g = s(&good).to_string();
    let run = |tokenizer: &Path, extra: &[&str], needle: &str| {
        let mut args = vec![g.as_str(), "--out", o.as_str(), "--tokenizer", s(tokenizer)];
        args.extend(extra);
        fails(&args, &out, needle)
    };

    let not_json = t.join("broken.json");
    fs::write(&not_json, "{\"version\": \"1.0\", \"model\": ").unwrap();
    let e = run(&not_json, &[], "not a tokenizer.json (invalid JSON");
    assert!(e.contains("broken.json"), "{e}");
    let not_tokenizer = t.join("config.json");
    fs::write(&not_tokenizer, r#"{"model_type": "llama", "hidden_size": 64}"#).unwrap();
    let e = run(&not_tokenizer, &[], "not a tokenizer.json the tokenizers library reads");
    assert!(e.contains("config.json"), "{e}");
    let empty_dir = t.join("model");
    fs::create_dir(&empty_dir).unwrap();
    run(&empty_dir, &[], "model/tokenizer.json: no such file or directory");
    run(&t.join("missing.json"), &[], "missing.json: no such file or directory");
    // The word-level fixture has neither a byte-level pre-tokenizer nor a BOS.
    let wide = hf_dir().join("wide.json");
    let e = run(&wide, &[], "no special token among <bos>, <s>, <|begin_of_text|>");
    assert!(e.contains("wide.json") && e.contains("--boundary-token"), "{e}");
    run(&wide, &["--boundary-token", "<nope>"], "the boundary token \"<nope>\" is not in the vocabulary");
    // A word-level vocabulary without the unknown token cannot encode an unseen word.
    let mut spec: Value = serde_json::from_str(&fs::read_to_string(&wide).unwrap()).unwrap();
    spec["model"]["vocab"].as_object_mut().unwrap().remove("<unk>");
    let no_unk = t.join("no_unk.json");
    fs::write(&no_unk, spec.to_string()).unwrap();
    let e = run(&no_unk, &["--boundary", "eos"], "no_unk.json");
    assert!(e.contains("tokenizer"), "{e}");
}

/// `train sample` encodes prompts and decodes text with the model directory's tokenizer.json, or
/// the one `prepare` recorded in the run's meta.json (refused once changed), else GPT-2's BPE.
#[test]
fn sampling_uses_the_recorded_tokenizer_json() {
    use zerokit::train::sample::Codec;
    let expected = hf_expected();
    let fx = &expected["tokenizers"]["llama3"];
    let bos = 1200; // <|begin_of_text|>, added just before <|end_of_text|>
    assert_eq!(fx["boundary_id"], bos + 1);
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    fs::create_dir(&model).unwrap();
    fs::copy(hf_dir().join("llama3.json"), model.join("tokenizer.json")).unwrap();
    let check = |codec: &Codec| {
        for case in fx["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let mut want = vec![bos];
            want.extend(ids(&case["ids"]));
            assert_eq!(codec.prompt(text).unwrap(), want, "{text:?}");
            // The text back, without the BOS.
            assert_eq!(codec.decode(&want).unwrap(), text);
        }
        assert_eq!(codec.vocab_size(), 1202);
    };
    check(&Codec::for_model(Some(&model), None).unwrap());

    // From the run's dataset: prepare records the file; a changed file is refused.
    let out = tmp.path().join("data");
    let corpus = hf_dir().join("corpus/b.jsonl");
    ok(&[s(&corpus), "--out", s(&out), "--tokenizer", s(&model.join("tokenizer.json")), "--val-fraction", "0"]);
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    check(&Codec::for_model(Some(&empty), Some(&out)).unwrap());
    let mut changed = fs::read_to_string(model.join("tokenizer.json")).unwrap();
    changed.push('\n');
    fs::write(model.join("tokenizer.json"), changed).unwrap();
    let err = Codec::for_model(Some(&empty), Some(&out)).err().unwrap().to_string();
    assert!(err.contains("tokenizer.json: not the tokenizer.json the run's data was prepared with"), "{err}");

    // Without either, GPT-2's BPE, an empty prompt starting from <|endoftext|>.
    let gpt2 = Codec::for_model(Some(&empty), Some(&empty)).unwrap();
    assert!(matches!(gpt2, Codec::Gpt2(_)));
    assert_eq!(gpt2.prompt("").unwrap(), [EOT]);
}
