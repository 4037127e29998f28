//! Models, and the contract between a model and the ZeRO engine ([`Model`]). The engine knows
//! no model: this trait tells it which parameters exist, which of them each piece of the
//! forward uses, and in which order their gradients become ready; GPT-2 ([`gpt2`]) is one
//! implementation.

pub mod gpt2;

pub use gpt2::{Gpt, GptConfig, ModelError, ParamSpec, HEAD_CHUNK_TOKENS, INIT_STD, LAYER_NORM_EPS, PRESETS};
use tch::{Device, Kind, TchError, Tensor};

/// What the ZeRO engine needs of a model to train it.
///
/// Forward runs `embed`, then `block(0)` .. `block(n_blocks - 1)`, then the head inside
/// `head_backward`; backward runs the other way: the head, the blocks last first, the embedding.
/// The engine cuts the forward at block boundaries so that backward can run (and, with
/// activation checkpointing, recompute) one block at a time, handing each finished bucket of
/// gradients to the collectives while the next block's backward runs. A parameter used by
/// several pieces (GPT-2's token embedding, tied to the head) receives the sum of their
/// gradients; its bucket is complete after the last of them.
pub trait Model {
    /// Every parameter in canonical order, as handles sharing the parameter's storage: the
    /// engine re-points them into its flat buffer with `set_data`, and saves through them.
    fn named_parameters(&self) -> Vec<(String, Tensor)>;
    /// The parameter names grouped into gradient buckets, in gradient-ready order: bucket 0's
    /// gradients are complete first in backward. Every parameter is in exactly one bucket.
    fn buckets(&self) -> Vec<Vec<String>>;
    fn n_blocks(&self) -> usize;
    /// Names of the parameters `embed`, `block(i)` and `head_backward` use.
    fn embed_parameters(&self) -> Vec<String>;
    fn block_parameters(&self, i: usize) -> Vec<String>;
    fn head_parameters(&self) -> Vec<String>;
    /// Token ids [B, T] to the residual stream.
    fn embed(&self, idx: &Tensor) -> Tensor;
    /// Block `i` on the residual stream.
    fn block(&self, i: usize, x: &Tensor) -> Tensor;
    /// Forward and backward of the head on the last block's output `x`: the loss (unscaled,
    /// fp32 scalar) and the gradients of `loss * scale` with respect to `x` and to the head's
    /// parameters.
    fn head_backward(&self, x: &Tensor, targets: &Tensor, scale: f64) -> Result<HeadGrads, TchError>;
    /// The loss of `idx` -> `targets` without gradients (evaluation).
    fn eval_loss(&self, idx: &Tensor, targets: &Tensor) -> Tensor;
    /// Records where the parameters live after the engine re-pointed them (device and kind).
    fn set_placement(&mut self, device: Device, kind: Kind);
}

/// The head's loss and gradients, from [`Model::head_backward`].
pub struct HeadGrads {
    /// Mean loss (fp32 scalar, unscaled).
    pub loss: Tensor,
    /// Gradient of `loss * scale` with respect to the head's input.
    pub input: Tensor,
    /// Gradients of `loss * scale` with respect to the head's parameters, by name.
    pub params: Vec<(String, Tensor)>,
}

/// Backward of `y` seeded with the gradient `grad_y` (a vector-Jacobian product), returning the
/// gradients of `inputs` without accumulating them into `.grad`. This is the block-by-block
/// backward of the split forward: tch's run_backward seeds with ones, so the seed is folded in as
/// sum(y * grad_y), whose gradient with respect to y is exactly grad_y.
pub fn vjp(y: &Tensor, grad_y: &Tensor, inputs: &[&Tensor], keep_graph: bool) -> Vec<Tensor> {
    let seeded = (y * grad_y.detach()).sum(Kind::Float);
    Tensor::run_backward(&[seeded], inputs, keep_graph, false)
}
