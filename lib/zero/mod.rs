//! ZeRO data parallelism: the flat layout and its partition (`layout`), the training step
//! (`engine`) and its phase timings (`profile`).

mod engine;
pub mod layout;
pub mod profile;

pub use engine::{Engine, EngineConfig, StepStats, ZeroError};
pub use layout::FlatLayout;
