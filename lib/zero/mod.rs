//! ZeRO data parallelism: the flat layout and its partition (`layout`), the training step
//! (`engine`), its state as checkpoints keep it (`state`) and its phase timings (`profile`).

mod engine;
pub mod layout;
pub mod profile;
pub mod state;

pub use engine::{Engine, EngineConfig, StepStats, ZeroError};
pub use layout::FlatLayout;
pub use state::{PartitionState, ZeroState};
