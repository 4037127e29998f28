//! `prepare`: tokenize text into nanoGPT-compatible train.bin / val.bin. See docs/prepare.md.

use clap::Parser;
use std::process::ExitCode;
use zerokit::data::{prepare, PrepareArgs};

fn run() -> anyhow::Result<()> {
    let args = PrepareArgs::parse();
    zerokit::logging::init(0, None)?;
    let command: Vec<String> = std::env::args().collect();
    prepare(&args, &command)?;
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The message alone: these are input errors, a backtrace (RUST_BACKTRACE) would bury it.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
