//! zerokit: GPT-2 training with ZeRO data parallelism, and sharded-checkpoint tools.
//! One module per concern; docs/ARCHITECTURE.md has the map.

pub mod data;
pub mod device;
pub mod fsutil;
pub mod logging;
pub mod memory;
pub mod optim;
pub mod scaler;
