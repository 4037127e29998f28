//! `train`: GPT-2 training with ZeRO data parallelism. See `train --help` and docs/.
use clap::Parser;

fn main() -> anyhow::Result<()> {
    zerokit::train::run_cli(zerokit::train::TrainCli::parse())?;
    Ok(())
}
