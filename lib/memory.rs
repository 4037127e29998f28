//! Memory estimates for training GPT-2, Llama and Gemma with ZeRO stages 0-3: per GPU (parameters,
//! gradients, optimizer state, activations, logits, communication buffers) and per node (CPU),
//! with and without offload, and the largest micro-batch that fits. docs/estimate.md derives
//! every term. Stage 3 and offload are counted from the engine's own flat layout (`zero::layout`)
//! and stage-3 schedule (`zero::gather::Schedule`): the partition each rank holds and the
//! gathered working set the engine's walk over a micro-step reaches. Host memory per rank
//! ([`host_breakdown`]) is what `train` checks the machine against before it builds anything
//! (`memory::host`). The model is a `model::ModelConfig` (a preset, a config.json, a checkpoint's), so
//! parameter counts and layers are the model's own; the activation terms are written once for
//! both families from a few per-family facts ([`Dims`]).
//!
//! DeepSpeed's own model-state estimators (estimate_zero2_model_states_mem_needs and
//! estimate_zero3_model_states_mem_needs) are reproduced exactly in `deepspeed_zero2` and
//! `deepspeed_zero3`, and shown beside zerokit's figures.

use crate::checkpoint;
use crate::formats::dtype::DType;
use crate::interop::hf_model;
use crate::model::decoder::{Arch, DecoderConfig};
use crate::model::gpt2;
use crate::model::{LayerType, ModelConfig, ModelError};
use crate::units::{parse_size, SizeError};
use crate::zero::gather::Schedule;
use crate::zero::layout::FlatLayout;
use serde::{Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("unknown model preset '{0}' (expected one of {presets}, a config.json or a checkpoint)", presets = crate::model::preset_names().join(", "))]
    UnknownPreset(String),
    #[error("{0}")]
    Source(String),
    #[error("invalid model shape: {0}")]
    Shape(String),
    #[error("invalid setup: {0}")]
    Setup(String),
    #[error(transparent)]
    BadSize(#[from] SizeError),
    #[error("JSON output: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    HostTooSmall(String),
    #[error("{0}")]
    HostMemory(String),
}

pub mod host;

const GIB: f64 = (1u64 << 30) as f64;

/// The model being estimated, whichever family (serialized as a checkpoint manifest records it).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape(pub ModelConfig);

impl Serialize for ModelShape {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.to_manifest().serialize(s)
    }
}

/// The sizes the activation terms are written in, and the few facts where the families differ.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    /// C, the residual stream's width
    pub hidden: u64,
    /// F, the MLP's inner width
    pub ffn: u64,
    pub vocab: u64,
    /// Llama and Gemma: RMSNorm, a gated (SwiGLU, GeGLU) MLP and rotary positions; GPT-2:
    /// LayerNorm, GELU and learned position embeddings.
    pub llama: bool,
    /// The shortest sliding window (0: none) and how many layers have one (Gemma's local
    /// layers, Mistral's every layer, Qwen2's from max_window_layers on).
    pub sliding_window: u64,
    pub local_layers: u64,
    /// What Gemma adds; None for GPT-2 and Llama.
    pub gemma: Option<GemmaDims>,
}

/// Gemma's arithmetic that costs activations: RMSNorms that scale by (1 + gain) in fp32, two
/// more of them per block (after attention and after the MLP), QK-norm (Gemma 3), soft-capped
/// attention logits (Gemma 2: attention written out, T x T scores kept), soft-capped final logits
/// (one more logits-sized tensor in the head).
#[derive(Debug, Clone, Copy)]
pub struct GemmaDims {
    pub qk_norm: bool,
    pub attn_softcap: bool,
    pub final_softcap: bool,
}

/// The dims of a decoder (Llama, Gemma) from its [`Arch`].
fn decoder_dims(a: &Arch, gemma: bool) -> Dims {
    let n = |v: usize| v as u64;
    let window = a.layers.iter().filter_map(|l| l.window).min().unwrap_or(0);
    Dims {
        layers: n(a.layers.len()),
        heads: n(a.num_attention_heads),
        kv_heads: n(a.num_key_value_heads),
        head_dim: n(a.head_dim),
        hidden: n(a.hidden_size),
        ffn: n(a.intermediate_size),
        vocab: n(a.vocab_size),
        llama: true,
        sliding_window: n(window),
        local_layers: n(a.layers.iter().filter(|l| l.window.is_some()).count()),
        gemma: gemma.then(|| GemmaDims {
            qk_norm: a.qk_norm,
            attn_softcap: a.attn_softcap.is_some(),
            final_softcap: a.final_softcap.is_some(),
        }),
    }
}

/// The outer parameters of the shared decoder (Llama, Gemma): embedding, final norm, and the
/// head's weight (the embedding when tied).
fn decoder_outer(tied: bool) -> (Vec<&'static str>, Vec<&'static str>, &'static str) {
    use crate::model::decoder::{EMBED, LM_HEAD, NORM};
    (vec![EMBED], vec![NORM], if tied { EMBED } else { LM_HEAD })
}

impl ModelShape {
    /// A GPT-2, Llama or Gemma preset ([`ModelConfig::preset`]).
    pub fn preset(name: &str) -> Result<Self, MemoryError> {
        ModelConfig::preset(name).map(ModelShape).map_err(|_| MemoryError::UnknownPreset(name.to_string()))
    }

    pub fn validate(&self) -> Result<(), MemoryError> {
        self.0.validate().map_err(|e: ModelError| MemoryError::Shape(e.to_string()))
    }

    pub fn dims(&self) -> Dims {
        let n = |v: usize| v as u64;
        match &self.0 {
            ModelConfig::Gpt2(c) => Dims {
                layers: n(c.n_layer),
                heads: n(c.n_head),
                kv_heads: n(c.n_head),
                head_dim: n(c.n_embd / c.n_head.max(1)),
                hidden: n(c.n_embd),
                ffn: n(4 * c.n_embd),
                vocab: n(c.vocab_size),
                llama: false,
                sliding_window: 0,
                local_layers: 0,
                gemma: None,
            },
            ModelConfig::Llama(c) => decoder_dims(&c.arch(), false),
            ModelConfig::Gemma(c) => decoder_dims(&c.arch(), true),
        }
    }

    /// The longest sequence the model takes.
    pub fn positions(&self) -> u64 {
        self.0.positions() as u64
    }

    /// All parameters, a tied LM head counted once (as DeepSpeed's model_to_params does).
    pub fn num_params(&self) -> u64 {
        self.0.num_params() as u64
    }

    /// DeepSpeed's "largest layer": the most parameters held directly by one module
    /// (`parameters(recurse=False)`): the token embedding (or an untied lm_head) for every
    /// preset.
    pub fn largest_layer_params(&self) -> u64 {
        let mut modules: BTreeMap<String, u64> = BTreeMap::new();
        for spec in self.0.param_specs() {
            let module = spec.name.rsplit_once('.').map_or(spec.name.as_str(), |(m, _)| m);
            *modules.entry(module.to_string()).or_default() += spec.numel() as u64;
        }
        modules.into_values().max().unwrap_or(0)
    }

    /// The parameters outside the blocks by role, as the family names them: the embedding
    /// piece's, the final norm's, and the head's weight (the token embedding when tied).
    fn outer_params(&self) -> (Vec<&'static str>, Vec<&'static str>, &'static str) {
        match &self.0 {
            ModelConfig::Gpt2(_) => (vec![gpt2::WTE, gpt2::WPE], vec![gpt2::LN_F_WEIGHT, gpt2::LN_F_BIAS], gpt2::WTE),
            ModelConfig::Llama(c) => decoder_outer(c.tie_word_embeddings),
            ModelConfig::Gemma(c) => decoder_outer(c.tie_word_embeddings),
        }
    }

    /// The engine's flat layout of this model at `parts` partitions, and the buckets its
    /// embedding, each block and its head use (`zero::gather::Pieces`). The buckets are the ones
    /// every family declares (`Model::buckets`): an untied head's weight with the final norm
    /// first, each block's parameters from the last block (with the final norm when the head is
    /// tied), the embeddings last; tests/memory.rs checks them against the engine's own layout.
    pub fn stage3_plan(&self, parts: usize) -> Result<Stage3Plan, MemoryError> {
        let layers = self.dims().layers as usize;
        let (embed, norm, head) = self.outer_params();
        let untied = !embed.contains(&head);
        let first_block = usize::from(untied);
        let embed_bucket = first_block + layers;
        // The block a parameter belongs to: the first all-digit segment of its name.
        let block_of = |name: &str| name.split('.').find_map(|p| p.parse::<usize>().ok());
        let mut specs = Vec::new();
        for spec in self.0.param_specs() {
            let name = spec.name.as_str();
            let bucket = if embed.contains(&name) {
                embed_bucket
            } else if untied && (name == head || norm.contains(&name)) {
                0
            } else if norm.contains(&name) {
                first_block // with the last block
            } else if let Some(i) = block_of(name).filter(|&i| i < layers) {
                first_block + layers - 1 - i
            } else {
                return Err(MemoryError::Shape(format!("{name}: a parameter in no bucket of the engine's")));
            };
            specs.push((spec.name.clone(), spec.shape.iter().map(|&d| d as usize).collect(), bucket));
        }
        let layout = FlatLayout::new(&specs, parts).map_err(MemoryError::Shape)?;
        let bucket = |n: &str| layout.params.iter().find(|p| p.name == n).map(|p| p.bucket);
        let embed_uses = embed.iter().filter_map(|n| bucket(n)).collect();
        let blocks = (0..layers).map(|i| vec![first_block + layers - 1 - i]).collect();
        let head_uses = norm.iter().chain([&head]).filter_map(|n| bucket(n)).collect();
        Ok(Stage3Plan { layout, embed: embed_uses, blocks, head: head_uses })
    }

    /// The sequence length estimated when none is given: GPT-2's positions; for a Llama with
    /// rope scaling the context it was pretrained at (original_max_position_embeddings, 8192 for
    /// Llama 3) rather than the 131072 positions scaling reaches.
    pub fn default_seq_len(&self) -> u64 {
        match &self.0 {
            ModelConfig::Llama(c) => {
                c.rope_scaling.map_or(self.positions(), |r| r.original_max_position_embeddings as u64)
            }
            ModelConfig::Gpt2(_) => self.positions(),
            // Gemma 3 reaches 131072 positions through linear scaling too; its estimate defaults
            // to the 8192-token sequences Gemma 2 was trained at, a fine-tuning length.
            ModelConfig::Gemma(_) => self.positions().min(8192),
        }
    }

    /// The first line of the report.
    fn describe(&self) -> String {
        let d = self.dims();
        let attention =
            format!("{} heads ({} key/value, head_dim {}), hidden {}", d.heads, d.kv_heads, d.head_dim, d.hidden);
        match &self.0 {
            ModelConfig::Gpt2(c) => format!(
                "{} layers, {} heads, n_embd {}, vocab {}, block {}",
                d.layers, d.heads, d.hidden, d.vocab, c.block_size
            ),
            ModelConfig::Llama(c) => format!(
                "{}, {} layers{}, {attention}, SwiGLU {}, vocab {}, {} positions, {} head",
                c.model_type.name(),
                d.layers,
                match c.sliding_window {
                    Some(w) if d.local_layers > 0 => format!(" ({} with sliding window {w})", d.local_layers),
                    _ => String::new(),
                },
                d.ffn,
                d.vocab,
                c.max_position_embeddings,
                if c.tie_word_embeddings { "tied" } else { "untied" }
            ),
            ModelConfig::Gemma(c) => format!(
                "Gemma ({}), {} layers ({} local, window {}), {attention}, GeGLU {}, vocab {}, {} positions{}{}",
                c.model_type.model_type(),
                d.layers,
                d.local_layers,
                c.sliding_window,
                d.ffn,
                d.vocab,
                c.max_position_embeddings,
                if c.attn_logit_softcapping.is_some() || c.final_logit_softcapping.is_some() {
                    ", soft-capped logits"
                } else {
                    ""
                },
                if d.gemma.is_some_and(|g| g.qk_norm) { ", QK-norm" } else { "" }
            ),
        }
    }
}

/// The engine's flat layout of a model and the buckets its pieces use
/// ([`ModelShape::stage3_plan`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Stage3Plan {
    pub layout: FlatLayout,
    /// Buckets the embedding, each block (in forward order) and the head use.
    pub embed: Vec<usize>,
    pub blocks: Vec<Vec<usize>>,
    pub head: Vec<usize>,
}

/// The precision a training set-up keeps its parameters and activations in (`--dtype`): a
/// choice of the estimate, named as DeepSpeed's configs name it; its tensors' element type is a
/// [`DType`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Fp32,
    Fp16,
    Bf16,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Fp32 => "fp32",
            Dtype::Fp16 => "fp16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// The element type of tensors stored in this precision.
    pub fn tensor_dtype(self) -> DType {
        match self {
            Dtype::Fp32 => DType::F32,
            Dtype::Fp16 => DType::F16,
            Dtype::Bf16 => DType::BF16,
        }
    }

    pub fn bytes(self) -> u64 {
        self.tensor_dtype().size() as u64
    }
}

/// Where the optimizer state (and, at stage 3, the parameters) live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Offload {
    None,
    Optimizer,
    /// Stage 3's parameter shards only (offload_param without offload_optimizer).
    Params,
    OptimizerAndParams,
}

impl Offload {
    pub fn optimizer(self) -> bool {
        matches!(self, Offload::Optimizer | Offload::OptimizerAndParams)
    }

    pub fn params(self) -> bool {
        matches!(self, Offload::Params | Offload::OptimizerAndParams)
    }

    /// What the training configuration's offload_optimizer and offload_param ask for.
    pub fn from_flags(optimizer: bool, params: bool) -> Offload {
        match (optimizer, params) {
            (false, false) => Offload::None,
            (true, false) => Offload::Optimizer,
            (false, true) => Offload::Params,
            (true, true) => Offload::OptimizerAndParams,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Offload::None => "none",
            Offload::Optimizer => "optimizer",
            Offload::Params => "params",
            Offload::OptimizerAndParams => "opt+params",
        }
    }
}

/// One training set-up to estimate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Setup {
    pub model: ModelShape,
    pub gpus_per_node: u64,
    pub nodes: u64,
    pub dtype: Dtype,
    pub micro_batch: u64,
    pub seq_len: u64,
    pub activation_checkpointing: bool,
    /// Dropout > 0 saves a one-byte mask per element after the embedding and after each
    /// residual branch.
    pub dropout: bool,
    /// Gradient reduction bucket, in elements (DeepSpeed's reduce_bucket_size).
    pub bucket_elems: u64,
    /// Micro-batches accumulated per optimizer step.
    pub grad_accum: u64,
    /// Stage 3: elements of later blocks' parameters gathered ahead (stage3_prefetch_bucket_size).
    pub prefetch_elems: u64,
    /// Stage 3: buckets of at most this many elements stay gathered for the whole step
    /// (stage3_param_persistence_threshold).
    pub persistence_threshold: u64,
    /// Checkpoints are saved in the background (`async_save`), through host buffers kept from
    /// one save to the next.
    pub async_save: bool,
}

impl Setup {
    pub fn validate(&self) -> Result<(), MemoryError> {
        self.model.validate()?;
        if self.dropout && self.model.dims().llama {
            return Err(MemoryError::Setup("dropout: Llama has no residual dropout to keep masks for".into()));
        }
        if self.gpus_per_node == 0 || self.nodes == 0 {
            return Err(MemoryError::Setup("gpus per node and nodes must be at least 1".into()));
        }
        if self.seq_len == 0 || self.seq_len > self.model.positions() {
            return Err(MemoryError::Setup(format!(
                "sequence length {} must be in 1..={} (the model's positions)",
                self.seq_len,
                self.model.positions()
            )));
        }
        if self.grad_accum == 0 {
            return Err(MemoryError::Setup("gradient accumulation steps must be at least 1".into()));
        }
        self.model.stage3_plan(1)?;
        Ok(())
    }

    pub fn world_size(&self) -> u64 {
        self.gpus_per_node * self.nodes
    }
}

/// Bytes per GPU, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Breakdown {
    pub params: u64,
    pub grads: u64,
    /// fp32 master weights and both Adam moments
    pub optimizer: u64,
    pub activations: u64,
    pub logits: u64,
    pub comm: u64,
    /// CUDA kernel images loaded on first use and cuBLAS workspaces ([`CUDA_RUNTIME_BYTES`]).
    pub runtime: u64,
}

impl Breakdown {
    pub fn model_states(&self) -> u64 {
        self.params + self.grads + self.optimizer
    }

    pub fn total(&self) -> u64 {
        self.model_states() + self.activations + self.logits + self.comm + self.runtime
    }
}

/// DeepSpeed's estimator output for the same stage and offload (bytes; the GPU figure counts
/// parameters, gradients and optimizer state only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeepSpeedFigures {
    pub gpu: u64,
    pub cpu_per_node: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub stage: u8,
    pub offload: Offload,
    pub gpu: Breakdown,
    pub gpu_total: u64,
    /// Host memory of one rank (the one that holds most).
    pub host: HostBreakdown,
    /// Host memory of the first node: its ranks at their peaks, rank 0's save copies included.
    pub cpu_per_node: u64,
    /// Host bytes a rank keeps steadily per parameter of its share (Ψ/d) ([`host_bytes_per_param`]).
    pub host_bytes_per_param: f64,
    /// Largest micro-batch whose total fits the usable GPU memory (0: not even one sequence).
    pub max_micro_batch: u64,
    /// None for stages 0 and 1, which DeepSpeed has no estimator for.
    pub deepspeed: Option<DeepSpeedFigures>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    pub setup: Setup,
    pub num_params: u64,
    pub largest_layer_params: u64,
    /// GPU memory the micro-batch search fits into (after the reserve).
    pub usable_gpu_memory: u64,
    pub rows: Vec<Row>,
}

/// The stage/offload combinations reported, in order.
pub const CONFIGS: [(u8, Offload); 9] = [
    (0, Offload::None),
    (1, Offload::None),
    (1, Offload::Optimizer),
    (2, Offload::None),
    (2, Offload::Optimizer),
    (3, Offload::None),
    (3, Offload::Optimizer),
    (3, Offload::Params),
    (3, Offload::OptimizerAndParams),
];

/// Bytes per token a norm keeps on a GPU, its output included (the next matrix product saves
/// it). LayerNorm: its input and output (e each) and its mean and rstd (fp32 on CUDA). Llama's
/// RMSNorm, libtorch's fused kernel on a GPU (`kernels::rms_norm`): its input and output (e
/// each) and the fp32 inverse RMS. Gemma's RMSNorm scales in fp32 in composed ops: the fp32 copy
/// of its input, the fp32 normalised input the (1 + gain) product keeps, its output cast back
/// (e) and the rsqrt.
fn norm_bytes(d: &Dims, e: u64) -> u64 {
    if d.gemma.is_some() {
        (8 + e) * d.hidden + 4
    } else if d.llama {
        2 * e * d.hidden + 4
    } else {
        2 * e * d.hidden + 2 * 4
    }
}

/// What a CPU run's activations hold beyond the GPU's: Llama's RMSNorm runs its composed
/// reference there, which keeps an fp32 copy of its input (the input itself in fp32) and the
/// normalised input cast back, where the fused kernel keeps the input: 4 bytes a value more, for
/// each norm alive (two a block, one block with checkpointing, and the final norm).
pub fn norm_reference_extra_bytes(s: &Setup) -> u64 {
    let d = s.model.dims();
    if !d.llama || d.gemma.is_some() {
        return 0;
    }
    let blocks = if s.activation_checkpointing { 1 } else { d.layers };
    4 * d.hidden * s.micro_batch * s.seq_len * (2 * blocks + 1)
}

/// Activation bytes autograd keeps per transformer block for one micro-batch, with libtorch's
/// scaled_dot_product_attention (flash or memory-efficient: O(T), no T x T matrix). Per token:
/// two norms ([`norm_bytes`], the first one's output is the q/k/v projections' input); q, k and
/// v as attention saves them (GPT-2: views of c_attn's output; Llama: after rope, which keeps
/// nothing else, its cos and sin needing no gradient) and the attention output (= the output
/// projection's input: flash writes [B,T,H,D], so `transpose().contiguous()` is free); the
/// MLP's saved tensors: GPT-2's GELU input (F; `kernels::activated_linear` recomputes GELU in
/// backward for the projection's weight gradient), or the gated MLP's gate and up
/// (`kernels::gated_product` recomputes act(gate) in backward) and their product (3F). For GPT-2
/// (F = 4C, q = k = v = C) that is 12·C·e plus the norms' statistics.
/// Per block besides: the attention logsumexp (fp32, per head) and Llama's cos and sin tables
/// ([T, head_dim] each).
///
/// Gemma ([`GemmaDims`]): two more norms, after attention and after the MLP, whose outputs go to
/// the residual sum and are not kept; each norm's (1 + gain) in fp32 ([C], per block); QK-norm's
/// two norms over head_dim on q and k (fp32 input and normalised copy, rsqrt per head; their
/// output is not kept, rope's products keep only cos and sin); with soft-capped attention
/// (Gemma 2), attention written out instead of the fused kernel: k and v repeated to every
/// query head, and per head the T x T scores' tanh (e), the fp32 softmax and its cast to e (the
/// same tensor in fp32), and the T x T boolean mask. Any decoder (Gemma, Mistral, Qwen2) with
/// the fused kernel: a local layer's sliding-window mask in the compute dtype
/// ([`window_mask_bytes`]; a local block is the largest).
pub fn block_activation_bytes(s: &Setup) -> u64 {
    let d = s.model.dims();
    let (b, t) = (s.micro_batch, s.seq_len);
    let e = s.dtype.bytes();
    let tokens = b * t;
    let (q, kv) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
    let mlp = if d.llama { 3 * d.ffn } else { d.ffn };
    let mut per_token = 2 * norm_bytes(&d, e) + e * (2 * q + 2 * kv) + e * mlp;
    // flash attention (fp16/bf16) keeps logsumexp as [B, H, T]; the memory-efficient kernel
    // (what fp32 gets) pads T to a multiple of 32.
    let lse_t = if s.dtype == Dtype::Fp32 { t.div_ceil(32) * 32 } else { t };
    let rope = if d.llama { 2 * t * d.head_dim * e } else { 0 };
    let mut attention = b * d.heads * lse_t * 4;
    let mut per_block = 0;
    if let Some(g) = d.gemma {
        per_token += 2 * (norm_bytes(&d, e) - e * d.hidden);
        per_block += 4 * 4 * d.hidden;
        if g.qk_norm {
            per_token += 8 * (q + kv) + 4 * (d.heads + d.kv_heads);
            per_block += 2 * 4 * d.head_dim;
        }
        if g.attn_softcap {
            per_token += e * 2 * (q - kv);
            let cast = if e == 4 { 0 } else { e };
            attention = b * d.heads * t * t * (e + 4 + cast) + t * t;
        }
    }
    // Mistral's, Qwen2's and Gemma 3's windowed layers (none with Gemma 2's written-out attention).
    attention += window_mask_bytes(s);
    let mut bytes = tokens * per_token + attention + rope + per_block;
    if s.dropout {
        bytes += 2 * tokens * d.hidden; // attn and mlp residual dropout masks (bool)
    }
    bytes
}

/// A sliding-window layer's mask, when the window is shorter than the sequence and attention
/// goes through the fused kernel: [T, T] in the compute dtype.
fn window_mask_bytes(s: &Setup) -> u64 {
    let d = s.model.dims();
    // Gemma 2's soft-capped attention is written out, its mask inside the scores.
    let fused = !d.gemma.is_some_and(|g| g.attn_softcap);
    if fused && d.local_layers > 0 && d.sliding_window < s.seq_len {
        s.seq_len * s.seq_len * s.dtype.bytes()
    } else {
        0
    }
}

/// Activations outside the blocks: token ids (and GPT-2's positions) kept by the embedding
/// backward, the final norm (its output is the LM head's input), the targets and total weight
/// kept by nll_loss, and the embedding dropout mask; Gemma's final norm's (1 + gain) and the
/// embedding scale (a 0-dim tensor).
fn outer_activation_bytes(s: &Setup) -> u64 {
    let d = s.model.dims();
    let tokens = s.micro_batch * s.seq_len;
    let positions = if d.llama { 0 } else { s.seq_len * 8 };
    let gemma = if d.gemma.is_some() { 4 * d.hidden + s.dtype.bytes() } else { 0 };
    let mut bytes = tokens * 8 + positions + tokens * norm_bytes(&d, s.dtype.bytes()) + tokens * 8 + 4 + gemma;
    if s.dropout {
        bytes += tokens * d.hidden;
    }
    bytes
}

/// Activations alive when backward starts. With checkpointing only each block's input is
/// kept, plus one block's activations while it is recomputed.
pub fn activation_bytes(s: &Setup) -> u64 {
    let block = block_activation_bytes(s);
    let outer = outer_activation_bytes(s);
    let d = s.model.dims();
    if s.activation_checkpointing {
        let block_input = s.micro_batch * s.seq_len * d.hidden * s.dtype.bytes();
        d.layers * block_input + block + outer
    } else {
        // Global layers have no window mask.
        let global = d.layers - d.local_layers;
        d.layers * block - global * window_mask_bytes(s) + outer
    }
}

/// Tokens in one chunk of zerokit's head and loss (`Gpt::head_backward`): whole sequences,
/// about `model::HEAD_CHUNK_TOKENS`, at most the micro-batch.
pub fn head_chunk_tokens(s: &Setup) -> u64 {
    let per = (crate::model::HEAD_CHUNK_TOKENS as u64 / s.seq_len.max(1)).clamp(1, s.micro_batch.max(1));
    per * s.seq_len
}

/// The fp32 log-softmax of the logits that cross-entropy saves for backward, for one chunk.
pub fn loss_saved_bytes(s: &Setup) -> u64 {
    4 * head_chunk_tokens(s) * s.model.dims().vocab
}

/// The head's peak on a GPU, one chunk at a time (`model::head_backward_in_chunks`): the chunk's
/// logits in the compute dtype, which zerokit's fused classifier kernel overwrites with their
/// gradient in place (it keeps no fp32 copy, log-softmax or loss gradient), Gemma 2's
/// soft-capping's tanh(z / cap) beside them for the derivative 1 - tanh^2, and with more than one
/// chunk the head weight's gradient summed over chunks: the running sum and the chunk's own
/// (2·e·V·C).
pub fn logits_bytes(s: &Setup) -> u64 {
    let d = s.model.dims();
    let ctv = head_chunk_tokens(s) * d.vocab;
    let wte_sum = if head_grad_summed(s) { 2 * s.dtype.bytes() * d.vocab * d.hidden } else { 0 };
    let softcap = if d.gemma.is_some_and(|g| g.final_softcap) { ctv * s.dtype.bytes() } else { 0 };
    ctv * s.dtype.bytes() + softcap + wte_sum
}

/// Whether the head runs in more than one chunk, so that [`logits_bytes`] counts its weight's
/// gradient (the running sum and a chunk's own).
fn head_grad_summed(s: &Setup) -> bool {
    (s.micro_batch * s.seq_len).div_ceil(head_chunk_tokens(s)) > 1
}

/// What a CPU run holds beyond the GPU estimate, where zerokit's kernels and libtorch's fused
/// ops give way to their references in composed ops (also what `ZEROKIT_FUSED=0` costs on a
/// GPU): the head's reference keeps an fp32 copy of the chunk's logits, their log-softmax and the
/// fp32 gradient before writing it back, and Llama's norms ([`norm_reference_extra_bytes`]).
pub fn reference_extra_bytes(s: &Setup) -> u64 {
    loss_saved_bytes(s) + 2 * 4 * head_chunk_tokens(s) * s.model.dims().vocab + norm_reference_extra_bytes(s)
}

/// Device memory the CUDA runtime takes after the context exists, whatever the model: kernel
/// images that CUDA's lazy loading brings in as libtorch first uses them, and cuBLAS/cuBLASLt
/// workspaces. Measured as what `train` holds beyond every other term on an H200 with CUDA 13
/// and libtorch 2.11 (docs/estimate.md: 0.80-0.87 GiB at micro-batch 1 for 124M, 355M and 1.5B).
pub const CUDA_RUNTIME_BYTES: u64 = 800 << 20;

/// One rank's share of the engine's flat state at a stage, in elements, from its own layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Sizes {
    /// The rank's partition (its shard of every bucket, padded): what the fp32 master, Adam's
    /// moments and the fp32 gradient each hold, and at stage 3 the compute-dtype shards.
    pub partition: u64,
    /// The whole padded flat space (the fp32 copy the engine assembles at start-up).
    pub total: u64,
    /// The largest bucket, padded (a block's parameters, or the embeddings).
    pub largest_bucket: u64,
    /// Stage 3: the most elements of gathered buckets allocated at once over a step (0 when one
    /// rank's shards, on the device, are the whole buckets).
    pub gathered: u64,
}

/// The engine's sizes for this set-up at `stage` (0 with a set-up whose layout cannot be built,
/// which `Setup::validate` refuses first).
pub fn sizes(s: &Setup, stage: u8, offload: Offload) -> Sizes {
    let parts = if stage == 0 { 1 } else { s.world_size() as usize };
    let Ok(Stage3Plan { layout, embed, blocks, head }) = s.model.stage3_plan(parts) else {
        return Sizes::default();
    };
    let sizes: Vec<usize> = layout.buckets.iter().map(|b| b.padded).collect();
    let largest_bucket = sizes.iter().copied().max().unwrap_or(0) as u64;
    let copies = parts > 1 || offload.params();
    let gathered = if stage == 3 && copies {
        let schedule = Schedule::new(
            sizes,
            embed,
            blocks,
            head,
            !s.activation_checkpointing,
            s.prefetch_elems as usize,
            s.persistence_threshold as usize,
        );
        schedule.peak_elems(s.grad_accum as usize) as u64
    } else {
        0
    };
    Sizes { partition: layout.partition as u64, total: layout.total as u64, largest_bucket, gathered }
}

/// zerokit's per-GPU breakdown for one stage and offload choice.
pub fn gpu_breakdown(s: &Setup, stage: u8, offload: Offload) -> Breakdown {
    let psi = s.model.num_params();
    let d = s.world_size();
    let e = s.dtype.bytes();
    let part = |k: u64| k * psi / d;
    // Stages 0-2: autograd's compute-dtype gradients live only until their bucket is reduced into
    // the fp32 gradient shard the optimizer reads (4 bytes/param/d), except that stages 0-1
    // accumulate micro-batches in a full compute-dtype buffer (on the GPU with offload too).
    let accum = if s.grad_accum > 1 { e * psi } else { 0 };
    let mut comm = e * s.bucket_elems.min(psi);
    // One GPU and one micro-batch a step: zerokit's AdamW kernel reads autograd's gradients,
    // kept in the compute dtype until the step, and no fp32 gradient partition exists. They
    // appear as backward frees the activations, a block's gradients in fewer bytes than its
    // activations unless few are kept, so they add to the peak only beyond the activations.
    let direct = d == 1 && s.grad_accum == 1 && stage < 3 && !offload.optimizer();
    let activations = activation_bytes(s);
    if direct {
        comm = 0; // nothing is packed for a reduction
    }
    let (params, grads, optimizer) = match (stage, offload) {
        _ if direct => (e * psi, (e * psi).saturating_sub(activations), 12 * psi),
        (0, _) => (e * psi, 4 * psi + accum, 12 * psi),
        (1 | 2, o) if !o.optimizer() => (e * psi, part(4) + if stage == 1 { accum } else { 0 }, part(12)),
        (1, _) => (e * psi, accum, 0),
        (2, _) => (e * psi, 0, 0),
        _ => {
            // Stage 3, from the engine's layout: the rank's compute-dtype shards (unless
            // offloaded) and the gathered working set its schedule reaches; the fp32 gradient
            // partition and the optimizer's 12 bytes per element unless offloaded.
            let z = sizes(s, stage, offload);
            let p = z.partition;
            let shard = if offload.params() { 0 } else { e * p };
            let (g, o) = if offload.optimizer() { (0, 0) } else { (4 * p, 12 * p) };
            // Gradients in flight, a bucket's worth each: the next block's from autograd, the
            // bucket packed for its reduce-scatter, the one still being reduced and its reduced
            // shard (with optimizer offload converted to fp32 before it goes to the host). The
            // largest bucket is the head's or the embedding's; when the head runs in chunks its
            // weight's gradient, the first from autograd, is already in the logits term.
            let shard_max = if d > 1 { z.largest_bucket / d } else { 0 };
            let to_host = if offload.optimizer() { 4 * z.largest_bucket / d } else { 0 };
            let in_flight = if head_grad_summed(s) { 2 } else { 3 };
            comm = e * (in_flight * z.largest_bucket + shard_max) + to_host;
            (shard + e * z.gathered, g, o)
        }
    };
    Breakdown { params, grads, optimizer, activations, logits: logits_bytes(s), comm, runtime: CUDA_RUNTIME_BYTES }
}

/// Host memory one rank holds, by what it is (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct HostBreakdown {
    /// Optimizer offload: the fp32 master partition, Adam's two moments and the fp32 gradient
    /// partition, 16 bytes per element of the partition, in exactly-sized (pinned) buffers.
    pub optimizer: u64,
    /// Parameter offload: the compute-dtype shards, e bytes per element of the partition.
    pub params: u64,
    /// Background saves (`async_save`): the copy of the master weights and moments each rank
    /// that saves its partition keeps from its first save on (12 bytes per element); none with
    /// optimizer offload, whose saves write the host partition in place.
    pub checkpoint: u64,
    /// Start-up, before the engine releases it: the fp32 model `train` builds on the host, the
    /// engine's fp32 flat copy of it, the master partition when offloaded, and at stages 0-2 on
    /// a GPU the compute-dtype copy on its way to the device.
    pub startup: u64,
    /// Rank 0 only: the model's tensors of a save in host memory (stage 3 gathers them to the
    /// host; a background save copies them once more), and at stage 0, where rank 0 alone saves
    /// the one partition, its background-save copy.
    pub rank0: u64,
}

impl HostBreakdown {
    /// What the rank keeps once training runs.
    pub fn steady(&self) -> u64 {
        self.optimizer + self.params + self.checkpoint
    }

    /// The most the rank holds at once: start-up comes before the state it then keeps.
    pub fn peak(&self) -> u64 {
        self.startup.max(self.steady())
    }

    /// A node of `local` ranks, rank 0's among them when `rank0` (its save copies come on top of
    /// its steady state, after start-up).
    pub fn node(&self, local: u64, rank0: bool) -> u64 {
        if rank0 && local > 0 {
            (local - 1) * self.peak() + self.startup.max(self.steady() + self.rank0)
        } else {
            local * self.peak()
        }
    }
}

/// The host memory of one rank for one stage and offload choice, from the engine's layout
/// (`gpu`: training runs on a GPU, so the model moves off the host).
pub fn host_breakdown(s: &Setup, stage: u8, offload: Offload, gpu: bool) -> HostBreakdown {
    let psi = s.model.num_params();
    let e = s.dtype.bytes();
    let z = sizes(s, stage, offload);
    let p = z.partition;
    let opt = if offload.optimizer() { 16 * p } else { 0 };
    // With optimizer offload a background save writes the host partition in place (no copy).
    let saved = if s.async_save && !offload.optimizer() { 12 * p } else { 0 };
    let to_device = if gpu && stage < 3 && e != 4 { e * z.total } else { 0 };
    // The engine fills its fp32 flat copy as it releases the model's parameters: one of the two
    // at a time, the larger being the flat copy with its padding.
    let startup = 4 * psi.max(z.total) + if offload.optimizer() { 4 * p } else { 0 } + to_device;
    let model = e * psi * (u64::from(stage == 3) + u64::from(s.async_save));
    HostBreakdown {
        optimizer: opt,
        params: if offload.params() { e * p } else { 0 },
        // Stage 0's one partition is saved by rank 0 alone.
        checkpoint: if stage > 0 { saved } else { 0 },
        startup,
        rank0: model + if stage == 0 { saved } else { 0 },
    }
}

/// Host bytes per parameter of the model that one rank keeps steadily for its share of it
/// (steady bytes over Ψ/d): 16 with optimizer offload (its background saves write in place),
/// 16 + e with the parameters too; without optimizer offload, 12
/// while background saves keep their buffers.
pub fn host_bytes_per_param(s: &Setup, host: &HostBreakdown) -> f64 {
    let share = s.model.num_params() as f64 / s.world_size() as f64;
    host.steady() as f64 / share
}

/// DeepSpeed's estimate_zero2_model_states_mem_needs (stage_1_and_2.py): (cpu, gpu) bytes.
pub fn deepspeed_zero2(
    total_params: u64,
    num_gpus_per_node: u64,
    num_nodes: u64,
    cpu_offload: bool,
    additional_buffer_factor: f64,
) -> (u64, u64) {
    let total_gpus = num_nodes * num_gpus_per_node;
    let (cpu, gpu) = if cpu_offload {
        let gpu = 2 * total_params;
        let cpu = (total_params * (4 * total_gpus).max(16)) as f64 * additional_buffer_factor;
        (cpu, gpu)
    } else {
        let gpu = 2 * total_params + py_int((18 * total_params) as f64 / total_gpus as f64);
        let cpu = (total_params * 4 * num_gpus_per_node) as f64 * additional_buffer_factor;
        (cpu, gpu)
    };
    (py_int(cpu), gpu)
}

/// DeepSpeed's estimate_zero3_model_states_mem_needs (stage3.py): (cpu, gpu,
/// largest_layer_memory) bytes.
#[allow(clippy::too_many_arguments)]
pub fn deepspeed_zero3(
    total_params: u64,
    largest_layer_params: u64,
    num_gpus_per_node: u64,
    num_nodes: u64,
    cpu_offload: bool,
    cpu_offload_params: bool,
    zero_init: bool,
    additional_buffer_factor: f64,
) -> (u64, u64, u64) {
    let total_gpus = num_nodes * num_gpus_per_node;
    let gpus_factor = 1.0 / num_nodes as f64;
    let largest_layer_memory = 4 * largest_layer_params;
    let abf = additional_buffer_factor;
    // Python's max(int, float) * int keeps the int (exact) product when the int wins.
    let max_term = |k: f64| {
        let a = 4 * num_gpus_per_node;
        let b = k * gpus_factor;
        if a as f64 >= b {
            (total_params * a) as f64 * abf
        } else {
            total_params as f64 * b * abf
        }
    };
    let (cpu, gpu) = if cpu_offload {
        if cpu_offload_params {
            let cpu = if zero_init { (total_params * 18) as f64 * gpus_factor * abf } else { max_term(18.0) };
            (cpu, largest_layer_memory)
        } else {
            let gpu = largest_layer_memory + py_int((2 * total_params) as f64 / total_gpus as f64);
            let cpu = if zero_init { (total_params * 16) as f64 * gpus_factor * abf } else { max_term(16.0) };
            (cpu, gpu)
        }
    } else {
        let gpu = largest_layer_memory + py_int((18 * total_params) as f64 / total_gpus as f64);
        let cpu = if zero_init {
            (largest_layer_params * 4 * num_gpus_per_node) as f64 * abf
        } else {
            (total_params * 4 * num_gpus_per_node) as f64 * abf
        };
        (cpu, gpu)
    };
    (py_int(cpu), gpu, largest_layer_memory)
}

/// Python's int() of a non-negative float.
fn py_int(x: f64) -> u64 {
    x.trunc() as u64
}

/// What DeepSpeed's estimators say for a stage/offload (additional_buffer_factor 1.5 and
/// zero_init, their defaults); None where DeepSpeed has no estimator (stages 0 and 1).
pub fn deepspeed_figures(s: &Setup, stage: u8, offload: Offload) -> Option<DeepSpeedFigures> {
    let psi = s.model.num_params();
    let (g, n) = (s.gpus_per_node, s.nodes);
    let (cpu, gpu) = match (stage, offload) {
        // DeepSpeed's estimators have no parameter offload without optimizer offload.
        (_, Offload::Params) => return None,
        (2, _) => deepspeed_zero2(psi, g, n, offload.optimizer(), 1.5),
        (3, _) => {
            let (c, g, _) = deepspeed_zero3(
                psi,
                s.model.largest_layer_params(),
                g,
                n,
                offload.optimizer(),
                offload.params(),
                true,
                1.5,
            );
            (c, g)
        }
        _ => return None,
    };
    Some(DeepSpeedFigures { gpu, cpu_per_node: cpu })
}

/// The largest micro-batch whose total fits `usable` bytes (every activation and logit term is
/// linear in the micro-batch).
fn max_micro_batch(s: &Setup, stage: u8, offload: Offload, usable: u64) -> u64 {
    // Memory grows with the micro-batch, though not linearly (the head's chunk stops growing at
    // HEAD_CHUNK_TOKENS): search the largest that fits.
    let fits = |b: u64| gpu_breakdown(&Setup { micro_batch: b, ..s.clone() }, stage, offload).total() <= usable;
    if !fits(1) {
        return 0;
    }
    let mut hi = 2;
    while fits(hi) {
        if hi >= 1 << 40 {
            return hi; // nothing per sample: any micro-batch fits
        }
        hi *= 2;
    }
    let mut lo = hi / 2; // fits(lo), !fits(hi)
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Every stage and offload choice for one set-up. `usable_gpu_memory` is what the micro-batch
/// search may fill.
pub fn estimate(s: &Setup, usable_gpu_memory: u64) -> Result<Estimate, MemoryError> {
    s.validate()?;
    let rows = CONFIGS
        .iter()
        .map(|&(stage, offload)| {
            let gpu = gpu_breakdown(s, stage, offload);
            let host = host_breakdown(s, stage, offload, true);
            Row {
                stage,
                offload,
                gpu,
                gpu_total: gpu.total(),
                host,
                cpu_per_node: host.node(s.gpus_per_node, true),
                host_bytes_per_param: host_bytes_per_param(s, &host),
                max_micro_batch: max_micro_batch(s, stage, offload, usable_gpu_memory),
                deepspeed: deepspeed_figures(s, stage, offload),
            }
        })
        .collect();
    Ok(Estimate {
        setup: s.clone(),
        num_params: s.model.num_params(),
        largest_layer_params: s.model.largest_layer_params(),
        usable_gpu_memory,
        rows,
    })
}

/// `ckpt estimate`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct EstimateArgs {
    /// Model: a preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl, llama-3.2-1b, llama-3.2-3b,
    /// llama-3.1-8b, llama-tiny, mistral-7b, qwen2.5-0.5b, gemma-2-2b, gemma-3-27b, gemma-tiny),
    /// a Hugging Face config.json or model directory, or a zerokit
    /// checkpoint (root or tag). The flags below override its sizes.
    #[arg(long, default_value = "gpt2")]
    pub model: String,
    /// Layers (Llama: num_hidden_layers).
    #[arg(long)]
    pub n_layer: Option<u64>,
    /// Attention heads (Llama: num_attention_heads; head_dim becomes hidden / heads).
    #[arg(long)]
    pub n_head: Option<u64>,
    /// Hidden size (Llama: hidden_size).
    #[arg(long)]
    pub n_embd: Option<u64>,
    /// Key/value heads (Llama only: grouped-query attention).
    #[arg(long)]
    pub n_kv_head: Option<u64>,
    /// MLP inner width (Llama only: intermediate_size; GPT-2's is 4 * n_embd).
    #[arg(long)]
    pub ffn: Option<u64>,
    #[arg(long)]
    pub vocab_size: Option<u64>,
    /// Maximum sequence length of the model (GPT-2: n_positions; Llama: max_position_embeddings).
    #[arg(long)]
    pub block_size: Option<u64>,
    #[arg(long, default_value_t = 1)]
    pub gpus_per_node: u64,
    #[arg(long, default_value_t = 1)]
    pub nodes: u64,
    #[arg(long, value_enum, default_value_t = Dtype::Bf16)]
    pub dtype: Dtype,
    #[arg(long, default_value_t = 8)]
    pub micro_batch: u64,
    /// Tokens per sequence (default: a checkpoint's training block_size, else GPT-2's block size or
    /// the context a Llama was pretrained at).
    #[arg(long)]
    pub seq_len: Option<u64>,
    #[arg(long)]
    pub activation_checkpointing: bool,
    /// Count dropout masks (training with dropout > 0).
    #[arg(long)]
    pub dropout: bool,
    /// Gradient reduction bucket in elements (DeepSpeed's reduce_bucket_size default).
    #[arg(long, default_value_t = 500_000_000)]
    pub bucket_elems: u64,
    /// Micro-batches accumulated per optimizer step (gradient_accumulation_steps).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: u64,
    /// Stage 3: elements of later blocks' parameters gathered ahead of use (the
    /// stage3_prefetch_bucket_size key; 0 gathers each block only when it runs).
    #[arg(long, default_value_t = 50_000_000)]
    pub prefetch_elems: u64,
    /// Stage 3: buckets of at most this many elements stay gathered for the whole step (the
    /// stage3_param_persistence_threshold key).
    #[arg(long, default_value_t = 100_000)]
    pub persistence_threshold: u64,
    /// Checkpoints are written blocking (async_save = false): no host copy of the state.
    #[arg(long)]
    pub no_async_save: bool,
    /// Only this ZeRO stage's rows.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=3))]
    pub stage: Option<u8>,
    /// Only the rows with this offload (none, optimizer, optimizer-and-params).
    #[arg(long, value_enum)]
    pub offload: Option<Offload>,
    /// Memory of one GPU, for the largest micro-batch that fits.
    #[arg(long, default_value = "80GiB")]
    pub gpu_memory: String,
    /// Kept free on each GPU for the CUDA context, NCCL's buffers and allocator fragmentation.
    #[arg(long, default_value = "2GiB")]
    pub reserve: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The model `--model` names, and the sequence length a checkpoint was trained at.
fn model_source(spec: &str) -> Result<(ModelConfig, Option<u64>), MemoryError> {
    if let Ok(preset) = ModelConfig::preset(spec) {
        return Ok((preset, None));
    }
    let path = Path::new(spec);
    let src = |e: String| MemoryError::Source(format!("--model {spec}: {e}"));
    if path.join("manifest.json").is_file() || path.join("latest").is_file() {
        let dir = checkpoint::resolve(path, None).map_err(|e| src(e.to_string()))?;
        let m = checkpoint::read_manifest(&dir).map_err(|e| src(e.to_string()))?;
        let cfg = ModelConfig::from_manifest(&m.model_config).map_err(|e| src(format!("model_config: {e}")))?;
        return Ok((cfg, m.config.get("block_size").and_then(serde_json::Value::as_u64)));
    }
    if spec.ends_with(".json") || path.is_dir() {
        return Ok((hf_model::read_config(path).map_err(|e| src(e.to_string()))?, None));
    }
    Err(MemoryError::UnknownPreset(spec.to_string()))
}

/// The size flags on a decoder's configuration (Llama's and Gemma's share these field names):
/// heads, width (head_dim following them), key/value heads, MLP, vocabulary and positions.
macro_rules! resize_decoder {
    ($args:expr, $c:expr) => {{
        let (a, c, n) = ($args, $c, |v: u64| v as usize);
        c.num_attention_heads = a.n_head.map_or(c.num_attention_heads, n);
        c.hidden_size = a.n_embd.map_or(c.hidden_size, n);
        if a.n_head.is_some() || a.n_embd.is_some() {
            c.head_dim = c.hidden_size / c.num_attention_heads.max(1);
        }
        c.num_key_value_heads = a.n_kv_head.map_or(c.num_key_value_heads, n);
        c.intermediate_size = a.ffn.map_or(c.intermediate_size, n);
        c.vocab_size = a.vocab_size.map_or(c.vocab_size, n);
        c.max_position_embeddings = a.block_size.map_or(c.max_position_embeddings, n);
    }};
}

impl EstimateArgs {
    /// The model with the size flags applied.
    fn model(&self) -> Result<(ModelShape, Option<u64>), MemoryError> {
        let (mut cfg, trained_seq) = model_source(&self.model)?;
        let n = |v: u64| v as usize;
        match &mut cfg {
            ModelConfig::Gpt2(c) => {
                if self.n_kv_head.is_some() || self.ffn.is_some() {
                    return Err(MemoryError::Setup(
                        "--n-kv-head and --ffn are Llama's (GPT-2 has as many key/value heads as heads and a 4 * n_embd MLP)".into(),
                    ));
                }
                c.n_layer = self.n_layer.map_or(c.n_layer, n);
                c.n_head = self.n_head.map_or(c.n_head, n);
                c.n_embd = self.n_embd.map_or(c.n_embd, n);
                c.vocab_size = self.vocab_size.map_or(c.vocab_size, n);
                c.block_size = self.block_size.map_or(c.block_size, n);
            }
            ModelConfig::Llama(c) => {
                c.num_hidden_layers = self.n_layer.map_or(c.num_hidden_layers, n);
                resize_decoder!(self, c);
            }
            ModelConfig::Gemma(c) => {
                if let Some(layers) = self.n_layer.map(n).filter(|&l| l != c.num_hidden_layers) {
                    // Lengthened or shortened in the family's pattern (Gemma 2: every second
                    // layer global, Gemma 3: every sixth).
                    let period = c.layer_types.iter().position(|t| *t == LayerType::Full).map_or(layers + 1, |p| p + 1);
                    c.num_hidden_layers = layers;
                    c.layer_types = LayerType::pattern(layers, period);
                }
                resize_decoder!(self, c);
            }
        }
        let m = ModelShape(cfg);
        m.validate()?;
        Ok((m, trained_seq))
    }

    pub fn setup(&self) -> Result<Setup, MemoryError> {
        let (m, trained_seq) = self.model()?;
        let s = Setup {
            seq_len: self.seq_len.or(trained_seq).unwrap_or_else(|| m.default_seq_len()),
            model: m,
            gpus_per_node: self.gpus_per_node,
            nodes: self.nodes,
            dtype: self.dtype,
            micro_batch: self.micro_batch,
            activation_checkpointing: self.activation_checkpointing,
            dropout: self.dropout,
            bucket_elems: self.bucket_elems,
            grad_accum: self.grad_accum,
            prefetch_elems: self.prefetch_elems,
            persistence_threshold: self.persistence_threshold,
            async_save: !self.no_async_save,
        };
        s.validate()?;
        Ok(s)
    }
}

/// `ckpt estimate`: the report as text (a table, or JSON with `--json`).
pub fn run(args: &EstimateArgs) -> Result<String, MemoryError> {
    let s = args.setup()?;
    let gpu = parse_size(&args.gpu_memory)?;
    let reserve = parse_size(&args.reserve)?;
    let mut est = estimate(&s, gpu.saturating_sub(reserve))?;
    est.rows.retain(|r| args.stage.is_none_or(|st| r.stage == st) && args.offload.is_none_or(|o| r.offload == o));
    if est.rows.is_empty() {
        return Err(MemoryError::Setup(
            "no such row: optimizer offload needs stage 1, 2 or 3, parameter offload stage 3".into(),
        ));
    }
    if args.json {
        return Ok(serde_json::to_string_pretty(&est)? + "\n");
    }
    Ok(render(&est, &args.model, gpu))
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB
}

/// The host-memory bound in bytes per parameter of a rank's share, as the report states it.
pub fn host_bound_line(s: &Setup) -> String {
    let e = s.dtype.bytes();
    let saves = if s.async_save {
        "; background saves (async_save) write an offloaded partition in place, with no host copy (12 bytes per \
         parameter of the share without offload)"
    } else {
        ""
    };
    format!(
        "host bound per rank: 16 bytes per parameter of its share (Ψ/d) with optimizer offload (fp32 master, two \
         moments, fp32 gradient), {} with the parameters offloaded too{saves}; start-up holds 4 bytes per \
         parameter of the whole model per rank (the fp32 model, moved into the engine's flat copy as it is \
         released), + 4 of its share with the optimizer offloaded",
        16 + e
    )
}

/// The human-readable report.
pub fn render(est: &Estimate, model_name: &str, gpu_memory: u64) -> String {
    let s = &est.setup;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "model  {model_name}: {}: {:.1}M parameters (largest layer {:.1}M)",
        s.model.describe(),
        est.num_params as f64 / 1e6,
        est.largest_layer_params as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "setup  {} node(s) x {} GPU(s), {}, micro-batch {}, sequence {}, activation checkpointing {}{}",
        s.nodes,
        s.gpus_per_node,
        s.dtype.name(),
        s.micro_batch,
        s.seq_len,
        if s.activation_checkpointing { "on" } else { "off" },
        if s.dropout { ", dropout masks" } else { "" }
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "GiB per GPU                                                                          max micro-batch"
    );
    let _ = writeln!(
        out,
        "stage offload     params   grads   optim  activ  logits   comm   cuda    total   in {:>6.1} GiB",
        gib(gpu_memory)
    );
    for r in &est.rows {
        let g = &r.gpu;
        let _ = writeln!(
            out,
            "{:>5} {:<10} {:>7.2} {:>7.2} {:>7.2} {:>6.2} {:>7.2} {:>6.2} {:>6.2} {:>8.2}   {:>15}",
            r.stage,
            r.offload.label(),
            gib(g.params),
            gib(g.grads),
            gib(g.optimizer),
            gib(g.activations),
            gib(g.logits),
            gib(g.comm),
            gib(g.runtime),
            gib(r.gpu_total),
            r.max_micro_batch,
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "host GiB per rank{:>40}   steady bytes",
        format!("per node ({} rank(s) + rank 0's", s.gpus_per_node)
    );
    let _ = writeln!(
        out,
        "stage offload    offload  saves  start-up    peak                      save copies)   per param"
    );
    for r in &est.rows {
        let h = &r.host;
        let _ = writeln!(
            out,
            "{:>5} {:<10} {:>7.2} {:>6.2} {:>9.2} {:>7.2} {:>32.2}   {:>9.1}",
            r.stage,
            r.offload.label(),
            gib(h.optimizer + h.params),
            gib(h.checkpoint),
            gib(h.startup),
            gib(h.peak()),
            gib(r.cpu_per_node),
            r.host_bytes_per_param
        );
    }
    let _ = writeln!(out, "{}", host_bound_line(s));
    let _ = writeln!(out);
    let _ =
        writeln!(out, "DeepSpeed's estimators (params + grads + optimizer state only; buffer factor 1.5, zero_init):");
    let _ = writeln!(out, "stage offload     GPU GiB  CPU GiB/node   zerokit's params+grads+optim");
    for r in &est.rows {
        if let Some(ds) = r.deepspeed {
            let _ = writeln!(
                out,
                "{:>5} {:<10} {:>7.2} {:>13.2}   {:>7.2}",
                r.stage,
                r.offload.label(),
                gib(ds.gpu),
                gib(ds.cpu_per_node),
                gib(r.gpu.model_states())
            );
        }
    }
    let _ = writeln!(
        out,
        "\nmax micro-batch: the most sequences whose total fits {:.1} GiB (the GPU less --reserve). See docs/estimate.md.",
        gib(est.usable_gpu_memory)
    );
    out
}
