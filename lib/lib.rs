//! zerokit: GPT-2 training with ZeRO data parallelism, and sharded-checkpoint tools.
//! One module per concern; docs/ARCHITECTURE.md has the map.

pub mod checkpoint;
pub mod ckpt;
pub mod cli;
pub mod comm;
pub mod config;
pub mod convert;
pub mod data;
pub mod device;
pub mod formats;
pub mod fsutil;
pub mod hub;
pub mod interop;
pub mod kernels;
pub mod launch;
pub mod lock;
pub mod logging;
pub mod memory;
pub mod model;
pub mod optim;
pub mod plot;
pub mod scaler;
pub mod train;
pub mod units;
pub mod zero;
