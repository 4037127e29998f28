//! ZeRO data parallelism: the flat layout and its partition (`layout`), the training step
//! (`engine`), stage 3's gathered parameters (`gather`), offload's host memory (`host`), its
//! state as checkpoints keep it (`state`) and its phase timings (`profile`).

mod engine;
pub mod gather;
pub mod host;
pub mod layout;
pub mod profile;
pub mod state;

pub use engine::{Engine, EngineConfig, Held, StepStats, ZeroError};
pub use layout::FlatLayout;
pub use state::{PartitionState, ZeroState};
