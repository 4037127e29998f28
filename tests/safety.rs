//! What a user types cannot lose work or pass silently (issue 11): outputs that would replace an
//! input, unbounded thread counts, `latest` files that point elsewhere or nowhere, inputs that are
//! not files, signals in the middle of a write, and `ckpt verify`'s exit statuses. Each test runs
//! the real binaries.

mod common;

use common::tiny::copy_dir;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn run(bin: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    Command::new(bin).args(args.iter().map(|a| a.as_ref())).env("ZEROKIT_NO_CUDA", "1").output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every file under `dir` with its bytes, to show that nothing changed.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path(), fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// A DeepSpeed ZeRO-2 checkpoint root (a committed fixture made by DeepSpeed) under `dir`.
fn deepspeed_root(dir: &Path) -> PathBuf {
    let root = dir.join("ds");
    copy_dir(&Path::new(ROOT).join("tests/fixtures/deepspeed/s2_bf16_w2"), &root);
    root
}

fn latest_tag(root: &Path) -> PathBuf {
    root.join(fs::read_to_string(root.join("latest")).unwrap().trim())
}

#[test]
fn zero_to_fp32_never_writes_over_its_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let root = deepspeed_root(d.path());
    let before = snapshot(&root);
    let tag = latest_tag(&root);
    let some_file = fs::read_dir(&tag).unwrap().flatten().next().unwrap().path();
    let outputs: [(&Path, &str); 5] = [
        (&root, "is the input"),
        (&tag, "lies inside the input"),
        (&some_file, "lies inside the input"),
        (&root.join("latest"), "lies inside the input"),
        (d.path(), "contains the input"),
    ];
    for (out, how) in outputs {
        let o = run(env!("CARGO_BIN_EXE_zero-to-fp32"), &[&root, &out, &"--force"]);
        let e = stderr(&o);
        assert!(!o.status.success() && e.contains(how) && e.contains("--force never"), "{}: {e}", out.display());
        assert_eq!(snapshot(&root), before, "{}: the checkpoint changed", out.display());
    }
    // Given a tag, its root is refused too; a new file beside the checkpoint is fine.
    let o = run(env!("CARGO_BIN_EXE_zero-to-fp32"), &[&tag, &root, &"--force"]);
    assert!(!o.status.success() && stderr(&o).contains("contains the input"), "{}", stderr(&o));
    let o = run(env!("CARGO_BIN_EXE_zero-to-fp32"), &[&root, &d.path().join("model.safetensors")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(snapshot(&root), before);
}

#[test]
fn prepare_never_writes_over_its_input() {
    let d = tempfile::tempdir().unwrap();
    let corpus = d.path().join("corpus");
    fs::create_dir(&corpus).unwrap();
    fs::copy(Path::new(ROOT).join("data/tinyshakespeare.txt"), corpus.join("input.txt")).unwrap();
    let before = snapshot(&corpus);
    let file = corpus.join("input.txt");
    for (input, out, how) in [
        (&corpus, corpus.clone(), "is the input"),
        (&corpus, d.path().to_path_buf(), "contains the input"),
        (&file, corpus.clone(), "contains the input"),
        (&file, file.clone(), "is the input"),
        (&corpus, corpus.join("./../corpus/input.txt"), "lies inside the input"),
    ] {
        let o = run(env!("CARGO_BIN_EXE_prepare"), &[input, &"--out", &out, &"--force"]);
        let e = stderr(&o);
        assert!(!o.status.success() && e.contains(how), "{} -> {}: {e}", input.display(), out.display());
        assert_eq!(snapshot(&corpus), before);
    }
}

#[test]
fn thread_counts_are_bounded() {
    let d = tempfile::tempdir().unwrap();
    let root = deepspeed_root(d.path());
    let o = run(env!("CARGO_BIN_EXE_zero-to-fp32"), &[&root, &d.path().join("m.safetensors"), &"--threads", &"100000"]);
    assert!(!o.status.success() && stderr(&o).contains("--threads 100000 is more than"), "{}", stderr(&o));
    let text = Path::new(ROOT).join("data/tinyshakespeare.txt");
    let o = run(env!("CARGO_BIN_EXE_prepare"), &[&text, &"--out", &d.path().join("t"), &"--threads", &"100000"]);
    assert!(!o.status.success() && stderr(&o).contains("--threads 100000 is more than"), "{}", stderr(&o));
    assert!(!d.path().join("t").exists());
}

#[test]
fn latest_must_name_a_tag_of_its_own_root() {
    let d = tempfile::tempdir().unwrap();
    let root = deepspeed_root(d.path());
    let other = deepspeed_root(&d.path().join("other"));
    let tag_name = latest_tag(&root).file_name().unwrap().to_string_lossy().into_owned();
    let out = d.path().join("m.safetensors");
    for (latest, says) in [
        (latest_tag(&other).display().to_string(), "which is not a tag of this root"),
        (format!("../other/ds/{tag_name}"), "which is not a tag of this root"),
        (String::new(), "is empty"),
        ("global_step999".to_string(), "names tag \"global_step999\", which does not exist"),
    ] {
        fs::write(root.join("latest"), &latest).unwrap();
        let o = run(env!("CARGO_BIN_EXE_zero-to-fp32"), &[&root, &out]);
        let e = stderr(&o);
        assert!(!o.status.success() && e.contains(says), "latest = {latest:?}: {e}");
        assert!(e.contains(&format!("tags here: {tag_name}")), "latest = {latest:?}: {e}");
        assert!(!out.exists());
    }
    fs::remove_file(root.join("latest")).unwrap();
    fs::create_dir(root.join("latest")).unwrap();
    let e = stderr(&run(env!("CARGO_BIN_EXE_zero-to-fp32"), &[&root, &out]));
    assert!(e.contains("latest: is a directory") && e.contains(&tag_name), "{e}");
    fs::remove_dir(root.join("latest")).unwrap();
    let e = stderr(&run(env!("CARGO_BIN_EXE_zero-to-fp32"), &[&root, &out]));
    assert!(e.contains("no `latest` file") && e.contains(&tag_name) && e.contains("--tag"), "{e}");
    assert!(run(env!("CARGO_BIN_EXE_zero-to-fp32"), &[&root, &out, &"--tag", &tag_name]).status.success());
}

#[test]
fn prepare_refuses_pipes_and_dangling_links_by_name() {
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("stream");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let e = stderr(&run(env!("CARGO_BIN_EXE_prepare"), &[&fifo, &"--out", &d.path().join("a")]));
    assert!(e.contains(&format!("{}: not a regular file", fifo.display())), "{e}");
    let corpus = d.path().join("corpus");
    fs::create_dir(&corpus).unwrap();
    fs::write(corpus.join("a.txt"), "hello world\n").unwrap();
    std::os::unix::fs::symlink(d.path().join("gone.txt"), corpus.join("b.txt")).unwrap();
    for input in [corpus.clone(), corpus.join("b.txt")] {
        let e = stderr(&run(env!("CARGO_BIN_EXE_prepare"), &[&input, &"--out", &d.path().join("b")]));
        assert!(e.contains("b.txt: a symbolic link to") && e.contains("gone.txt, which does not exist"), "{e}");
    }
    assert!(!d.path().join("a").exists() && !d.path().join("b").exists());
}

#[test]
fn write_errors_name_the_output_the_user_asked_for() {
    let text = Path::new(ROOT).join("data/tinyshakespeare.txt");
    let o = run(env!("CARGO_BIN_EXE_prepare"), &[&text, &"--out", &"/proc/zerokit-out"]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("/proc/zerokit-out:") && !e.contains(".tmp-"), "{e}");
}

/// Ctrl-C or SIGTERM in the middle of `prepare` removes its hidden temporary output, and a run
/// finds and removes what a process killed outright left.
#[test]
fn signals_leave_no_temporary_output() {
    let d = tempfile::tempdir().unwrap();
    let big = d.path().join("big.txt");
    let text = fs::read(Path::new(ROOT).join("data/tinyshakespeare.txt")).unwrap();
    fs::write(&big, text.repeat(60)).unwrap(); // ~65 MB: seconds of work on one thread
    let out = d.path().join("out");
    let stale = d.path().join(".out.tmp-2147483647");
    fs::create_dir(&stale).unwrap();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_prepare"))
            .args([big.as_os_str(), "--out".as_ref(), out.as_os_str(), "--threads".as_ref(), "1".as_ref()])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let tmp = d.path().join(format!(".out.tmp-{}", child.id()));
        let t0 = std::time::Instant::now();
        while !tmp.join("train.bin").exists() {
            assert!(t0.elapsed().as_secs() < 60, "no temporary output appeared");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = child.wait().unwrap();
        assert!(!status.success(), "prepare finished before the signal: make the input larger");
        let left: Vec<String> =
            fs::read_dir(d.path()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(left, ["big.txt"], "after signal {sig}");
    }
    assert!(!stale.exists());
}

/// `ckpt verify`: 0 intact, 1 damaged, 2 unreadable (not found, not a checkpoint, garbage, a
/// file this user may not read).
#[test]
fn verify_exit_statuses_are_consistent() {
    let d = tempfile::tempdir().unwrap();
    let root = deepspeed_root(d.path());
    let verify = |p: &Path| run(env!("CARGO_BIN_EXE_ckpt"), &[&"verify", &p]).status.code().unwrap();
    assert_eq!(verify(&root), 0);
    let garbage = d.path().join("x.safetensors");
    fs::write(&garbage, b"this is not a checkpoint at all").unwrap();
    assert_eq!(verify(&garbage), 2);
    fs::write(d.path().join("notes.txt"), b"hello").unwrap();
    assert_eq!(verify(&d.path().join("notes.txt")), 2);
    assert_eq!(verify(&d.path().join("missing")), 2);

    // A storage byte flipped: damaged.
    let tag = latest_tag(&root);
    let states = fs::read_dir(&tag)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().contains("optim_states"));
    let states = states.unwrap();
    let mut bytes = fs::read(&states).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    fs::write(&states, &bytes).unwrap();
    assert_eq!(verify(&root), 1);

    // A file that exists but cannot be read by this user: unreadable, whatever else is wrong.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&states, fs::Permissions::from_mode(0o000)).unwrap();
    // SAFETY: getuid has no preconditions.
    let o = if unsafe { libc::getuid() } == 0 {
        // root reads everything: run verify as nobody.
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_ckpt"), "verify"])
            .arg(&root)
            .env("ZEROKIT_NO_CUDA", "1")
            .output()
            .unwrap()
    } else {
        run(env!("CARGO_BIN_EXE_ckpt"), &[&"verify", &root])
    };
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(2), "{out}{}", stderr(&o));
    assert!(out.contains(&format!("{}: cannot be read", states.display())), "{out}");
}
