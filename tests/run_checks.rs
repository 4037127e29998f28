//! What `train` checks about the directory and the checkpoint it starts from, through the real
//! binaries on CPU ranks: one run per `out_dir` (a second is refused, naming the holder), rank
//! and model files that are not the tag's own refused by resume and `train sample` (from their
//! headers, before anything is read or written), a damaged file reported by resume's background
//! hashes before its first save, and a checkpoint saved before files carried their step still
//! read by every tool.

mod common;

use common::tiny::{config, copy_dir, dataset, launch_args, losses, train, train_command};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Names of a root's entries, sorted.
fn listing(root: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(root).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// Starts `train` in its own process group (so the whole job can be killed at once).
fn spawn(cfg: &Path, nproc: usize) -> Child {
    train_command(cfg, &launch_args(nproc), &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap()
}

fn kill_job(mut job: Child) {
    // SAFETY: signals the process group spawn() created; no memory is involved.
    unsafe { libc::kill(-(job.id() as i32), libc::SIGKILL) };
    job.wait().unwrap();
}

/// Waits until `out_dir/train.lock` names a holder; returns (pid, host).
fn holder(out: &Path) -> (u32, String) {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(out.join("train.lock")).unwrap_or_default();
        if let Some(rest) = text.trim().strip_prefix("pid ") {
            let (pid, host) = rest.split_once(" on host ").unwrap();
            return (pid.parse().unwrap(), host.to_string());
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no run took the lock on {}", out.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_out(cmd: &mut Command) -> (bool, String) {
    let o: Output = cmd.output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn a_second_run_on_the_same_out_dir_is_refused_naming_the_holder() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let dir = tmp.path().join("run");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out");
    // Long runs that save nothing for a while: two new runs started together, then two resumes.
    let long = "max_iters = 100000\neval_interval = 100000\neval_iters = 1";
    let first = config(&dir, &data, long);
    let a = spawn(&first, 2);
    let (pid, host) = holder(&out);
    let t = Instant::now();
    while !std::fs::read_to_string(out.join("logs/rank000.log")).unwrap_or_default().contains("rank(s)") {
        assert!(t.elapsed() < Duration::from_secs(60), "the first run never logged its start");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Path::new(&format!("/proc/{pid}")).exists(), "the lock names pid {pid}, which is not running");
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let second = config(&other, &data, &format!("out_dir = \"{}\"\nmax_iters = 4", out.display()));
    let (ok, err) = run_out(&mut train_command(&second, &[], &[]));
    assert!(!ok, "a second new run was accepted");
    assert!(
        err.contains(&format!("{} is in use by another train run (pid {pid} on host {host};", out.display())),
        "{err}"
    );
    // Refused before it wrote anything: its log line would say 1 rank, the holder's says 2.
    let log = std::fs::read_to_string(out.join("logs/rank000.log")).unwrap();
    assert!(log.contains("2 rank(s)") && !log.contains("1 rank(s)"), "{log}");
    kill_job(a);

    // A checkpoint, then a resume holding the directory and a second resume.
    let saved = train(&dir, &data, 2, "max_iters = 2\neval_interval = 2\nalways_save_checkpoint = true", &[]);
    assert!(saved.ok, "{}", saved.stderr);
    let resume = config(&dir, &data, &format!("{long}\ninit_from = \"resume\""));
    let a = spawn(&resume, 2);
    let before = std::fs::read_to_string(out.join("train.lock")).unwrap();
    let (pid, host) = loop {
        let h = holder(&out);
        if format!("pid {} on host {}\n", h.0, h.1) != before {
            break h;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (ok, err) = run_out(&mut train_command(&resume, &launch_args(2), &[]));
    assert!(!ok, "a second resume was accepted");
    assert!(err.contains(&format!("is in use by another train run (pid {pid} on host {host};")), "{err}");
    // kill -9 releases the lock with the process: the next resume runs.
    kill_job(a);
    let again = train(&dir, &data, 2, "max_iters = 4\neval_interval = 2\ninit_from = \"resume\"", &[]);
    assert!(again.ok, "{}", again.stderr);
}

/// A 2-rank ZeRO-2 run saving at steps 2 and 4; returns its root.
fn two_tags(dir: &Path, data: &Path) -> PathBuf {
    let r = train(dir, data, 2, "batch_size = 3\nzero_stage = 2\nmax_iters = 4\neval_interval = 2\nalways_save_checkpoint = true\nkeep_last = 2", &[]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(listing(&r.out.join("step_00000004")).len(), 5);
    // Without the run's `final` tag (every_run_ends_with_a_final_tag_that_every_tool_takes is
    // about it), so that `latest` names step 4, the tag the cases below damage.
    std::fs::remove_dir_all(r.out.join("final")).unwrap();
    std::fs::write(r.out.join("latest"), "step_00000004\n").unwrap();
    r.out
}

#[test]
fn files_that_are_not_the_tags_own_are_refused_by_resume_and_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let root = two_tags(&tmp.path().join("src"), &data);
    type Damage = fn(&Path);
    let cases: [(&str, Damage, &str); 3] = [
        (
            "rank files swapped",
            |tag| common::swap_files(tag, "rank_00000.safetensors", "rank_00001.safetensors"),
            "step_00000004/rank_00000.safetensors: metadata says rank \"1\", the file name says 0",
        ),
        (
            "a rank file of the previous tag",
            |tag| {
                std::fs::copy(
                    tag.with_file_name("step_00000002/rank_00001.safetensors"),
                    tag.join("rank_00001.safetensors"),
                )
                .unwrap();
                common::rehash(tag, "rank_00001.safetensors");
            },
            "step_00000004/rank_00001.safetensors: metadata says step \"2\", manifest.json says 4",
        ),
        (
            "the model of the previous tag",
            |tag| {
                std::fs::copy(tag.with_file_name("step_00000002/model.safetensors"), tag.join("model.safetensors"))
                    .unwrap();
                common::rehash(tag, "model.safetensors");
            },
            "step_00000004/model.safetensors: metadata says step \"2\", manifest.json says 4",
        ),
    ];
    for (what, damage, want) in cases {
        let dir = tmp.path().join(what.replace(' ', "-"));
        copy_dir(&root, &dir.join("out"));
        damage(&dir.join("out/step_00000004"));
        let metrics = std::fs::read_to_string(dir.join("out/metrics.jsonl")).unwrap();
        let before = listing(&dir.join("out"));
        let r = train(&dir, &data, 2, "batch_size = 3\nmax_iters = 8\neval_interval = 2\ninit_from = \"resume\"", &[]);
        assert!(!r.ok, "{what}: resume accepted it");
        assert!(r.stderr.contains(want), "{what}: {}", r.stderr);
        // Refused before training: not a step logged, nothing saved or removed.
        assert_eq!(std::fs::read_to_string(dir.join("out/metrics.jsonl")).unwrap(), metrics, "{what}");
        let mut now = listing(&dir.join("out"));
        now.retain(|n| n != "train.lock");
        assert_eq!(now, before.into_iter().filter(|n| n != "train.lock").collect::<Vec<_>>(), "{what}");

        let (ok, err) = run_out(Command::new(env!("CARGO_BIN_EXE_train")).args([
            "sample",
            dir.join("out").to_str().unwrap(),
            "--prompt",
            "A",
            "--tokens",
            "3",
            "--device",
            "cpu",
        ]));
        assert!(!ok && err.contains(want), "{what}: sample: {err}");
    }
    let (ok, err) = run_out(Command::new(env!("CARGO_BIN_EXE_train")).args([
        "sample",
        root.to_str().unwrap(),
        "--prompt",
        "A",
        "--tokens",
        "3",
        "--device",
        "cpu",
    ]));
    assert!(ok, "sample of the intact checkpoint: {err}");
}

#[test]
fn resume_reports_a_damaged_file_before_its_first_save() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let dir = tmp.path().join("run");
    let root = two_tags(&dir, &data);
    // One byte of rank 1's exp_avg_sq, far from its header: sizes and headers stay intact, only
    // the sha256 differs, and only rank 1 (the rank that reads the file) hashes it.
    let f = root.join("step_00000004/rank_00001.safetensors");
    let mut b = std::fs::read(&f).unwrap();
    let at = b.len() - 40;
    b[at] ^= 0x04;
    std::fs::write(&f, b).unwrap();
    let before = listing(&root);
    let r = train(&dir, &data, 2, "batch_size = 3\nmax_iters = 8\neval_interval = 2\ninit_from = \"resume\"", &[]);
    assert!(!r.ok, "the resumed run saved over a damaged checkpoint");
    for want in [
        "the checkpoint this run resumed from is damaged",
        "step_00000004/rank_00001.safetensors: sha256 ",
        "does not match manifest.json",
    ] {
        assert!(r.stderr.contains(want), "{want:?} not in {}", r.stderr);
    }
    assert_eq!(listing(&root), before, "nothing was saved or removed");
    assert_eq!(std::fs::read_to_string(root.join("latest")).unwrap(), "step_00000004\n");
    // It trained in the meantime (the check runs beside training), and stopped at its first save.
    assert!(losses(&root).iter().any(|&(s, _)| s == 6), "no step after the resume was trained");
}

/// Checkpoints of format version 1 as earlier builds saved them (tools/gen_zerokit_v1_fixture.sh):
/// v1_s2_w2 from before rank files recorded their world size, stage and step, and
/// model.safetensors its step; v1_s1_w2_a04011c from the build before issue 12 restructured the
/// engine and the checkpoint code. Each verifies, converts, samples and resumes (at another
/// stage for the second).
#[test]
fn checkpoints_saved_by_earlier_builds_still_read() {
    for fixture in ["v1_s2_w2", "v1_s1_w2_a04011c"] {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        dataset(&data);
        let dir = tmp.path().join("run");
        let root = dir.join("out");
        copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/zerokit").join(fixture), &root);
        let tool = |bin: &str, args: &[&str]| run_out(Command::new(bin).args(args));
        let r = root.to_str().unwrap();
        let (ok, err) = tool(env!("CARGO_BIN_EXE_ckpt"), &["verify", r, "--scan"]);
        assert!(ok, "{fixture}: verify: {err}");
        let hf = tmp.path().join("hf");
        let (ok, err) = tool(env!("CARGO_BIN_EXE_zero-to-fp32"), &[r, hf.to_str().unwrap()]);
        assert!(ok, "{fixture}: zero-to-fp32: {err}");
        let (ok, err) =
            tool(env!("CARGO_BIN_EXE_train"), &["sample", r, "--prompt", "A", "--tokens", "3", "--device", "cpu"]);
        assert!(ok, "{fixture}: sample: {err}");
        let resumed = train(&dir, &data, 2, "batch_size = 2\nzero_stage = 2\nmax_iters = 4\neval_interval = 2\nalways_save_checkpoint = true\ninit_from = \"resume\"", &[]);
        assert!(resumed.ok, "{fixture}: resume: {}", resumed.stderr);
        assert!(resumed.stderr.contains("resumed from") && resumed.stderr.contains("at step 2"), "{}", resumed.stderr);
        // Old and new tags side by side verify.
        let (ok, err) = tool(env!("CARGO_BIN_EXE_ckpt"), &["verify", r]);
        assert!(ok, "{fixture}: verify after the resume: {err}");
    }
}

/// Every run ends with the tag `final` (issue 14): whatever val loss did, kept by retention,
/// named by `latest`, and a tag like any other for zero-to-fp32, sample, inspect, verify and
/// resume; the resumed run ends with a new `final` at its own last step.
#[test]
fn every_run_ends_with_a_final_tag_that_every_tool_takes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let dir = tmp.path().join("run");
    // keep_last = 1 and a val loss that improves at every evaluation: retention keeps one
    // step tag, and final beside it.
    let first = train(&dir, &data, 2, "max_iters = 6\neval_interval = 2\nkeep_last = 1\nzero_stage = 1", &[]);
    assert!(first.ok, "{}", first.stderr);
    let root = first.out.clone();
    assert_eq!(std::fs::read_to_string(root.join("latest")).unwrap(), "final\n");
    let tags: Vec<String> = listing(&root).into_iter().filter(|n| n == "final" || n.starts_with("step_")).collect();
    assert_eq!(tags, ["final", "step_00000006"]);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("final/manifest.json")).unwrap()).unwrap();
    assert_eq!((manifest["tag"].as_str(), manifest["step"].as_u64()), (Some("final"), Some(6)));
    // step 6 was saved by its evaluation, so final holds the same files, linked: the same inodes.
    use std::os::unix::fs::MetadataExt;
    for file in ["model.safetensors", "rank_00000.safetensors", "rank_00001.safetensors", "config.json"] {
        let ino = |tag: &str| std::fs::metadata(root.join(tag).join(file)).unwrap().ino();
        assert_eq!(ino("final"), ino("step_00000006"), "{file} of final is not step 6's");
    }

    let tool = |bin: &str, args: &[&str]| run_out(Command::new(bin).args(args));
    let r = root.to_str().unwrap();
    let fin = root.join("final");
    let st = tmp.path().join("model.safetensors");
    for (bin, args) in [
        (env!("CARGO_BIN_EXE_ckpt"), vec!["verify", r]),
        (env!("CARGO_BIN_EXE_zero-to-fp32"), vec![fin.to_str().unwrap(), st.to_str().unwrap()]),
        (
            env!("CARGO_BIN_EXE_train"),
            vec!["sample", fin.to_str().unwrap(), "--prompt", "A", "--tokens", "3", "--device", "cpu"],
        ),
        (env!("CARGO_BIN_EXE_train"), vec!["eval", r, "--dataset", data.to_str().unwrap(), "--device", "cpu"]),
    ] {
        let (ok, err) = tool(bin, &args);
        assert!(ok, "{bin} {args:?}: {err}");
    }
    let o = Command::new(env!("CARGO_BIN_EXE_ckpt")).args(["inspect", r]).output().unwrap();
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && shown.contains("final (latest)"), "{shown}");
    // It shows the run's best tag and its val loss (issue 14, item 9).
    assert!(shown.lines().any(|l| l.contains("best") && l.contains("step_00000006 (val loss ")), "{shown}");

    // Resume from the root: `latest` names final, at step 6; the run goes on to 8 and ends with
    // a new final there. An early stop ends with final too (patience 1 at an eval that does not
    // improve is likely but not certain, so only the normal end is pinned).
    let resumed = train(&dir, &data, 1, "max_iters = 8\neval_interval = 2\nkeep_last = 1\ninit_from = \"resume\"", &[]);
    assert!(resumed.ok, "{}", resumed.stderr);
    assert!(resumed.stderr.contains("/final at step 6"), "{}", resumed.stderr);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("final/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["step"].as_u64(), Some(8));
    let (ok, err) = tool(env!("CARGO_BIN_EXE_ckpt"), &["verify", r]);
    assert!(ok, "verify after the resume: {err}");
}

/// `--resume-from` continues from a chosen tag of out_dir, or from a tag directory anywhere
/// (issue 14): the guides' `load_checkpoint(dir, tag)`.
#[test]
fn resume_from_a_named_tag_or_a_tag_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let dir = tmp.path().join("run");
    let first = train(&dir, &data, 1, "max_iters = 4\neval_interval = 2\nalways_save_checkpoint = true", &[]);
    assert!(first.ok, "{}", first.stderr);
    let resume = |dir: &Path, extra: &str, from: &str| {
        let cfg = config(dir, &data, extra);
        run_out(&mut train_command(&cfg, &["--resume-from".to_string(), from.to_string()], &[]))
    };
    // A tag name under out_dir, behind `latest` (which names final, at step 4).
    let (ok, err) = resume(&dir, "max_iters = 3\neval_interval = 2", "step_00000002");
    assert!(ok && err.contains("step_00000002 at step 2"), "{err}");
    // A tag directory of another run, into a fresh out_dir.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let tag = first.out.join("step_00000004");
    let (ok, err) = resume(&other, "max_iters = 5\neval_interval = 2", tag.to_str().unwrap());
    assert!(ok && err.contains("step_00000004 at step 4"), "{err}");
    assert!(other.join("out/final/manifest.json").is_file());
    // A tag that is not there is named, with the tags that are.
    let (ok, err) = resume(&dir, "max_iters = 3", "step_00000009");
    assert!(!ok && err.contains("no tag \"step_00000009\"") && err.contains("tags here: final, "), "{err}");
    // resume_from without init_from = "resume" is refused, saying how.
    let cfg = config(&dir, &data, "resume_from = \"step_00000002\"");
    let (ok, err) = run_out(&mut train_command(&cfg, &[], &[]));
    assert!(!ok && err.contains("needs init_from = \"resume\""), "{err}");
}

/// `tensorboard_dir`: event files that TensorBoard's own reader (tools/read_tfevents.py) reads
/// back with the values metrics.jsonl holds; a resumed run adds a file beside the first.
#[test]
fn tensorboard_events_hold_what_metrics_jsonl_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let dir = tmp.path().join("run");
    let tb = tmp.path().join("tb");
    let keys = format!("eval_interval = 2\ntensorboard_dir = \"{}\"", tb.display());
    let first = train(&dir, &data, 2, &format!("{keys}\nmax_iters = 4"), &[]);
    assert!(first.ok, "{}", first.stderr);
    let resumed = train(&dir, &data, 2, &format!("{keys}\nmax_iters = 6\ninit_from = \"resume\""), &[]);
    assert!(resumed.ok, "{}", resumed.stderr);
    assert_eq!(std::fs::read_dir(&tb).unwrap().count(), 2, "one event file per run");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/read_tfevents.py");
    let o = Command::new(common::python()).arg(script).arg(&tb).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let series = |tag: &str| -> Vec<(u64, f64)> {
        got[tag]
            .as_array()
            .unwrap_or_else(|| panic!("no {tag} in {got}"))
            .iter()
            .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
            .collect()
    };
    let loss = series("train/loss");
    let want = losses(&first.out);
    assert_eq!(loss.iter().map(|p| p.0).collect::<Vec<_>>(), want.iter().map(|p| p.0).collect::<Vec<_>>());
    for ((s, a), (_, b)) in loss.iter().zip(&want) {
        assert_eq!(*a as f32, *b as f32, "train/loss at step {s}");
    }
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(first.out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("val_loss").is_some())
        .collect();
    let val = series("eval/val_loss");
    assert_eq!(val.len(), rows.len());
    for (p, r) in val.iter().zip(&rows) {
        assert_eq!((p.0, p.1 as f32), (r["step"].as_u64().unwrap(), r["val_loss"].as_f64().unwrap() as f32));
    }
    for tag in ["train/lr", "train/grad_norm", "train/tokens_per_s", "eval/train_loss"] {
        assert!(!series(tag).is_empty(), "{tag}");
    }
    assert!(got.get("train/loss_scale").is_none(), "fp32 keeps no loss scale");
}
