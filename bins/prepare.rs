//! `prepare`: tokenize text into nanoGPT-compatible train.bin / val.bin. See docs/prepare.md.

use clap::Parser;
use zerokit::data::{prepare, PrepareArgs};

// Every tokenizing thread allocates and frees its pieces' buffers; glibc's allocator serializes
// those threads past about 8 of them, mimalloc's per-thread heaps do not.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn run() -> anyhow::Result<()> {
    let args = PrepareArgs::parse();
    zerokit::logging::init(0, None)?;
    let command: Vec<String> = std::env::args().collect();
    prepare(&args, &command)?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    zerokit::logging::finish(run().map_err(Into::into))
}
