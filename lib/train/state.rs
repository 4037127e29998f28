//! What a training run carries and how it fails.

use crate::checkpoint::Manifest;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Rendezvous(#[from] crate::comm::RendezvousError),
    #[error(transparent)]
    Comm(#[from] crate::comm::CommError),
    #[error(transparent)]
    Zero(#[from] crate::zero::ZeroError),
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Hf(#[from] crate::interop::hf::HfError),
    #[error(transparent)]
    DeepSpeed(#[from] crate::interop::deepspeed_resume::DeepSpeedResumeError),
    #[error(transparent)]
    Fs(#[from] crate::fsutil::FsError),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error("init_from: {0}")]
    Hub(#[from] crate::hub::HubError),
    #[error("{0}")]
    Other(String),
}

/// Where training stands besides the engine's state: what a checkpoint records of the run and
/// resuming restores (checkpoint manifests keep `step` and `tokens_seen` at the top and the
/// rest under `metrics`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps taken.
    pub step: u64,
    pub tokens_seen: u64,
    /// The best validation loss so far and the tag saved at it.
    pub best_val_loss: Option<f64>,
    pub best_tag: Option<String>,
    /// Evaluations since the validation loss last improved (for `patience`).
    pub stale_evals: u64,
}

/// The evaluation a checkpoint was saved at and the state early stopping needs (`metrics` in
/// its manifest). Checkpoints of earlier versions may lack the later fields.
#[derive(Serialize, Deserialize)]
struct SavedMetrics {
    #[serde(default)]
    train_loss: Option<f64>,
    #[serde(default)]
    val_loss: Option<f64>,
    #[serde(default)]
    best_val_loss: Option<f64>,
    #[serde(default)]
    best_tag: Option<String>,
    #[serde(default)]
    stale_evals: u64,
}

impl TrainState {
    /// Where training stood at the checkpoint `m`.
    pub(super) fn resumed(m: &Manifest) -> Result<TrainState, String> {
        let saved: SavedMetrics = serde_json::from_value(m.metrics.clone()).map_err(|e| format!("metrics: {e}"))?;
        Ok(TrainState {
            step: m.step,
            tokens_seen: m.tokens_seen,
            best_val_loss: saved.best_val_loss,
            best_tag: saved.best_tag,
            stale_evals: saved.stale_evals,
        })
    }

    /// What a checkpoint saved now records under `metrics`, with the last evaluation's
    /// (train, val) losses when this process made one.
    pub(super) fn metrics(&self, last_eval: Option<(f64, f64)>) -> serde_json::Value {
        serde_json::to_value(SavedMetrics {
            train_loss: last_eval.map(|e| e.0),
            val_loss: last_eval.map(|e| e.1),
            best_val_loss: self.best_val_loss,
            best_tag: self.best_tag.clone(),
            stale_evals: self.stale_evals,
        })
        .expect("metrics serialize")
    }
}
