//! Hugging Face model ids in `train`'s init_from and `prepare --tokenizer` (issue 15), resolved
//! in a hub cache that huggingface_hub's own code lays out and resolves offline
//! (tools/make_hub_cache.py), against zerokit's resolver (lib/hub.rs).

mod common;

use common::tiny;
use std::path::{Path, PathBuf};
use std::process::Command;

const ID: &str = "zerokit-test/llama-sharded";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A hub cache at `root` holding ID (the sharded Llama fixture and Llama 3's tokenizer.json),
/// and the snapshot folder huggingface_hub resolves ID to there.
fn hub_cache(root: &Path) -> PathBuf {
    let fx = repo().join("tests/fixtures");
    let mut cmd = Command::new(common::python());
    cmd.arg(repo().join("tools/make_hub_cache.py")).args(["--cache", root.to_str().unwrap(), "--repo", ID]);
    for e in std::fs::read_dir(fx.join("llama/hf_sharded")).unwrap() {
        cmd.arg(e.unwrap().path());
    }
    cmd.arg(format!("{}=tokenizer.json", fx.join("tokenizer/hf/llama3.json").display()));
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "make_hub_cache.py: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    PathBuf::from(v["snapshot"].as_str().unwrap())
}

fn prepare(args: &[&str], cache: &Path) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_prepare")).args(args).env("HF_HUB_CACHE", cache).output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn resolver_finds_what_huggingface_hub_finds() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("hub");
    let theirs = hub_cache(&root);
    let ours = zerokit::hub::snapshot_in(&root, "test", ID).unwrap();
    assert_eq!(ours.canonicalize().unwrap(), theirs.canonicalize().unwrap());

    // Not cached, a ref without its snapshot, a ref that is no hash: refused naming the path.
    let err = zerokit::hub::snapshot_in(&root, "test", "nobody/none").unwrap_err().to_string();
    assert!(err.contains(&root.join("models--nobody--none").display().to_string()), "{err}");
    let refs = root.join("models--zerokit-test--llama-sharded/refs/main");
    std::fs::write(&refs, "ffffffffffffffffffffffffffffffffffffffff").unwrap();
    let err = zerokit::hub::snapshot_in(&root, "test", ID).unwrap_err().to_string();
    assert!(err.contains("snapshot folder is missing") && err.contains("ffffffff"), "{err}");
    std::fs::write(&refs, "../../elsewhere").unwrap();
    let err = zerokit::hub::snapshot_in(&root, "test", ID).unwrap_err().to_string();
    assert!(err.contains("not a commit hash") && err.contains(&refs.display().to_string()), "{err}");
}

#[test]
fn prepare_and_train_take_a_model_id_from_the_hub_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("hub");
    hub_cache(&root);
    let corpus = repo().join("tests/fixtures/tokenizer/hf/corpus/a.txt");
    let out = tmp.path().join("tokens");
    let (ok, log) = prepare(&[corpus.to_str().unwrap(), "--out", out.to_str().unwrap(), "--tokenizer", ID], &root);
    assert!(ok, "{log}");
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("meta.json")).unwrap()).unwrap();
    let want = zerokit::fsutil::sha256_file(&repo().join("tests/fixtures/tokenizer/hf/llama3.json")).unwrap();
    assert_eq!(meta["tokenizer"]["sha256"], want.as_str());

    // An id that is not cached: a clear refusal naming the folder searched, for both tools.
    let missing = root.join("models--nobody--none").display().to_string();
    let (ok, log) = prepare(
        &[corpus.to_str().unwrap(), "--out", tmp.path().join("x").to_str().unwrap(), "--tokenizer", "nobody/none"],
        &root,
    );
    assert!(!ok && log.contains(&missing) && log.contains("HF_HUB_CACHE"), "{log}");

    let data = tmp.path().join("data");
    tiny::dataset(&data);
    let env = [("HF_HUB_CACHE", root.to_str().unwrap())];
    let keys = format!("init_from = \"{ID}\"\nmax_iters = 2\nbatch_size = 2");
    let run = tiny::train(&tmp.path().join("run"), &data, 1, &keys, &env);
    assert!(run.ok && run.losses.len() == 2, "{}", run.stderr);
    assert!(run.stderr.contains("the hub cache's snapshot"), "{}", run.stderr);
    let run = tiny::train(&tmp.path().join("missing"), &data, 1, "init_from = \"nobody/none\"\nmax_iters = 2", &env);
    assert!(!run.ok && run.stderr.contains(&missing), "{}", run.stderr);
}
