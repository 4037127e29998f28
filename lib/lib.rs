//! zerokit: GPT-2 training with ZeRO data parallelism, and sharded-checkpoint tools.
//! One module per concern; docs/ARCHITECTURE.md has the map.

pub mod convert;
pub mod data;
pub mod device;
pub mod fsutil;
pub mod interop;
pub mod logging;
