//! zero-to-fp32: consolidate a zerokit or DeepSpeed ZeRO checkpoint into safetensors.
//! See docs/zero-to-fp32.md.

use clap::Parser;

fn run() -> anyhow::Result<()> {
    let args = zerokit::convert::ConvertArgs::parse();
    zerokit::logging::init(0, None)?;
    zerokit::convert::run(&args)?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    zerokit::logging::finish(run().map_err(Into::into))
}
