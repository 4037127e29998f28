//! ZeRO data parallelism: the flat layout and its partition (`layout`), and the training step
//! (`engine`).

mod engine;
pub mod layout;

pub use engine::{Engine, EngineConfig, StepStats, ZeroError};
pub use layout::FlatLayout;
