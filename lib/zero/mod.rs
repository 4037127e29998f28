//! ZeRO data parallelism: the flat layout and its partition (`layout`), the training step
//! (`engine`) and its phase timings (`profile`).

mod engine;
pub mod layout;
pub mod profile;

pub use engine::{Engine, EngineConfig, PartitionState, StepStats, ZeroError, ZeroState};
pub use layout::FlatLayout;
