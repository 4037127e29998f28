//! fp16 loss scaling with DeepSpeed's rules (the `fp16` block of a DeepSpeed config and
//! deepspeed/runtime/fp16/loss_scaler.py's DynamicLossScaler): whether a step is applied, given
//! whether its gradients overflowed (which the engine reads off the gradient norm,
//! [`crate::optim::local_grad_norm_sq`]).
//!
//! Dynamic scaling starts at `2^initial_scale_power`. An overflowing step is skipped; it spends
//! one unit of hysteresis, and once none is left (or hysteresis is 1) it halves the scale, never
//! below `min_loss_scale` (an overflow at the minimum is an error, as in DeepSpeed). After
//! `loss_scale_window` clean steps since the last overflow the scale doubles and the hysteresis
//! is refilled; with `consecutive_hysteresis` every clean step refills it.

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ScalerError {
    #[error("fp16 loss scaling: {0}")]
    Config(String),
    #[error(
        "fp16 loss scaling: gradients overflowed at the minimum loss scale {0}; the run cannot go on \
         (DeepSpeed stops here too): lower the learning rate or min_loss_scale, or train in bf16"
    )]
    AtMinimum(f64),
    #[error("fp16 loss scaling: checkpointed scaler state is invalid: {0}")]
    BadState(String),
}

/// DeepSpeed's `fp16` block (field names and defaults as in DeepSpeed, so the block
/// deserializes as is; `enabled` and `auto_cast` are the caller's business and are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScalerConfig {
    /// 0: dynamic scaling; > 0: this static scale.
    pub loss_scale: f64,
    pub initial_scale_power: u32,
    pub loss_scale_window: u64,
    pub hysteresis: u32,
    pub consecutive_hysteresis: bool,
    pub min_loss_scale: f64,
    /// DeepSpeed's DynamicLossScaler raises when it would have to go below the minimum; false
    /// keeps skipping steps at the minimum scale instead.
    pub raise_error_at_min_scale: bool,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        ScalerConfig {
            loss_scale: 0.0,
            initial_scale_power: 16,
            loss_scale_window: 1000,
            hysteresis: 2,
            consecutive_hysteresis: false,
            min_loss_scale: 1.0,
            raise_error_at_min_scale: true,
        }
    }
}

impl ScalerConfig {
    pub fn is_dynamic(&self) -> bool {
        self.loss_scale == 0.0
    }

    pub fn validate(&self) -> Result<(), ScalerError> {
        let bad = |m: String| Err(ScalerError::Config(m));
        if !(self.loss_scale >= 0.0 && self.loss_scale.is_finite()) {
            return bad(format!("loss_scale {} must be >= 0 (0 enables dynamic loss scaling)", self.loss_scale));
        }
        if !self.is_dynamic() {
            return Ok(());
        }
        if self.loss_scale_window == 0 {
            return bad("loss_scale_window must be > 0 when dynamic loss scaling is enabled".into());
        }
        if !(self.min_loss_scale > 0.0 && self.min_loss_scale.is_finite()) {
            return bad(format!("min_loss_scale {} must be > 0", self.min_loss_scale));
        }
        if self.initial_scale_power > 127 {
            return bad(format!("initial_scale_power {} is beyond fp32's range", self.initial_scale_power));
        }
        // DeepSpeed accepts 0 but then only counts the hysteresis down forever and never
        // lowers the scale: every later step would be skipped.
        if self.hysteresis == 0 {
            return bad("hysteresis must be >= 1 (1 lowers the scale at the first overflow)".into());
        }
        Ok(())
    }
}

/// Whether the optimizer step just computed may be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepDecision {
    Apply,
    Skip,
}

/// Everything a checkpoint needs to resume scaling exactly (DeepSpeed's field names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalerState {
    pub cur_scale: f64,
    pub cur_iter: u64,
    /// -1 before the first overflow.
    pub last_overflow_iter: i64,
    pub cur_hysteresis: u32,
}

#[derive(Debug, Clone)]
pub struct LossScaler {
    cfg: ScalerConfig,
    state: ScalerState,
}

impl LossScaler {
    pub fn new(cfg: ScalerConfig) -> Result<Self, ScalerError> {
        cfg.validate()?;
        let cur_scale = if cfg.is_dynamic() { 2f64.powi(cfg.initial_scale_power as i32) } else { cfg.loss_scale };
        let state = ScalerState { cur_scale, cur_iter: 0, last_overflow_iter: -1, cur_hysteresis: cfg.hysteresis };
        Ok(LossScaler { cfg, state })
    }

    pub fn config(&self) -> &ScalerConfig {
        &self.cfg
    }

    /// The factor the loss is multiplied by before backward.
    pub fn scale(&self) -> f64 {
        self.state.cur_scale
    }

    /// Records whether this step's gradients overflowed (after all ranks agreed) and moves the
    /// scale. An overflowing step is always skipped.
    pub fn update(&mut self, overflow: bool) -> Result<StepDecision, ScalerError> {
        if !self.cfg.is_dynamic() {
            if overflow {
                tracing::info!(
                    "OVERFLOW! Skipping step: gradients are not finite (static loss scale {})",
                    self.scale()
                );
                return Ok(StepDecision::Skip);
            }
            return Ok(StepDecision::Apply);
        }
        let s = &mut self.state;
        let cfg = &self.cfg;
        if overflow {
            if cfg.hysteresis == 1 || s.cur_hysteresis == 1 {
                if s.cur_scale == cfg.min_loss_scale && cfg.raise_error_at_min_scale {
                    return Err(ScalerError::AtMinimum(s.cur_scale));
                }
                let next = (s.cur_scale / 2.0).max(cfg.min_loss_scale);
                tracing::info!("OVERFLOW! Skipping step. Attempted loss scale: {}, reducing to {}", s.cur_scale, next);
                s.cur_scale = next;
            } else {
                tracing::info!(
                    "OVERFLOW! Skipping step. Attempted loss scale: {}, but hysteresis is {}. Reducing hysteresis to {}",
                    s.cur_scale,
                    s.cur_hysteresis,
                    s.cur_hysteresis - 1
                );
                s.cur_hysteresis -= 1;
            }
            s.last_overflow_iter = s.cur_iter as i64;
        } else {
            if cfg.consecutive_hysteresis {
                s.cur_hysteresis = cfg.hysteresis;
            }
            let stable_interval = s.cur_iter as i64 - s.last_overflow_iter - 1;
            if stable_interval > 0 && stable_interval as u64 % cfg.loss_scale_window == 0 {
                if !cfg.consecutive_hysteresis {
                    s.cur_hysteresis = cfg.hysteresis;
                }
                s.cur_scale *= 2.0;
                tracing::debug!("no overflow for {stable_interval} steps: loss scale raised to {}", s.cur_scale);
            }
        }
        s.cur_iter += 1;
        Ok(if overflow { StepDecision::Skip } else { StepDecision::Apply })
    }

    pub fn state(&self) -> &ScalerState {
        &self.state
    }

    /// Resumes from a checkpointed state, rejecting one this configuration could not reach.
    pub fn load_state(&mut self, state: ScalerState) -> Result<(), ScalerError> {
        if !(state.cur_scale > 0.0 && state.cur_scale.is_finite()) {
            return Err(ScalerError::BadState(format!("cur_scale {} is not a positive number", state.cur_scale)));
        }
        if state.last_overflow_iter < -1 || state.last_overflow_iter >= state.cur_iter as i64 {
            return Err(ScalerError::BadState(format!(
                "last_overflow_iter {} is not in [-1, cur_iter {})",
                state.last_overflow_iter, state.cur_iter
            )));
        }
        if self.cfg.is_dynamic() && (state.cur_hysteresis == 0 || state.cur_hysteresis > self.cfg.hysteresis) {
            return Err(ScalerError::BadState(format!(
                "cur_hysteresis {} is not in [1, hysteresis {}]",
                state.cur_hysteresis, self.cfg.hysteresis
            )));
        }
        self.state = state;
        Ok(())
    }
}
