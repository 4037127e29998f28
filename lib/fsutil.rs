//! File-system helpers shared by every writer in zerokit: atomic replacement of files and
//! directories (nothing a user had is lost, nothing partial is left under a final name), and
//! hashing for manifests.

use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use tempfile::TempPath;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}: already exists (pass --force to replace it)")]
    Exists(PathBuf),
    #[error("{output}: {how} the input {input}; refusing to write there (--force never replaces an input)")]
    Overlaps { output: PathBuf, input: PathBuf, how: &'static str },
}

impl FsError {
    /// An I/O error on `path`, named as the user knows it (see [`shown`]).
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        FsError::Io { path: shown(&path.into()), source }
    }
}

/// The path a user asked for, for messages: each component that is this process's temporary name
/// for an output (`.NAME.tmp-PID`, see [`temp_sibling`], or [`AtomicFile`]'s
/// `.NAME.tmp-PID.RANDOM`) or a checkpoint save in progress (`.NAME.partial`) becomes `NAME`. A
/// write error in the middle of building `out/` then names `out/train.bin`, not
/// `.out.tmp-4242/train.bin`.
pub fn shown(path: &Path) -> PathBuf {
    let marker = format!(".tmp-{}", std::process::id());
    fn ours<'a>(n: &'a str, marker: &str) -> Option<&'a str> {
        let (name, rest) = n.rsplit_once(marker)?;
        (rest.is_empty() || rest.starts_with('.')).then_some(name)
    }
    path.components()
        .map(|c| {
            let s = c.as_os_str().to_string_lossy();
            let hidden = s.strip_prefix('.');
            match hidden.and_then(|n| ours(n, &marker).or_else(|| n.strip_suffix(".partial"))) {
                Some(name) if !name.is_empty() => std::ffi::OsString::from(name),
                _ => c.as_os_str().to_os_string(),
            }
        })
        .collect()
}

/// `path` made absolute with symbolic links resolved, for comparing paths: the longest existing
/// ancestor is canonicalized and the components that do not exist yet are appended to it.
pub fn canonical_lenient(path: &Path) -> Result<PathBuf, FsError> {
    let abs = std::path::absolute(path).map_err(|e| FsError::io(path, e))?;
    let mut base = abs.as_path();
    let mut rest = Vec::new();
    loop {
        match base.canonicalize() {
            Ok(mut out) => {
                for c in rest.iter().rev() {
                    out.push(c);
                }
                return Ok(out);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => match (base.file_name(), base.parent()) {
                (Some(name), Some(parent)) => {
                    rest.push(name.to_os_string());
                    base = parent;
                }
                _ => return Err(FsError::io(path, e)),
            },
            Err(e) => return Err(FsError::io(path, e)),
        }
    }
}

/// Refuses an output that would remove or replace an input: `output` is one of `inputs`,
/// contains one (replacing it deletes the input), or lies inside one and already exists
/// (replacing it changes the input). Canonical paths are compared, so `.`, `..` and symbolic
/// links do not hide an overlap. A new path inside an input directory is allowed: it replaces
/// nothing. Every tool calls this before it writes, whatever `--force` says.
pub fn refuse_overlap(output: &Path, inputs: &[&Path]) -> Result<(), FsError> {
    let out = canonical_lenient(output)?;
    let exists = fs::symlink_metadata(output).is_ok();
    for input in inputs {
        let inp = canonical_lenient(input)?;
        let how = if out == inp {
            "is"
        } else if inp.starts_with(&out) {
            "contains"
        } else if exists && out.starts_with(&inp) {
            "lies inside"
        } else {
            continue;
        };
        return Err(FsError::Overlaps { output: output.to_path_buf(), input: input.to_path_buf(), how });
    }
    Ok(())
}

/// A temporary sibling name for `path`: same directory (so rename is atomic), hidden, unique to
/// this process.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Temporary outputs of this process that exist now ([`AtomicFile`], [`AtomicDir`]): what a
/// signal handler removes before the process ends.
static TEMPS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn track(tmp: &Path) {
    TEMPS.lock().unwrap_or_else(|p| p.into_inner()).push(tmp.to_path_buf());
}

fn untrack(tmp: &Path) {
    TEMPS.lock().unwrap_or_else(|p| p.into_inner()).retain(|t| t != tmp);
}

/// On SIGINT, SIGTERM or SIGHUP, removes every temporary output in progress, then ends the
/// process as the signal would have (so a parent sees the signal). Without it, Ctrl-C in the
/// middle of `prepare` or `zero-to-fp32` leaves a hidden `.OUT.tmp-PID` behind. SIGKILL cannot
/// be caught: [`remove_stale_temps`] removes what such a death leaves, on the next run.
pub fn clean_up_on_signals() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else { return };
        let _ = std::thread::Builder::new().name("signals".into()).spawn(move || {
            if let Some(sig) = signals.forever().next() {
                // Held to the end: nothing registers a new temporary after the sweep.
                let temps = TEMPS.lock().unwrap_or_else(|p| p.into_inner());
                for t in temps.iter() {
                    let _ = fs::remove_dir_all(t).or_else(|_| fs::remove_file(t));
                }
                let _ = signal_hook::low_level::emulate_default_handler(sig);
                std::process::exit(128 + sig);
            }
        });
    });
}

/// Whether process `pid` exists (on this host). A process we may not signal still exists.
fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() != libc::ESRCH }
}

/// Removes the temporary siblings of `path` (`.NAME.tmp-PID`, `.NAME.tmp-PID.RANDOM`,
/// `.NAME.old-PID`) that a process killed outright left behind: those whose PID no longer
/// exists. A live process's are its own.
pub fn remove_stale_temps(path: &Path) {
    let (Some(name), Some(dir)) = (path.file_name(), path.parent()) else { return };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let Ok(entries) = fs::read_dir(dir) else { return };
    let stem = format!(".{}.", name.to_string_lossy());
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = n.strip_prefix(&stem) else { continue };
        let pid = rest.strip_prefix("tmp-").or_else(|| rest.strip_prefix("old-"));
        // AtomicFile's temporaries carry a random part after the PID.
        let pid = pid.and_then(|p| p.split_once('.').map_or(p, |(pid, _)| pid).parse::<i32>().ok());
        if let Some(pid) = pid.filter(|&p| p > 0 && p as u32 != std::process::id() && !process_alive(p)) {
            tracing::info!("removing {}, left by process {pid}, which no longer runs", e.path().display());
            let _ = fs::remove_dir_all(e.path()).or_else(|_| fs::remove_file(e.path()));
        }
    }
}

/// A file written under a temporary name and renamed onto its final name by `commit`. Dropped
/// without `commit` (an error, a panic), the temporary file is removed and the final name is
/// untouched.
///
/// The temporary is tempfile's, in the final name's directory (so the rename is atomic) and
/// named `.NAME.tmp-PID.RANDOM`: hidden, unique even among this process's writers of one
/// name, and with the PID by which [`remove_stale_temps`] finds those of a process killed
/// outright.
pub struct AtomicFile {
    final_path: PathBuf,
    /// The writer and the temporary's name, which removes the file when dropped; None once
    /// committed.
    temp: Option<(BufWriter<File>, TempPath)>,
}

impl AtomicFile {
    pub fn create(final_path: impl Into<PathBuf>) -> Result<Self, FsError> {
        let final_path = final_path.into();
        remove_stale_temps(&final_path);
        let dir = final_path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = final_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let prefix = format!(".{name}.tmp-{}.", std::process::id());
        // Opened by hand rather than by tempfile's default, whose mode is 0600: an output is
        // created as File::create would (0666 less the umask), and tempfile does not wrap the
        // open's error in one that names the temporary.
        let open = |p: &Path| OpenOptions::new().write(true).create_new(true).mode(0o666).open(p);
        let temp =
            tempfile::Builder::new().prefix(&prefix).make_in(dir, open).map_err(|e| FsError::io(&final_path, e))?;
        let (file, tmp_path) = temp.into_parts();
        track(&tmp_path);
        Ok(AtomicFile { final_path, temp: Some((BufWriter::with_capacity(1 << 20, file), tmp_path)) })
    }

    pub fn path(&self) -> &Path {
        &self.final_path
    }

    pub fn writer(&mut self) -> &mut BufWriter<File> {
        &mut self.temp.as_mut().expect("writer is present until commit").0
    }

    /// The file itself, for positional writes (`FileExt::write_all_at`) from several threads;
    /// what was written through `writer` so far is flushed first.
    pub fn positional(&mut self) -> io::Result<&File> {
        let w = self.writer();
        w.flush()?;
        Ok(w.get_ref())
    }

    /// Flushes, fsyncs and renames onto the final name. On failure the temporary is removed.
    pub fn commit(mut self) -> Result<PathBuf, FsError> {
        let (w, tmp_path) = self.temp.take().expect("writer is present until commit");
        let tracked = tmp_path.to_path_buf();
        // Errors name the output; a failure drops `tmp_path`, which removes the temporary.
        let io_err = |e| FsError::io(&self.final_path, e);
        let done = w.into_inner().map_err(|e| io_err(e.into_error())).and_then(|file| {
            file.sync_all().map_err(io_err)?;
            drop(file);
            tmp_path.persist(&self.final_path).map_err(|e| io_err(e.error))
        });
        untrack(&tracked);
        done?;
        sync_parent(&self.final_path);
        Ok(self.final_path.clone())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer().flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if let Some((w, tmp_path)) = self.temp.take() {
            // The buffered bytes are dropped unwritten: the file is removed anyway.
            let _ = w.into_parts();
            untrack(&tmp_path);
            drop(tmp_path);
        }
    }
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    let mut f = AtomicFile::create(path)?;
    f.writer().write_all(bytes).map_err(|e| FsError::io(path, e))?;
    f.commit().map(|_| ())
}

/// Asks the kernel to start writing [offset, offset + len) of `file` to disk now, without
/// waiting (Linux `sync_file_range`); a later fsync then has little left to do. Best effort: a
/// failure here shows up at that fsync.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open for the borrow's lifetime; the call only schedules I/O.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// Best-effort fsync of a path's directory so a rename survives a crash.
pub fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// A directory built under a temporary sibling name and renamed onto its final name by `commit`.
/// Dropped without `commit`, the temporary directory is removed.
pub struct AtomicDir {
    final_path: PathBuf,
    tmp_path: PathBuf,
    done: bool,
}

impl AtomicDir {
    /// Fails with `FsError::Exists` if `final_path` exists and `force` is false.
    pub fn create(final_path: impl Into<PathBuf>, force: bool) -> Result<Self, FsError> {
        let final_path = final_path.into();
        if final_path.exists() && !force {
            return Err(FsError::Exists(final_path));
        }
        remove_stale_temps(&final_path);
        let tmp_path = temp_sibling(&final_path);
        if tmp_path.exists() {
            fs::remove_dir_all(&tmp_path).map_err(|e| FsError::io(&tmp_path, e))?;
        }
        fs::create_dir_all(&tmp_path).map_err(|e| FsError::io(&tmp_path, e))?;
        track(&tmp_path);
        Ok(AtomicDir { final_path, tmp_path, done: false })
    }

    /// Where to write the contents.
    pub fn path(&self) -> &Path {
        &self.tmp_path
    }

    /// Moves the finished directory into place. A replaced directory (with --force) is renamed
    /// aside first and removed only after the new one is in place.
    pub fn commit(mut self) -> Result<PathBuf, FsError> {
        let old = if self.final_path.exists() {
            let aside = self.final_path.with_file_name(format!(
                ".{}.old-{}",
                self.final_path.file_name().unwrap_or_default().to_string_lossy(),
                std::process::id()
            ));
            fs::rename(&self.final_path, &aside).map_err(|e| FsError::io(&self.final_path, e))?;
            Some(aside)
        } else {
            None
        };
        fs::rename(&self.tmp_path, &self.final_path).map_err(|e| FsError::io(&self.final_path, e))?;
        untrack(&self.tmp_path);
        sync_parent(&self.final_path);
        self.done = true;
        if let Some(old) = old {
            let _ = fs::remove_dir_all(old);
        }
        Ok(self.final_path.clone())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.tmp_path);
            untrack(&self.tmp_path);
        }
    }
}

/// SHA-256 computed on a thread of its own: `update` hands the bytes over and returns, so the
/// hash (one core's worth, about 1.5 GB/s with SHA instructions) runs beside the reading or
/// writing that produces them instead of in series with it. At most `depth` buffers wait (`new`).
pub struct BackgroundSha256 {
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    worker: Option<std::thread::JoinHandle<(Sha256, u64, f64)>>,
}

impl BackgroundSha256 {
    /// At most `depth` buffers wait to be hashed. The queue is what lets the hashing thread fall
    /// behind for a while (descheduled on a machine whose cores are all busy) without stalling
    /// the thread that feeds it, so it should hold tens of milliseconds of data.
    pub fn new(depth: usize) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(depth);
        let worker = std::thread::Builder::new()
            .name("sha256".into())
            .spawn(move || {
                let (mut h, mut bytes) = (Sha256::new(), 0u64);
                for buf in rx {
                    h.update(&buf);
                    bytes += buf.len() as u64;
                }
                (h, bytes, thread_cpu_seconds())
            })
            .expect("a thread can be started");
        BackgroundSha256 { tx: Some(tx), worker: Some(worker) }
    }

    /// Hashes `buf` next (taking it avoids a copy).
    pub fn update(&mut self, buf: Vec<u8>) {
        if let Some(tx) = &self.tx {
            // The worker only stops when the sender is dropped, so the send cannot fail.
            let _ = tx.send(buf);
        }
    }

    /// The digest of everything given so far, as lowercase hex.
    pub fn finish(mut self) -> String {
        drop(self.tx.take());
        let (h, bytes, cpu) =
            self.worker.take().expect("finish runs once").join().expect("the sha256 thread does not panic");
        // A serial stage: no more bytes per second than one core hashes can pass through it.
        tracing::debug!("serial stages: sha256 of {bytes} bytes with {cpu:.2} s CPU");
        hex::encode(h.finalize())
    }
}

/// CPU time consumed by the calling thread so far.
pub fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which lives on this stack frame.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// sha256 of a file's contents, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, FsError> {
    let mut f = File::open(path).map_err(|e| FsError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| FsError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Drops the pages of bytes [start, start+len) of a read-only file mapping from this process's
/// resident set (the page cache keeps them, and a later read faults them back in). Streaming a
/// many-GB file through a mapping would otherwise count every page ever touched against peak RSS.
pub fn release_mapped(map: &memmap2::Mmap, start: usize, len: usize) {
    // The range is widened by the kernel's fault-around window (64 KiB, which a fault maps around
    // itself) on each side, and memmap2 widens it to whole pages: pages a neighbouring range
    // faulted in, possibly on another thread after this one was done, are dropped too. Dropping
    // a page someone still reads only costs them a refault from the page cache, never wrong data.
    const FAULT_AROUND: usize = 64 << 10;
    let begin = start.saturating_sub(FAULT_AROUND).min(map.len());
    let end = start.saturating_add(len).saturating_add(FAULT_AROUND).min(map.len());
    if end > begin {
        // SAFETY: on a read-only file mapping MADV_DONTNEED only drops page-table entries; the
        // next access reads the same bytes from the page cache. A failure only leaves pages
        // resident.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, begin, end - begin) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_file_leaves_nothing_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.bin");
        fs::write(&target, b"old").unwrap();
        {
            let mut f = AtomicFile::create(&target).unwrap();
            f.write_all(b"new but unfinished").unwrap();
        }
        assert_eq!(fs::read(&target).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        let mut f = AtomicFile::create(&target).unwrap();
        f.write_all(b"new").unwrap();
        f.commit().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new");
    }

    #[test]
    fn atomic_dir_refuses_existing_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("keep"), b"x").unwrap();
        assert!(matches!(AtomicDir::create(&target, false), Err(FsError::Exists(_))));
        let d = AtomicDir::create(&target, true).unwrap();
        fs::write(d.path().join("new"), b"y").unwrap();
        d.commit().unwrap();
        assert!(target.join("new").exists() && !target.join("keep").exists());
    }

    #[test]
    fn outputs_that_would_replace_an_input_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let ck = d.path().join("ckpt");
        fs::create_dir_all(ck.join("step_1")).unwrap();
        fs::write(ck.join("step_1/rank_00000.safetensors"), b"x").unwrap();
        fs::write(ck.join("latest"), b"step_1").unwrap();
        std::os::unix::fs::symlink(&ck, d.path().join("link")).unwrap();
        let refused = |out: &Path, how: &str| {
            let e = refuse_overlap(out, &[&ck]).unwrap_err().to_string();
            assert!(e.contains(how) && e.contains("--force never"), "{}: {e}", out.display());
        };
        refused(&ck, "is the input");
        refused(&ck.join("step_1/../."), "is the input");
        refused(&d.path().join("link"), "is the input");
        refused(d.path(), "contains the input");
        refused(&ck.join("step_1"), "lies inside the input");
        refused(&ck.join("latest"), "lies inside the input");
        refused(&d.path().join("link/step_1/rank_00000.safetensors"), "lies inside the input");
        // New paths beside or inside the input replace nothing.
        refuse_overlap(&d.path().join("model.safetensors"), &[&ck]).unwrap();
        refuse_overlap(&ck.join("model.safetensors"), &[&ck]).unwrap();
        refuse_overlap(&d.path().join("ckpt2"), &[&ck]).unwrap();
        refuse_overlap(&d.path().join("new/deeper/out"), &[&ck]).unwrap();
    }

    #[test]
    fn errors_name_the_output_not_its_temporary() {
        let out = Path::new("/data/out");
        let inner = temp_sibling(out).join("train.bin");
        assert_eq!(shown(&inner), Path::new("/data/out/train.bin"));
        assert_eq!(shown(&temp_sibling(&inner)), Path::new("/data/out/train.bin"));
        // Another process's temporary, or a user's own dot-file, is left as it is.
        assert_eq!(shown(Path::new("a/.x.tmp-1")), Path::new("a/.x.tmp-1"));
        let e = AtomicFile::create(temp_sibling(Path::new("/nonexistent-dir/m.safetensors")).join("f")).err().unwrap();
        assert!(e.to_string().starts_with("/nonexistent-dir/m.safetensors/f:"), "{e}");
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        // A PID above the kernel's limit never runs; our own PID and the user's files stay.
        let dead = d.path().join(".out.tmp-2147483647");
        let ours = temp_sibling(&out);
        for p in [&dead, &ours, &d.path().join(".out.tmp-x"), &d.path().join(".other.tmp-2147483647")] {
            fs::create_dir(p).unwrap();
        }
        fs::write(d.path().join(".out.old-2147483647"), b"").unwrap();
        remove_stale_temps(&out);
        let mut left: Vec<String> =
            fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        let mut want = vec![
            ".other.tmp-2147483647".to_string(),
            ".out.tmp-x".into(),
            ours.file_name().unwrap().to_string_lossy().into(),
        ];
        want.sort();
        assert_eq!(left, want);
    }

    #[test]
    fn sha256_matches_known_vector() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        fs::write(&p, b"abc").unwrap();
        assert_eq!(sha256_file(&p).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
