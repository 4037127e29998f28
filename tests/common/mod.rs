//! Helpers shared by integration tests: the Python reference environment, transformers,
//! zero-to-fp32's arguments, manifest edits, tiny training runs (`tiny`). Each test binary uses
//! only some of them.
#![allow(dead_code)]

pub mod decoder;
pub mod engine;
pub mod tiny;

use std::path::{Path, PathBuf};
use std::process::Command;
use tch::Tensor;

/// The reference environment's interpreter; tests that need it fail (not skip) without it.
pub fn python() -> PathBuf {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps/py/bin/python");
    assert!(py.exists(), "{} not found: run `make pyenv` to create the Python reference environment", py.display());
    py
}

/// Loads a model directory into transformers (AutoModelForCausalLM through
/// tools/check_hf_roundtrip.py, which also fails on missing, unexpected or untied weights) and
/// returns its logits on `tokens`.
pub fn transformers_logits(dir: &Path, tokens: &Tensor) -> Tensor {
    transformers_outputs(dir, &[("tokens", tokens)]).remove("logits").expect("check_hf_roundtrip.py writes logits")
}

/// What tools/check_hf_roundtrip.py writes for `inputs` ("tokens", and optionally "prompt" with
/// "max_new_tokens" for greedy generation), by name.
pub fn transformers_outputs(dir: &Path, inputs: &[(&str, &Tensor)]) -> std::collections::HashMap<String, Tensor> {
    let work = dir.parent().unwrap();
    let tok_path = work.join("tokens.safetensors");
    let out_path = work.join("hf_logits.safetensors");
    Tensor::write_safetensors(inputs, &tok_path).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/check_hf_roundtrip.py");
    let out = Command::new(python()).arg(&script).arg(dir).arg(&tok_path).arg(&out_path).output().unwrap();
    assert!(
        out.status.success(),
        "check_hf_roundtrip.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Tensor::read_safetensors(&out_path).unwrap().into_iter().collect()
}

/// The text tools/check_hf_roundtrip.py has AutoTokenizer encode when the directory holds a
/// tokenizer (its TEXT).
#[allow(dead_code)]
pub const TOKENIZER_TEXT: &str = "Round trip: zerokit's output loads in AutoTokenizer, ids and all.";

/// zero-to-fp32's defaults for CHECKPOINT -> OUTPUT (fp32, 5GB shards, nothing optional).
pub fn convert_args(ckpt: &Path, out: &Path) -> zerokit::convert::ConvertArgs {
    zerokit::convert::ConvertArgs {
        checkpoint: ckpt.to_path_buf(),
        output: out.to_path_buf(),
        tag: None,
        dtype: zerokit::convert::OutDtype::Fp32,
        exclude_frozen: false,
        dry_run: false,
        max_shard_size: "5GB".into(),
        force: false,
        report_peak_rss: false,
        verify: false,
        threads: 0,
        tokenizer: None,
    }
}

/// The MiB figure of zero-to-fp32's `--report-peak-rss` line in `stderr`.
pub fn peak_rss_mib(stderr: &str) -> f64 {
    let line =
        stderr.lines().find(|l| l.contains("peak RSS:")).unwrap_or_else(|| panic!("no peak RSS line in {stderr}"));
    line.split("peak RSS:").nth(1).unwrap().trim().trim_end_matches("MiB").trim().parse().unwrap()
}

/// Writes `<split>.bin` token files of pseudo-random ids below `vocab` (a fixed LCG per split,
/// so every run trains on the same data): one (split, tokens, seed) per file.
pub fn random_tokens(dir: &Path, vocab: u16, splits: &[(&str, usize, u64)]) {
    std::fs::create_dir_all(dir).unwrap();
    for &(split, n, mut s) in splits {
        let mut bytes = Vec::with_capacity(n * 2);
        for _ in 0..n {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            bytes.extend_from_slice(&(((s >> 33) as u16) % vocab).to_le_bytes());
        }
        std::fs::write(dir.join(format!("{split}.bin")), bytes).unwrap();
    }
}

/// A zerokit checkpoint tag's manifest.json.
pub fn manifest(tag: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(tag.join("manifest.json")).unwrap()).unwrap()
}

/// Rewrites a zerokit checkpoint tag's manifest.json through `f`.
pub fn edit_manifest(tag: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut m = manifest(tag);
    f(&mut m);
    std::fs::write(tag.join("manifest.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

/// Records a file's new size and hash in its tag's manifest, so only deeper checks than sizes
/// and hashes can catch what was changed in it.
pub fn rehash(tag: &Path, name: &str) {
    let bytes = std::fs::metadata(tag.join(name)).unwrap().len();
    let sha = zerokit::fsutil::sha256_file(&tag.join(name)).unwrap();
    edit_manifest(tag, |m| m["files"][name] = serde_json::json!({"bytes": bytes, "sha256": sha}));
}

/// Swaps two files of a tag and records both in its manifest: sizes and hashes then agree, and
/// only the files' own identity (their safetensors metadata) tells them apart.
pub fn swap_files(tag: &Path, a: &str, b: &str) {
    let tmp = tag.join(".swap");
    std::fs::rename(tag.join(a), &tmp).unwrap();
    std::fs::rename(tag.join(b), tag.join(a)).unwrap();
    std::fs::rename(&tmp, tag.join(b)).unwrap();
    rehash(tag, a);
    rehash(tag, b);
}

/// Converts `src` into `out` with 2 threads and checks that the peak RSS stays within two
/// tensors of `tensor_mib` above the dry run's: the conversion streams, whatever the model's size.
pub fn assert_conversion_streams(src: &Path, out: &Path, tensor_mib: f64) {
    let run = |extra: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_zero-to-fp32"))
            .arg(src)
            .arg(out)
            .args(["--report-peak-rss", "--threads", "2"])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{err}");
        peak_rss_mib(&err)
    };
    let dry = run(&["--dry-run"]);
    let full = run(&["--max-shard-size", "100MB"]);
    eprintln!("peak RSS: dry run {dry:.1} MiB, conversion {full:.1} MiB");
    // About 12 MiB per thread: a 4 MiB unit read, its mapped pages, allocator slack.
    assert!(full - dry < 2.0 * tensor_mib, "peak RSS {full:.1} MiB vs {dry:.1} MiB dry: not streaming");
}

/// The fp32 master partition of a DeepSpeed ZeRO-1/2 rank's optimizer file (its first group).
pub fn deepspeed_fp32_partition(
    tf: &zerokit::formats::torch_zip::TorchFile,
) -> &zerokit::formats::torch_pickle::TensorRef {
    tf.root().get("optimizer_state_dict").unwrap().get("single_partition_of_fp32_groups").unwrap().as_seq().unwrap()[0]
        .as_tensor()
        .unwrap()
}

/// The engine's split pass over `model`, written out for tests: the embedding of `idx`, each
/// block on a detached copy of the previous output, `head` on the last one (it returns the
/// head's parameter gradients by name and its input's gradient), then each block's backward last
/// first and the embedding's. Returns the gradient of every parameter of `params` (the model's
/// `named_parameters`, in order), None for one that received none.
pub fn split_gradients(
    model: &impl zerokit::model::Model,
    params: &[(String, Tensor)],
    idx: &Tensor,
    head: impl FnOnce(&Tensor) -> (Vec<(String, Tensor)>, Tensor),
) -> Vec<Option<Tensor>> {
    use zerokit::model::vjp;
    let index: std::collections::HashMap<&str, usize> =
        params.iter().enumerate().map(|(i, (n, _))| (n.as_str(), i)).collect();
    let leaf = |x: &Tensor| x.detach().set_requires_grad(true);
    let x0 = model.embed(idx);
    let mut inputs = vec![leaf(&x0)];
    let mut outputs = vec![];
    for i in 0..model.n_blocks() {
        let y = model.block(i, inputs.last().unwrap());
        inputs.push(leaf(&y));
        outputs.push(y);
    }
    let mut split: Vec<Option<Tensor>> = (0..params.len()).map(|_| None).collect();
    let mut add = |name: &str, g: Tensor| {
        let i = index[name];
        split[i] = Some(match split[i].take() {
            Some(acc) => acc + g,
            None => g,
        });
    };
    let (head_grads, mut grad_x) = head(inputs.last().unwrap());
    for (n, g) in head_grads {
        add(&n, g);
    }
    for i in (0..model.n_blocks()).rev() {
        let names = model.block_parameters(i);
        let mut wrt: Vec<&Tensor> = vec![&inputs[i]];
        wrt.extend(names.iter().map(|n| &params[index[n.as_str()]].1));
        let grads = vjp(&outputs[i], &grad_x, &wrt, false);
        grad_x = grads[0].shallow_clone();
        for (n, g) in names.iter().zip(&grads[1..]) {
            add(n, g.shallow_clone());
        }
    }
    let names = model.embed_parameters();
    let wrt: Vec<&Tensor> = names.iter().map(|n| &params[index[n.as_str()]].1).collect();
    for (n, g) in names.iter().zip(vjp(&x0, &grad_x, &wrt, false)) {
        add(n, g);
    }
    split
}

/// Runs one of the binaries (CPU only): whether it succeeded, and its stdout and stderr.
pub fn tool(bin: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new(bin).args(args).env("ZEROKIT_NO_CUDA", "1").output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    (o.status.success(), text)
}
