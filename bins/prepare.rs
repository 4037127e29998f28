//! `prepare`: tokenize text into nanoGPT-compatible train.bin / val.bin. See docs/prepare.md.

use clap::Parser;
use zerokit::data::{prepare, PrepareArgs};

fn main() -> anyhow::Result<()> {
    let args = PrepareArgs::parse();
    zerokit::logging::init(0, None)?;
    let command: Vec<String> = std::env::args().collect();
    prepare(&args, &command)?;
    Ok(())
}
