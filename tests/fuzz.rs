//! The bounded fuzzing run of the test suite (docs/fuzzing.md), on stable Rust: every target of
//! tests/common/fuzz_targets.rs replays its committed corpus (fuzz/corpus/<target>: the fixture
//! seeds and what cargo-fuzz runs kept), then runs a deterministic, seeded mutation loop over it
//! (bit flips, byte and integer sets, digit edits, truncation, insertion, deletion, copies,
//! splices) for its share of ZEROKIT_FUZZ_SECS seconds (60 by default; ZEROKIT_FUZZ_SEED picks
//! another sequence). A panic or a broken oracle fails the test; an execution that runs past
//! ZEROKIT_FUZZ_TIMEOUT seconds (10) ends the process. Either way the input is saved under
//! target/fuzz-failures/ for `cargo fuzz run <target> <file>` or this test to replay.

#[path = "common/fuzz_targets.rs"]
mod fuzz_targets;

use fuzz_targets::{corpus_dir, fixture_seeds, Target, TARGETS};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?}: not a number")))
}

fn failures_dir() -> PathBuf {
    fuzz_targets::repo().join("target/fuzz-failures")
}

fn save_failure(target: &str, input: &[u8]) -> PathBuf {
    let dir = failures_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{target}-{:016x}", fnv(input)));
    std::fs::write(&p, input).unwrap();
    p
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| (h ^ x as u64).wrapping_mul(0x100_0000_01b3))
}

/// SplitMix64: a small generator whose sequence depends only on its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u64; 12] =
    [0, 1, 2, 0x7f, 0x80, 0xff, 0x7fff, 0xffff, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, u64::MAX];

/// One random edit of `b`; `other` is another corpus input to splice from.
fn mutate(rng: &mut Rng, b: &mut Vec<u8>, other: &[u8], max_len: usize) {
    let n = b.len();
    match rng.below(10) {
        0 if n > 0 => {
            let i = rng.below(n);
            b[i] ^= 1 << rng.below(8);
        }
        1 if n > 0 => {
            let i = rng.below(n);
            b[i] = if rng.below(2) == 0 { INTERESTING[rng.below(6)] as u8 } else { rng.next() as u8 };
        }
        2 if n > 0 => {
            // A little-endian integer of 2, 4 or 8 bytes, interesting or near the old value.
            let w = [2, 4, 8][rng.below(3)];
            let i = rng.below(n);
            let end = (i + w).min(n);
            let mut old = [0u8; 8];
            old[..end - i].copy_from_slice(&b[i..end]);
            let v = match rng.below(3) {
                0 => INTERESTING[rng.below(INTERESTING.len())],
                1 => u64::from_le_bytes(old).wrapping_add(rng.below(33) as u64).wrapping_sub(16),
                _ => n as u64 + rng.below(64) as u64,
            };
            b[i..end].copy_from_slice(&v.to_le_bytes()[..end - i]);
        }
        3 if n > 0 => {
            // A digit of text (JSON numbers, pickle INT lines).
            let start = rng.below(n);
            if let Some(i) = (start..n).chain(0..start).find(|&i| b[i].is_ascii_digit()) {
                b[i] = b"0123456789-9"[rng.below(12)];
            }
        }
        4 => b.truncate(rng.below(n + 1)),
        5 if n < max_len => {
            let i = rng.below(n + 1);
            let k = 1 + rng.below(16);
            let ins: Vec<u8> =
                if rng.below(2) == 0 { vec![rng.next() as u8; k] } else { (0..k).map(|_| rng.next() as u8).collect() };
            b.splice(i..i, ins);
        }
        6 if n > 0 => {
            let i = rng.below(n);
            let k = 1 + rng.below((n - i).min(64));
            b.drain(i..i + k);
        }
        7 if n > 1 => {
            // Copy a chunk over another place of the same input.
            let (from, to) = (rng.below(n), rng.below(n));
            let k = (1 + rng.below(256)).min(n - from).min(n - to);
            let chunk = b[from..from + k].to_vec();
            b[to..to + k].copy_from_slice(&chunk);
        }
        8 if !other.is_empty() => {
            // Splice: this input's head, the other's tail.
            let (i, j) = (rng.below(n + 1), rng.below(other.len()));
            b.truncate(i);
            b.extend_from_slice(&other[j..other.len().min(j + max_len.saturating_sub(i))]);
        }
        _ if n > 0 => {
            let i = rng.below(n);
            b[i] = rng.next() as u8;
        }
        _ => b.push(rng.next() as u8),
    }
}

/// Runs inputs through one target on a worker thread, under a watchdog that ends the process if
/// one execution outlives the timeout (a hung thread cannot be stopped).
struct Runner {
    target: &'static str,
    f: Target,
    current: Arc<Mutex<Vec<u8>>>,
    started: Arc<AtomicU64>,
    epoch: Instant,
}

impl Runner {
    fn new(target: &'static str, f: Target, timeout: Duration) -> Runner {
        let current = Arc::new(Mutex::new(Vec::new()));
        let started = Arc::new(AtomicU64::new(u64::MAX));
        let epoch = Instant::now();
        let (c, s) = (current.clone(), started.clone());
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(200));
            let t = s.load(Ordering::Relaxed);
            if t != u64::MAX && epoch.elapsed().as_millis() as u64 > t + timeout.as_millis() as u64 {
                let input = c.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let p = save_failure(target, &input);
                eprintln!("fuzz {target}: an execution ran past {timeout:?} (a hang); input saved to {}", p.display());
                std::process::exit(101);
            }
        });
        Runner { target, f, current, started, epoch }
    }

    fn run(&self, input: &[u8]) {
        {
            let mut c = self.current.lock().unwrap_or_else(|e| e.into_inner());
            c.clear();
            c.extend_from_slice(input);
        }
        self.started.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        let f = self.f;
        let r = std::panic::catch_unwind(|| f(input));
        self.started.store(u64::MAX, Ordering::Relaxed);
        if let Err(e) = r {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let p = save_failure(self.target, input);
            panic!("fuzz {}: {msg}; input saved to {}", self.target, p.display());
        }
    }
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[test]
fn every_target_keeps_the_rule_on_its_corpus_and_mutations() {
    let secs = env_num("ZEROKIT_FUZZ_SECS", 60);
    let seed = env_num("ZEROKIT_FUZZ_SEED", 1);
    let timeout = Duration::from_secs(env_num("ZEROKIT_FUZZ_TIMEOUT", 10));
    let share = Duration::from_secs_f64(secs as f64 / TARGETS.len() as f64);
    let mut total = 0u64;
    for (k, &(name, f)) in TARGETS.iter().enumerate() {
        let inputs = corpus(name);
        assert!(!inputs.is_empty(), "{}: empty corpus", corpus_dir(name).display());
        // The corpus runs on a thread of its own with a roomy stack, as libFuzzer's main thread.
        let (n, mutated) = std::thread::Builder::new()
            .stack_size(64 << 20)
            .spawn(move || {
                let runner = Runner::new(name, f, timeout);
                let t0 = Instant::now();
                for input in &inputs {
                    runner.run(input);
                }
                let max_len = inputs.iter().map(Vec::len).max().unwrap_or(0) * 2 + 64;
                let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ k as u64);
                let mut mutated = 0u64;
                while t0.elapsed() < share {
                    let i = rng.below(inputs.len());
                    let mut b = inputs[i].clone();
                    let other = &inputs[rng.below(inputs.len())];
                    for _ in 0..1 + rng.below(4) {
                        mutate(&mut rng, &mut b, other, max_len);
                    }
                    runner.run(&b);
                    mutated += 1;
                }
                (inputs.len(), mutated)
            })
            .unwrap()
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        eprintln!("fuzz {name}: {n} corpus inputs replayed, {mutated} mutated executions in {share:.1?}");
        total += n as u64 + mutated;
    }
    eprintln!("fuzz: {total} executions in all (ZEROKIT_FUZZ_SECS={secs}, ZEROKIT_FUZZ_SEED={seed})");
}

/// The corpora start from the fixtures: every fixture seed is committed in its target's corpus
/// (ZEROKIT_FUZZ_WRITE_SEEDS=1 writes them, after a fixture changes).
#[test]
fn the_corpora_hold_the_fixture_seeds() {
    let write = std::env::var_os("ZEROKIT_FUZZ_WRITE_SEEDS").is_some();
    for (name, _) in TARGETS {
        let dir = corpus_dir(name);
        for (file, bytes) in fixture_seeds(name) {
            let p = dir.join(&file);
            if write {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&p, &bytes).unwrap();
            }
            assert_eq!(
                std::fs::read(&p).ok().as_ref(),
                Some(&bytes),
                "{} is missing or stale: rerun with ZEROKIT_FUZZ_WRITE_SEEDS=1",
                p.display()
            );
        }
    }
}
