//! Tiny GPT-2 training runs through the real `train` binary on CPU ranks: a dataset with some
//! structure to learn, a config built from base keys, the run's losses from metrics.jsonl.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};

pub const VOCAB: u16 = 96;
static PORT: AtomicU16 = AtomicU16::new(0);

pub fn port() -> u16 {
    // Distinct per test process and call, away from common services and below Linux's ephemeral
    // range (32768 on), where the ranks' own connections take ports; one that something holds
    // now is skipped (a CI run once met "Address already in use" on a fixed pick).
    let base = 20000 + (std::process::id() % 10000) as u16;
    loop {
        let p = base + PORT.fetch_add(1, Ordering::SeqCst) % 2700;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// A token dataset of pseudo-random ids below VOCAB with some structure to learn.
pub fn dataset(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (split, n, mut s) in [("train", 20000usize, 7u64), ("val", 4000, 11)] {
        let mut bytes = Vec::with_capacity(n * 2);
        let mut prev = 0u16;
        for _ in 0..n {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let r = (s >> 33) as u16;
            let t = if r % 4 == 0 { r % VOCAB } else { (prev * 7 + 3) % VOCAB };
            bytes.extend_from_slice(&t.to_le_bytes());
            prev = t;
        }
        std::fs::write(dir.join(format!("{split}.bin")), bytes).unwrap();
    }
}

/// A config file in `dir` (out_dir `dir/out`): the base keys below, each replaced by the same
/// key in `extra` ("k = v" lines).
pub fn config(dir: &Path, data: &Path, extra: &str) -> PathBuf {
    let base = format!(
        r#"dataset = "{}"
out_dir = "{}"
n_layer = 2
n_head = 2
n_embd = 32
block_size = 16
vocab_size = {VOCAB}
max_iters = 20
eval_interval = 1000
eval_iters = 2
log_interval = 1
learning_rate = 3e-3
warmup_iters = 2
lr_decay_iters = 20
min_lr = 3e-4
device = "cpu"
dtype = "fp32"
sample_tokens = 0
comm_timeout = 60"#,
        data.display(),
        dir.join("out").display()
    );
    let key = |l: &str| l.split('=').next().unwrap_or("").trim().to_string();
    let extra: Vec<&str> = extra.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut lines: Vec<String> =
        base.lines().filter(|b| !extra.iter().any(|e| key(e) == key(b))).map(String::from).collect();
    lines.extend(extra.iter().map(|e| e.to_string()));
    let p = dir.join("config.toml");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

pub struct Run {
    pub ok: bool,
    pub stderr: String,
    pub losses: Vec<(u64, f64)>,
    pub out: PathBuf,
}

/// `train CONFIG LAUNCH_ARGS...` on CPU, outside any launcher's environment.
pub fn train_command(cfg: &Path, launch: &[String], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_train"));
    cmd.arg(cfg).args(launch);
    cmd.env("ZEROKIT_NO_CUDA", "1").env_remove("RANK").env_remove("WORLD_SIZE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// `--nproc-per-node N --master-port P` with a fresh port.
pub fn launch_args(nproc: usize) -> Vec<String> {
    vec!["--nproc-per-node".to_string(), nproc.to_string(), "--master-port".into(), port().to_string()]
}

/// The training losses metrics.jsonl holds, by step, in the order they were logged.
pub fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v.get("step")?.as_u64()?, v.get("loss")?.as_f64()?)))
        .collect()
}

/// Trains in `dir` (config `dir/config.toml`, out_dir `dir/out`) on `nproc` ranks.
pub fn train(dir: &Path, data: &Path, nproc: usize, extra: &str, env: &[(&str, &str)]) -> Run {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = config(dir, data, extra);
    let o = train_command(&cfg, &launch_args(nproc), env).output().unwrap();
    let out = dir.join("out");
    Run { ok: o.status.success(), stderr: String::from_utf8_lossy(&o.stderr).into_owned(), losses: losses(&out), out }
}

pub fn assert_close(a: &[(u64, f64)], b: &[(u64, f64)], rel: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: different numbers of logged steps");
    for ((sa, la), (sb, lb)) in a.iter().zip(b) {
        assert_eq!(sa, sb);
        let d = (la - lb).abs() / la.abs().max(1e-12);
        assert!(d <= rel, "{what}: step {sa}: loss {la} vs {lb} (relative {d:.2e} > {rel:.0e})");
    }
}

/// Copies a directory tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}
