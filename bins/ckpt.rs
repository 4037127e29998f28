//! `ckpt`: checkpoint and memory tools. `ckpt estimate` prints per-GPU and per-node memory for
//! ZeRO stages 0-3 (docs/estimate.md).

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ckpt", version, about = "zerokit checkpoint and memory tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Estimate GPU and CPU memory per ZeRO stage for a GPT-2 model and a cluster shape.
    Estimate(zerokit::memory::EstimateArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    zerokit::logging::init(0, None)?;
    match cli.command {
        Command::Estimate(args) => print!("{}", zerokit::memory::run(&args)?),
    }
    Ok(())
}
