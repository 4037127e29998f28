//! zero-to-fp32 on zerokit's own checkpoints, made by the real `train` binary on CPU ranks
//! (tiny GPT-2, a few steps) at ZeRO stages 0, 1, 2 on 1, 2 and 3 ranks, fp32 and bf16.
//!
//! The reference for the output is the fp32 master assembled here straight from the rank files
//! with the format's own arithmetic (docs/checkpoint-format.md), independently of
//! PartitionReader; in an fp32 run the checkpoint's model.safetensors must equal it too, and in a
//! bf16 run `--dtype bf16` must reproduce model.safetensors (the compute weights are the master
//! rounded). transformers must load the output directory and agree with zerokit's logits.

mod common;

use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};
use zerokit::convert::{self, OutDtype};
use zerokit::interop::hf;

const VOCAB: u16 = 96;

struct Case {
    name: String,
    dtype: &'static str,
    /// The checkpoint root (out_dir of the run).
    root: PathBuf,
}

/// The runs, made once per test binary: (stage, ranks, dtype). The stage-3 run offloads the
/// optimizer and the parameters too.
const RUNS: [(u8, usize, &str); 6] =
    [(0, 1, "fp32"), (1, 2, "bf16"), (2, 3, "bf16"), (2, 2, "fp32"), (0, 3, "bf16"), (3, 2, "bf16")];

fn checkpoints() -> &'static [Case] {
    static CASES: OnceLock<Vec<Case>> = OnceLock::new();
    CASES.get_or_init(|| {
        // Kept for the life of the test binary (a static is never dropped), so under the target
        // directory rather than a temporary one; each run of the binary starts afresh.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("convert_zerokit");
        let _ = std::fs::remove_dir_all(&dir);
        let data = dir.join("data");
        common::random_tokens(&data, VOCAB, &[("train", 4000, 3), ("val", 2000, 5)]);
        RUNS.iter()
            .map(|&(stage, n, dtype)| {
                let name = format!("s{stage}_w{n}_{dtype}");
                // Saves at steps 2 and 3, then `final` (step 3), which `latest` names; --tag can
                // pick step 2.
                let offload = if stage == 3 { "\noffload_optimizer = true\noffload_param = true" } else { "" };
                let extra = format!(
                    "zero_stage = {stage}{offload}\ndtype = \"{dtype}\"\nbatch_size = {}\nmax_iters = 3\neval_interval = 2\nalways_save_checkpoint = true",
                    6 / n
                );
                let tiny = format!("n_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 16\nvocab_size = {VOCAB}");
                let root = train(&dir.join(&name), &data, n, &tiny, &extra);
                Case { name, dtype, root }
            })
            .collect()
    })
}

/// Runs `train` on `nproc` CPU ranks with the GPT-2 `model` describes (common::tiny's
/// base keys, then these runs' schedule, then `extra`); returns the checkpoint root.
fn train(dir: &Path, data: &Path, nproc: usize, model: &str, extra: &str) -> PathBuf {
    let keys = format!(
        "{model}
eval_iters = 1
warmup_iters = 1
lr_decay_iters = 3
{extra}"
    );
    let run = common::tiny::train(dir, data, nproc, &keys, &[]);
    assert!(run.ok, "train {}: {}", dir.display(), run.stderr);
    run.out
}

type Tensors = BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;

fn read_tensors(path: &Path) -> Tensors {
    let buf = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&buf).unwrap();
    st.tensors().into_iter().map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec()))).collect()
}

/// The fp32 master of every parameter, assembled from the rank files with the format's
/// arithmetic: element i of a parameter at offset o in bucket b lies at bucket position o + i,
/// on rank (o + i) / shard_b, at partition position shard_offset_b + (o + i) mod shard_b.
fn assemble_master(tag: &Path) -> BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let m = common::manifest(tag);
    let layout = &m["layout"];
    let parts = layout["parts"].as_u64().unwrap() as usize;
    let ranks: Vec<Vec<u8>> = (0..parts)
        .map(|r| {
            let buf = std::fs::read(tag.join(format!("rank_{r:05}.safetensors"))).unwrap();
            let st = SafeTensors::deserialize(&buf).unwrap();
            let t = st.tensor("master").unwrap();
            assert_eq!(t.dtype(), safetensors::Dtype::F32);
            t.data().to_vec()
        })
        .collect();
    let u = |v: &serde_json::Value| v.as_u64().unwrap() as usize;
    let mut out = BTreeMap::new();
    for p in layout["params"].as_array().unwrap() {
        let b = &layout["buckets"][u(&p["bucket"])];
        let (shard, shard_offset, offset) = (u(&b["shard"]), u(&b["shard_offset"]), u(&p["offset"]));
        let shape: Vec<usize> = p["shape"].as_array().unwrap().iter().map(u).collect();
        let numel: usize = shape.iter().product();
        let mut bytes = Vec::with_capacity(numel * 4);
        for i in 0..numel {
            let pos = offset + i;
            let at = (shard_offset + pos % shard) * 4;
            bytes.extend_from_slice(&ranks[pos / shard][at..at + 4]);
        }
        out.insert(p["name"].as_str().unwrap().to_string(), (shape, bytes));
    }
    out
}

fn latest_tag(root: &Path) -> PathBuf {
    root.join(std::fs::read_to_string(root.join("latest")).unwrap().trim())
}

fn bf16_of(f32_bytes: &[u8]) -> Vec<u8> {
    // torch's rounding (nearest, ties to even), as `half` implements it.
    f32_bytes
        .chunks_exact(4)
        .flat_map(|c| half::bf16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes())
        .collect()
}

#[test]
fn output_is_the_fp32_master_bit_for_bit_at_every_stage_and_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    for case in checkpoints() {
        let latest = latest_tag(&case.root);
        // Every run ends with the tag `final`, which `latest` then names (here at step 3).
        assert!(latest.ends_with("final"), "{}: {}", case.name, latest.display());
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(latest.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(m["step"].as_u64(), Some(3), "{}", case.name);
        // The root (following `latest`), the tag directory itself, and --tag for the older save.
        for (label, ckpt, tag, tag_dir) in [
            ("root", case.root.clone(), None, latest.clone()),
            ("tag dir", latest.clone(), None, latest.clone()),
            ("--tag", case.root.clone(), Some("step_00000002".to_string()), case.root.join("step_00000002")),
        ] {
            let what = format!("{} ({label})", case.name);
            let out = tmp.path().join(format!("{}-{}.safetensors", case.name, label.replace([' ', '-'], "")));
            let mut a = common::convert_args(&ckpt, &out);
            a.tag = tag;
            a.verify = label == "root";
            let summary = convert::run(&a).unwrap();
            let got = read_tensors(&out);
            let master = assemble_master(&tag_dir);
            assert_eq!(summary.tensors, master.len(), "{what}");
            assert_eq!(got.len(), master.len(), "{what}: tensor names {:?}", got.keys().collect::<Vec<_>>());
            assert!(!got.contains_key("lm_head.weight"), "{what}: lm_head is tied to wte and stored once");
            for (name, (shape, bytes)) in &master {
                let (dt, s, data) = got.get(name).unwrap_or_else(|| panic!("{what}: {name} missing"));
                assert_eq!((*dt, s), (safetensors::Dtype::F32, shape), "{what}: {name}");
                assert!(data == bytes, "{what}: {name} differs from the master in the rank files");
            }
            // In an fp32 run the model weights are the master; in bf16 they are its rounding.
            let model = read_tensors(&tag_dir.join("model.safetensors"));
            assert_eq!(model.len(), master.len(), "{what}");
            for (name, (dt, _, data)) in &model {
                let ours = &got[name].2;
                match case.dtype {
                    "fp32" => {
                        assert_eq!(*dt, safetensors::Dtype::F32);
                        assert!(data == ours, "{what}: {name}: fp32 run, output differs from model.safetensors");
                    }
                    _ => {
                        assert_eq!(*dt, safetensors::Dtype::BF16);
                        assert!(
                            *data == bf16_of(ours),
                            "{what}: {name}: bf16 run, model.safetensors is not the master rounded"
                        );
                        assert!(data != ours, "{what}: {name}");
                    }
                }
            }
        }
        // --dtype bf16 of a bf16 run reproduces its compute weights exactly.
        if case.dtype == "bf16" {
            let out = tmp.path().join(format!("{}-bf16.safetensors", case.name));
            let mut a = common::convert_args(&case.root, &out);
            a.dtype = OutDtype::Bf16;
            convert::run(&a).unwrap();
            assert_eq!(
                read_tensors(&out),
                read_tensors(&latest.join("model.safetensors")),
                "{}: --dtype bf16",
                case.name
            );
        }
    }
    // The two saves of a run differ, so the --tag comparison above really tells them apart.
    let c = &checkpoints()[0];
    assert_ne!(assemble_master(&c.root.join("step_00000002")), assemble_master(&latest_tag(&c.root)));
}

#[test]
fn directory_output_has_config_json_in_the_output_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let case = &checkpoints()[2];
    let manifest = common::manifest(&latest_tag(&case.root));
    for (dtype, name) in [(OutDtype::Fp32, "float32"), (OutDtype::Fp16, "float16"), (OutDtype::Bf16, "bfloat16")] {
        let out = tmp.path().join(name);
        let mut a = common::convert_args(&case.root, &out);
        a.dtype = dtype;
        convert::run(&a).unwrap();
        let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["torch_dtype"], name);
        assert_eq!(cfg["dtype"], name);
        for (ours, theirs) in [
            ("n_layer", "n_layer"),
            ("n_head", "n_head"),
            ("n_embd", "n_embd"),
            ("n_positions", "block_size"),
            ("vocab_size", "vocab_size"),
        ] {
            assert_eq!(cfg[ours], manifest["model_config"][theirs], "{ours}");
        }
        assert_eq!(cfg["tie_word_embeddings"], true);
    }
    // --dry-run writes nothing.
    let out = tmp.path().join("dry");
    let mut a = common::convert_args(&case.root, &out);
    a.dry_run = true;
    let s = convert::run(&a).unwrap();
    assert_eq!(s.tensors, 2 + 2 * 12 + 2);
    assert!(!out.exists());
}

fn tokens() -> Tensor {
    Tensor::randint_low(0, VOCAB as i64, [3, 16], (Kind::Int64, Device::Cpu)).set_requires_grad(false)
}

fn zerokit_logits(dir: &Path, idx: &Tensor) -> Tensor {
    let (model, _) = hf::load_gpt2(dir, Device::Cpu, Kind::Float).unwrap();
    tch::no_grad(|| model.forward(idx))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

#[test]
fn transformers_loads_the_output_with_zerokits_logits() {
    let tmp = tempfile::tempdir().unwrap();
    tch::manual_seed(0);
    let idx = tokens();
    // Every output dtype on the mixed-precision run; fp32 on the fp32 one (each transformers run
    // costs seconds of Python start-up).
    let cases = [
        (&checkpoints()[0], vec![(OutDtype::Fp32, "fp32")]),
        (&checkpoints()[2], vec![(OutDtype::Fp32, "fp32"), (OutDtype::Bf16, "bf16"), (OutDtype::Fp16, "fp16")]),
    ];
    for (case, dtypes) in cases {
        for (dtype, label) in dtypes {
            let what = format!("{} --dtype {label}", case.name);
            let out = tmp.path().join(format!("{}-{label}", case.name)).join("model");
            std::fs::create_dir_all(out.parent().unwrap()).unwrap();
            let mut a = common::convert_args(&case.root, &out);
            a.dtype = dtype;
            convert::run(&a).unwrap();
            let ours = zerokit_logits(&out, &idx);
            let theirs = common::transformers_logits(&out, &idx);
            let d = max_abs_diff(&ours, &theirs);
            eprintln!("{what}: max |zerokit - transformers| = {d:.2e}");
            assert!(d < 1e-4, "{what}: max |zerokit - transformers| = {d}");
            if label == "fp32" {
                // Sharded output loads to the very same model.
                let sharded = out.with_file_name("sharded");
                let mut a = common::convert_args(&case.root, &sharded);
                a.max_shard_size = "8KB".into();
                let s = convert::run(&a).unwrap();
                assert!(s.files.len() > 2, "{what}: {:?}", s.files);
                assert!(sharded.join("model.safetensors.index.json").exists());
                assert!(zerokit_logits(&sharded, &idx).equal(&ours), "{what}: sharded");
                // An fp32 run's tag is itself a model directory with the same weights.
                if case.dtype == "fp32" {
                    assert!(zerokit_logits(&latest_tag(&case.root), &idx).equal(&ours), "{what}: vs the checkpoint");
                }
            }
        }
    }
}

/// A copy of a checkpoint tag under a fresh root, to damage.
fn copy_tag(from: &Path, root: &Path) -> PathBuf {
    let to = root.join("step_00000003");
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    std::fs::write(root.join("latest"), "step_00000003\n").unwrap();
    to
}

/// Runs the binary on `root`; asserts failure, the message, and that nothing appeared at OUTPUT.
fn assert_refused(root: &Path, extra: &[&str], wants: &[&str]) {
    for out_name in ["out", "out.safetensors"] {
        let out = root.parent().unwrap().join(out_name);
        let o = Command::new(env!("CARGO_BIN_EXE_zero-to-fp32"))
            .arg(root)
            .arg(&out)
            .args(extra)
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{}: accepted: {err}", root.display());
        for w in wants {
            assert!(err.contains(w), "{}: expected {w:?} in: {err}", root.display());
        }
        assert!(!err.contains("panicked"), "{err}");
        let left: Vec<_> =
            std::fs::read_dir(root.parent().unwrap()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(!left.iter().any(|n| n.to_string_lossy().contains("out")), "{}: left {left:?}", root.display());
    }
}

#[test]
fn damaged_checkpoints_are_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let src = latest_tag(&checkpoints()[2].root); // 3 ranks
    let fresh = |name: &str| {
        let root = tmp.path().join(name).join("ckpt");
        let tag = copy_tag(&src, &root);
        (root, tag)
    };

    let (root, tag) = fresh("missing");
    std::fs::remove_file(tag.join("rank_00001.safetensors")).unwrap();
    assert_refused(&root, &[], &["rank_00001.safetensors", "missing", "3 ranks"]);

    let (root, tag) = fresh("truncated");
    let f = tag.join("rank_00002.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len - 100).unwrap();
    assert_refused(&root, &[], &["rank_00002.safetensors", "truncated"]);

    // Truncated with the manifest edited to match: the safetensors check still names the file.
    let (root, tag) = fresh("truncated-consistent");
    let f = tag.join("rank_00000.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len - 100).unwrap();
    common::edit_manifest(&tag, |m| m["files"]["rank_00000.safetensors"]["bytes"] = (len - 100).into());
    assert_refused(&root, &[], &["rank_00000.safetensors", "bad safetensors"]);

    let (root, tag) = fresh("version");
    common::edit_manifest(&tag, |m| m["version"] = 2.into());
    assert_refused(&root, &[], &["manifest.json", "version 2"]);

    let (root, tag) = fresh("no-manifest");
    std::fs::remove_file(tag.join("manifest.json")).unwrap();
    assert_refused(&root, &[], &["manifest.json", "missing", "not a complete zerokit checkpoint"]);

    let (root, tag) = fresh("not-gpt2");
    common::edit_manifest(&tag, |m| m["model_config"]["n_embd"] = 64.into());
    assert_refused(&root, &[], &["manifest.json", "shape"]);

    // Rank files swapped, the manifest's sizes and hashes updated to match: each file's own
    // record of its rank tells.
    let (root, tag) = fresh("swapped");
    common::swap_files(&tag, "rank_00000.safetensors", "rank_00002.safetensors");
    assert_refused(&root, &[], &["rank_00000.safetensors: metadata says rank \"2\", the file name says 0"]);

    // A rank file copied from the run's previous tag: its step tells.
    let (root, tag) = fresh("other-tag");
    let earlier = checkpoints()[2].root.join("step_00000002/rank_00001.safetensors");
    std::fs::copy(earlier, tag.join("rank_00001.safetensors")).unwrap();
    common::rehash(&tag, "rank_00001.safetensors");
    assert_refused(&root, &[], &["rank_00001.safetensors: metadata says step \"2\", manifest.json says 3"]);

    // A flipped bit in a master weight keeps every size: --verify's hashes catch it.
    let (root, tag) = fresh("bitflip");
    let f = tag.join("rank_00001.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let at = bytes.len() / 6; // inside `master`, the first third of the data
    bytes[at] ^= 0x10;
    std::fs::write(&f, bytes).unwrap();
    assert_refused(&root, &["--verify"], &["rank_00001.safetensors", "sha256", "does not match manifest.json"]);
}

/// Streaming: a 120 MB master (2 ranks, ZeRO-2) in tensors of up to 16 MiB, converted by 2
/// threads in 4 MiB units, peaks under two of those tensors above the dry run's RSS; reading the
/// rank files through their mappings without releasing the pages would hold the whole master.
#[test]
fn peak_memory_is_bounded_by_threads_not_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("data");
    common::random_tokens(&data, VOCAB, &[("train", 4000, 3), ("val", 2000, 5)]);
    let model = "n_layer = 2\nn_head = 8\nn_embd = 1024\nblock_size = 64\nvocab_size = 4096";
    let extra = "zero_stage = 2\ndtype = \"fp32\"\nbatch_size = 1\nmax_iters = 1\neval_interval = 1\nalways_save_checkpoint = true";
    let root = train(dir, &data, 2, model, extra);
    common::assert_conversion_streams(&root, &dir.join("hf"), (4096 * 1024 * 4) as f64 / 1048576.0);
}

/// `ckpt verify --scan` and `ckpt inspect` read every run's checkpoint, the stage-3 one saved
/// with both offloads among them.
#[test]
fn ckpt_verifies_and_inspects_the_checkpoint_of_every_stage() {
    for (case, &(stage, n, _)) in checkpoints().iter().zip(&RUNS) {
        let tag = case.root.join("final");
        let problems = zerokit::ckpt::verify::verify_zerokit_tag(&tag, true);
        assert!(problems.is_empty(), "{}: {problems:?}", case.name);
        let i = zerokit::ckpt::inspect::inspect(&case.root, None, true).unwrap();
        assert_eq!((i.zero_stage, i.world_size, i.step), (Some(stage), Some(n), Some(3)), "{}", case.name);
    }
}
