//! zero-to-fp32: consolidate a zerokit or DeepSpeed ZeRO checkpoint into safetensors.
//! See docs/zero-to-fp32.md.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = zerokit::convert::ConvertArgs::parse();
    zerokit::logging::init(0, None)?;
    zerokit::convert::run(&args)?;
    Ok(())
}
