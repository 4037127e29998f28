//! The exclusive lock a `train` run holds on its `out_dir` for its whole life: an flock(2) on
//! `out_dir/train.lock`. The kernel releases it when the holder's last descriptor closes, so a
//! run that dies (kill -9 included) never leaves a stale lock behind, and a second run started
//! on the same directory is refused at once, told which process holds it.
//!
//! The file itself stays after the run (removing it would race with a run taking it); its
//! contents, "pid P on host H", are only a description of the current or last holder.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The lock file's name inside the directory it guards.
pub const LOCK_FILE: &str = "train.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{dir} is in use by another train run ({holder}; lock file {lock}): two runs on one out_dir would replace \
         each other's checkpoints. Wait for it to finish, stop it, or train into another out_dir"
    )]
    Held { dir: PathBuf, lock: PathBuf, holder: String },
}

/// A held lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    path: PathBuf,
}

impl RunLock {
    /// Takes the lock on `dir` (created if missing) without waiting, and records this process in
    /// the lock file. Refused with the holder's pid and host when another process holds it.
    pub fn acquire(dir: &Path) -> Result<RunLock, LockError> {
        std::fs::create_dir_all(dir).map_err(|e| LockError::Io { path: dir.to_path_buf(), source: e })?;
        let path = dir.join(LOCK_FILE);
        let io = |e| LockError::Io { path: path.clone(), source: e };
        // Not truncated on open: a refused run must leave the holder's description readable.
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        // SAFETY: flock on a descriptor this function owns; it has no memory effects.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io(e));
            }
            return Err(LockError::Held { dir: dir.to_path_buf(), lock: path.clone(), holder: holder(&mut file) });
        }
        let me = format!("pid {} on host {}\n", std::process::id(), crate::launch::hostname());
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(me.as_bytes()).map_err(io)?;
        Ok(RunLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What the lock file says about its holder. The holder writes it just after taking the lock,
/// so a run refused in that instant may find it empty: it looks again for a moment.
fn holder(file: &mut File) -> String {
    for _ in 0..20 {
        let mut text = String::new();
        if file.seek(SeekFrom::Start(0)).is_ok() && file.read_to_string(&mut text).is_ok() && !text.trim().is_empty() {
            return text.trim().to_string();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    "holder unknown: the lock file names no process".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_and_released_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(d.path()).unwrap();
        // flock locks belong to the open file description: a second open in this process
        // conflicts as another process would.
        let err = RunLock::acquire(d.path()).unwrap_err().to_string();
        let want = format!("pid {} on host {}", std::process::id(), crate::launch::hostname());
        assert!(err.contains("is in use by another train run") && err.contains(&want), "{err}");
        drop(first);
        let again = RunLock::acquire(d.path()).unwrap();
        assert_eq!(std::fs::read_to_string(again.path()).unwrap().trim(), want);
    }
}
