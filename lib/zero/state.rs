//! The engine's state as it crosses to a checkpoint and back: typed, so that checkpoint code
//! reads and writes it without knowing the engine.

use super::layout::FlatLayout;
use crate::optim::AdamWConfig;
use crate::scaler::ScalerState;
use tch::{Kind, Tensor};

/// This rank's training state, as a checkpoint stores it and gives it back.
pub struct ZeroState {
    pub stage: u8,
    pub world: usize,
    /// The compute dtype of the model's weights.
    pub kind: Kind,
    pub layout: FlatLayout,
    /// Which partition of `layout` this rank holds.
    pub partition: usize,
    /// This rank is the one that saves `partition`: with stage 0 every rank holds the same
    /// partition, and rank 0 alone writes it.
    pub saves: bool,
    /// fp32 master weights, Adam's moments (this rank's partition) and Adam's step count.
    pub master: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub optimizer_step: u64,
    pub adamw: AdamWConfig,
    /// The dynamic loss scaler's state (fp16 only).
    pub scaler: Option<ScalerState>,
}

/// The partition state a checkpoint gives back to [`Engine::load_state`]: this rank's partition
/// of the engine's layout (`ZeroState::layout`, `partition`), fp32, on any device.
pub struct PartitionState {
    pub master: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub optimizer_step: u64,
    pub scaler: Option<ScalerState>,
}
