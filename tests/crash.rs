//! Crash consistency of checkpoints, through the real `train` and `ckpt` binaries on CPU ranks.
//!
//! A run saves at every other step with `keep_last = 1`, so nearly every save is followed by
//! retention retiring a tag. It is stopped by kill -9 of its whole process group (launcher and
//! ranks) at random moments, or aborted at a chosen point of a save. After every stop, `ckpt
//! verify` on the root must pass, and the next run (resuming from what is left, or starting
//! afresh when nothing was saved yet) must continue exactly as an uninterrupted run: every loss it
//! logs equal to the uninterrupted run's at that step, bit for bit, its first step the one after
//! the tag it resumed from, and, when a chain of runs reaches the last step, its final tag's files
//! identical to the uninterrupted run's.
//!
//! `ZEROKIT_TEST_SAVE_PAUSE_MS` (lib/checkpoint.rs) makes every point of a save and of retention
//! last a few milliseconds, so that random moments land inside them most of the time; rank 0's
//! log names the last point each killed run reached. ZEROKIT_CRASH_KILLS (default 12) sets the
//! kills per rank count, ZEROKIT_CRASH_SEED (default 1) the moments.

mod common;

use common::tiny::{config, dataset, launch_args, train, train_command};
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use zerokit::checkpoint;

const PAUSE_MS: &str = "15";
/// One libtorch thread per rank: these runs are many and tiny, and on a loaded machine two
/// ranks' thread pools spinning against each other make a step take a second instead of a few
/// milliseconds.
const THREADS: &str = "1";

/// The chain's configuration on `nproc` ranks (ZeRO-2 on two, stage 0 on one).
fn extra(nproc: usize) -> String {
    format!(
        "batch_size = {}\nzero_stage = {}\nmax_iters = 12\neval_interval = 2\neval_iters = 1\n\
         always_save_checkpoint = true\nkeep_last = 1",
        6 / nproc,
        if nproc > 1 { 2 } else { 0 }
    )
}

/// (step, loss bits) of every training row metrics.jsonl holds, in the order they were logged.
fn loss_rows(out: &Path) -> Vec<(u64, u64)> {
    common::tiny::losses(out).into_iter().map(|(s, l)| (s, l.to_bits())).collect()
}

/// The step a tag of `out` was saved at, from its manifest (`final` names no step).
fn tag_step(out: &Path, tag: &str) -> u64 {
    let path = out.join(tag.trim()).join("manifest.json");
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    m["step"].as_u64().unwrap_or_else(|| panic!("{}: no step", path.display()))
}

/// The tag a resume starts from: what `latest` names, or (a first save stopped before writing
/// it) the newest complete tag.
fn resume_tag(out: &Path) -> String {
    if let Ok(t) = std::fs::read_to_string(out.join("latest")) {
        return t.trim().to_string();
    }
    let mut tags: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step_") && out.join(n).join("manifest.json").is_file())
        .collect();
    tags.sort();
    tags.pop().expect("a complete tag")
}

/// sha256 of every file of the tag `latest` names but its manifest (which records the out_dir).
fn final_files(out: &Path) -> BTreeMap<String, String> {
    let tag = out.join(resume_tag(out));
    std::fs::read_dir(&tag)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "manifest.json")
        .map(|n| (n.clone(), zerokit::fsutil::sha256_file(&tag.join(&n)).unwrap()))
        .collect()
}

/// `ckpt verify ROOT` passes; a root where nothing was saved yet is not a checkpoint at all.
fn assert_verifies(out: &Path, what: &str) {
    let o = Command::new(env!("CARGO_BIN_EXE_ckpt")).arg("verify").arg(out).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let saved = out.exists() && checkpoint::any_checkpoint(out).is_some();
    if !saved {
        assert_eq!(o.status.code(), Some(2), "{what}: {text}");
        return;
    }
    assert_eq!(o.status.code(), Some(0), "{what}: ckpt verify {}:\n{text}", out.display());
}

/// The last point of a save or of retention that rank 0's log shows for the latest run.
fn last_point(out: &Path) -> String {
    let log = std::fs::read_to_string(out.join("logs/rank000.log")).unwrap_or_default();
    let run = log.rfind("zerokit train:").map_or("", |i| &log[i..]);
    run.lines()
        .filter_map(|l| l.split_once("checkpoint step_").map(|(_, rest)| rest))
        .filter_map(|rest| rest.split_once(": ").map(|(_, point)| point.trim().to_string()))
        .next_back()
        .unwrap_or_else(|| "start-up or training".into())
}

struct Reference {
    loss: BTreeMap<u64, u64>,
    files: BTreeMap<String, String>,
    secs: f64,
    /// (point, tag) of every save and retention point, in the order the run reached them.
    points: Vec<(String, String)>,
}

/// The uninterrupted run.
fn reference(dir: &Path, data: &Path, nproc: usize, env: &[(&str, &str)]) -> Reference {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = config(dir, data, &extra(nproc));
    let t = Instant::now();
    let o = train_command(&cfg, &launch_args(nproc), env).env("OMP_NUM_THREADS", THREADS).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.join("out");
    let log = std::fs::read_to_string(out.join("logs/rank000.log")).unwrap();
    let points = log
        .lines()
        .filter_map(|l| l.split_once("checkpoint step_").map(|(_, rest)| rest))
        .filter_map(|rest| rest.split_once(": ").map(|(tag, point)| (point.trim().to_string(), format!("step_{tag}"))))
        .collect();
    let loss: BTreeMap<u64, u64> = loss_rows(&out).into_iter().collect();
    assert_eq!(loss.len(), 12);
    Reference { loss, files: final_files(&out), secs: t.elapsed().as_secs_f64(), points }
}

enum Outcome {
    Completed,
    Killed,
    Failed,
}

/// When to kill a run: a time after its start, or a time after it starts its `save`-th save
/// (from 1), as rank 0's log shows.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    Never,
    After(Duration),
    InSave {
        save: usize,
        after: Duration,
    },
    /// As soon as metrics.jsonl holds the loss of this step.
    AtStep(u64),
}

/// One run of a chain in `dir`: a resume when the root holds a checkpoint, else a new run, killed
/// as `kill` says if it is still running then. Checks what it logged against `want`, then the
/// root with `ckpt verify`.
fn attempt(dir: &Path, data: &Path, nproc: usize, env: &[(&str, &str)], kill: KillAt, want: &Reference) -> Outcome {
    std::fs::create_dir_all(dir).unwrap();
    let out = dir.join("out");
    let resume = out.exists() && checkpoint::any_checkpoint(&out).is_some();
    let from = resume.then(|| tag_step(&out, &resume_tag(&out)));
    let init = if resume { "resume" } else { "scratch" };
    let cfg = config(dir, data, &format!("{}\ninit_from = \"{init}\"", extra(nproc)));
    let before = loss_rows(&out).len();
    let log = out.join("logs/rank000.log");
    let log_before = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
    let saves_started = || {
        let text = std::fs::read(&log).unwrap_or_default();
        String::from_utf8_lossy(text.get(log_before..).unwrap_or_default()).matches(": partial created").count()
    };
    let stderr = dir.join("stderr.txt");
    let mut job = train_command(&cfg, &launch_args(nproc), env)
        .env("OMP_NUM_THREADS", THREADS)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut t = Instant::now();
    let mut kill = kill;
    let outcome = loop {
        if let Some(st) = job.try_wait().unwrap() {
            break if st.success() { Outcome::Completed } else { Outcome::Failed };
        }
        if let KillAt::InSave { save, after } = kill {
            if saves_started() >= save {
                (t, kill) = (Instant::now(), KillAt::After(after));
            }
        }
        let stepped = |step| loss_rows(&out).iter().skip(before).any(|r| r.0 == step);
        if matches!(kill, KillAt::After(k) if t.elapsed() >= k) || matches!(kill, KillAt::AtStep(s) if stepped(s)) {
            // SAFETY: signals the process group spawn() created; no memory is involved.
            unsafe { libc::kill(-(job.id() as i32), libc::SIGKILL) };
            job.wait().unwrap();
            break Outcome::Killed;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    wait_for_release(&out);
    let err = std::fs::read_to_string(&stderr).unwrap_or_default();
    let what = format!("{} ({init}, {nproc} rank(s))", dir.display());
    let rows = loss_rows(&out).split_off(before);
    if let (Some(from), Some(first)) = (from, rows.first()) {
        assert_eq!(first.0, from + 1, "{what}: resumed from step {from} but trained step {} first", first.0);
    }
    for (s, bits) in &rows {
        assert_eq!(
            Some(bits),
            want.loss.get(s),
            "{what}: the loss at step {s} differs from the uninterrupted run's ({} vs {:?}); stderr:\n{err}",
            f64::from_bits(*bits),
            want.loss.get(s).map(|b| f64::from_bits(*b))
        );
    }
    assert_verifies(&out, &what);
    if let Outcome::Completed = outcome {
        assert_eq!(final_files(&out), want.files, "{what}: the final tag differs from the uninterrupted run's");
        // Whatever earlier crashes of the chain left was cleared.
        let hidden: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".step_") || n.starts_with(".latest"))
            .collect();
        assert!(hidden.is_empty(), "{what}: left behind: {hidden:?}");
    }
    outcome
}

/// Waits until the killed run's rank 0 is gone: its lock on the root is free again.
fn wait_for_release(out: &Path) {
    if !out.exists() {
        return;
    }
    let t = Instant::now();
    while zerokit::lock::RunLock::acquire(out).is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "{}: the killed run still holds its lock", out.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A small seeded generator for the kill moments.
struct Lcg(u64);

impl Lcg {
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
fn kill_9_at_random_moments_of_saves_and_retention() {
    let kills = env_number("ZEROKIT_CRASH_KILLS", 12) as usize;
    let seed = env_number("ZEROKIT_CRASH_SEED", 1);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let pause = [("ZEROKIT_TEST_SAVE_PAUSE_MS", PAUSE_MS)];
    let pause_ms = Duration::from_millis(PAUSE_MS.parse().unwrap());
    for nproc in [1usize, 2] {
        let t = Instant::now();
        let want = reference(&tmp.path().join(format!("ref{nproc}")), &data, nproc, &pause);
        let mut rng = Lcg(seed.wrapping_add(nproc as u64));
        let mut landed: BTreeMap<String, usize> = BTreeMap::new();
        let (mut killed, mut chains, mut completed) = (0, 0, 0);
        let chain_dir = |k: usize| -> PathBuf { tmp.path().join(format!("n{nproc}-chain{k}")) };
        let mut dir = chain_dir(0);
        while killed < kills {
            // Four kills in five inside a save or the retention after it: a random one of the
            // saves the run has left, a random time after it starts (a save and its retention
            // take about 12 pauses). The fifth anywhere from start-up to the end of an
            // uninterrupted run, which a resumed run may outlive.
            let out = dir.join("out");
            let done =
                (out.exists() && checkpoint::any_checkpoint(&out).is_some()).then(|| tag_step(&out, &resume_tag(&out)));
            let left = (12 - done.unwrap_or(0)) / 2;
            let kill = if rng.unit() < 0.8 && left > 0 {
                let save = 1 + (rng.unit() * left as f64) as usize;
                KillAt::InSave { save, after: pause_ms.mul_f64(14.0 * rng.unit()) }
            } else {
                KillAt::After(Duration::from_secs_f64(want.secs * (0.05 + 0.95 * rng.unit())))
            };
            match attempt(&dir, &data, nproc, &pause, kill, &want) {
                Outcome::Killed => {
                    killed += 1;
                    *landed.entry(last_point(&dir.join("out"))).or_default() += 1;
                }
                Outcome::Completed => {
                    completed += 1;
                    chains += 1;
                    dir = chain_dir(chains);
                }
                Outcome::Failed => {
                    panic!(
                        "{}: the run failed:\n{}",
                        dir.display(),
                        std::fs::read_to_string(dir.join("stderr.txt")).unwrap()
                    )
                }
            }
        }
        // The last chain runs to its end.
        if dir.join("out").exists() {
            assert!(matches!(attempt(&dir, &data, nproc, &[], KillAt::Never, &want), Outcome::Completed));
            completed += 1;
        }
        eprintln!(
            "{nproc} rank(s): {killed} kills at random moments (seed {seed}), {completed} chains resumed to the end \
             exactly, in {:.0} s; where rank 0 was when killed (the last save or retention point it reached): {landed:?}",
            t.elapsed().as_secs_f64()
        );
    }
}

/// An abort at each distinct point of a save and of retention (the first time the
/// uninterrupted run reaches it), on 2 ranks, then a re-save of the same step interrupted where
/// the new tag has just replaced the old: every time the root verifies and the resumed run ends
/// exactly as the uninterrupted one.
#[test]
fn a_crash_at_each_point_of_a_save_leaves_a_root_that_verifies_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let want = reference(&tmp.path().join("ref"), &data, 2, &[]);
    let mut points: Vec<(String, String)> = Vec::new();
    for p in &want.points {
        if !points.iter().any(|q| q.0 == p.0) {
            points.push(p.clone());
        }
    }
    for want_point in ["partial created", "tag in place", "latest written", "retire: moved aside", "retire: removed"] {
        assert!(points.iter().any(|p| p.0 == want_point), "the run never reached {want_point:?}: {points:?}");
    }
    let crash = |dir: &Path, point: &str, tag: &str| {
        let at = format!("{point}@{tag}");
        let env = [("ZEROKIT_TEST_CRASH_AT", at.as_str())];
        assert!(
            matches!(attempt(dir, &data, 2, &env, KillAt::Never, &want), Outcome::Failed),
            "{at}: the run did not stop"
        );
    };
    for (k, (point, tag)) in points.iter().enumerate() {
        let dir = tmp.path().join(format!("point{k}"));
        crash(&dir, point, tag);
        assert!(
            matches!(attempt(&dir, &data, 2, &[], KillAt::Never, &want), Outcome::Completed),
            "after a crash at {point:?} of {tag}"
        );
    }
    // Stopped after step 4's tag is in place but before `latest` names it: the resume from step 2
    // saves step 4 again, and is stopped just after the new tag replaced the old one.
    let dir = tmp.path().join("resave");
    crash(&dir, "tag in place", "step_00000004");
    assert_eq!(std::fs::read_to_string(dir.join("out/latest")).unwrap(), "step_00000002\n");
    crash(&dir, "tag in place (exchanged with the old one)", "step_00000004");
    assert!(dir.join("out/.step_00000004.partial/manifest.json").is_file(), "the old tag waits to be retired");
    assert!(matches!(attempt(&dir, &data, 2, &[], KillAt::Never, &want), Outcome::Completed));
}

/// The files of tag `tag` of `out` but its manifest (which records the configuration), with their
/// sha256.
fn tag_files(out: &Path, tag: &str) -> BTreeMap<String, String> {
    let dir = out.join(tag);
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "manifest.json")
        .map(|n| (n.clone(), zerokit::fsutil::sha256_file(&dir.join(&n)).unwrap()))
        .collect()
}

fn rank0_log(out: &Path) -> String {
    std::fs::read_to_string(out.join("logs/rank000.log")).unwrap_or_default()
}

/// A kill -9 while a save writes in the background and training has gone past it (the writers
/// of step 4 held at their first point): `latest` still names step 2, step 4 is only a hidden
/// `.partial`, the root verifies, and the resumed run continues exactly. A save that made
/// training wait for its files would have moved `latest` to step 4 before step 5 was trained.
#[test]
fn a_kill_during_a_background_write_leaves_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let want = reference(&tmp.path().join("ref"), &data, 2, &[]);
    let dir = tmp.path().join("killed");
    let hold = [("ZEROKIT_TEST_SAVE_PAUSE_MS", "20000:writing@step_00000004")];
    assert!(matches!(attempt(&dir, &data, 2, &hold, KillAt::AtStep(5), &want), Outcome::Killed));
    let out = dir.join("out");
    assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap(), "step_00000002\n");
    assert!(out.join(".step_00000004.partial").is_dir() && !out.join("step_00000004").exists());
    assert!(!out.join(".step_00000004.partial/manifest.json").exists());
    let log = rank0_log(&out);
    assert!(
        log.contains("save of step_00000004: training paused") && log.contains("writing in the background"),
        "{log}"
    );
    assert!(matches!(attempt(&dir, &data, 2, &[], KillAt::Never, &want), Outcome::Completed));
}

/// A save called while the one before is still writing (step 2's writers held 4 s) waits for
/// it: every tag completes and verifies, and each holds the state of its own step, byte for byte
/// what a run that saves synchronously (`async_save = false`) writes, though training went on
/// while the host copies were written.
#[test]
fn a_save_while_one_is_writing_waits_for_it_and_both_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let base = "batch_size = 3\nzero_stage = 2\nmax_iters = 8\neval_interval = 2\neval_iters = 1\n\
                always_save_checkpoint = true\nkeep_last = 10";
    let threads = ("OMP_NUM_THREADS", THREADS);
    let sync = train(&tmp.path().join("sync"), &data, 2, &format!("{base}\nasync_save = false"), &[threads]);
    assert!(sync.ok, "{}", sync.stderr);
    let hold = [("ZEROKIT_TEST_SAVE_PAUSE_MS", "4000:writing@step_00000002"), threads];
    let bg = train(&tmp.path().join("async"), &data, 2, base, &hold);
    assert!(bg.ok, "{}", bg.stderr);
    assert_eq!(
        bg.losses.iter().map(|(s, l)| (*s, l.to_bits())).collect::<Vec<_>>(),
        sync.losses.iter().map(|(s, l)| (*s, l.to_bits())).collect::<Vec<_>>()
    );
    for tag in ["step_00000002", "step_00000004", "step_00000006", "step_00000008", "final"] {
        assert_eq!(tag_files(&bg.out, tag), tag_files(&sync.out, tag), "{tag}");
        let o = Command::new(env!("CARGO_BIN_EXE_ckpt")).arg("verify").arg(bg.out.join(tag)).output().unwrap();
        assert!(o.status.success(), "{tag}: {}", String::from_utf8_lossy(&o.stdout));
    }
    assert_eq!(std::fs::read_to_string(bg.out.join("latest")).unwrap(), "final\n");
    let log = rank0_log(&bg.out);
    let line = log.lines().find(|l| l.contains("save of step_00000004: training paused")).expect("step 4 saved");
    let waited: f64 = line.split("previous save ").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
    assert!(waited >= 1.0, "the save of step 4 did not wait for step 2's: {line}");
    let at = |needle: &str| log.find(needle).unwrap_or_else(|| panic!("{needle:?} not in {log}"));
    assert!(at("/step_00000002: ") < at("save of step_00000004: training paused"), "{log}");
    let sync_log = rank0_log(&sync.out);
    assert!(sync_log.contains("save of step_00000004: training paused") && sync_log.contains("a blocking save"));
}

/// With optimizer offload the partition is already in host memory: a background save writes it
/// in place, with no second copy, and the next optimizer step waits for the writer (held 3 s
/// here) rather than change it under the writer. Each tag is byte for byte what a synchronous
/// save writes, and the losses are the same.
#[test]
fn an_offloaded_partition_is_saved_in_place_and_the_next_step_waits_for_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let base = "batch_size = 3\nzero_stage = 1\noffload_optimizer = true\nmax_iters = 6\neval_interval = 2\n\
                eval_iters = 1\nalways_save_checkpoint = true\nkeep_last = 10";
    let threads = ("OMP_NUM_THREADS", THREADS);
    let sync = train(&tmp.path().join("sync"), &data, 2, &format!("{base}\nasync_save = false"), &[threads]);
    assert!(sync.ok, "{}", sync.stderr);
    let hold = [("ZEROKIT_TEST_SAVE_PAUSE_MS", "3000:writing@step_00000002"), threads];
    let bg = train(&tmp.path().join("async"), &data, 2, base, &hold);
    assert!(bg.ok, "{}", bg.stderr);
    assert_eq!(
        bg.losses.iter().map(|(s, l)| (*s, l.to_bits())).collect::<Vec<_>>(),
        sync.losses.iter().map(|(s, l)| (*s, l.to_bits())).collect::<Vec<_>>()
    );
    for tag in ["step_00000002", "step_00000004", "step_00000006", "final"] {
        assert_eq!(tag_files(&bg.out, tag), tag_files(&sync.out, tag), "{tag}");
    }
    let log = rank0_log(&bg.out);
    assert!(log.contains("writing in the background, the host partition in place"), "{log}");
    let line = log.lines().find(|l| l.contains("the optimizer step waited")).expect("the step waited for the writer");
    let waited: f64 = line.split("waited ").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
    assert!(waited >= 1.0, "{line}");
}

/// A background write that fails (its `.partial` removed under it while its writers are held)
/// ends the run at the next step with an error naming the tag and the file, on every rank, and
/// leaves `latest` on the previous tag.
#[test]
fn a_failed_background_write_ends_the_run_with_its_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data);
    let dir = tmp.path().join("run");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = config(&dir, &data, &extra(2));
    let hold = [("ZEROKIT_TEST_SAVE_PAUSE_MS", "3000:writing@step_00000004")];
    let job = train_command(&cfg, &launch_args(2), &hold)
        .env("OMP_NUM_THREADS", THREADS)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = dir.join("out");
    let t = Instant::now();
    while !rank0_log(&out).contains("checkpoint step_00000004: writing") {
        assert!(t.elapsed() < Duration::from_secs(60), "the save of step 4 never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::fs::remove_dir_all(out.join(".step_00000004.partial")).unwrap();
    let o = job.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("saving step_00000004: the save failed in the background")
            && err.contains("step_00000004/rank_0000"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap(), "step_00000002\n");
    assert_verifies(&out, "after a failed background write");
}
