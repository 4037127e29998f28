//! Models, and the contract between a model and the ZeRO engine ([`Model`]). The engine knows
//! no model: this trait tells it which parameters exist, which of them each piece of the
//! forward uses, and in which order their gradients become ready. GPT-2 ([`gpt2`]) and the
//! decoder ([`decoder`]) that Llama ([`llama`]) and Gemma 2 and 3 ([`gemma`]) configure implement
//! it; [`init`] is their shared seeded initialisation, [`generate`] their shared sampling (with
//! [`kv_cache`], the key/value cache and the attention masks), and
//! [`family`] holds any of them behind one type (`ModelConfig`, `AnyModel`) for whatever learns
//! the family only at run time.

pub mod decoder;
pub mod family;
pub mod gemma;
pub mod generate;
pub mod gpt2;
pub mod init;
pub mod kv_cache;
pub mod llama;

use crate::kernels;
pub use family::{preset_names, AnyModel, ModelConfig};
pub use gemma::{Gemma, GemmaConfig, GemmaVersion, LayerType};
pub use generate::{Decode, Sampling};
pub use gpt2::{Gpt, GptConfig, INIT_STD, LAYER_NORM_EPS, PRESETS};
pub use kv_cache::KvCache;
pub use llama::{Llama, LlamaConfig, LlamaVariant, RopeScaling};
use std::collections::HashMap;
use tch::{Device, Kind, Reduction, TchError, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid GPT-2 config: {0}")]
    Config(String),
    #[error("invalid Llama config: {0}")]
    LlamaConfig(String),
    #[error("invalid Gemma config: {0}")]
    GemmaConfig(String),
    #[error(
        "unknown model preset '{0}' (expected one of gpt2, gpt2-medium, gpt2-large, gpt2-xl, llama-3.2-1b, \
         llama-3.2-3b, llama-3.1-8b, llama-tiny, mistral-7b, qwen2.5-0.5b, gemma-2-2b, gemma-3-27b, gemma-tiny)"
    )]
    UnknownPreset(String),
    #[error("unsupported parameter kind {0:?} (expected Float, Half or BFloat16)")]
    Kind(Kind),
    #[error("parameter set does not match the model: {0}")]
    Params(String),
    #[error("bad generate input: {0}")]
    Generate(String),
    #[error("libtorch: {0}")]
    Torch(#[from] TchError),
}

/// The parameter kinds the models run in.
pub fn check_kind(kind: Kind) -> Result<(), ModelError> {
    match kind {
        Kind::Float | Kind::Half | Kind::BFloat16 => Ok(()),
        k => Err(ModelError::Kind(k)),
    }
}

/// A model's parameters by name, checked against its specs (every one present with its shape,
/// nothing else) and handed out one by one as leaf tensors that require grad.
pub(crate) struct NamedParams(HashMap<String, Tensor>);

impl NamedParams {
    pub(crate) fn new(specs: &[ParamSpec], named: Vec<(String, Tensor)>) -> Result<NamedParams, ModelError> {
        let map: HashMap<String, Tensor> = named.into_iter().collect();
        for spec in specs {
            let t = map.get(&spec.name).ok_or_else(|| ModelError::Params(format!("missing {}", spec.name)))?;
            if t.size() != spec.shape {
                return Err(ModelError::Params(format!(
                    "{} has shape {:?}, expected {:?}",
                    spec.name,
                    t.size(),
                    spec.shape
                )));
            }
        }
        if let Some(extra) = map.keys().find(|k| !specs.iter().any(|s| &s.name == *k)) {
            return Err(ModelError::Params(format!("unexpected {extra}")));
        }
        Ok(NamedParams(map))
    }

    /// The parameter `name`, which `new` checked is there.
    pub(crate) fn take(&mut self, name: &str) -> Tensor {
        self.0.remove(name).expect("presence checked in NamedParams::new").set_requires_grad(true)
    }
}

/// One parameter of the canonical list: its transformers name, shape, and whether AdamW decays it
/// (matrices and embeddings do; biases and norm gains do not, as in nanoGPT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<i64>,
    pub weight_decay: bool,
}

impl ParamSpec {
    /// A parameter decayed when it is a matrix or an embedding (two or more dimensions).
    pub fn new(name: String, shape: Vec<i64>) -> ParamSpec {
        let weight_decay = shape.len() >= 2;
        ParamSpec { name, shape, weight_decay }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product::<i64>() as usize
    }
}

/// Tokens per chunk of the head's backward: the [tokens, V] logits, their fp32 copy and their
/// gradient exist for one chunk at a time (about 1.2 GB at 2048 tokens and V = 50304 in fp16,
/// where a whole micro-batch of 8 x 1024 would take 4.9 GB), while each chunk's products stay
/// large enough to run at full speed.
pub const HEAD_CHUNK_TOKENS: usize = 2048;

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
    /// Logits [B, T, V] of the last block's output (the head's forward, without gradients).
    fn logits(&self, x: &Tensor) -> Tensor;
    /// The loss of `idx` -> `targets` without gradients (evaluation).
    fn eval_loss(&self, idx: &Tensor, targets: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let mut x = self.embed(idx);
            for i in 0..self.n_blocks() {
                x = self.block(i, &x);
            }
            loss(&self.logits(&x), targets)
        })
    }
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

/// Mean cross-entropy over targets != -1, computed in fp32 whatever the logits' kind.
pub fn loss(logits: &Tensor, targets: &Tensor) -> Tensor {
    let v = *logits.size().last().expect("logits are [.., V]");
    logits.to_kind(Kind::Float).view([-1, v]).cross_entropy_loss(
        &targets.view([-1]),
        None::<Tensor>,
        Reduction::Mean,
        -1,
        0.0,
    )
}

/// What the chunked head backward computes with: logits are `softcap(norm(x) @ weight^T)`, the
/// norm having the parameters `norm_params`; `names` names the norm's parameters and then the
/// weight.
pub(crate) struct Head<'a> {
    pub names: Vec<String>,
    pub norm_params: Vec<&'a Tensor>,
    pub weight: &'a Tensor,
    /// Gemma 2's final logit soft-capping, `cap * tanh(z / cap)`; None: the plain projection.
    pub softcap: Option<f64>,
}

/// [`Model::head_backward`] for a head whose logits are `norm(x) @ weight^T` ([B, T, C] to
/// [B, T, V]), soft-capped or not (see [`Head`]). Forward and backward of the head and the mean
/// cross-entropy over targets != -1 (in fp32), in chunks of whole sequences of about
/// `HEAD_CHUNK_TOKENS` tokens: the same loss and gradients as one pass, without ever holding the
/// whole [B, T, V] logits.
///
/// The projection and the loss are written out rather than left to autograd: the logits are
/// computed without a graph, [`kernels::classifier`] turns them into their own gradient in place
/// (one kernel on GPUs, where autograd would make an fp32 copy and four more passes), and the two
/// products of the backward follow. Soft-capped, the capped logits `s = cap * t` with
/// `t = tanh(z / cap)` go through the classifier, and their gradient is carried back to the
/// projection's `z` by the derivative `1 - t^2` (t is the one extra [chunk, V] tensor this costs).
/// Only the norm goes through autograd.
pub(crate) fn head_backward_in_chunks(
    x: &Tensor,
    targets: &Tensor,
    scale: f64,
    head: Head<'_>,
    norm: impl Fn(&Tensor) -> Tensor,
) -> Result<HeadGrads, TchError> {
    let (b, t, c) = (x.size()[0], x.size()[1], x.size()[2]);
    let per = ((HEAD_CHUNK_TOKENS as i64) / t.max(1)).clamp(1, b.max(1));
    // The mean's denominator over the whole micro-batch, kept on the device (no host sync).
    let count = targets.ne(-1).sum(Kind::Float);
    let w = head.weight.detach();
    let mut loss = Tensor::zeros([], (Kind::Float, x.device()));
    let mut norm_grads: Option<Vec<Tensor>> = None;
    let mut weight_grad: Option<Tensor> = None;
    let mut inputs = Vec::new();
    let mut start = 0;
    while start < b {
        let n = per.min(b - start);
        let xc = x.narrow(0, start, n).detach().set_requires_grad(true);
        let y = norm(&xc);
        let y2 = y.detach().f_reshape([-1, c])?;
        let z = y2.f_mm(&w.f_tr()?)?;
        let (logits, tanh) = match head.softcap {
            None => (z, None),
            Some(cap) => {
                let tanh = z.f_div_scalar(cap)?.f_tanh()?;
                drop(z);
                (tanh.f_mul_scalar(cap)?, Some(tanh))
            }
        };
        let rows = kernels::classifier(&logits, &targets.narrow(0, start, n).f_reshape([-1])?, &count, scale)?;
        loss += rows.f_sum(Kind::Float)?.f_div(&count)?;
        // `logits` now holds the gradient of loss * scale with respect to them; soft-capped,
        // carried back through cap * tanh(z / cap), whose derivative is 1 - tanh^2.
        let logits = match tanh {
            None => logits,
            Some(mut t) => {
                // 1 - t^2 in t's own storage: no further [chunk, V] tensor.
                let _ = t.f_mul_(&t.shallow_clone())?.f_neg_()?.f_add_scalar_(1.0)?;
                logits.f_mul(&t)?
            }
        };
        let grad_y = logits.f_mm(&w)?.f_view_as(&y)?;
        weight_grad = Some(match weight_grad {
            None => logits.f_tr()?.f_mm(&y2)?,
            Some(acc) => acc.f_addmm(&logits.f_tr()?, &y2)?,
        });
        let wrt: Vec<&Tensor> = head.norm_params.iter().copied().chain([&xc]).collect();
        let mut g = vjp(&y, &grad_y, &wrt, false);
        inputs.push(g.pop().expect("grad of the chunk's input"));
        norm_grads = Some(match norm_grads {
            None => g,
            Some(acc) => acc.into_iter().zip(g).map(|(a, c)| a + c).collect(),
        });
        start += n;
    }
    let grads = norm_grads.expect("a micro-batch has at least one sequence").into_iter().chain(weight_grad);
    Ok(HeadGrads { loss, input: Tensor::f_cat(&inputs, 0)?, params: head.names.into_iter().zip(grads).collect() })
}
