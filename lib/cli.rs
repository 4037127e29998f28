//! Values the binaries' command lines share.

/// Threads beyond this many per core only add scheduling and memory (each worker holds buffers),
/// and a typo such as `--threads 100000` would starve the machine.
const MAX_THREADS_PER_CORE: usize = 4;

/// The worker count for a `--threads N` flag: 0 means one per core; more than
/// [`MAX_THREADS_PER_CORE`] per core (at least 8 in all) is refused with a message that says why.
pub fn threads(requested: usize) -> Result<usize, String> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let max = (cores * MAX_THREADS_PER_CORE).max(8);
    match requested {
        0 => Ok(cores),
        n if n > max => Err(format!(
            "--threads {n} is more than {MAX_THREADS_PER_CORE} per core (this machine has {cores}, so at most {max}); \
             0 uses one per core"
        )),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn thread_counts_are_bounded() {
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(super::threads(0).unwrap(), cores);
        assert_eq!(super::threads(3).unwrap(), 3);
        let e = super::threads(100_000).unwrap_err();
        assert!(e.contains("--threads 100000") && e.contains("0 uses one per core"), "{e}");
    }
}
