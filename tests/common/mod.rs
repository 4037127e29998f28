//! Helpers shared by integration tests: the Python reference environment, transformers, and
//! zero-to-fp32's arguments. Each test binary uses only some of them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use tch::Tensor;

/// The reference environment's interpreter; tests that need it fail (not skip) without it.
pub fn python() -> PathBuf {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps/py/bin/python");
    assert!(
        py.exists(),
        "{} not found: run `make pyenv` to create the Python reference environment",
        py.display()
    );
    py
}

/// Loads a model directory into transformers' GPT2LMHeadModel (tools/check_hf_roundtrip.py,
/// which also fails on missing, unexpected or untied weights) and returns its logits on `tokens`.
pub fn transformers_logits(dir: &Path, tokens: &Tensor) -> Tensor {
    let work = dir.parent().unwrap();
    let tok_path = work.join("tokens.safetensors");
    let out_path = work.join("hf_logits.safetensors");
    Tensor::write_safetensors(&[("tokens", tokens)], &tok_path).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/check_hf_roundtrip.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(dir)
        .arg(&tok_path)
        .arg(&out_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check_hf_roundtrip.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Tensor::read_safetensors(&out_path)
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == "logits")
        .expect("check_hf_roundtrip.py writes logits")
        .1
}

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
    }
}

/// The MiB figure of zero-to-fp32's `--report-peak-rss` line in `stderr`.
pub fn peak_rss_mib(stderr: &str) -> f64 {
    let line = stderr
        .lines()
        .find(|l| l.contains("peak RSS:"))
        .unwrap_or_else(|| panic!("no peak RSS line in {stderr}"));
    line.split("peak RSS:")
        .nth(1)
        .unwrap()
        .trim()
        .trim_end_matches("MiB")
        .trim()
        .parse()
        .unwrap()
}
