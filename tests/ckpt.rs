//! `ckpt inspect` and `ckpt verify`, through the real binaries.
//!
//! One tiny model is trained once per test binary (2 CPU ranks, ZeRO-2, fp16 so the checkpoint
//! has a loss scaler and a model dtype other than the master's); each test corrupts its own
//! copy and checks that verify names the file and the fault, with exit status 1 (0 intact,
//! 2 unreadable). Expectations come from the checkpoint format's definition (docs/
//! checkpoint-format.md), read here with serde_json and the safetensors crate, not from the
//! code under test. DeepSpeed cases use the real DeepSpeed checkpoints in tests/fixtures.

mod common;
#[path = "common/torch_zip.rs"]
mod torch_zip;

use common::tiny::copy_dir;
use common::{rehash, swap_files};
use safetensors::SafeTensors;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use zerokit::ckpt::inspect::{inspect, Inspection, SCHEMA};

const VOCAB: u16 = 96;
const TAGS: [&str; 2] = ["step_00000002", "step_00000004"];

/// The trained checkpoint root (out/ of a 4-step run saving at steps 2 and 4), without the
/// run's `final` tag.
fn trained() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ckpt-test");
        let _ = std::fs::remove_dir_all(&base);
        let dir = base.join(std::process::id().to_string());
        let data = dir.join("data");
        common::random_tokens(&data, VOCAB, &[("train", 20000, 7), ("val", 4000, 11)]);
        // Saves at steps 2 and 4, in fp16 (a loss scaler, a model dtype other than the master's).
        let extra = "max_iters = 4\neval_interval = 2\neval_iters = 1\ndtype = \"fp16\"\nbatch_size = 2\n\
                     zero_stage = 2\nalways_save_checkpoint = true";
        let run = common::tiny::train(&dir, &data, 2, extra, &[]);
        assert!(run.ok, "training failed: {}", run.stderr);
        let out = run.out;
        for t in TAGS {
            assert!(out.join(t).join("manifest.json").is_file(), "no tag {t}");
        }
        // The run ended with the tag `final` (a copy of step 4, tests/run_checks.rs checks it);
        // the cases here are about step tags and `latest` naming the newest of them.
        assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap(), "final\n");
        std::fs::remove_dir_all(out.join("final")).unwrap();
        std::fs::write(out.join("latest"), format!("{}\n", TAGS[1])).unwrap();
        out
    })
}

/// A private copy of the trained root.
fn copy() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("out");
    copy_dir(trained(), &root);
    (t, root)
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn ckpt(args: &[&str]) -> Out {
    let o = Command::new(env!("CARGO_BIN_EXE_ckpt")).args(args).output().unwrap();
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn verify(path: &Path, extra: &[&str]) -> Out {
    let p = path.to_str().unwrap();
    let mut args = vec!["verify", p];
    args.extend_from_slice(extra);
    ckpt(&args)
}

/// Rewrites a safetensors header in place (same length, space-padded as the format allows).
fn edit_header(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let mut head: Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    f(&mut head);
    let mut text = serde_json::to_vec(&head).unwrap();
    assert!(text.len() <= n, "the edited header is longer than the original");
    text.resize(n, b' ');
    b[8..8 + n].copy_from_slice(&text);
    std::fs::write(path, b).unwrap();
}

/// Absolute byte range of a tensor's data, by the safetensors crate.
fn span(path: &Path, tensor: &str) -> (usize, usize) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let d = st.tensor(tensor).unwrap().data();
    let start = d.as_ptr() as usize - bytes.as_ptr() as usize;
    (start, start + d.len())
}

fn write_f32(path: &Path, tensor: &str, element: usize, x: f32) {
    let (start, _) = span(path, tensor);
    let mut b = std::fs::read(path).unwrap();
    b[start + 4 * element..start + 4 * element + 4].copy_from_slice(&x.to_le_bytes());
    std::fs::write(path, b).unwrap();
}

/// Where element `k` of parameter `name` lies, by the format's definition: bucket position
/// o + k belongs to rank (o + k) / shard, at shard_offset + (o + k) mod shard.
fn partition_position(m: &Value, name: &str, k: usize) -> (usize, usize) {
    let l = &m["layout"];
    let p = l["params"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap();
    let b = &l["buckets"][p["bucket"].as_u64().unwrap() as usize];
    let q = p["offset"].as_u64().unwrap() as usize + k;
    let shard = b["shard"].as_u64().unwrap() as usize;
    (q / shard, b["shard_offset"].as_u64().unwrap() as usize + q % shard)
}

fn assert_reports(out: &Out, root: &Path, expected: &[&str], what: &str) {
    assert_eq!(out.code, 1, "{what}: exit status; stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    for e in expected {
        assert!(out.stdout.lines().any(|l| l.contains(e)), "{what}: no line contains {e:?}; stdout:\n{}", out.stdout);
    }
    for l in out.stdout.lines() {
        assert!(
            l.starts_with(root.to_str().unwrap()),
            "{what}: a problem line that names no file of the checkpoint: {l}"
        );
    }
}

#[test]
fn an_intact_checkpoint_verifies_at_every_level() {
    let root = trained();
    let tag = root.join(TAGS[1]);
    for (path, extra) in [
        (root.to_path_buf(), &[][..]),
        (root.to_path_buf(), &["--scan"][..]),
        (root.to_path_buf(), &["--tag", TAGS[0]][..]),
        (tag.clone(), &["--scan"][..]),
        (tag.join("model.safetensors"), &["--scan"][..]),
        (tag.join("rank_00001.safetensors"), &[][..]),
    ] {
        let out = verify(&path, extra);
        assert_eq!(out.code, 0, "{} {extra:?}: {}\n{}", path.display(), out.stdout, out.stderr);
        assert!(out.stdout.is_empty(), "{}", out.stdout);
        assert!(out.stderr.contains("intact"), "{}", out.stderr);
    }
    // Unreadable: exit status 2, nothing on stdout.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("notes.txt"), "hello").unwrap();
    for (path, extra, msg) in [
        (tmp.path().join("nope"), &[][..], "no such file or directory"),
        (tmp.path().to_path_buf(), &[][..], "not a checkpoint ckpt can read"),
        (tmp.path().join("notes.txt"), &[][..], "not a checkpoint ckpt can read"),
        (
            root.to_path_buf(),
            &["--tag", "step_00000003"][..],
            "no tag \"step_00000003\" here (tags: step_00000002, step_00000004)",
        ),
    ] {
        let out = verify(&path, extra);
        assert_eq!(out.code, 2, "{}: {}", path.display(), out.stderr);
        assert!(out.stdout.is_empty() && out.stderr.contains(msg), "{}", out.stderr);
    }
}

#[test]
fn verify_names_each_corruption() {
    let t4 = |root: &Path| root.join(TAGS[1]);
    type Corrupt = fn(&Path);
    let cases: Vec<(&str, Corrupt, Vec<String>)> = vec![
        (
            "one byte flipped",
            |root| {
                let p = root.join(TAGS[1]).join("rank_00001.safetensors");
                let (s, e) = span(&p, "exp_avg");
                let mut b = std::fs::read(&p).unwrap();
                b[(s + e) / 2] ^= 0x10;
                std::fs::write(&p, b).unwrap();
            },
            vec!["step_00000004/rank_00001.safetensors: sha256 ".into(), "does not match manifest.json".into()],
        ),
        (
            "truncated rank file",
            |root| {
                let p = root.join(TAGS[1]).join("rank_00000.safetensors");
                let n = std::fs::metadata(&p).unwrap().len();
                std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(n - 1000).unwrap();
            },
            vec![
                "step_00000004/rank_00000.safetensors: size 174440 bytes, manifest.json says 175440".into(),
                "step_00000004/rank_00000.safetensors: tensor exp_avg_sq ends at byte 175104 of the data region, but the file holds only 174104 data bytes (truncated?)".into(),
            ],
        ),
        (
            "rank file deleted",
            |root| std::fs::remove_file(root.join(TAGS[1]).join("rank_00001.safetensors")).unwrap(),
            vec!["step_00000004/rank_00001.safetensors: missing (listed in manifest.json)".into()],
        ),
        (
            "manifest world_size edited",
            |root| common::edit_manifest(&root.join(TAGS[1]), |m| m["world_size"] = json!(3)),
            vec!["step_00000004/manifest.json: layout has 2 partitions, but world_size 3 at ZeRO stage 2 needs 3".into()],
        ),
        (
            "manifest parameter shape edited",
            |root| {
                common::edit_manifest(&root.join(TAGS[1]), |m| {
                    let p = m["layout"]["params"].as_array_mut().unwrap().iter_mut().find(|p| p["name"] == "transformer.wte.weight").unwrap();
                    p["shape"] = json!([95, 32]);
                })
            },
            // The layout is checked as the manifest is read, before anything else uses it.
            vec![
                "step_00000004/manifest.json: layout: transformer.wte.weight: shape [95, 32] has 3040 elements, numel says 3072".into(),
            ],
        ),
        (
            "manifest padding edited",
            |root| common::edit_manifest(&root.join(TAGS[1]), |m| m["layout"]["buckets"][0]["padded"] = json!(13312)),
            vec!["step_00000004/manifest.json: layout: bucket 0: padded to 13312 elements, but 12768 elements rounded up to a multiple of 2 ranks x 128 is 12800: padding not as declared".into()],
        ),
        (
            "manifest not JSON",
            |root| {
                let p = root.join(TAGS[1]).join("manifest.json");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            },
            vec!["step_00000004/manifest.json: not a valid manifest: EOF while parsing".into()],
        ),
        (
            "latest names a missing tag",
            |root| std::fs::write(root.join("latest"), "step_00000099\n").unwrap(),
            vec!["out/latest: names tag \"step_00000099\", which does not exist".into()],
        ),
        (
            "latest removed",
            |root| std::fs::remove_file(root.join("latest")).unwrap(),
            vec!["out/latest: missing: nothing names the newest complete tag".into()],
        ),
        (
            "older tag lost its manifest",
            |root| std::fs::remove_file(root.join(TAGS[0]).join("manifest.json")).unwrap(),
            vec!["step_00000002/manifest.json: missing: the tag is incomplete".into()],
        ),
        (
            "a stray rank file",
            |root| {
                let t = root.join(TAGS[1]);
                std::fs::copy(t.join("rank_00001.safetensors"), t.join("rank_00002.safetensors")).unwrap();
            },
            vec!["step_00000004/rank_00002.safetensors: a rank file beyond the layout's 2 partitions".into()],
        ),
        (
            "rank files swapped",
            |root| swap_files(&root.join(TAGS[1]), "rank_00000.safetensors", "rank_00001.safetensors"),
            vec!["step_00000004/rank_00000.safetensors: metadata says rank \"1\", the file name says 0".into()],
        ),
        (
            "a rank file copied from another tag of the run",
            |root| {
                let t = root.join(TAGS[1]);
                std::fs::copy(root.join(TAGS[0]).join("rank_00001.safetensors"), t.join("rank_00001.safetensors")).unwrap();
                rehash(&t, "rank_00001.safetensors");
            },
            vec!["step_00000004/rank_00001.safetensors: metadata says step \"2\", manifest.json says 4".into()],
        ),
        (
            "the model file of another tag",
            |root| {
                let t = root.join(TAGS[1]);
                std::fs::copy(root.join(TAGS[0]).join("model.safetensors"), t.join("model.safetensors")).unwrap();
                rehash(&t, "model.safetensors");
            },
            vec!["step_00000004/model.safetensors: metadata says step \"2\", manifest.json says 4".into()],
        ),
        (
            "data in padding",
            |root| {
                let t = root.join(TAGS[1]);
                let m = common::manifest(&t);
                let b = &m["layout"]["buckets"][0];
                // The first padding element of bucket 0, by the format's definition.
                let q = b["numel"].as_u64().unwrap() as usize;
                let shard = b["shard"].as_u64().unwrap() as usize;
                let (rank, pos) = (q / shard, b["shard_offset"].as_u64().unwrap() as usize + q % shard);
                assert_eq!(rank, 1);
                write_f32(&t.join("rank_00001.safetensors"), "exp_avg", pos, 0.5);
                rehash(&t, "rank_00001.safetensors");
            },
            vec!["step_00000004/rank_00001.safetensors: exp_avg holds 1 non-zero value(s) in padding, where no parameter lies (first at partition element 6368)".into()],
        ),
        (
            "model file header: wrong dtype",
            |root| {
                let t = root.join(TAGS[1]);
                edit_header(&t.join("model.safetensors"), |h| h["transformer.wpe.weight"]["dtype"] = json!("I16"));
                rehash(&t, "model.safetensors");
            },
            vec!["step_00000004/model.safetensors: transformer.wpe.weight is I16, manifest.json's model dtype is F16".into()],
        ),
        (
            "model file header: overlapping offsets",
            |root| {
                let t = root.join(TAGS[1]);
                edit_header(&t.join("model.safetensors"), |h| {
                    let offs = h["transformer.wpe.weight"]["data_offsets"].clone();
                    let (s, e) = (offs[0].as_u64().unwrap(), offs[1].as_u64().unwrap());
                    assert!(s >= 1024);
                    h["transformer.wpe.weight"]["data_offsets"] = json!([s - 1024, e - 1024]);
                });
                rehash(&t, "model.safetensors");
            },
            vec!["step_00000004/model.safetensors: tensor transformer.wpe.weight (bytes ".into(), "overlaps tensor".into(), "belong to no tensor".into()],
        ),
    ];
    for (what, corrupt, expected) in cases {
        let (_t, root) = copy();
        corrupt(&root);
        let out = verify(&root, &[]);
        let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
        assert_reports(&out, &root, &expected, what);
    }
    // The manifest-hash case names the real hash: check it in full.
    let (_t, root) = copy();
    let real = zerokit::fsutil::sha256_file(&t4(&root).join("config.json")).unwrap();
    common::edit_manifest(&t4(&root), |m| m["files"]["config.json"]["sha256"] = json!("00".repeat(32)));
    let want = format!("step_00000004/config.json: sha256 {real} does not match manifest.json ({})", "00".repeat(32));
    assert_reports(&verify(&root, &[]), &root, &[&want], "manifest hash edited");
    // --tag checks that tag only: the damage in the other one is not reported.
    let (_t, root) = copy();
    std::fs::remove_file(root.join(TAGS[0]).join("rank_00000.safetensors")).unwrap();
    assert_eq!(verify(&root, &["--tag", TAGS[1]]).code, 0);
    assert_reports(&verify(&root, &[]), &root, &["step_00000002/rank_00000.safetensors: missing"], "other tag");
}

/// What a crash leaves (lib/checkpoint.rs `Leftover`, and a first save stopped before `latest`)
/// is harmless: verify notes it on stderr and passes; with two tags a missing `latest` is damage.
#[test]
fn crash_leftovers_are_noted_not_reported() {
    let (_t, root) = copy();
    copy_dir(&root.join(TAGS[0]), &root.join(".step_00000002.deleting"));
    std::fs::remove_file(root.join(".step_00000002.deleting/manifest.json")).unwrap();
    std::fs::create_dir(root.join(".step_00000006.partial")).unwrap();
    copy_dir(&root.join(TAGS[0]), &root.join(".step_00000004.replaced"));
    let out = verify(&root, &[]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    for want in [
        ".step_00000002.deleting: a tag that was being removed when a run stopped (harmless",
        ".step_00000006.partial: an interrupted save (harmless",
        ".step_00000004.replaced: a tag that a re-save of its step was replacing",
    ] {
        assert!(out.stderr.contains(want), "{want:?} not in\n{}", out.stderr);
    }

    // One complete tag and no `latest`: the first save stopped between its two renames.
    let (_t, root) = copy();
    std::fs::remove_dir_all(root.join(TAGS[1])).unwrap();
    std::fs::remove_file(root.join("latest")).unwrap();
    let out = verify(&root, &[]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("latest: missing; the first save stopped before writing it"), "{}", out.stderr);
}

/// A manifest whose layout or run shape is out of range (parameter or bucket indices, stage,
/// world size, offsets) is refused as the manifest is read, naming it: zero-to-fp32, the reader
/// of rank files that resume uses, and verify. Indices out of range used to panic (exit 101).
#[test]
fn a_manifest_out_of_range_is_refused_where_it_is_read() {
    type Edit = fn(&mut Value);
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "bucket lists a parameter that does not exist",
            |m| m["layout"]["buckets"][0]["params"].as_array_mut().unwrap().push(json!(10_000)),
            "layout: bucket 0 lists parameter 10000, but there are 28",
        ),
        (
            "parameter in a bucket that does not exist",
            |m| m["layout"]["params"][3]["bucket"] = json!(99),
            "bucket 99 does not exist",
        ),
        ("stage 4", |m| m["zero_stage"] = json!(4), "zero_stage 4 is not one zerokit trains with (0, 1, 2, 3)"),
        ("world size 0", |m| m["world_size"] = json!(0), "world_size is 0"),
        (
            "a parameter past its bucket",
            |m| m["layout"]["params"][0]["offset"] = json!(1u64 << 40),
            "belong to no parameter",
        ),
        (
            "shard offsets not the running sum",
            |m| m["layout"]["buckets"][1]["shard_offset"] = json!(7),
            "layout: bucket 1: shard_offset 7, but the shards before it end at",
        ),
    ];
    for (what, edit, want) in cases {
        let (_t, root) = copy();
        let tag = root.join(TAGS[1]);
        common::edit_manifest(&tag, edit);
        let o = Command::new(env!("CARGO_BIN_EXE_zero-to-fp32")).arg(&root).arg(root.join("hf")).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{what}: zero-to-fp32 exit status; stderr:\n{err}");
        assert!(err.contains("step_00000004/manifest.json: ") && err.contains(want), "{what}: {err}");
        let e = zerokit::checkpoint::PartitionReader::open(&tag).err().unwrap_or_else(|| panic!("{what}: opened"));
        assert!(e.to_string().contains(want), "{what}: {e}");
        let out = verify(&root, &[]);
        assert_reports(&out, &root, &["step_00000004/manifest.json: "], what);
        assert!(out.stdout.contains(want), "{what}: {}", out.stdout);
    }
}

#[test]
fn scan_finds_bad_values_that_hashes_cannot() {
    let name = "transformer.h.0.attn.c_attn.weight";
    let k = 77;
    // NaN in a master weight (the manifest re-hashed, as a buggy writer would have): only --scan sees it.
    let (_t, root) = copy();
    let t = root.join(TAGS[1]);
    let (rank, pos) = partition_position(&common::manifest(&t), name, k);
    let file = format!("rank_{rank:05}.safetensors");
    write_f32(&t.join(&file), "master", pos, f32::NAN);
    rehash(&t, &file);
    assert_eq!(verify(&root, &[]).code, 0, "without --scan the values are not read");
    let out = verify(&root, &["--scan"]);
    assert_reports(
        &out,
        &root,
        &[
            &format!("step_00000004/{file}: master holds 1 non-finite value(s) (first: NaN at partition element {pos}, {name} element {k})"),
            &format!("step_00000004/model.safetensors: {name} differs from the fp32 master weights in the rank files at 1 element(s) (first: element {k} is "),
        ],
        "NaN in master",
    );

    // A negative second moment.
    let (_t, root) = copy();
    let t = root.join(TAGS[1]);
    let (rank, pos) = partition_position(&common::manifest(&t), name, k);
    let file = format!("rank_{rank:05}.safetensors");
    write_f32(&t.join(&file), "exp_avg_sq", pos, -1.0);
    rehash(&t, &file);
    assert_reports(
        &verify(&root, &["--scan"]),
        &root,
        &[&format!("{file}: exp_avg_sq holds 1 negative value(s), impossible for a second moment (first: -1 at partition element {pos}, {name} element {k})")],
        "negative exp_avg_sq",
    );

    // A model weight that is not its master rounded to fp16.
    let (_t, root) = copy();
    let t = root.join(TAGS[1]);
    let p = t.join("model.safetensors");
    let (s, _) = span(&p, name);
    let mut b = std::fs::read(&p).unwrap();
    b[s + 2 * k..s + 2 * k + 2].copy_from_slice(&half::f16::from_f32(1.5).to_le_bytes());
    std::fs::write(&p, b).unwrap();
    rehash(&t, "model.safetensors");
    assert_eq!(verify(&root, &[]).code, 0);
    assert_reports(
        &verify(&root, &["--scan"]),
        &root,
        &[&format!("model.safetensors: {name} differs from the fp32 master weights in the rank files at 1 element(s) (first: element {k} is 1.5 here, ")],
        "model differs",
    );
}

fn json_of(path: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["inspect", path.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let out = ckpt(&args);
    assert_eq!(out.code, 0, "{}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap()
}

#[test]
fn inspect_reports_what_the_checkpoint_holds() {
    let root = trained();
    let m = common::manifest(&root.join(TAGS[1]));
    let i: Inspection = inspect(root, None, true).unwrap();
    assert_eq!(i.schema, SCHEMA);
    assert_eq!(i.tags, TAGS);
    assert_eq!(i.latest.as_deref(), Some(TAGS[1]));
    assert_eq!(i.tag.as_deref(), Some(TAGS[1]));
    assert_eq!(i.step, Some(4));
    assert_eq!(i.tokens_seen, m["tokens_seen"].as_u64());
    assert_eq!((i.world_size, i.zero_stage, i.partitions), (Some(2), Some(2), Some(2)));
    assert_eq!(i.dtypes["model"], "F16");
    assert_eq!(i.model_config.as_ref(), Some(&m["model_config"]));
    // GPT-2 with n_layer 2, n_embd 32, block 16, vocab 96: 12 C^2 + 13 C per block, (V + T) C + 2 C.
    let c = 32u64;
    assert_eq!(i.parameters, 2 * (12 * c * c + 13 * c) + (96 + 16) * c + 2 * c);
    assert_eq!(i.learning_rate, m["optimizer"]["lr"].as_f64());
    assert_eq!(i.loss_scale, Some(65536.0));
    let names: Vec<&str> = i.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        ["config.json", "manifest.json", "model.safetensors", "rank_00000.safetensors", "rank_00001.safetensors"]
    );
    for f in &i.files {
        assert_eq!(f.bytes, std::fs::metadata(root.join(TAGS[1]).join(&f.name)).unwrap().len());
    }
    // Every parameter: its shape and dtype in model.safetensors, and its pieces where the
    // format's formula puts them.
    let model = std::fs::read(root.join(TAGS[1]).join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&model).unwrap();
    let rows = i.tensors.as_ref().unwrap();
    assert_eq!(rows.len(), st.len());
    for row in rows {
        let v = st.tensor(&row.name).unwrap();
        assert_eq!(row.shape, v.shape().iter().map(|&d| d as u64).collect::<Vec<_>>());
        assert_eq!((row.dtype.as_str(), row.bytes), ("F16", v.data().len() as u64));
        let numel: u64 = row.shape.iter().product();
        let mut next = 0;
        for pc in row.partitions.as_ref().unwrap() {
            assert_eq!(pc.param_offset, next, "{}: pieces in element order", row.name);
            for k in [pc.param_offset, pc.param_offset + pc.len - 1] {
                let (rank, pos) = partition_position(&m, &row.name, k);
                assert_eq!(
                    (pc.rank, pc.partition_offset + k - pc.param_offset),
                    (rank, pos),
                    "{} element {k}",
                    row.name
                );
            }
            next += pc.len;
        }
        assert_eq!(next as u64, numel, "{}: the pieces cover the parameter", row.name);
    }

    // The JSON form is the same record; --tag picks another tag.
    let j = json_of(root, &["--tensors"]);
    assert_eq!(j, serde_json::to_value(&i).unwrap());
    for key in [
        "schema",
        "path",
        "format",
        "format_version",
        "tags",
        "latest",
        "tag",
        "step",
        "tokens_seen",
        "samples_seen",
        "world_size",
        "zero_stage",
        "partitions",
        "dtypes",
        "model_config",
        "parameters",
        "learning_rate",
        "loss_scale",
        "files",
        "tensors",
    ] {
        assert!(j.get(key).is_some(), "JSON lacks {key}");
    }
    assert_eq!(j["format"], "zerokit");
    let j2 = json_of(root, &["--tag", TAGS[0]]);
    assert_eq!((j2["tag"].as_str(), j2["step"].as_u64(), &j2["tensors"]), (Some(TAGS[0]), Some(2), &Value::Null));

    let text = ckpt(&["inspect", root.to_str().unwrap()]).stdout;
    for want in [
        "zerokit checkpoint (format version 1)",
        "tags          step_00000002, step_00000004 (latest)",
        "ZeRO stage    2 (2 partitions)",
        "dtypes        model F16, master F32, optimizer F32",
        "model         n_layer 2, n_head 2, n_embd 32, block_size 16, vocab_size 96",
        "loss scale    65536",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
}

fn deepspeed_cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deepspeed");
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.join("latest").exists()).collect();
    v.sort();
    assert!(v.len() >= 6);
    v
}

#[test]
fn deepspeed_checkpoints_verify_and_inspect() {
    for case in deepspeed_cases() {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        // Case names say how DeepSpeed saved them: s{stage}_{dtype}_w{world}.
        let parts: Vec<&str> = name.split('_').collect();
        let stage: u8 = parts[0][1..].parse().unwrap();
        let world: usize = parts[2][1..].parse().unwrap();
        let dtype = if parts[1] == "bf16" { "BF16" } else { "F16" };
        let out = verify(&case, &["--scan"]);
        assert_eq!(out.code, 0, "{name}: {}{}", out.stdout, out.stderr);

        let i = inspect(&case, None, true).unwrap();
        assert_eq!(i.latest.as_deref(), Some("global_step3"), "{name}");
        assert_eq!((i.zero_stage, i.world_size, i.step), (Some(stage), Some(world), Some(3)), "{name}");
        assert_eq!(i.dtypes["model"], dtype, "{name}");
        assert_eq!(i.format_version.as_deref(), Some("0.19.8"));
        // DeepSpeed's own consolidation lists every tensor: parameters exclude its buffers
        // (zk_*) and the tied lm_head.
        let reference = std::fs::read(case.join("reference.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&reference).unwrap();
        let want: u64 = st
            .tensors()
            .iter()
            .filter(|(n, _)| !n.starts_with("zk_") && n != "lm_head.weight")
            .map(|(_, t)| t.shape().iter().product::<usize>() as u64)
            .sum();
        assert_eq!(i.parameters, want, "{name}");
        let rows = i.tensors.unwrap();
        assert_eq!(rows.len(), st.len(), "{name}");
        for r in rows {
            assert_eq!(r.shape, st.tensor(&r.name).unwrap().shape().iter().map(|&d| d as u64).collect::<Vec<_>>());
        }
        assert_eq!(i.learning_rate, Some(0.01), "{name}");
        if dtype == "F16" {
            assert_eq!(i.loss_scale, Some(16.0), "{name}: initial_scale_power 4, no overflow in 3 steps");
        }
    }
}

#[test]
fn deepspeed_damage_is_named() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deepspeed/s2_bf16_w2");
    let fresh = || {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("ds");
        copy_dir(&src, &root);
        (t, root)
    };
    let tag = |root: &Path| root.join("global_step3");

    let (_t, root) = fresh();
    std::fs::remove_file(tag(&root).join("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")).unwrap();
    assert_reports(
        &verify(&root, &[]),
        &root,
        &[
            "global_step3: missing rank file",
            "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt (the checkpoint was saved by 2 ranks)",
        ],
        "missing rank",
    );

    // A flipped byte inside the fp32 partition's storage: the zip's CRC-32 catches it.
    let (_t, root) = fresh();
    let f = tag(&root).join("bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt");
    let tf = zerokit::formats::torch_zip::TorchFile::open(&f).unwrap();
    let part = common::deepspeed_fp32_partition(&tf).clone();
    let (start, len) = tf.tensor_span(&part).unwrap();
    drop(tf);
    let mut b = std::fs::read(&f).unwrap();
    b[(start + len / 2) as usize] ^= 1;
    std::fs::write(&f, b).unwrap();
    assert_reports(
        &verify(&root, &[]),
        &root,
        &[
            &format!(
                "global_step3/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt: storage {} is corrupted: CRC-32",
                part.storage_key
            ),
            "(holding optimizer_state_dict.single_partition_of_fp32_groups.0)",
        ],
        "flipped byte",
    );

    // A flipped byte inside data.pkl that leaves a valid pickle, naming a parameter otherwise
    // (its last occurrence, in param_shapes): only the CRC-32 of the zip entry shows it.
    let (_t, root) = fresh();
    let f = tag(&root).join("mp_rank_00_model_states.pt");
    let mut b = std::fs::read(&f).unwrap();
    let e = torch_zip::find(&b, "/data.pkl").unwrap();
    let name = b"transformer.h.0.attn.c_attn.weight";
    let at = e.data + b[e.data..e.data + e.size].windows(name.len()).rposition(|w| w == name).unwrap();
    b[at + name.len() - 1] ^= 1;
    std::fs::write(&f, b).unwrap();
    for extra in [&[][..], &["--scan"][..]] {
        assert_reports(
            &verify(&root, extra),
            &root,
            &["global_step3/mp_rank_00_model_states.pt: zip entry mp_rank_00_model_states/data.pkl is corrupted: CRC-32"],
            "flipped byte in data.pkl",
        );
    }

    // A rank file from a run on more ranks.
    let (_t, root) = fresh();
    let other = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/deepspeed/s2_bf16_w4/global_step3/bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt");
    std::fs::copy(other, tag(&root).join("bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt")).unwrap();
    assert_reports(
        &verify(&root, &[]),
        &root,
        &["bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt: rank 3 is beyond the world size 2"],
        "extra rank",
    );

    let (_t, root) = fresh();
    std::fs::write(root.join("latest"), "global_step9").unwrap();
    assert_reports(
        &verify(&root, &[]),
        &root,
        &["ds/latest: names tag \"global_step9\", which does not exist"],
        "latest",
    );
}

#[test]
fn safetensors_files_and_model_directories() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2/model");
    let out = verify(&model, &["--scan"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let j = json_of(&model, &["--tensors"]);
    assert_eq!(j["format"], "hugging_face");
    let bytes = std::fs::read(model.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let total: u64 = st.tensors().iter().map(|(_, t)| t.shape().iter().product::<usize>() as u64).sum();
    assert_eq!(j["parameters"].as_u64(), Some(total));
    assert_eq!(j["tensors"].as_array().unwrap().len(), st.len());
    let cfg: Value = serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    for k in ["n_layer", "n_head", "n_embd", "vocab_size"] {
        assert_eq!(j["model_config"][k], cfg[k], "{k}");
    }
    assert_eq!(j["model_config"]["block_size"], cfg["n_positions"]);

    // A truncated copy of a plain safetensors file.
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("batch.safetensors");
    let b = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2/batch.safetensors")).unwrap();
    std::fs::write(&f, &b[..b.len() - 4]).unwrap();
    let out = verify(&f, &[]);
    assert_reports(
        &out,
        tmp.path(),
        &["batch.safetensors: tensor ", "but the file holds only", "(truncated?)"],
        "truncated safetensors",
    );
    let out = ckpt(&["inspect", f.to_str().unwrap()]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("(truncated?)"), "{}", out.stderr);
}
