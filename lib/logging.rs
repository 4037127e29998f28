//! Console and file logging through tracing, and progress bars through indicatif.
//! Only rank 0 writes to the console; every rank writes its own log file. Console lines are
//! printed through the shared progress display so they never tear a progress bar.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{filter::LevelFilter, EnvFilter, Layer};

static PROGRESS: OnceLock<MultiProgress> = OnceLock::new();
static RANK: OnceLock<usize> = OnceLock::new();

fn multi() -> &'static MultiProgress {
    PROGRESS.get_or_init(MultiProgress::new)
}

/// Whether this process owns the console (rank 0, or a single-process tool).
pub fn is_console_rank() -> bool {
    RANK.get().is_none_or(|&r| r == 0)
}

#[derive(Clone, Copy)]
struct ConsoleWriter;

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        multi().suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for ConsoleWriter {
    type Writer = ConsoleWriter;
    fn make_writer(&'a self) -> Self::Writer {
        ConsoleWriter
    }
}

/// Installs the global subscriber. `rank` decides whether the console is written; `log_file`,
/// when given, receives every event of this rank at debug level. RUST_LOG overrides the console
/// level. Safe to call more than once (later calls are ignored).
pub fn init(rank: usize, log_file: Option<&Path>) -> std::io::Result<()> {
    let _ = RANK.set(rank);
    let console = (rank == 0).then(|| {
        let filter = EnvFilter::builder().with_default_directive(LevelFilter::INFO.into()).from_env_lossy();
        tracing_subscriber::fmt::layer()
            .with_writer(ConsoleWriter)
            .with_target(false)
            .without_time()
            .with_level(false)
            .with_filter(filter)
    });
    let file = match log_file {
        Some(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(Mutex::new(f))
                    .with_ansi(false)
                    .with_filter(LevelFilter::DEBUG),
            )
        }
        None => None,
    };
    let _ = tracing_subscriber::registry().with(console).with(file).try_init();
    let _ = INITIALIZED.set(());
    Ok(())
}

static INITIALIZED: OnceLock<()> = OnceLock::new();

/// An error and its causes on one line, each text once: zerokit's messages already embed their
/// source's text, which walking the chain (anyhow's `{:#}`, or its "Caused by:") prints again.
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cause = c.source();
    }
    out
}

/// A fatal message: into this rank's log, and on the console once (through tracing on rank 0,
/// directly on the others' stderr, which their launcher shows). Ranks share one terminal, and
/// `eprintln!` writes a line in pieces that other processes' lines cut into: the line, prefixed
/// with the rank, goes out in one write (atomic on a pipe up to PIPE_BUF, 4 KiB).
pub fn report(msg: &str) {
    tracing::error!("{msg}");
    if INITIALIZED.get().is_none() || !is_console_rank() {
        // Before `init` (an error in set-up) the rank is still known from the launcher's RANK.
        let rank = RANK.get().copied().or_else(|| std::env::var("RANK").ok()?.parse().ok());
        let text = match rank {
            Some(r) if r > 0 => format!("[rank {r}] {msg}\n"),
            _ => format!("{msg}\n"),
        };
        multi().suspend(|| {
            let _ = std::io::stderr().lock().write_all(text.as_bytes());
        });
    }
}

/// The end of every binary: on failure, `error: MESSAGE` on the console (once) and in this
/// rank's log file, and exit status 1. The message alone: these are mostly input errors, and a
/// backtrace would bury them.
pub fn finish(r: Result<(), Box<dyn std::error::Error + Send + Sync>>) -> std::process::ExitCode {
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            report(&format!("error: {}", error_text(e.as_ref())));
            std::process::ExitCode::FAILURE
        }
    }
}

/// A progress bar drawn on the console rank's terminal, hidden elsewhere (other ranks, pipes,
/// CI logs). `template` is an indicatif template.
pub fn progress_bar(len: u64, template: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    if is_console_rank() && std::io::stderr().is_terminal() {
        // Added to the shared display, which draws on stderr.
        return multi().add(pb);
    }
    pb
}
