//! `train`: GPT-2 and Llama training with ZeRO data parallelism. See `train --help` and docs/user-guide.md.
use clap::Parser;

fn run() -> anyhow::Result<()> {
    zerokit::train::run_cli(zerokit::train::TrainCli::parse())?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    zerokit::logging::finish(run().map_err(Into::into))
}
