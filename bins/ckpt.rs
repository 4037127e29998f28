//! `ckpt`: checkpoint and memory tools. `ckpt estimate` prints per-GPU and host memory for
//! ZeRO stages 0-3 and offload (docs/estimate.md); `ckpt inspect` summarizes a checkpoint and `ckpt verify`
//! checks that it is intact (docs/ckpt.md).

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ckpt", version, about = "zerokit checkpoint and memory tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Estimate GPU and host memory per ZeRO stage and offload for a GPT-2 or Llama model and a cluster shape.
    Estimate(Box<zerokit::memory::EstimateArgs>),
    /// Summarize a zerokit or DeepSpeed checkpoint, a safetensors file or a model directory.
    Inspect(zerokit::ckpt::InspectArgs),
    /// Check a checkpoint: one line per problem; exit 0 intact, 1 not, 2 unreadable.
    Verify(zerokit::ckpt::VerifyArgs),
}

fn main() -> std::process::ExitCode {
    zerokit::logging::finish(run().map_err(Into::into))
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    zerokit::logging::init(0, None)?;
    match cli.command {
        Command::Estimate(args) => print!("{}", zerokit::memory::run(&args)?),
        Command::Inspect(args) => print!("{}", zerokit::ckpt::inspect::run(&args)?),
        Command::Verify(args) => match zerokit::ckpt::verify::verify(&args) {
            Ok(report) => {
                for p in report.problems.iter().chain(&report.unreadable) {
                    println!("{p}");
                }
                std::process::exit(report.exit_code());
            }
            Err(e) => {
                eprintln!("ckpt verify: {}", zerokit::logging::error_text(&e));
                std::process::exit(2);
            }
        },
    }
    Ok(())
}
